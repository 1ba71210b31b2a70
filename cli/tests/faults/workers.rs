//! Worker processes failing under the frontend: killed mid-stream, stopped (SIGSTOP) shorter
//! and longer than the suspect window, restarted on the same ports with an empty cache.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

const A: u64 = 1;
const B: u64 = 2;

/// Two one-engine mockers, A (id 1) and B (id 2), with `mocker_args`, and a frontend in front
/// of them with `frontend_args`.
fn two_workers(mocker_args: &[&str], frontend_args: &[&str]) -> (Mocker, Mocker, Frontend) {
    let a = Mocker::start("worker A", mocker_args);
    let b = Mocker::start("worker B", mocker_args);
    let fe = Frontend::start(&[a.spec(A), b.spec(B)], frontend_args);
    (a, b, fe)
}

/// A streamed request's end after its worker died: an error event (which does not show the
/// worker's address), then `[DONE]`.
fn assert_error_then_done(events: &[String], worker_url: &str) {
    let n = events.len();
    assert!(n >= 2, "stream ended without error and [DONE]: {events:?}");
    assert_eq!(events[n - 1], "[DONE]", "{events:?}");
    let err: Value = serde_json::from_str(&events[n - 2]).unwrap_or(Value::Null);
    let msg = err["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("the event before [DONE] is not an error: {events:?}"));
    let host_port = worker_url.trim_start_matches("http://");
    assert!(
        !msg.contains(host_port),
        "the error shows the worker's address: {msg}"
    );
}

/// **Guarantee** — a worker killed (SIGKILL) in the middle of long streams: no crash, no hang
/// (every client gets an error event, without the worker's address, then `[DONE]`), no
/// booking left on any rank, the dead worker goes suspect then removed, and normal requests
/// are served by the other worker meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_stream() {
    let _one = serial().await;
    let (mut a, _b, mut fe) = two_workers(
        &["--speedup-ratio", "1"],
        &[
            "--health-interval-ms",
            "200",
            "--health-timeout-ms",
            "500",
            "--health-remove-after-failures",
            "5",
            "--health-remove-after-secs",
            "30",
        ],
    );
    let a_url = a.url();
    // Long streams on A (thousands of tokens, a few ms each): running when A dies.
    let mut streams = Vec::new();
    for i in 0..3 {
        let mut s = fe.stream(body(&prompt(10 + i, 40), 4000, Some(A))).await;
        assert_eq!(s.worker, Some(A));
        s.first_token(30.0).await;
        streams.push(s);
    }
    assert!(active_requests(&fe.worker(A).await) >= 3);

    a.proc.signal(libc::SIGKILL);

    for s in &mut streams {
        let rest = s.rest(30.0).await;
        assert_error_then_done(&rest, &a_url);
    }
    // Each stream freed its booking before its error event was sent.
    fe.assert_no_bookings().await;

    // Suspect at once (the streams failed), removed after 5 failed checks; B serves
    // meanwhile.
    let mut seen: Vec<String> = Vec::new();
    let t = Instant::now();
    let mut served_by_b = 0;
    loop {
        let w = fe.worker(A).await;
        let h = health(&w);
        if seen.last() != Some(&h) {
            seen.push(h.clone());
        }
        if h == "removed" {
            assert!(w["consecutive_failures"].as_u64().unwrap_or(0) >= 5, "{w}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "A never removed: {seen:?} {w}"
        );
        let r = fe
            .complete_ok(body(&prompt(100 + served_by_b, 40), 4, None))
            .await;
        assert_eq!(
            r.worker,
            Some(B),
            "a request went to the dead worker: {r:?}"
        );
        served_by_b += 1;
    }
    assert_eq!(seen, ["suspect", "removed"], "A's health went {seen:?}");
    assert!(served_by_b >= 1);
    eprintln!("A went {seen:?}; {served_by_b} requests served by B meanwhile");
    let m = fe.metrics().await;
    let a_state = |s: &str| m.get("kvrouter_worker_state", &[("worker_id", "1"), ("state", s)]);
    assert_eq!((a_state("removed"), a_state("healthy")), (1.0, 0.0));

    // After the removal too: served by B, nothing booked, the frontend alive.
    let r = fe.complete_ok(body(&prompt(999, 40), 4, None)).await;
    assert_eq!(r.worker, Some(B));
    fe.assert_no_bookings().await;
    fe.proc.assert_alive();
}

/// **Guarantee** — a worker stalled (SIGSTOP ≈ 1.5 s) for less than the suspect window is not
/// forgotten: it becomes suspect (not removed), its streaming request stays booked while it
/// is stopped, its KV index entries are kept; other requests are served by the other worker;
/// after SIGCONT it is healthy again, the stalled stream completes, nothing stays booked, and a
/// repeat of a prompt it cached is routed back to it, predicted cached by the router exactly
/// as much as the engine reports cached (the index still matches the engine's cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stopped_shorter_than_the_suspect_window_keeps_index_and_bookings() {
    let _one = serial().await;
    let (mut a, _b, mut fe) = two_workers(
        &["--speedup-ratio", "1"],
        &[
            "--health-interval-ms",
            "200",
            "--health-timeout-ms",
            "200",
            "--health-remove-after-failures",
            "20",
            "--health-remove-after-secs",
            "30",
        ],
    );
    // A caches P (12 full blocks).
    let p = prompt(1, 200);
    let r = fe.complete_ok(body(&p, 2, Some(A))).await;
    assert_eq!(r.worker, Some(A));
    until_entries(&fe, 12, 30.0).await;

    // A stream running on A when it stops.
    let mut s = fe.stream(body(&prompt(2, 40), 500, Some(A))).await;
    s.first_token(30.0).await;
    let entries_before = fe.index_entries().await;
    assert!(entries_before >= 12);

    a.proc.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let w = until_health(&fe, A, "suspect", 20.0).await;
    assert!(
        active_requests(&w) >= 1,
        "the stalled stream lost its booking: {w}"
    );
    // During the stop: bookings and index entries kept, other requests go to B.
    let mut i = 0;
    while stopped.elapsed() < Duration::from_millis(1500) || i == 0 {
        let w = fe.worker(A).await;
        assert_eq!(health(&w), "suspect", "{w}");
        assert!(
            active_requests(&w) >= 1,
            "booking dropped while suspect: {w}"
        );
        let n = fe.index_entries().await;
        assert!(
            n >= entries_before,
            "index entries dropped while suspect: {n} < {entries_before}"
        );
        let r = fe.complete_ok(body(&prompt(300 + i, 40), 2, None)).await;
        assert_eq!(r.worker, Some(B), "{r:?}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w = fe.worker(A).await;
    assert_eq!(
        health(&w),
        "suspect",
        "removed within the suspect window: {w}"
    );
    a.proc.signal(libc::SIGCONT);

    until_health(&fe, A, "healthy", 30.0).await;
    // The stalled stream completes normally.
    let rest = s.rest(30.0).await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    assert!(
        rest.iter().all(|e| !e.contains("\"error\"")),
        "the stalled stream failed: {rest:?}"
    );
    poll("no booking left", 30.0, || async {
        let ws = fe.workers().await;
        if ws.values().all(|w| active_requests(w) == 0) {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                ws.values().map(active_requests).collect::<Vec<_>>()
            ))
        }
    })
    .await;
    fe.assert_no_bookings().await;

    // P again, not pinned: routed back to A on its cached prefix, predicted as A reports.
    let before = fe.predicted().await;
    let r = fe.complete_ok(body(&p, 2, None)).await;
    let predicted = fe.predicted().await - before;
    assert_eq!(
        r.worker,
        Some(A),
        "the cached prompt was not routed back to A: {r:?}"
    );
    assert_eq!(r.cached(), full_blocks(p.len()), "{r:?}");
    assert_eq!(
        predicted,
        r.cached(),
        "router prediction differs from A's cache"
    );
    fe.proc.assert_alive();
}

