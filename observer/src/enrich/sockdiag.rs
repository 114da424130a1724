//! TCP socket dumps through sock_diag (`NETLINK_SOCK_DIAG`, inet_diag): what `ss -tinm` shows.
//!
//! Used to put numbers the kernel keeps per socket next to an event: queue lengths, the
//! socket's own drop counter (`SK_MEMINFO_DROPS`), and `tcp_info` (RTT, retransmissions,
//! timers). Messages are built and parsed with the rust-netlink crates
//! (`netlink-packet-sock-diag`); only the `tcp_info` attribute, which that crate passes
//! through as bytes, is decoded here ([`parse_tcp_info`]) so that shorter structures from
//! older kernels still give the fields they have.
//!
//! A netlink socket lists the sockets of the namespace it was created in, which is the
//! *calling thread's*: to dump another namespace, call [`dump_tcp`] inside
//! [`in_namespace`](super::netns::in_namespace).
use std::{io, net::IpAddr, ops::BitOr, os::fd::AsRawFd as _, time::Duration};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    IPPROTO_TCP, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, Timer, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// How long one `recv` may wait for the kernel's next dump message. The kernel answers a dump
/// at once; this only bounds the damage of an unexpected hang.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors dumping sockets through sock_diag.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// A socket call on the netlink socket failed (`what` names it).
    #[error("sock_diag netlink socket: {what} failed")]
    Socket {
        what: &'static str,
        #[source]
        io_error: io::Error,
    },
    /// The kernel answered the dump request with an error (e.g. ENOENT: `tcp_diag` not
    /// available).
    #[error("the kernel refused the sock_diag dump")]
    Kernel {
        #[source]
        io_error: io::Error,
    },
    /// A message from the kernel could not be decoded.
    #[error("cannot decode a sock_diag message: {0}")]
    Decode(String),
    /// The kernel reported that it dropped part of the dump (NLMSG_OVERRUN).
    #[error("the kernel overran the sock_diag dump")]
    Overrun,
}

/// Address family to dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both families, in dump order.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn af(self) -> u8 {
        match self {
            // AF_INET and AF_INET6 fit in a byte (2 and 10).
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }

    fn from_af(af: u8) -> Option<Family> {
        match i32::from(af) {
            libc::AF_INET => Some(Family::V4),
            libc::AF_INET6 => Some(Family::V6),
            _ => None,
        }
    }
}

/// A TCP state, as the kernel numbers them (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established,
    SynSent,
    /// A full socket in SYN_RECV (Fast Open), or a request socket (a SYN-queue entry, which
    /// the kernel keeps as `TCP_NEW_SYN_RECV` but reports as SYN_RECV).
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    /// A state number this code does not know.
    Other(u8),
}

impl TcpState {
    /// From the kernel's number.
    pub fn from_kernel(value: u8) -> TcpState {
        match value {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 | 12 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            other => TcpState::Other(other),
        }
    }

    /// The kernel's number.
    pub fn kernel_value(self) -> u8 {
        match self {
            TcpState::Established => 1,
            TcpState::SynSent => 2,
            TcpState::SynRecv => 3,
            TcpState::FinWait1 => 4,
            TcpState::FinWait2 => 5,
            TcpState::TimeWait => 6,
            TcpState::Close => 7,
            TcpState::CloseWait => 8,
            TcpState::LastAck => 9,
            TcpState::Listen => 10,
            TcpState::Closing => 11,
            TcpState::Other(value) => value,
        }
    }
}

/// Which TCP states to dump (`idiag_states`: bit `1 << state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateMask(u32);

impl StateMask {
    pub const ESTABLISHED: StateMask = StateMask(1 << 1);
    pub const SYN_SENT: StateMask = StateMask(1 << 2);
    /// Includes request sockets (SYN-queue entries): the kernel adds `TCP_NEW_SYN_RECV` itself.
    pub const SYN_RECV: StateMask = StateMask(1 << 3);
    pub const FIN_WAIT1: StateMask = StateMask(1 << 4);
    pub const FIN_WAIT2: StateMask = StateMask(1 << 5);
    pub const TIME_WAIT: StateMask = StateMask(1 << 6);
    pub const CLOSE: StateMask = StateMask(1 << 7);
    pub const CLOSE_WAIT: StateMask = StateMask(1 << 8);
    pub const LAST_ACK: StateMask = StateMask(1 << 9);
    pub const LISTEN: StateMask = StateMask(1 << 10);
    pub const CLOSING: StateMask = StateMask(1 << 11);
    /// Every state (what `ss -ta` asks for).
    pub const ALL: StateMask = StateMask(0xffe);

