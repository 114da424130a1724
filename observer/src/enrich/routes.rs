//! Asymmetric routes: a connection whose packets arrive on one interface while the replies
//! leave through another.
//!
//! A SYN that arrives on `eth-a` is answered along the route back to its source. When that
//! route points out of `eth-b` (a more specific route, a policy rule, a default route on the
//! wrong side), the SYN-ACK takes a path the client may never hear from: the listener
//! retransmits SYN-ACKs (`synack_retransmit`) and the client its SYNs. With strict reverse-path
//! filtering (`rp_filter=1`) on the arrival interface the kernel drops the SYN itself
//! (`IP_RPFILTER`, counted as `TcpExtIPReversePathFilter`).
//!
//! [`route_get`] asks the kernel which route a reply would take (`ip route get PEER from
//! LOCAL`, RTM_GETROUTE) in the calling thread's network namespace; [`asymmetric`] and
//! [`AsymmetricRoute::build`] are the pure comparison. Messages are built and parsed with
//! `netlink-packet-route`.
//!
//! The arrival interface is not kept with the connection: request sockets report it only for
//! listeners bound to a device (`ir_iif` is 0 otherwise, measured on 6.18). It comes from a
//! drop event's `ifindex` when there is one (IP_RPFILTER drops), else [`check_reply_route`]
//! infers it as the interface that holds the local address ([`ArrivalSource::LocalAddress`]),
//! which is where a SYN to that address arrives unless the host routes it in from elsewhere.
use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::{netns, sockdiag::set_recv_timeout};

/// How long one `recv` may wait for the kernel's answer (it answers at once).
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams read for one request at most (an address dump of a very large host fits in far
/// fewer); bounds the loop if the kernel never sends NLMSG_DONE.
const MAX_DATAGRAMS: usize = 100_000;
/// Where the calling thread's IPv4 per-interface settings are (`/proc/sys` resolves against
/// the opening thread's network namespace).
pub const IPV4_CONF: &str = "/proc/sys/net/ipv4/conf";

/// Errors asking the kernel about routes and interfaces.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A socket call on the rtnetlink socket failed (`what` names it).
    #[error("rtnetlink socket: {what} failed")]
    Socket {
        what: &'static str,
        #[source]
        io_error: io::Error,
    },
    /// The kernel answered with an error (ENETUNREACH: no route; EINVAL: the source is not
    /// a local address; ENODEV: no such interface).
    #[error("the kernel refused {request}")]
    Kernel {
        request: &'static str,
        #[source]
        io_error: io::Error,
    },
    /// A message from the kernel could not be decoded.
    #[error("cannot decode an rtnetlink message: {0}")]
    Decode(String),
    /// The kernel's answer lacked what was asked for.
    #[error("the kernel's answer to {request} has no {missing}")]
    Incomplete {
        request: &'static str,
        missing: &'static str,
    },
    /// Destination and source are of different families.
    #[error("destination {dst} and source {src} are of different address families")]
    MixedFamilies { dst: IpAddr, src: IpAddr },
    /// The calling thread's namespace could not be identified.
    #[error("cannot identify the current network namespace")]
    Netns(#[source] io::Error),
}

/// The route the kernel picks for a destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteInfo {
    /// Output interface index (`RTA_OIF`).
    pub oif: u32,
    /// Its name (`RTM_GETLINK`).
    pub oif_name: String,
    /// Next hop, for routes through a gateway.
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would choose (`RTA_PREFSRC`).
    pub prefsrc: Option<IpAddr>,
    /// The routing table the route was found in (254 = main, 255 = local).
    pub table: u32,
}

/// The parts of a route lookup's answer (pure); the interface name is filled in later.
pub fn route_from_message(message: &RouteMessage) -> Result<RouteInfo, RouteError> {
    let addr = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut route = RouteInfo {
        oif: 0,
        oif_name: String::new(),
        gateway: None,
        prefsrc: None,
        table: u32::from(message.header.table),
    };
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Oif(index) => route.oif = *index,
            RouteAttribute::Gateway(a) => route.gateway = addr(a),
            RouteAttribute::PrefSource(a) => route.prefsrc = addr(a),
            // The header holds only 8 bits of the table id.
            RouteAttribute::Table(table) => route.table = *table,
            _ => {}
        }
    }
    if route.oif == 0 {
        return Err(RouteError::Incomplete {
            request: "RTM_GETROUTE",
            missing: "output interface",
        });
    }
    Ok(route)
}

