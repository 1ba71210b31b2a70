//! A CPU-only mock inference engine with vLLM's (or SGLang's) HTTP API, KV events and metrics.
//!
//! It stands in for a vLLM worker — or, with `--engine sglang`, an SGLang one ([`sglang`]) —
//! at every interface the router sees (HTTP, ZMQ KV events, Prometheus metrics), with one or
//! more data-parallel ranks ([`dp`]), and a credible engine model underneath
//! (`dynamo-router-spec.md` §15):
//!
//! * [`kv_pool`] — paged KV pool, prefix caching by per-process-seeded chained hash, leaf-first
//!   LRU eviction;
//! * [`scheduler`] — vLLM v1 continuous batching: token budget, chunked prefill, preemption;
//! * [`timing`] — Dynamo's polynomial step-time model;
//! * [`engine`] — the above as a pure state machine driven by a caller's clock;
//! * [`events`] — the events it emits and the [`events::EventSink`] they go to
//!   ([`WireSink`] publishes them over ZMQ with `kvrouter-wire`);
//! * [`metrics`] — `vllm:*` Prometheus metrics;
//! * [`worker`] — the live driver task; [`http`] — the axum API; [`cli`] — `kvrouter mocker`;
//! * disaggregated prefill/decode: [`disagg`] (roles, vLLM `kv_transfer_params` and SGLang
//!   bootstrap protocols, the pull side channel, transfer time) and [`transfer`] (the KV
//!   transfers a prefill worker holds);
//! * what the output says: [`params`] (request fields), [`sampling`] (seeds, seeded tokens,
//!   stop conditions, logprobs), [`choice`] (text deltas, finish reasons, logprobs shapes),
//!   [`structured`] (JSON Schema → value), [`tools`] (Hermes tool calls, reasoning blocks).
//!
//! Start engines in-process with [`spawn_workers`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvrouter_mocker::MockerError> {
//! let config = kvrouter_mocker::MockerConfig { speedup_ratio: 0.0, ..Default::default() };
//! let workers = kvrouter_mocker::spawn_workers(&config, 4).await?;
//! for w in &workers {
//!     println!("{}", serde_json::to_string(&w.info).unwrap()); // url, kv_events_endpoint, ...
//! }
//! for w in workers {
//!     w.stop().await;
//! }
//! # Ok(()) }
//! ```
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::oneshot;

pub mod choice;
pub mod cli;
pub mod disagg;
pub mod dp;
pub mod engine;
pub mod events;
pub mod http;
pub mod kv_pool;
pub mod lora;
pub mod metrics;
pub mod params;
pub mod sampling;
pub mod scheduler;
pub mod sglang;
pub mod structured;
pub mod timing;
pub mod tools;
pub mod transfer;
pub mod trtllm;
pub mod worker;

use engine::{Engine, EngineConfig};
use events::{EventSink, KvEvent, NullSink};
use kvrouter_preprocess::Preprocessor;
use scheduler::SchedulerConfig;
use timing::TimingModel;
use worker::WorkerHandle;

pub use disagg::{DisaggregationMode, Role};

