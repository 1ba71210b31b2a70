//! `kvrouter relay`: a worker-side sidecar that publishes its workers' KV events (from their
//! ZMQ publishers, or polled from TensorRT-LLM's `POST /kv_cache_events`) to the endpoint's
//! NATS JetStream stream, for routers started with `--event-plane nats`
//! (`kvrouter_server::replicas::relay`). Runs until Ctrl-C or SIGTERM, then publishes what
//! it buffered. `kvrouter register --relay` runs the same relaying ([`RelayArgs::run_until`]).
use super::worker_args::WorkerArgs;

/// `kvrouter relay` flags.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub workers: WorkerArgs,
    #[command(flatten)]
    pub relay: RelayArgs,
}

/// Where and how to relay (shared with `kvrouter register --relay`).
#[derive(clap::Args, Clone, Debug)]
pub struct RelayArgs {
    /// NATS server URL (`nats://host:port`).
    #[arg(long, env = "NATS_SERVER", default_value = "nats://127.0.0.1:4222")]
    pub nats_server: String,
    /// Most events buffered while NATS is unreachable; beyond it the oldest are dropped and
    /// their worker rank is re-dumped (a clear and what it holds) once NATS is back.
    #[arg(long, env = "KVROUTER_RELAY_BUFFER_EVENTS", default_value_t = 200_000)]
    pub relay_buffer_events: usize,
    /// Serve `/live` and `/metrics` (`kvrouter_relay_*`: events relayed, publish failures,
    /// dropped events, recoveries) on this port, the reference's system status port; off
    /// when not given.
    #[arg(long, alias = "metrics-port", env = "DYN_SYSTEM_PORT")]
    pub system_port: Option<u16>,
    /// Address of the status server (`--system-port`).
    #[arg(long, env = "DYN_SYSTEM_HOST", default_value = "0.0.0.0")]
    pub system_host: String,
    /// TensorRT-LLM workers without a ZMQ endpoint: polled by the relay, as the frontend
    /// polls them with `--event-plane zmq`.
    #[command(flatten)]
    pub poll: kvrouter_server::config::PollArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    super::init_tracing();
    let specs = args.workers.specs()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Installed before the relay says it runs: a SIGTERM right after must stop it cleanly.
        let stop = super::shutdown_signal();
        args.relay
            .run_until(&args.workers.endpoint, specs, async {
                let _ = stop.await;
            })
            .await
    })
}

impl RelayArgs {
    /// Relays the events of `specs` to `endpoint`'s stream until `stop` completes. Errors:
    /// a build without `--features nats`, a worker that cannot be relayed (no `id`, neither a
    /// `kv_events_endpoint` nor `engine: trtllm`), an endpoint that cannot be opened.
    pub async fn run_until(
        &self,
        endpoint: &str,
        specs: Vec<kvrouter_server::WorkerSpec>,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        #[cfg(feature = "nats")]
        {
            use kvrouter_server::replicas::relay::{Relay, RelayOptions};
            let status_addr: Option<std::net::SocketAddr> =
                match self.system_port {
                    Some(port) => {
                        let host = kvrouter_server::config::bracket(&self.system_host);
                        Some(format!("{host}:{port}").parse().map_err(|e| {
                            anyhow::anyhow!("--system-host {}: {e}", self.system_host)
                        })?)
                    }
                    None => None,
                };
            let n = specs.len();
            let relay = Relay::start(
                RelayOptions {
                    nats_server: self.nats_server.clone(),
                    endpoint: endpoint.to_string(),
                    buffer_events: self.relay_buffer_events,
                    poll: self.poll.settings(),
                    ..Default::default()
                },
                specs,
            )
            .await?;
            let status = match status_addr {
                Some(addr) => {
                    let started = kvrouter_server::replicas::relay_status::StatusServer::start(
                        addr,
                        relay.metrics(),
                    )
                    .await;
                    let s = match started {
                        Ok(s) => s,
                        Err(e) => {
                            relay.stop().await;
                            return Err(e);
                        }
                    };
                    eprintln!("kvrouter relay: /live and /metrics on http://{}", s.addr);
                    Some(s)
                }
                None => None,
            };
            eprintln!(
                "kvrouter relay: relaying {n} worker(s) to {} on {}",
                endpoint, self.nats_server
            );
            stop.await;
            let stats = relay.stats();
            relay.stop().await;
            if let Some(s) = status {
                s.stop().await;
            }
            eprintln!("kvrouter relay: stopped ({stats:?})");
            Ok(())
        }
        #[cfg(not(feature = "nats"))]
        {
            let _ = (endpoint, specs, stop);
            anyhow::bail!("relaying KV events to NATS needs a build with `--features nats`")
        }
    }
}
