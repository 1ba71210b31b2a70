//! etcd discovery (issue 18 item 4, `--discovery-backend etcd`) against a real etcd server
//! (Debian's `etcd-server`, started here on loopback ports): sidecars' leases add and remove
//! workers in a running frontend, and a restarted etcd drops nobody whose lease is valid.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvrouter_core::RouterMode;
use kvrouter_mocker::DisaggregationMode;
use kvrouter_server::config::{DiscoveryBackend, FrontendConfig};
use kvrouter_server::up::worker_spec;
use kvrouter_server::workers::discovery::{Discovery, EtcdDiscovery};
use kvrouter_server::{Frontend, WorkerSpec};
use tokio::sync::oneshot;

use crate::common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-member etcd on loopback, its data in a temporary directory.
struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
    client: u16,
    peer: u16,
}

impl Etcd {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kvrouter-etcd-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let (client, peer) = (free_port(), free_port());
        let child = Self::spawn(&dir, client, peer);
        Self {
            child,
            dir,
            client,
            peer,
        }
    }

    fn spawn(dir: &std::path::Path, client: u16, peer: u16) -> Child {
        let bin = std::env::var("KVROUTER_ETCD").unwrap_or_else(|_| "etcd".into());
        let c = format!("http://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        Command::new(&bin)
            .args(["--name", "t", "--data-dir"])
            .arg(dir)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("t={p}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `{bin}` ({e}): install Debian's etcd-server (scripts/test does)"
                )
            })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    async fn wait_up(&self) {
        let c = client();
        let health = format!("{}/health", self.url());
        for _ in 0..200 {
            if let Ok(r) = c.get(&health).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd did not start");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn restart(&mut self) {
        self.child = Self::spawn(&self.dir, self.client, self.peer);
        self.wait_up().await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// etcd discovery on `etcd` under a fresh prefix (returned), 2 s leases.
fn discovery(etcd: &Etcd) -> (String, Discovery) {
    let prefix = format!("test/{}/", rand::random::<u32>());
    let d = Discovery::Etcd(EtcdDiscovery {
        endpoints: vec![etcd.url()],
        prefix: prefix.clone(),
        router_prefix: format!("{prefix}routers/"),
        lease: Duration::from_secs(2),
        poll: Duration::from_millis(100),
    });
    (prefix, d)
}

/// A sidecar announcing `spec`: stopped (lease revoked) by firing the sender, or killed
/// (lease left to expire) by aborting the task.
fn sidecar(d: &Discovery, spec: WorkerSpec) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let d = d.clone();
    let task = tokio::spawn(async move {
        let _ = d
            .announce(&[spec], oneshot::channel().0, async {
                let _ = rx.await;
            })
            .await;
    });
    (tx, task)
}

#[tokio::test]
async fn etcd_leases_add_and_remove_workers_and_survive_an_etcd_restart() {
    let mut etcd = Etcd::start();
    etcd.wait_up().await;
    let (prefix, d) = discovery(&etcd);
    let w = mock_workers(3, DisaggregationMode::Agg).await;
    let mut fc = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    fc.fleet.discovery_backend = DiscoveryBackend::Etcd;
    fc.fleet.discovery.etcd_endpoints = vec![etcd.url()];
    fc.fleet.discovery.etcd_prefix = prefix;
    fc.fleet.discovery.discovery_lease_secs = 2.0;
    let f = Frontend::start(fc, Vec::new())
        .await
        .expect("frontend starts");
    let (c, url) = (client(), f.url());

    // A sidecar's lease brings its worker in; it serves.
    let (a, _) = sidecar(&d, worker_spec(&w[0]));
    let only = |i: usize| vec![w[i].info.url.clone()];
    assert!(
        eventually(5.0, || routable_urls(&f.fleet) == only(0)).await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    let (st, _, v) = complete(&c, &url, completion_body(&prompt(1, 300), 2)).await;
    assert_eq!(st, 200, "{v}");
    // Its sidecar stops: the lease is revoked, the worker leaves at once.
    let _ = a.send(());
    assert!(
        eventually(3.0, || routable_urls(&f.fleet).is_empty()).await,
        "{:?}",
        routable_urls(&f.fleet)
    );

    // etcd restarted: a worker whose lease is valid stays, and the watch resumes.
    let (_b, _b_task) = sidecar(&d, worker_spec(&w[1]));
    assert!(eventually(5.0, || routable_urls(&f.fleet) == only(1)).await);
    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        routable_urls(&f.fleet),
        only(1),
        "etcd down: nobody is dropped"
    );
    etcd.restart().await;
    let (_c, c_task) = sidecar(&d, worker_spec(&w[2]));
    let mut both = vec![w[1].info.url.clone(), w[2].info.url.clone()];
    both.sort();
    assert!(
        eventually(15.0, || routable_urls(&f.fleet) == both).await,
        "the watch resumed after the restart: {:?}",
        routable_urls(&f.fleet)
    );
    // A sidecar that dies without revoking: its lease expires, its worker leaves.
    c_task.abort();
    assert!(
        eventually(10.0, || routable_urls(&f.fleet) == only(1)).await,
        "expired lease: {:?}",
        routable_urls(&f.fleet)
    );
    let m = metrics_text(&c, &url).await;
    assert!(
        metric(&m, "kvrouter_discovery_watch_restarts_total") >= 1.0,
        "{m}"
    );
    f.stop().await;
    for w in w {
        w.stop().await;
    }
}

#[tokio::test]
async fn router_replicas_announce_themselves_in_etcd_until_they_stop() {
    use kvrouter_server::workers::discovery::routers::{announce, list, RouterRegistration};
    let etcd = Etcd::start();
    etcd.wait_up().await;
    let (_, d) = discovery(&etcd);
    let reg = RouterRegistration {
        url: "http://10.0.0.9:8090".into(),
        endpoint: "dynamo.prefill.generate".into(),
        router_id: "r1".into(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready, is_ready) = oneshot::channel();
    let task = tokio::spawn({
        let (d, reg) = (d.clone(), reg.clone());
        async move {
            announce(&d, &reg, ready, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    is_ready.await.expect("announced");
    assert_eq!(
        list(&d, "dynamo.prefill.generate").await.unwrap(),
        std::slice::from_ref(&reg)
    );
    assert!(list(&d, "dynamo.decode.generate").await.unwrap().is_empty());
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(
        list(&d, "dynamo.prefill.generate")
            .await
            .unwrap()
            .is_empty(),
        "the lease is revoked on stop"
    );
}
