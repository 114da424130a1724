//! Converts the kernel's CLOCK_BOOTTIME timestamps into wall-clock RFC 3339 times.
use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

/// RFC 3339 in UTC with all nine sub-second digits, so every record's time has the same width.
const RFC3339_NANOS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z");

/// Maps boot-time nanoseconds to Unix time, with the offset measured once at start-up.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    /// Unix time minus boot time, in nanoseconds.
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock ids are constants the kernel knows.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl BootClock {
    pub fn new() -> Self {
        let boot = now_ns(libc::CLOCK_BOOTTIME);
        let real = now_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: real - boot,
        }
    }

    /// A clock with a fixed offset (for tests).
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// Current CLOCK_BOOTTIME in nanoseconds (the kernel programs' time base).
    pub fn boot_now_ns() -> u64 {
        u64::try_from(now_ns(libc::CLOCK_BOOTTIME)).unwrap_or(0)
    }

    /// RFC 3339 UTC time with nanoseconds for a boot-time timestamp.
    pub fn rfc3339(&self, boot_ns: u64) -> String {
        rfc3339_unix_ns(i128::from(boot_ns) + self.offset_ns)
    }

    /// RFC 3339 for now.
    pub fn now_rfc3339(&self) -> String {
        rfc3339_unix_ns(now_ns(libc::CLOCK_REALTIME))
    }
}

impl Default for BootClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Formats Unix nanoseconds as RFC 3339 UTC with nanoseconds.
pub fn rfc3339_unix_ns(unix_ns: i128) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(unix_ns)
        .ok()
        .and_then(|t| t.format(RFC3339_NANOS).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000000000Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_subseconds() {
        assert_eq!(
            rfc3339_unix_ns(1_763_782_000_123_456_789),
            "2025-11-22T03:26:40.123456789Z"
        );
    }

    #[test]
    fn boot_offset_is_applied() {
        let clock = BootClock::with_offset(1_000_000_000_000_000_000);
        assert_eq!(clock.rfc3339(500_000_000), "2001-09-09T01:46:40.500000000Z");
    }
}
