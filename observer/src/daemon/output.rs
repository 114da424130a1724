//! The output stage: every record on its way out is written, fed to the anomaly engine and to
//! the explainer, and the engine's anomalies are written with their causes.
use super::*;

/// What the kernel counted beyond the exported events, per flow and signal, as fed to the
/// engine (so that readers of the stream can count the same: see `Reconciler::for_stream`).
#[derive(Debug, serde::Serialize)]
pub(super) struct ReconciledRecord {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    flows: Vec<ReconciledFlow>,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct ReconciledFlow {
    #[serde(flatten)]
    flow: Flow,
    signal: &'static str,
    amount: u64,
    /// The kernel's total for the flow and signal as of the pass: events of theirs whose
    /// `flow_count` is at most this are in `amount` (they were on their way during the pass).
    through: u64,
}

/// Records the daemon could not queue for the output (it fell behind), since the last such
/// record.
#[derive(Debug, serde::Serialize)]
pub(super) struct UndeliveredRecord {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    count: u64,
    /// Since start.
    total: u64,
}

/// A SIGHUP reload: what changed, what took effect and what needs a restart.
#[derive(Debug, serde::Serialize)]
pub(super) struct ReloadRecord {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    applied: Vec<&'static str>,
    /// Changed keys that only take effect after a restart (they are fixed in the loaded
    /// programs or buffers).
    needs_restart: Vec<&'static str>,
}

/// The output stage: everything the records are written with, and the analysis that sees
/// every record on its way out.
pub(super) struct Output<'a, W: Write> {
    pub(super) sink: JsonLines<W>,
    pub(super) clock: &'a BootClock,
    pub(super) names: &'a Names,
    pub(super) received: BTreeMap<EventKind, u64>,
    pub(super) engine: Engine,
    pub(super) reasons: ReasonCache,
    pub(super) shared: SharedContext,
    /// sysctl changes waiting for their "after" span to pass: (due boot ns, change).
    pub(super) pending_effects: Vec<(u64, u64, SysctlChangeRecord)>,
    pub(super) anomaly_records: u64,
    pub(super) reconciler: Reconciler,
    pub(super) last_reconcile_ns: u64,
    /// Asks the context worker for owners and route checks (it may block; we may not).
    pub(super) requests: std_mpsc::Sender<ContextRequest>,
    pub(super) owners: OwnerCache,
    /// Flows whose owner was asked for (bounded; cleared when full).
    pub(super) owner_requested: HashSet<Flow>,
    pub(super) counters: Arc<ReaderCounters>,
    /// `undelivered` count already reported in the stream.
    pub(super) reported_undelivered: u64,
    /// Owned handles on the kernel's exact counters, for reconciliation.
    pub(super) flow_map: Option<BpfHashMap<MapData, FlowKey, FlowCounters>>,
    pub(super) kind_stats: Option<PerCpuArray<MapData, KindStats>>,
    pub(super) metrics: Option<Arc<crate::metrics::Metrics>>,
    /// What explains anomalies, from every record on its way out.
    pub(super) evidence: Evidence,
    /// Open anomalies whose cause is not final yet (none, or a rule not named yet), by id,
    /// with what their last record said.
    pub(super) unexplained: HashMap<u64, Option<CauseKind>>,
    /// The kernel's per-peer aggregates: connections, the denominators of ratio signals.
    pub(super) services: Option<BpfHashMap<MapData, ServiceKey, ServiceStats>>,
    pub(super) connections: ConnectionDeltas,
}

/// A cause that may still change into a better one: a firewall drop whose rule the context
/// worker has not named yet.
pub(super) fn cause_is_provisional(cause: &Cause) -> bool {
    cause.kind == CauseKind::NetfilterRule && cause.evidence["rule"].is_null()
}

/// How often suppressed events are reconciled into the engine.
pub(super) const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// How long before and after a sysctl change the affected rates are compared.
pub(super) const SYSCTL_EFFECT_SPAN: Duration = Duration::from_secs(300);

