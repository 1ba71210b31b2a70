//! `kvrouter register`: a worker's discovery sidecar. It announces the worker's registration
//! (its workers-file entry) to the routers through a discovery backend, keeps the lease alive
//! while it runs and withdraws it on Ctrl-C or SIGTERM
//! (`kvrouter_server::workers::discovery`). Backend: `file` (`--file-kv`, `DYN_FILE_KV`).
use kvrouter_server::config::{DiscoveryArgs, DiscoveryBackend};
use kvrouter_server::WorkerSpec;

/// `kvrouter register` flags.
#[derive(clap::Args)]
pub struct Args {
    /// Workers to announce: a workers file (JSON lines or array, the lines `kvrouter mocker`
    /// prints are valid).
    #[arg(long, env = "KVROUTER_WORKERS_FILE")]
    pub workers_file: Option<std::path::PathBuf>,
    /// A worker to announce, as one workers-file entry (repeatable), e.g.
    /// `{"url": "http://10.0.0.5:8000", "kv_events_endpoint": "tcp://10.0.0.5:5557"}`.
    #[arg(long = "worker-json", value_name = "JSON")]
    pub worker_json: Vec<String>,
    /// The `namespace.component.endpoint` of entries that name none.
    #[arg(long, env = "DYN_ENDPOINT", default_value = kvrouter_server::workers::spec::DEFAULT_ENDPOINT)]
    pub endpoint: String,
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    super::init_tracing();
    let mut specs = Vec::new();
    if let Some(p) = &args.workers_file {
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading workers file {}: {e}", p.display()))?;
        specs.extend(
            WorkerSpec::parse_list(&text)
                .map_err(|e| anyhow::anyhow!("workers file {}: {e}", p.display()))?,
        );
    }
    for j in &args.worker_json {
        specs.push(serde_json::from_str(j).map_err(|e| anyhow::anyhow!("--worker-json: {e}"))?);
    }
    if specs.is_empty() {
        anyhow::bail!("nothing to register: give --workers-file or --worker-json");
    }
    kvrouter_server::workers::spec::validate_endpoint_name(&args.endpoint)
        .map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
    for s in &mut specs {
        s.validate()
            .map_err(|e| anyhow::anyhow!("worker {}: {e}", s.url))?;
        s.endpoint.get_or_insert_with(|| args.endpoint.clone());
    }
    let Some(discovery) = args.discovery.discovery(args.discovery_backend)? else {
        anyhow::bail!("--discovery-backend mem has nowhere to register: use file or etcd");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
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
        super::shutdown_signal().await?;
        let _ = tx.send(());
        announced.await??;
        eprintln!("kvrouter register: registrations withdrawn");
        Ok(())
    })
}
