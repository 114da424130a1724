use std::net::Ipv4Addr;

use super::*;

const NS: u64 = 4026531840;

impl ListenerTracker {
    /// An interval without listener changes or the SYN backlog rule.
    fn feed(
        &mut self,
        netns: u64,
        listeners: &[ListenerSnapshot],
        counter_delta: &BTreeMap<String, u64>,
    ) -> NamespaceListenDrops {
        self.update(
            netns,
            &Interval {
                listeners,
                changes: &[],
                counter_delta,
                syn_backlog_rule: None,
            },
        )
    }
}

fn listener(
    port: u16,
    inode: u32,
    limit: u32,
    accept: u32,
    syn: u32,
    drops: u32,
) -> ListenerSnapshot {
    ListenerSnapshot {
        netns: NS,
        family: Family::V4,
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        port,
        inode,
        backlog_limit: limit,
        accept_queue: accept,
        syn_queue: syn,
        drops,
    }
}

fn counters(overflows: u64, drops: u64, reqq: u64) -> BTreeMap<String, u64> {
    BTreeMap::from([
        (LISTEN_OVERFLOWS.to_owned(), overflows),
        (LISTEN_DROPS.to_owned(), drops),
        (REQ_Q_FULL_DROP.to_owned(), reqq),
    ])
}

#[test]
fn first_sight_is_a_baseline() {
    let mut tracker = ListenerTracker::new();
    let out = tracker.feed(NS, &[listener(80, 1, 128, 0, 0, 500)], &counters(5, 5, 0));
    assert_eq!(out.listeners.len(), 1);
    assert_eq!(out.listeners[0].total(), 0);
    assert_eq!(out.unattributed_overflows, 5);
}

#[test]
fn single_listener_split_is_exact() {
    let mut tracker = ListenerTracker::new();
    tracker.feed(NS, &[listener(80, 1, 4, 0, 0, 10)], &BTreeMap::new());
    // 7 overflows + 3 SYN-queue drops + 2 other (max_syn_backlog rule) = 12.
    let out = tracker.feed(NS, &[listener(80, 1, 4, 0, 0, 22)], &counters(7, 12, 3));
    let l = &out.listeners[0];
    assert_eq!(
        (l.accept_queue_overflows, l.syn_queue_drops, l.other_drops),
        (7, 3, 2)
    );
    assert_eq!(
        out.unattributed_overflows + out.unattributed_syn_queue_drops,
        0
    );
    // The queue state does not matter when one listener has all the drops.
    assert!(
        !tracker
            .feed(NS, &[listener(80, 1, 4, 0, 0, 22)], &BTreeMap::new())
            .listeners
            .iter()
            .any(|l| l.total() > 0)
    );
}

#[test]
fn discards_beyond_listen_drops_are_not_reported_as_drops() {
    // Measured on 6.18: 2 overflows on handshakes' final ACKs raised the listener's
    // sk_drops by 4 and ListenDrops by 2; a later interval adds 3 plain discards.
    let mut tracker = ListenerTracker::new();
    tracker.feed(NS, &[listener(80, 1, 1, 0, 0, 0)], &BTreeMap::new());
    let out = tracker.feed(NS, &[listener(80, 1, 1, 2, 0, 4)], &counters(2, 2, 0));
    let l = &out.listeners[0];
    assert_eq!(
        (l.accept_queue_overflows, l.syn_queue_drops, l.other_drops),
        (2, 0, 0)
    );
    let out = tracker.feed(NS, &[listener(80, 1, 1, 2, 0, 7)], &counters(0, 0, 0));
    assert_eq!(out.listeners[0].total(), 0);
    // Other listen drops are still reported, no more than the namespace counted.
    let out = tracker.feed(NS, &[listener(80, 1, 1, 2, 0, 12)], &counters(1, 3, 0));
    let l = &out.listeners[0];
    assert_eq!(
        (l.accept_queue_overflows, l.syn_queue_drops, l.other_drops),
        (1, 0, 2)
    );
}

