//! Stale connections: established connections that stopped making progress and that nothing
//! in the kernel will ever time out, grouped by the process that holds them and the peer.
//!
//! A client that sent a request and waits for an answer without a timeout hangs for as long
//! as the server stays silent: TCP delivered and acknowledged the request, so there is
//! nothing to retransmit, and without SO_KEEPALIVE no timer runs at all. No packet and no
//! tracepoint marks the moment; the only evidence is the socket's own state, which sock_diag
//! reports (`tcp_info` times and the pending timer). [`classify`] reads it.
//!
//! [`snapshot_stale`] dumps one namespace's connections and classifies them (pure core:
//! [`stale_connections`]); [`attach_owners`] names their processes; [`StaleTracker`] keeps
//! what it has seen across sweeps and reports groups by (process, peer).
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    io,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use super::{
    cgroup::Service,
    netns::{self, NetnsError},
    owners::{Owner, OwnerMap},
    sockdiag::{
        self, DetailedSocket, Extensions, Family, SockDiagError, SocketTimer, StateMask, TcpSocket,
        TcpState,
    },
};

/// How long a connection must have made no progress to be stale, unless configured.
pub const DEFAULT_THRESHOLD: Duration = Duration::from_secs(30);
/// Sweeps over which [`StaleGroup::growing`] compares counts, unless configured.
pub const DEFAULT_GROWTH_SWEEPS: usize = 5;

/// Errors sweeping a namespace for stale connections.
#[derive(Debug, thiserror::Error)]
pub enum StaleError {
    /// The calling thread's namespace could not be identified.
    #[error("cannot identify the current network namespace")]
    Netns(#[source] io::Error),
    /// The namespace could not be entered.
    #[error("cannot enter the network namespace")]
    Enter(#[from] NetnsError),
    /// The sock_diag dump of one family failed.
    #[error("sock_diag dump of {family:?} connections failed")]
    Dump {
        family: Family,
        #[source]
        error: SockDiagError,
    },
}

/// Why a connection is stale. Times are the kernel's own (`tcp_info`), so the age of a stall
/// that began before observer started is known too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StaleKind {
    /// This side (the one that opened the connection) sent data, the peer acknowledged all of
    /// it, and nothing has been received since, for longer than the threshold, with no
    /// keepalive timer running: a request left unanswered that nothing will time out. The age
    /// is the time since the last data sent.
    AwaitingReply,
    /// Data is in flight and the peer has acknowledged nothing for longer than the threshold
    /// while the head segment is being retransmitted: the peer or the path is gone. The kernel
    /// gives up only after `tcp_retries2` (about 15 minutes) or TCP_USER_TIMEOUT. The age is
    /// the time since the last ACK.
    Unacknowledged,
    /// Data is queued but nothing has been sent for longer than the threshold: the peer's
    /// receive window is closed (it does not read). The age is the time since the last data
    /// sent.
    SendBlocked,
}

impl StaleKind {
    /// The name used in records.
    pub fn name(self) -> &'static str {
        match self {
            StaleKind::AwaitingReply => "awaiting_reply",
            StaleKind::Unacknowledged => "unacknowledged",
            StaleKind::SendBlocked => "send_blocked",
        }
    }
}

/// A stale verdict: the kind, and for how long the connection has made no progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness {
    pub kind: StaleKind,
    pub age_ms: u64,
}

