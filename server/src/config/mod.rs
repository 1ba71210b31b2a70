//! Command-line flags, with the reference's names and `DYN_*` variables
//! (`dynamo-router-spec.md` §9), turned into the core's [`RouterConfig`]: `kvrouter frontend`'s
//! [`FrontendConfig`] here, made of groups it shares with `kvrouter router`
//! ([`crate::router_service::RouterServiceConfig`]): the router's flags ([`RouterArgs`]), the
//! worker side ([`FleetArgs`]) and the listener's limits ([`ListenerArgs`]).

mod fleet_args;
mod router_args;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use kvrouter_core::config::ConfigError;
use kvrouter_core::{RouterConfig, RouterMode, WorkerRole};

use crate::workers::spec::WorkerSpec;

pub use fleet_args::bracket;
pub use fleet_args::{DiscoveryArgs, DiscoveryBackend, FleetArgs, ListenerArgs, PollArgs};
pub use router_args::RouterArgs;

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
    /// The router's flags (shared with `kvrouter router`).
    #[command(flatten)]
    pub router: RouterArgs,
    /// Tokens per KV block for workers registered without one (a worker's own block size wins).
    #[arg(long, env = "DYN_KV_CACHE_BLOCK_SIZE")]
    pub kv_cache_block_size: Option<usize>,
    /// device-aware-weighted: weight of an accelerator worker against a CPU worker.
    #[arg(long, env = "DYN_ENCODER_CUDA_TO_CPU_RATIO", default_value_t = 8.0)]
    pub device_ratio: f64,
    /// Where workers come from and how they are watched (shared with `kvrouter router`).
    #[command(flatten)]
    pub fleet: FleetArgs,
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
    /// A `kvrouter router` that chooses the prefill worker of every request: the
    /// reference's two-router layout, this frontend routing decode among its own workers
    /// (e.g. with `--kv-overlap-score-weight 0`) and the standalone router
    /// (`--endpoint dynamo.prefill.generate`) routing prefill. A base URL, or the router's
    /// endpoint name to use every replica registered in `--discovery-backend`.
    #[arg(long, value_name = "URL|ENDPOINT", env = "KVROUTER_PREFILL_ROUTER")]
    pub prefill_router: Option<String>,
    /// A router pool: `NAME=URL` of a `kvrouter router` in front of the pool's workers, or
    /// `NAME=ENDPOINT` for the replicas registered in `--discovery-backend` (repeatable). With pools, each request goes to the pool `--pool-policy` chooses, and the
    /// worker its router chooses; `--worker`s are not used.
    #[arg(
        long = "pool",
        value_name = "NAME=URL",
        conflicts_with = "prefill_router"
    )]
    pub pools: Vec<crate::frontend::pools::PoolArg>,
    /// How a request's pool is chosen: `probe` (the most cached blocks of the prompt, ties to
    /// the least loaded) or `isl` (by prompt length, `--pool-isl`).
    #[arg(
        long,
        value_enum,
        env = "KVROUTER_POOL_POLICY",
        default_value = "probe"
    )]
    pub pool_policy: crate::frontend::pools::PoolPolicy,
    /// `--pool-policy isl`: the prompts a pool takes, `NAME=MIN:MAX` tokens, `MIN ≤ ISL < MAX`
    /// (`MAX` empty: no bound), e.g. `--pool-isl short=:4096 --pool-isl long=4096:`.
    #[arg(long = "pool-isl", value_name = "NAME=MIN:MAX")]
    pub pool_isl: Vec<crate::frontend::pools::IslRange>,
    /// Limits of the OpenAI API's connections and requests (shared with `kvrouter router`).
    #[command(flatten)]
    pub listener: ListenerArgs,
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
        c.fleet.admin_port = 0;
        c
    }
}

