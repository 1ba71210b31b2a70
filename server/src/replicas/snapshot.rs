//! Index snapshots in the NATS object store (`dynamo-router-spec.md` §10.2), so that the
//! event stream stays short and a starting replica does not replay it from the beginning.
//!
//! Every ~1 s (±100 ms) each replica reads the stream's state (and sets its lag gauge). When
//! the stream holds more than `--router-snapshot-threshold` messages, the replica that gets
//! the lock — the key `snapshot` of the key-value bucket [`Names::lock_bucket`], created only
//! if absent, expiring after [`LOCK_TTL`] should its holder die — asks its consumer for a
//! [`Snapshot`] (consistent: taken between two messages, after the index applied everything
//! handed to it), uploads it as [`Names::SNAPSHOT_OBJECT`] of [`Names::snapshot_bucket`],
//! then purges the stream's messages up to min(the snapshot's sequence, the ack floor of
//! every other live consumer): never a message another replica has not consumed yet.
//! Consumers inactive for longer than [`INACTIVE`] (a dead replica's) are deleted and do not
//! hold the purge back.
//!
//! The object is the JSON of [`Snapshot`]: the index as canonical `RouterEvent`s (the wire
//! crate's JSON), each rank's last event id, and the stream sequence it covers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_nats::jetstream::{self, kv, object_store};
use futures::TryStreamExt;
use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::Names;
use crate::metrics::EventPlaneMetrics;

/// How long the snapshot lock lives if its holder dies.
pub const LOCK_TTL: Duration = Duration::from_secs(30);
/// A consumer without deliveries for this long belongs to a dead replica.
pub const INACTIVE: Duration = Duration::from_secs(300);
/// Largest snapshot loaded, bytes.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// One replica's index at one stream sequence.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Format version (1).
    pub version: u32,
    /// The replica that took it.
    pub router_id: String,
    /// The last stream sequence applied: consuming resumes after it.
    pub stream_seq: u64,
    /// When it was taken, ms since the Unix epoch.
    pub taken_at_ms: u64,
    /// Each rank's last event id.
    pub last_ids: Vec<LastId>,
    /// The index: `Stored` events rebuilding it ([`crate::routing::RouterState::dump_events`]).
    pub events: Vec<RouterEvent>,
}

/// A rank's last event id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastId {
    pub worker_id: u64,
    pub dp_rank: u32,
    pub event_id: u64,
}

