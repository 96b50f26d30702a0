//! The replica control plane: replicas serving the same tenants tell each other, through a
//! fanout exchange on the broker they already use, what one worker's gate knows by itself —
//! Retry-After holds, decreases of the shared budget, and who is alive (docs/contract.md,
//! Topology; README, Scaling out).
//!
//! Each replica binds an exclusive, auto-delete queue of its own to `<amqp.exchange>.control`
//! and publishes there, best effort (no confirms: a lost signal costs at most a 429). Heartbeats
//! every `replicas.heartbeat_ms` give the membership — a replica not heard for three of them is
//! gone — and carry holds in force and learned budgets, so a replica that joins or reconnects
//! starts from them. Each gate then sends the tenant's shared budget over the live replicas.
//!
//! A replica that loses the control connection forgets its peers at once and runs on the whole
//! budget, learning from its own 429s as a lone worker does: degraded, never stalled. The others
//! stop hearing it and rebalance after three heartbeats.

pub mod wire;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ExchangeKind,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{AmqpSettings, ConfigError, ReplicasSettings, Settings, TenantName},
    contract::StateKeys,
    metrics::Metrics,
    tenant::Tenants,
    throttle::{Budget, Gate, Learned, Link, MAX_RETRY_AFTER},
};
use wire::{Envelope, HoldEntry, LearnedEntry, Msg, WireBudget};

/// Signals waiting to go out; more are dropped (the call path never waits for the broker).
const OUTBOX: usize = 1024;
/// More peers than this are not tracked (a flood of forged-but-signed ids cannot grow memory).
const MAX_PEERS: usize = 256;
/// A peer not heard for this many heartbeats is gone.
const MISSED_HEARTBEATS: u32 = 3;
const MAX_RECONNECT: Duration = Duration::from_secs(30);

/// One tenant's two gates, as the control plane addresses them.
pub struct TenantGates {
    pub name: TenantName,
    pub writes: Arc<Gate>,
    pub reads: Arc<Gate>,
}

impl TenantGates {
    fn gate(&self, budget: WireBudget) -> &Arc<Gate> {
        match budget {
            WireBudget::Writes => &self.writes,
            WireBudget::Reads => &self.reads,
        }
    }
}

/// The running control plane; [`ControlPlane::stop`] says goodbye to the others.
pub struct ControlPlane {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl ControlPlane {
    /// Links every gate to the other replicas and starts the control connection. Disabled
    /// (`replicas.enabled = false`), the gates stay on their own, as before replicas talked.
    pub fn spawn(
        amqp: &AmqpSettings,
        settings: &ReplicasSettings,
        keys: StateKeys,
        tenants: Vec<TenantGates>,
        metrics: Arc<Metrics>,
        name: &str,
    ) -> Option<ControlPlane> {
        if !settings.enabled {
            return None;
        }
        let (tx, rx) = mpsc::channel(OUTBOX);
        for tenant in &tenants {
            let link = Arc::new(TenantLink {
                tenant: tenant.name.as_str().to_owned(),
                tx: tx.clone(),
            });
            tenant.writes.link(link.clone());
            tenant.reads.link(link);
        }
        let shared = Shared {
            id: rand::random(),
            keys,
            tenants,
            metrics,
            peers: Mutex::new(HashMap::new()),
            heartbeat: Duration::from_millis(settings.heartbeat_ms),
        };
        let stop = CancellationToken::new();
        let runner = Runner {
            amqp: amqp.clone(),
            exchange: control_exchange(amqp),
            name: format!("{name}/control"),
            shared,
            outbox: rx,
            stop: stop.clone(),
        };
        let task = tokio::spawn(runner.run());
        Some(ControlPlane { stop, task })
    }

