//! The relay's status server (`kvrouter relay --system-port`, the reference's system status
//! port `DYN_SYSTEM_PORT`): `GET /live` answers 200 while the relay runs, for a sidecar's
//! probes; `GET /metrics` serves its [`RelayMetrics`] (`kvrouter_relay_*`: events received and
//! published, publish failures, events dropped from a full buffer, recoveries, the buffer's
//! fill, whether NATS takes messages), as classic Prometheus text or OpenMetrics as the
//! scraper's `Accept` header asks.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

use super::relay::RelayMetrics;
use crate::frontend::probes::{metrics_response, requested_format};

/// A running status server.
pub struct StatusServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusServer {
    /// Bind `addr` and serve `/live` and `/metrics` of `metrics`. Errors: the address cannot
    /// be bound.
    pub async fn start(addr: SocketAddr, metrics: RelayMetrics) -> anyhow::Result<Self> {
        let mut registry = Registry::with_prefix("kvrouter");
        metrics.register(&mut registry);
        let app = axum::Router::new()
            .route("/live", axum::routing::get(|| async { "ok" }))
            .route("/metrics", axum::routing::get(scrape))
            .with_state(Arc::new(registry));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the relay's status port {addr}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = served.await {
                tracing::warn!("relay status server: {e}");
            }
        });
        Ok(Self { addr, stop, task })
    }

    /// Stop serving.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn scrape(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    let format = requested_format(&headers);
    metrics_response(crate::metrics::encode(&registry, format), format)
}
