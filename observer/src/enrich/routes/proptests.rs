//! rtnetlink replies (routes, links, addresses): arbitrary datagrams and mutated copies of
//! valid ones decode to messages or an error, never a panic, in allocations proportional to
//! the datagram, and what observer reads from the messages never panics either.
use std::net::Ipv4Addr;

use netlink_packet_core::DoneMessage;
use proptest::prelude::*;

use super::*;
use crate::prop_support::{self, assert_bounded};

fn serialize(sequence: u32, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(header, payload);
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// A route, a link with its name, an IPv4 address and the end of a dump.
fn valid_datagram() -> Vec<u8> {
    let v4 = |d| RouteAddress::Inet(Ipv4Addr::new(10, 201, 1, d));
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.table = 254;
    route.attributes = vec![
        RouteAttribute::Table(1000),
        RouteAttribute::Destination(v4(1)),
        RouteAttribute::Oif(3),
        RouteAttribute::Gateway(v4(3)),
        RouteAttribute::PrefSource(v4(2)),
    ];
    let mut link = LinkMessage::default();
    link.header.index = 3;
    link.attributes = vec![LinkAttribute::IfName("eth-b".into())];
    let mut address = AddressMessage::default();
    address.header.index = 2;
    address.attributes = vec![AddressAttribute::Local(IpAddr::from([10, 201, 1, 2]))];
    let inner = NetlinkPayload::InnerMessage;
    let mut buf = serialize(1, inner(RouteNetlinkMessage::NewRoute(route)));
    buf.extend(serialize(1, inner(RouteNetlinkMessage::NewLink(link))));
    buf.extend(serialize(
        1,
        inner(RouteNetlinkMessage::NewAddress(address)),
    ));
    buf.extend(serialize(1, NetlinkPayload::Done(DoneMessage::default())));
    buf
}

fn check(buf: &[u8]) -> Result<(), TestCaseError> {
    // Decoded messages keep their attributes, a few times their wire size.
    let answers = assert_bounded(buf.len(), 64, 16 * 1024, || {
        parse_answers(buf, 1, "RTM_GETROUTE")
    })?;
    if let Ok(answers) = answers {
        prop_assert!(answers.messages.len() <= buf.len() / 16);
        let mut addresses = Vec::new();
        for message in &answers.messages {
            match message {
                RouteNetlinkMessage::NewRoute(route) => {
                    let _ = route_from_message(route);
                }
                RouteNetlinkMessage::NewAddress(a) => addresses.push(a.clone()),
                _ => {}
            }
        }
        let _ = interface_holding(IpAddr::from([10, 201, 1, 2]), &addresses);
    }
    Ok(())
}

#[test]
fn the_valid_datagram_decodes() -> Result<(), RouteError> {
    let answers = parse_answers(&valid_datagram(), 1, "RTM_GETROUTE")?;
    assert!(answers.done);
    assert_eq!(answers.messages.len(), 3);
    Ok(())
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_datagrams_never_panic(buf in prop_support::bytes(512)) {
        check(&buf)?;
    }

    #[test]
    fn arbitrary_messages_behind_a_plausible_header_never_panic(
        kind in prop_oneof![Just(24u16), Just(16), Just(20), Just(2), Just(3), any::<u16>()],
        body in prop_support::bytes(300),
        len_slack in -8i64..8,
    ) {
        let len = (16 + body.len() as i64 + len_slack).max(0) as u32;
        let mut buf = len.to_ne_bytes().to_vec();
        buf.extend(kind.to_ne_bytes());
        buf.extend(0u16.to_ne_bytes());
        buf.extend(1u32.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes());
        buf.extend(body);
        check(&buf)?;
    }

    #[test]
    fn mutated_datagrams_never_panic(buf in prop_support::mutated(vec![valid_datagram()])) {
        check(&buf)?;
    }
}