/// **Guarantee** — a worker stopped longer than the suspect window (3 failed checks) is
/// removed: its index entries are cleared and its bookings dropped while other requests are
/// served; after SIGCONT it is re-admitted (healthy) and serves again, the stalled stream
/// ends (no hang), and no booking is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stopped_longer_than_the_suspect_window_is_removed_then_readmitted() {
    let _one = serial().await;
    let (mut a, _b, mut fe) = two_workers(
        &["--speedup-ratio", "1"],
        &[
            "--health-interval-ms",
            "200",
            "--health-timeout-ms",
            "200",
            "--health-remove-after-failures",
            "3",
            "--health-remove-after-secs",
            "30",
        ],
    );
    let p = prompt(1, 200);
    fe.complete_ok(body(&p, 2, Some(A))).await;
    until_entries(&fe, 12, 30.0).await;
    let mut s = fe.stream(body(&prompt(2, 40), 500, Some(A))).await;
    s.first_token(30.0).await;

    a.proc.signal(libc::SIGSTOP);
    // Only A holds index entries (nothing was sent to B yet): they must all go.
    let w = until_health(&fe, A, "removed", 30.0).await;
    assert!(w["consecutive_failures"].as_u64().unwrap_or(0) >= 3, "{w}");
    until_entries(&fe, 0, 30.0).await;
    let w = fe.worker(A).await;
    assert_eq!(health(&w), "removed", "{w}");
    assert_eq!(
        active_requests(&w),
        0,
        "bookings of a removed worker kept: {w}"
    );
    assert_eq!(
        w["ranks"][0]["active_decode_blocks"].as_u64(),
        Some(0),
        "{w}"
    );
    let r = fe.complete_ok(body(&prompt(3, 40), 2, None)).await;
    assert_eq!(r.worker, Some(B), "{r:?}");
    fe.proc.assert_alive();

    a.proc.signal(libc::SIGCONT);
    until_health(&fe, A, "healthy", 30.0).await;
    let r = fe.complete_ok(body(&prompt(4, 40), 2, Some(A))).await;
    assert_eq!(r.worker, Some(A), "{r:?}");
    // The stalled stream ends one way or the other.
    let rest = s.rest(30.0).await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    poll("no booking left", 30.0, || async {
        let ws = fe.workers().await;
        if ws.values().all(|w| active_requests(w) == 0) {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                ws.values().map(active_requests).collect::<Vec<_>>()
            ))
        }
    })
    .await;
    fe.assert_no_bookings().await;
    fe.proc.assert_alive();
}

