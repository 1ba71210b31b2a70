//! The frontend asking `kvrouter router`s to choose workers, over real sockets (issue 16 items
//! 3 and 5): the reference's two-router layout (`--prefill-router`: a standalone router for the
//! prefill pool, the frontend routing decode) and router pools (`--pool NAME=URL` with
//! `--pool-policy probe|isl`). Mock workers on loopback HTTP and ZMQ.

use kvrouter_core::RouterMode;
use kvrouter_mocker::{DisaggregationMode, RunningWorker};
use kvrouter_server::config::FrontendConfig;
use kvrouter_server::frontend::{POOL_HEADER, PREFILL_WORKER_HEADER};
use kvrouter_server::router_service::{RouterService, RouterServiceConfig};
use kvrouter_server::up::worker_spec;
use kvrouter_server::Frontend;
use serde_json::{json, Value};

use crate::common::*;

/// A `kvrouter router` for `endpoint` in front of `workers` (64-token blocks).
async fn router(
    endpoint: &str,
    workers: &[RunningWorker],
    tweak: impl FnOnce(&mut RouterServiceConfig),
) -> RouterService {
    let mut cfg = RouterServiceConfig::new(endpoint, 64);
    cfg.fleet.health_interval_ms = 100;
    tweak(&mut cfg);
    RouterService::start(cfg, workers.iter().map(worker_spec).collect())
        .await
        .expect("router starts")
}

async fn frontend(workers: &[RunningWorker], tweak: impl FnOnce(&mut FrontendConfig)) -> Frontend {
    let mut cfg = FrontendConfig {
        router_mode: RouterMode::Kv,
        ..FrontendConfig::default()
    };
    cfg.fleet.health_interval_ms = 100;
    tweak(&mut cfg);
    Frontend::start(cfg, workers.iter().map(worker_spec).collect())
        .await
        .expect("frontend starts")
}

/// A completion: (status, the response's headers, body).
async fn send(
    c: &reqwest::Client,
    url: &str,
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    let (st, h) = (r.status().as_u16(), r.headers().clone());
    (st, h, r.json().await.unwrap_or_default())
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(String::from)
}

/// Prompt tokens the worker at `url` computed (not taken from its cache or a transfer).
async fn computed(c: &reqwest::Client, url: &str) -> f64 {
    metric(
        &metrics_text(c, url).await,
        "kvrouter_mocker_computed_prefill_tokens_total",
    )
}

