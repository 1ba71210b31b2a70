//! Routers in discovery: a `kvrouter router` replica announces itself under its endpoint
//! ([`announce`]), and a frontend given an endpoint name instead of a router URL
//! (`--prefill-router dynamo.prefill.generate`, `--pool NAME=ENDPOINT`) follows the replicas
//! registered there ([`follow`]), so replicas can come, go and restart without the frontend
//! being told.
//!
//! A router's registration is [`RouterRegistration`] as JSON, kept alive by the same leases as
//! a worker's: the file `ROOT/_routers/ns/component/endpoint/<router_id>.json` (out of reach of
//! the workers' scan, which stops three levels down), or the etcd key
//! `ROUTER_PREFIX<ns>/<component>/<endpoint>/<router_id>` (`--etcd-router-prefix`, default
//! `v1/kvrouter/routers/`). Kubernetes discovery announces nothing and follows no router by
//! name: there a router's replicas are reached through its Service.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Discovery;
use crate::workers::remote_router::RemoteRouter;

/// What a router replica announces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterRegistration {
    /// Where its API is reached: `http://host:port`.
    pub url: String,
    /// The `namespace.component.endpoint` it routes.
    pub endpoint: String,
    /// Its replica id (`--router-id`).
    pub router_id: String,
}

/// Largest number of replicas followed per endpoint; more are ignored.
const MAX_REPLICAS: usize = 256;

/// The file backend's directory of an endpoint's routers.
fn file_dir(root: &std::path::Path, endpoint: &str) -> std::path::PathBuf {
    super::file::endpoint_dir(&root.join("_routers"), endpoint)
}

