//! Which evidence explains which anomaly: the finders, tried in order of specificity per kind.
use std::net::IpAddr;

use serde_json::json;

use super::{
    Cause, CauseKind, Surroundings,
    evidence::{DropTally, Evidence, ListenerId, ListenerTally, reset_from_process},
    summary::{endpoint, netns_label, process, reset_meaning, single_port},
};
use crate::{
    aggregate::{AnomalyKind, AnomalySnapshot, RowKey},
    analysis::signals_affected_by,
};

/// How long before an anomaly's first symptom evidence still counts (a sysctl changed a few
/// minutes before, a rule that dropped the first packets).
const LOOKBACK_NS: u64 = 60 * 1_000_000_000;
/// A sysctl change this long before the first symptom may still be its cause.
const SYSCTL_LOOKBACK_NS: u64 = 10 * 60 * 1_000_000_000;

/// Where an anomaly is: its namespace, the remote address and this host's addresses and ports
/// (from its key and exemplar flows), and since when evidence counts.
#[derive(Debug)]
struct Scope {
    netns: u32,
    remote: Option<IpAddr>,
    locals: Vec<IpAddr>,
    local_ports: Vec<u16>,
    remote_ports: Vec<u16>,
    since_ns: u64,
    symptom_count: u64,
}

impl Scope {
    fn of(anomaly: &AnomalySnapshot) -> Self {
        let mut scope = Scope {
            netns: 0,
            remote: None,
            locals: Vec::new(),
            local_ports: Vec::new(),
            remote_ports: Vec::new(),
            since_ns: anomaly.first_seen_ns.saturating_sub(LOOKBACK_NS),
            symptom_count: anomaly.lifetime_count,
        };
        match &anomaly.key {
            RowKey::Flow(flow) => {
                scope.netns = flow.netns;
                scope.remote = Some(flow.daddr);
                scope.locals.push(flow.saddr);
                scope.local_ports.push(flow.sport);
                scope.remote_ports.push(flow.dport);
            }
            RowKey::Peer(peer) => {
                scope.netns = peer.netns;
                scope.remote = Some(peer.addr);
            }
            RowKey::Listener(listener) => {
                scope.netns = listener.netns;
                scope.locals.push(listener.addr);
                scope.local_ports.push(listener.port);
            }
            RowKey::Rule(rule) => scope.netns = rule.netns,
        }
        for flow in &anomaly.exemplar_flows {
            push_new(&mut scope.locals, flow.saddr);
            push_new(&mut scope.local_ports, flow.sport);
            push_new(&mut scope.remote_ports, flow.dport);
        }
        scope
    }

    /// Whether evidence seen in namespace `netns` between `a` and `b` (either orientation) is
    /// about this anomaly's connections. Evidence from any namespace counts (the other end of a
    /// veth is another namespace), except for loopback addresses: every namespace has its own
    /// 127.0.0.1, so loopback evidence counts only in the anomaly's own namespace.
    fn involves(&self, netns: u32, a: IpAddr, b: IpAddr) -> bool {
        if (a.is_loopback() || b.is_loopback()) && self.netns != 0 && netns != self.netns {
            return false;
        }
        let Some(remote) = self.remote else {
            return self.locals.contains(&a) || self.locals.contains(&b);
        };
        let other = if a == remote {
            b
        } else if b == remote {
            a
        } else {
            return false;
        };
        self.locals.is_empty() || self.locals.contains(&other)
    }
}

fn push_new<T: PartialEq>(list: &mut Vec<T>, value: T) {
    if !list.contains(&value) {
        list.push(value);
    }
}