fn family_of(addr: IpAddr) -> (AddressFamily, u8) {
    match addr {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    }
}

/// The RTM_GETROUTE request for `dst` (optionally `from src`), as `ip route get` sends it
/// (pure).
pub fn route_request(dst: IpAddr, src: Option<IpAddr>) -> Result<RouteMessage, RouteError> {
    let (family, bits) = family_of(dst);
    let mut message = RouteMessage::default();
    message.header.address_family = family;
    message.header.destination_prefix_length = bits;
    // Report the table the route came from, not always "main".
    message.header.flags = RouteFlags::LookupTable;
    message
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    if let Some(src) = src {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(RouteError::MixedFamilies { dst, src });
        }
        message.header.source_prefix_length = bits;
        message
            .attributes
            .push(RouteAttribute::Source(RouteAddress::from(src)));
    }
    Ok(message)
}

/// What one datagram of answers held (pure parse of several messages back to back).
#[derive(Debug, Default)]
pub struct Answers {
    pub messages: Vec<RouteNetlinkMessage>,
    /// NLMSG_DONE, or an ACK, was seen.
    pub done: bool,
}

/// Decodes one datagram of the kernel's answer to request `sequence` (pure).
pub fn parse_answers(
    mut buf: &[u8],
    sequence: u32,
    request: &'static str,
) -> Result<Answers, RouteError> {
    let mut answers = Answers::default();
    while !buf.is_empty() {
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf)
            .map_err(|e| RouteError::Decode(e.to_string()))?;
        let len = usize::try_from(message.header.length).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(RouteError::Decode("zero-length netlink message".into()));
        }
        buf = buf.get(len.saturating_add(3) & !3..).unwrap_or_default();
        if message.header.sequence_number != sequence {
            continue;
        }
        match message.payload {
            NetlinkPayload::Done(_) => {
                answers.done = true;
                break;
            }
            NetlinkPayload::Error(error) => {
                if error.code.is_some() {
                    return Err(RouteError::Kernel {
                        request,
                        io_error: error.to_io(),
                    });
                }
                answers.done = true;
                break;
            }
            NetlinkPayload::InnerMessage(inner) => answers.messages.push(inner),
            _ => {}
        }
    }
    Ok(answers)
}

fn socket_error(what: &'static str) -> impl FnOnce(io::Error) -> RouteError {
    move |io_error| RouteError::Socket { what, io_error }
}

/// Sends one request on a fresh rtnetlink socket (in the calling thread's namespace) and
/// collects the answers: until NLMSG_DONE for a dump, the first answer otherwise.
fn transact(
    payload: RouteNetlinkMessage,
    dump: bool,
    request: &'static str,
) -> Result<Vec<RouteNetlinkMessage>, RouteError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(socket_error("socket"))?;
    set_recv_timeout(&socket, RECV_TIMEOUT).map_err(socket_error("setsockopt(SO_RCVTIMEO)"))?;
    socket.bind_auto().map_err(socket_error("bind"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(socket_error("connect"))?;

    let sequence = 1;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0).map_err(socket_error("send"))?;

    let mut messages = Vec::new();
    for _ in 0..MAX_DATAGRAMS {
        let (datagram, _) = socket.recv_from_full().map_err(socket_error("recv"))?;
        if datagram.is_empty() {
            return Err(RouteError::Decode("empty datagram".into()));
        }
        let answers = parse_answers(&datagram, sequence, request)?;
        messages.extend(answers.messages);
        if answers.done || (!dump && !messages.is_empty()) {
            return Ok(messages);
        }
    }
    Err(RouteError::Decode(format!(
        "no end of the answer to {request} after {MAX_DATAGRAMS} datagrams"
    )))
}

