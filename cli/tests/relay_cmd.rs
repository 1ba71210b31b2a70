//! `kvrouter relay` end to end: the real binary starts relaying a worker's KV events (NATS
//! may come up later: it keeps reconnecting), serves `/live` and `/metrics` on its
//! `--system-port`, stops cleanly on SIGTERM, and refuses a worker
//! the routers could not recognise (no `id`). A build without `--features nats` refuses to
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