#[test]
fn overflows_go_to_the_listener_with_a_full_accept_queue() {
    let mut tracker = ListenerTracker::new();
    let a = |drops, accept| listener(80, 1, 2, accept, 0, drops);
    let b = |drops, syn| listener(443, 2, 2, 0, syn, drops);
    tracker.feed(NS, &[a(0, 0), b(0, 0)], &BTreeMap::new());
    let out = tracker.feed(NS, &[a(6, 3), b(4, 2)], &counters(6, 10, 4));
    let (la, lb) = (&out.listeners[0], &out.listeners[1]);
    assert_eq!(la.key.port, 80);
    assert_eq!(
        (
            la.accept_queue_overflows,
            la.syn_queue_drops,
            la.other_drops
        ),
        (6, 0, 0)
    );
    assert_eq!(
        (
            lb.accept_queue_overflows,
            lb.syn_queue_drops,
            lb.other_drops
        ),
        (0, 4, 0)
    );
    assert_eq!((la.accept_queue, la.backlog_limit), (3, 2));
    assert_eq!(lb.syn_queue, 2);
}

#[test]
fn full_queue_at_the_start_of_the_interval_counts() {
    // The accept queue was full when the interval began and drained since.
    let mut tracker = ListenerTracker::new();
    tracker.feed(
        NS,
        &[listener(80, 1, 1, 2, 0, 0), listener(81, 2, 1, 0, 0, 0)],
        &BTreeMap::new(),
    );
    let out = tracker.feed(
        NS,
        &[listener(80, 1, 1, 0, 0, 3), listener(81, 2, 1, 0, 0, 3)],
        &counters(3, 6, 0),
    );
    assert_eq!(out.listeners[0].accept_queue_overflows, 3);
    assert_eq!(out.listeners[1].accept_queue_overflows, 0);
    assert_eq!(out.listeners[1].other_drops, 3);
}

#[test]
fn without_queue_evidence_split_is_proportional_and_adds_up() {
    let mut tracker = ListenerTracker::new();
    let ls = |a, b, c| {
        [
            listener(1, 1, 128, 0, 0, a),
            listener(2, 2, 128, 0, 0, b),
            listener(3, 3, 128, 0, 0, c),
        ]
    };
    tracker.feed(NS, &ls(0, 0, 0), &BTreeMap::new());
    // 10 drops: 5, 3, 2; 7 overflows, 3 other.
    let out = tracker.feed(NS, &ls(5, 3, 2), &counters(7, 10, 0));
    let parts: Vec<u64> = out
        .listeners
        .iter()
        .map(|l| l.accept_queue_overflows)
        .collect();
    assert_eq!(parts.iter().sum::<u64>(), 7);
    // 7 * 5/10 = 3.5, 7 * 3/10 = 2.1, 7 * 2/10 = 1.4 -> 3, 2, 1 + one for the largest
    // remainder (first listener).
    assert_eq!(parts, vec![4, 2, 1]);
    for l in &out.listeners {
        assert!(l.accept_queue_overflows <= l.total());
    }
    assert_eq!(
        out.listeners.iter().map(ListenerDrops::total).sum::<u64>(),
        10
    );
}

#[test]
fn counter_wrap_and_reopened_listener() {
    let mut tracker = ListenerTracker::new();
    tracker.feed(
        NS,
        &[listener(80, 1, 8, 0, 0, u32::MAX - 1)],
        &BTreeMap::new(),
    );
    let out = tracker.feed(NS, &[listener(80, 1, 8, 0, 0, 2)], &counters(4, 4, 0));
    assert_eq!(out.listeners[0].accept_queue_overflows, 4);
    // Same port, new socket (new inode): a new baseline, not a negative delta.
    let out = tracker.feed(NS, &[listener(80, 9, 8, 0, 0, 0)], &BTreeMap::new());
    assert_eq!(out.listeners[0].key.inode, 9);
    assert_eq!(out.listeners[0].total(), 0);
}