/// The route a packet to `dst` (from the local address `src`, if given) takes, in the
/// calling thread's network namespace: `ip route get DST [from SRC]`. Call it inside
/// [`in_namespace`](super::netns::in_namespace) for another namespace.
///
/// This is an output lookup with the main routing inputs only: a socket's mark (SO_MARK),
/// uid, TOS or bound device can select other policy rules, which this does not reproduce.
pub fn route_get(dst: IpAddr, src: Option<IpAddr>) -> Result<RouteInfo, RouteError> {
    let request = route_request(dst, src)?;
    let answers = transact(
        RouteNetlinkMessage::GetRoute(request),
        false,
        "RTM_GETROUTE",
    )?;
    let message = answers
        .iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(route) => Some(route),
            _ => None,
        })
        .ok_or(RouteError::Incomplete {
            request: "RTM_GETROUTE",
            missing: "route",
        })?;
    let mut route = route_from_message(message)?;
    route.oif_name = link_name(route.oif)?;
    Ok(route)
}

/// The name of interface `index` in the calling thread's network namespace (RTM_GETLINK).
pub fn link_name(index: u32) -> Result<String, RouteError> {
    let mut request = LinkMessage::default();
    request.header.index = index;
    let answers = transact(RouteNetlinkMessage::GetLink(request), false, "RTM_GETLINK")?;
    answers
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(link),
            _ => None,
        })
        .flat_map(|link| &link.attributes)
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .ok_or(RouteError::Incomplete {
            request: "RTM_GETLINK",
            missing: "interface name",
        })
}

/// The interface holding `addr` among `addresses` (an RTM_GETADDR dump), pure. IPv4 entries
/// carry the local address in `IFA_LOCAL` (`IFA_ADDRESS` is the peer of a point-to-point
/// link), IPv6 ones in `IFA_ADDRESS`.
pub fn interface_holding(addr: IpAddr, addresses: &[AddressMessage]) -> Option<u32> {
    addresses
        .iter()
        .find(|m| {
            m.attributes.iter().any(|a| match a {
                AddressAttribute::Local(local) => *local == addr,
                AddressAttribute::Address(address) => addr.is_ipv6() && *address == addr,
                _ => false,
            })
        })
        .map(|m| m.header.index)
}

/// The interface that holds the local address `addr` in the calling thread's namespace
/// (RTM_GETADDR dump), if any.
pub fn address_interface(addr: IpAddr) -> Result<Option<u32>, RouteError> {
    let mut request = AddressMessage::default();
    request.header.family = family_of(addr).0;
    let answers = transact(
        RouteNetlinkMessage::GetAddress(request),
        true,
        "RTM_GETADDR",
    )?;
    let addresses: Vec<AddressMessage> = answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => Some(a),
            _ => None,
        })
        .collect();
    Ok(interface_holding(addr, &addresses))
}

/// The local addresses of `addresses` (an RTM_GETADDR dump), pure: `IFA_LOCAL` for IPv4,
/// `IFA_ADDRESS` for IPv6 (see [`interface_holding`]).
pub fn local_addresses_of(addresses: &[AddressMessage]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for m in addresses {
        for a in &m.attributes {
            let addr = match a {
                AddressAttribute::Local(local) => *local,
                AddressAttribute::Address(address) if address.is_ipv6() => *address,
                _ => continue,
            };
            if !addr.is_loopback() && !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

/// The calling thread's namespace's local addresses other than loopback (one RTM_GETADDR
/// dump).
pub fn local_addresses() -> Result<Vec<IpAddr>, RouteError> {
    let answers = transact(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        true,
        "RTM_GETADDR",
    )?;
    let addresses: Vec<AddressMessage> = answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => Some(a),
            _ => None,
        })
        .collect();
    Ok(local_addresses_of(&addresses))
}

/// The kernel's effective IPv4 reverse-path filter mode of an interface: the larger of
/// `conf/all/rp_filter` and `conf/IFNAME/rp_filter` (0 off, 1 strict, 2 loose), pure.
pub fn effective_rp_filter(all: u8, interface: u8) -> u8 {
    all.max(interface)
}

fn read_u8(path: &Path) -> Option<u8> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The effective `rp_filter` of interface `ifname` in the calling thread's namespace, from
/// `conf_dir` (normally [`IPV4_CONF`]); `None` if unreadable or not a plain interface name.
pub fn rp_filter_at(conf_dir: &Path, ifname: &str) -> Option<u8> {
    if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
        return None;
    }
    let read = |dir: &str| read_u8(&conf_dir.join(dir).join("rp_filter"));
    Some(effective_rp_filter(read("all")?, read(ifname)?))
}