/// Classifies one connection (pure).
///
/// - `timer`: the socket's pending timer ([`DetailedSocket::timer`]).
/// - `passive`: the connection was accepted from a listener (see [`passive_side`]). Only
///   the side that opened a connection is waiting for a reply when it goes quiet after
///   sending: a server that answered and waits for the next request on a kept-alive
///   connection is idle, not stuck.
///
/// Rules, with `T` the threshold (times are milliseconds ago, from `tcp_info`), for
/// ESTABLISHED and CLOSE_WAIT sockets with `tcp_info`:
/// 1. [`StaleKind::Unacknowledged`]: `unacked > 0`, `last_ack_recv > T`, and the head
///    segment was retransmitted (`tcpi_retransmits > 0`), which rules out data just sent
///    after a long idle period.
/// 2. [`StaleKind::SendBlocked`]: bytes queued and not sent (`notsent_bytes > 0`, or a send
///    queue with nothing in flight) and `last_data_sent > T`.
/// 3. [`StaleKind::AwaitingReply`], ESTABLISHED and active side only: data was sent
///    (`data_segs_out > 0`, Linux 4.6+), all of it acknowledged (`unacked == 0`, empty send
///    queue), `last_data_sent > T`, nothing received since the last send
///    (`last_data_recv > last_data_sent`, or no data ever received: `data_segs_in == 0`), and
///    no keepalive timer. The kernel keeps these times in jiffies (4 ms at HZ=250): a reply
///    received in the same jiffy as the request makes the two equal, and that is read as
///    answered. TCP_USER_TIMEOUT is not visible through sock_diag, but it only bounds
///    retransmissions and keepalive probes, so on such a connection it times out nothing
///    either.
pub fn classify(
    sock: &TcpSocket,
    timer: SocketTimer,
    passive: bool,
    threshold: Duration,
) -> Option<Staleness> {
    let info = sock.tcp_info.as_ref()?;
    if !matches!(sock.state, TcpState::Established | TcpState::CloseWait) {
        return None;
    }
    let t = u64::try_from(threshold.as_millis()).unwrap_or(u64::MAX);
    let last_ack_recv = u64::from(info.last_ack_recv_ms);
    let last_data_sent = u64::from(info.last_data_sent_ms);
    let last_data_recv = u64::from(info.last_data_recv_ms);

    let retransmitting = info.retransmits > 0
        || matches!(timer, SocketTimer::Retransmit { retransmits, .. } if retransmits > 0);
    if info.unacked > 0 && last_ack_recv > t && retransmitting {
        return Some(Staleness {
            kind: StaleKind::Unacknowledged,
            age_ms: last_ack_recv,
        });
    }
    let queued_unsent =
        info.notsent_bytes.unwrap_or(0) > 0 || (sock.wqueue > 0 && info.unacked == 0);
    if queued_unsent && last_data_sent > t {
        return Some(Staleness {
            kind: StaleKind::SendBlocked,
            age_ms: last_data_sent,
        });
    }
    let sent_data = info.data_segs_out.unwrap_or(0) > 0;
    let all_acked = info.unacked == 0 && sock.wqueue == 0;
    let nothing_since = last_data_recv > last_data_sent || info.data_segs_in == Some(0);
    let keepalive = matches!(timer, SocketTimer::KeepAlive { .. });
    if sock.state == TcpState::Established
        && !passive
        && sent_data
        && all_acked
        && last_data_sent > t
        && nothing_since
        && !keepalive
    {
        return Some(Staleness {
            kind: StaleKind::AwaitingReply,
            age_ms: last_data_sent,
        });
    }
    None
}

fn unmap(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// Tells accepted connections from opened ones, with the listeners of the same dump (pure).
///
/// A connection is on the passive side when a listener in its namespace has its local port
/// and its local address (or a wildcard). Connections accepted from a listener that has since
/// closed look active.
pub fn passive_side<'a>(sockets: impl IntoIterator<Item = &'a TcpSocket>) -> PassiveSide {
    PassiveSide {
        listeners: sockets
            .into_iter()
            .filter(|s| s.state == TcpState::Listen)
            .map(|s| (unmap(s.saddr), s.sport))
            .collect(),
    }
}

/// The listening (address, port) pairs of a namespace; see [`passive_side`].
#[derive(Debug, Clone, Default)]
pub struct PassiveSide {
    listeners: HashSet<(IpAddr, u16)>,
}

impl PassiveSide {
    /// Whether `sock` was accepted by one of the listeners.
    pub fn is_passive(&self, sock: &TcpSocket) -> bool {
        let local = unmap(sock.saddr);
        self.listeners
            .iter()
            .any(|(addr, port)| *port == sock.sport && (*addr == local || addr.is_unspecified()))
    }
}

