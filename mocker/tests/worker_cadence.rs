//! The live driver keeps the timing model's cadence when steps are shorter than the timer's
//! 1 ms tick: a request's wall time follows the sum of its modelled steps, not one tick each.
use std::time::{Duration, Instant};

use kvrouter_mocker::engine::{Engine, EngineConfig, StepOutput};
use kvrouter_mocker::events::NullSink;
use kvrouter_mocker::scheduler::SchedulerConfig;
use kvrouter_mocker::timing::TimingModel;
use kvrouter_mocker::worker::{spawn_engine, Command, Reply};

fn cfg(speedup_ratio: f64) -> EngineConfig {
    EngineConfig {
        num_blocks: 1024,
        block_size: 16,
        scheduler: SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            chunked_prefill: true,
        },
        prefix_caching: true,
        timing: TimingModel {
            speedup_ratio,
            decode_speedup_ratio: 1.0,
        },
        hash_seed: 1,
        vocab_size: 1000,
        output_vocab: 1000,
        eos_token_ids: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_millisecond_steps_are_not_stretched_to_the_timer_tick() {
    let (prompt, max_tokens) = ((0..64).collect::<Vec<u32>>(), 400);
    // The model's own time for this request: step the engine alone.
    let mut e = Engine::new(cfg(20.0));
    e.add_request(1, prompt.clone(), max_tokens, 0.0).unwrap();
    let (mut now, mut out, mut steps) = (0.0, StepOutput::default(), 0);
    while e.has_work() {
        e.step(now, &mut out);
        now += out.duration;
        steps += 1;
    }
    assert_eq!(steps, max_tokens);
    assert!(
        now < 0.35e-3 * steps as f64,
        "steps of about 0.3 ms: {now} s"
    );

    let (_stop, shutdown) = tokio::sync::oneshot::channel();
    let (handle, _task) = spawn_engine(Engine::new(cfg(20.0)), Box::new(NullSink), shutdown);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let t0 = Instant::now();
    assert!(handle.send(Command::Add {
        id: handle.next_id(),
        prompt,
        max_tokens,
        output: None,
        reply: Reply::Final(tx),
        kv: Default::default(),
        keys: None,
    }));
    let done = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .unwrap()
        .unwrap();
    let wall = t0.elapsed().as_secs_f64();
    assert_eq!(done.tokens.len(), max_tokens);
    // One tick per step would be at least 0.4 s; the model says about 0.12 s.
    assert!(wall >= now, "faster than the model: {wall} s < {now} s");
    assert!(
        wall < 0.3,
        "{steps} steps took {wall:.3} s, the model {now:.3} s"
    );
}

/// An abort that leaves the engine idle updates the load gauges at once: no step follows to
/// do it (the client is still connected, so the step loop never sees it leave).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_that_idles_the_engine_updates_its_gauges() {
    let (_stop, shutdown) = tokio::sync::oneshot::channel();
    let (handle, _task) = spawn_engine(Engine::new(cfg(1.0)), Box::new(NullSink), shutdown);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let id = handle.next_id();
    assert!(handle.send(Command::Add {
        id,
        prompt: (0..64).collect(),
        max_tokens: 10_000,
        output: None,
        reply: Reply::Stream(tx),
        kv: Default::default(),
        keys: None,
    }));
    rx.recv().await.expect("a first token");
    // A step delivers its tokens before it records its gauges: the second token comes after
    // the first step's gauges are written.
    rx.recv().await.expect("a second token");
    let running = || handle.metrics().lock().unwrap().num_running;
    assert_eq!(running(), 1);
    assert!(handle.send(Command::Abort(id)));
    // The engine is idle once its snapshot (answered between steps) says so.
    let snap = handle.snapshot().await.unwrap();
    assert_eq!((snap.num_running, snap.active_blocks), (0, 0));
    let m = handle.metrics().lock().unwrap().clone();
    assert_eq!((m.num_running, m.num_waiting, m.kv_usage), (0, 0, 0.0));
}
