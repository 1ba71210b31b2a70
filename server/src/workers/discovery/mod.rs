//! Dynamic discovery (`--discovery-backend`, spec §10): workers announced by a sidecar next to
//! each engine (`kvrouter register`) join a running router, and leave it when their lease
//! ends. Each backend keeps a view of the live registrations — key → a workers-file entry as
//! JSON — and hands it to [`Registrations::sync`], which registers what is new or changed and
//! deregisters what is gone (index entries and load cleared):
//!
//! * [`file`] — files under a root directory, leases by modification time (no server);
//! * [`etcd`] — keys under a prefix with etcd leases, watched (`--features etcd`);
//! * [`kubernetes`] — worker pods selected by labels, described by their `kvrouter.dev/*`
//!   annotations, watched through the Kubernetes API (`--features kubernetes`; no sidecar:
//!   a pod's key is `namespace/name` and its registration is built from the pod).
//!
//! A standalone router takes only its `--endpoint`'s registrations; the frontend takes all.
//! Standalone routers announce themselves too ([`routers`]), so that a frontend finds the
//! replicas of a router by endpoint name (file and etcd; in Kubernetes a router's replicas
//! are reached through its Service).

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod file;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod routers;

use std::collections::HashMap;
use std::sync::Arc;

use kvrouter_core::event::WorkerId;

pub use file::{announce, registration_path, FileDiscovery};

use crate::metrics::{ChangeLabels, Metrics};
use crate::workers::fleet::Fleet;
use crate::workers::spec::WorkerSpec;

/// The etcd backend's settings (used with `--features etcd`).
#[derive(Clone, Debug)]
pub struct EtcdDiscovery {
    /// `ETCD_ENDPOINTS`, e.g. `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// Key prefix of registrations, ending in `/`.
    pub prefix: String,
    /// Key prefix of routers' own registrations ([`routers`]), ending in `/`.
    pub router_prefix: String,
    /// Lease of a sidecar's registrations (whole seconds in etcd).
    pub lease: std::time::Duration,
    /// Time between two looks at the registered routers.
    pub poll: std::time::Duration,
}

/// The Kubernetes backend's settings (used with `--features kubernetes`).
#[derive(Clone, Debug)]
pub struct KubernetesDiscovery {
    /// Namespace of the worker pods (`--namespace`, `POD_NAMESPACE`); `None`: the client
    /// configuration's (the service account's in a cluster, the kubeconfig context's outside).
    pub namespace: Option<String>,
    /// Label selector of the worker pods, e.g. `kvrouter.dev/worker=true` or
    /// `app=vllm,role in (decode)`.
    pub selector: String,
    /// A kubeconfig file to use instead of the inferred configuration (`KUBECONFIG`, then
    /// `~/.kube/config`, then the in-cluster service account).
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// A configured discovery backend.
#[derive(Clone, Debug)]
pub enum Discovery {
    File(FileDiscovery),
    Etcd(EtcdDiscovery),
    Kubernetes(KubernetesDiscovery),
}

impl Discovery {
    /// Start watching for `fleet` (until the task is aborted).
    pub fn spawn_watch(
        self,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
    ) -> tokio::task::JoinHandle<()> {
        match self {
            Discovery::File(cfg) => file::spawn_watch(fleet, cfg, metrics),
            #[cfg(feature = "etcd")]
            Discovery::Etcd(cfg) => etcd::spawn_watch(fleet, cfg, metrics),
            #[cfg(not(feature = "etcd"))]
            Discovery::Etcd(_) => unreachable!("refused by the flags without the etcd feature"),
            #[cfg(feature = "kubernetes")]
            Discovery::Kubernetes(cfg) => kubernetes::spawn_watch(fleet, cfg, metrics),
            #[cfg(not(feature = "kubernetes"))]
            Discovery::Kubernetes(_) => {
                unreachable!("refused by the flags without the kubernetes feature")
            }
        }
    }

