//! Disaggregated prefill/decode (issue 16 item 4): the engine holds and receives KV, and on
//! real sockets a prefill mocker and a decode mocker speak vLLM's `kv_transfer_params`
//! protocol (as vLLM's disaggregated proxy drives it) and SGLang's bootstrap rendezvous.
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_core::hash::{compute_block_hashes, compute_sequence_hashes};
use kvrouter_core::index::KvIndex;
use kvrouter_mocker::engine::{Engine, EngineConfig, KvTransfer, StepOutput};
use kvrouter_mocker::events::KvEvent;
use kvrouter_mocker::kv_pool::engine_block_hashes;
use kvrouter_mocker::scheduler::SchedulerConfig;
use kvrouter_mocker::timing::TimingModel;
use kvrouter_mocker::{spawn_workers, DisaggregationMode, MockerConfig, Role, RunningWorker};
use kvrouter_wire::{KvEventSubscriber, SubscriberConfig};
use serde_json::{json, Value};

// ---------- the engine ----------

fn engine_cfg(num_blocks: usize, block_size: usize) -> EngineConfig {
    EngineConfig {
        num_blocks,
        block_size,
        scheduler: SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 8192,
            chunked_prefill: true,
        },
        prefix_caching: true,
        timing: TimingModel::default(),
        hash_seed: 7,
        vocab_size: 1000,
        output_vocab: 1000,
        eos_token_ids: vec![],
    }
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 13 + salt) % 1000).collect()
}

fn run_to_idle(e: &mut Engine, mut now: f64) -> (f64, Vec<KvEvent>) {
    let mut out = StepOutput::default();
    let mut events = Vec::new();
    while e.has_work() {
        e.step(now, &mut out);
        now += out.duration;
        events.extend(out.events.iter().cloned());
    }
    (now, events)
}

#[test]
fn a_prefill_holds_its_blocks_against_eviction_until_released() {
    let mut e = Engine::new(engine_cfg(12, 16));
    let p = tokens(70, 1); // 5 blocks: 4 full, 1 partial
    e.add_request_kv(1, p.clone(), 1, 0.0, None, KvTransfer::Send)
        .unwrap();
    let (now, _) = run_to_idle(&mut e, 0.0);
    let held = e.held_blocks(1).expect("held after it finished").to_vec();
    assert_eq!(held.len(), 5);
    assert_eq!(e.pool().num_active(), 5);
    // Pressure: requests that need every other block, several times over.
    for i in 0..6 {
        e.add_request(10 + i, tokens(100, 50 + i as u32), 4, now)
            .unwrap();
    }
    run_to_idle(&mut e, now);
    let hashes = engine_block_hashes(7, &p, 16);
    let cached = e.cached_block_hashes();
    assert!(
        hashes.iter().all(|h| cached.binary_search(h).is_ok()),
        "held blocks were evicted"
    );
    assert_eq!(e.pool().num_active(), 5);
    assert!(e.release_held(1));
    assert!(!e.release_held(1));
    assert_eq!((e.pool().num_active(), e.num_held()), (0, 0));
    e.pool().check_invariants().unwrap();
}

