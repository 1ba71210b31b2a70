//! The Kubernetes discovery backend (`--discovery-backend kubernetes`, spec §10), with the
//! `kube` client (built with `--features kubernetes`): the worker pods are the registrations.
//! Routers list the pods of `--namespace` matching `--worker-selector`, then watch them from
//! the listed `resourceVersion`; each ready pod with an address is a worker described by its
//! `kvrouter.dev/*` annotations ([`pod`]), keyed `namespace/name` (its source in `GET
//! /v1/workers` is `kubernetes:namespace/name`). A pod that is deleted, stops being ready,
//! changes address or annotations, or restarts a container is deregistered (index entries and
//! load cleared), and registered again once it is ready with its new description.
//!
//! The watch is resumed from the last `resourceVersion` seen (events and bookmarks) when its
//! connection ends or breaks; an expired version (`410 Gone`, as an `ERROR` event or a
//! response) makes it list again, which replaces the view (a pod deleted meanwhile goes).
//! Failed calls are retried with a backoff of 0.1 s doubling to 5 s; they and watches cut
//! short (a broken connection) are counted in `discovery_watch_restarts`. The role it needs: `get`, `list` and `watch` on `pods` in the
//! namespace.

pub mod pod;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};

use super::{KubernetesDiscovery, Registrations};
use crate::metrics::Metrics;
use crate::workers::fleet::Fleet;
use pod::PodWorker;

/// Most pods kept in view; more are ignored (and logged).
const MAX_PODS: usize = 10_000;
/// Pods per list page.
const PAGE: u32 = 500;
/// Seconds the API server keeps one watch open before it ends it (kube's read timeout is
/// 295 s: below it, a quiet watch is not taken for a dead connection).
const WATCH_SECS: u32 = 290;
/// A watch that ends sooner than this was cut short.
const EARLY_END: Duration = Duration::from_secs(WATCH_SECS as u64 - 10);

/// The client and namespace of `cfg`. Errors: no kubeconfig and not in a cluster, an
/// unreadable kubeconfig, a client that cannot be built.
async fn connect(cfg: &KubernetesDiscovery) -> anyhow::Result<(kube::Client, String)> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let namespace = cfg
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((kube::Client::try_from(config)?, namespace))
}

