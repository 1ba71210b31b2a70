//! The router queue and the `aic` prefill load model over real sockets (issue 15 item 3).

use kvrouter_core::RouterMode;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn requests_wait_in_the_router_while_every_worker_is_prefilling() {
    // Threshold 0: a request waits while every worker has any prefill in flight. Real model
    // time, so prefills overlap.
    let s = stack(RouterMode::Kv, 2, |c| {
        c.mocker.speedup_ratio = 1.0;
        c.frontend.router.router_queue_threshold = Some(0.0);
        c.frontend.router.router_queue_policy = kvrouter_core::queue::QueuePolicy::Wspt;
    })
    .await;
    let c = client();
    let url = s.url();
    let sends = (0..10u32).map(|i| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let mut body = completion_body(&prompt(i, 3000), 2);
            if i == 9 {
                body["nvext"] = json!({"agent_hints": {"priority": 5.0, "strict_priority": 1}});
            }
            complete(&c, &url, body).await
        })
    });
    for r in futures::future::join_all(sends).await {
        let (st, _, v) = r.unwrap();
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    }
    let m = metrics_text(&c, &url).await;
    let waited = metric(&m, "kvrouter_router_queue_wait_seconds_count");
    assert!(
        waited >= 5.0,
        "10 concurrent prefills on 2 workers: most waited in the router ({waited})\n{m}"
    );
    assert_eq!(metric(&m, "kvrouter_router_queue_pending_requests"), 0.0);
    assert!(
        eventually(5.0, || all_idle(&s)).await,
        "nothing left booked"
    );
    // A bad hint is a 400, not a silent default.
    let mut body = completion_body(&prompt(99, 10), 1);
    body["nvext"] = json!({"agent_hints": {"strict_priority": "high"}});
    let (st, _, v) = complete(&c, &url, body).await;
    assert_eq!(st, 400, "{v}");
    s.stop().await;
}

#[tokio::test]
async fn a_full_router_queue_answers_503_and_books_nothing() {
    let s = stack(RouterMode::Kv, 1, |c| {
        c.mocker.speedup_ratio = 1.0;
        c.frontend.router.router_queue_threshold = Some(0.0);
        c.frontend.router.router_queue_limit = 1;
    })
    .await;
    let c = client();
    let url = s.url();
    let sends = (0..6u32).map(|i| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { complete(&c, &url, completion_body(&prompt(i, 4000), 2)).await })
    });
    let mut codes = Vec::new();
    for r in futures::future::join_all(sends).await {
        let (st, _, v) = r.unwrap();
        if st == 503 {
            let msg = v["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains("router queue is full"), "{v}");
        }
        codes.push(st);
    }
    assert!(codes.contains(&200) && codes.contains(&503), "{codes:?}");
    let m = metrics_text(&c, &url).await;
    assert!(
        metric(&m, "kvrouter_router_queue_rejected_total") >= 1.0,
        "{m}"
    );
    assert!(eventually(5.0, || all_idle(&s)).await);
    s.stop().await;
}

#[tokio::test]
async fn the_aic_model_learns_prefill_time_from_first_tokens() {
    let s = stack(RouterMode::Kv, 1, |c| {
        c.mocker.speedup_ratio = 1.0;
        c.frontend.router.router_prefill_load_model =
            kvrouter_core::prefill_time::PrefillLoadModel::Aic;
    })
    .await;
    let c = client();
    let url = s.url();
    let m = metrics_text(&c, &url).await;
    assert!(
        !m.contains("router_prefill_time_coefficient"),
        "nothing known yet"
    );
    // One at a time: each request has the worker to itself, a clean sample.
    for i in 0..12u32 {
        let n = 500 + 700 * i as usize;
        let (st, _, v) = complete(&c, &url, completion_body(&prompt(i, n), 1)).await;
        assert_eq!(st, 200, "{v}");
    }
    let m = metrics_text(&c, &url).await;
    let coef = |term: &str| {
        metric(
            &m,
            &format!("kvrouter_router_prefill_time_coefficient{{term=\"{term}\"}}"),
        )
    };
    let predicted =
        coef("base_ms") + coef("per_token_ms") * 4096.0 + coef("per_token2_ms") * 4096.0f64.powi(2);
    // The mock engine's model: 85.75 ms for 4,096 tokens, plus HTTP and scheduling time.
    assert!(
        (40.0..400.0).contains(&predicted),
        "fitted prediction for 4096 tokens: {predicted} ms\n{m}"
    );
    s.stop().await;
}
