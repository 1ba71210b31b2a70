//! Router pools — hierarchical routing (`--pool NAME=URL`, repeatable): each pool is a
//! `kvrouter router` in front of its own workers, and the frontend chooses the pool for each
//! request, then lets that pool's router choose the worker:
//!
//! * `--pool-policy probe` — ask every pool's `best_worker_id`, query-only and all at once;
//!   the pool whose choice has the most cached blocks of the prompt wins, ties going to the
//!   least loaded (the lowest KV cost of its choice, spec §6.2; then the order given). Pools
//!   that fail to answer are left out. This is the reference documentation's "hierarchical
//!   router probing" as a product.
//! * `--pool-policy isl` — by prompt length: `--pool-isl NAME=MIN:MAX` gives each pool the
//!   prompts of `MIN ≤ tokens < MAX` (`MAX` empty: no bound); no probe.
//!
//! The chosen pool then books the request under its id ([`RemoteRouter::book`]) and the
//! frontend sends the chosen worker the request itself, so every OpenAI field reaches it.

use std::str::FromStr;
use std::sync::Arc;

use super::lease::{Lease, Started};
use super::request::ParsedRequest;
use super::AppState;
use crate::error::{worker_error, ApiError};
use crate::router_service::api::BestWorker;
use crate::workers::client::WorkerClient;
use crate::workers::remote_router::{Booked, RemoteInput, RemoteRouter};

/// How the frontend chooses among pools.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolPolicy {
    /// The pool with the most cached blocks of the prompt, ties to the least loaded.
    #[default]
    Probe,
    /// The pool whose `--pool-isl` range holds the prompt's length.
    Isl,
}

/// `--pool NAME=URL` (or `NAME=ENDPOINT`: the replicas of a router registered in discovery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolArg {
    pub name: String,
    pub url: String,
}

impl FromStr for PoolArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected NAME=URL"))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "`{s}`: a pool name is letters, digits, `-`, `_` or `.`"
            ));
        }
        if !url.starts_with("http://") {
            crate::workers::spec::validate_endpoint_name(url).map_err(|_| {
                format!("`{s}`: give an http:// URL or a namespace.component.endpoint name")
            })?;
        }
        Ok(Self {
            name: name.into(),
            url: url.into(),
        })
    }
}

/// `--pool-isl NAME=MIN:MAX`: prompts of `MIN ≤ tokens < MAX` tokens (`MAX` empty: no bound).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IslRange {
    pub name: String,
    pub min: usize,
    pub max: Option<usize>,
}

impl FromStr for IslRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected NAME=MIN:MAX in tokens, e.g. long=4096:");
        let (name, range) = s.split_once('=').ok_or_else(bad)?;
        let (min, max) = range.split_once(':').ok_or_else(bad)?;
        let min = if min.is_empty() {
            0
        } else {
            min.parse().map_err(|_| bad())?
        };
        let max = if max.is_empty() {
            None
        } else {
            Some(max.parse().map_err(|_| bad())?)
        };
        if max.is_some_and(|m| m <= min) {
            return Err(format!("`{s}`: MAX must be above MIN"));
        }
        Ok(Self {
            name: name.trim().into(),
            min,
            max,
        })
    }
}

impl IslRange {
    fn holds(&self, isl: usize) -> bool {
        isl >= self.min && self.max.is_none_or(|m| isl < m)
    }
}

/// One pool.
struct Pool {
    router: Arc<RemoteRouter>,
    isl: Option<IslRange>,
}

/// The pools and how to choose among them.
pub struct Pools {
    pools: Vec<Pool>,
    policy: PoolPolicy,
}

