//! Deterministic tests of the engine model: the clock is driven by the test.
use kvrouter_mocker::engine::{Engine, EngineConfig, RequestError, StepOutput};
use kvrouter_mocker::events::KvEvent;
use kvrouter_mocker::kv_pool::engine_block_hashes;
use kvrouter_mocker::scheduler::SchedulerConfig;
use kvrouter_mocker::timing::{decode_ms, prefill_ms, TimingModel};

const SEED: u64 = 0x5eed;

fn cfg(num_blocks: usize, block_size: usize) -> EngineConfig {
    EngineConfig {
        num_blocks,
        block_size,
        scheduler: SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            chunked_prefill: true,
        },
        prefix_caching: true,
        timing: TimingModel {
            speedup_ratio: 1.0,
            decode_speedup_ratio: 1.0,
        },
        hash_seed: SEED,
        vocab_size: 1000,
        output_vocab: 1000,
        eos_token_ids: vec![],
    }
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + salt) % 1000).collect()
}

/// Steps until idle; returns (time, all outputs per request id in order, all events).
fn run_to_idle(
    e: &mut Engine,
    mut now: f64,
) -> (f64, std::collections::BTreeMap<u64, Vec<u32>>, Vec<KvEvent>) {
    let mut out = StepOutput::default();
    let mut toks = std::collections::BTreeMap::new();
    let mut evs = Vec::new();
    let mut guard = 0;
    while e.has_work() {
        e.step(now, &mut out);
        now += out.duration;
        for t in &out.tokens {
            toks.entry(t.id).or_insert_with(Vec::new).push(t.token);
        }
        evs.extend(out.events.iter().cloned());
        guard += 1;
        assert!(guard < 100_000, "engine does not make progress");
    }
    e.pool().check_invariants().unwrap();
    (now, toks, evs)
}

#[test]
fn first_step_prefills_and_times_by_the_polynomial() {
    let mut e = Engine::new(cfg(64, 16));
    e.add_request(1, prompt(100, 0), 3, 0.0).unwrap();
    let mut out = StepOutput::default();
    e.step(0.0, &mut out);
    assert_eq!(out.prefill_tokens, 100);
    assert_eq!(out.decode_seqs, 0);
    assert!((out.duration - prefill_ms(100) / 1000.0).abs() < 1e-12);
    assert_eq!(out.tokens.len(), 1);
    assert_eq!(out.tokens[0].index, 0);
    assert_eq!(out.ttft, vec![out.duration]);
    // 7 blocks of 16 hold 100 + 1 tokens; utilisation 7/64 during the decode step.
    let t1 = out.duration;
    e.step(t1, &mut out);
    assert_eq!(out.prefill_tokens, 0);
    assert_eq!(out.decode_seqs, 1);
    assert!(
        (out.duration - decode_ms(7.0 / 64.0) / 1000.0).abs() < 1e-12,
        "{}",
        out.duration
    );
    assert_eq!(out.itl.len(), 1);
    assert!((out.itl[0] - out.duration).abs() < 1e-12);
    e.step(t1 + out.duration, &mut out);
    assert!(out.tokens[0].finished);
    assert!(!e.has_work());
    assert_eq!(e.pool().num_active(), 0);
}

#[test]
fn speedup_ratios_scale_and_zero_means_no_delay() {
    let mut c = cfg(64, 16);
    c.timing = TimingModel {
        speedup_ratio: 10.0,
        decode_speedup_ratio: 2.0,
    };
    let mut e = Engine::new(c.clone());
    e.add_request(1, prompt(50, 0), 2, 0.0).unwrap();
    let mut out = StepOutput::default();
    e.step(0.0, &mut out);
    assert!((out.duration - prefill_ms(50) / 10.0 / 1000.0).abs() < 1e-12);
    e.step(1.0, &mut out);
    assert!(
        (out.duration - decode_ms(4.0 / 64.0) / 20.0 / 1000.0).abs() < 1e-12,
        "{}",
        out.duration
    );
    c.timing.speedup_ratio = 0.0;
    c.num_blocks = 1024;
    let mut e = Engine::new(c);
    e.add_request(1, prompt(5000, 0), 4, 0.0).unwrap();
    let (t, toks, _) = run_to_idle(&mut e, 0.0);
    assert_eq!(t, 0.0);
    assert_eq!(toks[&1].len(), 4);
}

