//! Socket owners: which process holds a socket, from the `socket:[INODE]` links in
//! `/proc/PID/fd` (what `ss -p` and `lsof` do).
//!
//! Socket inodes are numbered by sockfs, one counter for the whole machine, so an inode names
//! one socket whatever its network namespace: one [`OwnerMap`] serves every namespace. The
//! daemon runs in the host's PID namespace, where `/proc` lists every process, including
//! those of containers (their pids are then host pids).
//!
//! Only thread-group leaders are scanned (`/proc/PID`, not `/proc/PID/task/TID`): threads
//! share their leader's descriptor table except after `unshare(CLONE_FILES)`, which is rare.
//! A socket held by several processes (inherited across `fork`, passed over a unix socket) is
//! attributed to the lowest pid, and [`Owner::holders`] says how many hold it.
//!
//! Each owner carries its [`Service`]: the cgroup path and the systemd unit, container and pod
//! it names (see [`cgroup`](super::cgroup)).
//!
//! A short-lived process may have exited (or closed the socket) before the lookup: then no
//! owner is found, and the caller should say so ("exited") rather than guess.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    cgroup::{self, Service, read_prefix},
    netns::{self, NetnsError},
    sockdiag::{self, Extensions, Family, SockDiagError, StateMask, TcpSocket, TcpState},
};
use crate::decode::Flow;

/// The most of `/proc/PID/cmdline` kept.
pub const CMDLINE_MAX: usize = 200;
/// Rescans on a missed lookup are at least this far apart.
pub const MIN_RESCAN_INTERVAL: Duration = Duration::from_millis(500);

