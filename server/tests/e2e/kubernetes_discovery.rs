//! Kubernetes discovery (issue 19 item 3, `--discovery-backend kubernetes`). No API server can
//! run here: [`FakeApi`] is an HTTP server in the test that speaks the Kubernetes list/watch
//! protocol for `/api/v1/namespaces/{ns}/pods` — a `PodList` with its `resourceVersion`, and
//! with `watch=true` newline-delimited `WatchEvent`s (`ADDED`, `MODIFIED`, `DELETED`,
//! `BOOKMARK`, `ERROR` with a 410 `Status`) — serving pods recorded as a real API server
//! returns them (`server/tests/fixtures/kubernetes/`). Their `podIP` is 127.0.0.1 and their
//! `kvrouter.dev/*` annotations name the ports of real mock workers (HTTP and ZMQ) in this
//! process. The frontend reaches the fake API through a kubeconfig file the test writes, as
//! it would a cluster's.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kvrouter_core::event::WorkerWithDpRank;
use kvrouter_core::RouterMode;
use kvrouter_mocker::{DisaggregationMode, RunningWorker};
use kvrouter_server::config::{DiscoveryBackend, FrontendConfig};
use kvrouter_server::routing::RouteInput;
use kvrouter_server::Frontend;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::common::*;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.test-service-account";

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kubernetes")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("fixture JSON")
}

type Line = Result<Bytes, std::io::Error>;

/// The API server's side: the pods, their history and the open watches.
#[derive(Default)]
struct ApiState {
    /// name → pod (namespace `kvrouter`).
    pods: BTreeMap<String, Value>,
    /// The last resourceVersion handed out.
    version: u64,
    /// Every change: (its resourceVersion, the pod's labels, its watch event line).
    history: Vec<(u64, Value, Bytes)>,
    /// Watches from a version below this are answered `410 Gone` (history compacted).
    expired_below: u64,
    /// Open watches: their label selector and where their lines go.
    watchers: Vec<(String, mpsc::UnboundedSender<Line>)>,
    /// The label selector of each list call.
    lists: Vec<String>,
    /// The resourceVersion each watch call started from.
    watches: Vec<u64>,
    /// Requests without the kubeconfig's bearer token.
    unauthorized: usize,
}

/// Whether an equality selector (`k=v,k2=v2`) selects a pod with `labels`.
fn selects(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').expect("an equality selector");
        labels[k].as_str() == Some(v)
    })
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    line.into()
}

/// The recorded 410 `ERROR` event, for a watch from `from` when the oldest version kept is
/// `oldest`.
fn gone_line(from: u64, oldest: u64) -> Bytes {
    let mut e = fixture("watch-event-410-gone.json");
    e["object"]["message"] = format!("too old resource version: {from} ({oldest})").into();
    let mut line = serde_json::to_vec(&e).unwrap();
    line.push(b'\n');
    line.into()
}

impl ApiState {
    /// A change of one pod: its new resourceVersion, kept in the history and sent to every
    /// open watch that selects it.
    fn change(&mut self, kind: &str, mut pod: Value) {
        self.version += 1;
        pod["metadata"]["resourceVersion"] = self.version.to_string().into();
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let labels = pod["metadata"]["labels"].clone();
        let line = event_line(kind, &pod);
        if kind == "DELETED" {
            self.pods.remove(&name);
        } else {
            self.pods.insert(name, pod);
        }
        self.history
            .push((self.version, labels.clone(), line.clone()));
        self.watchers
            .retain(|(sel, tx)| !selects(sel, &labels) || tx.send(Ok(line.clone())).is_ok());
    }
}

