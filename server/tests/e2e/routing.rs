//! Routing behaviour seen from outside: KV hits, round-robin order, approximate mode.
use kvrouter_core::RouterMode;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_sends_a_repeated_prompt_back_to_the_worker_that_cached_it() {
    let s = stack(RouterMode::Kv, 4, |_| {}).await;
    let c = client();
    let url = s.url();
    let tokens = prompt(1, 1024); // 16 blocks of 64
    let (st, first, v) = complete(&c, &url, completion_body(&tokens, 4)).await;
    assert_eq!(st, 200, "{v}");
    let first = first.expect("worker header");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // The worker's KV events reach the index asynchronously.
    let index = s.frontend.fleet.router.index().clone();
    assert!(
        eventually(10.0, || index.current_size() >= 16).await,
        "events never arrived"
    );
    for _ in 0..3 {
        let (st, w, v) = complete(&c, &url, completion_body(&tokens, 4)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(w, Some(first), "repeat went elsewhere");
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        assert!(cached >= 960, "worker reports only {cached} cached tokens");
    }
    // A different prompt on an idle fleet is free to go anywhere, but the cache is per worker:
    // sending it to `first` too would only be chosen on a tie. Check the metrics saw the hits.
    let m = metrics_text(&c, &url).await;
    let predicted: f64 = metric(&m, "kvrouter_router_predicted_cached_tokens_total");
    assert!(
        predicted >= 3.0 * 960.0,
        "predicted cached tokens {predicted}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_cycles_through_the_workers() {
    let s = stack(RouterMode::RoundRobin, 4, |_| {}).await;
    let c = client();
    let tokens = prompt(2, 200);
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (st, w, v) = complete(&c, &s.url(), completion_body(&tokens, 2)).await;
        assert_eq!(st, 200, "{v}");
        seen.push(w.expect("worker header"));
    }
    let mut first4 = seen[..4].to_vec();
    first4.sort();
    first4.dedup();
    assert_eq!(first4.len(), 4, "round-robin skipped a worker: {seen:?}");
    assert_eq!(seen[..4], seen[4..], "not a cycle: {seen:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approximate_mode_routes_repeats_without_events() {
    let s = stack(RouterMode::Kv, 4, |c| c.frontend.router.no_kv_events = true).await;
    let c = client();
    let tokens = prompt(3, 1024);
    let (_, first, _) = complete(&c, &s.url(), completion_body(&tokens, 2)).await;
    for _ in 0..3 {
        let (st, w, v) = complete(&c, &s.url(), completion_body(&tokens, 2)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(w, first);
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        assert!(cached >= 960, "cached {cached}");
    }
    assert_eq!(
        s.frontend.fleet.router.index().current_size(),
        0,
        "events were consumed"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_selection_policy_routes_repeats_to_their_cache_and_requests_may_choose_one() {
    // The affinity policy from the command line; lmetric and default per request.
    let s = stack(RouterMode::Kv, 3, |c| {
        c.frontend.router.router_selection_policy = kvrouter_core::SelectionPolicy::Affinity;
    })
    .await;
    let c = client();
    let url = s.url();
    let index = s.frontend.fleet.router.index().clone();
    for (i, policy) in [None, Some("lmetric"), Some("default")]
        .into_iter()
        .enumerate()
    {
        let tokens = prompt(10 + i as u32, 640); // 10 blocks of 64
        let body = |t: &[u32]| {
            let mut b = completion_body(t, 2);
            if let Some(p) = policy {
                b["nvext"] =
                    serde_json::json!({"router_config_override": {"router_selection_policy": p}});
            }
            b
        };
        let before = index.current_size();
        let (st, first, v) = complete(&c, &url, body(&tokens)).await;
        assert_eq!(st, 200, "{policy:?}: {v}");
        assert!(
            eventually(10.0, || index.current_size() >= before + 10).await,
            "events never arrived"
        );
        let (st, again, v) = complete(&c, &url, body(&tokens)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(again, first, "{policy:?}: the repeat went elsewhere");
        assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() >= Some(576));
    }
    // An unknown policy is a clear 400.
    let mut b = completion_body(&prompt(1, 64), 2);
    b["nvext"] = serde_json::json!({"router_config_override": {"router_selection_policy": "best"}});
    let (st, _, v) = complete(&c, &url, b).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("router_config_override"),
        "{v}"
    );
    s.stop().await;
}
