//! Connection and request limits (issue 13 items 1–2): idle and slow connections are closed,
//! a body that never arrives is not in flight and ends in 408, the connection cap refuses with
//! 503 and leaves the admin API working, `--max-tokens-limit` bounds generation and
//! `--no-client-routing-overrides` refuses routing hints.
use std::time::Duration;

use kvrouter_core::RouterMode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Read until the server closes the connection; returns what it sent, or `None` if it was
/// still open after `secs`.
async fn read_until_closed(tcp: &mut TcpStream, secs: f64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(Duration::from_secs_f64(secs), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    r.ok().map(|_| out)
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_connections_are_closed() {
    let s = stack(RouterMode::Kv, 1, |c| {
        c.frontend.listener.http_idle_timeout_secs = 0.5
    })
    .await;
    let a = addr(&s.url());
    // Idle: connected, nothing sent.
    let mut idle = TcpStream::connect(&a).await.unwrap();
    // Slow header: a head that never completes.
    let mut slow = TcpStream::connect(&a).await.unwrap();
    slow.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut idle, 10.0).await.is_some(),
        "idle connection kept open"
    );
    assert!(
        read_until_closed(&mut slow, 10.0).await.is_some(),
        "slow-header connection kept open"
    );
    // A kept-alive connection is closed once idle too, after serving.
    let mut ka = TcpStream::connect(&a).await.unwrap();
    ka.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut ka, 10.0)
        .await
        .expect("closed when idle");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_is_not_in_flight_and_times_out() {
    let s = stack(RouterMode::Kv, 1, |c| {
        c.frontend.listener.http_body_timeout_secs = 1.0
    })
    .await;
    let c = client();
    let url = s.url();
    let mut tcp = TcpStream::connect(addr(&url)).await.unwrap();
    tcp.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = metrics_text(&c, &url).await;
    assert_eq!(
        metric(&m, "kvrouter_frontend_inflight_requests"),
        0.0,
        "a request without its body counts as in flight"
    );
    let got = read_until_closed(&mut tcp, 10.0)
        .await
        .expect("answered and closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let m = metrics_text(&c, &url).await;
    assert_eq!(
        metric(&m, "kvrouter_frontend_request_body_errors_total"),
        1.0
    );
    assert_eq!(metric(&m, "kvrouter_frontend_inflight_requests"), 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_refuses_with_503_and_the_admin_api_stays_up() {
    let s = stack(RouterMode::Kv, 1, |c| {
        c.frontend.listener.max_connections = Some(4)
    })
    .await;
    let a = addr(&s.url());
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(&a).await.unwrap());
    }
    // Let the accept loop take all four before the fifth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = TcpStream::connect(&a).await.unwrap();
    fifth
        .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut fifth, 10.0)
        .await
        .expect("refused and closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("too many open connections"), "{text}");
    // The admin API has its own budget.
    let c = client();
    let admin = s.frontend.admin_url().unwrap();
    assert_eq!(get_status(&c, &format!("{admin}/v1/workers")).await, 200);
    // Freed slots serve again; the refusal was counted.
    drop(held);
    let mut ok = false;
    for _ in 0..50 {
        let r = c.get(format!("{}/metrics", s.url())).send().await;
        if let Ok(r) = r {
            if r.status() == 200 {
                let m = r.text().await.unwrap();
                assert!(metric(&m, "kvrouter_frontend_refused_connections_total") >= 1.0);
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ok,
        "the API did not serve again after the held connections closed"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_limit_bounds_generation() {
    let s = stack(RouterMode::Kv, 1, |c| c.frontend.max_tokens_limit = Some(5)).await;
    let c = client();
    let url = s.url();
    let (st, _, v) = complete(&c, &url, completion_body(&prompt(1, 40), 6)).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens");
    // Without max_tokens the worker is asked for the limit, not the whole context.
    let (st, _, v) = complete(
        &c,
        &url,
        json!({"model": MODEL, "prompt": prompt(2, 40), "ignore_eos": true}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_hints_can_be_refused_for_untrusted_clients() {
    let s = stack(RouterMode::Kv, 2, |c| {
        c.frontend.no_client_routing_overrides = true
    })
    .await;
    let c = client();
    let url = s.url();
    for nvext in [
        json!({"backend_instance_id": 0}),
        json!({"dp_rank": 0}),
        json!({"router_config_override": {"router_temperature": 1.0}}),
    ] {
        let mut body = completion_body(&prompt(3, 40), 2);
        body["nvext"] = nvext.clone();
        let (st, _, v) = complete(&c, &url, body).await;
        assert_eq!(st, 403, "{nvext}: {v}");
        assert_eq!(v["error"]["param"], "nvext");
    }
    let (st, _, v) = complete(&c, &url, completion_body(&prompt(3, 40), 2)).await;
    assert_eq!(st, 200, "plain requests still served: {v}");
    s.stop().await;
}
