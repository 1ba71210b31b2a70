//! `kvrouter up`: the embedded default — a frontend on 127.0.0.1:8000 in KV mode with N
//! in-process mock workers reached over real loopback HTTP and ZMQ, and the vendored Qwen3
//! tokenizer. Also what `kvrouter bench --embedded` and the end-to-end tests start.

use kvrouter_core::RouterMode;
use kvrouter_mocker::disagg::DisaggregationMode;
use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker};

use crate::{vendored_model_dir, Frontend, FrontendConfig, WorkerSpec};

/// What to start.
#[derive(Clone, Debug)]
pub struct UpConfig {
    /// Mock workers (default 4), aggregated.
    pub workers: usize,
    /// Mock prefill workers and decode workers for disaggregated serving (default 0 each;
    /// `kvrouter up --prefill 2 --decode 2`). They use [`UpConfig::mocker`] with the role set.
    pub prefill: usize,
    pub decode: usize,
    /// How the prefill workers hand over their KV (`vllm` by default, or `sglang`).
    pub disagg_protocol: crate::workers::spec::DisaggProtocol,
    /// Their settings (blocks, block size, speedup, …); `model_path` defaults to the vendored
    /// tokenizer so they return text.
    pub mocker: MockerConfig,
    /// The frontend's flags (default: KV mode, 127.0.0.1, ephemeral ports).
    pub frontend: FrontendConfig,
}

impl Default for UpConfig {
    fn default() -> Self {
        let frontend = FrontendConfig {
            router_mode: RouterMode::Kv,
            ..FrontendConfig::default()
        };
        Self {
            workers: 4,
            prefill: 0,
            decode: 0,
            disagg_protocol: Default::default(),
            mocker: MockerConfig {
                model_path: Some(vendored_model_dir()),
                ..MockerConfig::default()
            },
            frontend,
        }
    }
}

impl UpConfig {
    /// The default stack with `workers` mock workers of `num_gpu_blocks` KV blocks of
    /// `block_size` tokens at `speedup_ratio`; `model_path` (tokenizer directory) for the
    /// frontend and the workers when given, else the vendored one.
    pub fn fleet(
        workers: usize,
        num_gpu_blocks: usize,
        block_size: usize,
        speedup_ratio: f64,
        model_path: Option<&std::path::Path>,
    ) -> Self {
        let mut cfg = Self {
            workers,
            ..Self::default()
        };
        cfg.mocker.num_gpu_blocks = num_gpu_blocks;
        cfg.mocker.block_size = block_size;
        cfg.mocker.speedup_ratio = speedup_ratio;
        if let Some(p) = model_path {
            cfg.mocker.model_path = Some(p.to_path_buf());
            cfg.frontend.model_path = Some(p.to_path_buf());
        }
        cfg
    }
}

/// A running embedded stack.
pub struct EmbeddedStack {
    pub frontend: Frontend,
    pub workers: Vec<RunningWorker>,
}

impl EmbeddedStack {
    /// Start the workers, then the frontend with them registered.
    ///
    /// Errors: invalid mocker settings, ports in use, tokenizer not found.
    pub async fn start(cfg: UpConfig) -> anyhow::Result<Self> {
        let mut workers = if cfg.workers > 0 {
            spawn_workers(&cfg.mocker, cfg.workers).await?
        } else {
            Vec::new()
        };
        for (mode, n) in [
            (DisaggregationMode::Prefill, cfg.prefill),
            (DisaggregationMode::Decode, cfg.decode),
        ] {
            if n == 0 {
                continue;
            }
            // Each group on its own ports: free ones (the defaults' base + i would collide).
            let m = MockerConfig {
                disaggregation_mode: mode,
                http_port: 0,
                zmq_kv_events_port: 0,
                zmq_replay_port: 0,
                disaggregation_bootstrap_port: 0,
                ..cfg.mocker.clone()
            };
            match spawn_workers(&m, n).await {
                Ok(w) => workers.extend(w),
                Err(e) => {
                    for w in workers {
                        w.stop().await;
                    }
                    return Err(e.into());
                }
            }
        }
        let specs = workers
            .iter()
            .map(|w| {
                let mut spec = worker_spec(w);
                if spec.role == kvrouter_core::WorkerRole::Prefill {
                    spec.disaggregation_protocol = cfg.disagg_protocol;
                }
                spec
            })
            .collect();
        let frontend = match Frontend::start(cfg.frontend, specs).await {
            Ok(f) => f,
            Err(e) => {
                for w in workers {
                    w.stop().await;
                }
                return Err(e);
            }
        };
        Ok(Self { frontend, workers })
    }

    /// Base URL of the OpenAI API.
    pub fn url(&self) -> String {
        self.frontend.url()
    }

    /// Stop the frontend, then the workers.
    pub async fn stop(self) {
        self.frontend.stop().await;
        for w in self.workers {
            w.stop().await;
        }
    }
}

/// The registration of an in-process mock worker.
pub fn worker_spec(w: &RunningWorker) -> WorkerSpec {
    let i = &w.info;
    WorkerSpec {
        id: None,
        url: i.url.clone(),
        model: Some(i.model.clone()),
        lora_adapters: i.lora_adapters.clone(),
        kv_events_endpoint: i.kv_events_endpoint.clone(),
        replay_endpoint: i.replay_endpoint.clone(),
        kv_events_topic: None,
        block_size: Some(i.block_size),
        engine: match i.engine {
            kvrouter_mocker::cli::Engine::Vllm => crate::workers::spec::Engine::Vllm,
            kvrouter_mocker::cli::Engine::Sglang => crate::workers::spec::Engine::Sglang,
            kvrouter_mocker::cli::Engine::Trtllm => crate::workers::spec::Engine::Trtllm,
        },
        kv_events_poll_interval_ms: None,
        dp_size: i.dp_size,
        device: Default::default(),
        total_kv_blocks: Some(i.total_kv_blocks as u64),
        max_num_batched_tokens: Some(i.max_num_batched_tokens as u64),
        role: i.role.as_str().parse().unwrap_or_default(),
        disaggregation_protocol: Default::default(),
        bootstrap_port: i.bootstrap_port,
        endpoint: Some(i.endpoint.clone()),
    }
}
