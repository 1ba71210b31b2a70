//! `kvrouter frontend` flags, with the reference's names and `DYN_*` variables
//! (`dynamo-router-spec.md` §9.1, §9.2), turned into the core's [`RouterConfig`].
//!
//! Boolean router switches take both spellings of the reference: `--kv-events` /
//! `--no-kv-events` and the `--router-kv-events` / `--no-router-kv-events` aliases; the
//! environment variable accepts `true`/`false`/`1`/`0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Args;
use kvrouter_core::config::{ConfigError, KvRouterConfig, LoadThresholds};
use kvrouter_core::{RouterConfig, RouterMode, WorkerRole};

use crate::listener::{default_max_connections, ListenerLimits};
use crate::workers::fleet::HealthPolicy;
use crate::workers::spec::WorkerSpec;

/// Everything `kvrouter frontend` accepts. `Default` gives the reference defaults with an
/// ephemeral port on 127.0.0.1 (what tests and the embedded stack want).
#[derive(Args, Clone, Debug)]
pub struct FrontendConfig {
    /// Address the OpenAI API listens on (loopback unless told otherwise; `0.0.0.0` for all).
    #[arg(long, env = "DYN_HTTP_HOST", default_value = "127.0.0.1")]
    pub http_host: String,
    /// Port of the OpenAI API (0 = any free port).
    #[arg(long, env = "DYN_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,

    /// HF-style model directory: `tokenizer.json`, `tokenizer_config.json` (chat template).
    /// Default: the Qwen3 tokenizer vendored in the repository (`models/qwen3`).
    #[arg(long, env = "DYN_MODEL_PATH")]
    pub model_path: Option<PathBuf>,
    /// Served model name (`/v1/models`, the `model` field requests must carry).
    /// Default: `Qwen/Qwen3-0.6B` for the vendored tokenizer, else the directory's name.
    #[arg(long, env = "DYN_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Context length; longer prompts are rejected with 400 before routing.
    /// Default: the tokenizer config's `model_max_length`, else 32768.
    #[arg(long, env = "DYN_CONTEXT_LENGTH")]
    pub context_length: Option<usize>,

