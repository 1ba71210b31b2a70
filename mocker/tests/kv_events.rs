//! Consistency of the engine's KV events with its cache (issue 4 item 7): the core's exact
//! index fed with the mock's own event stream holds, for that worker, exactly the blocks the
//! engine has cached — directly converted after every step, and through our own ZMQ subscriber
//! on real sockets at quiescent points of an HTTP workload.
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::{compute_block_hashes, compute_sequence_hashes, SequenceHash};
use kvrouter_core::index::KvIndex;
use kvrouter_mocker::cli;
use kvrouter_mocker::engine::{Engine, EngineConfig, StepOutput};
use kvrouter_mocker::kv_pool::engine_block_hashes;
use kvrouter_mocker::scheduler::SchedulerConfig;
use kvrouter_mocker::timing::TimingModel;
use kvrouter_mocker::{spawn_workers, to_engine_events, MockerConfig};
use kvrouter_wire::subscriber::dp_endpoint;
use kvrouter_wire::{Converter, EngineBatch, KvEventSubscriber, SubscriberConfig};
use serde_json::{json, Value};

const W: WorkerWithDpRank = WorkerWithDpRank::new(7, 0);

/// Tiny deterministic PRNG (xorshift) so the workload is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Shared-prefix workload: one of `prefixes` system prompts plus a random suffix.
fn workload(rng: &mut Rng, prefixes: &[Vec<u32>], vocab: u64) -> (Vec<u32>, usize) {
    let mut p = prefixes[rng.below(prefixes.len() as u64) as usize].clone();
    let extra = 1 + rng.below(40) as usize;
    p.extend((0..extra).map(|_| rng.below(vocab) as u32));
    (p, 1 + rng.below(12) as usize)
}

/// Engine hash → router sequence hash for every full block of every token sequence seen.
#[derive(Default)]
struct HashMapper(HashMap<u64, SequenceHash>);
impl HashMapper {
    fn learn(&mut self, seed: u64, tokens: &[u32], bs: usize) {
        let e = engine_block_hashes(seed, tokens, bs);
        let r =
            compute_sequence_hashes(&compute_block_hashes(tokens, bs, &Default::default(), None));
        assert_eq!(e.len(), r.len());
        for (e, r) in e.into_iter().zip(r) {
            self.0.insert(e, r);
        }
    }
    /// The engine's cached set in router sequence hashes, sorted.
    fn router_view(&self, engine_hashes: &[u64]) -> Vec<SequenceHash> {
        let mut v: Vec<SequenceHash> = engine_hashes
            .iter()
            .map(|h| {
                *self
                    .0
                    .get(h)
                    .unwrap_or_else(|| panic!("engine block {h:#x} from no known sequence"))
            })
            .collect();
        v.sort_unstable();
        v
    }
}

fn prefixes(rng: &mut Rng, n: usize, len: usize, vocab: u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|_| (0..len).map(|_| rng.below(vocab) as u32).collect())
        .collect()
}

