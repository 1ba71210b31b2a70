//! The fleet: registering and removing workers (registry, router and KV event subscribers
//! together), and the health loop that moves workers between healthy, suspect and removed
//! (see [`super::registry`] for what each state keeps).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvrouter_core::event::WorkerId;
use kvrouter_core::WorkerInfo;
use kvrouter_wire::subscriber::KvEventSubscriber;

use super::client::WorkerClient;
use super::registry::{Health, Registry, Worker};
use super::spec::WorkerSpec;
use super::trtllm_poller::TrtPoller;
use crate::routing::RouterState;

/// When health checks run and how many failures remove a worker.
#[derive(Clone, Copy, Debug)]
pub struct HealthPolicy {
    /// Time between the starts of two rounds of checks.
    pub interval: Duration,
    /// A check not answered 2xx within this fails.
    pub timeout: Duration,
    /// A suspect worker is removed after this many consecutive failed checks…
    pub remove_after_failures: u32,
    /// …or after being suspect this long, whichever comes first.
    pub remove_after: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            remove_after_failures: 10,
            remove_after: Duration::from_secs(30),
        }
    }
}

/// Settings of the KV event subscriber started for each rank.
#[derive(Clone, Debug, Default)]
pub struct EventSettings {
    /// Consume KV events at all (else approximate mode).
    pub enabled: bool,
    /// Live frames larger than this are dropped and counted.
    pub max_frame_bytes: usize,
    /// Subscribe to each worker's ZMQ publisher (`--event-plane zmq`); with `nats` the
    /// events come from the stream instead ([`crate::replicas::event_plane`]).
    pub zmq: bool,
    /// How TensorRT-LLM workers without a ZMQ endpoint are polled (with `zmq` only).
    pub poll: PollSettings,
}

/// How TensorRT-LLM's `POST /kv_cache_events` is polled ([`super::trtllm_poller`]).
#[derive(Clone, Copy, Debug)]
pub struct PollSettings {
    /// Between two polls, unless the registration names its own.
    pub interval: Duration,
    /// Largest answer read, bytes.
    pub max_bytes: usize,
    /// Longest one poll may take.
    pub timeout: Duration,
}

impl PollSettings {
    /// Default interval, ms (`--kv-events-poll-interval-ms`).
    pub const INTERVAL_MS: u64 = 10;
    /// Default largest answer, bytes (`--kv-events-poll-max-bytes`).
    pub const MAX_BYTES: usize = 16 << 20;
    /// Default longest poll, ms (`--kv-events-poll-timeout-ms`).
    pub const TIMEOUT_MS: u64 = 2_000;
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(Self::INTERVAL_MS),
            max_bytes: Self::MAX_BYTES,
            timeout: Duration::from_millis(Self::TIMEOUT_MS),
        }
    }
}

impl EventSettings {
    /// The settings of these flags; `enabled`: KV events are consumed (not approximate mode).
    pub fn of(args: &crate::config::FleetArgs, enabled: bool) -> Self {
        Self {
            enabled,
            max_frame_bytes: args.kv_event_max_frame_bytes,
            poll: args.kv_events_poll.settings(),
            zmq: args.replicas.event_plane == crate::replicas::EventPlane::Zmq,
        }
    }
}

/// Workers and the router's view of them.
pub struct Fleet {
    pub registry: Registry,
    pub router: Arc<RouterState>,
    client: WorkerClient,
    events: EventSettings,
    policy: HealthPolicy,
    /// Registrations one at a time: block-size admission and insertion are one step.
    registering: Mutex<()>,
    /// Only workers of this endpoint are admitted (the standalone router's `--endpoint`).
    endpoint: Option<String>,
}

/// Why a registration failed (→ 400 on the admin API, an error at startup).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RegistrationError(pub String);

impl Fleet {
    pub fn new(
        router: Arc<RouterState>,
        client: WorkerClient,
        events: EventSettings,
        policy: HealthPolicy,
    ) -> Self {
        Self {
            registry: Registry::default(),
            router,
            client,
            events,
            policy,
            registering: Mutex::new(()),
            endpoint: None,
        }
    }

    /// Admit only workers registered for `endpoint` (`namespace.component.endpoint`); others
    /// are refused.
    pub fn serving_endpoint(mut self, endpoint: String) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    /// Whether a worker of this spec belongs to this fleet's endpoint (always, without one).
    /// The endpoint it admits workers of (`None`: every endpoint).
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    pub fn serves(&self, spec: &WorkerSpec) -> bool {
        self.endpoint
            .as_deref()
            .is_none_or(|e| e == spec.endpoint())
    }

