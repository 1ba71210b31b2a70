//! The worker-description flags of the worker-side sidecars (`kvrouter register`,
//! `kvrouter relay`): which workers, and the endpoint of those that name none.
use kvrouter_server::WorkerSpec;

/// Workers described as the frontend's workers file does.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Workers: a workers file (JSON lines or array, the lines `kvrouter mocker` prints are
    /// valid).
    #[arg(long, env = "KVROUTER_WORKERS_FILE")]
    pub workers_file: Option<std::path::PathBuf>,
    /// A worker, as one workers-file entry (repeatable), e.g.
    /// `{"url": "http://10.0.0.5:8000", "kv_events_endpoint": "tcp://10.0.0.5:5557"}`.
    #[arg(long = "worker-json", value_name = "JSON")]
    pub worker_json: Vec<String>,
    /// The `namespace.component.endpoint` of entries that name none.
    #[arg(long, env = "DYN_ENDPOINT", default_value = kvrouter_server::workers::spec::DEFAULT_ENDPOINT)]
    pub endpoint: String,
}

impl WorkerArgs {
    /// The workers, validated, each with its endpoint filled in. Errors: an unreadable or
    /// invalid file or entry, an invalid endpoint, no worker at all.
    pub fn specs(&self) -> anyhow::Result<Vec<WorkerSpec>> {
        let mut specs = Vec::new();
        if let Some(p) = &self.workers_file {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading workers file {}: {e}", p.display()))?;
            specs.extend(
                WorkerSpec::parse_list(&text)
                    .map_err(|e| anyhow::anyhow!("workers file {}: {e}", p.display()))?,
            );
        }
        for j in &self.worker_json {
            specs.push(serde_json::from_str(j).map_err(|e| anyhow::anyhow!("--worker-json: {e}"))?);
        }
        if specs.is_empty() {
            anyhow::bail!("no workers: give --workers-file or --worker-json");
        }
        kvrouter_server::workers::spec::validate_endpoint_name(&self.endpoint)
            .map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
        for s in &mut specs {
            s.validate()
                .map_err(|e| anyhow::anyhow!("worker {}: {e}", s.url))?;
            s.endpoint.get_or_insert_with(|| self.endpoint.clone());
        }
        Ok(specs)
    }
}