#[test]
fn more_counted_than_seen_is_unattributed() {
    let mut tracker = ListenerTracker::new();
    tracker.feed(NS, &[listener(80, 1, 8, 0, 0, 0)], &BTreeMap::new());
    let out = tracker.feed(NS, &[listener(80, 1, 8, 0, 0, 2)], &counters(3, 5, 2));
    let l = &out.listeners[0];
    assert_eq!((l.accept_queue_overflows, l.syn_queue_drops), (2, 0));
    assert_eq!(out.unattributed_overflows, 1);
    assert_eq!(out.unattributed_syn_queue_drops, 2);
}

#[test]
fn other_namespaces_are_separate() {
    let mut tracker = ListenerTracker::new();
    let mut other = listener(80, 1, 8, 0, 0, 0);
    other.netns = NS + 1;
    let out = tracker.feed(
        NS,
        &[listener(80, 1, 8, 0, 0, 0), other.clone()],
        &BTreeMap::new(),
    );
    assert_eq!(out.listeners.len(), 1);
    other.drops = 5;
    let out = tracker.feed(NS + 1, &[other], &counters(5, 5, 0));
    // First sight in NS+1: baseline.
    assert_eq!(out.listeners[0].total(), 0);
}

#[test]
fn proportional_rounding() {
    assert_eq!(proportional(0, &[1, 2]), vec![0, 0]);
    assert_eq!(proportional(5, &[0, 0]), vec![0, 0]);
    assert_eq!(proportional(10, &[1, 2]), vec![1, 2]);
    assert_eq!(proportional(1, &[1, 1]), vec![1, 0]);
    assert_eq!(proportional(2, &[1, 1, 1]), vec![1, 1, 0]);
    // Largest remainder: the second entry's fraction (almost 1) beats the first's.
    assert_eq!(
        proportional(u64::MAX - 1, &[u64::MAX, 1]),
        vec![u64::MAX - 2, 1]
    );
}

fn change(port: u16, inode: u32, change: Change, drops: u32, accept: u32) -> ListenerEvent {
    ListenerEvent {
        key: listener(port, inode, 1, 0, 0, 0).key(),
        change,
        drops,
        accept_queue: accept,
        backlog_limit: 1,
    }
}

fn interval<'a>(
    listeners: &'a [ListenerSnapshot],
    changes: &'a [ListenerEvent],
    counter_delta: &'a BTreeMap<String, u64>,
    syn_backlog_rule: Option<SynBacklogRule>,
) -> Interval<'a> {
    Interval {
        listeners,
        changes,
        counter_delta,
        syn_backlog_rule,
    }
}

fn split_of(l: &ListenerDrops) -> (u64, u64, u64) {
    (l.accept_queue_overflows, l.syn_queue_drops, l.other_drops)
}

#[test]
fn a_listener_closed_between_readings_is_counted_to_its_last_drop() {
    let mut tracker = ListenerTracker::new();
    tracker.feed(NS, &[listener(80, 1, 1, 0, 0, 4)], &BTreeMap::new());
    // Gone from the snapshot; the close left sk_drops = 16 (12 overflows since).
    let closed = [change(80, 1, Change::Closed, 16, 2)];
    let out = tracker.update(NS, &interval(&[], &closed, &counters(12, 12, 0), None));
    assert_eq!(out.listeners.len(), 1);
    let l = &out.listeners[0];
    assert_eq!(split_of(l), (12, 0, 0));
    assert!(l.closed);
    assert_eq!((l.accept_queue, l.backlog_limit), (2, 1));
    assert_eq!(out.unattributed_overflows, 0);
    // Nothing left of it afterwards.
    let out = tracker.feed(NS, &[], &counters(0, 0, 0));
    assert!(out.listeners.is_empty());
}

#[test]
fn a_close_after_the_snapshot_has_the_last_value() {
    let mut tracker = ListenerTracker::new();
    tracker.feed(NS, &[listener(80, 1, 1, 0, 0, 0)], &BTreeMap::new());
    // Still in this snapshot with 5, closed right after with 8.
    let closed = [change(80, 1, Change::Closed, 8, 2)];
    let out = tracker.update(
        NS,
        &interval(
            &[listener(80, 1, 1, 2, 0, 5)],
            &closed,
            &counters(8, 8, 0),
            None,
        ),
    );
    assert_eq!(split_of(&out.listeners[0]), (8, 0, 0));
    assert!(out.listeners[0].closed);
    // It is not carried on as a listener with a baseline.
    let out = tracker.feed(NS, &[], &BTreeMap::new());
    assert!(out.listeners.is_empty());
}