    /// Router mode.
    #[arg(long, env = "DYN_ROUTER_MODE", default_value = "round-robin")]
    pub router_mode: RouterMode,
    /// Softmax temperature over normalised costs; 0 = argmin (kv mode).
    #[arg(long, env = "DYN_ROUTER_TEMPERATURE", default_value_t = 0.0)]
    pub router_temperature: f64,
    /// Tokens per KV block for workers registered without one (a worker's own block size wins).
    #[arg(long, env = "DYN_KV_CACHE_BLOCK_SIZE")]
    pub kv_cache_block_size: Option<usize>,
    /// Consume the workers' KV events (exact index); off = approximate mode.
    #[arg(long = "kv-events", visible_alias = "router-kv-events", env = "DYN_KV_EVENTS",
          num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub kv_events: Option<bool>,
    /// Approximate mode: route on the router's own decisions, no KV events.
    #[arg(
        long = "no-kv-events",
        visible_alias = "no-router-kv-events",
        conflicts_with = "kv_events"
    )]
    pub no_kv_events: bool,
    /// Legacy overlap weight (§6.3): maps to the prefill load scale.
    #[arg(
        long = "kv-overlap-score-weight",
        visible_alias = "router-kv-overlap-score-weight",
        env = "DYN_KV_OVERLAP_SCORE_WEIGHT"
    )]
    pub kv_overlap_score_weight: Option<f64>,
    /// Device-tier overlap credit.
    #[arg(
        long,
        env = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT",
        default_value_t = 1.0
    )]
    pub router_kv_overlap_score_credit: f64,
    /// Credit decay with a worker's excess active prefill (spec §6.2; 0 = off).
    #[arg(
        long,
        env = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY",
        default_value_t = 0.0
    )]
    pub router_kv_overlap_score_credit_decay: f64,
    /// What `kv` mode minimises: `default` (the reference cost), `lmetric` (prefill × decode),
    /// or `affinity` (a prefix stays with the worker caching it unless that worker is
    /// overloaded; see the core's `policy` module).
    #[arg(long, env = "DYN_ROUTER_SELECTION_POLICY", default_value = "default")]
    pub router_selection_policy: kvrouter_core::SelectionPolicy,
    /// `affinity`: a worker is overloaded past this multiple of the fleet's mean load.
    #[arg(
        long,
        env = "KVROUTER_ROUTER_AFFINITY_LOAD_FACTOR",
        default_value_t = 2.0
    )]
    pub router_affinity_load_factor: f64,
    /// How a worker's active prefill tokens count: `none` (in full until the first token) or
    /// `aic` (`ais` accepted: the oldest prefill decays over its predicted prefill time).
    #[arg(long, env = "DYN_ROUTER_PREFILL_LOAD_MODEL", default_value = "none")]
    pub router_prefill_load_model: kvrouter_core::prefill_time::PrefillLoadModel,
    /// `aic`: per-step prefill time `A + B·T + C·T²` ms (T tokens in the step), as `A,B,C`; the
    /// mock engine's is `16.50142,0.01518344,4.209989e-7`. Unset: fitted online from TTFTs.
    #[arg(long, env = "DYN_ROUTER_PREFILL_TIME_COEFFICIENTS")]
    pub router_prefill_time_coefficients: Option<kvrouter_core::prefill_time::PrefillCoefficients>,
    /// Queue requests in the router while every worker's active prefill tokens exceed this
    /// multiple of its `max_num_batched_tokens` (unset: no queue).
    #[arg(long, env = "DYN_ROUTER_QUEUE_THRESHOLD")]
    pub router_queue_threshold: Option<f64>,
    /// Router queue order: `fcfs` (tail TTFT) or `wspt` (shortest uncached prefill first; mean
    /// TTFT).
    #[arg(long, env = "DYN_ROUTER_QUEUE_POLICY", default_value = "fcfs")]
    pub router_queue_policy: kvrouter_core::queue::QueuePolicy,
    /// Requests the router queue holds; more are refused with 503.
    #[arg(long, env = "KVROUTER_ROUTER_QUEUE_LIMIT", default_value_t = 4096)]
    pub router_queue_limit: usize,
    /// Seconds in the queue after which a request's overlaps are looked up again (0: never).
    #[arg(
        long,
        env = "DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS",
        default_value_t = 10.0
    )]
    pub router_overlap_refresh_after_secs: f64,
    /// Scale of prefill blocks in the cost.
    #[arg(long, env = "DYN_ROUTER_PREFILL_LOAD_SCALE", default_value_t = 1.0)]
    pub router_prefill_load_scale: f64,
    /// Cost weight of each active request on a rank (experimental).
    #[arg(
        long,
        env = "DYN_ROUTER_DECODE_ACTIVE_REQUEST_WEIGHT",
        default_value_t = 0.0
    )]
    pub router_decode_active_request_weight: f64,
    /// Credit of host-memory cache hits.
    #[arg(long, env = "DYN_ROUTER_HOST_CACHE_HIT_WEIGHT", default_value_t = 0.75)]
    pub router_host_cache_hit_weight: f64,
    /// Credit of disk cache hits.
    #[arg(long, env = "DYN_ROUTER_DISK_CACHE_HIT_WEIGHT", default_value_t = 0.25)]
    pub router_disk_cache_hit_weight: f64,
    /// Count active blocks as decode load.
    #[arg(long = "router-track-active-blocks", visible_alias = "track-active-blocks",
          env = "DYN_ROUTER_TRACK_ACTIVE_BLOCKS", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub router_track_active_blocks: Option<bool>,
    #[arg(
        long = "no-router-track-active-blocks",
        conflicts_with = "router_track_active_blocks"
    )]
    pub no_router_track_active_blocks: bool,
    /// Blocks already active on a rank are shared, not added again.
    #[arg(long = "router-assume-kv-reuse", visible_alias = "assume-kv-reuse",
          env = "DYN_ROUTER_ASSUME_KV_REUSE", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub router_assume_kv_reuse: Option<bool>,
    #[arg(
        long = "no-router-assume-kv-reuse",
        conflicts_with = "router_assume_kv_reuse"
    )]
    pub no_router_assume_kv_reuse: bool,
    /// Count uncached prompt tokens as prefill load until the first token.
    #[arg(long = "router-track-prefill-tokens", env = "DYN_ROUTER_TRACK_PREFILL_TOKENS",
          num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub router_track_prefill_tokens: Option<bool>,
    #[arg(
        long = "no-router-track-prefill-tokens",
        conflicts_with = "router_track_prefill_tokens"
    )]
    pub no_router_track_prefill_tokens: bool,
    /// Approximate mode: seconds a routed block is assumed cached.
    #[arg(long, env = "DYN_ROUTER_TTL_SECS", default_value_t = 120.0)]
    pub router_ttl_secs: f64,
    /// Approximate mode: blocks kept before pruning.
    #[arg(long, env = "DYN_ROUTER_MAX_TREE_SIZE", default_value_t = 1 << 20)]
    pub router_max_tree_size: usize,
    /// Approximate mode: fraction kept when pruning.
    #[arg(long, env = "DYN_ROUTER_PRUNE_TARGET_RATIO", default_value_t = 0.8)]
    pub router_prune_target_ratio: f64,
    /// With events: also predict that a routed prompt is cached for this many seconds, so
    /// siblings arriving before the engine's events follow it.
    #[arg(long, env = "DYN_ROUTER_PREDICTED_TTL_SECS")]
    pub router_predicted_ttl_secs: Option<f64>,
    /// Seconds after which a booked request that was never freed is dropped.
    #[arg(
        long,
        env = "DYN_ROUTER_ACTIVE_REQUEST_EXPIRY_SECS",
        default_value_t = 300.0
    )]
    pub router_active_request_expiry_secs: f64,
    /// Busy when a rank's active decode blocks exceed this fraction of its KV blocks.
    #[arg(long, env = "DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD")]
    pub active_decode_blocks_threshold: Option<f64>,
    /// Busy when a rank's active prefill tokens exceed this.
    #[arg(long, env = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD")]
    pub active_prefill_tokens_threshold: Option<u64>,
    /// Busy when active prefill tokens exceed this fraction of `max_num_batched_tokens`.
    #[arg(long, env = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC")]
    pub active_prefill_tokens_threshold_frac: Option<f64>,
    /// device-aware-weighted: weight of an accelerator worker against a CPU worker.
    #[arg(long, env = "DYN_ENCODER_CUDA_TO_CPU_RATIO", default_value_t = 8.0)]
    pub device_ratio: f64,

    /// A worker's base URL (repeatable), e.g. `http://10.0.0.5:8000`; KV events then come
    /// from `--worker-kv-events` if given. For full descriptions use `--workers-file`.
    #[arg(long = "worker", value_name = "URL")]
    pub workers: Vec<String>,
    /// A prefill worker's base URL (repeatable): with decode workers, requests are
    /// disaggregated (vLLM's `kv_transfer_params` protocol; use a workers file for SGLang's).
    #[arg(long = "prefill-worker", value_name = "URL")]
    pub prefill_workers: Vec<String>,
    /// A decode worker's base URL (repeatable).
    #[arg(long = "decode-worker", value_name = "URL")]
    pub decode_workers: Vec<String>,
    /// Conditional disaggregation: a request whose prompt, less the best prefill worker's
    /// cached prefix, is under `--disagg-isl-threshold` tokens runs whole on a decode worker.
    #[arg(long, env = "KVROUTER_CONDITIONAL_DISAGG")]
    pub conditional_disagg: bool,
    /// Uncached prompt tokens below which `--conditional-disagg` skips the prefill worker.
    #[arg(long, env = "KVROUTER_DISAGG_ISL_THRESHOLD", default_value_t = 2048)]
    pub disagg_isl_threshold: usize,
    /// Workers file: JSON lines or a JSON array of worker descriptions
    /// (`url`, `kv_events_endpoint`, `replay_endpoint`, `block_size`, `dp_size`, `device`,
    /// `total_kv_blocks`, `max_num_batched_tokens`, `model`, `id`). `kvrouter mocker` prints
    /// such lines.
    #[arg(long, env = "KVROUTER_WORKERS_FILE")]
    pub workers_file: Option<PathBuf>,
    /// Address of the admin API (`/v1/workers`).
    #[arg(long, env = "KVROUTER_ADMIN_HOST", default_value = "127.0.0.1")]
    pub admin_host: String,
    /// Port of the admin API; 0 = any free port; omit with `--no-admin`.
    #[arg(long, env = "KVROUTER_ADMIN_PORT", default_value_t = 8001)]
    pub admin_port: u16,
    /// Do not serve the admin API.
    #[arg(long)]
    pub no_admin: bool,
    /// Bearer token the admin API requires. Without one the admin API only starts on a
    /// loopback address.
    #[arg(long, env = "KVROUTER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Open connections the admin API accepts at most.
    #[arg(long, env = "KVROUTER_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    pub admin_max_connections: usize,
    /// Milliseconds between worker health checks.
    #[arg(long, env = "KVROUTER_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub health_interval_ms: u64,
    /// A health check not answered 2xx within this many milliseconds fails.
    #[arg(long, env = "KVROUTER_HEALTH_TIMEOUT_MS", default_value_t = 2000)]
    pub health_timeout_ms: u64,
    /// A failing worker is first suspect (no new requests, index and bookings kept); it is
    /// removed (index cleared, bookings dropped) after this many consecutive failed checks…
    #[arg(
        long,
        env = "KVROUTER_HEALTH_REMOVE_AFTER_FAILURES",
        default_value_t = 10
    )]
    pub health_remove_after_failures: u32,
    /// …or after this many seconds of being suspect, whichever comes first.
    #[arg(
        long,
        env = "KVROUTER_HEALTH_REMOVE_AFTER_SECS",
        default_value_t = 30.0
    )]
    pub health_remove_after_secs: f64,
    /// Largest accepted request body, bytes.
    #[arg(long, env = "KVROUTER_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a request body may take to arrive once its head has; then 408.
    #[arg(long, env = "KVROUTER_HTTP_BODY_TIMEOUT_SECS", default_value_t = 60.0)]
    pub http_body_timeout_secs: f64,
    /// Seconds a connection may take to send a complete request head, counted from its
    /// accept or the end of its previous response: the header timeout and the keep-alive
    /// idle limit in one (both listeners).
    #[arg(long, env = "KVROUTER_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 75.0)]
    pub http_idle_timeout_secs: f64,
    /// Open connections the OpenAI API accepts at most; past it new ones get 503 and are
    /// closed. Default: half the descriptor limit left after a reserve of 512, 16..=32768.
    #[arg(long, env = "KVROUTER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Tokens one request may generate at most (a larger `max_tokens` is refused; without
    /// one, requests get what the context leaves, up to this). Default: the context length.
    #[arg(long, env = "KVROUTER_MAX_TOKENS_LIMIT")]
    pub max_tokens_limit: Option<u64>,
    /// Refuse (403) the request fields that steer routing — `nvext.backend_instance_id`,
    /// `nvext.dp_rank`, `nvext.router_config_override` — for untrusted clients.
    #[arg(long, env = "KVROUTER_NO_CLIENT_ROUTING_OVERRIDES")]
    pub no_client_routing_overrides: bool,
    /// How the model writes tool calls, as vLLM names its parsers: `hermes` (Qwen2.5/Qwen3,
    /// Hermes), `llama3_json`, `mistral`. Needed for `tool_choice: "auto"` (and for tools sent
    /// without a `tool_choice`); `required` and named choices work without it.
    #[arg(long, alias = "dyn-tool-call-parser", env = "DYN_TOOL_CALL_PARSER")]
    pub tool_call_parser: Option<crate::frontend::tools::ToolCallParser>,
    /// Accepted for vLLM's command lines; `--tool-call-parser` alone enables auto tool choice.
    #[arg(long, hide = true)]
    pub enable_auto_tool_choice: bool,
    /// Split `<think>…</think>` from chat answers into `reasoning_content`: `qwen3` or
    /// `deepseek_r1` (vLLM's parsers of those names).
    #[arg(long, alias = "dyn-reasoning-parser", env = "DYN_REASONING_PARSER")]
    pub reasoning_parser: Option<crate::frontend::reasoning::ReasoningParser>,
    /// Prompt tokens kept in the cache of tokenized prompt prefixes (a conversation's next turn
    /// re-tokenizes only its new text; 4 bytes each; 0 turns it off).
    #[arg(long, env = "KVROUTER_PROMPT_CACHE_TOKENS", default_value_t = 4 << 20)]
    pub prompt_cache_tokens: usize,
    /// Request bodies larger than this many bytes are templated and tokenized on the blocking
    /// pool instead of the async threads.
    #[arg(long, env = "KVROUTER_INLINE_PARSE_BYTES", default_value_t = 16 * 1024)]
    pub inline_parse_bytes: usize,
    /// Large prompts tokenized at once, at most (default: half the cores, at least 1).
    #[arg(long, env = "KVROUTER_PREPROCESS_THREADS")]
    pub preprocess_threads: Option<usize>,
    /// KV event messages larger than this many bytes are dropped and counted (the gap is
    /// then recovered by replay or the worker's index cleared).
    #[arg(long, env = "KVROUTER_KV_EVENT_MAX_FRAME_BYTES", default_value_t = 4 << 20)]
    pub kv_event_max_frame_bytes: usize,
    /// Seconds to wait for a worker to answer a request's headers.
    #[arg(long, env = "KVROUTER_WORKER_TIMEOUT_SECS", default_value_t = 600.0)]
    pub worker_timeout_secs: f64,
}

