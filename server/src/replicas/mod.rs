//! Several routers over NATS (issue 18): the KV event plane as a JetStream stream per endpoint,
//! index snapshots in the object store, and replica sync of bookings over NATS core.
//!
//! Everything that talks to NATS needs the `nats` cargo feature; the flags ([`ReplicaArgs`])
//! and the names ([`Names`]) exist in every build, so a build without it refuses
//! `--event-plane nats` with a clear error instead of an unknown flag.
//!
//! Names follow the reference's JetStream design (`dynamo-router-spec.md` §10.2, §5.1): for
//! the endpoint `ns.component.endpoint`,
//! * stream `namespace-ns-component-component-kv-events` on subjects
//!   `namespace.ns.component.component.kv_events.<worker_id>`;
//! * object store bucket `namespace-ns-component-component-radix-bucket`, object `radix-state`;
//! * replica sync on `namespace.ns.component.component.active_sequences_events`.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::routing::RouterState;

#[cfg(feature = "nats")]
pub mod sync;

#[cfg(feature = "nats")]
pub mod event_plane;
#[cfg(feature = "nats")]
pub mod relay;
#[cfg(feature = "nats")]
pub mod relay_status;
#[cfg(feature = "nats")]
pub mod snapshot;
#[cfg(feature = "nats")]
pub mod stream;
#[cfg(feature = "nats")]
pub mod tracker;

/// The running NATS event plane of a router (nothing in a build without `nats`, where
/// [`ReplicaArgs::check_build`] refuses `--event-plane nats`).
#[cfg(feature = "nats")]
pub use event_plane::NatsEventPlane;
#[cfg(not(feature = "nats"))]
pub enum NatsEventPlane {}
#[cfg(not(feature = "nats"))]
impl NatsEventPlane {
    pub async fn stop(self) {
        match self {}
    }
}

/// Checks the flags and, with `--event-plane nats`, starts consuming the stream of `fleet`'s
/// endpoint (the default endpoint for a fleet of any endpoint: the frontend's) into its
/// router. Errors: NATS asked for in a build without it, a malformed NATS URL.
pub async fn start_event_plane(
    args: &ReplicaArgs,
    fleet: &std::sync::Arc<crate::workers::fleet::Fleet>,
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
) -> anyhow::Result<Option<NatsEventPlane>> {
    args.check_build()?;
    if args.event_plane != EventPlane::Nats {
        return Ok(None);
    }
    #[cfg(feature = "nats")]
    {
        let endpoint = fleet
            .endpoint()
            .unwrap_or(crate::workers::spec::DEFAULT_ENDPOINT)
            .to_string();
        let plane = NatsEventPlane::start(args, &endpoint, fleet.clone(), metrics.clone()).await?;
        Ok(Some(plane))
    }
    #[cfg(not(feature = "nats"))]
    {
        let _ = (fleet, metrics);
        unreachable!("check_build refuses nats without the feature")
    }
}

/// How KV events reach the router (the reference's `--event-plane`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EventPlane {
    /// Straight from each worker's ZMQ publisher.
    #[default]
    Zmq,
    /// From the endpoint's JetStream stream, fed by `kvrouter relay` sidecars.
    Nats,
}