#[tokio::test]
async fn the_two_router_layout_prefills_through_the_standalone_router() {
    // The reference's layout: `kvrouter router --endpoint dynamo.prefill.generate
    // --router-block-size 64 --no-router-track-active-blocks` for the prefill pool, the
    // frontend with `--kv-overlap-score-weight 0` routing decode. Every worker is given to both:
    // each takes the ones it routes (the router by endpoint, the frontend by role).
    let mut all = mock_workers(2, DisaggregationMode::Prefill).await;
    all.extend(mock_workers(2, DisaggregationMode::Decode).await);
    let r = router("dynamo.prefill.generate", &all, |c| {
        c.router.router_track_active_blocks = Some(false);
    })
    .await;
    assert_eq!(
        r.fleet.registry.all().len(),
        2,
        "the router took the prefill workers"
    );
    let f = frontend(&all, |c| {
        c.prefill_router = Some(r.url());
        c.router.kv_overlap_score_weight = Some(0.0);
    })
    .await;
    let (c, url) = (client(), f.url());
    let p = prompt(11, 2000);
    let (st, h, v) = send(&c, &url, completion_body(&p, 4)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    let prefill: u64 = header(&h, PREFILL_WORKER_HEADER)
        .expect("prefill header")
        .parse()
        .unwrap();
    let p_url = r
        .fleet
        .registry
        .get(prefill)
        .expect("the router's worker")
        .spec
        .url
        .clone();
    let decode = worker_of_headers(&h);
    let d_spec = f
        .fleet
        .registry
        .get(decode)
        .expect("a frontend worker")
        .spec
        .clone();
    assert_eq!(d_spec.role, kvrouter_core::WorkerRole::Decode);
    // The router learns the prefill worker's cache from its KV events; the repeat goes back
    // there and computes (almost) nothing.
    let index = r.fleet.router.index().clone();
    assert!(
        eventually(10.0, || index.current_size() >= 31).await,
        "prefill events never arrived"
    );
    let before = computed(&c, &p_url).await;
    let (st, h, v) = send(&c, &url, completion_body(&p, 4)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(header(&h, PREFILL_WORKER_HEADER), Some(prefill.to_string()));
    let more = computed(&c, &p_url).await - before;
    assert!(more < 64.0, "the repeat recomputed {more} prompt tokens");
    // Streamed and cancelled requests leave nothing booked on either side.
    let resp = start_stream(&c, &url, completion_body(&prompt(12, 1500), 200)).await;
    assert_eq!(resp.status(), 200);
    drop(resp);
    assert!(
        eventually(5.0, || fleet_idle(&r.fleet) && fleet_idle(&f.fleet)).await,
        "loads return to zero on the router and the frontend"
    );

    // Conditional disaggregation decides on the router's answer: a short uncached prompt runs
    // whole on a decode worker, and its prefill booking is released; a long one is split.
    f.stop().await;
    let f = frontend(&all, |c| {
        c.prefill_router = Some(r.url());
        c.conditional_disagg = true;
        c.disagg_isl_threshold = 1000;
    })
    .await;
    let url = f.url();
    let (st, h, v) = send(&c, &url, completion_body(&prompt(13, 300), 2)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        header(&h, PREFILL_WORKER_HEADER),
        None,
        "short: whole on decode"
    );
    let (st, h, v) = send(&c, &url, completion_body(&prompt(14, 1500), 2)).await;
    assert_eq!(st, 200, "{v}");
    assert!(header(&h, PREFILL_WORKER_HEADER).is_some(), "long: split");
    assert!(
        eventually(5.0, || fleet_idle(&r.fleet) && fleet_idle(&f.fleet)).await,
        "conditional: loads return to zero"
    );
    // The prefill router down: the client's error, named as the prefill's; nothing booked.
    r.stop().await;
    let (st, _, v) = send(&c, &url, completion_body(&prompt(15, 1500), 2)).await;
    assert_eq!(st, 502, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("prefill failed") && msg.contains("router `prefill`"),
        "{v}"
    );
    assert!(
        eventually(5.0, || fleet_idle(&f.fleet)).await,
        "router down: nothing booked"
    );
    f.stop().await;
    for w in all {
        w.stop().await;
    }
}

fn worker_of_headers(h: &reqwest::header::HeaderMap) -> u64 {
    header(h, kvrouter_server::frontend::WORKER_HEADER)
        .expect("worker header")
        .parse()
        .unwrap()
}

/// Two pools of two aggregated workers, each behind its `kvrouter router`.
struct Pools {
    routers: Vec<RouterService>,
    workers: Vec<RunningWorker>,
}

impl Pools {
    async fn start() -> Self {
        let mut routers = Vec::new();
        let mut workers = Vec::new();
        for _ in 0..2 {
            let w = mock_workers(2, DisaggregationMode::Agg).await;
            routers.push(router("dynamo.backend.generate", &w, |_| {}).await);
            workers.extend(w);
        }
        Self { routers, workers }
    }

    fn flags(&self) -> Vec<kvrouter_server::frontend::pools::PoolArg> {
        ["a", "b"]
            .iter()
            .zip(&self.routers)
            .map(|(n, r)| format!("{n}={}", r.url()).parse().unwrap())
            .collect()
    }

    fn idle(&self) -> bool {
        self.routers.iter().all(|r| fleet_idle(&r.fleet))
    }

    async fn stop(self) {
        for r in self.routers {
            r.stop().await;
        }
        for w in self.workers {
            w.stop().await;
        }
    }
}

#[tokio::test]
async fn probe_sends_a_request_to_the_pool_holding_its_prefix() {
    let pools = Pools::start().await;
    let f = frontend(&[], |c| c.pools = pools.flags()).await;
    let (c, url) = (client(), f.url());
    // Warm pool b with a prompt through its own router.
    let p = prompt(21, 1024);
    let warm = c
        .post(format!("{}/v1/router/generate", pools.routers[1].url()))
        .json(&json!({"token_ids": p, "stop_conditions": {"max_tokens": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    let _ = warm.text().await;
    let index = pools.routers[1].fleet.router.index().clone();
    assert!(
        eventually(10.0, || index.current_size() >= 16).await,
        "events never arrived"
    );
    // The probe finds it there: pool b serves it from its cache.
    let (st, h, v) = send(&c, &url, completion_body(&p, 2)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(header(&h, POOL_HEADER).as_deref(), Some("b"), "{h:?}");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(cached >= 960, "cached {cached}");
    // Equal overlap (none): the least loaded pool. Load pool a with a booked request.
    let booked = c
        .post(format!(
            "{}/v1/router/best_worker_id",
            pools.routers[0].url()
        ))
        .json(&json!({"token_ids": prompt(22, 4000), "request_id": "hold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(booked.status(), 200);
    let booked = c
        .post(format!(
            "{}/v1/router/best_worker_id",
            pools.routers[0].url()
        ))
        .json(&json!({"token_ids": prompt(24, 4000), "request_id": "hold2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(booked.status(), 200);
    let (st, h, v) = send(&c, &url, completion_body(&prompt(23, 500), 2)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        header(&h, POOL_HEADER).as_deref(),
        Some("b"),
        "the less loaded pool"
    );
    for id in ["hold", "hold2"] {
        let freed = c
            .post(format!("{}/v1/router/free", pools.routers[0].url()))
            .json(&json!({"request_id": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(freed.status(), 200);
    }
    // Streamed, cancelled and completed requests alike leave both pools idle.
    let r = start_stream(&c, &url, completion_body(&prompt(25, 800), 300)).await;
    assert_eq!(r.status(), 200);
    drop(r);
    let r = start_stream(&c, &url, completion_body(&prompt(26, 800), 3)).await;
    assert!(r.text().await.unwrap().contains("[DONE]"));
    assert!(
        eventually(5.0, || pools.idle()).await,
        "pools' loads return to zero"
    );
    // A pool down is left out of the probe; all down is a 502, and the frontend not ready.
    assert_eq!(get_status(&c, &format!("{url}/ready")).await, 200);
    let Pools {
        mut routers,
        workers,
    } = pools;
    routers.remove(1).stop().await;
    let (st, h, v) = send(&c, &url, completion_body(&prompt(27, 300), 2)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(header(&h, POOL_HEADER).as_deref(), Some("a"));
    routers.remove(0).stop().await;
    let (st, _, v) = send(&c, &url, completion_body(&prompt(28, 300), 2)).await;
    assert_eq!(st, 502, "{v}");
    assert_eq!(get_status(&c, &format!("{url}/ready")).await, 503);
    let h = get_json(&c, &format!("{url}/health")).await;
    assert_eq!(
        (h["healthy_pools"].as_u64(), h["pools"].as_u64()),
        (Some(0), Some(2)),
        "{h}"
    );
    f.stop().await;
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test]
async fn isl_policy_sends_each_prompt_length_to_its_pool() {
    let pools = Pools::start().await;
    let f = frontend(&[], |c| {
        c.pools = pools.flags();
        c.pool_policy = kvrouter_server::frontend::pools::PoolPolicy::Isl;
        c.pool_isl = vec!["a=:1000".parse().unwrap(), "b=2000:".parse().unwrap()];
    })
    .await;
    let (c, url) = (client(), f.url());
    for (n, pool) in [(999, "a"), (10, "a"), (2000, "b"), (3000, "b")] {
        let (st, h, v) = send(&c, &url, completion_body(&prompt(n as u32, n), 2)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(header(&h, POOL_HEADER).as_deref(), Some(pool), "{n} tokens");
    }
    let (st, _, v) = send(&c, &url, completion_body(&prompt(1, 1500), 2)).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("1500 tokens"),
        "{v}"
    );
    assert!(
        eventually(5.0, || pools.idle()).await,
        "pools' loads return to zero"
    );
    f.stop().await;
    pools.stop().await;
}

/// What the hostile router answers `best_worker_id` with.
#[derive(Clone, Copy, Debug)]
enum Answer {
    NotJson,
    WrongShape,
    NoRegistration,
    DeadWorker,
    ServerError,
    Huge,
}

#[derive(Default)]
struct Hostile {
    answer: std::sync::Mutex<Option<Answer>>,
    freed: std::sync::Mutex<Vec<String>>,
}

/// A "router" whose `best_worker_id` answers are malformed in the way `state.answer` says,
/// and which records the ids it is asked to free.
async fn hostile_router(state: std::sync::Arc<Hostile>) -> String {
    use axum::extract::State;
    use axum::routing::{get, post};
    async fn best(
        State(h): State<std::sync::Arc<Hostile>>,
        body: String,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let booking = body.contains("request_id");
        let ok = json!({"worker_id": 7, "dp_rank": 0, "overlap_blocks": 0, "cached_tokens": 0});
        match h.answer.lock().unwrap().expect("a mode") {
            Answer::NotJson => "{not json".into_response(),
            Answer::WrongShape => axum::Json(json!({"worker_id": "seven"})).into_response(),
            Answer::NoRegistration => axum::Json(ok).into_response(),
            Answer::DeadWorker if booking => {
                let mut v = ok;
                v["registration"] = json!({"url": "http://127.0.0.1:9"});
                axum::Json(v).into_response()
            }
            Answer::DeadWorker => axum::Json(ok).into_response(),
            Answer::ServerError => {
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
            }
            Answer::Huge => "x".repeat(5 << 20).into_response(),
        }
    }
    async fn free(State(h): State<std::sync::Arc<Hostile>>, body: String) -> &'static str {
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        if let Some(id) = v["request_id"].as_str() {
            h.freed.lock().unwrap().push(id.to_string());
        }
        "{}"
    }
    let app = axum::Router::new()
        .route("/v1/router/best_worker_id", post(best))
        .route("/v1/router/free", post(free))
        .route("/v1/router/mark_prefill_complete", post(|| async { "{}" }))
        .route("/health", get(|| async { "{}" }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_hostile_router_answer_is_a_502_and_leaves_nothing_booked() {
    let state = std::sync::Arc::new(Hostile::default());
    let url = hostile_router(state.clone()).await;
    let mut prefill = mock_workers(1, DisaggregationMode::Decode).await;
    // The frontend asks it in both roles: as a pool, and as the prefill router.
    let pool = frontend(&[], |c| {
        c.pools = vec![format!("bad={url}").parse().unwrap()]
    })
    .await;
    let split = frontend(&prefill, |c| c.prefill_router = Some(url.clone())).await;
    let c = client();
    for answer in [
        Answer::NotJson,
        Answer::WrongShape,
        Answer::NoRegistration,
        Answer::DeadWorker,
        Answer::ServerError,
        Answer::Huge,
    ] {
        *state.answer.lock().unwrap() = Some(answer);
        for f in [&pool, &split] {
            let (st, _, v) = send(&c, &f.url(), completion_body(&prompt(1, 300), 2)).await;
            assert!(st == 502 || st == 503, "{answer:?}: {st} {v}");
            assert!(v["error"]["message"].is_string(), "{answer:?}: {v}");
            assert!(fleet_idle(&f.fleet), "{answer:?}: nothing booked here");
        }
    }
    // Bookings the router did make were freed there: an answer without a registration (once
    // per frontend) and a worker that could not be reached (three attempts per frontend).
    let frees = || state.freed.lock().unwrap().len();
    assert!(
        eventually(5.0, || frees() >= 8).await,
        "frees sent: {}",
        frees()
    );
    pool.stop().await;
    split.stop().await;
    for w in prefill.drain(..) {
        w.stop().await;
    }
}

/// Requests a router replica routed (its decisions counter).
async fn decisions(c: &reqwest::Client, r: &RouterService) -> f64 {
    metric(
        &metrics_text(c, &r.url()).await,
        "kvrouter_router_decisions_total",
    )
}

#[tokio::test]
async fn a_router_given_by_endpoint_name_is_every_replica_registered_in_discovery() {
    // Issue 18 item 4: `kvrouter router` replicas announce themselves; the frontend's
    // `--prefill-router dynamo.prefill.generate` follows them through the file backend.
    use kvrouter_server::config::DiscoveryBackend;
    let root = std::env::temp_dir().join(format!("kvr-replicas-{}", rand::random::<u64>()));
    let discovery = |f: &mut kvrouter_server::config::FleetArgs| {
        f.discovery_backend = DiscoveryBackend::File;
        f.discovery.file_kv = Some(root.clone());
        f.discovery.discovery_poll_ms = 50;
        f.discovery.discovery_lease_secs = 2.0;
    };
    let mut all = mock_workers(2, DisaggregationMode::Prefill).await;
    all.extend(mock_workers(1, DisaggregationMode::Decode).await);
    let mut replicas = Vec::new();
    for id in ["replica-a", "replica-b"] {
        replicas.push(
            router("dynamo.prefill.generate", &all, |c| {
                discovery(&mut c.fleet);
                c.fleet.replicas.router_id = Some(id.into());
            })
            .await,
        );
    }
    let f = frontend(&all, |c| {
        discovery(&mut c.fleet);
        c.prefill_router = Some("dynamo.prefill.generate".into());
    })
    .await;
    let (c, url) = (client(), f.url());
    // Until the first look at discovery no replica is known: a 503 naming the endpoint, then
    // both are taken in turn.
    let mut sent = 0;
    for i in 0..200 {
        let (st, _, v) = send(&c, &url, completion_body(&prompt(100 + i, 300), 2)).await;
        if st == 200 {
            sent += 1;
            if sent == 6 {
                break;
            }
        } else {
            assert_eq!(st, 503, "{v}");
            assert!(v.to_string().contains("dynamo.prefill.generate"), "{v}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        sent, 6,
        "requests never got through the discovered replicas"
    );
    let (a, b) = (
        decisions(&c, &replicas[0]).await,
        decisions(&c, &replicas[1]).await,
    );
    assert!(a >= 2.0 && b >= 2.0, "replicas took {a} and {b} of 6");
    // One replica stops (its registration removed): everything goes to the other.
    replicas.remove(0).stop().await;
    let before = decisions(&c, &replicas[0]).await;
    let mut ok = 0;
    for i in 0..100 {
        let (st, _, _) = send(&c, &url, completion_body(&prompt(300 + i, 300), 2)).await;
        ok += usize::from(st == 200);
        if ok == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ok, 4);
    assert!(decisions(&c, &replicas[0]).await - before >= 4.0);
    f.stop().await;
    for r in replicas {
        r.stop().await;
    }
    let _ = std::fs::remove_dir_all(root);
}