impl Default for FrontendConfig {
    /// The flags' defaults, whatever the environment says, on ephemeral ports.
    fn default() -> Self {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            c: FrontendConfig,
        }
        // Defaults come from the attributes above, so they are written once; the environment
        // is switched off, so tests and embedded stacks do not depend on it.
        let cmd = P::command().mut_args(|a| a.env(None::<&'static str>));
        let m = cmd
            .try_get_matches_from(["kvrouter"])
            .expect("every flag has a default");
        let mut c = P::from_arg_matches(&m).expect("every flag has a default").c;
        c.http_port = 0;
        c.admin_port = 0;
        c
    }
}

fn flag(on: Option<bool>, off: bool, default: bool) -> bool {
    if off {
        false
    } else {
        on.unwrap_or(default)
    }
}

impl FrontendConfig {
    /// The core's configuration for these flags. Errors: out-of-range values.
    pub fn router_config(&self) -> Result<RouterConfig, ConfigError> {
        let kv = KvRouterConfig {
            overlap_score_weight: self.kv_overlap_score_weight,
            overlap_score_credit: self.router_kv_overlap_score_credit,
            overlap_score_credit_decay: self.router_kv_overlap_score_credit_decay,
            router_selection_policy: self.router_selection_policy,
            router_affinity_load_factor: self.router_affinity_load_factor,
            prefill_load_scale: self.router_prefill_load_scale,
            decode_active_request_weight: self.router_decode_active_request_weight,
            host_cache_hit_weight: self.router_host_cache_hit_weight,
            disk_cache_hit_weight: self.router_disk_cache_hit_weight,
            router_temperature: self.router_temperature,
            use_kv_events: self.use_kv_events(),
            router_track_active_blocks: flag(
                self.router_track_active_blocks,
                self.no_router_track_active_blocks,
                true,
            ),
            router_assume_kv_reuse: flag(
                self.router_assume_kv_reuse,
                self.no_router_assume_kv_reuse,
                true,
            ),
            router_track_prefill_tokens: flag(
                self.router_track_prefill_tokens,
                self.no_router_track_prefill_tokens,
                true,
            ),
            router_ttl_secs: self.router_ttl_secs,
            router_max_tree_size: self.router_max_tree_size,
            router_prune_target_ratio: self.router_prune_target_ratio,
            router_predicted_ttl_secs: self.router_predicted_ttl_secs,
            router_active_request_expiry_secs: self.router_active_request_expiry_secs,
            router_prefill_load_model: self.router_prefill_load_model,
            router_prefill_time_coefficients: self.router_prefill_time_coefficients,
            router_queue_threshold: self.router_queue_threshold,
            router_queue_policy: self.router_queue_policy,
            router_queue_limit: self.router_queue_limit,
            router_overlap_refresh_after_secs: self.router_overlap_refresh_after_secs,
        };
        kv.validate()?;
        Ok(RouterConfig {
            mode: self.router_mode,
            kv,
            thresholds: LoadThresholds {
                active_decode_blocks_threshold: self.active_decode_blocks_threshold,
                active_prefill_tokens_threshold: self.active_prefill_tokens_threshold,
                active_prefill_tokens_threshold_frac: self.active_prefill_tokens_threshold_frac,
            },
            device_ratio: self.device_ratio,
        })
    }