/// One stale connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleConnection {
    /// Inode of the connection's network namespace.
    pub netns: u64,
    /// The kernel's socket cookie: the connection's identity across sweeps.
    pub cookie: u64,
    /// Socket inode (0 for an orphan no process holds).
    pub inode: u32,
    pub family: Family,
    /// Addresses as the kernel reports them, IPv4-mapped ones shown as IPv4.
    pub local: IpAddr,
    pub local_port: u16,
    pub peer: IpAddr,
    pub peer_port: u16,
    pub kind: StaleKind,
    /// How long the connection has made no progress (see [`StaleKind`]), by the kernel's
    /// clock.
    pub age_ms: u64,
    /// Bytes written and not yet acknowledged by the peer (the send queue).
    pub bytes_waiting: u64,
    /// The process holding the socket; `None` before [`attach_owners`], and when no process
    /// holds it any more (exited, or an orphan).
    pub owner: Option<Owner>,
}

/// Classifies every connection of one namespace's dump (pure). The dump must include that
/// namespace's LISTEN sockets (to tell accepted connections apart) and `tcp_info`.
pub fn stale_connections(
    netns: u64,
    sockets: &[DetailedSocket],
    threshold: Duration,
) -> Vec<StaleConnection> {
    let passive = passive_side(sockets.iter().map(|d| &d.socket));
    sockets
        .iter()
        .filter_map(|d| {
            let s = &d.socket;
            let verdict = classify(s, d.timer, passive.is_passive(s), threshold)?;
            Some(StaleConnection {
                netns,
                cookie: s.cookie,
                inode: s.inode,
                family: s.family,
                local: unmap(s.saddr),
                local_port: s.sport,
                peer: unmap(s.daddr),
                peer_port: s.dport,
                kind: verdict.kind,
                age_ms: verdict.age_ms,
                bytes_waiting: u64::from(s.wqueue),
                owner: None,
            })
        })
        .collect()
}

/// The stale connections of the calling thread's network namespace (call it inside
/// [`in_namespace`](super::netns::in_namespace)); owners are not attached yet.
///
/// One sock_diag dump per family of ESTABLISHED, CLOSE_WAIT and LISTEN sockets with
/// `tcp_info`: its cost grows with the namespace's connection count.
pub fn snapshot_stale(threshold: Duration) -> Result<Vec<StaleConnection>, StaleError> {
    let netns = netns::current_inode().map_err(StaleError::Netns)?;
    let mut sockets = Vec::new();
    for family in Family::ALL {
        let dump = sockdiag::dump_tcp_detailed(
            family,
            StateMask::ESTABLISHED | StateMask::CLOSE_WAIT | StateMask::LISTEN,
            Extensions::TCP_INFO,
        )
        .map_err(|error| StaleError::Dump { family, error })?;
        sockets.extend(dump);
    }
    Ok(stale_connections(netns, &sockets, threshold))
}

/// Names the process of each connection (one `/proc` rescan at most per
/// [`MIN_RESCAN_INTERVAL`](super::owners::MIN_RESCAN_INTERVAL) for sockets not yet known).
pub fn attach_owners(connections: &mut [StaleConnection], owners: &mut OwnerMap) {
    for c in connections {
        c.owner = owners.lookup_or_refresh(u64::from(c.inode)).cloned();
    }
}

/// [`snapshot_stale`] in the namespace at `ns_path`, with owners attached. Blocks.
pub fn sweep(
    ns_path: &Path,
    threshold: Duration,
    owners: &mut OwnerMap,
) -> Result<Vec<StaleConnection>, StaleError> {
    let mut connections = netns::in_namespace(ns_path, move || snapshot_stale(threshold))??;
    attach_owners(&mut connections, owners);
    Ok(connections)
}

