//! `kvrouter register`: a worker's discovery sidecar. It announces the worker's registration
//! (its workers-file entry) to the routers through a discovery backend, keeps the lease alive
//! while it runs and withdraws it on Ctrl-C or SIGTERM
//! (`kvrouter_server::workers::discovery`). Backend: `file` (`--file-kv`, `DYN_FILE_KV`).
//! With `--relay` it also relays the workers' KV events to NATS, as `kvrouter relay`.
use super::relay::RelayArgs;
use super::worker_args::WorkerArgs;
use kvrouter_server::config::{DiscoveryArgs, DiscoveryBackend};

/// `kvrouter register` flags.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub workers: WorkerArgs,
    /// Discovery backend: `file` (under `--file-kv`) or `etcd` (`ETCD_ENDPOINTS`; a build
    /// with `--features etcd`).
    #[arg(
        long,
        alias = "discovery",
        value_enum,
        env = "DYN_DISCOVERY_BACKEND",
        default_value = "file"
    )]
    pub discovery_backend: DiscoveryBackend,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    /// Also relay the workers' KV events to the endpoint's NATS stream, as `kvrouter relay`
    /// does (a build with `--features nats`).
    #[arg(long)]
    pub relay: bool,
    #[command(flatten)]
    pub relay_args: RelayArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    super::init_tracing();
    let specs = args.workers.specs()?;
    let Some(discovery) = args.discovery.discovery(args.discovery_backend)? else {
        anyhow::bail!("--discovery-backend mem has nowhere to register: use file or etcd");
    };
    if matches!(
        discovery,
        kvrouter_server::workers::discovery::Discovery::Kubernetes(_)
    ) {
        anyhow::bail!(
            "--discovery-backend kubernetes needs no sidecar: annotate the worker pods \
             (kvrouter.dev/http-port, ...; README \"Deploy on Kubernetes\")"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Installed before anything is announced: a SIGTERM right after must withdraw.
        let stop = super::shutdown_signal();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let announced = tokio::spawn({
            let (d, specs) = (discovery.clone(), specs.clone());
            async move {
                d.announce(&specs, ready_tx, async {
                    let _ = rx.await;
                })
                .await
            }
        });
        // Written (or failed): say where, then hold the registrations until told to stop.
        if ready_rx.await.is_err() {
            announced.await??;
            anyhow::bail!("the registrations could not be written");
        }
        for s in &specs {
            println!("{}", discovery.location(s));
        }
        let held = if args.relay {
            let endpoint = args.workers.endpoint.clone();
            args.relay_args
                .run_until(&endpoint, specs, async {
                    let _ = stop.await;
                })
                .await
        } else {
            stop.await.map_err(Into::into)
        };
        // Withdrawn whatever happened to the relay.
        let _ = tx.send(());
        announced.await??;
        held?;
        eprintln!("kvrouter register: registrations withdrawn");
        Ok(())
    })
}