#[test]
fn prefix_hit_reuses_full_blocks_but_recomputes_the_last_token() {
    let mut e = Engine::new(cfg(64, 16));
    let p = prompt(64, 3); // exactly 4 blocks
    e.add_request(1, p.clone(), 2, 0.0).unwrap();
    let (t, _, evs) = run_to_idle(&mut e, 0.0);
    // One Stored chain of the 4 prompt blocks (the decode never fills a 5th).
    let h = engine_block_hashes(SEED, &p, 16);
    assert_eq!(
        evs,
        vec![KvEvent::Stored {
            block_hashes: h.clone(),
            parent_block_hash: None,
            token_ids: p.clone(),
            block_size: 16,
            keys: None,
        }]
    );
    e.add_request(2, p.clone(), 2, t).unwrap();
    let mut out = StepOutput::default();
    e.step(t, &mut out);
    // 3 blocks hit (the last token must be computed), 16 tokens prefilled.
    assert_eq!(out.prefill_tokens, 16);
    assert_eq!(out.prefix_queries, 64);
    assert_eq!(out.prefix_hits, 48);
    assert_eq!(out.tokens[0].cached_tokens, 48);
    // The recomputed 4th block is already cached: no event.
    assert!(out.events.is_empty(), "{:?}", out.events);
    // Same prompt → same deterministic output.
    let (_, toks, _) = run_to_idle(&mut e, t + out.duration);
    assert_eq!(toks[&2].len(), 1);
}

#[test]
fn decode_blocks_are_cached_and_chained_to_the_prompt() {
    let mut e = Engine::new(cfg(64, 16));
    let p = prompt(40, 1); // 2 full blocks + 8
    e.add_request(1, p.clone(), 30, 0.0).unwrap();
    let (_, toks, evs) = run_to_idle(&mut e, 0.0);
    let out = &toks[&1];
    assert_eq!(out.len(), 30);
    let all: Vec<u32> = p.iter().chain(out.iter()).copied().collect();
    // KV exists for all but the last output token: 69 tokens → 4 full blocks.
    let h = engine_block_hashes(SEED, &all[..64], 16);
    assert_eq!(evs.len(), 3, "{evs:?}");
    assert_eq!(
        evs[0],
        KvEvent::Stored {
            block_hashes: h[..2].to_vec(),
            parent_block_hash: None,
            token_ids: all[..32].to_vec(),
            block_size: 16,
            keys: None,
        }
    );
    assert_eq!(
        evs[1],
        KvEvent::Stored {
            block_hashes: vec![h[2]],
            parent_block_hash: Some(h[1]),
            token_ids: all[32..48].to_vec(),
            block_size: 16,
            keys: None,
        }
    );
    assert_eq!(
        evs[2],
        KvEvent::Stored {
            block_hashes: vec![h[3]],
            parent_block_hash: Some(h[2]),
            token_ids: all[48..64].to_vec(),
            block_size: 16,
            keys: None,
        }
    );
    assert_eq!(e.cached_block_hashes(), {
        let mut v = h.clone();
        v.sort();
        v
    });
}

#[test]
fn chunked_prefill_spends_the_budget_and_decodes_first() {
    let mut c = cfg(1024, 16);
    c.scheduler.max_num_batched_tokens = 100;
    let mut e = Engine::new(c);
    e.add_request(1, prompt(20, 0), 5, 0.0).unwrap();
    let mut out = StepOutput::default();
    e.step(0.0, &mut out);
    assert_eq!(out.prefill_tokens, 20);
    e.add_request(2, prompt(250, 9), 2, 0.0).unwrap();
    e.step(1.0, &mut out);
    // 1 decode token for request 1, then 99 prefill tokens of request 2.
    assert_eq!(out.decode_seqs, 1);
    assert_eq!(out.prefill_tokens, 99);
    assert_eq!(out.tokens.len(), 1);
    e.step(2.0, &mut out);
    assert_eq!((out.decode_seqs, out.prefill_tokens), (1, 99));
    e.step(3.0, &mut out);
    assert_eq!((out.decode_seqs, out.prefill_tokens), (1, 52));
    assert_eq!(out.tokens.len(), 2, "request 2 got its first token");
}

#[test]
fn without_chunking_a_prefill_waits_for_a_whole_budget() {
    let mut c = cfg(1024, 16);
    c.scheduler.max_num_batched_tokens = 100;
    c.scheduler.chunked_prefill = false;
    let mut e = Engine::new(c.clone());
    assert!(matches!(
        c.validate(100, Some(1), 1),
        Err(RequestError::ExceedsBatch { .. })
    ));
    e.add_request(1, prompt(60, 0), 3, 0.0).unwrap();
    e.add_request(2, prompt(60, 5), 3, 0.0).unwrap();
    let mut out = StepOutput::default();
    e.step(0.0, &mut out);
    assert_eq!(out.prefill_tokens, 60);
    assert_eq!(e.num_waiting(), 1);
    e.step(1.0, &mut out);
    // 1 decode + 60 prefill = 61 ≤ 100.
    assert_eq!((out.decode_seqs, out.prefill_tokens), (1, 60));
}

#[test]
fn max_num_seqs_caps_the_running_set() {
    let mut c = cfg(1024, 16);
    c.scheduler.max_num_seqs = 2;
    let mut e = Engine::new(c);
    for i in 0..3 {
        e.add_request(i, prompt(10, i as u32), 4, 0.0).unwrap();
    }
    let mut out = StepOutput::default();
    e.step(0.0, &mut out);
    assert_eq!(e.num_running(), 2);
    assert_eq!(e.num_waiting(), 1);
    let (_, toks, _) = run_to_idle(&mut e, 1.0);
    assert_eq!(toks.values().map(Vec::len).sum::<usize>(), 12 - 2);
}