#[test]
fn index_equals_engine_cache_after_every_step() {
    let bs = 4;
    let seed = 0xabcdef;
    let cfg = EngineConfig {
        num_blocks: 40, // small: constant eviction and some preemption
        block_size: bs,
        scheduler: SchedulerConfig {
            max_num_seqs: 6,
            max_num_batched_tokens: 48,
            chunked_prefill: true,
        },
        prefix_caching: true,
        timing: TimingModel::default(),
        hash_seed: seed,
        vocab_size: 50,
        output_vocab: 50,
        eos_token_ids: vec![],
    };
    let mut engine = Engine::new(cfg);
    let mut index = KvIndex::new();
    let mut conv = Converter::new(W, bs as u32);
    let mut rng = Rng(0x1234_5678);
    let pre = prefixes(&mut rng, 4, 12, 50);
    let mut map = HashMapper::default();
    let mut prompts: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut out = StepOutput::default();
    let mut router_events: Vec<RouterEvent> = Vec::new();
    let (mut now, mut next_id, mut checks, mut evictions, mut preemptions) = (0.0, 0u64, 0, 0, 0);
    for round in 0..400 {
        // Arrivals in bursts, then run; every step boundary is checked.
        if round % 3 == 0 {
            for _ in 0..1 + rng.below(4) {
                let (p, max_tokens) = workload(&mut rng, &pre, 50);
                engine
                    .add_request(next_id, p.clone(), max_tokens, now)
                    .unwrap();
                prompts.insert(next_id, p);
                next_id += 1;
            }
        }
        if round == 200 {
            // Drain, then reset: the index must empty too.
            while engine.has_work() {
                engine.step(now, &mut out);
                apply(&mut conv, &mut index, &out.events, &mut router_events);
                record(&mut prompts, &out, &mut map, seed, bs);
            }
            assert!(engine.reset_prefix_cache());
            let mut evs = Vec::new();
            engine.take_events(&mut evs);
            apply(&mut conv, &mut index, &evs, &mut router_events);
            assert!(index.worker_sequence_hashes(W).is_empty());
        }
        if !engine.has_work() {
            continue;
        }
        engine.step(now, &mut out);
        now += out.duration;
        evictions += out
            .events
            .iter()
            .filter(|e| matches!(e, kvrouter_mocker::events::KvEvent::Removed { .. }))
            .count();
        preemptions += out.num_preempted;
        apply(&mut conv, &mut index, &out.events, &mut router_events);
        record(&mut prompts, &out, &mut map, seed, bs);
        // Every live request's tokens so far are known sequences too.
        for (id, p) in &prompts {
            if let Some(s) = engine.sequence(*id) {
                map.learn(seed, &s.tokens, bs);
            } else {
                map.learn(seed, p, bs);
            }
        }
        let want = map.router_view(&engine.cached_block_hashes());
        assert_eq!(index.worker_sequence_hashes(W), want, "round {round}");
        checks += 1;
    }
    assert!(checks > 200, "{checks}");
    assert!(evictions > 50, "workload must evict: {evictions}");
    assert!(preemptions > 0, "workload must preempt");
    // And the index finds the shared prefixes on this worker.
    let q = compute_block_hashes(&pre[0], bs, &Default::default(), None);
    let cached = engine.cached_block_hashes();
    let e0 = engine_block_hashes(seed, &pre[0], bs);
    let expect = e0
        .iter()
        .take_while(|h| cached.binary_search(h).is_ok())
        .count() as u32;
    assert_eq!(index.find_matches(&q, false).get(W), expect);
}

fn apply(
    conv: &mut Converter,
    index: &mut KvIndex,
    events: &[kvrouter_mocker::events::KvEvent],
    buf: &mut Vec<RouterEvent>,
) {
    if events.is_empty() {
        return;
    }
    buf.clear();
    conv.convert_batch(
        &EngineBatch {
            ts: 0.0,
            events: to_engine_events(events),
            dp_rank: Some(0),
        },
        buf,
    );
    for ev in buf.iter() {
        index
            .apply(ev)
            .unwrap_or_else(|e| panic!("index refused {ev:?}: {e}"));
    }
}

fn record(
    prompts: &mut HashMap<u64, Vec<u32>>,
    out: &StepOutput,
    map: &mut HashMapper,
    seed: u64,
    bs: usize,
) {
    for t in &out.tokens {
        if let Some(p) = prompts.get_mut(&t.id) {
            p.push(t.token);
            map.learn(seed, p, bs);
        }
        if t.finished {
            prompts.remove(&t.id);
        }
    }
}

/// A completion's output tokens; `rank`: the data-parallel rank to run on, named as
/// `engine` takes it (vLLM: header; SGLang: body field).
async fn complete(
    client: &reqwest::Client,
    url: &str,
    prompt: &[u32],
    max_tokens: usize,
    engine: cli::Engine,
    rank: u32,
) -> Vec<u32> {
    let mut body = json!({"prompt": prompt, "max_tokens": max_tokens});
    let mut req = client.post(url);
    match engine {
        cli::Engine::Vllm | cli::Engine::Trtllm => req = req.header("X-data-parallel-rank", rank),
        cli::Engine::Sglang => body["data_parallel_rank"] = json!(rank),
    }
    let v: Value = req.json(&body).send().await.unwrap().json().await.unwrap();
    v["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_events_through_our_subscriber_match_the_engine_at_quiescent_points() {
    events_match_the_engine(cli::Engine::Vllm, 1, 0).await;
}

/// The same on rank 1 of a 2-rank SGLang worker: its events, in SGLang's format on rank 0's
/// port + 1 and stamped with rank 1, give the index exactly rank 1's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_events_of_one_rank_match_that_ranks_engine() {
    events_match_the_engine(cli::Engine::Sglang, 2, 1).await;
}

