//! `kvrouter mocker`: N mock workers in one process, one JSON line per worker on stdout, then
//! serve until Ctrl-C. Flag names follow Dynamo's mocker (`dynamo-router-spec.md` §15.3).
use std::io::Write;
use std::path::PathBuf;

use crate::disagg::{
    DisaggregationMode, DEFAULT_BOOTSTRAP_PORT, DEFAULT_KV_BYTES_PER_TOKEN,
    DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS,
};
use crate::{spawn_workers, MockerConfig, ToolCalls};

/// Which inference engine the mock stands in for (`--engine`; Dynamo's `--engine-type`): its
/// HTTP API shapes, its KV event format and how a request names its data-parallel rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// vLLM: vLLM ≥ 0.24 map events, usage always with `prompt_tokens_details`, rank by the
    /// `X-data-parallel-rank` header.
    #[default]
    Vllm,
    /// SGLang: SGLang 0.5.23 events (signed hashes, one `BlockStored` per page,
    /// `attn_dp_rank`), its usage shape (`prompt_tokens_details` only with
    /// `--enable-cache-report` and a hit), `matched_stop`, rank by the `routed_dp_rank` /
    /// `data_parallel_rank` body field or the `X-Data-Parallel-Rank` header.
    Sglang,
    /// TensorRT-LLM (`trtllm-serve`): KV events as JSON on `POST /kv_cache_events`, drained
    /// per call from a buffer of `--event-buffer-max-size` events (or, with
    /// `--trtllm-zmq-events`, vLLM's ZMQ format as newer releases can publish), usage with
    /// `prompt_tokens_details`, rank by the `X-data-parallel-rank` header.
    Trtllm,
}

impl Engine {
    /// `"vllm"`, `"sglang"` or `"trtllm"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Trtllm => "trtllm",
        }
    }
}

