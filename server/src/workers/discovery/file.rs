//! The file discovery backend, the reference's own (`--discovery-backend file`, root
//! `--file-kv` / `DYN_FILE_KV`, spec §10): no etcd, no NATS, one directory shared by the
//! workers' sidecars and the routers on a machine (or a shared volume).
//!
//! A worker is one JSON file, its workers-file entry ([`WorkerSpec`]), at
//! `ROOT/<namespace>/<component>/<endpoint>/<instance>.json`. Its sidecar (`kvrouter register`,
//! [`announce`]) writes the file, keeps its modification time fresh — the lease — and removes
//! it on exit. Routers poll the root ([`spawn_watch`]): a new file registers its worker, a
//! changed one registers it again, a removed file or a lease older than
//! `--discovery-lease-secs` deregisters it (index entries and load cleared). Only the
//! endpoints the router serves are read: a standalone router's `--endpoint`, every endpoint
//! for the frontend.
//!
//! Hostile input: files are at most [`MAX_REGISTRATION_BYTES`], the root at most [`MAX_FILES`]
//! entries are read per poll, symbolic links are not followed, and a file that does not parse
//! or register is logged once per content and left alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::MAX_REGISTRATION_BYTES;
use crate::metrics::Metrics;
use crate::workers::fleet::Fleet;
use crate::workers::spec::WorkerSpec;

/// Most files read per poll.
pub const MAX_FILES: usize = 10_000;

/// Where and how often to look.
#[derive(Clone, Debug)]
pub struct FileDiscovery {
    /// The root (`DYN_FILE_KV`).
    pub root: PathBuf,
    /// A registration whose file was not refreshed for this long is gone.
    pub lease: Duration,
    /// Time between polls.
    pub poll: Duration,
}

/// The directory of an endpoint's registrations: `ROOT/ns/component/endpoint`.
pub fn endpoint_dir(root: &Path, endpoint: &str) -> PathBuf {
    endpoint
        .split('.')
        .fold(root.to_path_buf(), |p, part| p.join(part))
}

/// The file of one worker's registration ([`super::registration_key`] under the root).
pub fn registration_path(root: &Path, spec: &WorkerSpec) -> PathBuf {
    root.join(format!("{}.json", super::registration_key(spec)))
}

/// Every live registration under `dirs`, by path: regular `*.json` files (no symbolic links)
/// refreshed within `lease`, at most [`MAX_FILES`], each at most
/// [`MAX_REGISTRATION_BYTES`].
pub(super) fn scan(dirs: &[PathBuf], lease: Duration) -> HashMap<String, Vec<u8>> {
    let now = SystemTime::now();
    let mut out = HashMap::new();
    let mut stack: Vec<(PathBuf, usize)> = dirs.iter().map(|d| (d.clone(), 0)).collect();
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > MAX_FILES {
                tracing::warn!(root = %dir.display(), "discovery: over {MAX_FILES} entries, the rest ignored");
                return out;
            }
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let path = e.path();
            if meta.is_dir() && depth < 3 {
                stack.push((path, depth + 1));
                continue;
            }
            if !meta.is_file() || path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let fresh = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_none_or(|age| age <= lease);
            if !fresh || meta.len() > MAX_REGISTRATION_BYTES as u64 {
                continue;
            }
            if let Ok(bytes) = std::fs::read(&path) {
                out.insert(path.display().to_string(), bytes);
            }
        }
    }
    out
}

/// Poll `cfg.root` every `cfg.poll` and keep `fleet`'s discovered workers in step with the
/// live registrations, until the task is aborted.
pub fn spawn_watch(
    fleet: Arc<Fleet>,
    cfg: FileDiscovery,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let dirs = match fleet.endpoint() {
            Some(e) => vec![endpoint_dir(&cfg.root, e)],
            None => vec![cfg.root.clone()],
        };
        tracing::info!(root = %cfg.root.display(), "discovery: watching registrations");
        let mut known = super::Registrations::default();
        let mut tick = tokio::time::interval(cfg.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (d, lease) = (dirs.clone(), cfg.lease);
            let Ok(live) = tokio::task::spawn_blocking(move || scan(&d, lease)).await else {
                continue;
            };
            known.sync("file", &fleet, &metrics, &live).await;
        }
    })
}

/// A worker's sidecar side (`kvrouter register`): write each spec's file under `cfg.root`
/// (atomically: a temporary file renamed), refresh the files every third of the lease, and
/// remove them when `stop` resolves; `ready` fires once they are first written. A file removed
/// by someone else is written again at the next refresh. Errors: the root cannot be written (at the start; later failures are logged).
pub async fn announce(
    cfg: &FileDiscovery,
    specs: &[WorkerSpec],
    ready: tokio::sync::oneshot::Sender<()>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<Vec<PathBuf>> {
    let started = super::now_ns();
    let files: Vec<(PathBuf, Vec<u8>)> = specs
        .iter()
        .map(|s| {
            (
                registration_path(&cfg.root, s),
                super::registration_bytes(s, started),
            )
        })
        .collect();
    announce_files(cfg, files, ready, stop).await
}

/// [`announce`] of ready-made `(path, content)` pairs (a router's own registration too).
pub async fn announce_files(
    cfg: &FileDiscovery,
    files: Vec<(PathBuf, Vec<u8>)>,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<Vec<PathBuf>> {
    for (path, bytes) in &files {
        write_atomically(path, bytes)?;
    }
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let _ = ready.send(());
    let refresh = async {
        let mut tick = tokio::time::interval((cfg.lease / 3).max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            for (path, bytes) in &files {
                let touched = std::fs::File::options()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                if touched.is_err() {
                    if let Err(e) = write_atomically(path, bytes) {
                        tracing::warn!(file = %path.display(), "discovery: cannot renew: {e}");
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = refresh => {}
        _ = stop => {}
    }
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(paths)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