/// The evidence that explains `anomaly`, if any. The finders are tried in order, most specific
/// first; the first that finds evidence names the cause.
pub fn explain(
    evidence: &Evidence,
    anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let scope = Scope::of(anomaly);
    let finders: &[Finder] = match anomaly.kind {
        AnomalyKind::FlowRetransmitSpike | AnomalyKind::PeerRetransmitSpike => &[
            netfilter_rule,
            paws,
            rp_filter,
            asymmetric_route,
            sysctl_change,
            other_drops,
        ],
        AnomalyKind::ConnectTrouble => &[
            netfilter_rule,
            listen_queue,
            asymmetric_route,
            paws,
            rp_filter,
            sysctl_change,
            other_drops,
        ],
        AnomalyKind::HandshakesNotCompleting => &[
            asymmetric_route,
            netfilter_rule,
            listen_queue,
            paws,
            rp_filter,
            sysctl_change,
            other_drops,
        ],
        AnomalyKind::ListenOverflow | AnomalyKind::SynQueueDrops => &[listen_queue],
        AnomalyKind::NetfilterDrops => &[netfilter_rule],
        AnomalyKind::ResetStorm => &[no_listener, resets, sysctl_change],
        AnomalyKind::FailedConnects => &[
            no_listener,
            resets,
            netfilter_rule,
            listen_queue,
            asymmetric_route,
            sysctl_change,
        ],
        AnomalyKind::StaleConnections => &[stale_process],
        AnomalyKind::PacketDrops => &[netfilter_rule, paws, rp_filter, no_listener, other_drops],
    };
    finders
        .iter()
        .find_map(|find| find(evidence, &scope, anomaly, around))
}

type Finder = fn(&Evidence, &Scope, &AnomalySnapshot, &dyn Surroundings) -> Option<Cause>;

/// Drop tallies about the scope since it counts, with reasons `reason` accepts.
fn drops_of<'a>(
    evidence: &'a Evidence,
    scope: &'a Scope,
    reason: impl Fn(&str) -> bool + 'a,
) -> impl Iterator<Item = (&'a super::evidence::DropKey, &'a DropTally)> + 'a {
    evidence.drops.iter().filter(move |(key, tally)| {
        tally.last_ns >= scope.since_ns
            && reason(&key.reason)
            && scope.involves(key.netns, key.local, key.remote)
    })
}

/// Sums tallies per namespace and returns the namespace with the most, its count and SYNs.
fn busiest_netns<'a>(
    tallies: impl Iterator<Item = (&'a super::evidence::DropKey, &'a DropTally)>,
) -> Option<(u32, u64, u64)> {
    let mut per_netns: Vec<(u32, u64, u64)> = Vec::new();
    for (key, tally) in tallies {
        match per_netns.iter_mut().find(|(n, _, _)| *n == key.netns) {
            Some(entry) => {
                entry.1 += tally.count;
                entry.2 += tally.syns;
            }
            None => per_netns.push((key.netns, tally.count, tally.syns)),
        }
    }
    per_netns.into_iter().max_by_key(|(_, count, _)| *count)
}

fn between(scope: &Scope) -> String {
    let remote = scope
        .remote
        .map(|r| endpoint(r, single_port(&scope.remote_ports)));
    let local = match scope.locals.as_slice() {
        [one] => Some(one.to_string()),
        _ => None,
    };
    match (local, remote) {
        (Some(l), Some(r)) => format!("{l} and {r}"),
        (None, Some(r)) => r,
        (Some(l), None) => l,
        (None, None) => "this namespace".to_owned(),
    }
}

