//! Per-listener drop accounting: which listening socket refused connections, and why.
//!
//! When a listener's accept queue or SYN queue is full, the kernel frees the refused SYN (or
//! the handshake-completing ACK) with `consume_skb`: no `kfree_skb` drop reason fires, so the
//! eBPF programs see nothing. What moves (measured on Linux 6.18):
//! - per namespace: `TcpExtListenOverflows` (accept queue full), `TcpExtTCPReqQFullDrop`
//!   (SYN queue full with syncookies off), and `TcpExtListenDrops` (every refusal: both of
//!   those, the `tcp_max_syn_backlog` quarter rule with syncookies off, which counts only
//!   here, and rarer memory or routing failures);
//! - per listener: `sk_drops` (`SK_MEMINFO_DROPS` in sock_diag), bumped by the same
//!   `tcp_listendrop()` that bumps ListenDrops, so it counts every kind together.
//!
//! [`snapshot_listeners`] reads the per-listener side with sock_diag once a second; the kernel
//! programs add each listener's `sk_drops` at the moment it enters and leaves LISTEN
//! ([`ListenerEvent`]), so a listener created or closed between two readings is counted from
//! its first drop to its last. The pure [`ListenerTracker`] turns both, plus the namespace's
//! counter deltas, into per-listener, per-cause drop counts. See [`ListenerTracker::update`]
//! for how drops are split by cause when several listeners drop in the same interval.
use std::{io, net::IpAddr};

use super::{
    netns,
    sockdiag::{self, Extensions, Family, SockDiagError, StateMask, TcpSocket, TcpState},
};

mod tracker;

pub use tracker::{
    Change, Interval, ListenerDrops, ListenerEvent, ListenerTracker, NamespaceListenDrops,
    SynBacklogRule,
};

/// Namespace counter: SYN or ACK refused because the accept queue was full.
pub const LISTEN_OVERFLOWS: &str = "TcpExtListenOverflows";
/// Namespace counter: every `tcp_listendrop()` (the sum over listeners of their sk_drops
/// increments).
pub const LISTEN_DROPS: &str = "TcpExtListenDrops";
/// Namespace counter: SYN refused because the SYN queue was full and syncookies are off.
pub const REQ_Q_FULL_DROP: &str = "TcpExtTCPReqQFullDrop";

/// Errors taking a listener snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ListenersError {
    /// The calling thread's namespace could not be identified.
    #[error("cannot identify the current network namespace")]
    Netns(#[source] io::Error),
    /// The sock_diag dump of one family failed.
    #[error("sock_diag dump of {family:?} listeners failed")]
    Dump {
        family: Family,
        #[source]
        error: SockDiagError,
    },
}

/// One listening socket at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSnapshot {
    /// Inode of the listener's network namespace.
    pub netns: u64,
    pub family: Family,
    /// Bound address; unspecified (`0.0.0.0`, `::`) for a wildcard listener.
    pub addr: IpAddr,
    pub port: u16,
    /// Socket inode: tells apart SO_REUSEPORT siblings and a listener closed and reopened on
    /// the same port (whose drop counter restarts).
    pub inode: u32,
    /// `sk_max_ack_backlog`: `min(listen() backlog, net.core.somaxconn)`. Limits the accept
    /// queue, and the SYN queue too.
    pub backlog_limit: u32,
    /// `sk_ack_backlog`: connections established and waiting for `accept()`. The kernel
    /// refuses new ones when this exceeds `backlog_limit` (`sk_acceptq_is_full`).
    pub accept_queue: u32,
    /// Request sockets (half-open connections) attributed to this listener.
    pub syn_queue: u32,
    /// The listener's `sk_drops` (0 if the kernel did not report SK_MEMINFO).
    pub drops: u32,
}

impl ListenerSnapshot {
    pub fn key(&self) -> ListenerKey {
        ListenerKey {
            netns: self.netns,
            family: self.family,
            addr: self.addr,
            port: self.port,
            inode: self.inode,
        }
    }

    /// The kernel's `sk_acceptq_is_full`: `sk_ack_backlog > sk_max_ack_backlog`.
    pub fn accept_queue_full(&self) -> bool {
        self.accept_queue > self.backlog_limit
    }

    /// The SYN queue is at its limit: the next SYN is refused. `inet_csk_reqsk_queue_is_full`
    /// compares the request count with `sk_max_ack_backlog`: with `>` on Linux 6.18 (a backlog
    /// of 2 held 3 request sockets), with `>=` on older kernels; `>=` here covers both.
    pub fn syn_queue_full(&self) -> bool {
        self.syn_queue >= self.backlog_limit.max(1)
    }
}

/// Identity of a listener across snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub netns: u64,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u32,
}

/// Request sockets have neither meminfo nor tcp_info; a full socket in SYN_RECV (a Fast Open
/// child, already in the accept queue) has both when they were asked for.
fn is_request_socket(socket: &TcpSocket) -> bool {
    socket.state == TcpState::SynRecv && socket.drops.is_none() && socket.inode == 0
}

/// How well a listener matches a request socket's local address; `None` for no match.
/// Higher is better: exact address, then a wildcard of the same family, then an IPv6
/// wildcard (dual-stack) for an IPv4 request.
fn match_rank(listener: &ListenerSnapshot, request: &TcpSocket) -> Option<u8> {
    if listener.port != request.sport {
        return None;
    }
    if listener.family == request.family && listener.addr == request.saddr {
        Some(3)
    } else if listener.family == request.family && listener.addr.is_unspecified() {
        Some(2)
    } else if listener.family == Family::V6
        && request.family == Family::V4
        && listener.addr.is_unspecified()
    {
        Some(1)
    } else {
        None
    }
}

