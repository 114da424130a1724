//! Kernel SNMP and netstat counters of one network namespace (what `nstat -az` prints).
//!
//! Several TCP failures leave no per-packet trace for the eBPF programs to see: a full accept
//! queue or SYN queue frees the refused SYN with `consume_skb`, so no `kfree_skb` drop reason
//! fires. The namespace-wide counters (`TcpExtListenOverflows`, `TcpExtListenDrops`,
//! `TcpExtTCPReqQFullDrop`, ...) are then the only evidence, so observer reads them in
//! intervals and reports their deltas.
//!
//! Parsing ([`parse_netstat`], [`delta`]) is pure; [`read_current`] is the I/O around it.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

/// Counter name (nstat's spelling: table prefix + column, e.g. `TcpExtListenOverflows`,
/// `TcpRetransSegs`, `Ip6InDiscards`) -> value.
pub type Counters = BTreeMap<String, u64>;

/// The calling *thread's* `/proc/net`: `/proc/net` and `/proc/self/net` follow the thread group
/// leader's namespace, which differs from this thread's inside
/// [`in_namespace`](super::netns::in_namespace).
pub const THREAD_SELF_NET: &str = "/proc/thread-self/net";

/// The files read, and whether each must exist: `snmp6` is absent when IPv6 is disabled.
const FILES: &[(&str, bool)] = &[("snmp", true), ("netstat", true), ("snmp6", false)];

/// Errors reading the counters files.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    /// A counters file could not be read.
    #[error("cannot read counters file `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    /// A required file was read but held no counter at all (not a counters file?).
    #[error("no counters found in `{path}`")]
    Empty { path: PathBuf },
}

/// Parses `/proc/net/snmp`, `/proc/net/netstat` or `/proc/net/snmp6` text.
///
/// `snmp` and `netstat` come as pairs of lines, a header and its values, both starting with the
/// table name (`TcpExt: ListenOverflows ...` then `TcpExt: 3 ...`); keys are table + column, as
/// nstat names them. `snmp6` has one `Name value` per line and keeps the name as it is.
///
/// Lenient, as a monitoring reader must be across kernel versions: a values line without its
/// header, extra or missing columns (zip to the shorter), and values that are not unsigned
/// integers are skipped. The latter are constants, not counters: `TcpMaxConn` is `-1`.
pub fn parse_netstat(text: &str) -> Counters {
    let mut counters = Counters::new();
    // The header of the table whose values line is expected next.
    let mut header: Option<(&str, Vec<&str>)> = None;
    for line in text.lines() {
        let mut tokens = line.split_whitespace();
        let Some(first) = tokens.next() else {
            continue;
        };
        if let Some(table) = first.strip_suffix(':') {
            match header.take() {
                Some((header_table, names)) if header_table == table => {
                    for (name, value) in names.iter().zip(tokens) {
                        if let Ok(value) = value.parse::<u64>() {
                            counters.insert(format!("{table}{name}"), value);
                        }
                    }
                }
                // A new header (a stray previous one is dropped).
                _ => header = Some((table, tokens.collect())),
            }
        } else {
            header = None;
            if let (Some(value), None) = (tokens.next(), tokens.next())
                && let Ok(value) = value.parse::<u64>()
            {
                counters.insert(first.to_owned(), value);
            }
        }
    }
    counters
}

/// Reads and merges the counters files in `dir` (a `/proc/.../net` directory).
pub fn read_dir(dir: &Path) -> Result<Counters, CountersError> {
    let mut counters = Counters::new();
    for &(file, required) in FILES {
        let path = dir.join(file);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if !required && e.kind() == io::ErrorKind::NotFound => continue,
            Err(io_error) => return Err(CountersError::Read { path, io_error }),
        };
        let parsed = parse_netstat(&text);
        if parsed.is_empty() && required {
            return Err(CountersError::Empty { path });
        }
        counters.extend(parsed);
    }
    Ok(counters)
}

/// The counters of the calling thread's network namespace (run it inside
/// [`in_namespace`](super::netns::in_namespace) for another namespace).
pub fn read_current() -> Result<Counters, CountersError> {
    read_dir(Path::new(THREAD_SELF_NET))
}