fn netfilter_rule(
    evidence: &Evidence,
    scope: &Scope,
    anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    // A rule's own anomaly: the rule is the cause; the evidence lists who it dropped.
    if let RowKey::Rule(rule) = &anomaly.key {
        let dropped: Vec<_> = evidence
            .drops
            .iter()
            .filter(|(k, t)| {
                k.netns == rule.netns && k.reason == "NETFILTER_DROP" && t.last_ns >= scope.since_ns
            })
            .map(|(k, t)| json!({"local": k.local, "remote": k.remote, "packets": t.count}))
            .take(5)
            .collect();
        let label = netns_label(rule.netns, around);
        let text = evidence
            .rules
            .iter()
            .find(|(id, _)| {
                id.netns == rule.netns
                    && id.handle == rule.handle
                    && *id.chain == *rule.chain
                    && *id.table == *rule.table
            })
            .map(|(_, t)| t.rule.clone())
            .unwrap_or_default();
        return Some(Cause {
            kind: CauseKind::NetfilterRule,
            summary: format!(
                "firewall rule `{text}` ({} {} {}, handle {}) in {label} dropped {} packets",
                rule.family, rule.table, rule.chain, rule.handle, anomaly.lifetime_count
            ),
            evidence: json!({
                "netns": rule.netns, "family": &*rule.family, "table": &*rule.table,
                "chain": &*rule.chain, "handle": rule.handle, "rule": text,
                "packets": anomaly.lifetime_count, "dropped": dropped,
            }),
        });
    }
    let (netns, dropped, syns) =
        busiest_netns(drops_of(evidence, scope, |r| r == "NETFILTER_DROP"))?;
    let label = netns_label(netns, around);
    let rule = evidence
        .rules
        .iter()
        .filter(|(id, t)| id.netns == netns && t.last_ns >= scope.since_ns)
        .max_by_key(|(_, t)| (t.exact, t.packets));
    let what = if syns == dropped {
        format!("{dropped} SYNs")
    } else {
        format!("{dropped} packets ({syns} SYNs)")
    };
    let Some((id, tally)) = rule else {
        return Some(Cause {
            kind: CauseKind::NetfilterRule,
            summary: format!(
                "a firewall rule in {label} dropped {what} between {} (rule not identified yet)",
                between(scope)
            ),
            evidence: json!({
                "netns": netns, "rule": null, "dropped": dropped, "syns_dropped": syns,
                "symptom_count": scope.symptom_count,
            }),
        });
    };
    Some(Cause {
        kind: CauseKind::NetfilterRule,
        summary: format!(
            "firewall rule `{}` ({} {} {}, handle {}) in {label} dropped {what} between {}",
            tally.rule,
            id.family,
            id.table,
            id.chain,
            id.handle,
            between(scope)
        ),
        evidence: json!({
            "netns": netns, "family": id.family, "table": id.table, "chain": id.chain,
            "handle": id.handle, "rule": tally.rule, "exact": tally.exact,
            "rule_packets": tally.packets, "dropped": dropped, "syns_dropped": syns,
            "symptom_count": scope.symptom_count,
        }),
    })
}

/// The listener the scope's connections go to (client side: the remote address and port) or
/// come from (server side: a local listener), or the anomaly's own.
fn listener_of<'a>(
    evidence: &'a Evidence,
    scope: &Scope,
    anomaly: &AnomalySnapshot,
) -> Option<(&'a ListenerId, &'a ListenerTally)> {
    let recent = |t: &ListenerTally| t.last_ns >= scope.since_ns;
    let candidates = evidence.listeners.iter().filter(|(id, t)| {
        if !recent(t) {
            return false;
        }
        match &anomaly.key {
            RowKey::Listener(l) => id.netns == l.netns && id.addr == l.addr && id.port == l.port,
            _ => {
                let toward_remote = scope.remote.is_some_and(|remote| {
                    (id.addr == remote
                        || id.addr.is_unspecified()
                            && evidence.netns_of_address(remote) == Some(id.netns))
                        && (scope.remote_ports.is_empty() || scope.remote_ports.contains(&id.port))
                });
                let local = id.netns == scope.netns && scope.local_ports.contains(&id.port);
                toward_remote || local
            }
        }
    });
    candidates.max_by_key(|(_, t)| t.accept_queue_overflows + t.syn_queue_drops)
}

