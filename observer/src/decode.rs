//! Decoding: raw perf samples from the kernel programs into typed events.
//!
//! Pure: takes bytes, returns values; no kernel needed to test it.
use std::net::{IpAddr, Ipv6Addr};

use observer_common::{
    AF_INET6, FlowKey, TcpEvent, connect_outcome, direction, event_kind, key_wildcard,
};

/// Address family as operators name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// A TCP flow: `s` is this host's side, as the kernel names it. Serializes with the field
/// names event records use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Flow {
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// Network namespace inode (0 when unknown).
    pub netns: u32,
}

impl Flow {
    /// Converts the kernel's key. The kernel stores IPv4 flows as IPv4-mapped IPv6 addresses,
    /// and an IPv6 socket talking to an IPv4 peer has mapped addresses too: both show as IPv4.
    pub fn from_key(key: &FlowKey) -> Self {
        let saddr = unmap(key.saddr);
        let daddr = unmap(key.daddr);
        let family = if saddr.is_ipv4() && daddr.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        };
        Flow {
            family,
            saddr,
            sport: key.sport,
            daddr,
            dport: key.dport,
            netns: key.netns,
        }
    }
}

pub fn unmap(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// What an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A data segment retransmitted (successfully handed to the IP layer).
    Retransmit,
    /// A retransmit attempt that failed locally (`err` non-zero).
    RetransmitFailed,
    /// A SYN retransmitted: an active open is not getting an answer.
    SynRetransmit,
    /// A SYN-ACK retransmitted: a peer is not completing the handshake.
    SynackRetransmit,
    /// A TCP packet dropped with a reason.
    Drop,
    /// This host sent a RST.
    ResetSent,
    /// A RST arrived on one of this host's sockets.
    ResetReceived,
    /// An active open completed.
    Connect,
    /// An active open failed (refused or timed out).
    ConnectFailed,
    /// A passive open completed.
    Accept,
    /// A connection seen from its start closed.
    Close,
}

impl EventKind {
    pub const ALL: [EventKind; 11] = [
        EventKind::Retransmit,
        EventKind::RetransmitFailed,
        EventKind::SynRetransmit,
        EventKind::SynackRetransmit,
        EventKind::Drop,
        EventKind::ResetSent,
        EventKind::ResetReceived,
        EventKind::Connect,
        EventKind::ConnectFailed,
        EventKind::Accept,
        EventKind::Close,
    ];

    /// The `type` of the JSON record.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Retransmit => "retransmit",
            EventKind::RetransmitFailed => "retransmit_failed",
            EventKind::SynRetransmit => "syn_retransmit",
            EventKind::SynackRetransmit => "synack_retransmit",
            EventKind::Drop => "drop",
            EventKind::ResetSent => "reset_sent",
            EventKind::ResetReceived => "reset_received",
            EventKind::Connect => "connect",
            EventKind::ConnectFailed => "connect_failed",
            EventKind::Accept => "accept",
            EventKind::Close => "close",
        }
    }

    /// The kernel-side kind this event was counted as.
    pub fn kernel_kind(self) -> u8 {
        match self {
            EventKind::Retransmit | EventKind::RetransmitFailed => event_kind::RETRANSMIT,
            EventKind::SynRetransmit => event_kind::SYN_RETRANSMIT,
            EventKind::SynackRetransmit => event_kind::SYNACK_RETRANSMIT,
            EventKind::Drop => event_kind::DROP,
            EventKind::ResetSent => event_kind::RESET_SENT,
            EventKind::ResetReceived => event_kind::RESET_RECEIVED,
            EventKind::Connect => event_kind::CONNECT,
            EventKind::ConnectFailed => event_kind::CONNECT_FAILED,
            EventKind::Accept => event_kind::ACCEPT,
            EventKind::Close => event_kind::CLOSE,
        }
    }

    /// The kind by its record name (for `--export-kinds`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// How a failed connect ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectOutcome {
    /// A RST answered the SYN.
    Refused,
    /// The SYNs went unanswered until the socket was closed.
    Timeout,
}