    /// The health policy in force.
    pub fn policy(&self) -> HealthPolicy {
        self.policy
    }

    /// Register a worker: validate it, admit its block size, subscribe to its KV events, add
    /// its ranks to the routing set. Nothing is started before the spec is valid and its id,
    /// URL and block size are admitted. Blocking (starts threads and sockets): call off the
    /// async runtime. Returns its spec with id and block size filled in. Its source is
    /// `static`; [`register_from`](Self::register_from) names another.
    pub fn register(&self, spec: WorkerSpec) -> Result<WorkerSpec, RegistrationError> {
        self.register_from(spec, "static".into())
    }

    /// [`register`](Self::register) a worker that came from `source` (`admin`, `file:<path>`,
    /// `etcd:<key>`; shown by the admin API).
    pub fn register_from(
        &self,
        mut spec: WorkerSpec,
        source: String,
    ) -> Result<WorkerSpec, RegistrationError> {
        spec.url = spec.url.trim_end_matches('/').to_string();
        spec.validate().map_err(RegistrationError)?;
        if !self.serves(&spec) {
            return Err(RegistrationError(format!(
                "worker {} serves endpoint {}; this router routes {}",
                spec.url,
                spec.endpoint(),
                self.endpoint.as_deref().unwrap_or_default()
            )));
        }
        let _one_at_a_time = self.registering.lock().unwrap_or_else(|e| e.into_inner());
        let block_size = self
            .router
            .admit_block_size(spec.block_size, self.registry.is_empty())
            .map_err(|e| RegistrationError(e.to_string()))?;
        spec.block_size = Some(block_size);
        let worker = self
            .registry
            .insert(spec, source)
            .map_err(RegistrationError)?;
        if self.events.enabled && self.events.zmq && worker.spec.polls_kv_events() {
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                self.registry.remove(worker.id());
                return Err(RegistrationError(
                    "polling TensorRT-LLM KV events needs the async runtime".into(),
                ));
            };
            worker.set_poller(TrtPoller::start(
                &rt,
                &worker.spec,
                block_size as u32,
                self.client.clone(),
                self.events.poll,
                self.router.event_sink(),
            ));
        } else if self.events.enabled && self.events.zmq {
            if let Err(e) = self.subscribe(&worker, block_size) {
                self.registry.remove(worker.id());
                return Err(e);
            }
        }
        self.router.add_ranks(rank_infos(&worker));
        tracing::info!(id = worker.id(), url = %worker.spec.url, "worker registered");
        Ok(worker.spec.clone())
    }

    /// Register `specs` in order (at startup), off the async threads. Errors: the first that
    /// cannot be registered, naming its URL.
    pub async fn register_all(self: &Arc<Self>, specs: Vec<WorkerSpec>) -> anyhow::Result<()> {
        for spec in specs {
            let url = spec.url.clone();
            let f = self.clone();
            tokio::task::spawn_blocking(move || f.register(spec))
                .await?
                .map_err(|e| anyhow::anyhow!("registering worker {url}: {e}"))?;
        }
        Ok(())
    }

    fn subscribe(&self, worker: &Worker, block_size: usize) -> Result<(), RegistrationError> {
        let mut subs = Vec::new();
        for cfg in worker
            .spec
            .subscriber_configs(block_size as u32, self.events.max_frame_bytes)
        {
            let rank = cfg.worker;
            match KvEventSubscriber::start(cfg, self.router.event_sink()) {
                Ok(s) => subs.push(s),
                Err(e) => {
                    for s in subs {
                        s.stop();
                    }
                    // Ranks already subscribed may have indexed blocks: clear them.
                    self.router.remove_worker(worker.id(), worker.spec.dp_size);
                    return Err(RegistrationError(format!("KV events of rank {rank}: {e}")));
                }
            }
        }
        worker.set_subscribers(subs);
        Ok(())
    }

    /// Deregister a worker: subscribers stopped, then out of the routing set with its index
    /// entries cleared (in that order, so no event of its can land after the clear).
    pub async fn deregister(self: &Arc<Self>, id: WorkerId) -> Option<WorkerSpec> {
        let w = self.registry.remove(id)?;
        let spec = w.spec.clone();
        let f = self.clone();
        let dp_size = spec.dp_size;
        let _ = tokio::task::spawn_blocking(move || {
            w.stop_subscribers();
            f.router.remove_worker(id, dp_size);
        })
        .await;
        // Its idle connections would otherwise stay open for as long as the process.
        self.client.forget(&spec.url);
        tracing::info!(id, "worker deregistered");
        Some(spec)
    }

    /// A request could not reach the worker: no new requests until a health check passes.
    /// Its index and bookings are kept (it may only be stalled).
    pub fn suspect(&self, id: WorkerId, why: &str) {
        let Some(w) = self.registry.get(id) else {
            return;
        };
        let (before, _) = w.update_health(|h| {
            if h.health == Health::Healthy {
                h.health = Health::Suspect;
                h.failures = 1;
            }
        });
        if before.health == Health::Healthy {
            tracing::warn!(
                id,
                "worker suspect, no new requests until its health check passes: {why}"
            );
            self.router.withdraw(id);
        }
    }

    /// One health-check result: see the module doc of [`super::registry`].
    fn on_check(&self, w: &Worker, ok: bool) -> Transition {
        let policy = self.policy;
        let (before, after) = w.update_health(|h| {
            if ok {
                h.health = Health::Healthy;
                h.failures = 0;
                return;
            }
            h.failures = h.failures.saturating_add(1);
            match h.health {
                Health::Healthy => h.health = Health::Suspect,
                Health::Suspect
                    if h.failures >= policy.remove_after_failures
                        || h.since.elapsed() >= policy.remove_after =>
                {
                    h.health = Health::Removed
                }
                _ => {}
            }
        });
        let id = w.id();
        match (before.health, after.health) {
            (Health::Healthy, Health::Suspect) => {
                tracing::warn!(id, url = %w.spec.url, "health check failed: worker suspect, no new requests");
                self.router.withdraw(id);
                Transition::None
            }
            (Health::Suspect, Health::Removed) => {
                tracing::warn!(id, url = %w.spec.url, failures = after.failures,
                    "worker still failing: removed from routing, its index and bookings cleared");
                Transition::Remove
            }
            (Health::Suspect, Health::Healthy) => {
                tracing::info!(id, url = %w.spec.url, "worker healthy again: back in the routing set, index kept");
                self.router.add_ranks(rank_infos(w));
                Transition::None
            }
            (Health::Removed, Health::Healthy) => {
                tracing::info!(id, url = %w.spec.url, "removed worker healthy again: re-admitted, its KV events rebuild the index");
                self.router.add_ranks(rank_infos(w));
                Transition::None
            }
            _ => Transition::None,
        }
    }

    /// Check every worker once, concurrently.
    pub async fn check_health(self: &Arc<Self>) {
        let timeout = self.policy.timeout;
        let checks = self.registry.all().into_iter().map(|w| {
            let client = self.client.clone();
            async move {
                let ok = client.health(&w.spec.url, timeout).await;
                (w, ok)
            }
        });
        for (w, ok) in futures::future::join_all(checks).await {
            if let Transition::Remove = self.on_check(&w, ok) {
                let f = self.clone();
                let (id, dp) = (w.id(), w.spec.dp_size);
                // Clearing waits for the index queue: off the async threads.
                let _ = tokio::task::spawn_blocking(move || f.router.remove_worker(id, dp)).await;
            }
        }
    }

    /// Check health every interval until the fleet is dropped; also expires lost bookings.
    pub fn spawn_health_loop(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let interval = self.policy.interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(f) = weak.upgrade() else { return };
                f.check_health().await;
                let n = f.router.expire();
                if n > 0 {
                    tracing::warn!("{n} request(s) booked longer than the expiry were freed");
                }
            }
        })
    }

    /// Stop every subscriber (shutdown).
    pub async fn shutdown(&self) {
        let all = self.registry.all();
        let _ = tokio::task::spawn_blocking(move || {
            for w in all {
                w.stop_subscribers();
            }
        })
        .await;
    }
}

