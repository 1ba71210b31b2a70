//! Hostile worker registrations on the admin API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;

const TOKEN: &str = "faults-admin-token";

/// **Guarantee** — hostile registrations (`dp_size` 1024, a `file://` or credentialed URL, a
/// wildcard `kv_events_endpoint`, block size 0 or not the fleet's, a duplicate id or URL, a
/// 10 MB body) are each refused with a 4xx and a message before anything is started for them:
/// the frontend's thread count and RSS do not grow, the fleet is unchanged and still serves;
/// without the bearer token every admin request gets 401; a valid registration still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_worker_registrations_are_refused_without_cost() {
    let _one = serial().await;
    let worker = Mocker::start("worker", &["--speedup-ratio", "0"]);
    let spare = Mocker::start("spare worker", &["--speedup-ratio", "0"]);
    let mut fe = Frontend::start(&[worker.spec(1)], &["--admin-token", TOKEN]);

    // Without (or with a wrong) token: 401, even for a valid body.
    for auth in [None, Some("wrong"), Some("")] {
        for (method, b) in [(Method::GET, None), (Method::POST, Some(spare.spec(9)))] {
            let mut req = fe
                .http
                .request(method.clone(), format!("{}/v1/workers", fe.admin));
            if let Some(t) = auth {
                req = req.bearer_auth(t);
            }
            if let Some(b) = &b {
                req = req.json(b);
            }
            let r = req.send().await.expect("admin request");
            assert_eq!(r.status().as_u16(), 401, "{method} with token {auth:?}");
        }
    }
    assert_eq!(fe.workers().await.len(), 1);

    // Warm up whatever a refused registration uses, then measure.
    post(&fe, &json!({"url": "file:///etc/passwd"})).await;
    let (threads0, rss0) = fe.proc.threads_and_rss_kb();

    let url = worker.url();
    let spare_url = spare.url();
    let base = |extra: Value| {
        let mut s = json!({"url": spare_url.clone()});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    let big = "x".repeat(10 << 20);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("dp_size 1024", base(json!({"dp_size": 1024})), "dp_size"),
        ("dp_size 0", base(json!({"dp_size": 0})), "dp_size"),
        ("file:// URL", json!({"url": "file:///etc/passwd"}), "url"),
        (
            "credentialed URL",
            json!({"url": "http://user:secret@127.0.0.1:9"}),
            "url",
        ),
        (
            "URL with a path",
            json!({"url": format!("{spare_url}/v1")}),
            "url",
        ),
        (
            "wildcard kv_events_endpoint",
            base(json!({"kv_events_endpoint": "tcp://*:1"})),
            "kv_events_endpoint",
        ),
        (
            "kv_events_endpoint over the port range",
            base(json!({"kv_events_endpoint": "tcp://127.0.0.1:65535", "dp_size": 2})),
            "kv_events_endpoint",
        ),
        ("block size 0", base(json!({"block_size": 0})), "block_size"),
        (
            "block size not the fleet's",
            base(json!({"block_size": 2 * BLOCK})),
            "block size",
        ),
        ("duplicate id", base(json!({"id": 1})), "already"),
        ("duplicate URL", json!({"url": url}), "already"),
        ("not a spec", json!([1, 2, 3]), "invalid"),
    ];
    for (what, spec, needle) in &cases {
        let (status, text) = post(&fe, spec).await;
        assert_eq!(status, 400, "{what}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.to_lowercase().contains(needle),
            "{what}: message should mention {needle:?}: {text}"
        );
    }
    // 10 MB: refused (413) without being buffered. Sent on a raw socket, the response read
    // while the body is still being written: a server may answer and close before reading it
    // all, which an HTTP client reports as a failed send.
    let addr = fe.admin.trim_start_matches("http://").to_string();
    let spec = format!("{{\"url\": \"{spare_url}\", \"model\": \"{big}\"}}");
    let (status, text) =
        tokio::task::spawn_blocking(move || raw_post(&addr, "/v1/workers", TOKEN, spec))
            .await
            .unwrap();
    assert_eq!(status, 413, "10 MB body: {text}");
    assert!(
        text.contains("\"error\"") && text.contains("at most"),
        "10 MB body: an OpenAI-shaped error naming the limit: {text}"
    );

    fe.proc.assert_alive();
    let (threads, rss) = fe.proc.threads_and_rss_kb();
    assert!(
        threads <= threads0 + 4,
        "threads grew from {threads0} to {threads}"
    );
    assert!(
        rss < rss0 + 50 * 1024,
        "RSS grew from {rss0} kB to {rss} kB"
    );
    eprintln!("threads {threads0} -> {threads}, RSS {rss0} kB -> {rss} kB");
    let ws = fe.workers().await;
    assert_eq!(ws.keys().copied().collect::<Vec<_>>(), [1], "fleet changed");
    let r = fe.complete_ok(body(&prompt(1, 40), 2, None)).await;
    assert_eq!(r.worker, Some(1));

    // A valid registration still works and serves.
    let (status, text) = post(&fe, &spare.spec(9)).await;
    assert_eq!(status, 201, "{text}");
    let w = until_health(&fe, 9, "healthy", 30.0).await;
    assert_eq!(w["spec"]["block_size"], json!(BLOCK));
    let r = fe.complete_ok(body(&prompt(2, 40), 2, Some(9))).await;
    assert_eq!(r.worker, Some(9));
    fe.proc.assert_alive();
}

/// `POST /v1/workers` with the token: `(status, body text)`.
async fn post(fe: &Frontend, spec: &Value) -> (u16, String) {
    let r = fe
        .admin_req(Method::POST, "/v1/workers")
        .json(spec)
        .send()
        .await
        .expect("admin request");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// `POST path` with `body` on a fresh connection, reading the response while the body is
/// written: `(status, response body)`.
fn raw_post(addr: &str, path: &str, token: &str, body: String) -> (u16, String) {
    let mut reader = TcpStream::connect(addr).expect("connect to the admin API");
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = reader.try_clone().unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let sender = std::thread::spawn(move || {
        // The server may stop reading and close: write errors are expected then.
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(body.as_bytes());
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = reader.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}