/// Direction of a dropped packet relative to this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// Kind-specific details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    None,
    Drop {
        reason: u32,
        location: u64,
        ifindex: u32,
        tcp_flags: u8,
        direction: Direction,
    },
    ResetSent {
        reason: u32,
    },
    Connect {
        latency_ns: u64,
        syn_retransmits: u32,
    },
    ConnectFailed {
        outcome: ConnectOutcome,
        elapsed_ns: u64,
        syn_retransmits: u32,
    },
    Accept {
        /// Smoothed RTT of the new connection: the SYN-ACK -> ACK time as the server saw it.
        handshake_rtt_us: u32,
    },
    Close {
        lifetime_ns: u64,
        from_state: u8,
        active: bool,
    },
}

/// Names of TCP header flags, in header order (`SYN|ACK`).
pub fn tcp_flags_names(flags: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x01, "FIN"),
        (0x02, "SYN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x10, "ACK"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    let names: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    names.join("|")
}

/// Names of `enum tcp_state` (include/net/tcp_states.h; the numbering is user-visible ABI, also
/// used by `ss` and sock_diag, so it is the same on every kernel).
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// One decoded kernel event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub flow: Flow,
    /// CLOCK_BOOTTIME nanoseconds.
    pub boot_ns: u64,
    pub segs: u32,
    /// The kernel's running count of this kind for the key the event is counted under (see
    /// [`Event::counting_flow`]).
    pub flow_count: u64,
    /// Which port the kernel's counting key leaves out (`observer_common::key_wildcard`).
    pub key_wildcard: u8,
    pub err: i32,
    pub pid: u32,
    pub state: u8,
    /// The socket's own family (AF_INET6 for a dual-stack socket even when the flow is IPv4).
    pub socket_family: u16,
    pub detail: Detail,
}

impl Event {
    /// The key the kernel counted this event under: the flow, or for events of a handshake
    /// that did not complete, the flow without the connecting side's (ephemeral) port, which
    /// is then 0. The stop record's `flows` and reconciliation use this key.
    pub fn counting_flow(&self) -> Flow {
        let mut flow = self.flow;
        (flow.sport, flow.dport) = key_wildcard::ports(flow.sport, flow.dport, self.key_wildcard);
        flow
    }
}

/// Why a sample could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("sample of {found} bytes is shorter than an event ({expected} bytes)")]
    TooShort { expected: usize, found: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
}

/// Decodes one perf sample (its raw bytes, whole: `kernel::perf_ring` reassembles samples that
/// wrap around the ring). Bytes past the event (alignment padding) are ignored.
pub fn decode_sample(sample: &[u8]) -> Result<Event, DecodeError> {
    const SIZE: usize = size_of::<TcpEvent>();
    let Some(bytes) = sample.first_chunk::<SIZE>() else {
        return Err(DecodeError::TooShort {
            expected: SIZE,
            found: sample.len(),
        });
    };
    // SAFETY: TcpEvent is #[repr(C)] plain integers (every bit pattern valid) and `bytes` holds
    // exactly size_of::<TcpEvent>() bytes; read_unaligned copes with the array's alignment.
    let raw: TcpEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    decode_event(&raw)
}

