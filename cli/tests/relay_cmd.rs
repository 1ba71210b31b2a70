//! `kvrouter relay` end to end: the real binary starts relaying a worker's KV events (NATS
//! may come up later: it keeps reconnecting), serves `/live` and `/metrics` on its
//! `--system-port`, stops cleanly on SIGTERM, and refuses a worker
//! the routers could not recognise (no `id`); it polls a TensorRT-LLM worker without a ZMQ
//! endpoint (`--kv-events-poll-interval-ms`). A build without `--features nats` refuses to
//! relay with a clear message.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:`port`: the whole response.
fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn relays_until_sigterm_and_refuses_workers_without_id() {
    let nats = format!("nats://127.0.0.1:{}", free_port());
    let worker = format!(
        r#"{{"id": 7, "url": "http://127.0.0.1:9", "block_size": 16, "kv_events_endpoint": "tcp://127.0.0.1:{}"}}"#,
        free_port()
    );
    let status = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .args(["relay", "--nats-server", &nats, "--worker-json", &worker])
        .args([
            "--system-port",
            &status.to_string(),
            "--system-host",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap_or(0) > 0 {
        text.push_str(&line);
        if line.contains("relaying") || line.contains("Error") {
            break;
        }
        line.clear();
    }
    if !cfg!(feature = "nats") {
        assert!(child.wait().unwrap().code() != Some(0));
        assert!(text.contains("--features nats"), "{text}");
        return;
    }
    assert!(
        text.contains("relaying 1 worker(s) to dynamo.backend.generate"),
        "{text}"
    );
    // Its status server: /live, and /metrics saying NATS does not take messages yet.
    assert!(
        text.contains(&format!("/live and /metrics on http://127.0.0.1:{status}")),
        "{text}"
    );
    let live = get(status, "/live");
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let metrics = get(status, "/metrics");
    assert!(
        metrics.contains("\nkvrouter_relay_publishing 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE kvrouter_relay_dropped_events_total counter"),
        "{metrics}"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child
        .try_wait()
        .unwrap()
        .expect("stopped on SIGTERM")
        .success());

    let no_id = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .args(["relay", "--nats-server", &nats, "--worker-json"])
        .arg(r#"{"url": "http://127.0.0.1:9", "kv_events_endpoint": "tcp://127.0.0.1:1"}"#)
        .output()
        .unwrap();
    assert!(!no_id.status.success());
    let err = String::from_utf8_lossy(&no_id.stderr);
    assert!(err.contains("\"id\""), "{err}");
    let none = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .arg("relay")
        .output()
        .unwrap();
    assert!(!none.status.success(), "no workers is an error");
}

/// A fake TensorRT-LLM worker on a free port answering every `POST /kv_cache_events` with an
/// empty array, on kept-alive connections: its URL and the number of polls so far.
fn fake_trtllm() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let polls = std::sync::Arc::new(AtomicU64::new(0));
    let seen = polls.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut head = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    if head.starts_with("POST /kv_cache_events ") {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]";
                    if w.write_all(ok.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, polls)
}

#[test]
fn relays_trtllm_workers_by_polling_them() {
    if !cfg!(feature = "nats") {
        return; // refused as above
    }
    use std::sync::atomic::Ordering;
    let nats = format!("nats://127.0.0.1:{}", free_port());
    let (url, polls) = fake_trtllm();
    let worker = format!(r#"{{"id": 3, "url": "{url}", "engine": "trtllm", "block_size": 32}}"#);
    let status = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .args(["relay", "--nats-server", &nats, "--worker-json", &worker])
        .args(["--kv-events-poll-interval-ms", "20"])
        .args([
            "--system-port",
            &status.to_string(),
            "--system-host",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Polled (NATS is not even up: the events wait in the buffer), and counted.
    let end = Instant::now() + Duration::from_secs(30);
    let polled = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("kvrouter_relay_kv_event_polls_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v >= 3.0)
    };
    let mut metrics = String::new();
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", status)).is_ok() {
            metrics = get(status, "/metrics");
            if polls.load(Ordering::SeqCst) >= 3 && polled(&metrics) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = child.wait().unwrap();
    assert!(
        polls.load(Ordering::SeqCst) >= 3,
        "the relay polls the worker"
    );
    assert!(polled(&metrics), "{metrics}");
    assert!(
        metrics.contains("\nkvrouter_relay_kv_event_poll_errors_total 0\n"),
        "{metrics}"
    );
    assert!(code.success(), "stopped on SIGTERM");

    // Neither a ZMQ endpoint nor an engine to poll: nothing to relay.
    let vllm = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .args(["relay", "--nats-server", &nats, "--worker-json"])
        .arg(r#"{"id": 4, "url": "http://127.0.0.1:9"}"#)
        .output()
        .unwrap();
    assert!(!vllm.status.success());
    let err = String::from_utf8_lossy(&vllm.stderr);
    assert!(err.contains("no kv_events_endpoint to relay"), "{err}");
}
