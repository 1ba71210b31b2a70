//! Prefill/decode disaggregation through the frontend, with mock prefill and decode workers
//! over real HTTP and ZMQ (issue 16 item 2).

use kvrouter_core::{RolePool, RouterMode, WorkerRole};
use kvrouter_server::up::EmbeddedStack;
use kvrouter_server::workers::spec::DisaggProtocol;

use crate::common::*;

const PREFILL_HEADER: &str = kvrouter_server::frontend::PREFILL_WORKER_HEADER;

async fn disagg_stack(
    protocol: DisaggProtocol,
    tweak: impl FnOnce(&mut kvrouter_server::up::UpConfig),
) -> EmbeddedStack {
    stack(RouterMode::Kv, 0, |c| {
        c.prefill = 2;
        c.decode = 2;
        c.disagg_protocol = protocol;
        c.mocker.kv_transfer_bandwidth = 0.0;
        tweak(c);
    })
    .await
}

fn role_of(s: &EmbeddedStack, id: u64) -> WorkerRole {
    s.frontend
        .fleet
        .registry
        .get(id)
        .expect("registered")
        .spec
        .role
}

/// A completion: (status, decode worker, prefill worker, body).
async fn send(
    c: &reqwest::Client,
    url: &str,
    tokens: &[u32],
) -> (u16, Option<u64>, Option<u64>, serde_json::Value) {
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&completion_body(tokens, 4))
        .send()
        .await
        .expect("sent");
    let prefill = r
        .headers()
        .get(PREFILL_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (
        r.status().as_u16(),
        worker_of(&r),
        prefill,
        r.json().await.unwrap_or_default(),
    )
}

/// Prompt tokens the worker computed (not taken from its cache or a transfer).
async fn computed(c: &reqwest::Client, s: &EmbeddedStack, id: u64) -> f64 {
    let url = s.frontend.fleet.registry.get(id).unwrap().spec.url.clone();
    metric(
        &metrics_text(c, &url).await,
        "kvrouter_mocker_computed_prefill_tokens_total",
    )
}

#[tokio::test]
async fn vllm_protocol_prefills_by_overlap_then_decodes_from_the_transfer() {
    let s = disagg_stack(DisaggProtocol::Vllm, |_| {}).await;
    let (c, url) = (client(), s.url());
    let p = prompt(7, 2000);
    let (st, decode, prefill, v) = send(&c, &url, &p).await;
    assert_eq!(st, 200, "{v}");
    let (decode, prefill) = (decode.unwrap(), prefill.expect("prefill worker header"));
    assert_eq!(role_of(&s, prefill), WorkerRole::Prefill);
    assert_eq!(role_of(&s, decode), WorkerRole::Decode);
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    // The decode worker stored the transferred blocks and published them: the router sees them.
    let router = &s.frontend.fleet.router;
    assert!(
        eventually(5.0, || router.best_cached_tokens(
            &p,
            RolePool::Only(WorkerRole::Decode),
            &Default::default()
        ) >= 1984)
        .await,
        "the decode worker's KV events show the transferred blocks"
    );
    // And the prefill worker's own events: until they arrive the router has no reason to
    // prefer it (CI once raced here).
    assert!(
        eventually(5.0, || router.best_cached_tokens(
            &p,
            RolePool::Only(WorkerRole::Prefill),
            &Default::default()
        ) >= 1984)
        .await,
        "the prefill worker's KV events show the prompt"
    );
    // The repeat goes back to the prefill worker holding the prompt, which computes almost
    // nothing of it (its last partial block at most).
    let before = computed(&c, &s, prefill).await;
    let (st, _, prefill2, v) = send(&c, &url, &p).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        prefill2,
        Some(prefill),
        "the repeat's prefill went elsewhere"
    );
    let more = computed(&c, &s, prefill).await - before;
    assert!(more < 64.0, "the repeat recomputed {more} prompt tokens");
    // Streamed too; everything booked is released.
    let r = start_stream(&c, &url, completion_body(&prompt(8, 1500), 4)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key(PREFILL_HEADER));
    let body = r.text().await.unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    assert!(
        eventually(5.0, || all_idle(&s)).await,
        "loads return to zero"
    );
    s.stop().await;
}