/// Errors finding socket owners.
#[derive(Debug, thiserror::Error)]
pub enum OwnersError {
    /// The proc root itself could not be listed (per-process errors are skipped: processes
    /// exit while the scan runs).
    #[error("cannot list `{path}`")]
    ReadProc {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    /// The flow's namespace could not be entered.
    #[error("cannot enter the flow's network namespace")]
    Netns(#[from] NetnsError),
    /// The sock_diag dump inside the namespace failed.
    #[error("sock_diag dump of {family:?} sockets failed")]
    Dump {
        family: Family,
        #[source]
        error: SockDiagError,
    },
}

/// A process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Owner {
    /// Process id (thread-group id) in the daemon's PID namespace.
    pub pid: u32,
    /// `/proc/PID/comm`: the executable's name as the kernel keeps it (at most 15 bytes).
    pub comm: String,
    /// The start of `/proc/PID/cmdline` ([`CMDLINE_MAX`] bytes at most), arguments separated
    /// by spaces; empty for kernel threads and zombies.
    pub cmdline: String,
    /// How many processes hold the socket (1 in the usual case; `pid` is the lowest).
    pub holders: u32,
    /// The process's cgroup and the service it names; `None` when `/proc/PID/cgroup` could not
    /// be read (the process exited during the scan).
    pub service: Option<Service>,
}

/// The inode in a `/proc/PID/fd/N` link target `socket:[INODE]` (pure); `None` for any other
/// kind of file.
pub fn parse_socket_link(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// `/proc/PID/comm` text without its newline (pure).
pub fn parse_comm(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.strip_suffix('\n').unwrap_or(&text).to_owned()
}

/// `/proc/PID/cmdline` bytes (NUL-separated arguments) as one line, cut to [`CMDLINE_MAX`]
/// bytes (pure). Trailing NULs are dropped, inner ones become spaces.
pub fn parse_cmdline(bytes: &[u8]) -> String {
    let bytes = bytes.get(..CMDLINE_MAX).unwrap_or(bytes);
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let joined: Vec<u8> = bytes[..end]
        .iter()
        .map(|&b| if b == 0 { b' ' } else { b })
        .collect();
    String::from_utf8_lossy(&joined).into_owned()
}

/// Socket inode -> owning process, from a scan of `/proc/*/fd`, rescanned on demand.
///
/// Lookups are answered from the last scan. [`OwnerMap::lookup_or_refresh`] first checks that
/// the remembered descriptor still holds the socket (one `readlink`: the process may have
/// exited or closed it since), and rescans when the inode is missing or no longer held, at
/// most once per [`MIN_RESCAN_INTERVAL`]: a burst of lookups for sockets of a process that
/// exited costs one scan, not one each.
///
/// A scan reads every process's descriptor table (one `readlink` per descriptor), so it costs
/// in proportion to the descriptors open on the machine (a few ms per thousand).
#[derive(Debug)]
pub struct OwnerMap {
    proc_root: PathBuf,
    by_inode: HashMap<u64, Entry>,
    last_scan: Option<Instant>,
    scans: u64,
}

impl Default for OwnerMap {
    fn default() -> Self {
        OwnerMap::new()
    }
}

impl OwnerMap {
    /// An empty map over `/proc` (the first missed lookup scans).
    pub fn new() -> OwnerMap {
        OwnerMap::with_proc_root("/proc")
    }

    /// An empty map over another proc root (tests use a directory of fake entries).
    pub fn with_proc_root(proc_root: impl Into<PathBuf>) -> OwnerMap {
        OwnerMap {
            proc_root: proc_root.into(),
            by_inode: HashMap::new(),
            last_scan: None,
            scans: 0,
        }
    }

    /// Rescans now (not rate-limited); returns the number of sockets found.
    pub fn refresh(&mut self) -> Result<usize, OwnersError> {
        self.refresh_at(Instant::now())
    }

    fn refresh_at(&mut self, now: Instant) -> Result<usize, OwnersError> {
        // Counted as a scan even when it fails, so a broken /proc is not re-read every call.
        self.last_scan = Some(now);
        self.scans += 1;
        self.by_inode = scan(&self.proc_root)?;
        Ok(self.by_inode.len())
    }

    /// The owner of socket `inode` as of the last scan (not checked: the process may have
    /// exited since).
    pub fn lookup(&self, inode: u64) -> Option<&Owner> {
        self.by_inode.get(&inode).map(|e| &e.owner)
    }

    /// The owner of socket `inode`, rescanning first if it is unknown and the last scan is at
    /// least [`MIN_RESCAN_INTERVAL`] old. `None`: no process holds the socket (it exited, or
    /// closed the socket, or the socket is an orphan or a request socket with inode 0).
    pub fn lookup_or_refresh(&mut self, inode: u64) -> Option<&Owner> {
        self.lookup_or_refresh_at(inode, Instant::now())
    }

    /// [`OwnerMap::lookup_or_refresh`] at a given time (for tests of the rate limit).
    pub fn lookup_or_refresh_at(&mut self, inode: u64, now: Instant) -> Option<&Owner> {
        if inode == 0 {
            return None;
        }
        let held = self
            .by_inode
            .get(&inode)
            .is_some_and(|e| still_holds(&e.fd, inode));
        if !held {
            // Gone from that process; another holder, if any, is found by a rescan.
            self.by_inode.remove(&inode);
            if self.may_rescan(now) {
                // A failed scan leaves the map empty; the answer is then "unknown", like a
                // miss.
                let _ = self.refresh_at(now);
            }
        }
        self.by_inode.get(&inode).map(|e| &e.owner)
    }

    fn may_rescan(&self, now: Instant) -> bool {
        self.last_scan
            .is_none_or(|last| now.saturating_duration_since(last) >= MIN_RESCAN_INTERVAL)
    }

    /// Sockets known from the last scan.
    pub fn len(&self) -> usize {
        self.by_inode.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_inode.is_empty()
    }

    /// Full scans done so far.
    pub fn scans(&self) -> u64 {
        self.scans
    }
}

/// What a scan remembers of a socket: its owner, and the descriptor link that showed it.
#[derive(Debug, Clone)]
struct Entry {
    owner: Owner,
    fd: PathBuf,
}

/// Whether the descriptor link `fd` still points to socket `inode`.
fn still_holds(fd: &Path, inode: u64) -> bool {
    std::fs::read_link(fd)
        .ok()
        .and_then(|target| parse_socket_link(target.to_str()?))
        == Some(inode)
}

/// One pass over `proc_root/*/fd`.
fn scan(proc_root: &Path) -> Result<HashMap<u64, Entry>, OwnersError> {
    let entries = std::fs::read_dir(proc_root).map_err(|io_error| OwnersError::ReadProc {
        path: proc_root.to_owned(),
        io_error,
    })?;
    let mut by_inode: HashMap<u64, Entry> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Gone, or not ours to read (EACCES without CAP_SYS_PTRACE): skipped.
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let sockets: Vec<(u64, PathBuf)> = fds
            .flatten()
            .filter_map(|fd| {
                let path = fd.path();
                let inode = parse_socket_link(std::fs::read_link(&path).ok()?.to_str()?)?;
                Some((inode, path))
            })
            .collect();
        if sockets.is_empty() {
            continue;
        }
        let dir = entry.path();
        let comm = read_prefix(&dir.join("comm"), 64)
            .map(|b| parse_comm(&b))
            .unwrap_or_default();
        let cmdline = read_prefix(&dir.join("cmdline"), CMDLINE_MAX)
            .map(|b| parse_cmdline(&b))
            .unwrap_or_default();
        let service = cgroup::read_service(&dir);
        let mut seen_here = HashSet::with_capacity(sockets.len());
        for (inode, fd) in sockets {
            // A process holding one socket in several descriptors is one holder.
            if !seen_here.insert(inode) {
                continue;
            }
            match by_inode.get_mut(&inode) {
                None => {
                    by_inode.insert(
                        inode,
                        Entry {
                            owner: Owner {
                                pid,
                                comm: comm.clone(),
                                cmdline: cmdline.clone(),
                                holders: 1,
                                service: service.clone(),
                            },
                            fd,
                        },
                    );
                }
                Some(entry) => {
                    entry.owner.holders += 1;
                    if pid < entry.owner.pid {
                        entry.owner.pid = pid;
                        entry.owner.comm.clone_from(&comm);
                        entry.owner.cmdline.clone_from(&cmdline);
                        entry.owner.service.clone_from(&service);
                        entry.fd = fd;
                    }
                }
            }
        }
    }
    Ok(by_inode)
}

/// The socket behind a flow, as found in a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSocket {
    /// Socket inode (never 0).
    pub inode: u32,
    /// The flow matched no connection, and this is the listener on its local address and
    /// port (a SYN-ACK retransmit, or a drop of a SYN to a listening port).
    pub listener: bool,
}

