//! The fleet: registering and removing workers (registry + router + KV event subscribers
//! together), passive failure detection from requests, and the health-check loop that takes
//! workers out of the routing set and brings them back.

use std::sync::Arc;
use std::time::Duration;

use kvrouter_core::event::WorkerId;
use kvrouter_core::WorkerInfo;
use kvrouter_wire::subscriber::{KvEventSubscriber, SubscriberConfig};

use crate::registry::{Registry, Worker, WorkerSpec};
use crate::routing::RouterState;
use crate::worker_client::WorkerClient;

/// Workers and the router's view of them.
pub struct Fleet {
    pub registry: Registry,
    pub router: Arc<RouterState>,
    client: WorkerClient,
    kv_events: bool,
}

/// Why a registration failed (→ 400 on the admin API, an error at startup).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RegistrationError(pub String);

impl Fleet {
    /// `kv_events`: start a subscriber per rank for workers that give an endpoint.
    pub fn new(router: Arc<RouterState>, client: WorkerClient, kv_events: bool) -> Self {
        Self {
            registry: Registry::default(),
            router,
            client,
            kv_events,
        }
    }

    /// Register a worker: validate, admit its block size, subscribe to its KV events, add its
    /// ranks to the routing set. Returns its spec with id and block size filled in.
    pub fn register(&self, mut spec: WorkerSpec) -> Result<WorkerSpec, RegistrationError> {
        spec.url = spec.url.trim_end_matches('/').to_string();
        spec.validate().map_err(RegistrationError)?;
        let block_size = self
            .router
            .admit_block_size(spec.block_size)
            .map_err(|e| RegistrationError(e.to_string()))?;
        spec.block_size = Some(block_size);
        let worker = self.registry.insert(spec).map_err(RegistrationError)?;
        if self.kv_events {
            let mut subs = Vec::new();
            for rank in worker.spec.ranks() {
                let Some(endpoint) = worker.spec.rank_endpoint(rank.dp_rank) else {
                    continue;
                };
                let cfg = SubscriberConfig {
                    worker: rank,
                    endpoint,
                    replay_endpoint: worker
                        .spec
                        .replay_endpoint
                        .as_deref()
                        .map(|e| kvrouter_wire::subscriber::dp_endpoint(e, rank.dp_rank)),
                    topic: worker.spec.kv_events_topic.clone().unwrap_or_default(),
                    block_size: block_size as u32,
                    ..Default::default()
                };
                match KvEventSubscriber::start(cfg, self.router.event_sink()) {
                    Ok(s) => subs.push(s),
                    Err(e) => {
                        for s in subs {
                            s.stop();
                        }
                        // Ranks already subscribed may have indexed blocks: clear them.
                        self.router.remove_worker(worker.id(), worker.spec.dp_size);
                        self.registry.remove(worker.id());
                        return Err(RegistrationError(format!("KV events of rank {rank}: {e}")));
                    }
                }
            }
            worker.set_subscribers(subs);
        }
        self.router.add_ranks(rank_infos(&worker));
        tracing::info!(id = worker.id(), url = %worker.spec.url, "worker registered");
        Ok(worker.spec.clone())
    }

    /// Deregister a worker: subscribers stopped, then out of the routing set with its index
    /// entries cleared (in that order, so no event of its can land after the clear).
    pub async fn deregister(&self, id: WorkerId) -> Option<WorkerSpec> {
        let w = self.registry.remove(id)?;
        let spec = w.spec.clone();
        let _ = tokio::task::spawn_blocking(move || w.stop_subscribers()).await;
        self.router.remove_worker(id, spec.dp_size);
        tracing::info!(id, "worker deregistered");
        Some(spec)
    }

    /// A request found the worker unreachable: take it out of routing now.
    pub fn mark_failed(&self, id: WorkerId, why: &str) {
        if let Some(w) = self.registry.get(id) {
            if w.set_healthy(false) {
                tracing::warn!(id, url = %w.spec.url, "worker leaves the routing set: {why}");
                self.router.remove_worker(id, w.spec.dp_size);
            }
        }
    }

    fn mark_healthy(&self, w: &Worker) {
        if !w.set_healthy(true) {
            tracing::info!(id = w.id(), url = %w.spec.url, "worker healthy again: back in the routing set");
            self.router.add_ranks(rank_infos(w));
        }
    }

    /// Check every worker once, concurrently.
    pub async fn check_health(&self, timeout: Duration) {
        let checks = self.registry.all().into_iter().map(|w| {
            let http = self.client.http().clone();
            async move {
                let ok = matches!(
                    tokio::time::timeout(timeout, http.get(format!("{}/health", w.spec.url)).send()).await,
                    Ok(Ok(r)) if r.status().is_success()
                );
                (w, ok)
            }
        });
        for (w, ok) in futures::future::join_all(checks).await {
            if ok {
                self.mark_healthy(&w);
            } else {
                self.mark_failed(w.id(), "health check failed");
            }
        }
    }

    /// Check health every `interval` until the fleet is dropped; also expires lost bookings.
    pub fn spawn_health_loop(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(f) = weak.upgrade() else { return };
                f.check_health(interval.min(Duration::from_secs(2))).await;
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

fn rank_infos(w: &Worker) -> Vec<WorkerInfo> {
    w.spec
        .ranks()
        .map(|worker| WorkerInfo {
            worker,
            device: w.spec.device,
            total_kv_blocks: w.spec.total_kv_blocks,
            max_num_batched_tokens: w.spec.max_num_batched_tokens,
        })
        .collect()
}