/// Converts the kernel's struct into an [`Event`].
pub fn decode_event(raw: &TcpEvent) -> Result<Event, DecodeError> {
    let kind = match raw.kind {
        event_kind::RETRANSMIT if raw.err != 0 => EventKind::RetransmitFailed,
        event_kind::RETRANSMIT => EventKind::Retransmit,
        event_kind::SYN_RETRANSMIT if raw.err != 0 => EventKind::RetransmitFailed,
        event_kind::SYN_RETRANSMIT => EventKind::SynRetransmit,
        event_kind::SYNACK_RETRANSMIT => EventKind::SynackRetransmit,
        event_kind::DROP => EventKind::Drop,
        event_kind::RESET_SENT => EventKind::ResetSent,
        event_kind::RESET_RECEIVED => EventKind::ResetReceived,
        event_kind::CONNECT => EventKind::Connect,
        event_kind::CONNECT_FAILED => EventKind::ConnectFailed,
        event_kind::ACCEPT => EventKind::Accept,
        event_kind::CLOSE => EventKind::Close,
        other => return Err(DecodeError::UnknownKind(other)),
    };
    let detail = match kind {
        EventKind::Drop => Detail::Drop {
            reason: raw.reason,
            location: raw.location,
            ifindex: raw.ifindex,
            tcp_flags: raw.tcp_flags,
            direction: if raw.aux8 == direction::OUTBOUND {
                Direction::Outbound
            } else {
                Direction::Inbound
            },
        },
        EventKind::ResetSent => Detail::ResetSent { reason: raw.reason },
        EventKind::Connect => Detail::Connect {
            latency_ns: raw.duration_ns,
            syn_retransmits: raw.aux32,
        },
        EventKind::ConnectFailed => Detail::ConnectFailed {
            outcome: if raw.aux8 == connect_outcome::REFUSED {
                ConnectOutcome::Refused
            } else {
                ConnectOutcome::Timeout
            },
            elapsed_ns: raw.duration_ns,
            syn_retransmits: raw.aux32,
        },
        EventKind::Accept => Detail::Accept {
            handshake_rtt_us: raw.aux32,
        },
        EventKind::Close => Detail::Close {
            lifetime_ns: raw.duration_ns,
            from_state: raw.old_state,
            active: raw.aux8 != 0,
        },
        _ => Detail::None,
    };
    Ok(Event {
        kind,
        flow: Flow::from_key(&raw.flow),
        boot_ns: raw.timestamp_ns,
        segs: raw.segs,
        flow_count: raw.flow_count,
        key_wildcard: raw.key_wildcard,
        err: raw.err,
        pid: raw.pid,
        state: raw.state,
        socket_family: raw.family,
        detail,
    })
}