impl LastId {
    pub fn rank(&self) -> WorkerWithDpRank {
        WorkerWithDpRank::new(self.worker_id, self.dp_rank)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn bucket(
    js: &jetstream::Context,
    names: &Names,
) -> anyhow::Result<object_store::ObjectStore> {
    if let Ok(b) = js.get_object_store(names.snapshot_bucket()).await {
        return Ok(b);
    }
    js.create_object_store(object_store::Config {
        bucket: names.snapshot_bucket(),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating the object store {}", names.snapshot_bucket()))
}

/// The newest snapshot and its size in bytes, `None` if there is none. Retries a read that
/// fails (an upload replacing it meanwhile) a few times. Errors: NATS unreachable, a
/// snapshot larger than [`MAX_SNAPSHOT_BYTES`] or not a snapshot.
pub async fn load(
    js: &jetstream::Context,
    names: &Names,
) -> anyhow::Result<Option<(Snapshot, usize)>> {
    let store = bucket(js, names).await?;
    let mut last_err = None;
    for _ in 0..5 {
        let mut obj = match store.get(Names::SNAPSHOT_OBJECT).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => {
                last_err = Some(anyhow::anyhow!("reading the snapshot: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if obj.info.size > MAX_SNAPSHOT_BYTES {
            anyhow::bail!(
                "the snapshot has {} bytes, more than {MAX_SNAPSHOT_BYTES}",
                obj.info.size
            );
        }
        let mut bytes = Vec::with_capacity(obj.info.size);
        match (&mut obj)
            .take(MAX_SNAPSHOT_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .await
        {
            Ok(_) => {
                let snap: Snapshot =
                    serde_json::from_slice(&bytes).context("decoding the snapshot")?;
                return Ok(Some((snap, bytes.len())));
            }
            Err(e) => {
                last_err = Some(anyhow::anyhow!("reading the snapshot: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("reading the snapshot failed")))
}

/// Delete the snapshot (`--router-reset-states`). A missing one is fine.
pub async fn delete(js: &jetstream::Context, names: &Names) -> anyhow::Result<()> {
    let store = bucket(js, names).await?;
    match store.delete(Names::SNAPSHOT_OBJECT).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::anyhow!("deleting the snapshot: {e}")),
    }
}

/// A request to the consumer for a snapshot of its state.
pub type SnapshotRequest = oneshot::Sender<Snapshot>;

/// What the periodic snapshot task needs.
pub struct Snapshotter {
    pub js: jetstream::Context,
    pub names: Names,
    pub router_id: String,
    pub consumer_name: String,
    pub threshold: u64,
    /// Asks the consumer for a snapshot.
    pub requests: mpsc::Sender<SnapshotRequest>,
    /// The last stream sequence the consumer applied.
    pub applied: watch::Receiver<u64>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// When the newest snapshot this replica took or loaded was taken (ms since the epoch).
    pub newest: Arc<AtomicU64>,
}

impl Snapshotter {
    fn m(&self) -> &EventPlaneMetrics {
        &self.metrics.event_plane
    }

    /// Check every ~1 s until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            let jitter = rand::random::<u64>() % 200;
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(900 + jitter)) => {}
            }
            if *stop.borrow() {
                return;
            }
            if let Err(e) = self.tick().await {
                tracing::warn!("snapshot check: {e:#}");
            }
        }
    }

    async fn tick(&self) -> anyhow::Result<()> {
        let mut stream = self
            .js
            .get_stream(self.names.stream())
            .await
            .context("opening the stream")?;
        let state = stream
            .info()
            .await
            .context("reading the stream's state")?
            .state
            .clone();
        let applied = *self.applied.borrow();
        self.m()
            .lag
            .set(state.last_sequence.saturating_sub(applied) as i64);
        if let Some(taken) = self.newest_taken_ms() {
            self.m()
                .snapshot_age
                .set(now_ms().saturating_sub(taken) as f64 / 1000.0);
        }
        if state.messages <= self.threshold {
            return Ok(());
        }
        let lock = self.lock().await.context("opening the lock bucket")?;
        if lock
            .create("snapshot", self.router_id.clone().into())
            .await
            .is_err()
        {
            return Ok(()); // another replica is at it
        }
        let result = self.take(&stream).await;
        let _ = lock.delete("snapshot").await;
        result
    }

    fn newest_taken_ms(&self) -> Option<u64> {
        let v = self.newest.load(Ordering::Relaxed);
        (v > 0).then_some(v)
    }

    /// The lock bucket. Its stream is created here as `create_key_value` would (one value per
    /// key, [`LOCK_TTL`]): that call cannot read nats-server 2.9's answer.
    async fn lock(&self) -> anyhow::Result<kv::Store> {
        let bucket = self.names.lock_bucket();
        self.js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: LOCK_TTL,
                storage: jetstream::stream::StorageType::File,
                discard: jetstream::stream::DiscardPolicy::New,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await?;
        Ok(self.js.get_key_value(bucket).await?)
    }

    /// Snapshot, upload, purge.
    async fn take(&self, stream: &jetstream::stream::Stream) -> anyhow::Result<()> {
        let start = Instant::now();
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .await
            .map_err(|_| anyhow::anyhow!("the consumer is gone"))?;
        let snap = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .context("the consumer did not answer")??;
        let bytes = serde_json::to_vec(&snap)?;
        let store = bucket(&self.js, &self.names).await?;
        store
            .put(Names::SNAPSHOT_OBJECT, &mut bytes.as_slice())
            .await
            .context("uploading the snapshot")?;
        let floor = self
            .purge_floor(stream, snap.stream_seq)
            .await
            .context("listing the consumers")?;
        if floor > 0 {
            stream
                .purge()
                .sequence(floor + 1)
                .await
                .context("purging the stream")?;
        }
        self.newest.fetch_max(snap.taken_at_ms, Ordering::Relaxed);
        let m = self.m();
        m.snapshots_taken.inc();
        m.snapshot_size.set(bytes.len() as i64);
        m.snapshot_duration.set(start.elapsed().as_secs_f64());
        tracing::info!(
            seq = snap.stream_seq,
            bytes = bytes.len(),
            purged_to = floor,
            events = snap.events.len(),
            "index snapshot taken"
        );
        Ok(())
    }

    /// min(`seq`, every live consumer's ack floor); consumers inactive for longer than
    /// [`INACTIVE`] are deleted instead.
    async fn purge_floor(
        &self,
        stream: &jetstream::stream::Stream,
        seq: u64,
    ) -> anyhow::Result<u64> {
        let mut floor = seq;
        let mut consumers = stream.consumers();
        let now = time::OffsetDateTime::now_utc();
        while let Some(c) = consumers.try_next().await? {
            let last = c.delivered.last_active.unwrap_or(c.created);
            let idle = (now - last).whole_seconds().max(0) as u64;
            if c.name != self.consumer_name && idle > INACTIVE.as_secs() {
                tracing::info!(consumer = %c.name, idle, "deleting an inactive consumer");
                let _ = stream.delete_consumer(&c.name).await;
                continue;
            }
            floor = floor.min(c.ack_floor.stream_sequence);
        }
        Ok(floor)
    }
}

/// Record a loaded snapshot in the metrics and in `newest` (see [`Snapshotter::newest`]).
pub fn loaded(m: &EventPlaneMetrics, newest: &AtomicU64, snap: &Snapshot, size: usize) {
    newest.fetch_max(snap.taken_at_ms, Ordering::Relaxed);
    m.snapshots_loaded.inc();
    m.snapshot_size.set(size as i64);
    m.snapshot_age
        .set(now_ms().saturating_sub(snap.taken_at_ms) as f64 / 1000.0);
}