/// Drives rank `rank` of a `dp`-rank `engine` worker and checks, at quiescent points, that the
/// index fed by our subscriber of that rank's endpoint holds exactly that rank's cache.
async fn events_match_the_engine(engine: cli::Engine, dp: usize, rank: u32) {
    let bs = 8;
    let cfg = MockerConfig {
        engine,
        data_parallel_size: dp,
        num_gpu_blocks: 48,
        block_size: bs,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        speedup_ratio: 0.0,
        vocab_size: 100,
        ..Default::default()
    };
    let w = spawn_workers(&cfg, 1).await.unwrap().pop().unwrap();
    let (tx, rx) = mpsc::sync_channel::<RouterEvent>(100_000);
    let me = WorkerWithDpRank::new(7, rank);
    let ep = |e: &Option<String>| dp_endpoint(e.as_deref().unwrap(), rank);
    let sub = KvEventSubscriber::start(
        SubscriberConfig {
            worker: me,
            endpoint: ep(&w.info.kv_events_endpoint),
            replay_endpoint: Some(ep(&w.info.replay_endpoint)),
            block_size: bs as u32,
            ..Default::default()
        },
        tx,
    )
    .unwrap();
    let engine_of_rank = &w.ranks[rank as usize];
    let seed = engine_of_rank.snapshot().await.unwrap().hash_seed;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/completions", w.info.url);
    let mut rng = Rng(0xfeed_beef);
    let pre = prefixes(&mut rng, 3, 24, 100);
    let mut map = HashMapper::default();
    let mut index = KvIndex::new();
    let mut evictions_seen = false;
    for wave in 0..6 {
        // A wave of concurrent requests sharing prefixes.
        let mut jobs = Vec::new();
        for _ in 0..12 {
            let (p, max_tokens) = workload(&mut rng, &pre, 100);
            let (client, url) = (client.clone(), url.clone());
            jobs.push(tokio::spawn(async move {
                let out = complete(&client, &url, &p, max_tokens, engine, rank).await;
                (p, out)
            }));
        }
        for j in jobs {
            let (mut p, out) = j.await.unwrap();
            assert!(!out.is_empty());
            p.extend(out);
            map.learn(seed, &p, bs);
        }
        // Quiescent: all responses are in; the engine is idle.
        let snap = engine_of_rank.snapshot().await.unwrap();
        assert_eq!((snap.num_running, snap.num_waiting), (0, 0));
        let deadline = Instant::now() + Duration::from_secs(20);
        while sub.stats().applied < snap.batches_published {
            assert!(
                Instant::now() < deadline,
                "subscriber stuck: {:?} of {}",
                sub.stats(),
                snap.batches_published
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while let Ok(ev) = rx.recv_timeout(Duration::from_millis(50)) {
            evictions_seen |= matches!(
                ev.event.data,
                kvrouter_core::event::KvCacheEventData::Removed(_)
            );
            index
                .apply(&ev)
                .unwrap_or_else(|e| panic!("index refused {ev:?}: {e}"));
        }
        let want = map.router_view(&snap.cached_block_hashes);
        assert!(!want.is_empty());
        assert_eq!(index.worker_sequence_hashes(me), want, "wave {wave}");
    }
    // Every batch was this rank's (none filtered as another rank's) and in the engine's
    // format; the other ranks never ran anything.
    let st = sub.stats();
    assert_eq!(st.filtered, 0, "{st:?}");
    let (mine, other) = match engine {
        // TensorRT-LLM on ZMQ publishes vLLM's format.
        cli::Engine::Vllm | cli::Engine::Trtllm => (st.formats.vllm_map, st.formats.sglang),
        cli::Engine::Sglang => (st.formats.sglang, st.formats.vllm_map),
    };
    assert!(
        mine > 0 && other == 0 && st.formats.vllm_array == 0,
        "{st:?}"
    );
    for (r, h) in w.ranks.iter().enumerate() {
        if r != rank as usize {
            assert!(h.snapshot().await.unwrap().cached_block_hashes.is_empty());
        }
    }
    assert!(evictions_seen, "the pool is small enough to evict");
    // Reset: AllBlocksCleared empties the index.
    let r = client
        .post(format!("{}/reset_prefix_cache", w.info.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ev = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("cleared event");
    index.apply(&ev).unwrap();
    assert!(index.worker_sequence_hashes(me).is_empty());
    sub.stop();
    w.stop().await;
}