fn listen_queue(
    evidence: &Evidence,
    scope: &Scope,
    anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let (id, t) = listener_of(evidence, scope, anomaly)?;
    if t.accept_queue_overflows + t.syn_queue_drops == 0 {
        return None;
    }
    let sysctl = |name: &str| around.sysctl(id.netns, name);
    let somaxconn = sysctl("net.core.somaxconn");
    let max_syn_backlog = sysctl("net.ipv4.tcp_max_syn_backlog");
    let syncookies = sysctl("net.ipv4.tcp_syncookies");
    let label = netns_label(id.netns, around);
    let listener = endpoint(id.addr, Some(id.port));
    let (kind, summary) = if t.accept_queue_overflows >= t.syn_queue_drops {
        (
            CauseKind::AcceptQueueOverflow,
            format!(
                "listener {listener} in {label} dropped {} connections: its accept queue is full \
                 ({} of backlog {}, net.core.somaxconn {}): the process does not accept fast enough",
                t.accept_queue_overflows,
                t.accept_queue,
                t.backlog_limit,
                somaxconn.as_deref().unwrap_or("?")
            ),
        )
    } else {
        (
            CauseKind::SynQueueLimit,
            format!(
                "listener {listener} in {label} dropped {} SYNs: its SYN queue is full ({} \
                 requests, net.ipv4.tcp_max_syn_backlog {}, net.ipv4.tcp_syncookies {})",
                t.syn_queue_drops,
                t.syn_queue,
                max_syn_backlog.as_deref().unwrap_or("?"),
                syncookies.as_deref().unwrap_or("?")
            ),
        )
    };
    Some(Cause {
        kind,
        summary,
        evidence: json!({
            "netns": id.netns, "addr": id.addr, "port": id.port,
            "accept_queue_overflows": t.accept_queue_overflows,
            "syn_queue_drops": t.syn_queue_drops, "backlog_limit": t.backlog_limit,
            "accept_queue": t.accept_queue, "syn_queue": t.syn_queue,
            "somaxconn": somaxconn, "tcp_max_syn_backlog": max_syn_backlog,
            "tcp_syncookies": syncookies, "symptom_count": scope.symptom_count,
        }),
    })
}

fn asymmetric_route(
    evidence: &Evidence,
    scope: &Scope,
    _anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let (_, seen) = evidence
        .routes
        .iter()
        .filter(|(_, s)| s.last_ns >= scope.since_ns)
        .find(|((netns, peer, local), _)| scope.involves(*netns, *local, *peer))?;
    let r = &seen.value;
    let netns = u32::try_from(r.netns).unwrap_or(0);
    let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    let rp = r
        .rp_filter_in
        .map(|v| format!(", rp_filter {v} on {}", r.in_ifname))
        .unwrap_or_default();
    Some(Cause {
        kind: CauseKind::AsymmetricRoute,
        summary: format!(
            "replies from {} to {} in {} leave by {}{via} while its packets arrive on {}{rp}",
            r.local_addr,
            r.peer,
            netns_label(netns, around),
            r.out_ifname,
            r.in_ifname
        ),
        evidence: json!({
            "netns": r.netns, "peer": r.peer, "local_addr": r.local_addr,
            "in_ifname": r.in_ifname, "in_ifindex": r.in_ifindex,
            "out_ifname": r.out_ifname, "out_ifindex": r.out_ifindex,
            "gateway": r.gateway, "table": r.table,
            "rp_filter_in": r.rp_filter_in, "rp_filter_out": r.rp_filter_out,
            "symptom_count": scope.symptom_count,
        }),
    })
}

fn sysctl_change(
    evidence: &Evidence,
    scope: &Scope,
    anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let peer_netns = scope.remote.and_then(|r| {
        evidence
            .netns_of_address(r)
            .or_else(|| around.netns_of_address(r))
    });
    let earliest = anomaly.first_seen_ns.saturating_sub(SYSCTL_LOOKBACK_NS);
    let change = evidence.sysctl_changes.iter().rev().find(|c| {
        (c.netns == scope.netns || Some(c.netns) == peer_netns)
            && c.at_ns >= earliest
            && c.at_ns <= anomaly.last_seen_ns
            && signals_affected_by(&c.name)
                .iter()
                .any(|s| anomaly.signals.contains(s))
    })?;
    let rates = around.rates_around(anomaly.signals, change.at_ns);
    let effect: Vec<String> = rates
        .iter()
        .filter_map(|(signal, r)| {
            Some(format!(
                "{signal} {:.0} -> {:.0} per minute",
                r.before_per_min?, r.after_per_min?
            ))
        })
        .collect();
    let effect = if effect.is_empty() {
        String::new()
    } else {
        format!("; host-wide {}", effect.join(", "))
    };
    let secs_before = anomaly.first_seen_ns.saturating_sub(change.at_ns) / 1_000_000_000;
    Some(Cause {
        kind: CauseKind::SysctlChange,
        summary: format!(
            "{} changed {} -> {} in {} at {}, {secs_before} s before the first symptom{effect}",
            change.name,
            change.old,
            change.new,
            netns_label(change.netns, around),
            change.time
        ),
        evidence: json!({
            "netns": change.netns, "name": change.name, "old": change.old, "new": change.new,
            "changed_at": change.time, "seconds_before_first_symptom": secs_before,
            "rates_per_min": rates, "symptom_count": scope.symptom_count,
        }),
    })
}