impl<W: Write> Output<'_, W> {
    pub(super) fn handle(&mut self, msg: Incoming) -> Result<(), SinkError> {
        match msg {
            Incoming::Event(event) => {
                *self.received.entry(event.kind).or_default() += 1;
                // Written either way; fed to the engine unless a pass already counted it.
                if let Some(obs) =
                    analysis::observation(&event, &self.names.drop_reasons, &mut self.reasons)
                    && let Some(obs) =
                        self.reconciler
                            .admit(obs, event.counting_flow(), event.flow_count)
                {
                    self.engine.observe(event.boot_ns, obs);
                }
                self.ask_for_causes(&event);
                let mut record = EventRecord::new(&event, self.clock, self.names);
                record.owner = self.owner_of(&event.flow);
                self.evidence.note_event(event.boot_ns, &record);
                if let Some(metrics) = &self.metrics {
                    metrics.event(record.kind, record.reason.as_deref());
                    metrics.peer_event(record.daddr, record.kind);
                    if let Some(unit) = record
                        .owner
                        .as_ref()
                        .and_then(|o| o.service.as_ref()?.unit.as_deref())
                    {
                        metrics.unit_event(unit, record.kind);
                    }
                }
                self.sink.write(&record)
            }
            Incoming::Lost { cpu, count } => {
                if let Some(metrics) = &self.metrics {
                    metrics.lost(count);
                }
                self.sink.write(&LostRecord {
                    kind: "lost",
                    time: self.clock.now_rfc3339(),
                    cpu,
                    count,
                })
            }
            Incoming::Context(record) => {
                let record = *record;
                let now = BootClock::boot_now_ns();
                for obs in analysis::context_observations(&record) {
                    self.engine.observe(now, obs);
                }
                self.evidence.note_context(now, &record);
                match record {
                    ContextRecord::ListenerDrops(r) => {
                        if let Some(metrics) = &self.metrics {
                            metrics.listener_drops(
                                r.netns,
                                r.addr,
                                r.port,
                                r.accept_queue_overflows,
                                r.syn_queue_drops,
                            );
                        }
                        self.sink.write(&r)
                    }
                    ContextRecord::NetfilterDrop(r) => self.sink.write(&r),
                    ContextRecord::StaleConnections(r) => {
                        if let Some(metrics) = &self.metrics {
                            let unit = r.group.service.as_ref().and_then(|s| s.unit.as_deref());
                            metrics.stale_connections(unit, r.group.newly_stale);
                        }
                        self.sink.write(&r)
                    }
                    ContextRecord::AsymmetricRoute(r) => self.sink.write(&r),
                    ContextRecord::SysctlChange(r) => {
                        let due = now + SYSCTL_EFFECT_SPAN.as_nanos() as u64;
                        self.pending_effects.push((due, now, r.clone()));
                        self.sink.write(&r)
                    }
                }
            }
        }
    }

    /// The owner of a flow's socket, once the context worker has found it; asks for it
    /// otherwise (the first events of a flow may go out without one).
    fn owner_of(&mut self, flow: &Flow) -> Option<OwnerBrief> {
        let cached = {
            let cache = self.owners.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(flow).cloned()
        };
        match cached {
            Some(owner) => owner,
            None => {
                if self.owner_requested.len() >= 65_536 {
                    self.owner_requested.clear();
                }
                if self.owner_requested.insert(*flow) {
                    let _ = self.requests.send(ContextRequest::Owner(*flow));
                }
                None
            }
        }
    }

    /// Trouble that may come from the reply route: SYN-ACK retransmits (the client never sees
    /// our SYN-ACK) and reverse-path-filter drops.
    fn ask_for_causes(&mut self, event: &Event) {
        let check = match event.detail {
            Detail::Drop {
                reason, ifindex, ..
            } => {
                let name = self.names.drop_reasons.name(reason);
                (name == "IP_RPFILTER").then(|| (Some(ifindex).filter(|i| *i > 0), name))
            }
            _ if event.kind == EventKind::SynackRetransmit => {
                Some((None, "synack_retransmit".to_owned()))
            }
            _ => None,
        };
        if let Some((ifindex, trigger)) = check {
            let _ = self.requests.send(ContextRequest::RouteCheck {
                netns: event.flow.netns,
                peer: event.flow.daddr,
                local: event.flow.saddr,
                ifindex,
                trigger,
            });
        }
    }

    /// Once a second: anomalies open, update and close; due sysctl effects are reported.
    pub(super) fn tick(&mut self) -> Result<(), SinkError> {
        let now = BootClock::boot_now_ns();
        // Records dropped because this output fell behind: say so once it keeps up again.
        let undelivered = self.counters.undelivered.load(Ordering::Relaxed);
        if undelivered > self.reported_undelivered {
            self.sink.write(&UndeliveredRecord {
                kind: "undelivered",
                time: self.clock.now_rfc3339(),
                count: undelivered - self.reported_undelivered,
                total: undelivered,
            })?;
            if let Some(metrics) = &self.metrics {
                metrics.undelivered(undelivered - self.reported_undelivered);
            }
            self.reported_undelivered = undelivered;
        }
        self.reconcile(now, false)?;
        self.feed_connections(now);
        let events = self.engine.tick(now);
        self.write_anomalies(events)?;
        self.write_new_causes()?;
        self.evidence.expire(now);
        if let Some(metrics) = &self.metrics {
            metrics.anomalies_open(self.engine.stats().open_anomalies);
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_effects)
            .into_iter()
            .partition(|(due, _, _)| *due <= now);
        self.pending_effects = waiting;
        for (_, changed_ns, change) in due {
            self.write_effect(changed_ns, change)?;
        }
        Ok(())
    }

    /// Re-reads the configuration: the old one stays in force when the new one is invalid.
    pub(super) fn reload(&mut self, reload: Option<&mut Reload>) -> ReloadRecord {
        let mut record = ReloadRecord {
            kind: "config_reload",
            time: self.clock.now_rfc3339(),
            ok: false,
            error: None,
            applied: Vec::new(),
            needs_restart: Vec::new(),
        };
        let Some(reload) = reload else {
            record.error = Some("no configuration file in use".to_owned());
            eprintln!("observer: SIGHUP ignored: no configuration file in use");
            return record;
        };
        let new = match (reload.load)().and_then(|new| {
            let thresholds = config::thresholds(&new.thresholds)?;
            Ok((new, thresholds))
        }) {
            Ok(new) => new,
            Err(e) => {
                eprintln!(
                    "observer: configuration not reloaded, the previous one stays in force: {e}"
                );
                record.error = Some(e);
                return record;
            }
        };
        let (settings, thresholds) = new;
        for key in reload.current.changed_keys(&settings) {
            if key == "thresholds" {
                if let Err(e) = self.engine.set_thresholds(thresholds.clone()) {
                    record.error = Some(e.to_string());
                    return record;
                }
                record.applied.push(key);
            } else {
                record.needs_restart.push(key);
            }
        }
        reload.current = settings;
        record.ok = true;
        eprintln!(
            "observer: configuration reloaded (applied: {:?}; needs a restart: {:?})",
            record.applied, record.needs_restart
        );
        record
    }

    /// Feeds the engine what the kernel counted but did not export (suppressed by budgets).
    fn reconcile(&mut self, now: u64, force: bool) -> Result<(), SinkError> {
        // A pass walks the whole flow map (two syscalls per flow): under a storm that is real
        // CPU, so it runs at most every RECONCILE_EVERY (and once more at shutdown).
        if !force && now.saturating_sub(self.last_reconcile_ns) < RECONCILE_EVERY.as_nanos() as u64
        {
            return Ok(());
        }
        self.last_reconcile_ns = now;
        let Some(stats) = &self.kind_stats else {
            return Ok(());
        };
        let suppressed: u64 = (0..event_kind::COUNT as u32)
            .filter_map(|i| stats.get(&i, 0).ok())
            .flat_map(|per_cpu| per_cpu.iter().map(|s| s.suppressed).collect::<Vec<_>>())
            .sum();
        if !self.reconciler.needed(suppressed) {
            return Ok(());
        }
        let Some(map) = &self.flow_map else {
            return Ok(());
        };
        let flows: Vec<(FlowKey, FlowCounters)> = map.iter().flatten().collect();
        let mut record = ReconciledRecord {
            kind: "reconciled",
            time: self.clock.now_rfc3339(),
            flows: Vec::new(),
        };
        for reconciled in self.reconciler.pass(suppressed, flows) {
            let obs = reconciled.observation;
            if let Some(flow) = obs.flow {
                record.flows.push(ReconciledFlow {
                    flow,
                    signal: obs.signal.name(),
                    amount: obs.amount,
                    through: reconciled.through,
                });
            }
            self.engine.observe(now, obs);
        }
        if record.flows.is_empty() {
            return Ok(());
        }
        // Other views of the stream (observer top) count the same as the daemon's engine.
        self.sink.write(&record)
    }

    fn write_anomalies(&mut self, events: Vec<AnomalyEvent>) -> Result<(), SinkError> {
        let time = self.clock.now_rfc3339();
        for event in events {
            self.anomaly_records += 1;
            if let (Some(metrics), Phase::Open) = (&self.metrics, event.phase) {
                metrics.anomaly_opened(event.anomaly.kind.name());
            }
            let cause = self.explain(&event.anomaly);
            let id = event.anomaly.id;
            if event.phase == Phase::Close {
                self.unexplained.remove(&id);
            } else if cause.as_ref().is_none_or(cause_is_provisional) {
                self.unexplained.insert(id, cause.as_ref().map(|c| c.kind));
            } else {
                self.unexplained.remove(&id);
            }
            self.sink.write(&AnomalyRecord::new(
                event,
                time.clone(),
                &self.shared,
                cause,
            ))?;
        }
        Ok(())
    }

    fn explain(&self, anomaly: &crate::aggregate::AnomalySnapshot) -> Option<Cause> {
        let around = DaemonSurroundings {
            shared: &self.shared,
            engine: &self.engine,
        };
        cause::explain(&self.evidence, anomaly, &around)
    }

    /// An open anomaly whose cause was not known (or not final) when it was last written gets
    /// an `anomaly_update` as soon as evidence explains it, not at its next update interval.
    fn write_new_causes(&mut self) -> Result<(), SinkError> {
        if self.unexplained.is_empty() {
            return Ok(());
        }
        let mut updates = Vec::new();
        for anomaly in self.engine.open_anomalies() {
            let Some(said) = self.unexplained.get(&anomaly.id) else {
                continue;
            };
            let Some(cause) = self.explain(&anomaly) else {
                continue;
            };
            if *said != Some(cause.kind) || !cause_is_provisional(&cause) {
                updates.push(AnomalyEvent {
                    phase: Phase::Update,
                    anomaly,
                });
            }
        }
        self.write_anomalies(updates)
    }

    /// Feeds the engine the connections each troubled peer made since the last reading (the
    /// denominators of ratio signals). Read every second, trouble or not, so that a peer's
    /// first failure is set against the connections of the same second; the map has an entry
    /// per peer and listener, not per connection, so this costs two syscalls per service.
    fn feed_connections(&mut self, now: u64) {
        let Some(map) = &self.services else {
            return;
        };
        let readings = map
            .iter()
            .flatten()
            .filter(|(key, _)| key.role == service_role::PEER)
            .map(|(key, stats)| {
                let peer = PeerKey {
                    netns: key.netns,
                    addr: crate::decode::unmap(key.addr),
                };
                let attempts = stats.established + stats.refused + stats.timed_out;
                (peer, key.port, attempts)
            });
        for (peer, connections) in self.connections.update(now, readings) {
            if self.engine.has_peer(&peer) {
                self.engine.observe_connections(now, peer, connections);
            }
        }
    }

    fn write_effect(
        &mut self,
        changed_ns: u64,
        change: SysctlChangeRecord,
    ) -> Result<(), SinkError> {
        let span = SYSCTL_EFFECT_SPAN.as_nanos() as u64;
        let rates = analysis::signals_affected_by(&change.name)
            .iter()
            .map(|signal| {
                (
                    signal.name(),
                    self.engine.rate_before_after(*signal, changed_ns, span),
                )
            })
            .collect();
        self.sink.write(&SysctlEffectRecord {
            kind: "sysctl_effect",
            time: self.clock.now_rfc3339(),
            netns: change.netns,
            name: change.name,
            old: change.old,
            new: change.new,
            changed_at: self.clock.rfc3339(changed_ns),
            span_secs: SYSCTL_EFFECT_SPAN.as_secs(),
            rates,
        })
    }

    /// At shutdown: open anomalies close, pending sysctl comparisons are reported as far as
    /// they got.
    pub(super) fn finish(&mut self) -> Result<(), SinkError> {
        let now = BootClock::boot_now_ns();
        self.reconcile(now, true)?;
        let events = self.engine.close_all(now);
        self.write_anomalies(events)?;
        for (_, changed_ns, change) in std::mem::take(&mut self.pending_effects) {
            self.write_effect(changed_ns, change)?;
        }
        Ok(())
    }
}
