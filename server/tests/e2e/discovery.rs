//! File discovery (issue 18 item 4, `--discovery-backend file`): workers announced by their
//! sidecar's registration files come and go in a running frontend and router, over real HTTP
//! and ZMQ with mock workers.

use std::path::PathBuf;
use std::time::Duration;

use kvrouter_core::RouterMode;
use kvrouter_mocker::DisaggregationMode;
use kvrouter_server::config::{DiscoveryBackend, FrontendConfig};
use kvrouter_server::router_service::{RouterService, RouterServiceConfig};
use kvrouter_server::up::worker_spec;
use kvrouter_server::workers::discovery::{announce, registration_path, FileDiscovery};
use kvrouter_server::{Frontend, WorkerSpec};
use tokio::sync::oneshot;

use crate::common::*;

fn root() -> PathBuf {
    std::env::temp_dir().join(format!(
        "kvrouter-discovery-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

fn settings(root: &std::path::Path) -> FileDiscovery {
    FileDiscovery {
        root: root.to_path_buf(),
        lease: Duration::from_millis(600),
        poll: Duration::from_millis(50),
    }
}

fn use_file_discovery(fleet: &mut kvrouter_server::config::FleetArgs, root: &std::path::Path) {
    fleet.discovery_backend = DiscoveryBackend::File;
    fleet.discovery.file_kv = Some(root.to_path_buf());
    fleet.discovery.discovery_lease_secs = 0.6;
    fleet.discovery.discovery_poll_ms = 50;
}

/// A sidecar announcing `spec` until the returned sender is dropped or fired.
fn sidecar(cfg: &FileDiscovery, spec: WorkerSpec) -> oneshot::Sender<()> {
    let (tx, rx) = oneshot::channel::<()>();
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let _ = announce(&cfg, &[spec], oneshot::channel().0, async {
            let _ = rx.await;
        })
        .await;
    });
    tx
}

#[tokio::test]
async fn announced_workers_join_and_leave_a_running_frontend() {
    let root = root();
    let cfg = settings(&root);
    let w = mock_workers(2, DisaggregationMode::Agg).await;
    let mut fc = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    use_file_discovery(&mut fc.fleet, &root);
    let f = Frontend::start(fc, Vec::new())
        .await
        .expect("frontend starts");
    let (c, url) = (client(), f.url());
    assert_eq!(get_status(&c, &format!("{url}/ready")).await, 503);
    // A worker's sidecar announces it: it joins, and serves.
    let a = sidecar(&cfg, worker_spec(&w[0]));
    let one = vec![w[0].info.url.clone()];
    assert!(
        eventually(5.0, || routable_urls(&f.fleet) == one).await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    let (st, _, v) = complete(&c, &url, completion_body(&prompt(1, 300), 2)).await;
    assert_eq!(st, 200, "{v}");
    // The admin API says where it came from: its registration file.
    let admin = f.admin_url().expect("admin API");
    let list: serde_json::Value = c
        .get(format!("{admin}/v1/workers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let source = list["workers"][0]["source"].as_str().unwrap_or_default();
    let file = registration_path(&root, &worker_spec(&w[0]));
    assert_eq!(source, format!("file:{}", file.display()), "{list}");
    // A second joins; garbage and symbolic links beside them change nothing.
    let b = sidecar(&cfg, worker_spec(&w[1]));
    let dir = registration_path(&root, &worker_spec(&w[0]));
    let dir = dir.parent().unwrap();
    std::fs::write(dir.join("garbage.json"), b"{not json").unwrap();
    std::fs::write(dir.join("nourl.json"), b"{\"block_size\": 64}").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        registration_path(&root, &worker_spec(&w[1])),
        dir.join("link.json"),
    )
    .unwrap();
    let mut two = vec![w[0].info.url.clone(), w[1].info.url.clone()];
    two.sort();
    assert!(
        eventually(5.0, || routable_urls(&f.fleet) == two).await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    // Its sidecar stops: the file is withdrawn and the worker leaves.
    let _ = a.send(());
    let only_b = vec![w[1].info.url.clone()];
    assert!(
        eventually(5.0, || routable_urls(&f.fleet) == only_b).await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    assert!(!registration_path(&root, &worker_spec(&w[0])).exists());
    // A sidecar that dies without withdrawing: its lease expires, the worker leaves.
    let path_b = registration_path(&root, &worker_spec(&w[1]));
    drop(b); // stops refreshing and removes the file: put a stale copy back
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&path_b, serde_json::to_vec(&worker_spec(&w[1])).unwrap()).unwrap();
    assert!(
        eventually(3.0, || routable_urls(&f.fleet) == only_b).await,
        "re-registered from the copy"
    );
    assert!(
        eventually(5.0, || routable_urls(&f.fleet).is_empty()).await,
        "an unrefreshed registration expires: {:?}",
        routable_urls(&f.fleet)
    );
    let m = metrics_text(&c, &url).await;
    assert!(
        metric(&m, "kvrouter_discovery_changes_total{change=\"added\"}") >= 3.0,
        "{m}"
    );
    assert!(metric(&m, "kvrouter_discovery_changes_total{change=\"removed\"}") >= 3.0);
    f.stop().await;
    for w in w {
        w.stop().await;
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_standalone_router_takes_the_registrations_of_its_endpoint_only() {
    let root = root();
    let cfg = settings(&root);
    let w = mock_workers(2, DisaggregationMode::Agg).await;
    let mut rc = RouterServiceConfig::new("dynamo.prefill.generate", 64);
    use_file_discovery(&mut rc.fleet, &root);
    let r = RouterService::start(rc, Vec::new())
        .await
        .expect("router starts");
    let mut prefill = worker_spec(&w[0]);
    prefill.endpoint = Some("dynamo.prefill.generate".into());
    let mut backend = worker_spec(&w[1]);
    backend.endpoint = Some("dynamo.backend.generate".into());
    let _p = sidecar(&cfg, prefill);
    let _b = sidecar(&cfg, backend);
    let want = vec![w[0].info.url.clone()];
    assert!(
        eventually(5.0, || routable_urls(&r.fleet) == want).await,
        "{:?}",
        routable_urls(&r.fleet)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        routable_urls(&r.fleet),
        want,
        "the other endpoint's worker stays out"
    );
    r.stop().await;
    for w in w {
        w.stop().await;
    }
    let _ = std::fs::remove_dir_all(&root);
}