/// Flags of router replicas, shared by `kvrouter frontend` and `kvrouter router`.
#[derive(Args, Clone, Debug)]
pub struct ReplicaArgs {
    /// Where KV events come from: `zmq` (each worker's publisher) or `nats` (the endpoint's
    /// JetStream stream, fed by `kvrouter relay`; a build with `--features nats`).
    #[arg(long, value_enum, env = "DYN_EVENT_PLANE", default_value = "zmq")]
    pub event_plane: EventPlane,
    /// NATS server URL (`nats://host:port`).
    #[arg(long, env = "NATS_SERVER", default_value = "nats://127.0.0.1:4222")]
    pub nats_server: String,
    /// Share this router's bookings with the other replicas of its endpoint over NATS, and
    /// count theirs in its load view.
    #[arg(long, env = "DYN_ROUTER_REPLICA_SYNC")]
    pub router_replica_sync: bool,
    /// With `--router-replica-sync`: a replica not heard from for this many seconds (each
    /// sends a heartbeat every second, or every third of this if shorter) has all its
    /// bookings freed here.
    #[arg(long, env = "KVROUTER_REPLICA_TIMEOUT_SECS", default_value_t = 5.0)]
    pub router_replica_timeout_secs: f64,
    /// With `--event-plane nats`: once the stream holds more than this many messages, one
    /// replica snapshots its index to the object store and purges what the snapshot covers.
    #[arg(long, env = "DYN_ROUTER_SNAPSHOT_THRESHOLD", default_value_t = 10_000)]
    pub router_snapshot_threshold: u64,
    /// This replica's name: its durable consumer on the stream and its id in replica sync.
    /// Default: a random one per process.
    #[arg(long, env = "KVROUTER_ROUTER_ID")]
    pub router_id: Option<String>,
    /// With `--event-plane nats`: start with an empty index, deleting the endpoint's index
    /// snapshot and this replica's consumer, instead of loading the snapshot.
    #[arg(long, env = "DYN_ROUTER_RESET_STATES")]
    pub router_reset_states: bool,
}

impl Default for ReplicaArgs {
    fn default() -> Self {
        Self {
            event_plane: EventPlane::Zmq,
            nats_server: "nats://127.0.0.1:4222".into(),
            router_replica_sync: false,
            router_replica_timeout_secs: 5.0,
            router_snapshot_threshold: 10_000,
            router_id: None,
            router_reset_states: false,
        }
    }
}

impl ReplicaArgs {
    /// Whether this router needs a NATS connection at all.
    pub fn uses_nats(&self) -> bool {
        self.event_plane == EventPlane::Nats || self.router_replica_sync
    }

    /// Errors when NATS is asked for in a build without the `nats` feature.
    pub fn check_build(&self) -> anyhow::Result<()> {
        if self.uses_nats() && !cfg!(feature = "nats") {
            anyhow::bail!(
                "--event-plane nats and --router-replica-sync need a build with `--features nats`"
            );
        }
        Ok(())
    }

    /// `--router-replica-timeout-secs` as a duration. Errors: not a positive number of
    /// seconds up to a day.
    pub fn replica_timeout(&self) -> anyhow::Result<Duration> {
        let s = self.router_replica_timeout_secs;
        if !(s.is_finite() && s > 0.0 && s <= 86_400.0) {
            anyhow::bail!("--router-replica-timeout-secs must be in (0, 86400], got {s}");
        }
        Ok(Duration::from_secs_f64(s))
    }

    /// These flags with the router id fixed: the one given, or a new random one. A server
    /// resolves its flags once, so that its consumer, its sync messages and its discovery
    /// registration carry the same id.
    pub fn resolved(&self) -> Self {
        let mut r = self.clone();
        r.router_id = Some(self.router_id());
        r
    }

    /// The router id given, or a new random one (`router-<16 hex digits>`) on every call
    /// (see [`resolved`](Self::resolved)).
    pub fn router_id(&self) -> String {
        self.router_id
            .clone()
            .unwrap_or_else(|| format!("router-{:016x}", rand::random::<u64>()))
    }
}

/// Start replica sync for `router` when `--router-replica-sync` is given (the replicas of
/// `endpoint` share their bookings; [`sync`]). Returns its task, to abort on shutdown.
///
/// Errors: NATS asked for in a build without the `nats` feature
/// ([`ReplicaArgs::check_build`]); invalid sync flags.
pub async fn start_sync(
    args: &ReplicaArgs,
    endpoint: &str,
    router: &Arc<RouterState>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    args.check_build()?;
    if !args.router_replica_sync {
        return Ok(None);
    }
    #[cfg(feature = "nats")]
    return sync::start(args, endpoint, router, metrics).await.map(Some);
    #[cfg(not(feature = "nats"))]
    {
        let _ = (endpoint, router, metrics);
        anyhow::bail!("--router-replica-sync needs a build with `--features nats`")
    }
}

