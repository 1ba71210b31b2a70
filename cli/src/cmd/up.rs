//! `kvrouter up`: the embedded default (see `kvrouter_server::up`). Frontend flags apply, with
//! KV mode and 127.0.0.1:8000 as defaults; worker count and the mock engine's main knobs are
//! flags here.
use std::path::PathBuf;

use kvrouter_core::RouterMode;
use kvrouter_server::up::{EmbeddedStack, UpConfig};

/// `kvrouter up` flags.
#[derive(clap::Args)]
pub struct Args {
    /// In-process mock workers.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// KV blocks per mock worker.
    #[arg(long, default_value_t = 16384)]
    pub num_gpu_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// Mock engine speed-up (0 = no modelled delay).
    #[arg(long, default_value_t = 1.0)]
    pub speedup_ratio: f64,
    /// Address of the OpenAI API.
    #[arg(long, env = "DYN_HTTP_HOST", default_value = "127.0.0.1")]
    pub http_host: String,
    /// Port of the OpenAI API.
    #[arg(long, env = "DYN_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// Router mode.
    #[arg(long, env = "DYN_ROUTER_MODE", default_value = "kv")]
    pub router_mode: RouterMode,
    /// Tokenizer directory for frontend and workers (default: the vendored Qwen3).
    #[arg(long)]
    pub model_path: Option<PathBuf>,
    /// Port of the admin API (0 = any free port).
    #[arg(long, default_value_t = 8001)]
    pub admin_port: u16,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    super::init_tracing();
    let mut cfg = UpConfig::fleet(
        args.workers,
        args.num_gpu_blocks,
        args.block_size,
        args.speedup_ratio,
        args.model_path.as_deref(),
    );
    cfg.frontend.http_host = args.http_host;
    cfg.frontend.http_port = args.http_port;
    cfg.frontend.admin_port = args.admin_port;
    cfg.frontend.router_mode = args.router_mode;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stack = EmbeddedStack::start(cfg).await?;
        let url = stack.url();
        eprintln!(
            "kvrouter up: {} mock workers, router mode {}, model {}",
            stack.workers.len(),
            args.router_mode,
            stack.frontend.model_name
        );
        eprintln!("  OpenAI API  {url}/v1   (try: curl {url}/v1/models)");
        eprintln!("  metrics     {url}/metrics");
        if let Some(a) = stack.frontend.admin_url() {
            eprintln!("  admin       {a}/v1/workers");
        }
        super::shutdown_signal().await?;
        stack.stop().await;
        Ok(())
    })
}