#[test]
fn received_kv_is_stored_and_decoded_without_a_prefill() {
    let cfg = engine_cfg(64, 16);
    let timing = cfg.timing;
    let mut e = Engine::new(cfg);
    let p = tokens(100, 3);
    e.add_request_kv(1, p.clone(), 3, 0.0, None, KvTransfer::Receive)
        .unwrap();
    let mut out = StepOutput::default();
    e.step(0.0, &mut out);
    assert_eq!(out.prefill_tokens, 0, "the prompt is not computed");
    assert_eq!(out.decode_seqs, 1);
    assert_eq!(out.tokens.len(), 1);
    assert_eq!(out.tokens[0].index, 0);
    assert_eq!(out.tokens[0].cached_tokens, 99);
    assert_eq!(
        out.duration,
        timing.step_seconds(0, true, 7.0 / 64.0),
        "one decode-sized step"
    );
    // The 6 full blocks of the first 99 tokens are stored as one chain.
    let h = engine_block_hashes(7, &p, 16);
    assert_eq!(
        out.events,
        vec![KvEvent::Stored {
            block_hashes: h[..6].to_vec(),
            parent_block_hash: None,
            token_ids: p[..96].to_vec(),
            block_size: 16,
            keys: None,
        }]
    );
    run_to_idle(&mut e, out.duration);
    // A local prefix hit is reused and only the rest is stored.
    let mut e = Engine::new(engine_cfg(64, 16));
    e.add_request(1, p[..40].to_vec(), 1, 0.0).unwrap();
    run_to_idle(&mut e, 0.0);
    assert_eq!(e.prefix_hit_blocks(&p), 2);
    e.add_request_kv(2, p.clone(), 1, 1.0, None, KvTransfer::Receive)
        .unwrap();
    e.step(1.0, &mut out);
    assert_eq!(out.prefill_tokens, 0);
    assert!(matches!(
        &out.events[..],
        [KvEvent::Stored { block_hashes, parent_block_hash: Some(parent), .. }]
            if block_hashes[..] == h[2..6] && *parent == h[1]
    ));
    e.pool().check_invariants().unwrap();
}

// ---------- real sockets ----------

const BS: usize = 16;
const D: WorkerWithDpRank = WorkerWithDpRank::new(2, 0);

fn cfg(mode: DisaggregationMode) -> MockerConfig {
    MockerConfig {
        num_gpu_blocks: 256,
        block_size: BS,
        speedup_ratio: 0.0,
        vocab_size: 1000,
        disaggregation_mode: mode,
        disaggregation_bootstrap_port: 0,
        ..Default::default()
    }
}

async fn one(cfg: &MockerConfig) -> RunningWorker {
    spawn_workers(cfg, 1).await.unwrap().pop().unwrap()
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn get(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// A sample's value in a `/metrics` text: the first line starting with `series` (a name, or
/// a name plus the start of its labels).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn completions(w: &RunningWorker) -> String {
    format!("{}/v1/completions", w.info.url)
}

/// What vLLM's proxy sends the prefill worker.
fn prefill_body(prompt: &[u32]) -> Value {
    json!({"prompt": prompt, "max_tokens": 1, "stream": false,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
            "remote_port": null}})
}

/// Subscribes to a worker's KV events; applies them to an index as they arrive.
struct Events {
    sub: KvEventSubscriber,
    rx: mpsc::Receiver<RouterEvent>,
    index: KvIndex,
}

impl Events {
    fn start(w: &RunningWorker) -> Self {
        let (tx, rx) = mpsc::sync_channel(10_000);
        let sub = KvEventSubscriber::start(
            SubscriberConfig {
                worker: D,
                endpoint: w.info.kv_events_endpoint.clone().unwrap(),
                replay_endpoint: w.info.replay_endpoint.clone(),
                block_size: BS as u32,
                ..Default::default()
            },
            tx,
        )
        .unwrap();
        Self {
            sub,
            rx,
            index: KvIndex::new(),
        }
    }