enum Transition {
    None,
    Remove,
}

fn rank_infos(w: &Worker) -> Vec<WorkerInfo> {
    w.spec
        .ranks()
        .map(|worker| WorkerInfo {
            worker,
            device: w.spec.device,
            total_kv_blocks: w.spec.total_kv_blocks,
            max_num_batched_tokens: w.spec.max_num_batched_tokens,
            role: w.spec.role,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::routing::RouteInput;
    use kvrouter_core::{RouterConfig, RouterMode};

    fn fleet(policy: HealthPolicy) -> Arc<Fleet> {
        let cfg = RouterConfig {
            mode: RouterMode::Kv,
            ..Default::default()
        };
        let router = RouterState::new(cfg, Some(4), Arc::new(Metrics::new()));
        Arc::new(Fleet::new(
            router,
            WorkerClient::new(Duration::from_secs(1)),
            EventSettings::default(),
            policy,
        ))
    }

    #[test]
    fn a_failing_worker_is_suspect_with_its_bookings_then_removed() {
        let f = fleet(HealthPolicy {
            remove_after_failures: 3,
            remove_after: Duration::from_secs(3600),
            ..Default::default()
        });
        let spec = f
            .register(WorkerSpec::from_url("http://127.0.0.1:9"))
            .unwrap();
        let w = f.registry.get(spec.id.unwrap()).unwrap();
        let rank = w.spec.ranks().next().unwrap();
        let tokens: Vec<u32> = (0..40).collect();
        let booking = f
            .router
            .try_route(&RouteInput {
                tokens: &tokens,
                ..Default::default()
            })
            .unwrap();
        // One failed check: suspect — not routed, booking kept.
        assert!(matches!(f.on_check(&w, false), Transition::None));
        assert_eq!(w.health().health, Health::Suspect);
        assert!(
            f.router.ranks().is_empty(),
            "a suspect worker takes no new requests"
        );
        assert_eq!(f.router.loads([rank])[0].active_requests, 1);
        // Back before the limit: healthy, nothing lost.
        f.on_check(&w, true);
        assert_eq!(w.health().health, Health::Healthy);
        assert_eq!(f.router.ranks().len(), 1);
        assert_eq!(f.router.loads([rank])[0].active_requests, 1);
        // Three failures in a row: removed, bookings dropped.
        f.on_check(&w, false);
        f.on_check(&w, false);
        assert_eq!(w.health().health, Health::Suspect);
        assert!(matches!(f.on_check(&w, false), Transition::Remove));
        assert_eq!(w.health().health, Health::Removed);
        f.router.remove_worker(w.id(), 1);
        assert_eq!(f.router.loads([rank])[0].active_requests, 0);
        drop(booking);
        // Healthy again: re-admitted.
        f.on_check(&w, true);
        assert_eq!(w.health().health, Health::Healthy);
        assert_eq!(f.router.ranks().len(), 1);
    }

    #[test]
    fn a_suspect_worker_is_removed_after_the_time_limit() {
        let f = fleet(HealthPolicy {
            remove_after_failures: 1000,
            remove_after: Duration::from_millis(50),
            ..Default::default()
        });
        let spec = f
            .register(WorkerSpec::from_url("http://127.0.0.1:9"))
            .unwrap();
        let w = f.registry.get(spec.id.unwrap()).unwrap();
        f.on_check(&w, false);
        assert_eq!(w.health().health, Health::Suspect);
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(f.on_check(&w, false), Transition::Remove));
    }

    #[test]
    fn a_failed_request_makes_a_worker_suspect_not_forgotten() {
        let f = fleet(HealthPolicy::default());
        let spec = f
            .register(WorkerSpec::from_url("http://127.0.0.1:9"))
            .unwrap();
        let id = spec.id.unwrap();
        f.suspect(id, "connection refused");
        let w = f.registry.get(id).unwrap();
        assert_eq!(w.health().health, Health::Suspect);
        assert!(f.router.ranks().is_empty());
    }

    #[test]
    fn registrations_are_validated_before_anything_starts() {
        let f = fleet(HealthPolicy::default());
        for (spec, why) in [
            (
                r#"{"url": "http://127.0.0.1:1", "dp_size": 1024}"#,
                "dp_size",
            ),
            (r#"{"url": "file:///etc/passwd"}"#, "scheme"),
            (r#"{"url": "http://u:p@127.0.0.1:1"}"#, "credentials"),
            (r#"{"url": "http://127.0.0.1:1/v1"}"#, "path"),
            (
                r#"{"url": "http://127.0.0.1:1", "block_size": 0}"#,
                "block_size",
            ),
            (
                r#"{"url": "http://127.0.0.1:1", "kv_events_endpoint": "tcp://*:1"}"#,
                "host",
            ),
            (
                r#"{"url": "http://127.0.0.1:1", "kv_events_endpoint": "tcp://h:65535", "dp_size": 2}"#,
                "port",
            ),
            (
                r#"{"url": "http://127.0.0.1:1", "replay_endpoint": "tcp://h:2"}"#,
                "kv_events_endpoint",
            ),
        ] {
            let spec: WorkerSpec = serde_json::from_str(spec).unwrap();
            let e = f.register(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
        assert!(f.registry.is_empty());
        let a = f
            .register(WorkerSpec::from_url("http://127.0.0.1:1"))
            .unwrap();
        let mut dup = WorkerSpec::from_url("http://127.0.0.1:2");
        dup.id = a.id;
        assert!(f
            .register(dup)
            .unwrap_err()
            .to_string()
            .contains("already registered"));
    }
}