/// Stale connections of one process to one peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StaleGroup {
    pub netns: u64,
    /// The owning process; `None` for connections no process holds (it exited).
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cmdline: Option<String>,
    /// The owner's cgroup and the unit, container and pod it names (`cgroup`, `unit`, ...;
    /// absent with the owner).
    #[serde(flatten)]
    pub service: Option<Service>,
    pub peer: IpAddr,
    pub peer_port: u16,
    /// Stale connections now.
    pub count: u64,
    /// `count` by kind.
    pub awaiting_reply: u64,
    pub unacknowledged: u64,
    pub send_blocked: u64,
    /// The longest stall among them, by the kernel's clock (seconds, rounded down).
    pub oldest_age_secs: u64,
    /// Their send queues added up.
    pub bytes_waiting: u64,
    /// `count` is higher than it was [`StaleTracker::growth_sweeps`] sweeps ago (a group that
    /// did not exist then counted 0; never on the first sweep of a namespace).
    pub growing: bool,
    /// Connections of the group that were not stale at the previous sweep.
    pub newly_stale: u64,
}

/// What identifies a group across sweeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct GroupKey {
    netns: u64,
    pid: Option<u32>,
    comm: Option<String>,
    peer: IpAddr,
    peer_port: u16,
}

/// Keeps stale connections and group sizes across sweeps (pure).
#[derive(Debug)]
pub struct StaleTracker {
    growth_sweeps: usize,
    /// (netns, cookie) -> when the connection was first seen stale.
    first_seen: HashMap<(u64, u64), Instant>,
    /// Group -> its count at each of the last `growth_sweeps + 1` sweeps of its namespace,
    /// oldest first.
    history: HashMap<GroupKey, VecDeque<u64>>,
    /// Namespaces swept at least once.
    swept: HashSet<u64>,
}

impl Default for StaleTracker {
    fn default() -> Self {
        StaleTracker::new(DEFAULT_GROWTH_SWEEPS)
    }
}

impl StaleTracker {
    /// A tracker whose groups are `growing` when larger than `growth_sweeps` sweeps ago
    /// (at least 1).
    pub fn new(growth_sweeps: usize) -> StaleTracker {
        StaleTracker {
            growth_sweeps: growth_sweeps.max(1),
            first_seen: HashMap::new(),
            history: HashMap::new(),
            swept: HashSet::new(),
        }
    }

    pub fn growth_sweeps(&self) -> usize {
        self.growth_sweeps
    }

    /// When the connection `cookie` of `netns` was first seen stale (it is stale now).
    pub fn first_seen(&self, netns: u64, cookie: u64) -> Option<Instant> {
        self.first_seen.get(&(netns, cookie)).copied()
    }