/// A cause from drops of the scope with one family of reasons.
fn drops_cause(
    evidence: &Evidence,
    scope: &Scope,
    around: &dyn Surroundings,
    kind: CauseKind,
    reason: impl Fn(&str) -> bool,
    say: impl Fn(&str, u64, &str) -> String,
) -> Option<Cause> {
    let matching: Vec<_> = drops_of(evidence, scope, reason).collect();
    let (netns, count, syns) = busiest_netns(matching.iter().copied())?;
    let (top_key, top) = matching
        .iter()
        .filter(|(k, _)| k.netns == netns)
        .max_by_key(|(_, t)| t.count)?;
    let label = netns_label(netns, around);
    let mut extra = json!({});
    if kind == CauseKind::Paws {
        let counters: serde_json::Map<String, serde_json::Value> = around
            .counters_60s(netns)
            .into_iter()
            .filter(|(name, _)| name.contains("PAWS"))
            .map(|(name, v)| (name, v.into()))
            .collect();
        extra = json!({ "paws_counters_60s": counters });
    }
    Some(Cause {
        kind,
        summary: say(&top_key.reason, count, &label),
        evidence: json!({
            "netns": netns, "reason": top_key.reason, "dropped": count, "syns_dropped": syns,
            "local": top_key.local, "remote": top_key.remote,
            "local_ports": top.local_ports, "location": top.location, "ifindex": top.ifindex,
            "symptom_count": scope.symptom_count, "extra": extra,
        }),
    })
}

fn paws(
    evidence: &Evidence,
    scope: &Scope,
    _anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let with = between(scope);
    drops_cause(
        evidence,
        scope,
        around,
        CauseKind::Paws,
        |r| r.contains("PAWS"),
        |reason, count, label| {
            format!(
                "{count} packets between {with} dropped in {label} by PAWS ({reason}): the peer's \
                 TCP timestamps went backwards (clients behind one NAT address, or a peer that \
                 changed net.ipv4.tcp_timestamps)"
            )
        },
    )
}

fn rp_filter(
    evidence: &Evidence,
    scope: &Scope,
    _anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let with = between(scope);
    drops_cause(
        evidence,
        scope,
        around,
        CauseKind::RpFilter,
        |r| r == "IP_RPFILTER",
        |_, count, label| {
            format!(
                "{count} packets between {with} dropped in {label} by the reverse-path filter \
                 (rp_filter): the route back to the sender leaves by another interface"
            )
        },
    )
}

fn other_drops(
    evidence: &Evidence,
    scope: &Scope,
    _anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let with = between(scope);
    drops_cause(
        evidence,
        scope,
        around,
        CauseKind::PacketDrops,
        // Closes free queued packets with these reasons: not loss.
        |r| !matches!(r, "NOT_SPECIFIED" | "QUEUE_PURGE"),
        |reason, count, label| {
            format!("the kernel in {label} dropped {count} packets between {with}: {reason}")
        },
    )
}

fn no_listener(
    evidence: &Evidence,
    scope: &Scope,
    _anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    // The reset sender's side has the closed port; the drop of the SYN says the same.
    let resets = evidence
        .resets
        .iter()
        .filter(|(k, t)| {
            k.reason == "NO_SOCKET"
                && t.last_ns >= scope.since_ns
                && scope.involves(k.netns, k.local, k.remote)
        })
        .max_by_key(|(_, t)| t.count);
    if let Some((key, tally)) = resets {
        let port = single_port(&tally.local_ports);
        return Some(Cause {
            kind: CauseKind::NoListener,
            summary: format!(
                "nothing listens on {} in {}: {} connection attempts from {} were answered with \
                 a reset (NO_SOCKET)",
                endpoint(key.local, port),
                netns_label(key.netns, around),
                tally.count,
                key.remote
            ),
            evidence: json!({
                "netns": key.netns, "addr": key.local, "ports": tally.local_ports,
                "from": key.remote, "resets_sent": tally.count,
                "symptom_count": scope.symptom_count,
            }),
        });
    }
    let with = between(scope);
    drops_cause(
        evidence,
        scope,
        around,
        CauseKind::NoListener,
        |r| r == "NO_SOCKET",
        |_, count, label| {
            format!(
                "nothing listens for {count} packets between {with} in {label} (NO_SOCKET drops)"
            )
        },
    )
}

