//! `kvrouter up`: the embedded default (see `kvrouter_server::up`). Every `kvrouter frontend`
//! flag applies, with KV mode as the default router mode; worker count and the mock engine's
//! main knobs are flags here.
use kvrouter_server::up::{EmbeddedStack, UpConfig};
use kvrouter_server::FrontendConfig;

/// `kvrouter up` flags. With `--reasoning-parser` the mock workers open their answers with a
/// `<think>` block; they answer tool-offering prompts with Hermes tool calls.
#[derive(clap::Args)]
pub struct Args {
    /// In-process mock workers, aggregated (prefill and decode on one worker). Default: 4, or
    /// 0 with `--prefill`/`--decode`.
    #[arg(long = "workers")]
    pub mock_workers: Option<usize>,
    /// Mock prefill workers: with `--decode`, requests are disaggregated (vLLM's protocol).
    #[arg(long, default_value_t = 0)]
    pub prefill: usize,
    /// Mock decode workers.
    #[arg(long, default_value_t = 0)]
    pub decode: usize,
    /// KV blocks per mock worker.
    #[arg(long, default_value_t = 16384)]
    pub num_gpu_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// Mock engine speed-up (0 = no modelled delay).
    #[arg(long, default_value_t = 1.0)]
    pub speedup_ratio: f64,
    /// The frontend (`--model-path` is also the mock workers' tokenizer).
    #[command(flatten)]
    pub frontend: FrontendConfig,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    super::init_tracing();
    let disaggregated = args.prefill + args.decode > 0;
    let mut cfg = UpConfig::fleet(
        args.mock_workers
            .unwrap_or(if disaggregated { 0 } else { 4 }),
        args.num_gpu_blocks,
        args.block_size,
        args.speedup_ratio,
        args.frontend.model_path.as_deref(),
    );
    cfg.prefill = args.prefill;
    cfg.decode = args.decode;
    let (args_prefill, args_decode) = (args.prefill, args.decode);
    let mode = args.frontend.router_mode;
    let policy = args.frontend.router.router_selection_policy;
    cfg.frontend = FrontendConfig {
        model_path: cfg.frontend.model_path.clone(),
        ..args.frontend
    };
    // A frontend that expects a reasoning model gets mock workers that think.
    cfg.mocker.reasoning = cfg.frontend.reasoning_parser.is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stop = super::shutdown_signal();
        let stack = EmbeddedStack::start(cfg).await?;
        let url = stack.url();
        eprintln!(
            "kvrouter up: {} mock workers ({} prefill, {} decode), router mode {mode} (selection policy {policy}), model {}",
            stack.workers.len(),
            args_prefill,
            args_decode,
            stack.frontend.model_name
        );
        eprintln!("  OpenAI API  {url}/v1   (try: curl {url}/v1/models)");
        eprintln!("  metrics     {url}/metrics");
        if let Some(a) = stack.frontend.admin_url() {
            eprintln!("  admin       {a}/v1/workers");
        }
        stop.await?;
        stack.stop().await;
        Ok(())
    })
}
