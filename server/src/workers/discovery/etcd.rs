//! The etcd discovery backend (`--discovery-backend etcd`, `ETCD_ENDPOINTS`, spec §10), with
//! the `etcd-client` crate (built with `--features etcd`). A worker's registration is the key
//! `PREFIX<namespace>/<component>/<endpoint>/<instance>` (default prefix
//! `v1/kvrouter/instances/`) holding its workers-file entry, attached to its sidecar's lease
//! ([`announce`]): the sidecar keeps the lease alive and revokes it on exit, and a sidecar that
//! dies lets it expire, which deletes the key. Routers list the prefix, then watch it from the
//! listed revision ([`spawn_watch`]); after any error — etcd restarted, the connection lost,
//! the history compacted — they connect again and list again, so a worker whose key lived on
//! is kept and one whose key went is removed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};

use super::{now_ns, registration_bytes, registration_key, EtcdDiscovery, Registrations};
use crate::metrics::Metrics;
use crate::workers::fleet::Fleet;
use crate::workers::spec::WorkerSpec;

/// Most registrations kept in view; more are ignored (and logged).
const MAX_KEYS: usize = 10_000;

async fn connect(cfg: &EtcdDiscovery) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        // HTTP/2 pings: a partitioned server is noticed, and the watch restarted.
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    Client::connect(&cfg.endpoints, Some(opts)).await
}

/// Watch the registrations `fleet` serves and keep it in step, until the task is aborted.
pub fn spawn_watch(
    fleet: Arc<Fleet>,
    cfg: EtcdDiscovery,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let prefix = match fleet.endpoint() {
            Some(e) => format!("{}{}/", cfg.prefix, e.replace('.', "/")),
            None => cfg.prefix.clone(),
        };
        tracing::info!(endpoints = ?cfg.endpoints, prefix, "discovery: watching etcd");
        let mut known = Registrations::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            match watch(&fleet, &metrics, &mut known, &cfg, &prefix, &mut backoff).await {
                Ok(()) => tracing::info!("discovery: etcd watch ended, listing again"),
                Err(e) => tracing::warn!("discovery: etcd: {e}; retrying in {backoff:?}"),
            }
            metrics.discovery_watch_restarts.inc();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// One list-then-watch. Returns when the watch ends or is cancelled (compaction); errors on a
/// failed connection or call.
async fn watch(
    fleet: &Arc<Fleet>,
    metrics: &Metrics,
    known: &mut Registrations,
    cfg: &EtcdDiscovery,
    prefix: &str,
    backoff: &mut Duration,
) -> Result<(), etcd_client::Error> {
    let mut client = connect(cfg).await?;
    let listed = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = listed.header().map_or(0, |h| h.revision());
    let mut live: HashMap<String, Vec<u8>> = HashMap::new();
    for kv in listed.kvs() {
        insert(&mut live, kv.key(), kv.value());
    }
    *backoff = Duration::from_millis(100);
    known.sync("etcd", fleet, metrics, &live).await;
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() || resp.compact_revision() > 0 {
            return Ok(());
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => insert(&mut live, kv.key(), kv.value()),
                EventType::Delete => {
                    live.remove(String::from_utf8_lossy(kv.key()).as_ref());
                }
            }
        }
        known.sync("etcd", fleet, metrics, &live).await;
    }
    Ok(())
}

/// Every key under `prefix` with its value, at most [`MAX_KEYS`]. Errors: etcd cannot be
/// reached or read.
pub async fn list(cfg: &EtcdDiscovery, prefix: &str) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let mut client = connect(cfg).await?;
    let listed = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut live = HashMap::new();
    for kv in listed.kvs() {
        insert(&mut live, kv.key(), kv.value());
    }
    Ok(live)
}

fn insert(live: &mut HashMap<String, Vec<u8>>, key: &[u8], value: &[u8]) {
    let key = String::from_utf8_lossy(key).into_owned();
    if live.len() >= MAX_KEYS && !live.contains_key(&key) {
        tracing::warn!(key, "discovery: over {MAX_KEYS} registrations, ignored");
        return;
    }
    live.insert(key, value.to_vec());
}

/// A worker's sidecar side (`kvrouter register --discovery-backend etcd`): put each spec's
/// key under a lease of `cfg.lease` (whole seconds, at least 1), keep the lease alive every
/// third of it, and revoke it when `stop` resolves; `ready` fires once the keys are first put. A lease lost meanwhile (etcd restarted
/// past the lease, a long partition) is granted again and the keys put again. Errors: etcd
/// cannot be reached or written at the start.
pub async fn announce(
    cfg: &EtcdDiscovery,
    specs: &[WorkerSpec],
    ready: tokio::sync::oneshot::Sender<()>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Vec<String>> {
    let started = now_ns();
    let kvs: Vec<(String, Vec<u8>)> = specs
        .iter()
        .map(|s| {
            (
                format!("{}{}", cfg.prefix, registration_key(s)),
                registration_bytes(s, started),
            )
        })
        .collect();
    announce_kvs(cfg, kvs, ready, stop).await
}

/// [`announce`] of ready-made `(key, value)` pairs (a router's own registration too).
pub async fn announce_kvs(
    cfg: &EtcdDiscovery,
    kvs: Vec<(String, Vec<u8>)>,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Vec<String>> {
    let mut ready = Some(ready);
    let keys: Vec<String> = kvs.iter().map(|(k, _)| k.clone()).collect();
    let ttl = cfg.lease.as_secs_f64().ceil().max(1.0) as i64;
    tokio::pin!(stop);
    let mut first = true;
    loop {
        let granted = async {
            let mut c = connect(cfg).await?;
            let lease = c.lease_grant(ttl, None).await?.id();
            for (k, v) in &kvs {
                c.put(
                    k.as_str(),
                    v.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
            }
            Ok::<_, etcd_client::Error>((c, lease))
        };
        let (mut client, lease) = tokio::select! {
            r = granted => match r {
                Ok(ok) => ok,
                Err(e) if first => return Err(anyhow::anyhow!("etcd {:?}: {e}", cfg.endpoints)),
                Err(e) => {
                    tracing::warn!("discovery: cannot register with etcd: {e}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = &mut stop => return Ok(keys),
                    }
                }
            },
            _ = &mut stop => return Ok(keys),
        };
        first = false;
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        let kept = async {
            let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(ttl as f64 / 3.0));
            loop {
                tick.tick().await;
                keeper.keep_alive().await?;
                match answers.message().await? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Ok::<_, etcd_client::Error>(()), // the lease is gone
                }
            }
        };
        tokio::select! {
            r = kept => {
                match r {
                    Ok(()) => tracing::warn!("discovery: etcd lease expired; registering again"),
                    Err(e) => tracing::warn!("discovery: etcd lease keep-alive failed: {e}; registering again"),
                }
            }
            _ = &mut stop => {
                let _ = tokio::time::timeout(Duration::from_secs(3), client.lease_revoke(lease)).await;
                return Ok(keys);
            }
        }
    }
}