/// The NATS names of one endpoint's stream, snapshot bucket and sync subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// `namespace.<ns>.component.<component>`: the prefix of every subject.
    pub prefix: String,
}

impl Names {
    /// The names of `endpoint` (`ns.component.endpoint`, already validated: three parts of
    /// letters, digits, `_` and `-`). The endpoint part does not enter the names: the
    /// reference scopes these per component.
    pub fn for_endpoint(endpoint: &str) -> Self {
        let mut parts = endpoint.split('.');
        let ns = parts.next().unwrap_or("dynamo");
        let component = parts.next().unwrap_or("backend");
        Self {
            prefix: format!("namespace.{ns}.component.{component}"),
        }
    }

    /// The JetStream stream of KV events.
    pub fn stream(&self) -> String {
        slug(&format!("{}.kv_events", self.prefix))
    }

    /// The subject one worker's events are published on.
    pub fn event_subject(&self, worker_id: u64) -> String {
        format!("{}.kv_events.{worker_id}", self.prefix)
    }

    /// The subjects of the stream (every worker's).
    pub fn event_subjects(&self) -> String {
        format!("{}.kv_events.*", self.prefix)
    }

    /// The object store bucket of index snapshots.
    pub fn snapshot_bucket(&self) -> String {
        slug(&format!("{}-radix-bucket", self.prefix))
    }

    /// The object holding the newest snapshot.
    pub const SNAPSHOT_OBJECT: &'static str = "radix-state";

    /// The NATS core subject on which routers ask the relay of `worker_id` to re-publish what
    /// the worker holds (a clear and a dump, into the stream) after a gap.
    pub fn redump_subject(&self, worker_id: u64) -> String {
        format!("{}.kv_redump.{worker_id}", self.prefix)
    }

    /// The re-dump subjects of every worker (what a relay subscribes to).
    pub fn redump_subjects(&self) -> String {
        format!("{}.kv_redump.*", self.prefix)
    }

    /// The key-value bucket of the snapshot lock.
    pub fn lock_bucket(&self) -> String {
        slug(&format!("{}-radix-lock", self.prefix))
    }

    /// The NATS core subject of replica sync.
    pub fn sync_subject(&self) -> String {
        format!("{}.active_sequences_events", self.prefix)
    }
}

/// The reference's slugify for stream and bucket names: `.` and `_` become `-`.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c == '.' || c == '_' { '-' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolved_router_id_is_fixed_once() {
        let r = ReplicaArgs::default().resolved();
        assert_eq!(r.router_id(), r.router_id());
        assert_eq!(r.resolved().router_id(), r.router_id());
        let given = ReplicaArgs {
            router_id: Some("a".into()),
            ..Default::default()
        };
        assert_eq!(given.resolved().router_id(), "a");
    }

    #[test]
    fn replica_sync_flags_are_checked() {
        let sync = ReplicaArgs {
            router_replica_sync: true,
            ..Default::default()
        };
        // A build without NATS refuses the flag instead of ignoring it.
        assert_eq!(sync.check_build().is_ok(), cfg!(feature = "nats"));
        assert_eq!(sync.replica_timeout().unwrap(), Duration::from_secs(5));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            let a = ReplicaArgs {
                router_replica_timeout_secs: bad,
                ..Default::default()
            };
            assert!(a.replica_timeout().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_follow_the_reference() {
        let n = Names::for_endpoint("dynamo.prefill_pool.generate");
        assert_eq!(
            n.stream(),
            "namespace-dynamo-component-prefill-pool-kv-events"
        );
        assert_eq!(
            n.event_subject(7),
            "namespace.dynamo.component.prefill_pool.kv_events.7"
        );
        assert_eq!(
            n.snapshot_bucket(),
            "namespace-dynamo-component-prefill-pool-radix-bucket"
        );
        assert_eq!(
            n.sync_subject(),
            "namespace.dynamo.component.prefill_pool.active_sequences_events"
        );
    }
}