    /// The raw `idiag_states` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether a socket in `state` is selected.
    pub fn contains(self, state: TcpState) -> bool {
        1u32.checked_shl(u32::from(state.kernel_value()))
            .is_some_and(|bit| self.0 & bit != 0)
    }
}

impl BitOr for StateMask {
    type Output = StateMask;
    fn bitor(self, rhs: StateMask) -> StateMask {
        StateMask(self.0 | rhs.0)
    }
}

/// Which extra attributes to ask the kernel for (each costs a little per socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extensions(u8);

impl Extensions {
    pub const NONE: Extensions = Extensions(0);
    /// `INET_DIAG_SKMEMINFO`: socket memory, including the socket's drop counter.
    pub const MEMINFO: Extensions = Extensions(1);
    /// `INET_DIAG_INFO`: `struct tcp_info`.
    pub const TCP_INFO: Extensions = Extensions(2);

    pub const fn contains(self, other: Extensions) -> bool {
        self.0 & other.0 == other.0
    }

    fn flags(self) -> ExtensionFlags {
        let mut flags = ExtensionFlags::empty();
        if self.contains(Extensions::MEMINFO) {
            flags |= ExtensionFlags::SKMEMINFO;
        }
        if self.contains(Extensions::TCP_INFO) {
            flags |= ExtensionFlags::INFO;
        }
        flags
    }
}

impl BitOr for Extensions {
    type Output = Extensions;
    fn bitor(self, rhs: Extensions) -> Extensions {
        Extensions(self.0 | rhs.0)
    }
}

/// The parts of `struct tcp_info` observer reports. Times are as the kernel gives them:
/// `*_us` microseconds, `*_ms` milliseconds ago. Keepalive and user-timeout settings are not in
/// `tcp_info` (they are socket options), so they are not here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TcpInfoLite {
    pub state: u8,
    /// Congestion-avoidance state (`TCP_CA_Open` 0 ... `TCP_CA_Loss` 4).
    pub ca_state: u8,
    /// Consecutive RTO retransmissions of the head segment (reset by an ACK).
    pub retransmits: u8,
    /// Zero-window or keepalive probes sent without answer.
    pub probes: u8,
    /// Exponential backoff of the RTO timer.
    pub backoff: u8,
    pub rto_us: u32,
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    /// Segments in flight, not yet acknowledged. For a LISTEN socket: the accept-queue length.
    pub unacked: u32,
    /// SACKed segments. For a LISTEN socket: the backlog limit.
    pub sacked: u32,
    pub lost: u32,
    /// Retransmitted segments currently in flight.
    pub retrans: u32,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    pub rtt_us: u32,
    pub rttvar_us: u32,
    pub snd_cwnd: u32,
    /// Present since Linux 4.1.
    pub bytes_acked: Option<u64>,
    /// Present since Linux 4.1.
    pub bytes_received: Option<u64>,
    /// Bytes written by the application but not yet sent. Present since Linux 4.6.
    pub notsent_bytes: Option<u32>,
    /// Present since Linux 4.19.
    pub bytes_retrans: Option<u64>,
    /// Segments carrying data received (`tcpi_data_segs_in`). Present since Linux 4.6.
    pub data_segs_in: Option<u32>,
    /// Segments carrying data sent, retransmissions included (`tcpi_data_segs_out`). Present
    /// since Linux 4.6.
    pub data_segs_out: Option<u32>,
    /// Bytes sent, retransmissions included (`tcpi_bytes_sent`). Present since Linux 4.19.
    pub bytes_sent: Option<u64>,
}

/// Length of `struct tcp_info` up to `tcpi_total_retrans`, which every supported kernel has.
const TCP_INFO_BASE_LEN: usize = 104;

