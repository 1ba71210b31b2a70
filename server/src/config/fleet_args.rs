//! Flags of the worker side and of HTTP serving, shared by `kvrouter frontend` and `kvrouter
//! router`: where workers come from (`--worker`, `--workers-file`, the admin API), how they are
//! health-checked and reached ([`FleetArgs`]), and the limits of a listener ([`ListenerArgs`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::listener::{default_max_connections, ListenerLimits};
use crate::workers::fleet::{HealthPolicy, PollSettings};
use crate::workers::spec::WorkerSpec;

/// Workers: static sources, the admin API, health checks, KV event and request limits.
#[derive(Args, Clone, Debug)]
pub struct FleetArgs {
    /// A worker's base URL (repeatable), e.g. `http://10.0.0.5:8000`; KV events then come
    /// from `--worker-kv-events` if given. For full descriptions use `--workers-file`.
    #[arg(long = "worker", value_name = "URL")]
    pub workers: Vec<String>,
    /// Workers file: JSON lines or a JSON array of worker descriptions
    /// (`url`, `kv_events_endpoint`, `replay_endpoint`, `block_size`, `dp_size`, `device`,
    /// `total_kv_blocks`, `max_num_batched_tokens`, `model`, `id`, `role`, `endpoint`).
    /// `kvrouter mocker` prints such lines.
    #[arg(long, env = "KVROUTER_WORKERS_FILE")]
    pub workers_file: Option<PathBuf>,
    /// Address of the admin API (`/v1/workers`).
    #[arg(long, env = "KVROUTER_ADMIN_HOST", default_value = "127.0.0.1")]
    pub admin_host: String,
    /// Port of the admin API; 0 = any free port; omit with `--no-admin`.
    #[arg(long, env = "KVROUTER_ADMIN_PORT", default_value_t = 8001)]
    pub admin_port: u16,
    /// Do not serve the admin API.
    #[arg(long)]
    pub no_admin: bool,
    /// Bearer token the admin API requires. Without one the admin API only starts on a
    /// loopback address.
    #[arg(long, env = "KVROUTER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Open connections the admin API accepts at most.
    #[arg(long, env = "KVROUTER_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    pub admin_max_connections: usize,
    /// Milliseconds between worker health checks.
    #[arg(long, env = "KVROUTER_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub health_interval_ms: u64,
    /// A health check not answered 2xx within this many milliseconds fails.
    #[arg(long, env = "KVROUTER_HEALTH_TIMEOUT_MS", default_value_t = 2000)]
    pub health_timeout_ms: u64,
    /// A failing worker is first suspect (no new requests, index and bookings kept); it is
    /// removed (index cleared, bookings dropped) after this many consecutive failed checks…
    #[arg(
        long,
        env = "KVROUTER_HEALTH_REMOVE_AFTER_FAILURES",
        default_value_t = 10
    )]
    pub health_remove_after_failures: u32,
    /// …or after this many seconds of being suspect, whichever comes first.
    #[arg(
        long,
        env = "KVROUTER_HEALTH_REMOVE_AFTER_SECS",
        default_value_t = 30.0
    )]
    pub health_remove_after_secs: f64,
    /// KV event messages larger than this many bytes are dropped and counted (the gap is
    /// then recovered by replay or the worker's index cleared).
    #[arg(long, env = "KVROUTER_KV_EVENT_MAX_FRAME_BYTES", default_value_t = 4 << 20)]
    pub kv_event_max_frame_bytes: usize,
    /// How TensorRT-LLM workers' KV events are polled.
    #[command(flatten)]
    pub kv_events_poll: PollArgs,
    /// Seconds to wait for a worker to answer a request's headers.
    #[arg(long, env = "KVROUTER_WORKER_TIMEOUT_SECS", default_value_t = 600.0)]
    pub worker_timeout_secs: f64,
    /// Where else workers come from: `mem` (only the sources above), `file` (registrations
    /// under `--file-kv`) or `etcd` (under `--etcd-prefix` on `ETCD_ENDPOINTS`; a build with
    /// `--features etcd`), written by `kvrouter register` and watched while running; or
    /// `kubernetes` (the ready pods of `--namespace` matching `--worker-selector`, described
    /// by their kvrouter.dev/* annotations; a build with `--features kubernetes`).
    #[arg(
        long,
        alias = "discovery",
        value_enum,
        env = "DYN_DISCOVERY_BACKEND",
        default_value = "mem"
    )]
    pub discovery_backend: DiscoveryBackend,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    /// Router replicas: the NATS event plane, snapshots, replica sync.
    #[command(flatten)]
    pub replicas: crate::replicas::ReplicaArgs,
}