    /// Announce `specs` until `stop` resolves (`kvrouter register`), firing `ready` once they
    /// are written; returns the keys or paths written. Errors: the backend cannot be written
    /// at the start.
    pub async fn announce(
        &self,
        specs: &[WorkerSpec],
        ready: tokio::sync::oneshot::Sender<()>,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<Vec<String>> {
        match self {
            Discovery::File(cfg) => Ok(file::announce(cfg, specs, ready, stop)
                .await?
                .into_iter()
                .map(|p| p.display().to_string())
                .collect()),
            #[cfg(feature = "etcd")]
            Discovery::Etcd(cfg) => etcd::announce(cfg, specs, ready, stop).await,
            #[cfg(not(feature = "etcd"))]
            Discovery::Etcd(_) => {
                drop(ready);
                anyhow::bail!("built without etcd support")
            }
            Discovery::Kubernetes(_) => {
                drop(ready);
                anyhow::bail!(
                    "kubernetes discovery needs no sidecar: routers read the worker pods' \
                     kvrouter.dev/* annotations (README \"Deploy on Kubernetes\")"
                )
            }
        }
    }

    /// Where each spec's registration lives: a file path or an etcd key (for Kubernetes:
    /// the pod, which is not known from the spec).
    pub fn location(&self, spec: &WorkerSpec) -> String {
        match self {
            Discovery::File(cfg) => registration_path(&cfg.root, spec).display().to_string(),
            Discovery::Etcd(cfg) => format!("{}{}", cfg.prefix, registration_key(spec)),
            Discovery::Kubernetes(_) => format!("kubernetes pod of {}", spec.url),
        }
    }

    /// Whether routers can be followed by endpoint name ([`routers`]): file and etcd.
    pub fn follows_routers(&self) -> bool {
        !matches!(self, Discovery::Kubernetes(_))
    }
}

/// Largest registration read, bytes.
pub const MAX_REGISTRATION_BYTES: usize = 64 * 1024;

/// The registrations a watch acted on, by key.
#[derive(Default)]
pub struct Registrations {
    /// Key → (its content when registered or refused, the worker id if registered).
    keys: HashMap<String, (Vec<u8>, Option<WorkerId>)>,
}

impl Registrations {
    /// Bring `fleet` in step with `live` (key → registration JSON) of backend `backend`
    /// (`file`, `etcd`, `kubernetes`: a worker's source is `backend:key`): deregister the
    /// workers of keys gone or changed, then register new and changed keys' workers. A
    /// registration that does not parse or is refused is logged and counted
    /// (`discovery_rejected`) once per content and left alone; one of another endpoint is
    /// left alone.
    pub async fn sync(
        &mut self,
        backend: &str,
        fleet: &Arc<Fleet>,
        metrics: &Metrics,
        live: &HashMap<String, Vec<u8>>,
    ) {
        let count = |change| {
            metrics
                .discovery_changes
                .get_or_create(&ChangeLabels { change })
                .inc()
        };
        let gone: Vec<String> = self
            .keys
            .iter()
            .filter(|(k, (bytes, _))| live.get(*k) != Some(bytes))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some((_, Some(id))) = self.keys.remove(&key) {
                tracing::info!(id, key, "discovery: registration gone or changed");
                fleet.deregister(id).await;
                count("removed");
            }
        }
        for (key, bytes) in live {
            if self.keys.contains_key(key) {
                continue;
            }
            let id = match admit(fleet, &format!("{backend}:{key}"), bytes).await {
                Admission::Registered(id) => {
                    count("added");
                    Some(id)
                }
                Admission::OtherEndpoint => None,
                Admission::Rejected => {
                    metrics.discovery_rejected.inc();
                    None
                }
            };
            self.keys.insert(key.clone(), (bytes.clone(), id));
        }
    }
}

/// What became of one registration.
enum Admission {
    /// Its worker is registered under this id.
    Registered(WorkerId),
    /// It serves an endpoint this router does not route.
    OtherEndpoint,
    /// Too large, not a registration, or refused (logged).
    Rejected,
}

/// Register the worker of one registration (`source` names it in logs and the admin API).
async fn admit(fleet: &Arc<Fleet>, source: &str, bytes: &[u8]) -> Admission {
    if bytes.len() > MAX_REGISTRATION_BYTES {
        tracing::warn!(
            source,
            len = bytes.len(),
            "discovery: registration too large"
        );
        return Admission::Rejected;
    }
    let spec = match serde_json::from_slice::<WorkerSpec>(bytes) {
        Ok(spec) if fleet.serves(&spec) => spec,
        Ok(_) => return Admission::OtherEndpoint,
        Err(e) => {
            tracing::warn!(source, "discovery: not a worker registration: {e}");
            return Admission::Rejected;
        }
    };
    let (f, src) = (fleet.clone(), source.to_string());
    match tokio::task::spawn_blocking(move || f.register_from(spec, src)).await {
        Ok(Ok(WorkerSpec { id: Some(id), .. })) => Admission::Registered(id),
        Ok(Ok(_)) => Admission::Rejected,
        Ok(Err(e)) => {
            tracing::warn!(source, "discovery: registration refused: {e}");
            Admission::Rejected
        }
        Err(_) => Admission::Rejected,
    }
}

/// The key of a worker's registration below a root: `ns/component/endpoint/<instance>`, the
/// instance being its `id` if it has one, else a hash of its URL (so a restarted sidecar
/// replaces its own registration).
pub fn registration_key(spec: &WorkerSpec) -> String {
    let instance = match spec.id {
        Some(id) => id,
        None => xxhash_rust::xxh3::xxh3_64(spec.url.trim_end_matches('/').as_bytes()),
    };
    format!("{}/{instance:016x}", spec.endpoint().replace('.', "/"))
}

/// A registration's content: the entry, plus when its sidecar started (a field the schema
/// ignores), so that routers register a restarted sidecar's worker again even when its entry
/// is the same.
pub fn registration_bytes(spec: &WorkerSpec, started_ns: u128) -> Vec<u8> {
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    v["announced_at_ns"] = serde_json::json!(started_ns.to_string());
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Nanoseconds since the Unix epoch now.
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
