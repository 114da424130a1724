//! `sock:inet_sock_set_state`: the connection lifecycle.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use observer_common::{
    ServiceKey, SocketState, TCP_SYN_SENT, TcpEvent, connect_outcome, event_kind, key_wildcard,
};

use crate::{
    abi::{ECONNREFUSED, IPPROTO_TCP, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV},
    clock::now_ns,
    counting::{Counter, count_healthy, export_healthy, new_event, record_with, run},
    listeners::record_listener_change,
    reads::{arg, kread, raw_args, record_of, slot},
    services::{self, Outcome, listener_of, peer_of},
    sock::{fill_from_record, fill_from_sock},
    socket_table::{followed_socket, track_socket, untrack_socket},
};

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    run(event_kind::CLOSE, || {
        let layout = config!(set_state);
        let rec = record_of(&ctx, layout.record_size, slot::SET_STATE)?;
        if rec.get::<u16>(layout.protocol) != u16::from(IPPROTO_TCP) {
            return Ok(());
        }
        let sk: u64 = rec.get(layout.skaddr);
        let transition = Transition {
            sk,
            old: rec.get(layout.oldstate),
            new: rec.get(layout.newstate),
        };
        on_set_state(
            &ctx,
            &transition,
            || true,
            |event| {
                fill_from_record(event, rec, layout.tuple(), sk, slot::SET_STATE);
                Ok(())
            },
            |_| {},
        )
    })
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn raw_inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    run(event_kind::CLOSE, || {
        let a = config!(raw.set_state);
        let args = raw_args::<3>(&ctx);
        let sk = arg(&args, a.sk);
        let transition = Transition {
            sk,
            old: arg(&args, a.extra) as i32,
            new: arg(&args, a.extra2) as i32,
        };
        // The states are arguments: uninteresting transitions end before any memory is read.
        on_set_state(
            &ctx,
            &transition,
            || {
                kread::<u16>(sk + u64::from(config!(raw.sock.protocol)))
                    .is_ok_and(|protocol| protocol == u16::from(IPPROTO_TCP))
            },
            |event| {
                fill_from_sock(event, sk, slot::SET_STATE)?;
                // A failed connect is counted without its local port: read it only for export.
                if event.flow.sport == 0 && event.key_wildcard != key_wildcard::LOCAL_PORT {
                    event.flow.sport = closing_port(sk);
                }
                Ok(())
            },
            |event| {
                if event.flow.sport == 0 {
                    event.flow.sport = closing_port(sk);
                }
            },
        )
    })
}

/// The local port of a closing socket: a close unbinds the port (clearing `skc_num`) before
/// the state change is traced, but the socket's own source port still holds it.
#[inline(always)]
pub(crate) fn closing_port(sk: u64) -> u16 {
    u16::from_be(kread(sk + u64::from(config!(raw.sock.inet_sport))).unwrap_or(0))
}

/// A socket's state change.
pub(crate) struct Transition {
    sk: u64,
    old: i32,
    new: i32,
}