/// How TensorRT-LLM workers' KV events are polled (`POST /kv_cache_events`), shared by the
/// frontend, the router and `kvrouter relay` (whichever of them consumes the events).
#[derive(Args, Clone, Debug)]
pub struct PollArgs {
    /// TensorRT-LLM workers (`engine: trtllm` without a `kv_events_endpoint`): milliseconds
    /// between two polls of their `POST /kv_cache_events` (a registration's
    /// `kv_events_poll_interval_ms` overrides it). Errors back off, doubling up to 5 s.
    #[arg(long, env = "KVROUTER_KV_EVENTS_POLL_INTERVAL_MS", default_value_t = PollSettings::INTERVAL_MS, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub kv_events_poll_interval_ms: u64,
    /// Largest `POST /kv_cache_events` answer read, bytes; a larger one is a poll error (its
    /// events are lost: the next answer's `event_id` gap clears the worker's index entries).
    #[arg(long, env = "KVROUTER_KV_EVENTS_POLL_MAX_BYTES", default_value_t = PollSettings::MAX_BYTES)]
    pub kv_events_poll_max_bytes: usize,
    /// Milliseconds one poll may take, connect to last byte.
    #[arg(long, env = "KVROUTER_KV_EVENTS_POLL_TIMEOUT_MS", default_value_t = PollSettings::TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_events_poll_timeout_ms: u64,
}

impl PollArgs {
    /// The poller's settings.
    pub fn settings(&self) -> PollSettings {
        PollSettings {
            interval: Duration::from_millis(self.kv_events_poll_interval_ms.max(1)),
            max_bytes: self.kv_events_poll_max_bytes,
            timeout: Duration::from_millis(self.kv_events_poll_timeout_ms.max(1)),
        }
    }
}

/// Dynamic discovery backends (the reference's `--discovery-backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryBackend {
    /// No dynamic discovery: `--worker`, `--workers-file` and the admin API.
    #[default]
    Mem,
    /// Registration files under `--file-kv` ([`crate::workers::discovery::file`]).
    File,
    /// Registration keys in etcd (`crate::workers::discovery::etcd`).
    Etcd,
    /// Worker pods through the Kubernetes API (`crate::workers::discovery::kubernetes`).
    Kubernetes,
}

/// Where the discovery backends keep registrations, and their timing (shared with `kvrouter
/// register`).
#[derive(Args, Clone, Debug)]
pub struct DiscoveryArgs {
    /// Root of the file backend. Default: `$TMPDIR/dynamo_store_kv`, as the reference's.
    #[arg(long, env = "DYN_FILE_KV")]
    pub file_kv: Option<PathBuf>,
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of registrations in etcd.
    #[arg(
        long,
        env = "KVROUTER_ETCD_PREFIX",
        default_value = "v1/kvrouter/instances/"
    )]
    pub etcd_prefix: String,
    /// Key prefix under which `kvrouter router` replicas register themselves in etcd.
    #[arg(
        long,
        env = "KVROUTER_ETCD_ROUTER_PREFIX",
        default_value = "v1/kvrouter/routers/"
    )]
    pub etcd_router_prefix: String,
    /// Seconds a registration lives without being renewed (its sidecar renews it every
    /// third of this; whole seconds in etcd).
    #[arg(long, env = "KVROUTER_DISCOVERY_LEASE_SECS", default_value_t = 10.0)]
    pub discovery_lease_secs: f64,
    /// File backend: milliseconds between two looks at the registrations; both backends:
    /// between two looks at the registered routers (`--prefill-router ENDPOINT`).
    #[arg(long, env = "KVROUTER_DISCOVERY_POLL_MS", default_value_t = 500)]
    pub discovery_poll_ms: u64,
    /// Kubernetes backend: label selector of the worker pods (`key=value,key!=value,key in
    /// (a,b)`, as `kubectl get pods -l`).
    #[arg(
        long,
        env = "KVROUTER_WORKER_SELECTOR",
        default_value = "kvrouter.dev/worker=true"
    )]
    pub worker_selector: String,
    /// Kubernetes backend: namespace of the worker pods. Default: the client configuration's
    /// (the service account's namespace in a pod, the kubeconfig context's outside).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubernetes backend: a kubeconfig file to use. Default: `KUBECONFIG`, then
    /// `~/.kube/config`, then the pod's service account (in a cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

