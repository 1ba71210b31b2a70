//! `kvrouter up`: the embedded default — a frontend on 127.0.0.1:8000 in KV mode with N
//! in-process mock workers reached over real loopback HTTP and ZMQ, and the vendored Qwen3
//! tokenizer. Also what `kvrouter bench --embedded` and the end-to-end tests start.

use kvrouter_core::RouterMode;
use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker};

use crate::{vendored_model_dir, Frontend, FrontendConfig, WorkerSpec};

/// What to start.
#[derive(Clone, Debug)]
pub struct UpConfig {
    /// Mock workers (default 4).
    pub workers: usize,
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
        let workers = spawn_workers(&cfg.mocker, cfg.workers).await?;
        let specs = workers.iter().map(worker_spec).collect();
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
        kv_events_endpoint: i.kv_events_endpoint.clone(),
        replay_endpoint: i.replay_endpoint.clone(),
        kv_events_topic: None,
        block_size: Some(i.block_size),
        dp_size: i.dp_size,
        device: Default::default(),
        total_kv_blocks: Some(i.total_kv_blocks as u64),
        max_num_batched_tokens: Some(i.max_num_batched_tokens as u64),
    }
}