fn resets(
    evidence: &Evidence,
    scope: &Scope,
    _anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let (key, tally) = evidence
        .resets
        .iter()
        .filter(|(k, t)| {
            k.reason != "NO_SOCKET"
                && t.last_ns >= scope.since_ns
                && scope.involves(k.netns, k.local, k.remote)
        })
        .max_by_key(|(_, t)| t.count)?;
    let comm = tally
        .comm
        .clone()
        .or_else(|| tally.pid.and_then(|pid| around.process_name(pid)));
    let by = match tally.pid {
        Some(pid) if reset_from_process(&key.reason) || tally.comm.is_some() => {
            format!(" ({})", process(pid, comm.as_deref()))
        }
        _ => String::new(),
    };
    Some(Cause {
        kind: CauseKind::Reset,
        summary: format!(
            "{}{by} in {} sent {} resets to {} in state {}: {} ({})",
            endpoint(key.local, single_port(&tally.local_ports)),
            netns_label(key.netns, around),
            tally.count,
            key.remote,
            tally.state,
            key.reason,
            reset_meaning(&key.reason)
        ),
        evidence: json!({
            "netns": key.netns, "sender": key.local, "sender_ports": tally.local_ports,
            "to": key.remote, "reason": key.reason, "resets_sent": tally.count,
            "state": tally.state, "pid": tally.pid, "comm": comm,
            "symptom_count": scope.symptom_count,
        }),
    })
}

fn stale_process(
    evidence: &Evidence,
    scope: &Scope,
    _anomaly: &AnomalySnapshot,
    around: &dyn Surroundings,
) -> Option<Cause> {
    let (_, seen) = evidence
        .stale
        .iter()
        .filter(|((netns, _, peer, _), s)| {
            *netns == scope.netns && Some(*peer) == scope.remote && s.last_ns >= scope.since_ns
        })
        .max_by_key(|(_, s)| s.value.count)?;
    let g = &seen.value;
    let mut who = match g.pid {
        Some(pid) => process(pid, g.comm.as_deref()),
        None => "no process (the owner exited)".to_owned(),
    };
    let service = g.service.as_ref();
    if let Some(unit) = service.and_then(|s| s.unit.as_deref()) {
        who = format!("{who} of {unit}");
    } else if let Some(id) = service.and_then(|s| s.container_id.as_deref()) {
        who = format!("{who} of container {}", id.get(..12).unwrap_or(id));
    }
    let netns = u32::try_from(g.netns).unwrap_or(0);
    Some(Cause {
        kind: CauseKind::StaleProcess,
        summary: format!(
            "{who} in {} holds {} connections to {} that made no progress for up to {} s \
             ({} awaiting a reply, {} unacknowledged, {} send-blocked)",
            netns_label(netns, around),
            g.count,
            endpoint(g.peer, Some(g.peer_port)),
            g.oldest_age_secs,
            g.awaiting_reply,
            g.unacknowledged,
            g.send_blocked
        ),
        evidence: json!({
            "netns": g.netns, "pid": g.pid, "comm": g.comm, "cmdline": g.cmdline,
            "peer": g.peer, "peer_port": g.peer_port, "count": g.count,
            "awaiting_reply": g.awaiting_reply, "unacknowledged": g.unacknowledged,
            "send_blocked": g.send_blocked, "oldest_age_secs": g.oldest_age_secs,
            "bytes_waiting": g.bytes_waiting, "growing": g.growing, "service": g.service,
        }),
    })
}
