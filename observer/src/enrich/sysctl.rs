//! Snapshots of the TCP-relevant sysctls.
//!
//! Values are read as the kernel prints them (whitespace-normalised strings), because several
//! are not single integers (e.g. `tcp_rmem` has three fields).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// The sysctls an operator wants next to TCP anomalies: each one has changed the outcome of a
/// real incident (timestamps and fast open: SYNs dropped by middleboxes; syncookies and backlogs:
/// listen overflows; rp_filter: asymmetric routes).
pub const TCP_SYSCTLS: &[&str] = &[
    "net.ipv4.tcp_timestamps",
    "net.ipv4.tcp_fastopen",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_sack",
    "net.ipv4.tcp_window_scaling",
    "net.ipv4.tcp_ecn",
    "net.ipv4.tcp_syn_retries",
    "net.ipv4.tcp_synack_retries",
    "net.ipv4.tcp_retries2",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_mtu_probing",
    "net.ipv4.tcp_congestion_control",
    "net.ipv4.ip_local_port_range",
    "net.core.somaxconn",
    "net.core.netdev_max_backlog",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.default.rp_filter",
];

/// Name -> value; a sysctl the kernel does not have is left out.
pub type Snapshot = BTreeMap<String, String>;

/// Path of a sysctl under a `/proc/sys`-like root: dots become slashes.
pub fn sysctl_path(root: &Path, name: &str) -> PathBuf {
    name.split('.')
        .fold(root.to_path_buf(), |p, part| p.join(part))
}

/// Normalises a value as read from /proc/sys: trims and folds runs of whitespace (tabs in
/// `ip_local_port_range`) into single spaces.
pub fn normalise(raw: &str) -> String {
    raw.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads `names` under `root` (normally `/proc/sys`, which shows the reader's network
/// namespace).
pub fn snapshot(root: &Path, names: &[&str]) -> Snapshot {
    names
        .iter()
        .filter_map(|name| {
            let value = std::fs::read_to_string(sysctl_path(root, name)).ok()?;
            Some(((*name).to_owned(), normalise(&value)))
        })
        .collect()
}

/// The host's TCP sysctls.
pub fn host_snapshot() -> Snapshot {
    snapshot(Path::new("/proc/sys"), TCP_SYSCTLS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_names_map_to_paths() {
        assert_eq!(
            sysctl_path(Path::new("/proc/sys"), "net.ipv4.conf.all.rp_filter"),
            PathBuf::from("/proc/sys/net/ipv4/conf/all/rp_filter")
        );
    }

    #[test]
    fn values_are_normalised() {
        assert_eq!(normalise("32768\t60999\n"), "32768 60999");
        assert_eq!(normalise("1\n"), "1");
    }

    #[test]
    fn snapshot_reads_present_and_skips_missing() {
        let dir = std::env::temp_dir().join(format!("observer-sysctl-{}", std::process::id()));
        let path = sysctl_path(&dir, "net.ipv4.tcp_timestamps");
        std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        std::fs::write(&path, "0\n").expect("write");
        let snap = snapshot(
            &dir,
            &["net.ipv4.tcp_timestamps", "net.ipv4.tcp_nonexistent"],
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(snap.len(), 1);
        assert_eq!(snap["net.ipv4.tcp_timestamps"], "0");
    }
}