/// Every `kvrouter mocker` flag (Dynamo mocker names, §15.3), for in-process use too.
#[derive(Clone, Debug, PartialEq)]
pub struct MockerConfig {
    /// The engine it mimics (`--engine`, vllm): API shapes, event format, rank fields.
    pub engine: cli::Engine,
    /// Data-parallel ranks per worker (`--data-parallel-size`, 1), each its own engine and
    /// event publisher, behind one HTTP server (see [`dp`]).
    pub data_parallel_size: usize,
    /// SGLang's `--enable-cache-report` (off): usage reports cached tokens.
    pub enable_cache_report: bool,
    /// HF-style model directory: tokenizer (text prompts, output text) and chat template.
    pub model_path: Option<PathBuf>,
    /// Served model name; default: the model directory's name, else `"mock-model"`.
    pub model_name: Option<String>,
    /// KV blocks per engine (`--num-gpu-blocks-override`, 16384).
    pub num_gpu_blocks: usize,
    /// Tokens per block (`--block-size`, 64).
    pub block_size: usize,
    /// Running sequences at most (`--max-num-seqs`, 256).
    pub max_num_seqs: usize,
    /// Tokens per step (`--max-num-batched-tokens`, 8192).
    pub max_num_batched_tokens: usize,
    /// Prefix caching (`--enable-prefix-caching`, on).
    pub enable_prefix_caching: bool,
    /// Chunked prefill (`--enable-chunked-prefill`, on).
    pub enable_chunked_prefill: bool,
    /// Divides modelled durations; 0 = no delay (`--speedup-ratio`, 1.0).
    pub speedup_ratio: f64,
    /// Further divides decode durations (`--decode-speedup-ratio`, 1.0).
    pub decode_speedup_ratio: f64,
    /// Address every socket binds to (`--host`, 127.0.0.1).
    pub host: String,
    /// HTTP port of worker 0; worker i uses base + i; 0 = any free port (`--http-port`).
    pub http_port: u16,
    /// Publish KV events over ZMQ (on; off also when prefix caching is off).
    pub kv_events: bool,
    /// ZMQ PUB port of worker 0, base + i; 0 = any free port (`--zmq-kv-events-ports`).
    pub zmq_kv_events_port: u16,
    /// ZMQ replay ROUTER port of worker 0, base + i; 0 = any free port (`--zmq-replay-ports`).
    pub zmq_replay_port: u16,
    /// Topic frame of the events (vLLM default: empty).
    pub kv_events_topic: String,
    /// Event batches kept for replay per worker (vLLM: 10000; smaller by default because one
    /// mock process hosts many workers and a batch of 4k-token prompts is tens of KB).
    pub kv_events_buffer_steps: usize,
    /// TensorRT-LLM: events buffered per rank between polls (`--event-buffer-max-size`, 1024).
    pub event_buffer_max_size: usize,
    /// TensorRT-LLM: publish vLLM's ZMQ format instead of serving `POST /kv_cache_events`
    /// (`--trtllm-zmq-events`, off).
    pub trtllm_zmq_events: bool,
    /// Valid prompt ids are below this when no tokenizer is given (Qwen3's 151936).
    pub vocab_size: u32,
    /// `max_tokens` of requests that give none (OpenAI completions default: 16).
    pub default_max_tokens: usize,
    /// Engine hash seed; None = a per-process random seed (see [`kv_pool`]).
    pub hash_seed: Option<u64>,
    /// Answer prompts that offer tools with a Hermes tool call (`--tool-calls`, auto).
    pub tool_calls: ToolCalls,
    /// Open answers with a `<think>` reasoning block (`--reasoning`, off).
    pub reasoning: bool,
    /// Role in disaggregated serving (`--disaggregation-mode`, agg); see [`disagg`].
    pub disaggregation_mode: DisaggregationMode,
    /// The `namespace.component.endpoint` the workers advertise (`--endpoint`); None: Dynamo's
    /// defaults, `dynamo.prefill.generate` for prefill workers, else `dynamo.backend.generate`.
    pub endpoint: Option<String>,
    /// Side-channel port of prefill worker 0, base + i; 0 = any free port
    /// (`--disaggregation-bootstrap-port`, 8998).
    pub disaggregation_bootstrap_port: u16,
    /// Seconds a prefill worker holds unpulled blocks, and a pull by room waits for its
    /// prefill (`--kv-transfer-timeout`, 480: vLLM's `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`).
    pub kv_transfer_timeout: f64,
    /// GB/s of a KV transfer into a decode worker; 0 = instantaneous
    /// (`--kv-transfer-bandwidth`, 25).
    pub kv_transfer_bandwidth: f64,
    /// KV bytes per token (`--kv-bytes-per-token`, 114688: Qwen3-0.6B in bf16).
    pub kv_bytes_per_token: usize,
    /// KV transfers a prefill worker holds at most; beyond, the oldest is released
    /// (also the bound on pulls waiting for a room).
    pub kv_transfer_max_held: usize,
    /// Serve LoRA adapters (`--enable-lora`, off): needed by `lora_modules`.
    pub enable_lora: bool,
    /// The adapters served (`--lora-modules`), in order: adapter i has `lora_id` i + 1.
    pub lora_modules: Vec<lora::LoraModule>,
}

/// Whether the mock answers tool-offering prompts with a tool call (`--tool-calls`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolCalls {
    /// When the prompt offers tools and its last turn is not a tool response.
    #[default]
    Auto,
    /// Never: tools are ignored.
    Never,
}