/// An HTTP server speaking the pods list/watch protocol of the Kubernetes API.
struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApi {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(ApiState {
            version: 185_000,
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/api/v1/namespaces/{ns}/pods", axum::routing::get(pods))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { state, addr, task }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap()
    }

    /// Create or update a pod (`ADDED` or `MODIFIED`).
    fn put(&self, pod: Value) {
        let mut s = self.lock();
        let kind = if s
            .pods
            .contains_key(pod["metadata"]["name"].as_str().unwrap())
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.change(kind, pod);
    }

    /// Change a pod in place (`MODIFIED`).
    fn modify(&self, name: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.lock();
        let mut pod = s.pods[name].clone();
        f(&mut pod);
        s.change("MODIFIED", pod);
    }

    /// Delete a pod (`DELETED`, with its last state).
    fn delete(&self, name: &str) {
        let mut s = self.lock();
        let pod = s.pods[name].clone();
        s.change("DELETED", pod);
    }

    /// A `BOOKMARK` with the current version to every open watch; returns the version.
    fn bookmark(&self) -> u64 {
        let mut s = self.lock();
        let v = s.version;
        let line = event_line(
            "BOOKMARK",
            &json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": v.to_string()}}),
        );
        s.watchers
            .retain(|(_, tx)| tx.send(Ok(line.clone())).is_ok());
        v
    }

    /// Break every open watch's connection mid-stream (no end of the chunked body), then run
    /// `meanwhile` before anyone can watch again.
    fn drop_connections(&self, meanwhile: impl FnOnce(&mut ApiState)) {
        let mut s = self.lock();
        for (_, tx) in s.watchers.drain(..) {
            let _ = tx.send(Err(std::io::Error::other("connection reset")));
        }
        meanwhile(&mut s);
    }

    fn lists(&self) -> Vec<String> {
        self.lock().lists.clone()
    }

    fn watches(&self) -> Vec<u64> {
        self.lock().watches.clone()
    }

    fn open_watches(&self) -> usize {
        let mut s = self.lock();
        s.watchers.retain(|(_, tx)| !tx.is_closed());
        s.watchers.len()
    }

    /// A kubeconfig file naming this server, a bearer token and namespace `kvrouter`.
    fn kubeconfig(&self) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "kvrouter-kubeconfig-{}-{}.yaml",
            std::process::id(),
            rand::random::<u32>()
        ));
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster:
      server: http://{}
contexts:
  - name: fake
    context:
      cluster: fake
      user: router
      namespace: kvrouter
current-context: fake
users:
  - name: router
    user:
      token: {TOKEN}
