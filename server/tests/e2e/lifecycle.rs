//! Booking lifecycle: after any mix of completed, failed and cancelled requests every rank's
//! active load is back to zero.
use futures::StreamExt;
use kvrouter_core::RouterMode;
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_returns_to_zero_after_completed_failed_and_cancelled_requests() {
    let mut s = stack(RouterMode::Kv, 3, |c| c.mocker.speedup_ratio = 1.0).await;
    let c = client();
    let url = s.url();
    // Long streams to be cancelled, on every worker (distinct prompts spread by load).
    let mut held = Vec::new();
    for i in 0..6 {
        let mut body = completion_body(&prompt(100 + i, 512), 2000);
        body["stream"] = json!(true);
        let r = c
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    let booked: u64 = s
        .frontend
        .fleet
        .router
        .ranks()
        .iter()
        .map(|(_, l)| l.active_requests as u64)
        .sum();
    assert_eq!(booked, 6, "six streams are booked");
    // Completed requests, streamed and not.
    for i in 0..4 {
        let mut body = completion_body(&prompt(200 + i, 300), 3);
        body["stream"] = json!(i % 2 == 0);
        let r = c
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    // Cancel half of the streams after their first chunk, the rest before any.
    for (i, r) in held.drain(..).enumerate() {
        if i % 2 == 0 {
            let mut st = r.bytes_stream();
            let _ = st.next().await;
        }
    }
    // Fail requests in flight: kill a worker while streams run on it.
    let r = start_stream(&c, &url, completion_body(&prompt(300, 256), 2000)).await;
    let victim = worker_of(&r).unwrap();
    kill_worker(&mut s, victim).await;
    let _ = r.bytes().await;
    assert!(
        eventually(10.0, || all_idle(&s)).await,
        "load still booked: {:?}",
        s.frontend.fleet.router.ranks()
    );
    let m = metrics_text(&c, &url).await;
    assert!(
        metric(&m, "kvrouter_frontend_inflight_requests") == 0.0,
        "in-flight gauge not back to 0"
    );
    assert!(metric(&m, "kvrouter_frontend_disconnected_clients_total") >= 6.0);
    s.stop().await;
}