/// `router_id` with anything but letters, digits, `-` and `_` replaced, so it is one path
/// component or key segment whatever it holds.
fn key_part(router_id: &str) -> String {
    router_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Announce `reg` until `stop` resolves, renewing its lease like a worker sidecar's; `ready`
/// fires once it is written. Errors: the backend cannot be written at the start.
pub async fn announce(
    d: &Discovery,
    reg: &RouterRegistration,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(reg)?;
    v["announced_at_ns"] = serde_json::json!(super::now_ns().to_string());
    let bytes = serde_json::to_vec(&v)?;
    let id = key_part(&reg.router_id);
    match d {
        Discovery::File(cfg) => {
            let path = file_dir(&cfg.root, &reg.endpoint).join(format!("{id}.json"));
            super::file::announce_files(cfg, vec![(path, bytes)], ready, stop).await?;
        }
        #[cfg(feature = "etcd")]
        Discovery::Etcd(cfg) => {
            let key = format!(
                "{}{}/{id}",
                cfg.router_prefix,
                reg.endpoint.replace('.', "/")
            );
            super::etcd::announce_kvs(cfg, vec![(key, bytes)], ready, stop).await?;
        }
        #[cfg(not(feature = "etcd"))]
        Discovery::Etcd(_) => {
            drop(ready);
            anyhow::bail!("built without etcd support")
        }
        // A router's pods are reached through its Service: nothing to announce.
        Discovery::Kubernetes(_) => {
            let _ = ready.send(());
            stop.await;
        }
    }
    Ok(())
}

/// The live replicas of `endpoint`, sorted by URL: registrations that parse, name that
/// endpoint and give an `http(s)://` URL (others are skipped). Errors: the backend cannot be
/// read (etcd down).
pub async fn list(d: &Discovery, endpoint: &str) -> anyhow::Result<Vec<RouterRegistration>> {
    let live = match d {
        Discovery::File(cfg) => {
            let (dir, lease) = (file_dir(&cfg.root, endpoint), cfg.lease);
            tokio::task::spawn_blocking(move || super::file::scan(&[dir], lease)).await?
        }
        #[cfg(feature = "etcd")]
        Discovery::Etcd(cfg) => {
            let prefix = format!("{}{}/", cfg.router_prefix, endpoint.replace('.', "/"));
            super::etcd::list(cfg, &prefix).await?
        }
        #[cfg(not(feature = "etcd"))]
        Discovery::Etcd(_) => anyhow::bail!("built without etcd support"),
        Discovery::Kubernetes(_) => anyhow::bail!(
            "kubernetes discovery does not follow routers by endpoint name: give the router's Service URL"
        ),
    };
    let mut out: Vec<RouterRegistration> = live
        .values()
        .filter_map(|b| serde_json::from_slice::<RouterRegistration>(b).ok())
        .filter(|r| {
            r.endpoint == endpoint
                && (r.url.starts_with("http://") || r.url.starts_with("https://"))
        })
        .take(MAX_REPLICAS)
        .collect();
    out.sort_by(|a, b| a.url.cmp(&b.url));
    out.dedup_by(|a, b| a.url == b.url);
    Ok(out)
}

/// Keep `router`'s replica URLs in step with the registrations of its endpoint, looking every
/// poll interval, until the task is aborted. A failed look keeps the last known replicas.
pub fn follow(d: Discovery, router: Arc<RemoteRouter>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(endpoint) = router.endpoint().map(str::to_string) else {
            return;
        };
        let poll = match &d {
            Discovery::File(c) => c.poll,
            Discovery::Etcd(c) => c.poll,
            Discovery::Kubernetes(_) => std::time::Duration::from_secs(1),
        };
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match list(&d, &endpoint).await {
                Ok(regs) => {
                    let urls: Vec<String> = regs.into_iter().map(|r| r.url).collect();
                    if router.set_replicas(urls.clone()) {
                        tracing::info!(router = %router.name, endpoint, replicas = ?urls, "router replicas changed");
                    }
                }
                Err(e) => {
                    tracing::warn!(router = %router.name, endpoint, "cannot list router replicas: {e}")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::discovery::FileDiscovery;
    use std::time::Duration;

    #[tokio::test]
    async fn announced_routers_are_listed_by_endpoint_and_go_when_stopped() {
        let root = std::env::temp_dir().join(format!("kvr-routers-{}", rand::random::<u64>()));
        let d = Discovery::File(FileDiscovery {
            root: root.clone(),
            lease: Duration::from_secs(5),
            poll: Duration::from_millis(10),
        });
        let reg = |url: &str, ep: &str, id: &str| RouterRegistration {
            url: url.into(),
            endpoint: ep.into(),
            router_id: id.into(),
        };
        let mut stops = Vec::new();
        for r in [
            reg("http://b:1", "dynamo.prefill.generate", "b/../x"),
            reg("http://a:1", "dynamo.prefill.generate", "a"),
            reg("http://c:1", "dynamo.other.generate", "c"),
        ] {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let (ready, ready_rx) = tokio::sync::oneshot::channel();
            let d = d.clone();
            tokio::spawn(async move {
                announce(&d, &r, ready, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
            ready_rx.await.unwrap();
            stops.push(tx);
        }
        // Garbage beside them is skipped.
        let dir = file_dir(&root, "dynamo.prefill.generate");
        std::fs::write(dir.join("junk.json"), b"{not json").unwrap();
        std::fs::write(
            dir.join("ftp.json"),
            br#"{"url":"ftp://x","endpoint":"dynamo.prefill.generate","router_id":"f"}"#,
        )
        .unwrap();
        let urls = |v: Vec<RouterRegistration>| v.into_iter().map(|r| r.url).collect::<Vec<_>>();
        let listed = list(&d, "dynamo.prefill.generate").await.unwrap();
        assert_eq!(urls(listed), ["http://a:1", "http://b:1"]);
        // A router id cannot escape its directory.
        assert!(dir.join("b____x.json").exists());
        stops.remove(0).send(()).unwrap();
        let mut gone = false;
        for _ in 0..100 {
            if urls(list(&d, "dynamo.prefill.generate").await.unwrap()) == ["http://a:1"] {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "a stopped router's registration is removed");
        let _ = std::fs::remove_dir_all(root);
    }
}
