//! Faults on a worker's KV event stream: the worker's HTTP side is a `kvrouter mocker
//! --no-kv-events`, its `kv_events_endpoint` / `replay_endpoint` the pyzmq publisher of the
//! wire tests (`wire/tests/py/kv_pub.py`) sending recorded vLLM 0.33 frames (16-token blocks,
//! the fleet's block size) and scripting the faults: publisher restart, a gap, a hostile replay
//! ring, an oversize frame.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

const W: u64 = 1;
/// `--kv-event-max-frame-bytes` of these frontends.
const MAX_FRAME: usize = 256 << 10;

struct Rig {
    _worker: Mocker,
    publisher: PyPub,
    fe: Frontend,
}

fn rig() -> Rig {
    let worker = Mocker::start(
        "worker (HTTP only)",
        &["--speedup-ratio", "0", "--no-kv-events"],
    );
    let publisher = PyPub::start();
    let mut spec = worker.spec(W);
    spec["kv_events_endpoint"] = json!(publisher.endpoint);
    spec["replay_endpoint"] = json!(publisher.replay);
    spec["block_size"] = json!(BLOCK);
    let fe = Frontend::start(
        &[spec],
        &["--kv-event-max-frame-bytes", &MAX_FRAME.to_string()],
    );
    Rig {
        _worker: worker,
        publisher,
        fe,
    }
}

impl Rig {
    async fn w(&self) -> Value {
        self.fe.worker(W).await
    }

    /// Publishes one batch at a time until the subscriber has received one live (ZMQ's slow
    /// joiner), then waits until every batch published so far is applied (the missed ones by
    /// replay). Returns the publisher's next seq.
    async fn synced(&mut self) -> u64 {
        let t = Instant::now();
        loop {
            self.publisher.cmd("send 1");
            if counter(&self.w().await, "received") > 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "subscriber never connected"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let next = self.publisher.cmd("send 2");
        self.until("every batch applied", |w| counter(w, "batches") == next)
            .await;
        next
    }

    /// Waits until `cond` holds on the worker's admin entry.
    async fn until(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let cond = &cond;
        poll(what, 60.0, || async move {
            let w = self.w().await;
            if cond(&w) {
                Ok(w)
            } else {
                Err(events(&w).to_string())
            }
        })
        .await
    }

    /// The subscriber follows the live stream again and requests are still served.
    async fn assert_live_and_serving(&mut self) {
        let w = self.w().await;
        assert_eq!(events(&w)["state"], "live", "{}", events(&w));
        let m = self.fe.metrics().await;
        assert_eq!(
            m.get(
                "kvrouter_kv_subscriber_state",
                &[("worker_id", "1"), ("state", "live")]
            ),
            1.0
        );
        let r = self.fe.complete_ok(body(&prompt(5, 100), 2, None)).await;
        assert_eq!(r.worker, Some(W));
        self.fe.proc.assert_alive();
    }

    /// Two more live batches are applied (the stream is not wedged).
    async fn live_flows(&mut self) {
        let w = self.w().await;
        let (batches0, applied0) = (counter(&w, "batches"), counter(&w, "applied"));
        self.publisher.cmd("send 2");
        self.until("live batches applied", |w| {
            counter(w, "batches") == batches0 + 2 && counter(w, "applied") > applied0
        })
        .await;
    }
}

/// **Guarantee** — a KV publisher restarted alone (sequence back to 0, empty ring) is
/// detected (`restarts` and `cleared` grow: the stale index is dropped) and its later events
/// are applied; the frontend keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_publisher_restarted_is_detected_and_followed() {
    let _one = serial().await;
    let mut r = rig();
    let n = r.synced().await;
    let w = r.w().await;
    let (restarts0, cleared0, applied0) = (
        counter(&w, "restarts"),
        counter(&w, "cleared"),
        counter(&w, "applied"),
    );
    r.publisher.cmd("restart");
    assert_eq!(r.publisher.cmd("send 3"), 3);
    let w = r
        .until("the restart noticed and the new stream applied", |w| {
            counter(w, "restarts") > restarts0 && counter(w, "batches") == n + 3
        })
        .await;
    assert!(counter(&w, "cleared") > cleared0, "{}", events(&w));
    assert!(counter(&w, "applied") > applied0, "{}", events(&w));
    r.live_flows().await;
    r.assert_live_and_serving().await;
    let m = r.fe.metrics().await;
    assert!(
        m.get(
            "kvrouter_kv_events_total",
            &[("worker_id", "1"), ("outcome", "restarts")]
        ) >= 1.0
    );
}