/// [`rp_filter_at`] on [`IPV4_CONF`].
pub fn rp_filter(ifname: &str) -> Option<u8> {
    rp_filter_at(&PathBuf::from(IPV4_CONF), ifname)
}

/// Whether packets arrive on one interface and replies leave by another (pure). Unknown
/// interfaces (0) are never asymmetric.
pub fn asymmetric(syn_in_ifindex: u32, route_oif: u32) -> bool {
    syn_in_ifindex != 0 && route_oif != 0 && syn_in_ifindex != route_oif
}

/// Where the arrival interface of [`AsymmetricRoute`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArrivalSource {
    /// Seen on a packet: the `ifindex` of a drop event.
    Observed,
    /// Inferred: the interface that holds the connection's local address.
    LocalAddress,
}

/// A connection whose replies leave by another interface than its packets arrive on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AsymmetricRoute {
    /// Inode of the network namespace.
    pub netns: u64,
    /// The remote side (the client of a listener).
    pub peer: IpAddr,
    /// This host's address of the connection.
    pub local_addr: IpAddr,
    pub in_ifindex: u32,
    pub in_ifname: String,
    pub in_source: ArrivalSource,
    /// Where the route back to `peer` (from `local_addr`) leads.
    pub out_ifindex: u32,
    pub out_ifname: String,
    pub gateway: Option<IpAddr>,
    pub table: u32,
    /// Effective reverse-path filter of the arrival interface: 1 (strict) drops the packets
    /// themselves. `None` for IPv6, which has no rp_filter.
    pub rp_filter_in: Option<u8>,
    pub rp_filter_out: Option<u8>,
}

/// The arrival side of a connection, for [`AsymmetricRoute::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub ifindex: u32,
    pub ifname: String,
    pub source: ArrivalSource,
    pub rp_filter: Option<u8>,
}

impl AsymmetricRoute {
    /// The record for a connection between `local_addr` and `peer` whose packets arrive as
    /// `arrival` says and whose replies take `route`; `None` when both are the same interface
    /// (pure).
    pub fn build(
        netns: u64,
        peer: IpAddr,
        local_addr: IpAddr,
        arrival: Arrival,
        route: &RouteInfo,
        rp_filter_out: Option<u8>,
    ) -> Option<AsymmetricRoute> {
        if !asymmetric(arrival.ifindex, route.oif) {
            return None;
        }
        let Arrival {
            ifindex,
            ifname,
            source,
            rp_filter,
        } = arrival;
        Some(AsymmetricRoute {
            netns,
            peer,
            local_addr,
            in_ifindex: ifindex,
            in_ifname: ifname,
            in_source: source,
            out_ifindex: route.oif,
            out_ifname: route.oif_name.clone(),
            gateway: route.gateway,
            table: route.table,
            rp_filter_in: rp_filter,
            rp_filter_out,
        })
    }
}