    /// The worker's cached blocks (router sequence hashes, sorted) once every batch it
    /// published has been applied.
    async fn cached(&mut self, w: &RunningWorker) -> Vec<u64> {
        let published = w.handle.snapshot().await.unwrap().batches_published;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.sub.stats().applied < published {
            assert!(
                Instant::now() < deadline,
                "subscriber stuck: {:?}",
                self.sub.stats()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while let Ok(ev) = self.rx.recv_timeout(Duration::from_millis(50)) {
            self.index.apply(&ev).unwrap();
        }
        let mut v: Vec<u64> = self
            .index
            .worker_sequence_hashes(D)
            .into_iter()
            .map(|h| h.0)
            .collect();
        v.sort_unstable();
        v
    }
}

fn router_hashes(prompt: &[u32], blocks: usize) -> Vec<u64> {
    let mut v: Vec<u64> =
        compute_sequence_hashes(&compute_block_hashes(prompt, BS, &Default::default(), None))
            [..blocks]
            .iter()
            .map(|h| h.0)
            .collect();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_prefill_holds_then_the_decode_worker_pulls_stores_and_decodes() {
    let prefill = one(&cfg(DisaggregationMode::Prefill)).await;
    let decode = one(&cfg(DisaggregationMode::Decode)).await;
    // Roles, where a router learns them.
    let info = serde_json::to_value(&prefill.info).unwrap();
    assert_eq!(info["role"], "prefill");
    let side_port = prefill.info.bootstrap_port.expect("a prefill side channel");
    assert_eq!(info["bootstrap_port"], side_port);
    assert_eq!(decode.info.role, Role::Decode);
    assert!(serde_json::to_value(&decode.info).unwrap()["bootstrap_port"].is_null());
    let server_info: Value =
        serde_json::from_str(&get(&format!("{}/server_info", prefill.info.url)).await).unwrap();
    assert_eq!(server_info["role"], "prefill");
    assert_eq!(server_info["disaggregation_bootstrap_port"], side_port);
    let m = get(&format!("{}/metrics", decode.info.url)).await;
    assert!(
        m.contains(
            "kvrouter_mocker_info{engine=\"0\",model_name=\"mock-model\",role=\"decode\"} 1.0"
        ),
        "{m}"
    );

    let mut events = Events::start(&decode);
    let prompt = tokens(100, 1); // 7 blocks: 6 full + 4 tokens
    let (s, p) = post(&completions(&prefill), &prefill_body(&prompt)).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["choices"][0]["token_ids"].as_array().unwrap().len(), 1);
    let params = p["kv_transfer_params"].clone();
    assert_eq!(params["do_remote_prefill"], true);
    assert_eq!(params["do_remote_decode"], false);
    assert_eq!(
        params["remote_engine_id"],
        server_info["kv_transfer_engine_id"]
    );
    assert_eq!(params["remote_block_ids"].as_array().unwrap().len(), 7);
    assert_eq!(params["remote_host"], "127.0.0.1");
    assert_eq!(params["remote_port"], side_port);
    assert_eq!(params["remote_request_id"], p["id"]);
    assert_eq!(params["tp_size"], 1);
    // Held: still referenced, never evictable, until pulled.
    let snap = prefill.handle.snapshot().await.unwrap();
    assert_eq!(
        (snap.held_transfers, snap.held_blocks, snap.active_blocks),
        (1, 7, 7)
    );
    let m = get(&format!("{}/metrics", prefill.info.url)).await;
    assert_eq!(metric(&m, "kvrouter_mocker_kv_transfer_held_requests"), 1.0);
    assert!(metric(&m, "vllm:kv_cache_usage_perc") > 0.0);

    // The original request, with the params, to the decode worker.
    let (s, d) = post(
        &completions(&decode),
        &json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": params}),
    )
    .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["choices"][0]["token_ids"].as_array().unwrap().len(), 5);
    assert_eq!(d["choices"][0]["finish_reason"], "length");
    assert_eq!(d["usage"]["prompt_tokens"], 100);
    assert_eq!(d["usage"]["prompt_tokens_details"]["cached_tokens"], 99);
    assert!(d.get("kv_transfer_params").is_none());
    // The pull released the prefill worker's blocks.
    let snap = prefill.handle.snapshot().await.unwrap();
    assert_eq!(
        (snap.held_transfers, snap.held_blocks, snap.active_blocks),
        (0, 0, 0)
    );
    let m = get(&format!("{}/metrics", prefill.info.url)).await;
    assert_eq!(metric(&m, "kvrouter_mocker_kv_transfer_held_requests"), 0.0);
    assert_eq!(
        metric(&m, "kvrouter_mocker_kv_transfers_total{engine=\"0\",model_name=\"mock-model\",side=\"prefill\",outcome=\"pulled\""),
        1.0
    );
    // The decode worker computed no prompt token and stored the transferred blocks.
    let m = get(&format!("{}/metrics", decode.info.url)).await;
    assert_eq!(
        metric(&m, "kvrouter_mocker_computed_prefill_tokens_total"),
        0.0
    );
    assert_eq!(metric(&m, "kvrouter_mocker_kv_transfer_blocks_total"), 7.0);
    assert_eq!(events.cached(&decode).await, router_hashes(&prompt, 6));

    // The same params again: already pulled.
    let (s, e) = post(
        &completions(&decode),
        &json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": p["kv_transfer_params"]}),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("already pulled"), "{msg}");
    assert_eq!(e["error"]["param"], "kv_transfer_params");

    // A streamed decode of a second prompt.
    let prompt2 = tokens(40, 9);
    let (_, p2) = post(&completions(&prefill), &prefill_body(&prompt2)).await;
    let r = reqwest::Client::new()
        .post(completions(&decode))
        .json(&json!({"prompt": prompt2, "max_tokens": 3, "stream": true,
            "kv_transfer_params": p2["kv_transfer_params"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("\"token_ids\"").count(), 3, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(prefill.handle.snapshot().await.unwrap().active_blocks, 0);
    let m = get(&format!("{}/metrics", decode.info.url)).await;
    assert_eq!(
        metric(&m, "kvrouter_mocker_computed_prefill_tokens_total"),
        0.0
    );
    let mut want = router_hashes(&prompt, 6);
    want.extend(router_hashes(&prompt2, 2));
    want.sort_unstable();
    assert_eq!(events.cached(&decode).await, want);
    events.sub.stop();
    prefill.stop().await;
    decode.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_unknown_and_unreachable_transfers_fail_cleanly() {
    let prefill = one(&MockerConfig {
        kv_transfer_timeout: 1.0,
        ..cfg(DisaggregationMode::Prefill)
    })
    .await;
    let decode = one(&cfg(DisaggregationMode::Decode)).await;
    let prompt = tokens(50, 2);
    let decode_with =
        |params: Value| json!({"prompt": prompt, "max_tokens": 2, "kv_transfer_params": params});

    // Expired: released by the timeout alone (the prefill worker is idle), then refused.
    let (_, p) = post(&completions(&prefill), &prefill_body(&prompt)).await;
    let params = p["kv_transfer_params"].clone();
    assert_eq!(prefill.handle.snapshot().await.unwrap().active_blocks, 4);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let snap = prefill.handle.snapshot().await.unwrap();
    assert_eq!((snap.held_transfers, snap.active_blocks), (0, 0));
    let m = get(&format!("{}/metrics", prefill.info.url)).await;
    assert_eq!(
        metric(&m, "kvrouter_mocker_kv_transfers_total{engine=\"0\",model_name=\"mock-model\",side=\"prefill\",outcome=\"expired\""),
        1.0
    );
    let (s, e) = post(&completions(&decode), &decode_with(params)).await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("expired"),
        "{e}"
    );

    // Unknown engine id, unknown blocks: refused, and the real hold is untouched.
    let (_, p) = post(&completions(&prefill), &prefill_body(&prompt)).await;
    let good = p["kv_transfer_params"].clone();
    let mut bad = good.clone();
    bad["remote_engine_id"] = json!("not-an-engine");
    let (s, e) = post(&completions(&decode), &decode_with(bad)).await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unknown engine id not-an-engine"),
        "{e}"
    );
    let mut bad = good.clone();
    bad["remote_block_ids"] = json!([200, 201, 202, 203]);
    bad["remote_request_id"] = Value::Null;
    let (s, e) = post(&completions(&decode), &decode_with(bad)).await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("holds no KV blocks"),
        "{e}"
    );
    assert_eq!(prefill.handle.snapshot().await.unwrap().held_transfers, 1);

    // Unreachable prefill worker: a 502.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut bad = good.clone();
    bad["remote_port"] = json!(port);
    let (s, e) = post(&completions(&decode), &decode_with(bad)).await;
    assert_eq!(s, 502, "{e}");
    assert_eq!(e["error"]["type"], "BadGatewayError");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach it"),
        "{e}"
    );

    // Malformed params, wrong roles, a streamed vLLM prefill: 400s naming the field.
    let mut bad = good.clone();
    bad["remote_block_ids"] = json!("x");
    for (url, body) in [
        (completions(&decode), decode_with(bad)),
        (completions(&decode), decode_with(json!("params"))),
        (completions(&decode), prefill_body(&prompt)),
        (completions(&prefill), decode_with(good.clone())),
    ] {
        let (s, e) = post(&url, &body).await;
        assert_eq!(s, 400, "{e}");
        assert_eq!(e["error"]["param"], "kv_transfer_params", "{e}");
    }
    let mut streamed = prefill_body(&prompt);
    streamed["stream"] = json!(true);
    let (s, e) = post(&completions(&prefill), &streamed).await;
    assert_eq!((s, e["error"]["param"].clone()), (400, json!("stream")));

    // Fresh params work (the ones above may have expired by now on a busy machine).
    let (_, p) = post(&completions(&prefill), &prefill_body(&prompt)).await;
    let (s, d) = post(
        &completions(&decode),
        &decode_with(p["kv_transfer_params"].clone()),
    )
    .await;
    assert_eq!(s, 200, "{d}");
    let m = get(&format!("{}/metrics", decode.info.url)).await;
    assert_eq!(
        metric(&m, "kvrouter_mocker_kv_transfers_total{engine=\"0\",model_name=\"mock-model\",side=\"decode\",outcome=\"failed\""),
        4.0
    );
    // An aggregated worker ignores the fields, as vLLM without a KV connector does.
    let agg = one(&cfg(DisaggregationMode::Agg)).await;
    let (s, a) = post(&completions(&agg), &prefill_body(&prompt)).await;
    assert_eq!(s, 200, "{a}");
    assert!(a.get("kv_transfer_params").is_none());
    assert_eq!(agg.handle.snapshot().await.unwrap().active_blocks, 0);
    assert_eq!(agg.info.role, Role::Both);
    agg.stop().await;
    prefill.stop().await;
    decode.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_bootstrap_room_pairs_the_prefill_and_the_decode() {
    let prefill = one(&MockerConfig {
        kv_transfer_timeout: 2.0,
        ..cfg(DisaggregationMode::Prefill)
    })
    .await;
    let decode = one(&cfg(DisaggregationMode::Decode)).await;
    let mut events = Events::start(&decode);
    let port = prefill.info.bootstrap_port.unwrap();
    let body = |prompt: &[u32], room: u64| {
        json!({"prompt": prompt, "max_tokens": 6, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": port, "bootstrap_room": room})
    };
    // The decode request first: it waits for the room's prefill.
    let prompt = tokens(80, 4);
    let (d_url, d_body) = (completions(&decode), body(&prompt, 11));
    let d = tokio::spawn(async move { post(&d_url, &d_body).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while prefill.handle.snapshot().await.unwrap().waiting_pulls == 0 {
        assert!(
            Instant::now() < deadline,
            "the pull never reached the prefill worker"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, p) = post(&completions(&prefill), &body(&prompt, 11)).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        p["choices"][0]["token_ids"].as_array().unwrap().len(),
        1,
        "a prefill computes one token"
    );
    let (s, d) = d.await.unwrap();
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["choices"][0]["token_ids"].as_array().unwrap().len(), 6);
    assert_eq!(d["usage"]["prompt_tokens_details"]["cached_tokens"], 79);
    let snap = prefill.handle.snapshot().await.unwrap();
    assert_eq!(
        (snap.held_transfers, snap.waiting_pulls, snap.active_blocks),
        (0, 0, 0)
    );
    // The prefill first: held until the decode request pulls it.
    let prompt2 = tokens(33, 8);
    let (s, _) = post(&completions(&prefill), &body(&prompt2, 12)).await;
    assert_eq!(s, 200);
    assert_eq!(prefill.handle.snapshot().await.unwrap().held_transfers, 1);
    let (s, d) = post(&completions(&decode), &body(&prompt2, 12)).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(prefill.handle.snapshot().await.unwrap().active_blocks, 0);
    let m = get(&format!("{}/metrics", decode.info.url)).await;
    assert_eq!(
        metric(&m, "kvrouter_mocker_computed_prefill_tokens_total"),
        0.0
    );
    // 79 transferred tokens make 4 full blocks; the first token's step fills the 5th.
    let mut want = router_hashes(&prompt, 5);
    want.extend(router_hashes(&prompt2, 2));
    want.sort_unstable();
    assert_eq!(events.cached(&decode).await, want);
    // A room already pulled, and one whose prefill never comes (bounded wait).
    let (s, e) = post(&completions(&decode), &body(&prompt2, 12)).await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already pulled"),
        "{e}"
    );
    let t0 = Instant::now();
    let (s, e) = post(&completions(&decode), &body(&prompt2, 13)).await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("room 13"),
        "{e}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(prefill.handle.snapshot().await.unwrap().waiting_pulls, 0);
    events.sub.stop();
    prefill.stop().await;
    decode.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transfer_takes_bytes_over_bandwidth_and_skips_blocks_already_cached() {
    let prefill = one(&cfg(DisaggregationMode::Prefill)).await;
    // 16 blocks of 16 tokens of 114688 bytes at 0.05 GB/s: 0.587 s at speedup 1.
    let decode = one(&MockerConfig {
        speedup_ratio: 1.0,
        kv_transfer_bandwidth: 0.05,
        ..cfg(DisaggregationMode::Decode)
    })
    .await;
    let prompt = tokens(256, 5);
    let want = kvrouter_mocker::disagg::transfer_seconds(16, BS, 114_688, 0.05, 1.0);
    assert!((want - 0.587).abs() < 0.001, "{want}");
    for (round, blocks_total) in [(0, 16.0), (1, 17.0)] {
        let (_, p) = post(&completions(&prefill), &prefill_body(&prompt)).await;
        let t0 = Instant::now();
        let (s, d) = post(
            &completions(&decode),
            &json!({"prompt": prompt, "max_tokens": 1, "kv_transfer_params": p["kv_transfer_params"]}),
        )
        .await;
        let took = t0.elapsed().as_secs_f64();
        assert_eq!(s, 200, "{d}");
        if round == 0 {
            assert!(took >= want, "{took} < {want}");
        }
        // The second time the decode worker caches 15 of the 16 blocks: it pulls 1.
        let m = get(&format!("{}/metrics", decode.info.url)).await;
        assert_eq!(
            metric(&m, "kvrouter_mocker_kv_transfer_blocks_total"),
            blocks_total
        );
    }
    prefill.stop().await;
    decode.stop().await;
}

/// The Qwen3 tokenizer vendored in the repository.
fn qwen3_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qwen3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_carry_the_transfer_too() {
    let with_model = |mode| MockerConfig {
        model_path: Some(qwen3_dir()),
        vocab_size: 151_936,
        ..cfg(mode)
    };
    let prefill = one(&with_model(DisaggregationMode::Prefill)).await;
    let decode = one(&with_model(DisaggregationMode::Decode)).await;
    let messages = json!([{"role": "user", "content": "Tell me about KV caches. ".repeat(8)}]);
    let (s, p) = post(
        &format!("{}/v1/chat/completions", prefill.info.url),
        &json!({"messages": messages, "max_tokens": 1, "max_completion_tokens": 1,
            "stream": false, "kv_transfer_params": {"do_remote_decode": true}}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["object"], "chat.completion");
    let params = p["kv_transfer_params"].clone();
    assert!(
        !params["remote_block_ids"].as_array().unwrap().is_empty(),
        "{p}"
    );
    let (s, d) = post(
        &format!("{}/v1/chat/completions", decode.info.url),
        &json!({"messages": messages, "max_completion_tokens": 4, "kv_transfer_params": params}),
    )
    .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["usage"]["completion_tokens"], 4);
    let prompt_tokens = d["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        d["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt_tokens - 1
    );
    assert_eq!(prefill.handle.snapshot().await.unwrap().active_blocks, 0);
    prefill.stop().await;
    decode.stop().await;
}