/// Whether the socket is a dual-stack IPv6 socket (useful context for v4-mapped flows).
pub fn is_ipv6_socket(family: u16) -> bool {
    family == AF_INET6
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn mapped(v4: [u8; 4]) -> [u8; 16] {
        Ipv4Addr::from(v4).to_ipv6_mapped().octets()
    }

    fn raw(kind: u8) -> TcpEvent {
        TcpEvent {
            flow: FlowKey {
                saddr: mapped([10, 0, 0, 1]),
                daddr: mapped([10, 0, 0, 2]),
                sport: 40000,
                dport: 80,
                netns: 4026531840,
            },
            timestamp_ns: 5,
            flow_count: 7,
            segs: 2,
            err: 0,
            pid: 42,
            kind,
            state: 1,
            family: 2,
            ..TcpEvent::default()
        }
    }

    fn bytes_of(ev: &TcpEvent) -> Vec<u8> {
        // SAFETY: TcpEvent is #[repr(C)] plain data without implicit padding.
        unsafe {
            std::slice::from_raw_parts((ev as *const TcpEvent).cast::<u8>(), size_of::<TcpEvent>())
        }
        .to_vec()
    }

    #[test]
    fn mapped_ipv4_shows_as_ipv4() {
        let ev = decode_event(&raw(event_kind::RETRANSMIT)).expect("decodes");
        assert_eq!(ev.flow.family, Family::Ipv4);
        assert_eq!(ev.flow.saddr, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(ev.flow.daddr, IpAddr::from([10, 0, 0, 2]));
        assert_eq!((ev.flow.sport, ev.flow.dport), (40000, 80));
    }

    #[test]
    fn ipv6_stays_ipv6() {
        let mut r = raw(event_kind::SYN_RETRANSMIT);
        r.flow.saddr = "fd00::1".parse::<Ipv6Addr>().expect("addr").octets();
        r.flow.daddr = "fd00::2".parse::<Ipv6Addr>().expect("addr").octets();
        r.family = AF_INET6;
        let ev = decode_event(&r).expect("decodes");
        assert_eq!(ev.flow.family, Family::Ipv6);
        assert_eq!(ev.kind, EventKind::SynRetransmit);
        assert!(is_ipv6_socket(ev.socket_family));
    }

    #[test]
    fn failed_attempts_are_their_own_kind() {
        let mut r = raw(event_kind::RETRANSMIT);
        r.err = -105;
        assert_eq!(
            decode_event(&r).expect("decodes").kind,
            EventKind::RetransmitFailed
        );
    }

    #[test]
    fn handshake_events_are_counted_without_the_connecting_port() {
        let mut raw = raw(event_kind::CONNECT_FAILED);
        let counted = |raw: &TcpEvent| decode_event(raw).ok().map(|e| e.counting_flow());
        let full = decode_event(&raw).ok().map(|e| e.flow);
        assert_eq!(counted(&raw), full, "key_wildcard NONE: the whole flow");
        raw.key_wildcard = key_wildcard::LOCAL_PORT;
        assert_eq!(
            counted(&raw).map(|f| (f.sport, f.dport)),
            full.map(|f| (0, f.dport))
        );
        raw.key_wildcard = key_wildcard::REMOTE_PORT;
        assert_eq!(
            counted(&raw).map(|f| (f.sport, f.dport)),
            full.map(|f| (f.sport, 0))
        );
        // The same rule as the kernel's.
        let key = raw.flow.counting_key(key_wildcard::REMOTE_PORT);
        assert_eq!(counted(&raw), Some(Flow::from_key(&key)));
    }

    #[test]
    fn exact_and_padded_samples_decode() {
        let ev = raw(event_kind::SYNACK_RETRANSMIT);
        let mut bytes = bytes_of(&ev);
        let exact = bytes.len();
        bytes.extend_from_slice(&[0, 0, 0, 0]); // kernel alignment padding
        for len in [exact, bytes.len()] {
            let got = decode_sample(&bytes[..len]).expect("decodes");
            assert_eq!(got.kind, EventKind::SynackRetransmit);
            assert_eq!(got.flow_count, 7);
            assert_eq!(got.pid, 42);
        }
        // Unaligned in memory (a sample right after the ring's 4-byte raw size) decodes too.
        let mut shifted = vec![0u8; 4];
        shifted.extend_from_slice(&bytes);
        let got = decode_sample(&shifted[4..]).expect("decodes");
        assert_eq!(got.flow_count, 7);
    }

    #[test]
    fn short_and_unknown_samples_are_errors() {
        assert_eq!(
            decode_sample(&[0; 10]),
            Err(DecodeError::TooShort {
                expected: 104,
                found: 10
            })
        );
        assert_eq!(decode_event(&raw(99)), Err(DecodeError::UnknownKind(99)));
    }

    #[test]
    fn kinds_carry_their_details() {
        let mut r = raw(event_kind::CONNECT_FAILED);
        r.aux8 = connect_outcome::REFUSED;
        r.duration_ns = 5;
        r.aux32 = 2;
        assert_eq!(
            decode_event(&r).expect("decodes").detail,
            Detail::ConnectFailed {
                outcome: ConnectOutcome::Refused,
                elapsed_ns: 5,
                syn_retransmits: 2
            }
        );
        let mut r = raw(event_kind::DROP);
        r.reason = 12;
        r.tcp_flags = 0x02;
        r.aux8 = direction::INBOUND;
        r.ifindex = 3;
        let ev = decode_event(&r).expect("decodes");
        assert_eq!(ev.kind, EventKind::Drop);
        assert!(matches!(
            ev.detail,
            Detail::Drop {
                reason: 12,
                ifindex: 3,
                tcp_flags: 2,
                direction: Direction::Inbound,
                ..
            }
        ));
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_name(kind.name()), Some(kind));
        }
    }

    #[test]
    fn tcp_flags_are_named_in_header_order() {
        assert_eq!(tcp_flags_names(0x12), "SYN|ACK");
        assert_eq!(tcp_flags_names(0x02), "SYN");
        assert_eq!(tcp_flags_names(0), "");
    }

    #[test]
    fn state_names_follow_tcp_states_h() {
        assert_eq!(tcp_state_name(1), "ESTABLISHED");
        assert_eq!(tcp_state_name(2), "SYN_SENT");
        assert_eq!(tcp_state_name(200), "UNKNOWN");
    }
}

#[cfg(test)]
mod proptests;