/// Builds listener snapshots from a dump of LISTEN and SYN_RECV sockets taken with
/// [`Extensions::MEMINFO`] (pure).
///
/// Each request socket is counted for the best-matching listener on its port: the exact
/// address, else a wildcard of the same family, else a dual-stack IPv6 wildcard. A
/// request socket does not name its listener, so among SO_REUSEPORT siblings (same address
/// and port) the one with the lowest inode gets them all.
pub fn listeners_from_sockets(netns: u64, sockets: &[TcpSocket]) -> Vec<ListenerSnapshot> {
    let mut listeners: Vec<ListenerSnapshot> = sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| ListenerSnapshot {
            netns,
            family: s.family,
            addr: s.saddr,
            port: s.sport,
            inode: s.inode,
            backlog_limit: s.wqueue,
            accept_queue: s.rqueue,
            syn_queue: 0,
            drops: s.drops.unwrap_or(0),
        })
        .collect();
    listeners.sort_by_key(ListenerSnapshot::key);
    for request in sockets.iter().filter(|s| is_request_socket(s)) {
        let best = listeners
            .iter_mut()
            .filter_map(|l| Some((match_rank(l, request)?, l)))
            // max_by_key keeps the last maximum; reverse so the lowest inode wins ties.
            .rev()
            .max_by_key(|(rank, _)| *rank);
        if let Some((_, listener)) = best {
            listener.syn_queue = listener.syn_queue.saturating_add(1);
        }
    }
    listeners
}

/// The listeners (IPv4 and IPv6) of the calling thread's network namespace, with their queue
/// lengths and drop counters. Call it inside [`in_namespace`](super::netns::in_namespace) for
/// another namespace.
///
/// Costs one sock_diag dump per family; asking for SYN_RECV walks the established hash, so the
/// cost grows with the namespace's connection count.
pub fn snapshot_listeners() -> Result<Vec<ListenerSnapshot>, ListenersError> {
    let netns = netns::current_inode().map_err(ListenersError::Netns)?;
    let mut sockets = Vec::new();
    for family in Family::ALL {
        let dump = sockdiag::dump_tcp(
            family,
            StateMask::LISTEN | StateMask::SYN_RECV,
            Extensions::MEMINFO,
        )
        .map_err(|error| ListenersError::Dump { family, error })?;
        sockets.extend(dump);
    }
    Ok(listeners_from_sockets(netns, &sockets))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, Ipv6Addr},
    };

    use super::*;

    const NS: u64 = 4026531840;

    fn sock(family: Family, state: TcpState, saddr: IpAddr, sport: u16, inode: u32) -> TcpSocket {
        TcpSocket {
            family,
            state,
            saddr,
            sport,
            daddr: if family == Family::V4 {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            },
            dport: 0,
            inode,
            cookie: 0,
            uid: 0,
            rqueue: 1,
            wqueue: 16,
            drops: (state == TcpState::Listen).then_some(3),
            tcp_info: None,
        }
    }

    #[test]
    fn request_sockets_count_for_the_most_specific_listener() {
        let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let other4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let sockets = vec![
            sock(Family::V4, TcpState::Listen, lo4, 80, 10),
            sock(Family::V4, TcpState::Listen, any4, 80, 11),
            sock(Family::V6, TcpState::Listen, any6, 8080, 12),
            sock(Family::V4, TcpState::Listen, any4, 9000, 14),
            sock(Family::V4, TcpState::Listen, any4, 9000, 13), // SO_REUSEPORT sibling
            // 2 requests to 127.0.0.1:80 (exact), 1 to 10.0.0.1:80 (wildcard)
            sock(Family::V4, TcpState::SynRecv, lo4, 80, 0),
            sock(Family::V4, TcpState::SynRecv, lo4, 80, 0),
            sock(Family::V4, TcpState::SynRecv, other4, 80, 0),
            // v4 request on a dual-stack v6 listener
            sock(Family::V4, TcpState::SynRecv, other4, 8080, 0),
            // reuseport group: lowest inode
            sock(Family::V4, TcpState::SynRecv, other4, 9000, 0),
            // no listener
            sock(Family::V4, TcpState::SynRecv, other4, 7, 0),
            // Fast Open child in SYN_RECV: a full socket, not a queue entry
            TcpSocket {
                drops: Some(0),
                ..sock(Family::V4, TcpState::SynRecv, lo4, 80, 0)
            },
        ];
        let listeners = listeners_from_sockets(NS, &sockets);
        let syn: BTreeMap<(u16, u32), u32> = listeners
            .iter()
            .map(|l| ((l.port, l.inode), l.syn_queue))
            .collect();
        assert_eq!(
            syn,
            BTreeMap::from([
                ((80, 10), 2),
                ((80, 11), 1),
                ((8080, 12), 1),
                ((9000, 13), 1),
                ((9000, 14), 0),
            ])
        );
        let l = &listeners[0];
        assert_eq!(
            (l.accept_queue, l.backlog_limit, l.drops, l.netns),
            (1, 16, 3, NS)
        );
    }
}
