//! `kvrouter register`: a worker's discovery sidecar. It announces the worker's registration
//! (its workers-file entry) to the routers through a discovery backend, keeps the lease alive
//! while it runs and withdraws it on Ctrl-C or SIGTERM
//! (`kvrouter_server::workers::discovery`). Backend: `file` (`--file-kv`, `DYN_FILE_KV`).
use kvrouter_server::config::FileKvArgs;
use kvrouter_server::workers::discovery::announce;
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
    /// Discovery backend (only `file` is built).
    #[arg(long, alias = "discovery", env = "DYN_DISCOVERY_BACKEND", default_value = "file", value_parser = ["file"])]
    pub discovery_backend: String,
    #[command(flatten)]
    pub file_kv: FileKvArgs,
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
    let cfg = args.file_kv.discovery()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let announced = tokio::spawn({
            let (cfg, specs) = (cfg.clone(), specs.clone());
            async move {
                announce(&cfg, &specs, async {
                    let _ = rx.await;
                })
                .await
            }
        });
        // The files exist once announce has written them; say where.
        for s in &specs {
            let path = kvrouter_server::workers::discovery::registration_path(&cfg.root, s);
            for _ in 0..100 {
                if path.exists() || announced.is_finished() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            println!("{}", path.display());
        }
        if announced.is_finished() {
            announced.await??;
            anyhow::bail!("the registrations could not be kept");
        }
        super::shutdown_signal().await?;
        let _ = tx.send(());
        announced.await??;
        eprintln!("kvrouter register: registrations withdrawn");
        Ok(())
    })
}
