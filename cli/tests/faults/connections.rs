//! Hostile clients at the connection level: a flood of idle connections against a frontend
//! whose descriptor limit is low.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Descriptor limit (soft and hard) the frontend runs under.
const NOFILE: u64 = 256;
/// Idle connections opened against it.
const FLOOD: usize = 400;

/// How one flood connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The server wrote a 503 (over the connection cap) and closed.
    Refused503,
    /// The server closed it (idle timeout, or refused without a response).
    Closed,
}

/// Reads each connection until the server closes it (hang guard `secs` overall).
fn drain(mut conns: Vec<TcpStream>, secs: f64) -> Vec<End> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); conns.len()];
    let mut done: Vec<Option<End>> = (0..conns.len()).map(|_| None).collect();
    for c in &conns {
        c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    }
    while done.iter().any(Option::is_none) {
        assert!(
            Instant::now() < end,
            "{} of {} idle connections still open after {secs} s",
            done.iter().filter(|d| d.is_none()).count(),
            conns.len()
        );
        for (i, c) in conns.iter_mut().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let mut buf = [0u8; 1024];
            let closed = match c.read(&mut buf) {
                Ok(0) => true,
                Ok(n) => {
                    got[i].extend_from_slice(&buf[..n]);
                    false
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    false
                }
                Err(_) => true, // reset
            };
            if closed {
                done[i] = Some(if got[i].starts_with(b"HTTP/1.1 503") {
                    End::Refused503
                } else {
                    End::Closed
                });
            }
        }
    }
    done.into_iter().map(Option::unwrap).collect()
}

/// **Guarantee** — an idle-connection flood (400 connections that never send a request)
/// against a frontend limited to 256 descriptors does not take it down: the process stays
/// alive, the admin API answers during the flood, connections past the cap get a 503 (or are
/// closed) and are counted in `kvrouter_frontend_refused_connections_total{listener="api"}`,
/// the idle timeout closes every flood connection, and then a normal completion is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_flood_under_a_low_descriptor_limit() {
    let _one = serial().await;
    let worker = Mocker::start("worker", &["--speedup-ratio", "0"]);
    let mut fe = Frontend::start_with(
        &[worker.spec(1)],
        &["--http-idle-timeout-secs", "2"],
        Some(NOFILE),
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", fe.proc.pid)).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    assert!(
        line.split_whitespace()
            .filter(|w| *w == NOFILE.to_string())
            .count()
            == 2,
        "descriptor limit not applied: {line}"
    );
    // Before: served.
    fe.complete_ok(body(&prompt(1, 40), 2, None)).await;

    let addr = fe.api_addr();
    let conns = tokio::task::spawn_blocking(move || {
        let mut v = Vec::new();
        let mut failed = 0;
        for _ in 0..FLOOD {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(c) => v.push(c),
                Err(_) => failed += 1,
            }
        }
        (v, failed)
    })
    .await
    .unwrap();
    let (conns, connect_failures) = conns;

    // During the flood: alive, and the admin API (its own listener) answers.
    fe.proc.assert_alive();
    let ws = fe.workers().await;
    assert_eq!(ws.len(), 1);

    let ends = tokio::task::spawn_blocking(move || drain(conns, 60.0))
        .await
        .unwrap();
    let refused = ends.iter().filter(|e| **e == End::Refused503).count();
    assert!(refused > 0, "no connection got a 503: {ends:?}");
    fe.proc.assert_alive();

    // The flood is gone: the API serves again and counted its refusals.
    let m = fe.metrics().await;
    let counted = m.get(
        "kvrouter_frontend_refused_connections_total",
        &[("listener", "api")],
    );
    assert!(
        counted >= refused as f64,
        "{counted} counted, {refused} refused with 503"
    );
    let r = fe.complete_ok(body(&prompt(2, 40), 2, None)).await;
    assert_eq!(r.worker, Some(1));
    fe.proc.assert_alive();
    eprintln!(
        "flood: {} connected ({connect_failures} connects failed), {refused} got 503, {counted} refusals counted",
        ends.len()
    );
}