/// Decodes the `INET_DIAG_INFO` attribute (`struct tcp_info`, `include/uapi/linux/tcp.h`).
/// `None` if it is shorter than the fields every kernel since 2.6 has; fields newer than the
/// kernel are `None`.
pub fn parse_tcp_info(bytes: &[u8]) -> Option<TcpInfoLite> {
    if bytes.len() < TCP_INFO_BASE_LEN {
        return None;
    }
    let u8_at = |off: usize| bytes.get(off).copied();
    let u32_at = |off: usize| {
        bytes
            .get(off..off + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let u64_at = |off: usize| {
        bytes
            .get(off..off + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    Some(TcpInfoLite {
        state: u8_at(0)?,
        ca_state: u8_at(1)?,
        retransmits: u8_at(2)?,
        probes: u8_at(3)?,
        backoff: u8_at(4)?,
        rto_us: u32_at(8)?,
        unacked: u32_at(24)?,
        sacked: u32_at(28)?,
        lost: u32_at(32)?,
        retrans: u32_at(36)?,
        last_data_sent_ms: u32_at(44)?,
        last_data_recv_ms: u32_at(52)?,
        last_ack_recv_ms: u32_at(56)?,
        rtt_us: u32_at(68)?,
        rttvar_us: u32_at(72)?,
        snd_cwnd: u32_at(80)?,
        total_retrans: u32_at(100)?,
        bytes_acked: u64_at(120),
        bytes_received: u64_at(128),
        notsent_bytes: u32_at(144),
        bytes_retrans: u64_at(208),
        data_segs_in: u32_at(152),
        data_segs_out: u32_at(156),
        bytes_sent: u64_at(200),
    })
}

/// One TCP socket (or request socket) from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub family: Family,
    pub state: TcpState,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// The socket's inode (`/proc/PID/fd/N -> socket:[INODE]`); 0 for request sockets and for
    /// sockets no process holds (orphans, TIME_WAIT).
    pub inode: u32,
    /// The kernel's socket cookie (what `bpf_get_socket_cookie` returns).
    pub cookie: u64,
    pub uid: u32,
    /// Bytes not yet read; for a LISTEN socket, the accept-queue length (`sk_ack_backlog`).
    pub rqueue: u32,
    /// Bytes not yet acknowledged; for a LISTEN socket, the backlog limit
    /// (`sk_max_ack_backlog`, `min(listen() backlog, net.core.somaxconn)`).
    pub wqueue: u32,
    /// Packets the socket dropped (`SK_MEMINFO_DROPS`); for a listener, refused SYNs and ACKs
    /// (`tcp_listendrop`). `None` without [`Extensions::MEMINFO`], and for request sockets.
    pub drops: Option<u32>,
    /// `None` without [`Extensions::TCP_INFO`], and for request and TIME_WAIT sockets.
    pub tcp_info: Option<TcpInfoLite>,
}

impl TcpSocket {
    /// Converts one inet_diag response (pure).
    pub fn from_response(response: &InetResponse) -> Option<TcpSocket> {
        let header = &response.header;
        let family = Family::from_af(header.family)?;
        let id = &header.socket_id;
        let (low, high) = id.cookie.split_at(4);
        let cookie = u64::from(u32::from_ne_bytes(low.try_into().ok()?))
            | (u64::from(u32::from_ne_bytes(high.try_into().ok()?)) << 32);
        let mut socket = TcpSocket {
            family,
            state: TcpState::from_kernel(header.state),
            saddr: id.source_address,
            sport: id.source_port,
            daddr: id.destination_address,
            dport: id.destination_port,
            inode: header.inode,
            cookie,
            uid: header.uid,
            rqueue: header.recv_queue,
            wqueue: header.send_queue,
            drops: None,
            tcp_info: None,
        };
        for nla in &response.nlas {
            match nla {
                Nla::MemInfo(meminfo) => socket.drops = Some(meminfo.drops),
                Nla::TcpInfo(bytes) => socket.tcp_info = parse_tcp_info(bytes),
                _ => {}
            }
        }
        Some(socket)
    }
}

/// The timer the kernel reports pending on a socket (`idiag_timer` and `idiag_expires` of
/// `struct inet_diag_msg`; what `ss -o` prints as `timer:(...)`).
///
/// The kernel reports one timer, in this order of precedence: retransmission, zero-window
/// probe, then the socket's own timer (keepalive). A keepalive connection with data in flight
/// therefore shows [`SocketTimer::Retransmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SocketTimer {
    /// No timer pending: for an established connection with nothing in flight, no keepalive
    /// (SO_KEEPALIVE off). Also what request sockets report.
    #[default]
    None,
    /// Retransmission (RTO), tail-loss-probe or reordering timer: data is in flight.
    /// `retransmits` is the head segment's consecutive RTO count (`icsk_retransmits`).
    Retransmit { expires_ms: u64, retransmits: u8 },
    /// The socket timer: the keepalive timer of a connection with SO_KEEPALIVE (and the
    /// FIN_WAIT2 timer of an orphaned socket).
    KeepAlive { expires_ms: u64 },
    /// A TIME_WAIT socket's timer.
    TimeWait,
    /// Zero-window probe timer: data is waiting and the peer's receive window is closed.
    ZeroWindowProbe { expires_ms: u64 },
}

impl SocketTimer {
    fn from_diag(timer: Option<&Timer>) -> SocketTimer {
        let ms = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match timer {
            None => SocketTimer::None,
            Some(Timer::Retransmit(expires, retransmits)) => SocketTimer::Retransmit {
                expires_ms: ms(expires),
                retransmits: *retransmits,
            },
            Some(Timer::KeepAlive(expires)) => SocketTimer::KeepAlive {
                expires_ms: ms(expires),
            },
            Some(Timer::TimeWait) => SocketTimer::TimeWait,
            Some(Timer::Probe(expires)) => SocketTimer::ZeroWindowProbe {
                expires_ms: ms(expires),
            },
        }
    }
}

/// A [`TcpSocket`] with the parts of `struct inet_diag_msg` that [`TcpSocket`] leaves out
/// (kept apart so that code building `TcpSocket` values stays unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetailedSocket {
    pub socket: TcpSocket,
    /// The pending timer (`idiag_timer`).
    pub timer: SocketTimer,
    /// `idiag_if`: the interface the socket is bound to (SO_BINDTODEVICE), 0 if none. For a
    /// request socket this is `ir_iif`, which the kernel sets to the arrival interface only for
    /// device-bound listeners (and IPv6 link-local peers): 0 otherwise (measured on 6.18).
    pub ifindex: u32,
}

impl DetailedSocket {
    /// Converts one inet_diag response (pure).
    pub fn from_response(response: &InetResponse) -> Option<DetailedSocket> {
        Some(DetailedSocket {
            socket: TcpSocket::from_response(response)?,
            timer: SocketTimer::from_diag(response.header.timer.as_ref()),
            ifindex: response.header.socket_id.interface_id,
        })
    }
}

/// What one datagram of a dump held.
#[derive(Debug, PartialEq, Eq)]
pub struct DumpChunk<T = TcpSocket> {
    pub sockets: Vec<T>,
    /// NLMSG_DONE was seen: the dump is complete.
    pub done: bool,
}

impl<T> Default for DumpChunk<T> {
    fn default() -> Self {
        DumpChunk {
            sockets: Vec::new(),
            done: false,
        }
    }
}

/// Decodes one datagram of a dump answer (pure): several netlink messages back to back.
/// Messages with another sequence number (none are expected on a private socket) are skipped.
pub fn parse_datagram(buf: &[u8], sequence: u32) -> Result<DumpChunk, SockDiagError> {
    parse_datagram_with(buf, sequence, TcpSocket::from_response)
}

/// [`parse_datagram`] with each response converted by `convert` (pure).
pub fn parse_datagram_with<T>(
    mut buf: &[u8],
    sequence: u32,
    convert: impl Fn(&InetResponse) -> Option<T>,
) -> Result<DumpChunk<T>, SockDiagError> {
    let mut chunk = DumpChunk::default();
    while !buf.is_empty() {
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(buf)
            .map_err(|e| SockDiagError::Decode(e.to_string()))?;
        let len = usize::try_from(message.header.length).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(SockDiagError::Decode("zero-length netlink message".into()));
        }
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        buf = buf.get(len.saturating_add(3) & !3..).unwrap_or_default();
        if message.header.sequence_number != sequence {
            continue;
        }
        match message.payload {
            NetlinkPayload::Done(_) => {
                chunk.done = true;
                break;
            }
            NetlinkPayload::Error(error) => {
                // An error message with code 0 is an ACK; sock_diag dumps do not send one
                // unless asked, but it means "nothing more" all the same.
                if error.code.is_some() {
                    return Err(SockDiagError::Kernel {
                        io_error: error.to_io(),
                    });
                }
                chunk.done = true;
                break;
            }
            NetlinkPayload::Overrun(_) => return Err(SockDiagError::Overrun),
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                chunk.sockets.extend(convert(&response));
            }
            _ => {}
        }
    }
    Ok(chunk)
}