impl FrontendConfig {
    /// The core's configuration for these flags. Errors: out-of-range values.
    pub fn router_config(&self) -> Result<RouterConfig, ConfigError> {
        let kv = self.router.kv_config();
        kv.validate()?;
        Ok(RouterConfig {
            mode: self.router_mode,
            kv,
            thresholds: self.router.thresholds(),
            device_ratio: self.device_ratio,
        })
    }

    /// Whether KV events feed an exact index (else approximate mode).
    pub fn use_kv_events(&self) -> bool {
        self.router.use_kv_events()
    }

    /// The OpenAI API's socket address. Errors: an unparsable host.
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(format!("{}:{}", bracket(&self.http_host), self.http_port).parse()?)
    }

    /// Workers from `--worker`, `--prefill-worker`, `--decode-worker` and `--workers-file`, in
    /// that order. Errors: unreadable or malformed file.
    pub fn static_workers(&self) -> anyhow::Result<Vec<WorkerSpec>> {
        let with_role = |urls: &[String], role| {
            urls.iter()
                .map(move |u| WorkerSpec {
                    role,
                    ..WorkerSpec::from_url(u)
                })
                .collect::<Vec<_>>()
        };
        let mut out = self.fleet.url_workers();
        out.extend(with_role(&self.prefill_workers, WorkerRole::Prefill));
        out.extend(with_role(&self.decode_workers, WorkerRole::Decode));
        out.extend(self.fleet.file_workers()?);
        Ok(out)
    }

    /// Large prompts tokenized at once on the blocking pool.
    pub fn preprocess_threads(&self) -> usize {
        self.preprocess_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() / 2))
            .max(1)
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
        assert_eq!(c.router.router_temperature, 0.0);
        assert_eq!(c.fleet.health_interval_ms, 1000);
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
    fn pool_and_prefill_router_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            c: FrontendConfig,
        }
        let p = P::try_parse_from([
            "kvrouter",
            "--pool",
            "short=http://127.0.0.1:8090",
            "--pool",
            "long=http://127.0.0.1:8092",
            "--pool-policy",
            "isl",
            "--pool-isl",
            "short=:4096",
            "--pool-isl",
            "long=4096:",
        ])
        .unwrap();
        assert_eq!(p.c.pools.len(), 2);
        assert_eq!(p.c.pool_policy, crate::frontend::pools::PoolPolicy::Isl);
        assert_eq!(p.c.pool_isl[1].min, 4096);
        assert_eq!(FrontendConfig::default().pool_policy, Default::default());
        let both = [
            "kvrouter",
            "--pool",
            "a=http://x:1",
            "--prefill-router",
            "http://y:2",
        ];
        assert!(
            P::try_parse_from(both).is_err(),
            "pools and a prefill router conflict"
        );
        assert!(P::try_parse_from(["kvrouter", "--pool", "nameless"]).is_err());
        let p = P::try_parse_from(["kvrouter", "--prefill-router", "http://127.0.0.1:8090"]);
        assert_eq!(
            p.unwrap().c.prefill_router.as_deref(),
            Some("http://127.0.0.1:8090")
        );
    }

    #[test]
    fn an_open_admin_api_is_only_served_on_loopback() {
        let mut c = FrontendConfig::default().fleet;
        c.admin_host = "0.0.0.0".into();
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

    #[test]
    fn the_reference_legacy_spellings_of_boolean_router_flags_are_accepted() {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            c: FrontendConfig,
        }
        for (args, track, reuse) in [
            (&["--no-track-active-blocks"][..], false, true),
            (&["--no-router-track-active-blocks"], false, true),
            (&["--track-active-blocks", "false"], false, true),
            (&["--no-assume-kv-reuse"], true, false),
            (&["--router-assume-kv-reuse=false"], true, false),
        ] {
            let p =
                P::try_parse_from(std::iter::once("kvrouter").chain(args.iter().copied())).unwrap();
            let kv = p.c.router_config().unwrap().kv;
            assert_eq!(
                (kv.router_track_active_blocks, kv.router_assume_kv_reuse),
                (track, reuse),
                "{args:?}"
            );
        }
    }
}