/// Flags of `kvrouter mocker`.
#[derive(clap::Args, Debug, Clone)]
pub struct MockerArgs {
    /// Independent engines to start (ports: base + i).
    #[arg(long, default_value_t = 1)]
    pub num_workers: usize,
    /// The engine to mimic: vllm, sglang or trtllm (its API shapes, KV event format and
    /// transport, and rank field).
    #[arg(long, alias = "engine-type", value_enum, default_value_t = Engine::Vllm)]
    pub engine: Engine,
    /// Data-parallel ranks per worker behind its one HTTP server, each with its own KV pool,
    /// scheduler and event publisher (rank r on the event and replay ports + r, as vLLM and
    /// SGLang do). Requests name their rank (vLLM: `X-data-parallel-rank` header; SGLang:
    /// `routed_dp_rank` / `data_parallel_rank` field or the header), else the mock picks one
    /// (vLLM: least loaded; SGLang: round robin).
    #[arg(long, alias = "dp-size", default_value_t = 1)]
    pub data_parallel_size: usize,
    /// SGLang: report `usage.prompt_tokens_details.cached_tokens` (as SGLang does only with
    /// this flag, and only when some tokens were cached). vLLM workers always report it.
    #[arg(long)]
    pub enable_cache_report: bool,
    /// Print an explicit worker `id` in each JSON line, this plus the worker's index: the ids
    /// relays and router replicas must agree on (`--event-plane nats`). Default: no `id`
    /// (routers number workers in registration order).
    #[arg(long, value_name = "N")]
    pub worker_id_base: Option<u64>,
    /// HF-style model directory (tokenizer.json, tokenizer_config.json): enables text prompts,
    /// output text and /v1/chat/completions.
    #[arg(long)]
    pub model_path: Option<PathBuf>,
    /// Served model name (default: the model directory's name, else "mock-model").
    #[arg(long)]
    pub model_name: Option<String>,
    /// Serve LoRA adapters (vLLM's flag; needed by --lora-modules).
    #[arg(long)]
    pub enable_lora: bool,
    /// LoRA adapters to serve, vLLM's forms: `name=path` or
    /// `{"name": ..., "path": ..., "base_model_name": ...}`. A request whose `model` is an
    /// adapter's name runs with it: its blocks are cached apart and its KV events carry
    /// `lora_name` and `lora_id` (position in this list + 1).
    #[arg(long, num_args = 1.., value_name = "NAME=PATH")]
    pub lora_modules: Vec<crate::lora::LoraModule>,
    /// KV blocks per engine.
    #[arg(long, default_value_t = 16384)]
    pub num_gpu_blocks_override: usize,
    /// Tokens per KV block (SGLang: `--page-size`).
    #[arg(long, alias = "page-size", default_value_t = 64)]
    pub block_size: usize,
    /// Maximum running sequences per engine.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget per engine step.
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Reuse cached full blocks (default on).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Disable prefix caching (and KV events).
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// Split long prefills across steps (default on).
    #[arg(long, overrides_with = "no_enable_chunked_prefill")]
    pub enable_chunked_prefill: bool,
    /// Disable chunked prefill.
    #[arg(long, overrides_with = "enable_chunked_prefill")]
    pub no_enable_chunked_prefill: bool,
    /// Divide modelled step times by this; 0 = no delays at all.
    #[arg(long, default_value_t = 1.0)]
    pub speedup_ratio: f64,
    /// Further divide decode step times by this (speculative decoding).
    #[arg(long, default_value_t = 1.0)]
    pub decode_speedup_ratio: f64,
    /// Address to bind HTTP and ZMQ sockets to.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port of worker 0 (worker i: base + i); 0 = free ports.
    #[arg(long, default_value_t = 0)]
    pub http_port: u16,
    /// ZMQ KV-event PUB port of worker 0 (base + i); 0 = free ports.
    #[arg(long, default_value_t = 0)]
    pub zmq_kv_events_ports: u16,
    /// ZMQ replay ROUTER port of worker 0 (base + i); 0 = free ports.
    #[arg(long, default_value_t = 0)]
    pub zmq_replay_ports: u16,
    /// Do not publish KV events.
    #[arg(long)]
    pub no_kv_events: bool,
    /// Topic frame of the KV event messages.
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,
    /// KV event batches kept per worker for replay.
    #[arg(long, default_value_t = 1000)]
    pub kv_events_buffer_steps: usize,
    /// TensorRT-LLM: KV events buffered per rank between two `POST /kv_cache_events` calls
    /// (its `kv_cache_config.event_buffer_max_size`); the oldest is dropped when full.
    #[arg(long, default_value_t = crate::trtllm::DEFAULT_EVENT_BUFFER_MAX_SIZE)]
    pub event_buffer_max_size: usize,
    /// TensorRT-LLM: publish KV events on ZMQ in vLLM's format (newer releases' publisher)
    /// instead of serving them on `POST /kv_cache_events`.
    #[arg(long)]
    pub trtllm_zmq_events: bool,
    /// Valid prompt token ids are below this when no tokenizer is given.
    #[arg(long, default_value_t = 151_936)]
    pub vocab_size: u32,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: usize,
    /// Answer prompts that offer tools (chat `tools`, or a Hermes `<tools>` section in the
    /// prompt) with one Hermes tool call: auto, or never.
    #[arg(long, value_enum, default_value_t = ToolCalls::Auto)]
    pub tool_calls: ToolCalls,
    /// Open every answer with a `<think>…</think>` block (unless the prompt ends with an
    /// empty one, Qwen3's `enable_thinking: false`); needs --model-path.
    #[arg(long)]
    pub reasoning: bool,
    /// Role in disaggregated serving: agg (whole requests; also `aggregated`, `none`),
    /// prefill (compute prompts, hold their KV for decode workers: vLLM `kv_transfer_params`
    /// or SGLang `bootstrap_room`), or decode (pull the prompt's KV, then decode).
    #[arg(long, value_enum, default_value_t = DisaggregationMode::Agg)]
    pub disaggregation_mode: DisaggregationMode,
    /// The `namespace.component.endpoint` the workers advertise in their JSON lines (a
    /// `kvrouter router --endpoint` routes the workers of its endpoint; `dyn://` accepted).
    /// Default: Dynamo's, `dynamo.prefill.generate` for prefill workers, else
    /// `dynamo.backend.generate`.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Prefill role: port of worker 0's KV-transfer side channel (worker i: base + i; 0 = free
    /// ports), SGLang's bootstrap port and vLLM's `remote_port`.
    #[arg(long, alias = "bootstrap-ports", default_value_t = DEFAULT_BOOTSTRAP_PORT)]
    pub disaggregation_bootstrap_port: u16,
    /// Prefill role: seconds held KV blocks wait for a decode worker's pull before they are
    /// released, and a pull by bootstrap room waits for its prefill (vLLM's
    /// VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    #[arg(long, default_value_t = 480.0)]
    pub kv_transfer_timeout: f64,
    /// Decode role: GB/s of KV transfers (divided by --speedup-ratio like every modelled time);
    /// 0 = instantaneous.
    #[arg(long, default_value_t = DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS)]
    pub kv_transfer_bandwidth: f64,
    /// KV bytes per token: 2 (K, V) x layers x KV heads x head dim x dtype bytes; the default
    /// is Qwen3-0.6B in bf16 (2 x 28 x 8 x 128 x 2).
    #[arg(long, default_value_t = DEFAULT_KV_BYTES_PER_TOKEN)]
    pub kv_bytes_per_token: usize,
}