/// **Guarantee** — an event gap (a batch lost on the live socket) with an honest replay ring
/// is recovered: every batch applied in order, `gaps` and `recovered` grow, nothing cleared, no
/// replay failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_gap_with_good_replay_is_recovered_without_clearing() {
    let _one = serial().await;
    let mut r = rig();
    r.synced().await;
    let w = r.w().await;
    let c0 = |k: &str| counter(&w, k);
    let (gaps0, recovered0, cleared0, failures0, replayed0) = (
        c0("gaps"),
        c0("recovered"),
        c0("cleared"),
        c0("replay_failures"),
        c0("replayed"),
    );
    r.publisher.cmd("send 2");
    r.publisher.cmd("skip 1");
    let next = r.publisher.cmd("send 3");
    let w = r
        .until("every batch applied, the skipped one by replay", |w| {
            counter(w, "batches") == next
        })
        .await;
    let c = |k: &str| counter(&w, k);
    assert_eq!(c("gaps"), gaps0 + 1, "{}", events(&w));
    assert_eq!(c("recovered"), recovered0 + 1, "{}", events(&w));
    assert!(c("replayed") > replayed0, "{}", events(&w));
    assert_eq!(c("cleared"), cleared0, "{}", events(&w));
    assert_eq!(c("replay_failures"), failures0, "{}", events(&w));
    r.assert_live_and_serving().await;
}

/// **Guarantee** — a gap answered by a hostile replay ring (a batch with seq 2^62 and no
/// batch of the range; then an endless stream of large batches without end marker) cannot
/// wedge the stream: each failed replay is counted in `replay_failures` and clears the
/// worker, the rank's subscriber returns to `live`, and later live events are applied; the
/// frontend keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_gap_with_hostile_replay_fails_the_replay_and_live_events_resume() {
    let _one = serial().await;
    let mut r = rig();
    r.synced().await;

    // A ring answering with one batch at seq 2^62 and the end marker.
    let w = r.w().await;
    let (failures0, cleared0) = (counter(&w, "replay_failures"), counter(&w, "cleared"));
    r.publisher.cmd(&format!("hostile seq {}", 1u64 << 62));
    r.publisher.cmd("skip 1");
    let next = r.publisher.cmd("send 2");
    let w = r
        .until("the replay failed and the live batches applied", |w| {
            counter(w, "replay_failures") > failures0
                && counter(w, "cleared") > cleared0
                && counter(w, "batches") == next - 1
        })
        .await;
    assert_eq!(counter(&w, "duplicates"), 0, "{}", events(&w));
    r.assert_live_and_serving().await;
    r.publisher.cmd("hostile off");
    r.live_flows().await;

    // A ring streaming 200 KiB batches every 5 ms, out of range, never ending: cut by the
    // replay's byte cap.
    let w = r.w().await;
    let (failures1, cleared1) = (counter(&w, "replay_failures"), counter(&w, "cleared"));
    r.publisher.cmd("hostile stream 204800 5");
    r.publisher.cmd("skip 1");
    let next = r.publisher.cmd("send 2");
    r.until("the endless replay cut and the live batches applied", |w| {
        counter(w, "replay_failures") > failures1
            && counter(w, "cleared") > cleared1
            && counter(w, "batches") == next - 2
    })
    .await;
    r.assert_live_and_serving().await;
    r.publisher.cmd("hostile off");
    r.live_flows().await;
    let m = r.fe.metrics().await;
    assert!(
        m.get(
            "kvrouter_kv_events_total",
            &[("worker_id", "1"), ("outcome", "replay_failures")]
        ) >= 2.0
    );
    r.assert_live_and_serving().await;
}

/// **Guarantee** — a live frame over `--kv-event-max-frame-bytes` is dropped and counted in
/// `oversize` (its replay fails on the same limit, so the worker is cleared), and later
/// events are applied; the frontend keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_is_dropped_counted_and_the_stream_continues() {
    let _one = serial().await;
    let mut r = rig();
    r.synced().await;
    let w = r.w().await;
    let (oversize0, cleared0) = (counter(&w, "oversize"), counter(&w, "cleared"));
    r.publisher.cmd(&format!("oversize {}", 4 * MAX_FRAME));
    let next = r.publisher.cmd("send 2");
    let w = r
        .until(
            "the oversize frame dropped and the live batches applied",
            |w| counter(w, "oversize") > oversize0 && counter(w, "batches") == next - 1,
        )
        .await;
    assert_eq!(counter(&w, "oversize"), oversize0 + 1, "{}", events(&w));
    assert!(counter(&w, "cleared") > cleared0, "{}", events(&w));
    assert_eq!(counter(&w, "decode_errors"), 0, "{}", events(&w));
    r.live_flows().await;
    r.assert_live_and_serving().await;
    let m = r.fe.metrics().await;
    assert_eq!(
        m.get(
            "kvrouter_kv_events_total",
            &[("worker_id", "1"), ("outcome", "oversize")]
        ),
        1.0
    );
}