    /// Feeds one sweep of namespace `netns` (connections of other namespaces are ignored);
    /// returns its groups, largest first.
    pub fn update(
        &mut self,
        netns: u64,
        now: Instant,
        connections: &[StaleConnection],
    ) -> Vec<StaleGroup> {
        let first_sweep = self.swept.insert(netns);
        let mut groups: BTreeMap<GroupKey, StaleGroup> = BTreeMap::new();
        let mut current = HashSet::new();
        for c in connections.iter().filter(|c| c.netns == netns) {
            if !current.insert(c.cookie) {
                continue;
            }
            let newly = !self.first_seen.contains_key(&(netns, c.cookie));
            self.first_seen.entry((netns, c.cookie)).or_insert(now);
            let key = GroupKey {
                netns,
                pid: c.owner.as_ref().map(|o| o.pid),
                comm: c.owner.as_ref().map(|o| o.comm.clone()),
                peer: c.peer,
                peer_port: c.peer_port,
            };
            let group = groups.entry(key).or_insert_with(|| StaleGroup {
                netns,
                pid: c.owner.as_ref().map(|o| o.pid),
                comm: c.owner.as_ref().map(|o| o.comm.clone()),
                cmdline: c.owner.as_ref().map(|o| o.cmdline.clone()),
                service: c.owner.as_ref().and_then(|o| o.service.clone()),
                peer: c.peer,
                peer_port: c.peer_port,
                count: 0,
                awaiting_reply: 0,
                unacknowledged: 0,
                send_blocked: 0,
                oldest_age_secs: 0,
                bytes_waiting: 0,
                growing: false,
                newly_stale: 0,
            });
            group.count += 1;
            match c.kind {
                StaleKind::AwaitingReply => group.awaiting_reply += 1,
                StaleKind::Unacknowledged => group.unacknowledged += 1,
                StaleKind::SendBlocked => group.send_blocked += 1,
            }
            group.oldest_age_secs = group.oldest_age_secs.max(c.age_ms / 1000);
            group.bytes_waiting = group.bytes_waiting.saturating_add(c.bytes_waiting);
            group.newly_stale += u64::from(newly);
        }
        // Connections no longer stale (answered, or closed) start afresh if they stall again.
        self.first_seen
            .retain(|(ns, cookie), _| *ns != netns || current.contains(cookie));

        // Group history: every group of this namespace gets this sweep's count (0 if gone).
        let window = self.growth_sweeps + 1;
        for key in groups.keys() {
            self.history.entry(key.clone()).or_insert_with(|| {
                if first_sweep {
                    VecDeque::new()
                } else {
                    // It did not exist at the previous sweep of a namespace already known.
                    VecDeque::from([0])
                }
            });
        }
        self.history.retain(|key, counts| {
            if key.netns != netns {
                return true;
            }
            let count = groups.get(key).map_or(0, |g| g.count);
            counts.push_back(count);
            while counts.len() > window {
                counts.pop_front();
            }
            counts.iter().any(|&c| c > 0)
        });
        for (key, group) in &mut groups {
            group.growing = self
                .history
                .get(key)
                .and_then(|counts| counts.front())
                .is_some_and(|&oldest| group.count > oldest);
        }
        let mut out: Vec<StaleGroup> = groups.into_values().collect();
        out.sort_by_key(|g| std::cmp::Reverse(g.count));
        out
    }