/// Watch the worker pods and keep `fleet` in step, until the task is aborted.
pub fn spawn_watch(
    fleet: Arc<Fleet>,
    cfg: KubernetesDiscovery,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        let (client, namespace) = loop {
            match connect(&cfg).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(
                        "discovery: no Kubernetes client configuration: {e}; retrying in 5 s"
                    );
                    metrics.discovery_watch_restarts.inc();
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        tracing::info!(
            namespace,
            selector = cfg.selector,
            "discovery: watching worker pods"
        );
        let mut w = PodWatch {
            api: Api::namespaced(client, &namespace),
            selector: cfg.selector,
            fleet,
            metrics,
            known: Registrations::default(),
            live: HashMap::new(),
            invalid: HashMap::new(),
            version: None,
        };
        loop {
            let started = Instant::now();
            let (watching, step) = match w.version.clone() {
                None => (false, w.list().await),
                Some(from) => (true, w.watch(&from).await),
            };
            match step {
                // The server ended the watch at its timeout: watch on.
                Ok(()) if !watching || started.elapsed() >= EARLY_END => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                // Ended early: the connection broke (kube reports that as the end of the
                // stream) or the server went away. Resumed from the last version seen; one
                // that keeps ending at once is not hammered.
                Ok(()) => {
                    tracing::info!(
                        "discovery: pod watch ended after {:.1?}; watching again",
                        started.elapsed()
                    );
                    w.metrics.discovery_watch_restarts.inc();
                    if started.elapsed() >= Duration::from_secs(1) {
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                }
                Err(e) => {
                    if is_gone(&e) {
                        tracing::info!("discovery: pods: {e}; listing again");
                        w.version = None;
                    } else {
                        tracing::warn!("discovery: pods: {e}; retrying in {backoff:?}");
                    }
                    w.metrics.discovery_watch_restarts.inc();
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// Whether the API server said the version we asked from is too old.
fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// One namespace's worker pods in view, and what was made of them.
struct PodWatch {
    api: Api<Pod>,
    selector: String,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    known: Registrations,
    /// `namespace/name` → registration of each ready worker pod.
    live: HashMap<String, Vec<u8>>,
    /// `namespace/name` → why its annotations do not read (reported once per reason).
    invalid: HashMap<String, String>,
    /// The `resourceVersion` to watch from; `None`: list first.
    version: Option<String>,
}

impl PodWatch {
    /// List every pod (in pages), replace the view with them and sync. Errors: a failed call.
    async fn list(&mut self) -> Result<(), kube::Error> {
        let mut pods = Vec::new();
        let mut token: Option<String> = None;
        let version = loop {
            let mut lp = ListParams::default().labels(&self.selector).limit(PAGE);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = self.api.list(&lp).await?;
            pods.extend(page.items);
            token = page.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() || pods.len() >= MAX_PODS {
                break page.metadata.resource_version.unwrap_or_default();
            }
        };
        // The list replaces the view: pods deleted while not watched go.
        self.live.clear();
        let reported = std::mem::take(&mut self.invalid);
        for p in &pods {
            let key = key_of(p);
            // A reason already reported is not reported again.
            if let Some(why) = reported.get(&key) {
                self.invalid.insert(key, why.clone());
            }
            self.apply(p);
        }
        tracing::debug!(
            pods = pods.len(),
            version,
            workers = self.live.len(),
            "discovery: pods listed"
        );
        self.version = Some(version);
        self.sync().await;
        Ok(())
    }

    /// Watch from `from` until the server ends the watch (Ok) or it fails. Each event moves
    /// the version on and syncs.
    async fn watch(&mut self, from: &str) -> Result<(), kube::Error> {
        let wp = WatchParams::default()
            .labels(&self.selector)
            .timeout(WATCH_SECS);
        let mut stream = self.api.watch(&wp, from).await?.boxed();
        while let Some(event) = stream.try_next().await? {
            let pod = match event {
                WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                    self.apply(&p);
                    p
                }
                WatchEvent::Deleted(p) => {
                    let key = key_of(&p);
                    self.live.remove(&key);
                    self.invalid.remove(&key);
                    p
                }
                WatchEvent::Bookmark(b) => {
                    self.version = Some(b.metadata.resource_version);
                    continue;
                }
                WatchEvent::Error(s) => return Err(kube::Error::Api(s)),
            };
            if let Some(v) = pod.metadata.resource_version {
                self.version = Some(v);
            }
            self.sync().await;
        }
        Ok(())
    }

    /// Put `pod` in the view (or take it out): a registration if it is a ready worker; a
    /// reason reported (once) if its annotations do not read.
    fn apply(&mut self, pod: &Pod) {
        let key = key_of(pod);
        match pod::worker_of(pod) {
            PodWorker::Ready(spec, restarts) => {
                self.invalid.remove(&key);
                if self.live.len() >= MAX_PODS && !self.live.contains_key(&key) {
                    tracing::warn!(pod = key, "discovery: over {MAX_PODS} worker pods, ignored");
                    return;
                }
                let mut v = serde_json::to_value(&spec).unwrap_or_default();
                // Not read as a spec: a restarted engine's registration differs, so it is
                // registered again with an empty index.
                v["container_restarts"] = restarts.into();
                self.live
                    .insert(key, serde_json::to_vec(&v).unwrap_or_default());
            }
            PodWorker::NotReady => {
                self.invalid.remove(&key);
                self.live.remove(&key);
            }
            PodWorker::Invalid(why) => {
                self.live.remove(&key);
                if self.invalid.get(&key) != Some(&why) {
                    tracing::warn!(pod = key, "discovery: pod skipped: {why}");
                    self.metrics.discovery_rejected.inc();
                    self.invalid.insert(key, why);
                }
            }
        }
    }

    async fn sync(&mut self) {
        self.known
            .sync("kubernetes", &self.fleet, &self.metrics, &self.live)
            .await;
    }
}

/// A pod's key: `namespace/name`.
fn key_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}