/// **Guarantee** — a worker restarted for real (SIGKILL, a new engine on the same ports, empty
/// cache) within the suspect window is recognised from its KV event stream (the rank's
/// `restarts`/`cleared` counters grow) and its index converges to the new engine's cache: for
/// a prompt the old engine cached, the router's prediction equals what the new engine
/// reports cached — first 0, then the full prefix once the new engine has cached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_restarted_on_the_same_ports_is_relearned_from_its_events() {
    let _one = serial().await;
    let ports = free_ports(3);
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let args = [
        "--speedup-ratio",
        "0",
        "--http-port",
        &ports[0],
        "--zmq-kv-events-ports",
        &ports[1],
        "--zmq-replay-ports",
        &ports[2],
    ];
    let mut a = Mocker::start("worker A", &args);
    // Never removed by health checks here: only the event stream may reveal the restart.
    let fe = Frontend::start(
        &[a.spec(A)],
        &[
            "--health-interval-ms",
            "200",
            "--health-timeout-ms",
            "500",
            "--health-remove-after-failures",
            "1000",
            "--health-remove-after-secs",
            "600",
        ],
    );
    // First life: several prompts (so the engine's sequence number runs ahead), then P.
    let p = prompt(1, 200);
    for i in 0..6 {
        fe.complete_ok(body(&prompt(100 + i, 200), 2, Some(A)))
            .await;
    }
    fe.complete_ok(body(&p, 2, Some(A))).await;
    until_entries(&fe, 7 * 12, 30.0).await;
    let (predicted, cached, _) = predicted_and_cached(&fe, &p, A).await;
    assert_eq!(
        (predicted, cached),
        (full_blocks(p.len()), full_blocks(p.len()))
    );
    let w = fe.worker(A).await;
    let (restarts0, cleared0) = (counter(&w, "restarts"), counter(&w, "cleared"));

    // A new engine on the same ports, empty cache.
    a.proc.signal(libc::SIGKILL);
    drop(a);
    let t = Instant::now();
    let _a2 = loop {
        match Mocker::try_start("worker A (restarted)", &args) {
            Ok(m) => break m,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(30), "restart failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    until_health(&fe, A, "healthy", 30.0).await;

    // The new engine publishes when it serves; its sequence starts again at 0.
    let mut fresh = 0u64;
    let mut seen_health = Vec::new();
    let t = Instant::now();
    'detect: loop {
        let r = fe
            .complete(body(&prompt(200 + fresh as u32, 200), 2, Some(A)))
            .await;
        if r.status == 200 {
            fresh += 1;
        }
        let round = Instant::now();
        while round.elapsed() < Duration::from_secs(2) {
            let w = fe.worker(A).await;
            seen_health.push(health(&w));
            if counter(&w, "restarts") > restarts0 || counter(&w, "cleared") > cleared0 {
                break 'detect;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the router never noticed the restart: {}",
            events(&fe.worker(A).await)
        );
    }
    assert!(fresh >= 1);
    eprintln!(
        "restart noticed after {fresh} request(s) to the new engine: {}",
        events(&fe.worker(A).await)
    );
    // The old life's entries are gone; the index holds exactly what the new engine cached.
    until_entries(&fe, fresh * 12, 30.0).await;
    let (predicted, cached, _) = predicted_and_cached(&fe, &p, A).await;
    assert_eq!(
        (predicted, cached),
        (0, 0),
        "first request of P after the restart"
    );
    until_entries(&fe, (fresh + 1) * 12, 30.0).await;
    let (predicted, cached, _) = predicted_and_cached(&fe, &p, A).await;
    let full = full_blocks(p.len());
    assert_eq!(
        (predicted, cached),
        (full, full),
        "P once the new engine cached it"
    );
    assert!(
        !seen_health.iter().any(|h| h == "removed") && health(&fe.worker(A).await) != "removed",
        "A was removed by health checks, so the restart detection was not what cleared it: {seen_health:?}"
    );
}