/// `is_tcp` says whether the socket is TCP (the tracepoint also fires for other protocols);
/// `fill` sets the event's flow and family (its key wildcard is already set). Both are called
/// only for transitions that count; `complete` only for an event about to be exported.
///
/// Healthy connections cost a socket-table claim at the start, one aggregate update in
/// `SERVICES` at ESTABLISHED and one at the close, and no flow entry or export. Only trouble
/// (a failed connect, a slow one, one that needed SYN retransmits) is counted per flow and
/// exported regardless of `--export-kinds`.
pub(crate) fn on_set_state<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    &Transition { sk, old, new }: &Transition,
    is_tcp: impl FnOnce() -> bool,
    fill: impl FnOnce(&mut TcpEvent) -> Result<(), i32>,
    complete: impl FnOnce(&mut TcpEvent),
) -> Result<(), i32> {
    if new == i32::from(TCP_SYN_SENT) {
        if !is_tcp() {
            return Ok(());
        }
        // Every field spelled out: `..Default::default()` fills the rest with a byte-wise
        // memset call on BPF.
        let state = SocketState {
            opened_ns: now_ns(),
            established_ns: 0,
            syn_retransmits: 0,
            reset_received: 0,
            active: 1,
            has_service: 0,
            _pad: 0,
            service: ServiceKey::default(),
        };
        track_socket(sk, followed_socket(sk), &state);
        return Ok(());
    }
    // A listen() or a listener's close: rare, and the only transitions that read the
    // listener's drop counter. (A child socket is cloned from its listener and so also leaves
    // LISTEN, for SYN_RECV: that is a connection, not the listener's end.)
    if new == TCP_LISTEN || (old == TCP_LISTEN && new == TCP_CLOSE) {
        if !is_tcp() {
            return Ok(());
        }
        return record_listener_change(sk, new, fill);
    }
    let kind = match (old, new) {
        (o, TCP_ESTABLISHED) if o == i32::from(TCP_SYN_SENT) => event_kind::CONNECT,
        (TCP_SYN_RECV, TCP_ESTABLISHED) => event_kind::ACCEPT,
        (o, TCP_CLOSE) if o == i32::from(TCP_SYN_SENT) => event_kind::CONNECT_FAILED,
        (_, TCP_CLOSE) => event_kind::CLOSE,
        _ => return Ok(()),
    };
    let known = followed_socket(sk);
    if kind == event_kind::CLOSE {
        // Report only sockets seen opening, with their lifetime.
        if known.is_null() {
            return Ok(());
        }
        return on_close(ctx, sk, known, old, new, fill, complete);
    }
    // Sockets seen opening are TCP already; others are checked now.
    if known.is_null() && !is_tcp() {
        return Ok(());
    }
    let now = now_ns();
    let event = new_event(kind, now, slot::SET_STATE)?;
    if kind == event_kind::CONNECT_FAILED {
        event.key_wildcard = key_wildcard::LOCAL_PORT;
    }
    fill(event)?;
    event.state = new as u8;
    event.old_state = old as u8;
    match kind {
        event_kind::CONNECT => {
            let mut syn_retransmits = 0;
            let peer = peer_of(&event.flow);
            if !known.is_null() {
                // SAFETY: live map value of this socket.
                unsafe {
                    event.duration_ns = now.wrapping_sub((*known).opened_ns);
                    syn_retransmits = (*known).syn_retransmits;
                    (*known).established_ns = now;
                    (*known).service = peer;
                    (*known).has_service = 1;
                }
            }
            event.aux32 = syn_retransmits;
            let threshold = config!(budget.slow_connect_ns);
            // Without the socket's start the latency is unknown: not judged slow.
            let slow = threshold != 0 && !known.is_null() && event.duration_ns >= threshold;
            services::count(
                &peer,
                Outcome::Connected {
                    latency_ns: event.duration_ns,
                    syn_retransmits,
                    slow,
                },
            );
            if slow || syn_retransmits != 0 {
                record_with(ctx, event, Counter::Connects, slow, complete);
            } else if let Some(stats) = count_healthy(kind) {
                export_healthy(ctx, stats, event, complete);
            }
        }
        event_kind::CONNECT_FAILED => {
            // tcp_reset() sets the socket's error before it closes it: ECONNREFUSED is a RST
            // answering the SYN (an ICMP port unreachable reads the same); anything else
            // (ETIMEDOUT, or none when the application gave up) is a timeout.
            let sk_err: i32 = kread(sk + u64::from(config!(offsets.sock_err))).unwrap_or(0);
            let (counter, outcome) = if sk_err == ECONNREFUSED {
                event.aux8 = connect_outcome::REFUSED;
                (Counter::ConnectsRefused, Outcome::Refused)
            } else {
                event.aux8 = connect_outcome::TIMEOUT;
                (Counter::ConnectsTimedOut, Outcome::TimedOut)
            };
            services::count(&peer_of(&event.flow), outcome);
            if !known.is_null() {
                // SAFETY: live map value of this socket.
                unsafe {
                    event.duration_ns = now.wrapping_sub((*known).opened_ns);
                    event.aux32 = (*known).syn_retransmits;
                }
                untrack_socket(sk);
            }
            record_with(ctx, event, counter, false, complete);
        }
        _ => {
            // An accept. The handshake's duration as the server measured it: the first RTT
            // sample of the new socket is taken from SYN-ACK to ACK.
            let srtt: u32 = kread(sk + u64::from(config!(packet.tcp_srtt_us))).unwrap_or(0);
            event.aux32 = srtt >> 3;
            event.duration_ns = u64::from(srtt >> 3) * 1000;
            let listener = listener_of(&event.flow);
            services::count(
                &listener,
                Outcome::Accepted {
                    rtt_ns: event.duration_ns,
                },
            );
            let state = SocketState {
                opened_ns: now,
                established_ns: now,
                syn_retransmits: 0,
                reset_received: 0,
                active: 0,
                has_service: 1,
                _pad: 0,
                service: listener,
            };
            track_socket(sk, known, &state);
            if let Some(stats) = count_healthy(kind) {
                export_healthy(ctx, stats, event, complete);
            }
        }
    }
    Ok(())
}

/// The close of followed socket `sk` (`known`, its socket-table state): its lifetime goes to
/// its aggregate, read from the table, so the socket itself is read only for an export.
#[inline(always)]
fn on_close<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    sk: u64,
    known: *mut SocketState,
    old: i32,
    new: i32,
    fill: impl FnOnce(&mut TcpEvent) -> Result<(), i32>,
    complete: impl FnOnce(&mut TcpEvent),
) -> Result<(), i32> {
    let now = now_ns();
    // SAFETY: live map value of this socket; copied before the way is freed.
    let state = unsafe { *known };
    untrack_socket(sk);
    let since = if state.established_ns != 0 {
        state.established_ns
    } else {
        state.opened_ns
    };
    let lifetime_ns = now.wrapping_sub(since);
    if state.has_service != 0 {
        services::count(&state.service, Outcome::Closed { lifetime_ns });
    }
    let Some(stats) = count_healthy(event_kind::CLOSE) else {
        return Ok(());
    };
    let event = new_event(event_kind::CLOSE, now, slot::SET_STATE)?;
    fill(event)?;
    event.state = new as u8;
    event.old_state = old as u8;
    event.duration_ns = lifetime_ns;
    event.aux8 = state.active;
    export_healthy(ctx, stats, event, complete);
    Ok(())
}