#[test]
fn a_listener_opened_and_closed_within_one_interval() {
    let mut tracker = ListenerTracker::new();
    tracker.feed(NS, &[], &BTreeMap::new());
    // A socket reused for listen() carried 3 drops from before.
    let changes = [
        change(81, 7, Change::Opened, 3, 0),
        change(81, 7, Change::Closed, 10, 0),
    ];
    let out = tracker.update(NS, &interval(&[], &changes, &counters(7, 7, 0), None));
    assert_eq!(split_of(&out.listeners[0]), (7, 0, 0));
}

#[test]
fn an_opened_listener_counts_from_its_start_even_in_a_namespace_seen_first() {
    let mut tracker = ListenerTracker::new();
    // The namespace is read for the first time, but the kernel saw the listener start.
    let opened = [change(80, 1, Change::Opened, 0, 0)];
    let out = tracker.update(
        NS,
        &interval(
            &[listener(80, 1, 1, 2, 0, 9)],
            &opened,
            &counters(9, 9, 0),
            None,
        ),
    );
    assert_eq!(split_of(&out.listeners[0]), (9, 0, 0));
    // A listener without a start record in that first reading is history.
    let mut tracker = ListenerTracker::new();
    let out = tracker.feed(NS, &[listener(80, 1, 1, 2, 0, 9)], &counters(9, 9, 0));
    assert_eq!(out.listeners[0].total(), 0);
}

#[test]
fn an_opened_record_seen_before_the_listener_is_kept_for_it() {
    let mut tracker = ListenerTracker::new();
    // Recorded at listen(), before the listener was hashed and dumped.
    let opened = [change(80, 1, Change::Opened, 2, 0)];
    tracker.update(NS, &interval(&[], &opened, &BTreeMap::new(), None));
    let out = tracker.feed(NS, &[listener(80, 1, 1, 2, 0, 6)], &counters(4, 4, 0));
    assert_eq!(split_of(&out.listeners[0]), (4, 0, 0));
}

#[test]
fn a_close_without_the_inode_matches_by_address() {
    let mut tracker = ListenerTracker::new();
    tracker.feed(NS, &[listener(80, 5, 1, 0, 0, 1)], &BTreeMap::new());
    let closed = [change(80, 0, Change::Closed, 4, 0)];
    let out = tracker.update(NS, &interval(&[], &closed, &counters(3, 3, 0), None));
    assert_eq!(out.listeners[0].key.inode, 5);
    assert_eq!(split_of(&out.listeners[0]), (3, 0, 0));
}

#[test]
fn a_namespace_that_appeared_counts_from_zero() {
    let mut tracker = ListenerTracker::new();
    tracker.namespace_appeared(NS);
    // Its first reading: 37 SYNs refused by the tcp_max_syn_backlog rule (queue at 13 of
    // 16, syncookies off): ListenDrops only.
    let rule = SynBacklogRule::from_sysctls(Some("0"), Some("16"));
    let out = tracker.update(
        NS,
        &interval(
            &[listener(80, 1, 128, 0, 13, 37)],
            &[],
            &counters(0, 37, 0),
            rule,
        ),
    );
    assert_eq!(split_of(&out.listeners[0]), (0, 37, 0));
}