impl Default for MockerConfig {
    fn default() -> Self {
        Self {
            engine: cli::Engine::Vllm,
            data_parallel_size: 1,
            enable_cache_report: false,
            model_path: None,
            model_name: None,
            num_gpu_blocks: 16384,
            block_size: 64,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            speedup_ratio: 1.0,
            decode_speedup_ratio: 1.0,
            host: "127.0.0.1".into(),
            http_port: 0,
            kv_events: true,
            zmq_kv_events_port: 0,
            zmq_replay_port: 0,
            kv_events_topic: String::new(),
            kv_events_buffer_steps: 1000,
            event_buffer_max_size: trtllm::DEFAULT_EVENT_BUFFER_MAX_SIZE,
            trtllm_zmq_events: false,
            vocab_size: 151_936,
            default_max_tokens: 16,
            hash_seed: None,
            tool_calls: ToolCalls::Auto,
            reasoning: false,
            disaggregation_mode: DisaggregationMode::Agg,
            endpoint: None,
            disaggregation_bootstrap_port: disagg::DEFAULT_BOOTSTRAP_PORT,
            kv_transfer_timeout: worker::DEFAULT_KV_TRANSFER_TIMEOUT.as_secs_f64(),
            kv_transfer_bandwidth: disagg::DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS,
            kv_bytes_per_token: disagg::DEFAULT_KV_BYTES_PER_TOKEN,
            kv_transfer_max_held: transfer::DEFAULT_MAX_HELD,
            enable_lora: false,
            lora_modules: Vec::new(),
        }
    }
}

/// Most data-parallel ranks per worker (the router's bound on a registration's `dp_size`).
pub const MAX_DATA_PARALLEL_SIZE: usize = 256;