#[test]
fn memory_pressure_preempts_the_newest_and_everything_still_finishes() {
    // 8 blocks of 4 tokens = 32 tokens; three requests of 8 prompt + 12 output tokens.
    let mut c = cfg(8, 4);
    c.prefix_caching = true;
    let mut e = Engine::new(c);
    for i in 0..3u64 {
        e.add_request(i, prompt(8, 100 * i as u32), 12, 0.0)
            .unwrap();
    }
    let mut out = StepOutput::default();
    let mut now = 0.0;
    let mut preempted = 0;
    let mut toks: std::collections::BTreeMap<u64, Vec<u32>> = Default::default();
    let mut first_preempted_step_running = None;
    while e.has_work() {
        e.step(now, &mut out);
        now += out.duration;
        if out.num_preempted > 0 && first_preempted_step_running.is_none() {
            first_preempted_step_running = Some(e.num_running());
        }
        preempted += out.num_preempted;
        for t in &out.tokens {
            toks.entry(t.id).or_default().push(t.token);
        }
        e.pool().check_invariants().unwrap();
    }
    assert!(
        preempted > 0,
        "the pool is too small for three, someone must be preempted"
    );
    assert!(first_preempted_step_running.unwrap() < 3);
    assert!(toks.values().all(|v| v.len() == 12), "{toks:?}");
    // Output does not depend on preemption: same as an unpressured run.
    let mut big = Engine::new(cfg(64, 4));
    for i in 0..3u64 {
        big.add_request(i, prompt(8, 100 * i as u32), 12, 0.0)
            .unwrap();
    }
    let (_, toks2, _) = run_to_idle(&mut big, 0.0);
    assert_eq!(toks, toks2);
}

#[test]
fn eviction_emits_removed_leaves_first() {
    // 4 blocks of 4. A (2 blocks + 1) then B (different, 2 blocks + 1) forces evicting A's cache.
    let mut e = Engine::new(cfg(4, 4));
    let a = prompt(9, 0);
    e.add_request(1, a.clone(), 1, 0.0).unwrap();
    let (t, _, _) = run_to_idle(&mut e, 0.0);
    let ha = engine_block_hashes(SEED, &a[..8], 4);
    assert_eq!(e.cached_block_hashes().len(), 2);
    e.add_request(2, prompt(13, 500), 1, t).unwrap();
    let (_, _, evs) = run_to_idle(&mut e, t);
    // B needs 4 blocks: 2 free + A's 2 cached, evicted tail (leaf) first, then its parent.
    assert_eq!(
        &evs[..2],
        &[
            KvEvent::Removed { block_hash: ha[1] },
            KvEvent::Removed { block_hash: ha[0] }
        ]
    );
    assert!(
        matches!(evs[2], KvEvent::Stored { ref block_hashes, parent_block_hash: None, .. } if block_hashes.len() == 3)
    );
}

#[test]
fn reset_clears_only_when_idle() {
    let mut e = Engine::new(cfg(16, 4));
    e.add_request(1, prompt(9, 0), 3, 0.0).unwrap();
    let mut out = StepOutput::default();
    e.step(0.0, &mut out);
    assert!(!e.reset_prefix_cache());
    run_to_idle(&mut e, 1.0);
    assert!(e.reset_prefix_cache());
    let mut evs = Vec::new();
    e.take_events(&mut evs);
    assert_eq!(evs, vec![KvEvent::AllCleared]);
    assert!(e.cached_block_hashes().is_empty());
}

#[test]
fn abort_frees_blocks() {
    let mut e = Engine::new(cfg(16, 4));
    e.add_request(1, prompt(9, 0), 30, 0.0).unwrap();
    let mut out = StepOutput::default();
    e.step(0.0, &mut out);
    assert!(e.pool().num_active() > 0);
    assert!(e.abort(1));
    assert!(!e.abort(1));
    assert_eq!(e.pool().num_active(), 0);
    assert!(!e.has_work());
    e.pool().check_invariants().unwrap();
}

#[test]
fn validation_errors() {
    let c = cfg(4, 4);
    assert_eq!(c.validate(0, None, 1), Err(RequestError::EmptyPrompt));
    assert_eq!(c.validate(3, Some(1), 0), Err(RequestError::ZeroMaxTokens));
    assert!(matches!(
        c.validate(3, Some(1000), 1),
        Err(RequestError::TokenOutOfRange { id: 1000, .. })
    ));
    assert!(matches!(
        c.validate(16, Some(1), 1),
        Err(RequestError::TooLong {
            capacity: 16,
            total: 17,
            ..
        })
    ));
    assert_eq!(c.validate(15, Some(999), 1), Ok(()));
    let mut e = Engine::new(c);
    assert!(e.add_request(1, vec![], 1, 0.0).is_err());
    assert!(!e.has_work());
}
