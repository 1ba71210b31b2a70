//! `kvrouter router`: the standalone router service (see `kvrouter_server::router_service`),
//! with `python -m dynamo.router`'s command line. Legacy flag spellings are accepted with a
//! deprecation warning.
use kvrouter_server::router_service::{warn_legacy_flags, RouterService, RouterServiceConfig};

/// `kvrouter router` flags.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub router: RouterServiceConfig,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    super::init_tracing();
    warn_legacy_flags(std::env::args_os());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stop = super::shutdown_signal();
        let r = RouterService::start(args.router, Vec::new()).await?;
        eprintln!(
            "kvrouter router: routing {} on {}/v1/router",
            r.endpoint,
            r.url()
        );
        if let Some(a) = r.admin_url() {
            eprintln!("kvrouter router: admin API on {a}/v1/workers");
        }
        stop.await?;
        r.stop().await;
        Ok(())
    })
}
