//! `kvrouter frontend`: the OpenAI-compatible frontend with the router embedded, in front of
//! workers given by `--worker`, `--workers-file` or the admin API. Flags: `kvrouter_server::config`.
use kvrouter_server::{Frontend, FrontendConfig};

/// `kvrouter frontend` flags.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub frontend: FrontendConfig,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    super::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stop = super::shutdown_signal();
        let f = Frontend::start(args.frontend, Vec::new()).await?;
        eprintln!("kvrouter frontend: serving {} on {}", f.model_name, f.url());
        if let Some(a) = f.admin_url() {
            eprintln!("kvrouter frontend: admin API on {a}/v1/workers");
        }
        stop.await?;
        f.stop().await;
        Ok(())
    })
}