fn socket_error(what: &'static str) -> impl FnOnce(io::Error) -> SockDiagError {
    move |io_error| SockDiagError::Socket { what, io_error }
}

/// Dumps the TCP sockets of `family` in `states` in the calling thread's network namespace.
///
/// With [`StateMask::SYN_RECV`] the kernel also lists request sockets (SYN-queue entries),
/// one per half-open connection, with the listener's address and port as `saddr`/`sport`.
/// Dumping any state other than LISTEN walks the kernel's whole established hash.
pub fn dump_tcp(
    family: Family,
    states: StateMask,
    ext: Extensions,
) -> Result<Vec<TcpSocket>, SockDiagError> {
    dump_tcp_with(family, states, ext, TcpSocket::from_response)
}

/// [`dump_tcp`] with each socket's pending timer and interface ([`DetailedSocket`]).
pub fn dump_tcp_detailed(
    family: Family,
    states: StateMask,
    ext: Extensions,
) -> Result<Vec<DetailedSocket>, SockDiagError> {
    dump_tcp_with(family, states, ext, DetailedSocket::from_response)
}

fn dump_tcp_with<T>(
    family: Family,
    states: StateMask,
    ext: Extensions,
    convert: impl Fn(&InetResponse) -> Option<T>,
) -> Result<Vec<T>, SockDiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(socket_error("socket"))?;
    set_recv_timeout(&socket, RECV_TIMEOUT).map_err(socket_error("setsockopt(SO_RCVTIMEO)"))?;
    socket.bind_auto().map_err(socket_error("bind"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(socket_error("connect"))?;

    let sequence = 1;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let socket_id = match family {
        Family::V4 => SocketId::new_v4(),
        Family::V6 => SocketId::new_v6(),
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: family.af(),
            protocol: IPPROTO_TCP,
            extensions: ext.flags(),
            states: StateFlags::from_bits_retain(states.bits()),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(socket_error("send"))?;

    let mut sockets = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().map_err(socket_error("recv"))?;
        if datagram.is_empty() {
            return Err(SockDiagError::Decode(
                "empty datagram before NLMSG_DONE".into(),
            ));
        }
        let chunk = parse_datagram_with(&datagram, sequence, &convert)?;
        sockets.extend(chunk.sockets);
        if chunk.done {
            return Ok(sockets);
        }
    }
}

/// Sets `SO_RCVTIMEO` on a netlink socket (also used by the other netlink readers in
/// `enrich`).
pub(crate) fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: the descriptor is open (owned by `socket`), and `tv` is a valid timeval whose
    // exact size is passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(libc::socklen_t::MAX),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl From<Family> for crate::decode::Family {
    fn from(family: Family) -> Self {
        match family {
            Family::V4 => crate::decode::Family::Ipv4,
            Family::V6 => crate::decode::Family::Ipv6,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{DoneMessage, ErrorMessage};
    use netlink_packet_sock_diag::inet::{InetResponseHeader, nlas::MemInfo};

    use super::*;

    fn tcp_info_bytes(len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[0] = 1; // ESTABLISHED
        b[1] = 4; // CA_Loss
        b[2] = 3;
        b[3] = 1;
        b[4] = 2;
        let put32 = |b: &mut Vec<u8>, off: usize, v: u32| {
            if off + 4 <= b.len() {
                b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
            }
        };
        put32(&mut b, 8, 204_000);
        put32(&mut b, 24, 10);
        put32(&mut b, 28, 2);
        put32(&mut b, 32, 5);
        put32(&mut b, 36, 1);
        put32(&mut b, 44, 11);
        put32(&mut b, 52, 12);
        put32(&mut b, 56, 13);
        put32(&mut b, 68, 1500);
        put32(&mut b, 72, 750);
        put32(&mut b, 80, 10);
        put32(&mut b, 100, 42);
        put32(&mut b, 144, 4096);
        put32(&mut b, 152, 3);
        put32(&mut b, 156, 4);
        if b.len() >= 208 {
            b[200..208].copy_from_slice(&9_000u64.to_ne_bytes());
        }
        if b.len() >= 136 {
            b[120..128].copy_from_slice(&1_000_000u64.to_ne_bytes());
            b[128..136].copy_from_slice(&2_000u64.to_ne_bytes());
        }
        if b.len() >= 216 {
            b[208..216].copy_from_slice(&7_000u64.to_ne_bytes());
        }
        b
    }

    #[test]
    fn tcp_info_full_length() {
        // 6.x kernels send about 280 bytes; extra trailing fields are ignored.
        let info = parse_tcp_info(&tcp_info_bytes(280)).expect("long enough");
        assert_eq!(info.state, 1);
        assert_eq!(info.ca_state, 4);
        assert_eq!(info.retransmits, 3);
        assert_eq!(info.probes, 1);
        assert_eq!(info.backoff, 2);
        assert_eq!(info.rto_us, 204_000);
        assert_eq!(info.unacked, 10);
        assert_eq!(info.sacked, 2);
        assert_eq!(info.lost, 5);
        assert_eq!(info.retrans, 1);
        assert_eq!(info.last_data_sent_ms, 11);
        assert_eq!(info.last_data_recv_ms, 12);
        assert_eq!(info.last_ack_recv_ms, 13);
        assert_eq!(info.rtt_us, 1500);
        assert_eq!(info.rttvar_us, 750);
        assert_eq!(info.snd_cwnd, 10);
        assert_eq!(info.total_retrans, 42);
        assert_eq!(info.bytes_acked, Some(1_000_000));
        assert_eq!(info.bytes_received, Some(2_000));
        assert_eq!(info.notsent_bytes, Some(4096));
        assert_eq!(info.bytes_retrans, Some(7_000));
        assert_eq!(info.data_segs_in, Some(3));
        assert_eq!(info.data_segs_out, Some(4));
        assert_eq!(info.bytes_sent, Some(9_000));
    }

    #[test]
    fn tcp_info_old_kernel_lengths() {
        // Linux 4.0: ends after total_retrans + pacing rates (120 bytes).
        let info = parse_tcp_info(&tcp_info_bytes(120)).expect("base fields");
        assert_eq!(info.total_retrans, 42);
        assert_eq!(info.bytes_acked, None);
        assert_eq!(info.notsent_bytes, None);
        // Linux 4.2..4.5: bytes_acked/received and segs, no notsent_bytes.
        let info = parse_tcp_info(&tcp_info_bytes(144)).expect("base fields");
        assert_eq!(info.bytes_received, Some(2_000));
        assert_eq!(info.notsent_bytes, None);
        assert_eq!(info.bytes_retrans, None);
        assert_eq!(info.data_segs_out, None);
        // Linux 4.6..4.18: data segment counts, no bytes_sent.
        let info = parse_tcp_info(&tcp_info_bytes(192)).expect("base fields");
        assert_eq!(info.data_segs_out, Some(4));
        assert_eq!(info.bytes_sent, None);
        // Too short to be a tcp_info at all.
        assert_eq!(parse_tcp_info(&tcp_info_bytes(64)), None);
    }

    #[test]
    fn state_mask_bits() {
        let mask = StateMask::LISTEN | StateMask::SYN_RECV;
        assert_eq!(mask.bits(), (1 << 10) | (1 << 3));
        assert!(mask.contains(TcpState::Listen));
        assert!(mask.contains(TcpState::SynRecv));
        assert!(!mask.contains(TcpState::Established));
        assert!(!mask.contains(TcpState::Other(200)));
        assert_eq!(StateMask::ALL.bits().count_ones(), 11);
        for value in 1..=11 {
            assert_eq!(TcpState::from_kernel(value).kernel_value(), value);
        }
        assert_eq!(TcpState::from_kernel(12), TcpState::SynRecv);
    }

    fn response(family: u8, state: u8, nlas: Vec<Nla>) -> InetResponse {
        let v4 = family == libc::AF_INET as u8;
        InetResponse {
            header: InetResponseHeader {
                family,
                state,
                timer: None,
                socket_id: SocketId {
                    source_port: 8080,
                    destination_port: if state == 10 { 0 } else { 40000 },
                    source_address: if v4 {
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))
                    } else {
                        IpAddr::V6(Ipv6Addr::LOCALHOST)
                    },
                    destination_address: if v4 {
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
                    } else {
                        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    },
                    interface_id: 0,
                    cookie: [1, 0, 0, 0, 2, 0, 0, 0],
                },
                recv_queue: 3,
                send_queue: 128,
                uid: 1000,
                inode: 4242,
            },
            nlas: nlas.into(),
        }
    }

    fn message(sequence: u32, payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = sequence;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        buf
    }

    #[test]
    fn datagram_with_sockets_then_done() -> Result<(), SockDiagError> {
        let meminfo = MemInfo {
            receive_queue: 0,
            receive_queue_max: 0,
            send_queue: 0,
            send_queue_max: 0,
            bottom_send_queues: 0,
            cache: 0,
            options: 0,
            backlog_queue_length: 0,
            drops: 17,
        };
        let mut buf = message(
            7,
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(response(
                libc::AF_INET as u8,
                10,
                vec![Nla::MemInfo(meminfo), Nla::TcpInfo(tcp_info_bytes(232))],
            )))),
        );
        // Another request's answer on the same socket is ignored.
        buf.extend(message(
            99,
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(response(
                libc::AF_INET as u8,
                1,
                vec![],
            )))),
        ));
        buf.extend(message(
            7,
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(response(
                libc::AF_INET6 as u8,
                3,
                vec![],
            )))),
        ));
        let chunk = parse_datagram(&buf, 7)?;
        assert!(!chunk.done);
        assert_eq!(chunk.sockets.len(), 2);
        let listener = &chunk.sockets[0];
        assert_eq!(listener.family, Family::V4);
        assert_eq!(listener.state, TcpState::Listen);
        assert_eq!(listener.sport, 8080);
        assert_eq!(listener.rqueue, 3);
        assert_eq!(listener.wqueue, 128);
        assert_eq!(listener.inode, 4242);
        assert_eq!(listener.uid, 1000);
        assert_eq!(listener.cookie, (2 << 32) | 1);
        assert_eq!(listener.drops, Some(17));
        assert_eq!(
            listener.tcp_info.as_ref().map(|i| i.total_retrans),
            Some(42)
        );
        let request = &chunk.sockets[1];
        assert_eq!(request.family, Family::V6);
        assert_eq!(request.state, TcpState::SynRecv);
        assert_eq!(request.drops, None);
        assert_eq!(request.tcp_info, None);

        let done = message(7, NetlinkPayload::Done(DoneMessage::default()));
        assert!(parse_datagram(&done, 7)?.done);
        Ok(())
    }

    #[test]
    fn detailed_sockets_carry_timer_and_interface() -> Result<(), SockDiagError> {
        let with_timer = |timer| {
            let mut r = response(libc::AF_INET as u8, 1, vec![]);
            r.header.timer = timer;
            r.header.socket_id.interface_id = 7;
            message(
                3,
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(r))),
            )
        };
        let mut buf = Vec::new();
        for timer in [
            None,
            Some(Timer::Retransmit(Duration::from_millis(200), 2)),
            Some(Timer::KeepAlive(Duration::from_secs(7200))),
            Some(Timer::TimeWait),
            Some(Timer::Probe(Duration::from_millis(400))),
        ] {
            buf.extend(with_timer(timer));
        }
        buf.extend(message(3, NetlinkPayload::Done(DoneMessage::default())));
        let chunk = parse_datagram_with(&buf, 3, DetailedSocket::from_response)?;
        assert!(chunk.done);
        let timers: Vec<SocketTimer> = chunk.sockets.iter().map(|s| s.timer).collect();
        assert_eq!(
            timers,
            vec![
                SocketTimer::None,
                SocketTimer::Retransmit {
                    expires_ms: 200,
                    retransmits: 2
                },
                SocketTimer::KeepAlive {
                    expires_ms: 7_200_000
                },
                SocketTimer::TimeWait,
                SocketTimer::ZeroWindowProbe { expires_ms: 400 },
            ]
        );
        assert!(chunk.sockets.iter().all(|s| s.ifindex == 7));
        assert_eq!(chunk.sockets[0].socket.inode, 4242);
        // The plain parser sees the same sockets.
        assert_eq!(parse_datagram(&buf, 3)?.sockets.len(), 5);
        Ok(())
    }

    #[test]
    fn kernel_error_is_reported() {
        let mut error = ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(-libc::ENOENT);
        let buf = message(1, NetlinkPayload::Error(error));
        match parse_datagram(&buf, 1) {
            Err(SockDiagError::Kernel { io_error }) => {
                assert_eq!(io_error.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            parse_datagram(&[1, 2, 3, 4, 5], 1),
            Err(SockDiagError::Decode(_))
        ));
    }
}

#[cfg(test)]
mod proptests;