impl MockerArgs {
    /// The equivalent [`MockerConfig`].
    pub fn to_config(&self) -> MockerConfig {
        MockerConfig {
            engine: self.engine,
            data_parallel_size: self.data_parallel_size,
            enable_cache_report: self.enable_cache_report,
            model_path: self.model_path.clone(),
            model_name: self.model_name.clone(),
            enable_lora: self.enable_lora,
            lora_modules: self.lora_modules.clone(),
            num_gpu_blocks: self.num_gpu_blocks_override,
            block_size: self.block_size,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            enable_chunked_prefill: !self.no_enable_chunked_prefill,
            speedup_ratio: self.speedup_ratio,
            decode_speedup_ratio: self.decode_speedup_ratio,
            host: self.host.clone(),
            http_port: self.http_port,
            kv_events: !self.no_kv_events,
            zmq_kv_events_port: self.zmq_kv_events_ports,
            zmq_replay_port: self.zmq_replay_ports,
            kv_events_topic: self.kv_events_topic.clone(),
            kv_events_buffer_steps: self.kv_events_buffer_steps,
            event_buffer_max_size: self.event_buffer_max_size,
            trtllm_zmq_events: self.trtllm_zmq_events,
            vocab_size: self.vocab_size,
            default_max_tokens: self.default_max_tokens,
            hash_seed: None,
            tool_calls: self.tool_calls,
            reasoning: self.reasoning,
            disaggregation_mode: self.disaggregation_mode,
            endpoint: self.endpoint.clone(),
            disaggregation_bootstrap_port: self.disaggregation_bootstrap_port,
            kv_transfer_timeout: self.kv_transfer_timeout,
            kv_transfer_bandwidth: self.kv_transfer_bandwidth,
            kv_bytes_per_token: self.kv_bytes_per_token,
            ..MockerConfig::default()
        }
    }
}

/// Resolves on Ctrl-C, or SIGTERM on Unix (also what `kvrouter up` / `frontend` wait for).
///
/// The SIGTERM handler is installed when this is called, not when the future is first
/// polled: call it before announcing readiness, so that a SIGTERM sent right after cannot
/// reach the default handler (which kills the process). Call it inside a Tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = std::io::Result<()>> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        #[cfg(unix)]
        {
            let mut term = term?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r,
                _ = term.recv() => Ok(()),
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await
        }
    }
}

