//! Serving an API on a TCP listener within limits: a cap on open connections (past it, a new
//! connection gets a `503` and is closed, and the refusal is counted), a deadline for each
//! request head that is also the keep-alive idle limit, `TCP_NODELAY` on every socket, and an
//! accept loop that survives running out of descriptors.
//!
//! The cap keeps the process below its descriptor limit: a flood of idle connections fills
//! the cap, not the descriptor table, so the other listener, the workers' connections and the
//! KV event sockets keep working, and the flood drains as the idle limit closes it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::metrics::{ListenerLabels, Metrics};

/// Limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// Open connections at most; further ones are refused with 503.
    pub max_connections: usize,
    /// A connection must deliver a complete request head within this time of being accepted
    /// or of its previous response ending; otherwise it is closed (slow or idle clients).
    pub idle_timeout: Duration,
}

/// Refusals being written at once at most; past that a refused connection is just closed.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long a refused client gets to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// A listener serving `app` in a background task.
pub struct Served {
    pub addr: SocketAddr,
    pub task: JoinHandle<()>,
    pub shutdown: oneshot::Sender<()>,
}

/// Stop listeners started by [`serve`]: signal each (open streams are cut), then wait for its
/// task.
pub async fn stop_all(shutdown: Vec<oneshot::Sender<()>>, tasks: Vec<JoinHandle<()>>) {
    for s in shutdown {
        let _ = s.send(());
    }
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
}

/// Bind `addr` and serve `app` under `limits`; `name` labels its metrics (`api`, `admin`).
/// Errors: the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    app: axum::Router,
    limits: ListenerLimits,
    name: &'static str,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Served> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(accept_loop(listener, app, limits, name, metrics, rx));
    Ok(Served {
        addr: local,
        task,
        shutdown: tx,
    })
}

async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    limits: ListenerLimits,
    name: &'static str,
    metrics: Arc<Metrics>,
    mut stop: oneshot::Receiver<()>,
) {
    let labels = ListenerLabels { listener: name };
    let open = metrics.open_connections.get_or_create(&labels).clone();
    let refused = metrics.refused_connections.get_or_create(&labels).clone();
    let accept_errors = metrics.accept_errors.get_or_create(&labels).clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let mut conns = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_errors.inc();
                    // Out of descriptors (or memory): let connections close before retrying.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                        tracing::error!(listener = name, "accept failed: {e}; pausing 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
        };
        // Streamed tokens must leave at once: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.inc();
            if let Ok(p) = refusals.clone().try_acquire_owned() {
                conns.spawn(async move {
                    refuse(tcp).await;
                    drop(p);
                });
            }
            continue;
        };
        let conn = http
            .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()))
            .with_upgrades();
        let open = open.clone();
        open.inc();
        conns.spawn(async move {
            // Errors here are the client's (reset, timeout, malformed head): nothing to do.
            let _ = conn.await;
            open.dec();
            drop(slot);
        });
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// Tell a client over the cap why it is turned away, then close.
async fn refuse(mut tcp: TcpStream) {
    const BODY: &str = r#"{"error":{"message":"too many open connections; retry later","type":"service_unavailable","param":null,"code":503}}"#;
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        tcp.write_all(resp.as_bytes()).await?;
        tcp.shutdown().await?;
        // Drain what the client sent so closing does not reset the connection under it.
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < 64 * 1024 {
            match tcp.read(&mut buf).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The process's soft limit on open descriptors, raised to the hard limit first (many systems
/// start processes at a soft limit of 1024). Returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every platform
        let soft = r.rlim_cur as u64;
        soft
    }
}

/// The default connection cap of the API listener for a descriptor limit of `nofile`: half of
/// what is left after a reserve of 512 (each client connection may hold one connection to a
/// worker too; the reserve covers the admin API, KV event sockets and files), within
/// 16..=32768.
pub fn default_max_connections(nofile: u64) -> usize {
    (nofile.saturating_sub(512) / 2).clamp(16, 32_768) as usize
}