    /// Forgets a namespace that no longer exists.
    pub fn forget(&mut self, netns: u64) {
        self.swept.remove(&netns);
        self.first_seen.retain(|(ns, _), _| *ns != netns);
        self.history.retain(|key, _| key.netns != netns);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::enrich::sockdiag::TcpInfoLite;

    const T: Duration = Duration::from_secs(30);
    const NS: u64 = 4026532000;

    fn v4(d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, d))
    }

    /// An established client connection 10.0.0.1:40000+n -> 10.0.0.2:80 that sent a request
    /// 40 s ago, got it acknowledged, and received nothing since.
    fn waiting(n: u16) -> TcpSocket {
        TcpSocket {
            family: Family::V4,
            state: TcpState::Established,
            saddr: v4(1),
            sport: 40000 + n,
            daddr: v4(2),
            dport: 80,
            inode: 1000 + u32::from(n),
            cookie: 5000 + u64::from(n),
            uid: 0,
            rqueue: 0,
            wqueue: 0,
            drops: None,
            tcp_info: Some(TcpInfoLite {
                state: 1,
                last_data_sent_ms: 40_000,
                last_data_recv_ms: 40_004,
                last_ack_recv_ms: 39_990,
                data_segs_out: Some(1),
                data_segs_in: Some(0),
                bytes_sent: Some(100),
                notsent_bytes: Some(0),
                ..TcpInfoLite::default()
            }),
        }
    }

    fn with_info(mut s: TcpSocket, f: impl FnOnce(&mut TcpInfoLite)) -> TcpSocket {
        if let Some(info) = s.tcp_info.as_mut() {
            f(info);
        }
        s
    }

    fn kind(s: &TcpSocket, timer: SocketTimer, passive: bool) -> Option<StaleKind> {
        classify(s, timer, passive, T).map(|v| v.kind)
    }

    #[test]
    fn unanswered_request_is_awaiting_reply() {
        let s = waiting(0);
        assert_eq!(
            classify(&s, SocketTimer::None, false, T),
            Some(Staleness {
                kind: StaleKind::AwaitingReply,
                age_ms: 40_000
            })
        );
        // Same times, but data came back once before the request (a second request on a
        // kept-alive connection): still waiting, received nothing since.
        let again = with_info(waiting(0), |i| {
            i.data_segs_in = Some(3);
            i.last_data_recv_ms = 50_000;
        });
        assert_eq!(
            kind(&again, SocketTimer::None, false),
            Some(StaleKind::AwaitingReply)
        );
        // Request sent at connection set-up, in the same jiffy: nothing ever received.
        let same_jiffy = with_info(waiting(0), |i| i.last_data_recv_ms = 40_000);
        assert_eq!(
            kind(&same_jiffy, SocketTimer::None, false),
            Some(StaleKind::AwaitingReply)
        );
    }

    #[test]
    fn answered_idle_and_young_connections_are_not_stale() {
        // The answer came after the request: idle, not waiting.
        let answered = with_info(waiting(0), |i| {
            i.data_segs_in = Some(1);
            i.last_data_recv_ms = 39_999;
        });
        assert_eq!(kind(&answered, SocketTimer::None, false), None);
        // Answered within the same jiffy: equal times read as answered.
        let same = with_info(answered.clone(), |i| i.last_data_recv_ms = 40_000);
        assert_eq!(kind(&same, SocketTimer::None, false), None);
        // Waiting, but for less than the threshold.
        let young = with_info(waiting(0), |i| {
            i.last_data_sent_ms = 29_000;
            i.last_data_recv_ms = 29_004;
        });
        assert_eq!(kind(&young, SocketTimer::None, false), None);
        // Never sent anything (a connection opened and left unused).
        let unused = with_info(waiting(0), |i| i.data_segs_out = Some(0));
        assert_eq!(kind(&unused, SocketTimer::None, false), None);
        // Kernels before 4.6 do not count data segments: not classified.
        let old_kernel = with_info(waiting(0), |i| i.data_segs_out = None);
        assert_eq!(kind(&old_kernel, SocketTimer::None, false), None);
        // No tcp_info at all.
        let mut bare = waiting(0);
        bare.tcp_info = None;
        assert_eq!(kind(&bare, SocketTimer::None, false), None);
    }

    #[test]
    fn keepalive_server_side_and_closing_are_excluded() {
        let s = waiting(0);
        let keepalive = SocketTimer::KeepAlive {
            expires_ms: 7_000_000,
        };
        assert_eq!(kind(&s, keepalive, false), None);
        // The server of a kept-alive connection answered and waits for the next request.
        assert_eq!(kind(&s, SocketTimer::None, true), None);
        // The peer closed (CLOSE_WAIT): the application sees EOF, it is not waiting.
        let closed = TcpSocket {
            state: TcpState::CloseWait,
            ..waiting(0)
        };
        assert_eq!(kind(&closed, SocketTimer::None, false), None);
        let listen = TcpSocket {
            state: TcpState::Listen,
            ..waiting(0)
        };
        assert_eq!(kind(&listen, SocketTimer::None, false), None);
    }

    #[test]
    fn unacknowledged_data_needs_a_retransmission() {
        let stuck = TcpSocket {
            wqueue: 300,
            ..with_info(waiting(0), |i| {
                i.unacked = 2;
                i.last_ack_recv_ms = 35_000;
                i.last_data_sent_ms = 200;
                i.retransmits = 6;
            })
        };
        assert_eq!(
            classify(&stuck, SocketTimer::None, true, T),
            Some(Staleness {
                kind: StaleKind::Unacknowledged,
                age_ms: 35_000
            })
        );
        // The same in CLOSE_WAIT, and seen through the timer only.
        let closing = TcpSocket {
            state: TcpState::CloseWait,
            ..with_info(stuck.clone(), |i| i.retransmits = 0)
        };
        let rto = SocketTimer::Retransmit {
            expires_ms: 100,
            retransmits: 3,
        };
        assert_eq!(kind(&closing, rto, false), Some(StaleKind::Unacknowledged));
        // Data just sent after a long idle period: no retransmission yet.
        let fresh = with_info(stuck, |i| i.retransmits = 0);
        assert_eq!(kind(&fresh, SocketTimer::None, false), None);
    }

    #[test]
    fn queued_data_not_sent_is_send_blocked() {
        let blocked = TcpSocket {
            wqueue: 65_536,
            ..with_info(waiting(0), |i| {
                i.notsent_bytes = Some(65_536);
                i.last_data_sent_ms = 31_000;
                i.last_ack_recv_ms = 100;
            })
        };
        let probe = SocketTimer::ZeroWindowProbe { expires_ms: 400 };
        assert_eq!(kind(&blocked, probe, true), Some(StaleKind::SendBlocked));
        // Old kernels without notsent_bytes: a send queue with nothing in flight.
        let old = with_info(blocked.clone(), |i| i.notsent_bytes = None);
        assert_eq!(kind(&old, probe, false), Some(StaleKind::SendBlocked));
        let sending = with_info(blocked, |i| i.last_data_sent_ms = 10);
        assert_eq!(kind(&sending, probe, false), None);
    }

    #[test]
    fn kind_names_match_their_json() {
        for kind in [
            StaleKind::AwaitingReply,
            StaleKind::Unacknowledged,
            StaleKind::SendBlocked,
        ] {
            assert_eq!(
                serde_json::to_value(kind).ok(),
                Some(serde_json::Value::from(kind.name()))
            );
        }
    }

    #[test]
    fn listeners_mark_the_passive_side() {
        let listener = TcpSocket {
            state: TcpState::Listen,
            saddr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            sport: 80,
            ..waiting(0)
        };
        let sockets = [
            listener,
            TcpSocket {
                state: TcpState::Listen,
                saddr: v4(9),
                sport: 443,
                ..waiting(0)
            },
        ];
        let passive = passive_side(&sockets);
        let accepted = TcpSocket {
            saddr: v4(2),
            sport: 80,
            ..waiting(0)
        };
        assert!(passive.is_passive(&accepted));
        // Port 443 is bound to 10.0.0.9 only.
        assert!(!passive.is_passive(&TcpSocket {
            sport: 443,
            ..accepted.clone()
        }));
        assert!(!passive.is_passive(&waiting(0)));
    }

    #[test]
    fn stale_connections_skip_the_server_side() {
        let client = DetailedSocket {
            socket: waiting(0),
            timer: SocketTimer::None,
            ifindex: 0,
        };
        // The server's end of a kept-alive connection: it answered 40 s ago.
        let server = DetailedSocket {
            socket: TcpSocket {
                saddr: v4(2),
                sport: 80,
                daddr: v4(1),
                dport: 40000,
                ..waiting(1)
            },
            timer: SocketTimer::None,
            ifindex: 0,
        };
        let listener = DetailedSocket {
            socket: TcpSocket {
                state: TcpState::Listen,
                saddr: v4(2),
                sport: 80,
                tcp_info: None,
                ..waiting(2)
            },
            timer: SocketTimer::None,
            ifindex: 0,
        };
        let found = stale_connections(NS, &[client, server, listener], T);
        assert_eq!(found.len(), 1);
        let c = &found[0];
        assert_eq!((c.peer, c.peer_port, c.local_port), (v4(2), 80, 40000));
        assert_eq!(
            (c.kind, c.age_ms, c.netns, c.inode),
            (StaleKind::AwaitingReply, 40_000, NS, 1000)
        );
        assert_eq!(c.owner, None);
    }

    fn conn(n: u16, owner: Option<(u32, &str)>, age_ms: u64) -> StaleConnection {
        StaleConnection {
            netns: NS,
            cookie: u64::from(n),
            inode: u32::from(n),
            family: Family::V4,
            local: v4(1),
            local_port: 40000 + n,
            peer: v4(2),
            peer_port: 80,
            kind: StaleKind::AwaitingReply,
            age_ms,
            bytes_waiting: 10,
            owner: owner.map(|(pid, comm)| Owner {
                pid,
                comm: comm.to_owned(),
                cmdline: format!("{comm} --serve"),
                holders: 1,
                service: Some(super::super::cgroup::parse_path(&format!(
                    "/system.slice/{comm}.service"
                ))),
            }),
        }
    }

    #[test]
    fn groups_by_process_and_peer() {
        let mut tracker = StaleTracker::new(3);
        let t0 = Instant::now();
        let mut conns: Vec<StaleConnection> = (0..20)
            .map(|n| conn(n, Some((77, "python3")), 31_000 + u64::from(n) * 100))
            .collect();
        conns.push(conn(100, Some((88, "curl")), 45_000));
        conns.push(StaleConnection {
            kind: StaleKind::Unacknowledged,
            ..conn(101, None, 60_000)
        });
        // Another namespace's connection is not this sweep's.
        conns.push(StaleConnection {
            netns: NS + 1,
            ..conn(102, Some((77, "python3")), 60_000)
        });
        let groups = tracker.update(NS, t0, &conns);
        assert_eq!(groups.len(), 3);
        let g = &groups[0];
        assert_eq!(
            (g.pid, g.comm.as_deref(), g.cmdline.as_deref()),
            (Some(77), Some("python3"), Some("python3 --serve"))
        );
        assert_eq!(
            g.service.as_ref().and_then(|s| s.unit.as_deref()),
            Some("python3.service")
        );
        assert_eq!(
            (g.peer, g.peer_port, g.count, g.awaiting_reply),
            (v4(2), 80, 20, 20)
        );
        assert_eq!(
            (g.oldest_age_secs, g.bytes_waiting, g.newly_stale),
            (32, 200, 20)
        );
        // First sweep of the namespace: no history to grow from.
        assert!(!g.growing);
        let exited = groups
            .iter()
            .find(|g| g.pid.is_none())
            .expect("unowned group");
        assert_eq!(
            (exited.count, exited.unacknowledged, exited.comm.clone()),
            (1, 1, None)
        );
        assert_eq!(exited.service, None);
        assert_eq!(tracker.first_seen(NS, 5), Some(t0));
        assert_eq!(tracker.first_seen(NS + 1, 102), None);
    }

    #[test]
    fn growth_and_newly_stale_across_sweeps() {
        let mut tracker = StaleTracker::new(2);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let sweep = |tracker: &mut StaleTracker, n: u16, s: u64| {
            let conns: Vec<StaleConnection> =
                (0..n).map(|i| conn(i, Some((77, "app")), 31_000)).collect();
            tracker.update(NS, at(s), &conns)
        };
        // Sweep 0: nothing stale yet. Sweep 1: a group appears (grew from 0).
        assert!(sweep(&mut tracker, 0, 0).is_empty());
        let g = sweep(&mut tracker, 2, 1);
        assert_eq!((g[0].count, g[0].newly_stale, g[0].growing), (2, 2, true));
        // Sweep 2: one more; 2 sweeps ago it was 0.
        let g = sweep(&mut tracker, 3, 2);
        assert_eq!((g[0].count, g[0].newly_stale, g[0].growing), (3, 1, true));
        assert_eq!(tracker.first_seen(NS, 0), Some(at(1)));
        // Sweep 3: still 3; 2 sweeps ago it was 2: growing.
        let g = sweep(&mut tracker, 3, 3);
        assert_eq!((g[0].newly_stale, g[0].growing), (0, true));
        // Sweep 4: still 3; 2 sweeps ago 3: steady.
        let g = sweep(&mut tracker, 3, 4);
        assert!(!g[0].growing);
        // Sweep 5: two were answered; then they stall again and count as new.
        let g = sweep(&mut tracker, 1, 5);
        assert_eq!((g[0].count, g[0].growing), (1, false));
        assert_eq!(tracker.first_seen(NS, 2), None);
        let g = sweep(&mut tracker, 3, 6);
        assert_eq!((g[0].count, g[0].newly_stale), (3, 2));
        assert_eq!(tracker.first_seen(NS, 2), Some(at(6)));
        // Forgetting the namespace makes its next sweep a first one again.
        tracker.forget(NS);
        let g = sweep(&mut tracker, 3, 7);
        assert_eq!((g[0].newly_stale, g[0].growing), (3, false));
    }
}