impl DiscoveryArgs {
    /// The backend's settings (`None` for `mem`). Errors: a lease or poll interval that is
    /// not positive; `etcd` or `kubernetes` in a build without its feature; an empty
    /// worker selector.
    pub fn discovery(
        &self,
        backend: DiscoveryBackend,
    ) -> anyhow::Result<Option<crate::workers::discovery::Discovery>> {
        use crate::workers::discovery::{
            Discovery, EtcdDiscovery, FileDiscovery, KubernetesDiscovery,
        };
        if !(self.discovery_lease_secs > 0.0 && self.discovery_lease_secs.is_finite())
            || self.discovery_poll_ms == 0
        {
            anyhow::bail!("--discovery-lease-secs and --discovery-poll-ms must be positive");
        }
        let lease = Duration::from_secs_f64(self.discovery_lease_secs);
        Ok(match backend {
            DiscoveryBackend::Mem => None,
            DiscoveryBackend::File => Some(Discovery::File(FileDiscovery {
                root: self
                    .file_kv
                    .clone()
                    .unwrap_or_else(|| std::env::temp_dir().join("dynamo_store_kv")),
                lease,
                poll: Duration::from_millis(self.discovery_poll_ms),
            })),
            DiscoveryBackend::Etcd => {
                if !cfg!(feature = "etcd") {
                    anyhow::bail!(
                        "--discovery-backend etcd: this kvrouter was built without etcd \
                         support; build it with `--features etcd` (needs protoc)"
                    );
                }
                let dir = |p: &str| {
                    if p.ends_with('/') {
                        p.to_string()
                    } else {
                        format!("{p}/")
                    }
                };
                Some(Discovery::Etcd(EtcdDiscovery {
                    endpoints: self.etcd_endpoints.clone(),
                    prefix: dir(&self.etcd_prefix),
                    router_prefix: dir(&self.etcd_router_prefix),
                    lease,
                    poll: Duration::from_millis(self.discovery_poll_ms),
                }))
            }
            DiscoveryBackend::Kubernetes => {
                if !cfg!(feature = "kubernetes") {
                    anyhow::bail!(
                        "--discovery-backend kubernetes: this kvrouter was built without \
                         Kubernetes support; build it with `--features kubernetes`"
                    );
                }
                if self.worker_selector.trim().is_empty() {
                    anyhow::bail!(
                        "--worker-selector is empty: it would take every pod of the namespace"
                    );
                }
                Some(Discovery::Kubernetes(KubernetesDiscovery {
                    namespace: self.namespace.clone().filter(|n| !n.is_empty()),
                    selector: self.worker_selector.clone(),
                    kubeconfig: self.kubeconfig.clone(),
                }))
            }
        })
    }
}