impl Pools {
    /// The pools of `--pool`, `--pool-policy` and `--pool-isl`. Errors: a name given twice,
    /// an ISL range for an unknown pool, `isl` without a range for some pool, or overlapping
    /// ranges.
    pub fn new(
        pools: &[PoolArg],
        policy: PoolPolicy,
        ranges: &[IslRange],
        client: &WorkerClient,
    ) -> Result<Self, String> {
        let mut out: Vec<Pool> = Vec::new();
        for p in pools {
            if out.iter().any(|o| *o.router.name == *p.name) {
                return Err(format!("pool `{}` is given twice", p.name));
            }
            out.push(Pool {
                router: RemoteRouter::new(&p.name, &p.url, client.clone()),
                isl: None,
            });
        }
        for r in ranges {
            let pool = out
                .iter_mut()
                .find(|p| *p.router.name == *r.name)
                .ok_or_else(|| format!("--pool-isl names `{}`, which no --pool gives", r.name))?;
            if pool.isl.replace(r.clone()).is_some() {
                return Err(format!("pool `{}` has two --pool-isl ranges", r.name));
            }
        }
        if policy == PoolPolicy::Isl {
            if let Some(p) = out.iter().find(|p| p.isl.is_none()) {
                return Err(format!(
                    "--pool-policy isl: pool `{}` has no --pool-isl range",
                    p.router.name
                ));
            }
            let mut sorted: Vec<&IslRange> = out.iter().filter_map(|p| p.isl.as_ref()).collect();
            sorted.sort_by_key(|r| r.min);
            for w in sorted.windows(2) {
                if w[0].max.is_none_or(|m| m > w[1].min) {
                    return Err(format!(
                        "--pool-isl ranges of `{}` and `{}` overlap",
                        w[0].name, w[1].name
                    ));
                }
            }
        }
        Ok(Self { pools: out, policy })
    }

    /// `(healthy, configured)` pools: a pool is healthy when one of its router's replicas
    /// answers `/health` 2xx within a second (it has a healthy worker).
    pub async fn health(&self) -> (usize, usize) {
        let checks = self.pools.iter().map(|p| p.router.healthy());
        let up = futures::future::join_all(checks).await;
        (up.into_iter().filter(|&h| h).count(), self.pools.len())
    }

    /// The pools' routers (to follow their replicas in discovery).
    pub fn routers(&self) -> impl Iterator<Item = &Arc<RemoteRouter>> {
        self.pools.iter().map(|p| &p.router)
    }

    /// The pool for a prompt of `tokens` tokens, by the policy.
    /// Errors: 400 when no ISL range holds the prompt; with `probe`, the first pool's error
    /// when none answered (503 no worker / all busy, 502 unreachable).
    async fn choose(&self, input: &RemoteInput, tokens: usize) -> Result<&Pool, ApiError> {
        match self.policy {
            PoolPolicy::Isl => self
                .pools
                .iter()
                .find(|p| p.isl.as_ref().is_some_and(|r| r.holds(tokens)))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "no router pool takes prompts of {tokens} tokens (--pool-isl)"
                    ))
                }),
            PoolPolicy::Probe => {
                let answers =
                    futures::future::join_all(self.pools.iter().map(|p| p.router.query(input)))
                        .await;
                let mut first_err = None;
                let mut best: Option<(usize, BestWorker)> = None;
                for (i, a) in answers.into_iter().enumerate() {
                    match a {
                        Ok(b) => {
                            if best.as_ref().is_none_or(|(_, cur)| better(&b, cur)) {
                                best = Some((i, b));
                            }
                        }
                        Err(e) => {
                            tracing::debug!(pool = %self.pools[i].router.name, "probe failed: {}", e.message);
                            first_err.get_or_insert(e);
                        }
                    }
                }
                match best {
                    Some((i, _)) => Ok(&self.pools[i]),
                    None => Err(first_err
                        .unwrap_or_else(|| ApiError::unavailable("no router pool is configured"))),
                }
            }
        }
    }
}

/// Probe order: more cached blocks, then a lower cost (an unknown cost ranks last).
fn better(a: &BestWorker, b: &BestWorker) -> bool {
    if a.overlap_blocks != b.overlap_blocks {
        return a.overlap_blocks > b.overlap_blocks;
    }
    a.cost.unwrap_or(f64::INFINITY) < b.cost.unwrap_or(f64::INFINITY)
}

/// Attempts per request when the chosen worker turns out unreachable (the pool's router
/// learns it from its health check; meanwhile it may choose another).
const MAX_ATTEMPTS: usize = 3;