#[tokio::test]
async fn failed_prefill_or_decode_is_the_clients_error_and_books_nothing() {
    use kvrouter_server::WorkerSpec;
    // A prefill worker that answers without kv_transfer_params (an aggregated engine registered
    // as prefill), and one that is down: errors naming the prefill, never a silent aggregated
    // run.
    let s = stack(RouterMode::Kv, 1, |c| {
        c.decode = 2;
        c.mocker.kv_transfer_bandwidth = 0.0;
        c.frontend.fleet.health_interval_ms = 60_000;
    })
    .await;
    let (c, url) = (client(), s.url());
    let agg_url = s.workers[0].info.url.clone();
    let fleet = &s.frontend.fleet;
    let agg_id = fleet
        .registry
        .all()
        .iter()
        .find(|w| w.spec.url == agg_url)
        .unwrap()
        .id();
    fleet.deregister(agg_id).await;
    let no_params = fleet
        .register(WorkerSpec {
            role: WorkerRole::Prefill,
            model: Some(s.workers[0].info.model.clone()),
            ..WorkerSpec::from_url(&agg_url)
        })
        .unwrap();
    let (st, decode, _, v) = send(&c, &url, &prompt(2, 1000)).await;
    assert_eq!(st, 502, "{v}");
    assert_eq!(decode, None);
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("prefill failed") && msg.contains("kv_transfer_params"),
        "{v}"
    );
    assert!(
        eventually(5.0, || all_idle(&s)).await,
        "no params: loads back to zero"
    );
    fleet.deregister(no_params.id.unwrap()).await;
    fleet
        .register(WorkerSpec {
            role: WorkerRole::Prefill,
            ..WorkerSpec::from_url("http://127.0.0.1:9")
        })
        .unwrap();
    let (st, _, _, v) = send(&c, &url, &prompt(3, 1000)).await;
    assert!(st >= 500, "{st} {v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("prefill failed"), "{v}");
    assert!(
        eventually(5.0, || all_idle(&s)).await,
        "prefill down: loads back to zero"
    );
    s.stop().await;
    // Decode workers down: the prefill runs, the decode fails, nothing stays booked.
    let mut s = disagg_stack(DisaggProtocol::Vllm, |_| {}).await;
    let (c, url) = (client(), s.url());
    let decode_ids: Vec<u64> = s
        .frontend
        .fleet
        .registry
        .all()
        .iter()
        .filter(|w| w.spec.role == WorkerRole::Decode)
        .map(|w| w.id())
        .collect();
    for id in decode_ids {
        kill_worker(&mut s, id).await;
    }
    let (st, _, _, v) = send(&c, &url, &prompt(1, 1000)).await;
    assert!(st >= 500, "{st} {v}");
    assert!(
        eventually(5.0, || all_idle(&s)).await,
        "decode down: loads back to zero"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_expired_transfer_fails_and_a_cancelled_request_frees_its_load() {
    let s = disagg_stack(DisaggProtocol::Vllm, |c| {
        // The decode side takes 1 s per transferred block... and the prefill holds for 0.2 s:
        // no, the mocker's transfer timeout applies on the prefill side; a tiny one expires
        // before the decode pull arrives when the decode worker is slow to start it.
        c.mocker.kv_transfer_timeout = 0.000_001;
    })
    .await;
    let (c, url) = (client(), s.url());
    let (st, _, _, v) = send(&c, &url, &prompt(3, 1000)).await;
    assert!(st >= 400, "an expired transfer is an error: {st} {v}");
    assert!(
        eventually(5.0, || all_idle(&s)).await,
        "expired: loads back to zero"
    );
    s.stop().await;

    let s = disagg_stack(DisaggProtocol::Vllm, |c| c.mocker.speedup_ratio = 1.0).await;
    let (c, url) = (client(), s.url());
    let mut body = completion_body(&prompt(4, 1000), 200);
    body["stream"] = true.into();
    let mut r = c
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _first = r.chunk().await.unwrap();
    drop(r); // the client goes away mid-stream
    assert!(
        eventually(10.0, || all_idle(&s)).await,
        "cancelled: loads back to zero"
    );
    s.stop().await;
}

#[tokio::test]
async fn conditional_disaggregation_runs_short_uncached_prompts_on_decode() {
    let s = disagg_stack(DisaggProtocol::Vllm, |c| {
        c.frontend.conditional_disagg = true;
        c.frontend.disagg_isl_threshold = 1024;
    })
    .await;
    let (c, url) = (client(), s.url());
    let (st, decode, prefill, v) = send(&c, &url, &prompt(5, 300)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(prefill, None, "a short prompt skips the prefill pool");
    assert_eq!(role_of(&s, decode.unwrap()), WorkerRole::Decode);
    let (st, _, prefill, v) = send(&c, &url, &prompt(6, 3000)).await;
    assert_eq!(st, 200, "{v}");
    assert!(prefill.is_some(), "a long uncached prompt is disaggregated");
    assert!(eventually(5.0, || all_idle(&s)).await);
    s.stop().await;
}

#[tokio::test]
async fn sglang_protocol_sends_both_workers_one_bootstrap_room() {
    let s = disagg_stack(DisaggProtocol::Sglang, |_| {}).await;
    let (c, url) = (client(), s.url());
    for i in 0..3 {
        let (st, decode, prefill, v) = send(&c, &url, &prompt(20 + i, 1500)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(role_of(&s, prefill.unwrap()), WorkerRole::Prefill);
        assert_eq!(role_of(&s, decode.unwrap()), WorkerRole::Decode);
        assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    }
    assert!(eventually(5.0, || all_idle(&s)).await);
    s.stop().await;
}