    /// Whether KV events feed an exact index (else approximate mode).
    pub fn use_kv_events(&self) -> bool {
        flag(self.kv_events, self.no_kv_events, true)
    }

    /// The OpenAI API's socket address. Errors: an unparsable host.
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(format!("{}:{}", bracket(&self.http_host), self.http_port).parse()?)
    }

    /// The admin API's socket address, unless disabled. Errors: an unparsable host, or a
    /// non-loopback address without `--admin-token` (registration opens sockets and threads:
    /// it is never served open to the network).
    pub fn admin_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.no_admin {
            return Ok(None);
        }
        let a: SocketAddr = format!("{}:{}", bracket(&self.admin_host), self.admin_port).parse()?;
        if !a.ip().is_loopback() && self.admin_token.as_deref().is_none_or(str::is_empty) {
            anyhow::bail!(
                "the admin API on {a} would be open to the network: give --admin-token (or KVROUTER_ADMIN_TOKEN), bind it to 127.0.0.1, or pass --no-admin"
            );
        }
        Ok(Some(a))
    }

    /// Large prompts tokenized at once on the blocking pool.
    pub fn preprocess_threads(&self) -> usize {
        self.preprocess_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() / 2))
            .max(1)
    }

    /// The health policy of these flags.
    pub fn health_policy(&self) -> HealthPolicy {
        HealthPolicy {
            interval: Duration::from_millis(self.health_interval_ms.max(10)),
            timeout: Duration::from_millis(self.health_timeout_ms.max(1)),
            remove_after_failures: self.health_remove_after_failures.max(1),
            remove_after: Duration::from_secs_f64(self.health_remove_after_secs.max(0.0)),
        }
    }

    /// Limits of the OpenAI API's listener; `nofile`: the descriptor limit in force.
    pub fn api_listener(&self, nofile: u64) -> ListenerLimits {
        ListenerLimits {
            max_connections: self
                .max_connections
                .unwrap_or_else(|| default_max_connections(nofile)),
            idle_timeout: Duration::from_secs_f64(self.http_idle_timeout_secs.max(0.001)),
        }
    }

    /// Limits of the admin API's listener.
    pub fn admin_listener(&self) -> ListenerLimits {
        ListenerLimits {
            max_connections: self.admin_max_connections,
            idle_timeout: Duration::from_secs_f64(self.http_idle_timeout_secs.max(0.001)),
        }
    }

    /// Workers from `--worker` and `--workers-file`. Errors: unreadable or malformed file.
    pub fn static_workers(&self) -> anyhow::Result<Vec<WorkerSpec>> {
        let with_role = |urls: &[String], role| {
            urls.iter()
                .map(move |u| WorkerSpec {
                    role,
                    ..WorkerSpec::from_url(u)
                })
                .collect::<Vec<_>>()
        };
        let mut out = with_role(&self.workers, WorkerRole::Both);
        out.extend(with_role(&self.prefill_workers, WorkerRole::Prefill));
        out.extend(with_role(&self.decode_workers, WorkerRole::Decode));
        if let Some(p) = &self.workers_file {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading workers file {}: {e}", p.display()))?;
            out.extend(
                WorkerSpec::parse_list(&text)
                    .map_err(|e| anyhow::anyhow!("workers file {}: {e}", p.display()))?,
            );
        }
        Ok(out)
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ignores_the_environment_and_is_safe() {
        // Set variables the flags read; `Default` must not see them (tests and embedded stacks
        // must not change with the shell they run in).
        std::env::set_var("DYN_ROUTER_TEMPERATURE", "0.7");
        std::env::set_var("KVROUTER_HEALTH_INTERVAL_MS", "5");
        std::env::set_var("DYN_HTTP_HOST", "0.0.0.0");
        let c = FrontendConfig::default();
        std::env::remove_var("DYN_ROUTER_TEMPERATURE");
        std::env::remove_var("KVROUTER_HEALTH_INTERVAL_MS");
        std::env::remove_var("DYN_HTTP_HOST");
        assert_eq!(c.router_temperature, 0.0);
        assert_eq!(c.health_interval_ms, 1000);
        assert_eq!(c.http_host, "127.0.0.1", "loopback by default");
        assert_eq!(c.router_mode, RouterMode::RoundRobin);
    }

    #[test]
    fn selection_policy_and_credit_decay_flags_reach_the_core() {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            c: FrontendConfig,
        }
        let p = P::try_parse_from([
            "kvrouter",
            "--router-selection-policy",
            "affinity",
            "--router-kv-overlap-score-credit-decay",
            "0.5",
            "--router-affinity-load-factor",
            "2",
        ])
        .unwrap();
        let kv = p.c.router_config().unwrap().kv;
        assert_eq!(
            kv.router_selection_policy,
            kvrouter_core::SelectionPolicy::Affinity
        );
        assert_eq!(kv.overlap_score_credit_decay, 0.5);
        assert_eq!(kv.router_affinity_load_factor, 2.0);
        assert!(P::try_parse_from(["kvrouter", "--router-selection-policy", "best"]).is_err());
        let p = P::try_parse_from([
            "kvrouter",
            "--router-prefill-load-model",
            "ais",
            "--router-prefill-time-coefficients",
            "16.5,0.015,4.2e-7",
            "--router-queue-threshold",
            "1.5",
            "--router-queue-policy",
            "wspt",
        ])
        .unwrap();
        let kv = p.c.router_config().unwrap().kv;
        assert_eq!(
            kv.router_prefill_load_model,
            kvrouter_core::prefill_time::PrefillLoadModel::Aic
        );
        assert_eq!(
            kv.router_prefill_time_coefficients.map(|c| c.per_token_ms),
            Some(0.015)
        );
        assert_eq!(kv.router_queue_threshold, Some(1.5));
        assert_eq!(
            kv.router_queue_policy,
            kvrouter_core::queue::QueuePolicy::Wspt
        );
        let p = P::try_parse_from(["kvrouter", "--router-queue-threshold=-1"]).unwrap();
        assert!(
            p.c.router_config().is_err(),
            "a negative threshold is refused"
        );
        for bad in [
            ["--router-queue-policy", "lifo"],
            ["--router-prefill-time-coefficients", "1,2"],
        ] {
            assert!(P::try_parse_from(["kvrouter", bad[0], bad[1]]).is_err());
        }
        assert_eq!(
            FrontendConfig::default()
                .router_config()
                .unwrap()
                .kv
                .router_selection_policy,
            kvrouter_core::SelectionPolicy::Default,
            "the reference cost stays the default"
        );
    }

    #[test]
    fn an_open_admin_api_is_only_served_on_loopback() {
        let mut c = FrontendConfig {
            admin_host: "0.0.0.0".into(),
            ..FrontendConfig::default()
        };
        let e = c.admin_addr().unwrap_err().to_string();
        assert!(e.contains("--admin-token"), "{e}");
        c.admin_token = Some(String::new());
        assert!(c.admin_addr().is_err(), "an empty token is no token");
        c.admin_token = Some("t".into());
        assert!(c.admin_addr().unwrap().is_some());
        c.admin_token = None;
        c.admin_host = "::1".into();
        assert!(c.admin_addr().unwrap().is_some(), "IPv6 loopback");
        c.no_admin = true;
        c.admin_host = "0.0.0.0".into();
        assert!(c.admin_addr().unwrap().is_none());
    }
}