/// Choose a pool, book the request there, and start it on the worker the pool chose.
pub async fn dispatch(
    s: &Arc<AppState>,
    pools: &Pools,
    req: &ParsedRequest,
    request_id: &str,
) -> Result<Started, ApiError> {
    let input = RemoteInput::new(
        &req.tokens,
        req.overrides.as_ref(),
        req.cache_salt.as_deref(),
    );
    let mut last = None;
    for attempt in 0..MAX_ATTEMPTS {
        let pool = pools.choose(&input, req.tokens.len()).await?;
        // A fresh id per attempt: the previous attempt's free may still be on its way.
        let Booked { best, spec, lease } = pool
            .router
            .book(&input, &format!("{request_id}.{attempt}"))
            .await?;
        let model = spec.model.as_deref().unwrap_or(&s.model_name);
        match s
            .client
            .generate(
                &spec.url,
                spec.rank_pin(best.dp_rank),
                req.worker_body(model),
            )
            .await
        {
            Ok(stream) => {
                return Ok(Started {
                    lease: Lease::Remote(lease),
                    stream,
                    prefill_worker: None,
                    pool: Some(pool.router.name.clone()),
                })
            }
            Err(e) if e.worker_gone() => {
                tracing::warn!(request_id, pool = %pool.router.name, worker_id = best.worker_id,
                    "worker unreachable, asking the pool again: {e}");
                last = Some(worker_error(&e, request_id, best.worker_id));
            }
            Err(e) => return Err(worker_error(&e, request_id, best.worker_id)),
        }
    }
    Err(last.unwrap_or_else(|| ApiError::unavailable("no pool worker could take the request")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(overlap: u32, cost: Option<f64>) -> BestWorker {
        BestWorker {
            worker_id: 1,
            dp_rank: 0,
            overlap_blocks: overlap,
            cached_tokens: 0,
            cost,
            registration: None,
        }
    }

    #[test]
    fn probe_prefers_overlap_then_the_lower_cost() {
        assert!(better(&bw(3, Some(9.0)), &bw(2, Some(1.0))));
        assert!(!better(&bw(2, Some(1.0)), &bw(3, Some(9.0))));
        assert!(better(&bw(2, Some(1.0)), &bw(2, Some(1.5))));
        assert!(
            !better(&bw(2, Some(1.0)), &bw(2, Some(1.0))),
            "ties keep the first"
        );
        assert!(better(&bw(2, Some(5.0)), &bw(2, None)));
    }

    #[test]
    fn flags_parse_and_bad_ones_are_refused() {
        let p: PoolArg = "short=http://127.0.0.1:8090".parse().unwrap();
        assert_eq!(
            (p.name.as_str(), p.url.as_str()),
            ("short", "http://127.0.0.1:8090")
        );
        for bad in [
            "short",
            "=http://x",
            "a b=http://x",
            "x=https://y",
            "x=ftp://y",
        ] {
            assert!(bad.parse::<PoolArg>().is_err(), "{bad}");
        }
        let r: IslRange = "long=4096:".parse().unwrap();
        assert_eq!((r.min, r.max), (4096, None));
        assert!(r.holds(4096) && r.holds(1 << 20) && !r.holds(4095));
        let r: IslRange = "short=:4096".parse().unwrap();
        assert!(r.holds(0) && r.holds(4095) && !r.holds(4096));
        for bad in ["x=1", "x=5:5", "x=9:3", "x=a:b", "4096:"] {
            assert!(bad.parse::<IslRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pool_sets_are_checked() {
        let c = WorkerClient::new(std::time::Duration::from_secs(1));
        let pools: Vec<PoolArg> = ["a=http://127.0.0.1:1", "b=http://127.0.0.1:2"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let r = |s: &[&str]| {
            s.iter()
                .map(|x| x.parse().unwrap())
                .collect::<Vec<IslRange>>()
        };
        assert!(Pools::new(&pools, PoolPolicy::Probe, &[], &c).is_ok());
        let twice = [pools[0].clone(), pools[0].clone()];
        assert!(Pools::new(&twice, PoolPolicy::Probe, &[], &c).is_err());
        assert!(Pools::new(&pools, PoolPolicy::Isl, &r(&["a=:10"]), &c).is_err());
        assert!(Pools::new(&pools, PoolPolicy::Isl, &r(&["a=:10", "c=10:"]), &c).is_err());
        assert!(Pools::new(&pools, PoolPolicy::Isl, &r(&["a=:11", "b=10:"]), &c).is_err());
        assert!(Pools::new(&pools, PoolPolicy::Isl, &r(&["a=:10", "b=10:"]), &c).is_ok());
        assert!(Pools::new(&pools, PoolPolicy::Isl, &r(&["a=:10", "a=10:"]), &c).is_err());
    }
}
