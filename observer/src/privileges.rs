//! Checks, before touching the kernel, that the process may load and attach eBPF programs, so
//! that a missing privilege is one clear sentence instead of a loader error.

/// Capability numbers from include/uapi/linux/capability.h (user-visible ABI).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Parses the effective capability mask out of /proc/self/status text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// What is missing from `caps` to load tracepoint programs and read perf buffers, if anything.
/// CAP_SYS_ADMIN alone covers both (older kernels); otherwise CAP_BPF and CAP_PERFMON are needed.
pub fn missing(caps: u64) -> Option<&'static str> {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    Some(match (has(CAP_BPF), has(CAP_PERFMON)) {
        (false, false) => "CAP_BPF and CAP_PERFMON",
        (false, true) => "CAP_BPF",
        _ => "CAP_PERFMON",
    })
}

/// Ok when this process has what it needs; otherwise the sentence to show the operator.
pub fn check() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = effective_caps(&status).unwrap_or(0);
    match missing(caps) {
        None => Ok(()),
        Some(what) => Err(format!(
            "observer needs {what} (or CAP_SYS_ADMIN) to load its eBPF programs: run it as root, e.g. `sudo observer run`, or grant the capabilities to the binary"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tobserver\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("Name: x\n"), None);
    }

    #[test]
    fn root_and_bpf_perfmon_suffice() {
        assert_eq!(missing(0x1ff_ffff_ffff), None);
        assert_eq!(missing((1 << CAP_BPF) | (1 << CAP_PERFMON)), None);
        assert_eq!(missing(1 << CAP_SYS_ADMIN), None);
    }

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing(0), Some("CAP_BPF and CAP_PERFMON"));
        assert_eq!(missing(1 << CAP_BPF), Some("CAP_PERFMON"));
        assert_eq!(missing(1 << CAP_PERFMON), Some("CAP_BPF"));
    }
}