/// Checks the reply route of a connection between `local_addr` and `peer` in the calling
/// thread's network namespace (call it inside [`in_namespace`](super::netns::in_namespace)).
///
/// `in_ifindex` is the interface its packets arrive on when known (a drop event's
/// `ifindex`); `None` infers it as the interface holding `local_addr`, and gives `Ok(None)`
/// when no interface holds it. `Ok(None)` also when the route is symmetric. Costs one or two
/// route lookups and up to three small netlink requests: call it for the connections that
/// show trouble (SYN-ACK retransmits, IP_RPFILTER drops), not for every connection.
pub fn check_reply_route(
    peer: IpAddr,
    local_addr: IpAddr,
    in_ifindex: Option<u32>,
) -> Result<Option<AsymmetricRoute>, RouteError> {
    let netns = netns::current_inode().map_err(RouteError::Netns)?;
    let (ifindex, source) = match in_ifindex {
        Some(index) => (index, ArrivalSource::Observed),
        None => match address_interface(local_addr)? {
            Some(index) => (index, ArrivalSource::LocalAddress),
            None => return Ok(None),
        },
    };
    let route = route_get(peer, Some(local_addr))?;
    if !asymmetric(ifindex, route.oif) {
        return Ok(None);
    }
    let ifname = link_name(ifindex)?;
    let rp = |name: &str| {
        if peer.is_ipv4() {
            rp_filter(name)
        } else {
            None
        }
    };
    let arrival = Arrival {
        rp_filter: rp(&ifname),
        ifindex,
        ifname,
        source,
    };
    let rp_filter_out = rp(&route.oif_name);
    Ok(AsymmetricRoute::build(
        netns,
        peer,
        local_addr,
        arrival,
        &route,
        rp_filter_out,
    ))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{DoneMessage, ErrorMessage};

    use super::*;

    fn v4(c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 201, c, d))
    }

    fn serialize(sequence: u32, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = sequence;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        buf
    }

    #[test]
    fn asymmetry_needs_two_known_different_interfaces() {
        assert!(asymmetric(2, 3));
        assert!(!asymmetric(2, 2));
        assert!(!asymmetric(0, 3));
        assert!(!asymmetric(2, 0));
    }

    #[test]
    fn rp_filter_is_the_larger_of_all_and_the_interface() {
        assert_eq!(effective_rp_filter(0, 1), 1);
        assert_eq!(effective_rp_filter(2, 1), 2);
        assert_eq!(effective_rp_filter(0, 0), 0);
    }

    #[test]
    fn rp_filter_reads_the_conf_tree() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("observer-routes-{}", std::process::id()));
        struct Cleanup(PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir.clone());
        for (name, value) in [("all", "0\n"), ("eth-a", "1\n"), ("eth-b", "2\n")] {
            std::fs::create_dir_all(dir.join(name))?;
            std::fs::write(dir.join(name).join("rp_filter"), value)?;
        }
        assert_eq!(rp_filter_at(&dir, "eth-a"), Some(1));
        assert_eq!(rp_filter_at(&dir, "eth-b"), Some(2));
        assert_eq!(rp_filter_at(&dir, "missing"), None);
        assert_eq!(rp_filter_at(&dir, "../all"), None);
        assert_eq!(rp_filter_at(&dir, ""), None);
        Ok(())
    }

    #[test]
    fn route_request_matches_ip_route_get() -> Result<(), RouteError> {
        let request = route_request(v4(1, 1), Some(v4(1, 2)))?;
        assert_eq!(request.header.address_family, AddressFamily::Inet);
        assert_eq!(request.header.destination_prefix_length, 32);
        assert_eq!(request.header.source_prefix_length, 32);
        assert!(request.header.flags.contains(RouteFlags::LookupTable));
        assert_eq!(
            request.attributes,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 201, 1, 1))),
                RouteAttribute::Source(RouteAddress::Inet(Ipv4Addr::new(10, 201, 1, 2))),
            ]
        );
        let v6 = route_request(IpAddr::V6(Ipv6Addr::LOCALHOST), None)?;
        assert_eq!(v6.header.address_family, AddressFamily::Inet6);
        assert_eq!(v6.header.destination_prefix_length, 128);
        assert_eq!(v6.attributes.len(), 1);
        assert!(matches!(
            route_request(v4(1, 1), Some(IpAddr::V6(Ipv6Addr::LOCALHOST))),
            Err(RouteError::MixedFamilies { .. })
        ));
        Ok(())
    }

    fn route_answer() -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = 254;
        m.attributes = vec![
            RouteAttribute::Table(1000),
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 201, 1, 1))),
            RouteAttribute::Oif(3),
            RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 201, 2, 3))),
            RouteAttribute::PrefSource(RouteAddress::Inet(Ipv4Addr::new(10, 201, 2, 2))),
        ];
        m
    }

    #[test]
    fn route_answers_parse() -> Result<(), RouteError> {
        let buf = serialize(
            1,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route_answer())),
        );
        let answers = parse_answers(&buf, 1, "RTM_GETROUTE")?;
        assert!(!answers.done);
        let [RouteNetlinkMessage::NewRoute(message)] = answers.messages.as_slice() else {
            panic!("one route expected: {:?}", answers.messages);
        };
        let route = route_from_message(message)?;
        assert_eq!(
            route,
            RouteInfo {
                oif: 3,
                oif_name: String::new(),
                gateway: Some(v4(2, 3)),
                prefsrc: Some(v4(2, 2)),
                table: 1000,
            }
        );
        // Without RTA_TABLE the header's table is used; without RTA_OIF it is incomplete.
        let mut bare = route_answer();
        bare.attributes
            .retain(|a| !matches!(a, RouteAttribute::Table(_)));
        assert_eq!(route_from_message(&bare)?.table, 254);
        bare.attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        assert!(matches!(
            route_from_message(&bare),
            Err(RouteError::Incomplete { .. })
        ));
        Ok(())
    }

    #[test]
    fn kernel_errors_and_done() -> Result<(), RouteError> {
        let mut error = ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(-libc::ENETUNREACH);
        let buf = serialize(1, NetlinkPayload::Error(error));
        match parse_answers(&buf, 1, "RTM_GETROUTE") {
            Err(RouteError::Kernel { io_error, .. }) => {
                assert_eq!(io_error.raw_os_error(), Some(libc::ENETUNREACH));
            }
            other => panic!("unexpected {other:?}"),
        }
        // Another sequence's messages are skipped; DONE ends a dump.
        let mut buf = serialize(
            9,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route_answer())),
        );
        buf.extend(serialize(1, NetlinkPayload::Done(DoneMessage::default())));
        let answers = parse_answers(&buf, 1, "RTM_GETADDR")?;
        assert!(answers.done && answers.messages.is_empty());
        assert!(matches!(
            parse_answers(&[1, 2, 3], 1, "x"),
            Err(RouteError::Decode(_))
        ));
        Ok(())
    }

    #[test]
    fn address_owner() {
        let entry = |index, attributes| {
            let mut m = AddressMessage::default();
            m.header.index = index;
            m.attributes = attributes;
            m
        };
        let v6 = IpAddr::V6("fd00::2".parse().unwrap_or(Ipv6Addr::LOCALHOST));
        let addresses = vec![
            // Point-to-point: IFA_ADDRESS is the peer, not ours.
            entry(
                5,
                vec![
                    AddressAttribute::Address(v4(9, 9)),
                    AddressAttribute::Local(v4(9, 1)),
                ],
            ),
            entry(
                2,
                vec![
                    AddressAttribute::Address(v4(1, 2)),
                    AddressAttribute::Local(v4(1, 2)),
                ],
            ),
            entry(3, vec![AddressAttribute::Address(v6)]),
        ];
        assert_eq!(interface_holding(v4(1, 2), &addresses), Some(2));
        assert_eq!(interface_holding(v4(9, 1), &addresses), Some(5));
        assert_eq!(interface_holding(v4(9, 9), &addresses), None);
        assert_eq!(interface_holding(v6, &addresses), Some(3));
    }

    #[test]
    fn records_only_for_asymmetric_routes() {
        let route = RouteInfo {
            oif: 3,
            oif_name: "eth-b".into(),
            gateway: Some(v4(2, 3)),
            prefsrc: Some(v4(1, 2)),
            table: 254,
        };
        let arrival = |ifindex: u32, name: &str| Arrival {
            ifindex,
            ifname: name.into(),
            source: ArrivalSource::Observed,
            rp_filter: Some(1),
        };
        let record =
            AsymmetricRoute::build(7, v4(1, 1), v4(1, 2), arrival(2, "eth-a"), &route, Some(0))
                .expect("asymmetric");
        assert_eq!(
            (record.in_ifname.as_str(), record.out_ifname.as_str()),
            ("eth-a", "eth-b")
        );
        assert_eq!(
            (record.in_ifindex, record.out_ifindex, record.netns),
            (2, 3, 7)
        );
        assert_eq!(
            (record.rp_filter_in, record.rp_filter_out),
            (Some(1), Some(0))
        );
        assert_eq!(record.gateway, Some(v4(2, 3)));
        assert_eq!(
            AsymmetricRoute::build(7, v4(1, 1), v4(1, 2), arrival(3, "eth-b"), &route, Some(0)),
            None
        );
        let json = serde_json::to_value(&record).unwrap_or_default();
        assert_eq!(json["in_source"], "observed");
    }
}

#[cfg(test)]
mod proptests;