/// What moved between two readings: `after - before` for counters in both, saturating at 0 (a
/// counter never goes down unless the namespace was recreated), non-zero ones only. A counter
/// missing from either reading is left out rather than reported as its absolute value.
pub fn delta(before: &Counters, after: &Counters) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(name, &now)| {
            let moved = now.saturating_sub(*before.get(name)?);
            (moved > 0).then(|| (name.clone(), moved))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers OutRequests OutDiscards OutNoRoutes ReasmTimeout ReasmReqds ReasmOKs ReasmFails FragOKs FragFails FragCreates OutTransmits
Ip: 2 64 10942 0 0 0 0 0 10942 6645 0 0 0 0 0 0 0 0 0 6645
IcmpMsg: InType3 OutType3
IcmpMsg: 1 1
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 120 118 2 0 3 9000 8800 314 0 5 0
";

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPReqQFullDrop
TcpExt: 0 0 17 19 2
IpExt: InNoRoutes InTruncatedPkts
IpExt: 4 0
";

    const SNMP6: &str = "\
Ip6InReceives                   \t1
Ip6InDiscards                   \t7
Icmp6InType1                    \t3
";

    #[test]
    fn snmp_two_line_tables_get_prefixed_keys() {
        let c = parse_netstat(SNMP);
        assert_eq!(c["IpInReceives"], 10942);
        assert_eq!(c["IpForwarding"], 2);
        assert_eq!(c["IcmpMsgInType3"], 1);
        assert_eq!(c["TcpRetransSegs"], 314);
        assert_eq!(c["TcpCurrEstab"], 3);
        // -1 is "no limit", a constant: skipped.
        assert!(!c.contains_key("TcpMaxConn"));
    }

    #[test]
    fn netstat_extension_tables() {
        let c = parse_netstat(NETSTAT);
        assert_eq!(c["TcpExtListenOverflows"], 17);
        assert_eq!(c["TcpExtListenDrops"], 19);
        assert_eq!(c["TcpExtTCPReqQFullDrop"], 2);
        assert_eq!(c["IpExtInNoRoutes"], 4);
        assert_eq!(c.len(), 7);
    }

    #[test]
    fn snmp6_name_value_lines() {
        let c = parse_netstat(SNMP6);
        assert_eq!(c["Ip6InDiscards"], 7);
        assert_eq!(c["Icmp6InType1"], 3);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let text = "\
TcpExt: 1 2 3
Tcp: A B
Tcp: 1
Udp: X
Ip: 5
Ip6Foo 1 2
Ip6Bar x
";
        let c = parse_netstat(text);
        // "TcpExt: 1 2 3" is taken as a header with no values line; "Tcp: 1" zips to A only;
        // "Udp: X" then "Ip: 5": different tables, no pair.
        assert_eq!(c, Counters::from([("TcpA".to_owned(), 1)]));
    }

    #[test]
    fn delta_saturates_and_keeps_only_movement() {
        let before = Counters::from([
            ("A".to_owned(), 5),
            ("B".to_owned(), 9),
            ("C".to_owned(), 1),
        ]);
        let after = Counters::from([
            ("A".to_owned(), 8),
            ("B".to_owned(), 3),
            ("C".to_owned(), 1),
            ("New".to_owned(), 50),
        ]);
        assert_eq!(
            delta(&before, &after),
            BTreeMap::from([("A".to_owned(), 3)])
        );
    }

    #[test]
    fn read_dir_merges_and_tolerates_missing_snmp6() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("observer-counters-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("snmp"), SNMP)?;
        std::fs::write(dir.join("netstat"), NETSTAT)?;
        let without_v6 = read_dir(&dir);
        std::fs::write(dir.join("snmp6"), SNMP6)?;
        let with_v6 = read_dir(&dir);
        std::fs::remove_file(dir.join("netstat"))?;
        let missing = read_dir(&dir);
        std::fs::remove_dir_all(&dir)?;

        let without_v6 = without_v6?;
        assert_eq!(without_v6["TcpExtListenDrops"], 19);
        assert!(!without_v6.contains_key("Ip6InDiscards"));
        assert_eq!(with_v6?["Ip6InDiscards"], 7);
        assert!(matches!(missing, Err(CountersError::Read { .. })));
        Ok(())
    }

    #[test]
    fn reads_own_namespace() -> Result<(), CountersError> {
        // /proc/thread-self/net is readable without privileges.
        let c = read_current()?;
        assert!(c.contains_key("TcpExtListenOverflows"), "{c:?}");
        assert!(c.contains_key("TcpRetransSegs"));
        Ok(())
    }
}

#[cfg(test)]
mod proptests {
    //! `/proc/net/snmp`, `netstat` and `snmp6` of other kernels (new columns, missing ones):
    //! arbitrary and mutated text parses to counters, never a panic, one counter per token at
    //! most.
    use proptest::prelude::*;

    use super::*;
    use crate::prop_support::{self, assert_bounded};

    const SNMP: &str = "Ip: Forwarding DefaultTTL InReceives\nIp: 1 64 12345\nTcp: RtoAlgorithm RtoMin MaxConn ActiveOpens\nTcp: 1 200 -1 42\n";
    const NETSTAT: &str = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 3 5\nIpExt: InNoRoutes\nIpExt: 0\n";
    const SNMP6: &str = "Ip6InReceives                   \t100\nIp6InHdrErrors \t0\nUdp6InErrors 18446744073709551615\n";

    fn check(text: &str) -> Result<(), TestCaseError> {
        let counters = assert_bounded(text.len(), 64, 4096, || parse_netstat(text))?;
        prop_assert!(counters.len() <= text.split_whitespace().count());
        let _ = delta(&parse_netstat(SNMP), &counters);
        let _ = delta(&counters, &parse_netstat(SNMP));
        Ok(())
    }

    proptest! {
        #![proptest_config(prop_support::config())]

        #[test]
        fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
            check(&text)?;
        }

        #[test]
        fn mutated_proc_files_never_panic(text in prop_support::mutated_text(&[SNMP, NETSTAT, SNMP6])) {
            check(&text)?;
        }
    }
}