/// Limits of an API listener: connections, request heads and bodies.
#[derive(Args, Clone, Debug)]
pub struct ListenerArgs {
    /// Largest accepted request body, bytes.
    #[arg(long, env = "KVROUTER_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a request body may take to arrive once its head has; then 408.
    #[arg(long, env = "KVROUTER_HTTP_BODY_TIMEOUT_SECS", default_value_t = 60.0)]
    pub http_body_timeout_secs: f64,
    /// Seconds a connection may take to send a complete request head, counted from its
    /// accept or the end of its previous response: the header timeout and the keep-alive
    /// idle limit in one (both listeners).
    #[arg(long, env = "KVROUTER_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 75.0)]
    pub http_idle_timeout_secs: f64,
    /// Open connections the OpenAI API accepts at most; past it new ones get 503 and are
    /// closed. Default: half the descriptor limit left after a reserve of 512, 16..=32768.
    #[arg(long, env = "KVROUTER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
}

impl FleetArgs {
    /// The admin API's socket address, unless disabled. Errors: an unparsable host, or a
    /// non-loopback address without `--admin-token` (registration opens sockets and threads:
    /// it is never served open to the network).
    pub fn admin_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.no_admin {
            return Ok(None);
        }
        let a: SocketAddr = format!("{}:{}", bracket(&self.admin_host), self.admin_port).parse()?;
        if !a.ip().is_loopback() && self.admin_token.as_deref().is_none_or(str::is_empty) {
            anyhow::bail!(
                "the admin API on {a} would be open to the network: give --admin-token (or KVROUTER_ADMIN_TOKEN), bind it to 127.0.0.1, or pass --no-admin"
            );
        }
        Ok(Some(a))
    }

    /// The health policy of these flags.
    pub fn health_policy(&self) -> HealthPolicy {
        HealthPolicy {
            interval: Duration::from_millis(self.health_interval_ms.max(10)),
            timeout: Duration::from_millis(self.health_timeout_ms.max(1)),
            remove_after_failures: self.health_remove_after_failures.max(1),
            remove_after: Duration::from_secs_f64(self.health_remove_after_secs.max(0.0)),
        }
    }

    /// Limits of the admin API's listener (its idle limit is the API's, `listener`).
    pub fn admin_listener(&self, listener: &ListenerArgs) -> ListenerLimits {
        ListenerLimits {
            max_connections: self.admin_max_connections,
            idle_timeout: listener.idle_timeout(),
        }
    }

    /// How long a worker may take to answer a request's headers.
    pub fn worker_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.worker_timeout_secs)
    }

    /// Workers from `--worker` and `--workers-file`, in that order. Errors: unreadable or
    /// malformed file.
    pub fn static_workers(&self) -> anyhow::Result<Vec<WorkerSpec>> {
        let mut out = self.url_workers();
        out.extend(self.file_workers()?);
        Ok(out)
    }

    /// Workers from `--worker` (known by URL only).
    pub fn url_workers(&self) -> Vec<WorkerSpec> {
        self.workers
            .iter()
            .map(|u| WorkerSpec::from_url(u))
            .collect()
    }

    /// The dynamic discovery to run, if any. Errors: bad timing flags, or `etcd` in a build
    /// without it.
    pub fn dynamic_discovery(
        &self,
    ) -> anyhow::Result<Option<crate::workers::discovery::Discovery>> {
        self.discovery.discovery(self.discovery_backend)
    }

    /// Workers from `--workers-file`. Errors: unreadable or malformed file.
    pub fn file_workers(&self) -> anyhow::Result<Vec<WorkerSpec>> {
        let Some(p) = &self.workers_file else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading workers file {}: {e}", p.display()))?;
        WorkerSpec::parse_list(&text)
            .map_err(|e| anyhow::anyhow!("workers file {}: {e}", p.display()))
    }
}

impl ListenerArgs {
    /// Limits of the API's listener; `nofile`: the descriptor limit in force.
    pub fn limits(&self, nofile: u64) -> ListenerLimits {
        ListenerLimits {
            max_connections: self
                .max_connections
                .unwrap_or_else(|| default_max_connections(nofile)),
            idle_timeout: self.idle_timeout(),
        }
    }

    /// How long a connection may take to send a request head.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.http_idle_timeout_secs.max(0.001))
    }

    /// How long a request body may take to arrive once its head has.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.http_body_timeout_secs.max(0.001))
    }
}

/// `host` as the host part of `host:port` (IPv6 bracketed).
pub fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}
