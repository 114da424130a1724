//! sock_diag dump replies: arbitrary datagrams and mutated copies of valid ones decode to
//! sockets or an error, never a panic, with at most one socket per 16 bytes of datagram and
//! allocations in proportion to it.
use std::net::{Ipv4Addr, Ipv6Addr};

use netlink_packet_core::DoneMessage;
use netlink_packet_sock_diag::inet::{InetResponseHeader, nlas::MemInfo};
use proptest::prelude::*;

use super::*;
use crate::prop_support::{self, assert_bounded};

fn response(family: u8, state: u8, nlas: Vec<Nla>) -> InetResponse {
    let v4 = family == libc::AF_INET as u8;
    InetResponse {
        header: InetResponseHeader {
            family,
            state,
            timer: Some(Timer::KeepAlive(std::time::Duration::from_secs(7))),
            socket_id: SocketId {
                source_port: 8080,
                destination_port: 40000,
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

/// A datagram of two sockets (one with meminfo and tcp_info) and the end of the dump.
fn valid_datagram() -> Vec<u8> {
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
    let mut info = vec![0u8; 232];
    info[0] = 1;
    let inner = |r| NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(r)));
    let mut buf = message(
        7,
        inner(response(
            libc::AF_INET as u8,
            1,
            vec![Nla::MemInfo(meminfo), Nla::TcpInfo(info)],
        )),
    );
    buf.extend(message(
        7,
        inner(response(libc::AF_INET6 as u8, 10, vec![])),
    ));
    buf.extend(message(7, NetlinkPayload::Done(DoneMessage::default())));
    buf
}

fn check(buf: &[u8]) -> Result<(), TestCaseError> {
    let chunk = assert_bounded(buf.len(), 16, 16 * 1024, || {
        let _ = parse_datagram(buf, 7);
        parse_datagram_with(buf, 7, DetailedSocket::from_response)
    })?;
    if let Ok(chunk) = chunk {
        prop_assert!(chunk.sockets.len() <= buf.len() / 16);
    }
    Ok(())
}

#[test]
fn the_valid_datagram_decodes() -> Result<(), SockDiagError> {
    let chunk = parse_datagram(&valid_datagram(), 7)?;
    assert!(chunk.done);
    assert_eq!(chunk.sockets.len(), 2);
    assert_eq!(chunk.sockets[0].drops, Some(17));
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
        kind in prop_oneof![Just(20u16), Just(1), Just(2), Just(3), any::<u16>()],
        body in prop_support::bytes(300),
        len_slack in -8i64..8,
    ) {
        // A header whose length matches the body (or nearly): the decoder gets past it.
        let len = (16 + body.len() as i64 + len_slack).max(0) as u32;
        let mut buf = len.to_ne_bytes().to_vec();
        buf.extend(kind.to_ne_bytes());
        buf.extend(0u16.to_ne_bytes());
        buf.extend(7u32.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes());
        buf.extend(body);
        check(&buf)?;
    }

    #[test]
    fn mutated_datagrams_never_panic(buf in prop_support::mutated(vec![valid_datagram()])) {
        check(&buf)?;
    }

    #[test]
    fn arbitrary_tcp_info_never_panics(bytes in prop_support::bytes(400)) {
        let _ = parse_tcp_info(&bytes);
    }
}