/// Why workers could not start.
#[derive(Debug, thiserror::Error)]
pub enum MockerError {
    /// A flag value is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The model directory could not be loaded.
    #[error("model: {0}")]
    Model(#[from] kvrouter_preprocess::PreprocessError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// HTTP or ZMQ.
        what: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The ZMQ publisher failed.
    #[error("kv events publisher: {0}")]
    Wire(#[from] kvrouter_wire::WireError),
}

impl MockerConfig {
    /// The endpoint the workers advertise: `--endpoint` without a `dyn://` prefix, else
    /// Dynamo's default for the role (its prefill workers serve `dynamo.prefill.generate`).
    pub fn endpoint(&self) -> String {
        match &self.endpoint {
            Some(e) => e.strip_prefix("dyn://").unwrap_or(e).to_string(),
            None if self.disaggregation_mode == DisaggregationMode::Prefill => {
                "dynamo.prefill.generate".into()
            }
            None => "dynamo.backend.generate".into(),
        }
    }

    /// Whether workers serve their KV events on `POST /kv_cache_events` (TensorRT-LLM without
    /// `--trtllm-zmq-events`, events and prefix caching on) rather than on ZMQ.
    pub fn trtllm_http_events(&self) -> bool {
        self.engine == cli::Engine::Trtllm
            && !self.trtllm_zmq_events
            && self.kv_events
            && self.enable_prefix_caching
    }

    /// Checks the values; see [`MockerError::Config`].
    pub fn validate(&self) -> Result<(), MockerError> {
        let bad = |m: &str| Err(MockerError::Config(m.into()));
        if self.block_size == 0 {
            return bad("--block-size must be at least 1");
        }
        if self.num_gpu_blocks == 0 {
            return bad("--num-gpu-blocks-override must be at least 1");
        }
        if self.max_num_seqs == 0 {
            return bad("--max-num-seqs must be at least 1");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("--max-num-batched-tokens must be at least 1");
        }
        if !(self.speedup_ratio >= 0.0 && self.speedup_ratio.is_finite()) {
            return bad("--speedup-ratio must be a finite number >= 0");
        }
        if !(self.decode_speedup_ratio > 0.0 && self.decode_speedup_ratio.is_finite()) {
            return bad("--decode-speedup-ratio must be a finite number > 0");
        }
        if self.vocab_size == 0 {
            return bad("--vocab-size must be at least 1");
        }
        if !(self.kv_transfer_timeout > 0.0 && self.kv_transfer_timeout < 1e9) {
            return bad("--kv-transfer-timeout must be a number of seconds > 0");
        }
        if !(self.kv_transfer_bandwidth >= 0.0 && self.kv_transfer_bandwidth.is_finite()) {
            return bad("--kv-transfer-bandwidth must be a finite number >= 0");
        }
        if self.event_buffer_max_size == 0 {
            return bad("--event-buffer-max-size must be at least 1");
        }
        if self.kv_bytes_per_token == 0 {
            return bad("--kv-bytes-per-token must be at least 1");
        }
        if self.kv_transfer_max_held == 0 {
            return bad("the held KV transfers' cap must be at least 1");
        }
        if !(1..=MAX_DATA_PARALLEL_SIZE).contains(&self.data_parallel_size) {
            return Err(MockerError::Config(format!(
                "--data-parallel-size must be 1..={MAX_DATA_PARALLEL_SIZE}"
            )));
        }
        self.validate_lora()?;
        if self.data_parallel_size > 1 && self.disaggregation_mode != DisaggregationMode::Agg {
            return bad(
                "--data-parallel-size above 1 is for aggregated workers only (--disaggregation-mode agg)",
            );
        }
        Ok(())
    }

    /// `--lora-modules` needs `--enable-lora` (as in vLLM) and, with `--engine trtllm`, its ZMQ
    /// events (the JSON ones name no adapter); at most
    /// [`lora::MAX_LORA_MODULES`] adapters, each named once and not like the served model.
    fn validate_lora(&self) -> Result<(), MockerError> {
        let m = &self.lora_modules;
        if m.is_empty() {
            return Ok(());
        }
        let bad = |msg: String| Err(MockerError::Config(msg));
        if !self.enable_lora {
            return bad("--lora-modules needs --enable-lora".into());
        }
        if self.trtllm_http_events() {
            // Its JSON events name no adapter: the router would credit adapter blocks to the
            // base model.
            return bad("--lora-modules with --engine trtllm needs --trtllm-zmq-events: TensorRT-LLM's JSON KV events carry no adapter".into());
        }
        if m.len() > lora::MAX_LORA_MODULES {
            return bad(format!(
                "--lora-modules: at most {} adapters",
                lora::MAX_LORA_MODULES
            ));
        }
        let base = self.served_name();
        for (i, a) in m.iter().enumerate() {
            if a.name == base {
                return bad(format!(
                    "--lora-modules: adapter {:?} is named like the served model",
                    a.name
                ));
            }
            if m[..i].iter().any(|b| b.name == a.name) {
                return bad(format!("--lora-modules names {:?} twice", a.name));
            }
        }
        Ok(())
    }

    /// The engine configuration of one worker, given the loaded tokenizer (if any).
    pub fn engine_config(&self, pre: Option<&Preprocessor>) -> EngineConfig {
        let (vocab_size, output_vocab, eos) = match pre {
            Some(p) => {
                let v = p.vocab_size() as u32;
                // Generate ordinary tokens only (no added/special ones).
                let base = (p.tokenizer().get_vocab_size(false) as u32).clamp(1, v.max(1));
                (v.max(1), base, p.eos_token_ids().to_vec())
            }
            None => (self.vocab_size, self.vocab_size, Vec::new()),
        };
        EngineConfig {
            num_blocks: self.num_gpu_blocks,
            block_size: self.block_size,
            scheduler: SchedulerConfig {
                max_num_seqs: self.max_num_seqs,
                max_num_batched_tokens: self.max_num_batched_tokens,
                chunked_prefill: self.enable_chunked_prefill,
            },
            prefix_caching: self.enable_prefix_caching,
            timing: TimingModel {
                speedup_ratio: self.speedup_ratio,
                decode_speedup_ratio: self.decode_speedup_ratio,
            },
            hash_seed: self.hash_seed.unwrap_or_else(kv_pool::process_hash_seed),
            vocab_size,
            output_vocab,
            eos_token_ids: eos,
        }
    }

    fn served_name(&self) -> String {
        if let Some(n) = &self.model_name {
            return n.clone();
        }
        self.model_path
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mock-model".into())
    }
}

/// What a router needs to register one worker (printed as one JSON line by `kvrouter mocker`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkerInfo {
    /// 0-based index in this process.
    pub index: usize,
    /// Base URL of the OpenAI-compatible API, e.g. `http://127.0.0.1:8100`.
    pub url: String,
    /// Served model name.
    pub model: String,
    /// The engine it mimics: `vllm`, `sglang` or `trtllm`.
    pub engine: cli::Engine,
    /// ZMQ PUB endpoint of rank 0's KV events (None when events are off); rank r publishes
    /// on its port + r.
    pub kv_events_endpoint: Option<String>,
    /// ZMQ replay ROUTER endpoint of rank 0 (None when events are off); rank r: port + r.
    pub replay_endpoint: Option<String>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Data-parallel ranks behind its URL.
    pub dp_size: u32,
    /// KV blocks in each rank's pool.
    pub total_kv_blocks: usize,
    /// Running sequences at most.
    pub max_num_seqs: usize,
    /// Tokens per step.
    pub max_num_batched_tokens: usize,
    /// Its role in disaggregated serving: `both` (aggregated), `prefill` or `decode`.
    pub role: Role,
    /// The `namespace.component.endpoint` it serves (a `kvrouter router --endpoint` routes
    /// the workers of its endpoint).
    pub endpoint: String,
    /// A prefill worker's side channel for KV pulls (SGLang's `bootstrap_port`, vLLM's
    /// `remote_port`); absent for other roles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_port: Option<u16>,
    /// The LoRA adapters it serves, in `--lora-modules` order (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lora_adapters: Vec<String>,
}

/// One started worker: its addresses, handles to its engines, and its tasks.
pub struct RunningWorker {
    /// Where to reach it.
    pub info: WorkerInfo,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// Commands to rank 0's engine (snapshots, resets).
    pub handle: WorkerHandle,
    /// Every rank's engine, by rank (`ranks[0]` is `handle`).
    pub ranks: Vec<WorkerHandle>,
    stop_http: Option<oneshot::Sender<()>>,
    stop_side: Option<oneshot::Sender<()>>,
    stop_engines: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningWorker {
    /// Stops the HTTP server and the engine and waits for their tasks.
    pub async fn stop(mut self) {
        self.signal_stop();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    fn signal_stop(&mut self) {
        if let Some(tx) = self.stop_http.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.stop_side.take() {
            let _ = tx.send(());
        }
        for tx in self.stop_engines.drain(..) {
            let _ = tx.send(());
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// Publishes one rank's events with `kvrouter-wire`'s ZMQ publisher, in its engine's format:
/// vLLM ≥ 0.24 map encoding, or SGLang's ([`sglang`]); the batch carries the rank, medium
/// "GPU". Publish errors are logged and the engine keeps going.
pub struct WireSink {
    publisher: kvrouter_wire::KvEventPublisher,
    engine: cli::Engine,
    dp_rank: u32,
}

impl WireSink {
    /// Binds the PUB socket on `endpoint` and the replay ROUTER on `replay_endpoint`, keeping
    /// `buffer_steps` batches for replay; vLLM's format, rank 0.
    pub fn bind(
        endpoint: String,
        replay_endpoint: Option<String>,
        topic: String,
        buffer_steps: usize,
    ) -> Result<Self, MockerError> {
        Self::bind_rank(
            endpoint,
            replay_endpoint,
            topic,
            buffer_steps,
            cli::Engine::Vllm,
            0,
        )
    }

    /// [`bind`](Self::bind) for rank `dp_rank` of an `engine` worker.
    pub fn bind_rank(
        endpoint: String,
        replay_endpoint: Option<String>,
        topic: String,
        buffer_steps: usize,
        engine: cli::Engine,
        dp_rank: u32,
    ) -> Result<Self, MockerError> {
        let encoding = match engine {
            cli::Engine::Vllm | cli::Engine::Trtllm => kvrouter_wire::Encoding::Map,
            cli::Engine::Sglang => kvrouter_wire::Encoding::Sglang,
        };
        let publisher = kvrouter_wire::KvEventPublisher::bind(kvrouter_wire::PublisherConfig {
            endpoint,
            replay_endpoint,
            topic,
            buffer_steps,
            encoding,
        })?;
        Ok(Self {
            publisher,
            engine,
            dp_rank,
        })
    }

    /// The bound PUB address.
    pub fn endpoint(&self) -> String {
        self.publisher.endpoint().to_owned()
    }

    /// The bound replay address.
    pub fn replay_endpoint(&self) -> Option<String> {
        self.publisher.replay_endpoint().map(str::to_owned)
    }
}

/// Converts engine events to the wire crate's model (vLLM's shape: one `BlockStored` per
/// step and request; a keyed request's with `lora_id`, `lora_name` and vLLM's `extra_keys`,
/// see [`lora`]).
pub fn to_engine_events(events: &[KvEvent]) -> Vec<kvrouter_wire::EngineEvent> {
    use kvrouter_wire::{BlockRemoved, BlockStored, EngineEvent};
    events
        .iter()
        .map(|e| match e {
            KvEvent::Stored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                keys,
            } => {
                let keys = keys.as_deref();
                let lora = keys.and_then(|k| k.lora.as_ref());
                EngineEvent::BlockStored(BlockStored {
                    block_hashes: block_hashes.clone(),
                    parent_block_hash: *parent_block_hash,
                    token_ids: token_ids.clone(),
                    block_size: *block_size,
                    medium: Some("GPU".into()),
                    lora_id: lora.map(|l| l.id),
                    lora_name: lora.map(|l| l.name.clone()),
                    extra_keys: keys.and_then(|k| {
                        k.extra_keys(block_hashes.len(), parent_block_hash.is_none())
                    }),
                    ..Default::default()
                })
            }
            KvEvent::Removed { block_hash } => EngineEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![*block_hash],
                medium: Some("GPU".into()),
                ..Default::default()
            }),
            KvEvent::AllCleared => EngineEvent::AllBlocksCleared,
        })
        .collect()
}

impl EventSink for WireSink {
    fn publish(&mut self, ts: f64, events: &[KvEvent]) {
        let batch = kvrouter_wire::EngineBatch {
            ts,
            events: match self.engine {
                cli::Engine::Vllm | cli::Engine::Trtllm => to_engine_events(events),
                cli::Engine::Sglang => sglang::sglang_events(events),
            },
            dp_rank: Some(self.dp_rank),
        };
        if let Err(e) = self.publisher.publish(&batch) {
            tracing::warn!("publishing KV events failed: {e}");
        }
    }
}

fn port_plus(base: u16, i: usize) -> Result<u16, MockerError> {
    if base == 0 {
        return Ok(0);
    }
    u16::try_from(usize::from(base) + i)
        .map_err(|_| MockerError::Config(format!("port {base} + {i} is above 65535")))
}

/// Starts `n` independent workers on the current tokio runtime, each with its own HTTP port
/// and `--data-parallel-size` ranks, each rank with its own engine and (when events are on)
/// ZMQ PUB and replay ports (see [`bind_rank_sinks`]). Events go through [`WireSink`].
pub async fn spawn_workers(
    config: &MockerConfig,
    n: usize,
) -> Result<Vec<RunningWorker>, MockerError> {
    let events = config.kv_events && config.enable_prefix_caching;
    spawn_workers_with_sinks(config, n, |i| {
        if !events {
            let sinks = (0..config.data_parallel_size)
                .map(|_| Box::new(NullSink) as Box<dyn EventSink>)
                .collect();
            return Ok((sinks, None, None));
        }
        bind_rank_sinks(config, i)
    })
    .await
}

/// Free-port attempts at a run of consecutive ports for a worker's ranks.
const RANK_PORT_ATTEMPTS: usize = 32;

/// The event sinks of worker `i`'s ranks, rank r publishing on rank 0's PUB and replay ports
/// plus r (vLLM's and SGLang's `offset_endpoint_port` rule, which routers apply to the one
/// endpoint a worker advertises). With fixed bases, worker i's rank r takes the base plus
/// i·`data_parallel_size` plus r; with free ports (base 0), rank 0 takes free ones and the
/// others the ports after them, tried again elsewhere when one of those is taken. Errors: a
/// bind failure (after [`RANK_PORT_ATTEMPTS`] tries with free ports).
pub fn bind_rank_sinks(config: &MockerConfig, i: usize) -> Result<SinkParts, MockerError> {
    let host = &config.host;
    let dp = config.data_parallel_size;
    let bind = |r: usize, ep: u16, rep: u16| {
        WireSink::bind_rank(
            format!("tcp://{host}:{ep}"),
            Some(format!("tcp://{host}:{rep}")),
            config.kv_events_topic.clone(),
            config.kv_events_buffer_steps,
            config.engine,
            r as u32,
        )
    };
    let parts = |sinks: Vec<WireSink>| -> SinkParts {
        let (e, r) = (sinks[0].endpoint(), sinks[0].replay_endpoint());
        let boxed = sinks
            .into_iter()
            .map(|s| Box::new(s) as Box<dyn EventSink>)
            .collect();
        (boxed, Some(e), r)
    };
    let free = config.zmq_kv_events_port == 0 || config.zmq_replay_port == 0;
    if !free || dp == 1 {
        let mut sinks = Vec::with_capacity(dp);
        for r in 0..dp {
            let ep = port_plus(config.zmq_kv_events_port, i * dp + r)?;
            let rep = port_plus(config.zmq_replay_port, i * dp + r)?;
            sinks.push(bind(r, ep, rep)?);
        }
        return Ok(parts(sinks));
    }
    let port_of = |endpoint: &str| -> Option<u16> { endpoint.rsplit_once(':')?.1.parse().ok() };
    let mut last = None;
    for _ in 0..RANK_PORT_ATTEMPTS {
        let first = bind(0, 0, 0)?;
        let (Some(ep), Some(rep)) = (
            port_of(&first.endpoint()),
            first.replay_endpoint().as_deref().and_then(port_of),
        ) else {
            return Err(MockerError::Config(format!(
                "cannot read the bound port of {}",
                first.endpoint()
            )));
        };
        let mut sinks = vec![first];
        for r in 1..dp {
            match (port_plus(ep, r), port_plus(rep, r)) {
                (Ok(e), Ok(p)) => match bind(r, e, p) {
                    Ok(s) => sinks.push(s),
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                },
                (Err(e), _) | (_, Err(e)) => {
                    last = Some(e);
                    break;
                }
            }
        }
        if sinks.len() == dp {
            return Ok(parts(sinks));
        }
    }
    Err(last.unwrap_or_else(|| MockerError::Config("no free ports for the ranks".into())))
}

/// The tokenizer of `dir`, loaded once per process: every worker and every group of workers
/// a process starts shares it (a load of the Qwen3 tokenizer costs seconds unoptimised, and
/// tests start many stacks).
fn shared_preprocessor(dir: &std::path::Path) -> Result<Arc<Preprocessor>, MockerError> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static LOADED: Mutex<Option<HashMap<std::path::PathBuf, Arc<Preprocessor>>>> = Mutex::new(None);
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let map = loaded.get_or_insert_with(HashMap::new);
    if let Some(p) = map.get(dir) {
        return Ok(p.clone());
    }
    let p = Arc::new(Preprocessor::from_model_dir(dir)?);
    map.insert(dir.to_path_buf(), p.clone());
    Ok(p)
}

/// A worker's event sinks, one per data-parallel rank, and the (event, replay) endpoints of
/// rank 0 to advertise.
pub type SinkParts = (Vec<Box<dyn EventSink>>, Option<String>, Option<String>);

/// [`spawn_workers`] with caller-made event sinks: `make_sinks(i)` returns worker i's sinks
/// (one per rank) and the endpoints to advertise. Not called for TensorRT-LLM workers that
/// serve their events over HTTP ([`MockerConfig::trtllm_http_events`]): their sinks are their
/// event buffers ([`trtllm`]).
pub async fn spawn_workers_with_sinks(
    config: &MockerConfig,
    n: usize,
    mut make_sinks: impl FnMut(usize) -> Result<SinkParts, MockerError>,
) -> Result<Vec<RunningWorker>, MockerError> {
    config.validate()?;
    let pre = match &config.model_path {
        Some(p) => Some(shared_preprocessor(p)?),
        None => None,
    };
    let model_name = config.served_name();
    let tool_call_token = pre
        .as_ref()
        .and_then(|p| p.tokenizer().token_to_id("<tool_call>"));
    let mode = config.disaggregation_mode;
    let client = match mode {
        DisaggregationMode::Decode => Some(
            reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(std::time::Duration::from_secs(5))
                .build()
                .map_err(|e| MockerError::Config(format!("KV-transfer client: {e}")))?,
        ),
        _ => None,
    };
    let transfer_timeout = std::time::Duration::from_secs_f64(config.kv_transfer_timeout);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ecfg = config.engine_config(pre.as_deref());
        let addr = format!("{}:{}", config.host, port_plus(config.http_port, i)?);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| MockerError::Bind {
                what: "HTTP",
                addr: addr.clone(),
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| MockerError::Bind {
            what: "HTTP",
            addr: addr.clone(),
            source,
        })?;
        let host = if http_addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            http_addr.ip().to_string()
        };
        // A prefill worker's side channel: where decode workers pull its held KV.
        let side = match mode {
            DisaggregationMode::Prefill => {
                let addr = format!(
                    "{}:{}",
                    config.host,
                    port_plus(config.disaggregation_bootstrap_port, i)?
                );
                let bind_err = |source| MockerError::Bind {
                    what: "KV-transfer side channel",
                    addr: addr.clone(),
                    source,
                };
                let l = tokio::net::TcpListener::bind(&addr)
                    .await
                    .map_err(bind_err)?;
                let port = l.local_addr().map_err(bind_err)?.port();
                Some((l, port))
            }
            _ => None,
        };
        // A TensorRT-LLM worker serving its events over HTTP buffers them instead.
        let trt_events = config.trtllm_http_events().then(|| {
            trtllm::TrtEventBuffers::new(
                config.data_parallel_size,
                config.event_buffer_max_size,
                config.num_gpu_blocks,
            )
        });
        let (sinks, kv_ep, replay_ep) = match &trt_events {
            Some(b) => (
                (0..config.data_parallel_size)
                    .map(|r| Box::new(b.sink(r)) as Box<dyn EventSink>)
                    .collect(),
                None,
                None,
            ),
            None => make_sinks(i)?,
        };
        if sinks.len() != config.data_parallel_size {
            return Err(MockerError::Config(format!(
                "{} event sinks for {} ranks",
                sinks.len(),
                config.data_parallel_size
            )));
        }
        let mut tasks = Vec::new();
        let mut stop_engines = Vec::new();
        let mut ranks = Vec::new();
        for sink in sinks {
            let (stop_engine, stop_engine_rx) = oneshot::channel();
            let transfers =
                transfer::HeldTransfers::new(config.kv_transfer_max_held, transfer_timeout);
            let (handle, engine_task) = worker::spawn_engine_with(
                Engine::new(ecfg.clone()),
                sink,
                stop_engine_rx,
                transfers,
            );
            if let Ok(mut m) = handle.metrics().lock() {
                m.role = mode.role().as_str();
            }
            tasks.push(engine_task);
            stop_engines.push(stop_engine);
            ranks.push(handle);
        }
        let state = Arc::new(http::HttpState {
            ranks: dp::Ranks::new(ranks.clone(), config.engine),
            engine_type: config.engine,
            trtllm_events: trt_events,
            enable_cache_report: config.enable_cache_report,
            engine: ecfg.clone(),
            model_name: model_name.clone(),
            lora_modules: config.lora_modules.clone(),
            preprocessor: pre.clone(),
            default_max_tokens: config.default_max_tokens,
            cache_info: vec![
                ("block_size", config.block_size.to_string()),
                ("num_gpu_blocks", config.num_gpu_blocks.to_string()),
                (
                    "enable_prefix_caching",
                    capitalized(config.enable_prefix_caching),
                ),
            ],
            tool_calls: config.tool_calls,
            reasoning: config.reasoning,
            tool_call_token,
            disagg: disagg::DisaggState {
                mode,
                engine_id: disagg::new_engine_id(),
                side_host: host.clone(),
                side_port: side.as_ref().map(|(_, p)| *p),
                timeout: transfer_timeout,
                bandwidth_gbps: config.kv_transfer_bandwidth,
                bytes_per_token: config.kv_bytes_per_token,
                speedup_ratio: config.speedup_ratio,
                client: client.clone(),
            },
        });
        let bootstrap_port = side.as_ref().map(|(_, p)| *p);
        let stop_side = side.map(|(listener, _)| {
            let (tx, rx) = oneshot::channel::<()>();
            tasks.push(serve(
                listener,
                disagg::side_channel_router(state.clone()),
                rx,
            ));
            tx
        });
        let (stop_http, stop_http_rx) = oneshot::channel::<()>();
        tasks.push(serve(listener, http::router(state), stop_http_rx));
        let url = if http_addr.is_ipv6() {
            format!("http://[{host}]:{}", http_addr.port())
        } else {
            format!("http://{host}:{}", http_addr.port())
        };
        out.push(RunningWorker {
            info: WorkerInfo {
                index: i,
                url,
                model: model_name.clone(),
                engine: config.engine,
                kv_events_endpoint: kv_ep,
                replay_endpoint: replay_ep,
                block_size: config.block_size,
                dp_size: config.data_parallel_size as u32,
                total_kv_blocks: config.num_gpu_blocks,
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
                role: mode.role(),
                endpoint: config.endpoint(),
                bootstrap_port,
                lora_adapters: config.lora_modules.iter().map(|m| m.name.clone()).collect(),
            },
            http_addr,
            handle: ranks[0].clone(),
            ranks,
            stop_http: Some(stop_http),
            stop_side,
            stop_engines,
            tasks,
        });
    }
    Ok(out)
}

/// Serves `app` on `listener` (TCP_NODELAY) until `stop` fires.
fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|s| {
            let _ = s.set_nodelay(true);
        });
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.await;
            })
            .await;
    })
}

fn capitalized(b: bool) -> String {
    if b { "True" } else { "False" }.into()
}