",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET /api/v1/namespaces/{ns}/pods[?watch=true]`.
async fn pods(
    State(state): State<Arc<Mutex<ApiState>>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut s = state.lock().unwrap();
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        s.unauthorized += 1;
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let in_ns = |p: &Value| p["metadata"]["namespace"] == ns.as_str();
    if !matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        s.lists.push(selector.clone());
        let items: Vec<Value> = s
            .pods
            .values()
            .filter(|p| in_ns(p) && selects(&selector, &p["metadata"]["labels"]))
            .cloned()
            .collect();
        let list = json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": s.version.to_string()},
            "items": items,
        });
        return ([("content-type", "application/json")], list.to_string()).into_response();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    s.watches.push(from);
    let (tx, rx) = mpsc::unbounded_channel::<Line>();
    if from < s.expired_below {
        // As the API server does: 200, one ERROR event, the end.
        let _ = tx.send(Ok(gone_line(from, s.expired_below)));
    } else {
        for (v, labels, line) in &s.history {
            if *v > from && selects(&selector, labels) {
                let _ = tx.send(Ok(line.clone()));
            }
        }
        s.watchers.push((selector, tx));
    }
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (line, rx))
    });
    (
        [("content-type", "application/json")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// A worker pod named `name` (UID `uid`) from the recorded fixture `file`, at 127.0.0.1 with
/// the ports of mock worker `w`.
fn worker_pod(file: &str, name: &str, uid: &str, w: &RunningWorker) -> Value {
    let mut pod = fixture(file);
    let port = |e: &Option<String>| {
        e.as_deref()
            .and_then(|e| e.rsplit(':').next())
            .expect("an endpoint with a port")
            .to_string()
    };
    let i = &w.info;
    let http = i.url.rsplit(':').next().unwrap().to_string();
    let m = &mut pod["metadata"];
    m["name"] = name.into();
    m["uid"] = uid.into();
    m["labels"]["statefulset.kubernetes.io/pod-name"] = name.into();
    let a = &mut m["annotations"];
    a["kvrouter.dev/http-port"] = http.into();
    a["kvrouter.dev/kv-events-port"] = port(&i.kv_events_endpoint).into();
    a["kvrouter.dev/kv-replay-port"] = port(&i.replay_endpoint).into();
    a["kvrouter.dev/block-size"] = i.block_size.to_string().into();
    a["kvrouter.dev/model"] = i.model.clone().into();
    pod["spec"]["hostname"] = name.into();
    pod["status"]["podIP"] = "127.0.0.1".into();
    pod["status"]["podIPs"] = json!([{"ip": "127.0.0.1"}]);
    pod
}

/// Set the pod's Ready and ContainersReady conditions and its container's `ready`.
fn set_ready(pod: &mut Value, ready: bool) {
    let status = if ready { "True" } else { "False" };
    for c in pod["status"]["conditions"].as_array_mut().unwrap() {
        if c["type"] == "Ready" || c["type"] == "ContainersReady" {
            c["status"] = status.into();
            c["lastTransitionTime"] = "2025-09-18T09:02:11Z".into();
            if ready {
                c.as_object_mut().unwrap().remove("reason");
                c.as_object_mut().unwrap().remove("message");
            } else {
                c["reason"] = "ContainersNotReady".into();
                c["message"] = "containers with unready status: [vllm]".into();
            }
        }
    }
    pod["status"]["containerStatuses"][0]["ready"] = ready.into();
}

/// The worker id a pod gets: its UID hashed to 53 bits.
fn id_of(uid: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(uid.as_bytes()) & ((1 << 53) - 1)
}

/// A frontend in KV mode with Kubernetes discovery through `kubeconfig`.
async fn frontend(kubeconfig: PathBuf, tweak: impl FnOnce(&mut FrontendConfig)) -> Frontend {
    let mut fc = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    fc.fleet.health_interval_ms = 100;
    fc.fleet.discovery_backend = DiscoveryBackend::Kubernetes;
    fc.fleet.discovery.kubeconfig = Some(kubeconfig);
    tweak(&mut fc);
    Frontend::start(fc, Vec::new())
        .await
        .expect("frontend starts")
}

fn indexed_blocks(f: &Frontend, id: u64) -> usize {
    f.fleet
        .router
        .index()
        .with(|t| t.worker_blocks(WorkerWithDpRank::new(id, 0)))
        .unwrap_or(0)
}

const ADDED: &str = "kvrouter_discovery_changes_total{change=\"added\"}";
const REMOVED: &str = "kvrouter_discovery_changes_total{change=\"removed\"}";

/// The frontend's metrics once `name` satisfies `ok` (a change is counted just after the
/// fleet shows it), or after 2 s.
async fn metrics_when(
    c: &reqwest::Client,
    url: &str,
    name: &str,
    ok: impl Fn(f64) -> bool,
) -> String {
    let mut m = String::new();
    for _ in 0..100 {
        m = metrics_text(c, url).await;
        if ok(metric(&m, name)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

const UIDS: [&str; 3] = [
    "3d0e7b4c-5f2a-4e61-9b8d-7a1c2e9f4b10",
    "a4c81f3e-2d6b-4b9a-8f07-c35e1d92b6e8",
    "5e92d0b7-8c14-4f3a-a6e9-1b7d3c0f8a25",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_pods_are_workers_and_unready_or_deleted_ones_leave() {
    let api = FakeApi::start().await;
    let w = mock_workers(2, DisaggregationMode::Agg).await;
    // vllm-0 is ready; vllm-1 has an address but its engine is still starting.
    api.put(worker_pod("pod-vllm-ready.json", "vllm-0", UIDS[0], &w[0]));
    api.put(worker_pod(
        "pod-vllm-starting.json",
        "vllm-1",
        UIDS[1],
        &w[1],
    ));
    // Not selected: another app's pod in the namespace.
    let mut other = worker_pod("pod-vllm-ready.json", "nats-0", UIDS[2], &w[1]);
    other["metadata"]["labels"] = json!({"app.kubernetes.io/name": "nats"});
    api.put(other);
    // Selected but misannotated: skipped with a warning and counted, never registered.
    let mut bad = worker_pod("pod-vllm-ready.json", "vllm-bad", "0b1e", &w[1]);
    bad["metadata"]["annotations"]["kvrouter.dev/block-size"] = "sixteen".into();
    api.put(bad);

    // Namespace from the kubeconfig's context, the default selector.
    let f = frontend(api.kubeconfig(), |_| {}).await;
    let (c, url) = (client(), f.url());
    let (id0, id1) = (id_of(UIDS[0]), id_of(UIDS[1]));

    // Added: the ready pod is a worker, and serves.
    assert!(
        eventually(5.0, || routable_urls(&f.fleet)
            == vec![w[0].info.url.clone()])
        .await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    assert_eq!(api.lists(), ["kvrouter.dev/worker=true"]);
    assert_eq!(api.lock().unauthorized, 0, "the kubeconfig's token is sent");
    let tokens = prompt(3, 512);
    let (st, served, v) = complete(&c, &url, completion_body(&tokens, 2)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(served, Some(id0), "its id is the pod UID's hash");
    // Its KV events (ZMQ) are indexed under that id.
    assert!(
        eventually(5.0, || indexed_blocks(&f, id0) >= 8).await,
        "{}",
        indexed_blocks(&f, id0)
    );
    // The admin API names the pod as its source.
    let admin = f.admin_url().expect("admin API");
    let list = get_json(&c, &format!("{admin}/v1/workers")).await;
    let workers = list["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{list}");
    assert_eq!(workers[0]["source"], "kubernetes:kvrouter/vllm-0", "{list}");
    assert_eq!(
        workers[0]["spec"]["block_size"], w[0].info.block_size,
        "{list}"
    );
    assert_eq!(
        workers[0]["spec"]["kv_events_endpoint"],
        w[0].info.kv_events_endpoint.clone().unwrap()
    );

    // Modified: vllm-1's engine is ready.
    api.modify("vllm-1", |p| set_ready(p, true));
    let both = sorted(vec![w[0].info.url.clone(), w[1].info.url.clone()]);
    assert!(eventually(5.0, || routable_urls(&f.fleet) == both).await);

    // Modified: vllm-0 fails its readiness probe while a request is booked on it: it leaves,
    // its index entries and its load go with it.
    let pinned = RouteInput {
        tokens: &tokens,
        pinned_worker: Some(id0),
        ..Default::default()
    };
    let booking = f
        .fleet
        .router
        .route(&pinned)
        .await
        .expect("booked on vllm-0");
    let rank0 = WorkerWithDpRank::new(id0, 0);
    assert_eq!(f.fleet.router.loads([rank0])[0].active_requests, 1);
    api.modify("vllm-0", |p| set_ready(p, false));
    assert!(
        eventually(5.0, || routable_urls(&f.fleet)
            == vec![w[1].info.url.clone()])
        .await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    assert!(f.fleet.registry.get(id0).is_none());
    assert!(
        eventually(5.0, || indexed_blocks(&f, id0) == 0).await,
        "index not cleared: {}",
        indexed_blocks(&f, id0)
    );
    assert_eq!(
        f.fleet.router.loads([rank0])[0].active_requests,
        0,
        "load cleared"
    );
    drop(booking);
    let (st, served, _) = complete(&c, &url, completion_body(&tokens, 2)).await;
    assert_eq!((st, served), (200, Some(id1)));

    // Ready again: back under the same id, with an empty index that fills again.
    api.modify("vllm-0", |p| set_ready(p, true));
    assert!(eventually(5.0, || routable_urls(&f.fleet) == both).await);
    let again = RouteInput {
        tokens: &tokens,
        pinned_worker: Some(id0),
        ..Default::default()
    };
    drop(f.fleet.router.route(&again).await.expect("vllm-0 is back"));
    // A status change that is no change to the worker (a probe time) re-registers nothing.
    let added = metric(&metrics_when(&c, &url, ADDED, |n| n >= 3.0).await, ADDED);
    api.modify("vllm-0", |p| {
        p["status"]["conditions"][0]["lastProbeTime"] = "2025-09-18T09:05:00Z".into()
    });
    // The misannotated pod changes too: it is not reported again.
    api.modify("vllm-bad", |p| set_ready(p, false));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = metrics_text(&c, &url).await;
    assert_eq!(metric(&m, ADDED), added);

    // Deleted: gone.
    api.delete("vllm-1");
    assert!(
        eventually(5.0, || routable_urls(&f.fleet)
            == vec![w[0].info.url.clone()])
        .await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    assert!(f.fleet.registry.get(id1).is_none());

    let m = metrics_when(&c, &url, REMOVED, |n| n >= 2.0).await;
    // vllm-0, vllm-1, vllm-0 again.
    assert_eq!(metric(&m, ADDED), 3.0, "{m}");
    assert_eq!(metric(&m, REMOVED), 2.0, "{m}");
    assert_eq!(metric(&m, "kvrouter_discovery_rejected_total"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "kvrouter_discovery_watch_restarts_total"),
        0.0,
        "{m}"
    );
    assert_eq!(api.lists().len(), 1, "one list, then the watch");
    f.stop().await;
    for w in w {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_watch_resumes_after_a_dropped_connection_and_lists_again_after_410_gone() {
    let api = FakeApi::start().await;
    let w = mock_workers(3, DisaggregationMode::Agg).await;
    api.put(worker_pod("pod-vllm-ready.json", "vllm-0", UIDS[0], &w[0]));
    api.put(worker_pod("pod-vllm-ready.json", "vllm-1", UIDS[1], &w[1]));
    let selector = "app.kubernetes.io/name=vllm,kvrouter.dev/worker=true";
    let f = frontend(api.kubeconfig(), |fc| {
        fc.fleet.discovery.namespace = Some("kvrouter".into());
        fc.fleet.discovery.worker_selector = selector.into();
    })
    .await;
    let (c, url) = (client(), f.url());
    let url_of = |i: usize| w[i].info.url.clone();
    let (id0, id1, id2) = (id_of(UIDS[0]), id_of(UIDS[1]), id_of(UIDS[2]));
    assert!(
        eventually(5.0, || routable_urls(&f.fleet)
            == sorted(vec![url_of(0), url_of(1)]))
        .await
    );
    assert_eq!(api.lists(), [selector]);
    assert!(eventually(5.0, || api.open_watches() == 1).await);

    // Changes the watch does not select move the version on; a bookmark tells the router.
    let mut other = worker_pod("pod-vllm-ready.json", "nats-0", "c0ffee", &w[2]);
    other["metadata"]["labels"] = json!({"app.kubernetes.io/name": "nats"});
    api.put(other);
    api.modify("nats-0", |p| set_ready(p, false));
    let bookmarked = api.bookmark();
    // (The bookmark reaches the router before the connection breaks.)
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The connection drops mid-watch; meanwhile vllm-1 turns unready. The router watches
    // again from the bookmark's version (no new list) and sees it.
    api.drop_connections(|s| {
        let mut p = s.pods["vllm-1"].clone();
        set_ready(&mut p, false);
        s.change("MODIFIED", p);
    });
    assert!(
        eventually(5.0, || routable_urls(&f.fleet) == vec![url_of(0)]).await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    assert_eq!(
        api.watches()[1],
        bookmarked,
        "resumed from the last version: {:?}",
        api.watches()
    );
    assert_eq!(api.lists().len(), 1, "a resumed watch lists nothing");
    api.modify("vllm-1", |p| set_ready(p, true));
    assert!(
        eventually(5.0, || routable_urls(&f.fleet)
            == sorted(vec![url_of(0), url_of(1)]))
        .await
    );
    // vllm-0, vllm-1, vllm-1 again.
    let m = metrics_when(&c, &url, ADDED, |n| n >= 3.0).await;
    assert_eq!(
        metric(&m, "kvrouter_discovery_watch_restarts_total"),
        1.0,
        "{m}"
    );
    let added = metric(&m, ADDED);

    // 410 Gone on the open watch (the watch cache moved on): the router lists again.
    // Meanwhile vllm-0 was deleted and vllm-2 added, and the history is compacted.
    assert!(eventually(5.0, || api.open_watches() == 1).await);
    {
        let mut s = api.lock();
        // Changes this watch never gets.
        let open: Vec<_> = s.watchers.drain(..).collect();
        let from = s.version;
        let pod = s.pods["vllm-0"].clone();
        s.change("DELETED", pod);
        s.change(
            "ADDED",
            worker_pod("pod-vllm-ready.json", "vllm-2", UIDS[2], &w[2]),
        );
        s.history.clear();
        s.expired_below = s.version;
        let oldest = s.expired_below;
        for (_, tx) in open {
            let _ = tx.send(Ok(gone_line(from, oldest)));
        }
    }
    assert!(
        eventually(5.0, || routable_urls(&f.fleet)
            == sorted(vec![url_of(1), url_of(2)]))
        .await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    assert_eq!(api.lists().len(), 2, "listed again after 410");
    assert!(
        f.fleet.registry.get(id0).is_none(),
        "deleted while unwatched: gone"
    );
    assert_eq!(f.fleet.registry.all().len(), 2, "nothing duplicated");
    metrics_when(&c, &url, ADDED, |n| n > added).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = metrics_text(&c, &url).await;
    assert_eq!(
        metric(&m, ADDED),
        added + 1.0,
        "vllm-1 was kept, not registered again: {m}"
    );
    assert!(f.fleet.registry.get(id1).is_some() && f.fleet.registry.get(id2).is_some());

    // The connection drops and the version it had is compacted away meanwhile: the watch
    // from it gets a 410 ERROR event, and the router lists again.
    assert!(eventually(5.0, || api.open_watches() == 1).await);
    api.drop_connections(|s| {
        let pod = s.pods["vllm-1"].clone();
        s.change("DELETED", pod);
        s.history.clear();
        s.expired_below = s.version;
    });
    assert!(
        eventually(5.0, || routable_urls(&f.fleet) == vec![url_of(2)]).await,
        "{:?}",
        routable_urls(&f.fleet)
    );
    assert_eq!(api.lists().len(), 3);
    // It watches from the new list's version, and events flow again.
    assert!(eventually(5.0, || api.open_watches() == 1).await);
    api.put(worker_pod("pod-vllm-ready.json", "vllm-0", UIDS[0], &w[0]));
    assert!(
        eventually(5.0, || routable_urls(&f.fleet)
            == sorted(vec![url_of(0), url_of(2)]))
        .await
    );
    let (st, _, v) = complete(&c, &url, completion_body(&prompt(8, 300), 2)).await;
    assert_eq!(st, 200, "{v}");
    let m = metrics_text(&c, &url).await;
    assert_eq!(
        metric(&m, "kvrouter_discovery_watch_restarts_total"),
        4.0,
        "{m}"
    );
    assert_eq!(f.fleet.registry.all().len(), 2);
    f.stop().await;
    for w in w {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_router_takes_the_pods_of_its_endpoint_only() {
    use kvrouter_server::router_service::{RouterService, RouterServiceConfig};
    let api = FakeApi::start().await;
    let w = mock_workers(2, DisaggregationMode::Agg).await;
    let mut prefill = worker_pod("pod-vllm-ready.json", "vllm-prefill-0", UIDS[0], &w[0]);
    prefill["metadata"]["annotations"]["kvrouter.dev/endpoint"] = "dynamo.prefill.generate".into();
    prefill["metadata"]["annotations"]["kvrouter.dev/role"] = "prefill".into();
    api.put(prefill);
    // No endpoint annotation: the default endpoint's (the frontend's) worker.
    api.put(worker_pod("pod-vllm-ready.json", "vllm-0", UIDS[1], &w[1]));
    let mut rc = RouterServiceConfig::new("dynamo.prefill.generate", 64);
    rc.fleet.discovery_backend = DiscoveryBackend::Kubernetes;
    rc.fleet.discovery.kubeconfig = Some(api.kubeconfig());
    let r = RouterService::start(rc, Vec::new())
        .await
        .expect("router starts (it announces nothing in Kubernetes)");
    let want = vec![w[0].info.url.clone()];
    assert!(
        eventually(5.0, || routable_urls(&r.fleet) == want).await,
        "{:?}",
        routable_urls(&r.fleet)
    );
    let spec = r
        .fleet
        .registry
        .get(id_of(UIDS[0]))
        .expect("by the pod's id")
        .spec
        .clone();
    assert_eq!(spec.role, kvrouter_core::WorkerRole::Prefill);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        routable_urls(&r.fleet),
        want,
        "the other endpoint's pod stays out"
    );
    assert_eq!(api.lock().unauthorized, 0);
    r.stop().await;
    for w in w {
        w.stop().await;
    }
}