    /// [`ControlPlane::spawn`] for the worker's tenants, as `settings` configure it.
    pub fn spawn_for(
        settings: &Settings,
        tenants: &Tenants,
        metrics: &Arc<Metrics>,
        name: &str,
    ) -> Result<Option<ControlPlane>, ConfigError> {
        let gates = tenants
            .all()
            .iter()
            .map(|t| TenantGates {
                name: t.name.clone(),
                writes: t.gate.clone(),
                reads: t.read_gate.clone(),
            })
            .collect();
        let keys = settings.state_keys()?;
        let (amqp, own) = (&settings.amqp, &settings.replicas);
        Ok(Self::spawn(amqp, own, keys, gates, metrics.clone(), name))
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The control exchange: named after the request exchange, so that deployments (and tests)
/// with their own topology have their own control plane too.
pub fn control_exchange(amqp: &AmqpSettings) -> String {
    format!("{}.control", amqp.exchange)
}

/// A gate's way out: signals into the outbox, dropped when it is full.
struct TenantLink {
    tenant: String,
    tx: mpsc::Sender<Msg>,
}

impl Link for TenantLink {
    fn hold(&self, until: SystemTime) {
        let _ = self.tx.try_send(Msg::Hold {
            tenant: self.tenant.clone(),
            until_ms: wire::unix_ms(until),
        });
    }

    fn throttled(&self, budget: Budget, learned: Learned) {
        let entry = LearnedEntry::new(&self.tenant, wire_budget(budget), learned);
        let _ = self.tx.try_send(Msg::Throttled(entry));
    }
}

fn wire_budget(budget: Budget) -> WireBudget {
    match budget {
        Budget::Writes => WireBudget::Writes,
        Budget::Reads => WireBudget::Reads,
    }
}

/// What the control plane knows, apart from its connection.
struct Shared {
    id: u64,
    keys: StateKeys,
    tenants: Vec<TenantGates>,
    metrics: Arc<Metrics>,
    /// Other replicas by id, with when each was last heard.
    peers: Mutex<HashMap<u64, Instant>>,
    heartbeat: Duration,
}

impl Shared {
    fn tenant(&self, name: &str) -> Option<&TenantGates> {
        self.tenants.iter().find(|t| t.name.as_str() == name)
    }

    /// Acts on one delivery's body; anything not authentic, current and bounded is counted and
    /// dropped. `true` when it came from a replica not heard before: it learns of this one at
    /// once from a heartbeat, not up to a heartbeat later, so that shares converge at start.
    fn receive(&self, body: &[u8]) -> bool {
        let received = SystemTime::now();
        let envelope = match wire::decode(&self.keys, body, received) {
            Ok(envelope) => envelope,
            Err(why) => {
                self.metrics.replica_message_rejected(why);
                return false;
            }
        };
        if envelope.from == self.id {
            return false;
        }
        match envelope.msg {
            Msg::Leaving => {
                self.lock_peers().remove(&envelope.from);
                self.rebalance();
                return false;
            }
            Msg::Hold { tenant, until_ms } => {
                if let Some(t) = self.tenant(&tenant) {
                    self.metrics.replica_hold_received(&t.name);
                    hold(t, until_ms);
                }
            }
            Msg::Throttled(l) => {
                if let Some(t) = self.tenant(&l.tenant) {
                    t.gate(l.budget).peer_learned(l.learned(received));
                }
            }
            Msg::Heartbeat { holds, learned } => {
                for h in &holds {
                    if let Some(t) = self.tenant(&h.tenant) {
                        hold(t, h.until_ms);
                    }
                }
                for l in &learned {
                    if let Some(t) = self.tenant(&l.tenant) {
                        t.gate(l.budget).peer_learned(l.learned(received));
                    }
                }
            }
        }
        let joined = {
            let mut peers = self.lock_peers();
            let known = peers.contains_key(&envelope.from);
            if known || peers.len() < MAX_PEERS {
                peers.insert(envelope.from, Instant::now());
            }
            !known
        };
        if joined {
            self.rebalance();
        }
        joined
    }

    /// Forgets peers not heard for [`MISSED_HEARTBEATS`] and shares the budgets among the rest.
    fn expire(&self, now: Instant) {
        let horizon = self.heartbeat * MISSED_HEARTBEATS;
        let before = self.lock_peers().len();
        self.lock_peers()
            .retain(|_, seen| now.saturating_duration_since(*seen) <= horizon);
        if self.lock_peers().len() != before {
            self.rebalance();
        }
    }

    /// Cut off from the others: on our own until we hear them again.
    fn forget_peers(&self) {
        self.lock_peers().clear();
        self.rebalance();
    }

    fn rebalance(&self) {
        let (others, before) = {
            let peers = self.lock_peers();
            let before = peers.keys().filter(|id| **id < self.id).count();
            (peers.len(), before)
        };
        let live = u32::try_from(others).unwrap_or(u32::MAX).saturating_add(1);
        // Every replica orders the live ones by id alike.
        let rank = u32::try_from(before).unwrap_or(u32::MAX);
        for t in &self.tenants {
            t.writes.set_replicas(live, rank);
            t.reads.set_replicas(live, rank);
        }
        self.metrics.set_replicas_live(live);
        tracing::debug!(live, "replicas sharing the tenants' budgets");
    }

    /// What this replica knows, for the others.
    fn heartbeat(&self) -> Msg {
        let now = SystemTime::now();
        let mut holds = Vec::new();
        let mut learned = Vec::new();
        for t in &self.tenants {
            let tenant = t.name.as_str();
            if let Some(left) = t.writes.held_for() {
                holds.push(HoldEntry {
                    tenant: tenant.to_owned(),
                    until_ms: wire::unix_ms(now + left),
                });
            }
            for gate in [&t.writes, &t.reads] {
                if let Some(l) = gate.learned() {
                    learned.push(LearnedEntry::new(tenant, wire_budget(gate.budget()), l));
                }
            }
        }
        holds.truncate(wire::MAX_ENTRIES);
        learned.truncate(wire::MAX_ENTRIES);
        Msg::Heartbeat { holds, learned }
    }

    fn envelope(&self, msg: Msg) -> Vec<u8> {
        let envelope = Envelope {
            v: 1,
            from: self.id,
            sent_ms: wire::unix_ms(SystemTime::now()),
            msg,
        };
        wire::encode(&self.keys, &envelope)
    }

    fn lock_peers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        // A map of timestamps: a poisoned lock still holds a usable one.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A hold another replica was told, on both of the tenant's gates; one already over, or at
/// the end of time, changes nothing beyond the cap.
fn hold(tenant: &TenantGates, until_ms: u64) {
    let Some(until) = wire::from_unix_ms(until_ms) else {
        return;
    };
    let Ok(left) = until.duration_since(SystemTime::now()) else {
        return;
    };
    let until = Instant::now() + left.min(MAX_RETRY_AFTER);
    tenant.writes.peer_hold(until);
    tenant.reads.peer_hold(until);
}

/// The control connection's task: connect, talk until it breaks, reconnect with backoff.
struct Runner {
    amqp: AmqpSettings,
    exchange: String,
    name: String,
    shared: Shared,
    outbox: mpsc::Receiver<Msg>,
    stop: CancellationToken,
}

impl Runner {
    async fn run(mut self) {
        let mut delay = Duration::from_millis(500);
        let mut first_node = 0;
        while !self.stop.is_cancelled() {
            match crate::amqp::connect(&self.amqp, &self.name, first_node).await {
                Ok((connection, node)) => {
                    first_node = node;
                    delay = Duration::from_millis(500);
                    if let Err(e) = self.session(&connection).await {
                        tracing::warn!(error = %format!("{e:#}"), "replica control plane lost; running on this replica's own budget");
                    }
                    let _ = connection.close(200, "control plane closing".into()).await;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "replica control plane unavailable; running on this replica's own budget");
                }
            }
            self.shared.metrics.set_control_connected(false);
            self.shared.forget_peers();
            tokio::select! {
                () = self.stop.cancelled() => {}
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RECONNECT);
        }
    }

    /// Until the connection fails or the worker stops (then it says it is leaving).
    async fn session(&mut self, connection: &Connection) -> anyhow::Result<()> {
        let channel = connection.create_channel().await?;
        let exchange = self.exchange.as_str();
        let options = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let args = FieldTable::default();
        channel
            .exchange_declare(exchange.into(), ExchangeKind::Fanout, options, args)
            .await?;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare("".into(), options, FieldTable::default())
            .await?;
        let queue = queue.name().as_str().to_owned();
        let (bind, args) = (QueueBindOptions::default(), FieldTable::default());
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "".into(),
                bind,
                args,
            )
            .await?;
        let options = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                options,
                FieldTable::default(),
            )
            .await?;
        self.shared.metrics.set_control_connected(true);
        tracing::info!(exchange, "replica control plane connected");
        let mut beat = tokio::time::interval(self.shared.heartbeat);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => {
                    let _ = self.publish(&channel, Msg::Leaving).await;
                    return Ok(());
                }
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => if self.shared.receive(&delivery.data) {
                        let msg = self.shared.heartbeat();
                        self.publish(&channel, msg).await?;
                    },
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("the control consumer ended"),
                },
                Some(msg) = self.outbox.recv() => self.publish(&channel, msg).await?,
                _ = beat.tick() => {
                    self.shared.expire(Instant::now());
                    let msg = self.shared.heartbeat();
                    self.publish(&channel, msg).await?;
                }
            }
        }
    }

    async fn publish(&self, channel: &Channel, msg: Msg) -> anyhow::Result<()> {
        let body = self.shared.envelope(msg);
        let options = BasicPublishOptions::default();
        let properties = BasicProperties::default();
        channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                options,
                &body,
                properties,
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::GateConfig;

    fn shared() -> Shared {
        let gate = |budget| {
            let config = GateConfig {
                max_per_second: 0.0,
                adaptive: true,
                budget,
            };
            let metrics = Arc::new(Metrics::new());
            Gate::new(
                config,
                metrics.gate_observer(&TenantName::default_profile()),
            )
        };
        Shared {
            id: 1,
            keys: StateKeys::new(&["a replica control test key, 32+ chars"]).unwrap(),
            tenants: vec![TenantGates {
                name: TenantName::default_profile(),
                writes: gate(Budget::Writes),
                reads: gate(Budget::Reads),
            }],
            metrics: Arc::new(Metrics::new()),
            peers: Mutex::new(HashMap::new()),
            heartbeat: Duration::from_secs(1),
        }
    }

    /// `msg` as replica `from` sends it.
    fn from(shared: &Shared, from: u64, msg: Msg) -> Vec<u8> {
        let envelope = Envelope {
            v: 1,
            from,
            sent_ms: wire::unix_ms(SystemTime::now()),
            msg,
        };
        wire::encode(&shared.keys, &envelope)
    }

    fn hold_for(secs: u64) -> Msg {
        Msg::Hold {
            tenant: "default".into(),
            until_ms: wire::unix_ms(SystemTime::now() + Duration::from_secs(secs)),
        }
    }

    #[tokio::test]
    async fn a_peer_hold_holds_both_gates_and_counts_the_peer() {
        let s = shared();
        assert!(s.receive(&from(&s, 2, hold_for(5))), "a newcomer");
        let t = &s.tenants[0];
        assert!(t.writes.held_for().is_some() && t.reads.held_for().is_some());
        assert_eq!(s.lock_peers().len(), 1);
        assert!(!s.receive(&from(&s, 2, hold_for(5))), "known by now");
        s.receive(&from(&s, 2, Msg::Leaving));
        assert!(s.lock_peers().is_empty());
    }

    #[tokio::test]
    async fn its_own_unsigned_or_unknown_messages_change_nothing() {
        let s = shared();
        s.receive(&from(&s, 1, hold_for(5)));
        let mut forged = from(&s, 2, hold_for(5));
        forged[0] ^= 1;
        s.receive(&forged);
        s.receive(&from(
            &s,
            3,
            Msg::Hold {
                tenant: "nobody".into(),
                until_ms: u64::MAX,
            },
        ));
        assert_eq!(s.tenants[0].writes.held_for(), None);
        assert_eq!(s.lock_peers().len(), 1, "only the signed stranger's id");
    }

    #[tokio::test]
    async fn peers_are_bounded_and_expire() {
        let s = shared();
        for id in 2..(MAX_PEERS as u64 + 100) {
            s.receive(&from(&s, id, Msg::Leaving));
            s.receive(&from(&s, id, hold_for(0)));
        }
        assert_eq!(s.lock_peers().len(), MAX_PEERS);
        s.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(
            s.lock_peers().len(),
            MAX_PEERS,
            "heard within three heartbeats"
        );
        s.expire(Instant::now() + Duration::from_secs(10));
        assert!(s.lock_peers().is_empty());
    }
}