#[test]
fn the_syn_backlog_rule_needs_its_queue_and_syncookies_off() {
    let rule = SynBacklogRule::from_sysctls(Some("0"), Some("16"));
    let run = |syn_queue: u32, rule: Option<SynBacklogRule>| {
        let mut tracker = ListenerTracker::new();
        tracker.feed(NS, &[listener(80, 1, 128, 0, 0, 0)], &BTreeMap::new());
        let out = tracker.update(
            NS,
            &interval(
                &[listener(80, 1, 128, 0, syn_queue, 5)],
                &[],
                &counters(0, 5, 0),
                rule,
            ),
        );
        split_of(&out.listeners[0])
    };
    assert_eq!(run(13, rule), (0, 5, 0));
    // The queue was not at the rule's limit: another cause.
    assert_eq!(run(12, rule), (0, 0, 5));
    // Syncookies on: the rule does not apply.
    assert_eq!(run(13, None), (0, 0, 5));
}

#[test]
fn the_syn_backlog_rule_at_the_start_of_the_interval_counts() {
    let rule = SynBacklogRule::from_sysctls(Some("0"), Some("16"));
    let mut tracker = ListenerTracker::new();
    tracker.feed(NS, &[listener(80, 1, 128, 0, 13, 0)], &BTreeMap::new());
    // Closed since, its queue gone with it.
    let closed = [change(80, 1, Change::Closed, 6, 0)];
    let out = tracker.update(NS, &interval(&[], &closed, &counters(0, 6, 0), rule));
    assert_eq!(split_of(&out.listeners[0]), (0, 6, 0));
}

#[test]
fn syn_backlog_rule_is_the_kernels_expression() {
    let rule = SynBacklogRule {
        max_syn_backlog: 16,
    };
    assert!(!rule.refuses(12));
    assert!(rule.refuses(13));
    let tiny = SynBacklogRule { max_syn_backlog: 2 };
    // 2 >> 2 == 0: refused only beyond the maximum.
    assert!(!tiny.refuses(2));
    assert!(tiny.refuses(3));
    assert_eq!(SynBacklogRule::from_sysctls(Some("1"), Some("16")), None);
    assert_eq!(SynBacklogRule::from_sysctls(Some("2"), Some("16")), None);
    assert_eq!(SynBacklogRule::from_sysctls(None, Some("16")), None);
    assert_eq!(SynBacklogRule::from_sysctls(Some("0"), Some("x")), None);
    assert_eq!(
        SynBacklogRule::from_sysctls(Some("0\n"), Some(" 128\n")),
        Some(SynBacklogRule {
            max_syn_backlog: 128
        })
    );
}

#[test]
fn kernel_changes_decode() {
    let mut key = ListenerChangeKey {
        netns: 7,
        inode: 9,
        port: 80,
        family: 2,
        change: listener_change::CLOSED,
        ..ListenerChangeKey::default()
    };
    key.addr[10] = 0xff;
    key.addr[11] = 0xff;
    key.addr[12..].copy_from_slice(&[127, 0, 0, 1]);
    let value = ListenerChange {
        time_ns: 1,
        drops: 3,
        accept_queue: 2,
        backlog_limit: 1,
        _pad: 0,
    };
    let event = ListenerEvent::from_kernel(&key, &value).expect("decodes");
    assert_eq!(event.key.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(
        (event.key.netns, event.key.inode, event.key.port),
        (7, 9, 80)
    );
    assert_eq!(
        (event.change, event.drops, event.accept_queue),
        (Change::Closed, 3, 2)
    );
    let v6 = ListenerChangeKey {
        family: 10,
        change: listener_change::OPENED,
        ..key
    };
    let event = ListenerEvent::from_kernel(&v6, &value).expect("decodes");
    assert_eq!(event.key.family, Family::V6);
    assert_eq!(event.change, Change::Opened);
    for bad in [
        ListenerChangeKey { family: 1, ..key },
        ListenerChangeKey { change: 0, ..key },
    ] {
        assert_eq!(ListenerEvent::from_kernel(&bad, &value), None);
    }
}

#[test]
fn forgetting_a_namespace_drops_its_pending_starts() {
    let mut tracker = ListenerTracker::new();
    let opened = [change(80, 1, Change::Opened, 0, 0)];
    tracker.update(NS, &interval(&[], &opened, &BTreeMap::new(), None));
    tracker.forget(NS);
    assert!(tracker.opened.is_empty());
}