/// Runs the subcommand: starts the workers, prints their JSON lines, serves until Ctrl-C or
/// SIGTERM.
/// The tokio runtime honours `TOKIO_WORKER_THREADS`.
pub fn run(args: MockerArgs) -> anyhow::Result<()> {
    if args.num_workers == 0 {
        anyhow::bail!("--num-workers must be at least 1");
    }
    let config = args.to_config();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stop = shutdown_signal();
        let workers = spawn_workers(&config, args.num_workers).await?;
        let mut stdout = std::io::stdout().lock();
        for w in &workers {
            let mut line = serde_json::to_value(&w.info)?;
            if let Some(base) = args.worker_id_base {
                line["id"] = serde_json::json!(base.saturating_add(w.info.index as u64));
            }
            writeln!(stdout, "{line}")?;
        }
        stdout.flush()?;
        drop(stdout);
        stop.await?;
        for w in workers {
            w.stop().await;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mocker: MockerArgs,
    }

    fn config(args: &[&str]) -> MockerConfig {
        let mut argv = vec!["mocker"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().mocker.to_config()
    }

    #[test]
    fn disaggregation_flags() {
        let c = config(&[]);
        assert_eq!(c.disaggregation_mode, DisaggregationMode::Agg);
        assert_eq!(c.disaggregation_bootstrap_port, 8998);
        assert_eq!(c.kv_transfer_timeout, 480.0);
        assert_eq!(c.kv_transfer_bandwidth, 25.0);
        assert_eq!(c.kv_bytes_per_token, 114_688);
        assert_eq!(c, MockerConfig::default());
        for (v, want) in [
            ("agg", DisaggregationMode::Agg),
            ("aggregated", DisaggregationMode::Agg),
            ("none", DisaggregationMode::Agg),
            ("prefill", DisaggregationMode::Prefill),
            ("decode", DisaggregationMode::Decode),
        ] {
            assert_eq!(
                config(&["--disaggregation-mode", v]).disaggregation_mode,
                want
            );
        }
        let c = config(&[
            "--disaggregation-mode",
            "prefill",
            "--bootstrap-ports",
            "9000",
            "--kv-transfer-timeout",
            "2.5",
            "--kv-transfer-bandwidth",
            "0",
            "--kv-bytes-per-token",
            "4096",
        ]);
        assert_eq!(
            (
                c.disaggregation_bootstrap_port,
                c.kv_transfer_timeout,
                c.kv_transfer_bandwidth,
                c.kv_bytes_per_token
            ),
            (9000, 2.5, 0.0, 4096)
        );
        assert!(Cli::try_parse_from(["mocker", "--disaggregation-mode", "both"]).is_err());
        // Dynamo's endpoints: prefill workers serve `dynamo.prefill.generate`.
        assert_eq!(c.endpoint(), "dynamo.prefill.generate");
        assert_eq!(config(&[]).endpoint(), "dynamo.backend.generate");
        let c = config(&["--endpoint", "dyn://ns.prefill.generate"]);
        assert_eq!(c.endpoint(), "ns.prefill.generate");
    }

    #[test]
    fn engine_and_data_parallel_flags() {
        let c = config(&[]);
        assert_eq!(
            (c.engine, c.data_parallel_size, c.enable_cache_report),
            (Engine::Vllm, 1, false)
        );
        let c = config(&[
            "--engine",
            "sglang",
            "--data-parallel-size",
            "4",
            "--enable-cache-report",
            "--page-size",
            "16",
        ]);
        assert_eq!(
            (
                c.engine,
                c.data_parallel_size,
                c.enable_cache_report,
                c.block_size
            ),
            (Engine::Sglang, 4, true, 16)
        );
        // Dynamo's and SGLang's spellings.
        let c = config(&["--engine-type", "sglang", "--dp-size", "2"]);
        assert_eq!((c.engine, c.data_parallel_size), (Engine::Sglang, 2));
        assert!(Cli::try_parse_from(["mocker", "--engine", "tgi"]).is_err());
        assert_eq!(serde_json::to_value(Engine::Sglang).unwrap(), "sglang");
        let c = config(&["--engine", "trtllm", "--event-buffer-max-size", "8"]);
        assert_eq!(
            (c.engine, c.event_buffer_max_size, c.trtllm_zmq_events),
            (Engine::Trtllm, 8, false)
        );
        assert!(config(&["--engine-type", "trtllm", "--trtllm-zmq-events"]).trtllm_zmq_events);
    }

    #[test]
    fn lora_flags() {
        let c = config(&[
            "--enable-lora",
            "--lora-modules",
            "sql=/a/sql",
            r#"{"name": "chat", "path": "/a/chat"}"#,
            "--num-workers",
            "1",
        ]);
        assert!(c.enable_lora);
        let names: Vec<&str> = c.lora_modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["sql", "chat"]);
        assert!(c.validate().is_ok());
        // As in vLLM: adapters need --enable-lora; each named once, not like the model.
        let c = config(&["--lora-modules", "sql=/a"]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--enable-lora"));
        let c = config(&["--enable-lora", "--lora-modules", "a=/a", "a=/b"]);
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        let c = config(&["--enable-lora", "--lora-modules", "mock-model=/a"]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("served model"));
        assert!(Cli::try_parse_from(["mocker", "--lora-modules", "no-path"]).is_err());
        // TensorRT-LLM's JSON events name no adapter; its vLLM-format ZMQ events do.
        let lora = [
            "--enable-lora",
            "--lora-modules",
            "sql=/a",
            "--engine",
            "trtllm",
        ];
        let c = config(&lora);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--trtllm-zmq-events"));
        let c = config(&[&lora[..], &["--trtllm-zmq-events"]].concat());
        assert!(c.validate().is_ok());
    }
}