/// An IPv4-mapped IPv6 address as IPv4 (how [`Flow`] shows them).
fn unmap(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// Finds the socket of `flow` among `sockets` (pure).
///
/// First a socket with the flow's exact 4-tuple (IPv4-mapped addresses of dual-stack sockets
/// compare as IPv4) and a non-zero inode; else the listener on the flow's local port, bound
/// to its local address or to a wildcard (request sockets, orphans and TIME_WAIT sockets have
/// inode 0: no process holds them).
pub fn match_flow(flow: &Flow, sockets: &[TcpSocket]) -> Option<FlowSocket> {
    let local = unmap(flow.saddr);
    let peer = unmap(flow.daddr);
    let exact = sockets.iter().find(|s| {
        s.inode != 0
            && s.state != TcpState::Listen
            && s.sport == flow.sport
            && s.dport == flow.dport
            && unmap(s.saddr) == local
            && unmap(s.daddr) == peer
    });
    if let Some(s) = exact {
        return Some(FlowSocket {
            inode: s.inode,
            listener: false,
        });
    }
    sockets
        .iter()
        .filter(|s| s.inode != 0 && s.state == TcpState::Listen && s.sport == flow.sport)
        .filter_map(|s| {
            let bound = unmap(s.saddr);
            let rank = if bound == local {
                2
            } else if s.saddr.is_unspecified() && (s.family == Family::V6 || local.is_ipv4()) {
                1
            } else {
                return None;
            };
            Some((rank, s.inode))
        })
        .max_by_key(|(rank, inode)| (*rank, std::cmp::Reverse(*inode)))
        .map(|(_, inode)| FlowSocket {
            inode,
            listener: true,
        })
}

/// The sockets of `flows` in the calling thread's network namespace, in the same order (call
/// inside [`in_namespace`](super::netns::in_namespace)): one sock_diag dump of every state
/// per family that can hold them (IPv4 flows may sit on dual-stack IPv6 sockets), however
/// many flows.
pub fn flow_sockets(flows: &[Flow]) -> Result<Vec<Option<FlowSocket>>, OwnersError> {
    let mut families = Vec::new();
    for flow in flows {
        let wanted: &[Family] = match flow.family {
            crate::decode::Family::Ipv4 => &[Family::V4, Family::V6],
            crate::decode::Family::Ipv6 => &[Family::V6],
        };
        for family in wanted {
            if !families.contains(family) {
                families.push(*family);
            }
        }
    }
    let mut sockets = Vec::new();
    for family in families {
        let dump = sockdiag::dump_tcp(family, StateMask::ALL, Extensions::NONE)
            .map_err(|error| OwnersError::Dump { family, error })?;
        sockets.extend(dump);
    }
    Ok(flows
        .iter()
        .map(|flow| match_flow(flow, &sockets))
        .collect())
}

/// The processes holding the sockets of `flows`, all in the namespace at `ns_path` (e.g.
/// [`NamespaceRef::path`](super::netns::NamespaceRef::path)), in the same order. Blocks (a
/// namespace thread and one dump per family): call it from the context worker or
/// `spawn_blocking`, with the flows of one namespace together.
///
/// `None` for a flow whose socket is gone or held by no process: a short-lived process may
/// have exited before the lookup ("exited"). Each [`FlowSocket`] says whether the owner is
/// that of the connection or of the listener on the flow's port.
pub fn owners_of_flows(
    flows: &[Flow],
    ns_path: &Path,
    owners: &mut OwnerMap,
) -> Result<Vec<Option<(FlowSocket, Owner)>>, OwnersError> {
    let owned: Vec<Flow> = flows.to_vec();
    let sockets = netns::in_namespace(ns_path, move || flow_sockets(&owned))??;
    Ok(sockets
        .into_iter()
        .map(|socket| {
            let socket = socket?;
            let owner = owners.lookup_or_refresh(u64::from(socket.inode))?.clone();
            Some((socket, owner))
        })
        .collect())
}

/// [`owners_of_flows`] for one flow.
pub fn owner_of_flow(
    flow: &Flow,
    ns_path: &Path,
    owners: &mut OwnerMap,
) -> Result<Option<(FlowSocket, Owner)>, OwnersError> {
    Ok(
        owners_of_flows(std::slice::from_ref(flow), ns_path, owners)?
            .into_iter()
            .next()
            .flatten(),
    )
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        os::unix::fs::symlink,
    };

    use super::*;
    use crate::decode;

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link("socket:[1234]"), Some(1234));
        assert_eq!(
            parse_socket_link("socket:[18446744073709551615]"),
            Some(u64::MAX)
        );
        assert_eq!(parse_socket_link("pipe:[1234]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
        assert_eq!(parse_socket_link("socket:[]"), None);
        assert_eq!(parse_socket_link("socket:[12a]"), None);
        assert_eq!(parse_socket_link("socket:[12"), None);
        assert_eq!(parse_socket_link("anon_inode:[eventfd]"), None);
    }

    #[test]
    fn comm_and_cmdline() {
        assert_eq!(parse_comm(b"python3\n"), "python3");
        assert_eq!(parse_comm(b"kworker/0:1"), "kworker/0:1");
        assert_eq!(
            parse_cmdline(b"python3\0-c\0import time\0"),
            "python3 -c import time"
        );
        assert_eq!(parse_cmdline(b""), "");
        assert_eq!(parse_cmdline(b"\0\0"), "");
        let long = vec![b'x'; 500];
        assert_eq!(parse_cmdline(&long).len(), CMDLINE_MAX);
        // Invalid UTF-8 is replaced, not an error.
        assert_eq!(parse_cmdline(b"a\xffb"), "a\u{fffd}b");
    }

    /// A fake proc root, removed on drop.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(test: &str) -> io::Result<FakeProc> {
            let dir =
                std::env::temp_dir().join(format!("observer-owners-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            Ok(FakeProc(dir))
        }

        fn process(&self, pid: u32, comm: &str, cmdline: &[u8], fds: &[&str]) -> io::Result<()> {
            let dir = self.0.join(pid.to_string());
            std::fs::create_dir_all(dir.join("fd"))?;
            std::fs::write(dir.join("comm"), format!("{comm}\n"))?;
            std::fs::write(dir.join("cmdline"), cmdline)?;
            for (n, target) in fds.iter().enumerate() {
                symlink(target, dir.join("fd").join(n.to_string()))?;
            }
            Ok(())
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn scan_finds_owners_and_shared_sockets() -> Result<(), Box<dyn std::error::Error>> {
        let proc = FakeProc::new("scan")?;
        proc.process(
            300,
            "nginx",
            b"nginx: worker\0",
            &["socket:[11]", "socket:[12]", "/dev/null"],
        )?;
        // The master shares the listener (12) and holds it twice.
        proc.process(
            200,
            "nginx",
            b"nginx: master\0",
            &["socket:[12]", "socket:[12]"],
        )?;
        proc.process(400, "sleep", b"sleep\x0010\0", &["pipe:[5]"])?;
        std::fs::write(
            proc.0.join("200/cgroup"),
            "1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service\n",
        )?;
        std::fs::create_dir_all(proc.0.join("self"))?;
        std::fs::write(proc.0.join("uptime"), "1 1")?;

        let mut map = OwnerMap::with_proc_root(&proc.0);
        assert_eq!(map.refresh()?, 2);
        let worker = map.lookup(11).ok_or("socket 11")?;
        assert_eq!(
            (worker.pid, worker.comm.as_str(), worker.cmdline.as_str()),
            (300, "nginx", "nginx: worker")
        );
        assert_eq!(worker.holders, 1);
        let listener = map.lookup(12).ok_or("socket 12")?;
        assert_eq!((listener.pid, listener.holders), (200, 2));
        assert_eq!(listener.cmdline, "nginx: master");
        let service = listener.service.as_ref().ok_or("the master's cgroup")?;
        assert_eq!(service.cgroup, "/system.slice/nginx.service");
        assert_eq!(service.unit.as_deref(), Some("nginx.service"));
        // No cgroup file (as when the process exits mid-scan): no service, still an owner.
        assert_eq!(worker.service, None);
        assert_eq!(map.lookup(5), None);
        Ok(())
    }

    #[test]
    fn missed_lookups_rescan_at_most_every_500_ms() -> Result<(), Box<dyn std::error::Error>> {
        let proc = FakeProc::new("rate")?;
        let mut map = OwnerMap::with_proc_root(&proc.0);
        let t0 = Instant::now();
        // The first miss scans.
        assert!(map.lookup_or_refresh_at(7, t0).is_none());
        assert_eq!(map.scans(), 1);
        // A process appears; misses within 500 ms do not rescan.
        proc.process(50, "curl", b"curl\0", &["socket:[7]"])?;
        assert!(
            map.lookup_or_refresh_at(7, t0 + Duration::from_millis(100))
                .is_none()
        );
        assert!(
            map.lookup_or_refresh_at(8, t0 + Duration::from_millis(499))
                .is_none()
        );
        assert_eq!(map.scans(), 1);
        let owner = map
            .lookup_or_refresh_at(7, t0 + MIN_RESCAN_INTERVAL)
            .ok_or("socket 7 after rescan")?;
        assert_eq!(owner.pid, 50);
        assert_eq!(map.scans(), 2);
        // Hits never scan; inode 0 (no socket file) never does either.
        assert!(
            map.lookup_or_refresh_at(7, t0 + Duration::from_secs(5))
                .is_some()
        );
        assert!(
            map.lookup_or_refresh_at(0, t0 + Duration::from_secs(5))
                .is_none()
        );
        assert_eq!(map.scans(), 2);
        // A miss for another socket rescans (at 5 s; 7 is still held then).
        assert!(
            map.lookup_or_refresh_at(9, t0 + Duration::from_secs(5))
                .is_none()
        );
        assert_eq!(map.scans(), 3);
        // The process exits: its entry is no longer trusted even while no rescan is due (one
        // readlink checks it), and the next rescan forgets it.
        std::fs::remove_dir_all(proc.0.join("50"))?;
        assert!(
            map.lookup_or_refresh_at(7, t0 + Duration::from_millis(5_100))
                .is_none()
        );
        assert_eq!(map.scans(), 3);
        assert!(
            map.lookup_or_refresh_at(9, t0 + Duration::from_secs(6))
                .is_none()
        );
        assert_eq!(map.scans(), 4);
        assert!(map.lookup(7).is_none());
        Ok(())
    }

    #[test]
    fn missing_proc_root_is_an_error() {
        let mut map = OwnerMap::with_proc_root("/nonexistent/observer-proc");
        assert!(matches!(map.refresh(), Err(OwnersError::ReadProc { .. })));
        assert!(map.lookup_or_refresh(5).is_none());
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn mapped(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V6(Ipv4Addr::new(a, b, c, d).to_ipv6_mapped())
    }

    fn socket(
        family: Family,
        state: TcpState,
        (saddr, sport): (IpAddr, u16),
        (daddr, dport): (IpAddr, u16),
        inode: u32,
    ) -> TcpSocket {
        TcpSocket {
            family,
            state,
            saddr,
            sport,
            daddr,
            dport,
            inode,
            cookie: u64::from(inode),
            uid: 0,
            rqueue: 0,
            wqueue: 0,
            drops: None,
            tcp_info: None,
        }
    }

    fn flow(local: (IpAddr, u16), peer: (IpAddr, u16)) -> Flow {
        Flow {
            family: if local.0.is_ipv4() {
                decode::Family::Ipv4
            } else {
                decode::Family::Ipv6
            },
            saddr: local.0,
            sport: local.1,
            daddr: peer.0,
            dport: peer.1,
            netns: 0,
        }
    }

    #[test]
    fn flows_match_exact_tuples_then_listeners() {
        let server = v4(10, 0, 0, 2);
        let client = v4(10, 0, 0, 1);
        let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let sockets = vec![
            socket(
                Family::V4,
                TcpState::Listen,
                (server, 80),
                (v4(0, 0, 0, 0), 0),
                10,
            ),
            socket(
                Family::V4,
                TcpState::Established,
                (server, 80),
                (client, 4000),
                11,
            ),
            // A request socket and a TIME_WAIT socket: inode 0, never matched.
            socket(
                Family::V4,
                TcpState::SynRecv,
                (server, 80),
                (client, 4001),
                0,
            ),
            socket(
                Family::V4,
                TcpState::TimeWait,
                (server, 80),
                (client, 4002),
                0,
            ),
            // A dual-stack listener and connection on 8080.
            socket(Family::V6, TcpState::Listen, (any6, 8080), (any6, 0), 20),
            socket(
                Family::V6,
                TcpState::Established,
                (mapped(10, 0, 0, 2), 8080),
                (mapped(10, 0, 0, 1), 5000),
                21,
            ),
        ];
        let m = |local, peer| match_flow(&flow(local, peer), &sockets);
        assert_eq!(
            m((server, 80), (client, 4000)),
            Some(FlowSocket {
                inode: 11,
                listener: false
            })
        );
        // The request socket has no owner of its own: the listener's.
        assert_eq!(
            m((server, 80), (client, 4001)),
            Some(FlowSocket {
                inode: 10,
                listener: true
            })
        );
        assert_eq!(
            m((server, 8080), (client, 5000)),
            Some(FlowSocket {
                inode: 21,
                listener: false
            })
        );
        assert_eq!(
            m((server, 8080), (client, 5001)),
            Some(FlowSocket {
                inode: 20,
                listener: true
            })
        );
        // Another local address on port 80: the listener is bound to 10.0.0.2 only.
        assert_eq!(m((v4(10, 0, 0, 3), 80), (client, 4000)), None);
        assert_eq!(m((server, 81), (client, 4000)), None);
    }
}

#[cfg(test)]
mod proptests;
