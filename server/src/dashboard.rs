//! The live dashboard on the admin port.
//!
//! * `GET /dashboard` — one self-contained HTML page (inline CSS and JS, no external asset:
//!   it works offline) that polls the two JSON routes below every 1.5 s and draws the fleet
//!   table and the charts (SVG, drawn by hand). Served without a token: the page holds no data.
//!   Its data routes follow the admin API's bearer rule; with `--admin-token` open
//!   `/dashboard#token=TOKEN` — the fragment never leaves the browser (not sent to the server,
//!   not in access logs); the page keeps it in the tab's `sessionStorage`, drops it from the
//!   address bar and sends it as `Authorization: Bearer` on its fetches (or asks for it on a
//!   401).
//! * `GET /v1/dashboard` — the fleet's totals now and a ring of per-second samples of the last
//!   [`WINDOW_SECS`] seconds (request rate, mean TTFT, predicted and reported KV hit rate, load),
//!   computed from the counters and histograms in [`Metrics`] by a 1 Hz sampler; memory is
//!   bounded by the ring's length. The per-worker rows come from `GET /v1/workers`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;

use crate::frontend::probes::snapshot;
use crate::metrics::Metrics;
use crate::workers::fleet::Fleet;

/// Seconds of history the ring keeps (one sample a second).
pub const WINDOW_SECS: usize = 600;

/// The page, embedded at build time.
pub const PAGE: &str = include_str!("dashboard.html");

/// `GET /dashboard`: the page, with a Content-Security-Policy that lets it run its inline
/// script and style and talk to this origin only (nothing else can load, even if data were
/// ever mistaken for markup).
pub fn page() -> axum::response::Response {
    use axum::http::header;
    use axum::response::IntoResponse;
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// Counter and histogram totals read from [`Metrics`] at one instant.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    /// Requests finished (any status): the request-duration histogram's count.
    requests: u64,
    ttft_sum: f64,
    ttft_count: u64,
    input_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
    routed_input_tokens: u64,
    predicted_cached_tokens: u64,
}

impl Totals {
    fn read(m: &Metrics, hists: &Hists) -> Self {
        let h = hists.read();
        Self {
            requests: h.duration_count,
            ttft_sum: h.ttft_sum,
            ttft_count: h.ttft_count,
            input_tokens: m.input_tokens.get(),
            cached_tokens: m.cached_tokens.get(),
            output_tokens: m.output_tokens.get(),
            routed_input_tokens: m.routed_input_tokens.get(),
            predicted_cached_tokens: m.predicted_cached_tokens.get(),
        }
    }
}

/// The TTFT and request-duration histograms' sums and counts. `prometheus-client` reads them
/// only through an encoder, so a private registry holds handles to the same two histograms
/// (clones share their state) and is encoded and parsed: a few dozen lines, once a second.
#[derive(Debug)]
struct Hists(prometheus_client::registry::Registry);

#[derive(Clone, Copy, Debug, Default)]
struct HistTotals {
    ttft_sum: f64,
    ttft_count: u64,
    duration_count: u64,
}

impl Hists {
    fn of(m: &Metrics) -> Self {
        let mut r = prometheus_client::registry::Registry::default();
        r.register("ttft", "", m.ttft.clone());
        r.register("duration", "", m.duration.clone());
        Self(r)
    }

    fn read(&self) -> HistTotals {
        let mut text = String::new();
        let mut h = HistTotals::default();
        if prometheus_client::encoding::text::encode(&mut text, &self.0).is_err() {
            return h;
        }
        for line in text.lines() {
            let Some((name, v)) = line.split_once(' ') else {
                continue;
            };
            match name {
                "ttft_sum" => h.ttft_sum = v.parse().unwrap_or(0.0),
                "ttft_count" => h.ttft_count = v.parse().unwrap_or(0),
                "duration_count" => h.duration_count = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        h
    }
}

/// One second of the fleet, as the charts show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Unix time, seconds, at the end of the second.
    pub t: f64,
    /// Requests finished per second.
    pub requests_per_s: f64,
    /// Generated tokens per second.
    pub output_tokens_per_s: f64,
    /// Mean time to first token of the first tokens of that second, seconds (none: no first
    /// token in it).
    pub ttft_mean_s: Option<f64>,
    /// Prompt tokens the router expected the chosen workers to hold / prompt tokens routed.
    pub predicted_hit_rate: Option<f64>,
    /// Prompt tokens the workers reported cached / prompt tokens of finished requests.
    pub reported_hit_rate: Option<f64>,
    /// Requests being served by the frontend.
    pub inflight: i64,
    /// Requests booked on the workers, all ranks.
    pub active_requests: u64,
    /// Uncached prompt tokens in prefill, all ranks.
    pub active_prefill_tokens: u64,
    /// KV blocks booked by active requests, all ranks.
    pub active_decode_blocks: u64,
    /// Ranks in the routing set.
    pub healthy_ranks: u64,
    /// `(block, rank)` entries in the KV index.
    pub index_entries: u64,
}

/// `v` to `1/scale` (the series' payload: a 10-minute ring polled every 1.5 s).
fn round(v: f64, scale: f64) -> f64 {
    (v * scale).round() / scale
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

impl Sample {
    fn between(prev: &Totals, now: &Totals, secs: f64, t: f64) -> Self {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let secs = secs.max(1e-3);
        let ttft_n = d(prev.ttft_count, now.ttft_count);
        Self {
            t,
            requests_per_s: d(prev.requests, now.requests) as f64 / secs,
            output_tokens_per_s: d(prev.output_tokens, now.output_tokens) as f64 / secs,
            ttft_mean_s: (ttft_n > 0)
                .then(|| (now.ttft_sum - prev.ttft_sum).max(0.0) / ttft_n as f64),
            predicted_hit_rate: ratio(
                d(prev.predicted_cached_tokens, now.predicted_cached_tokens),
                d(prev.routed_input_tokens, now.routed_input_tokens),
            ),
            reported_hit_rate: ratio(
                d(prev.cached_tokens, now.cached_tokens),
                d(prev.input_tokens, now.input_tokens),
            ),
            ..Default::default()
        }
    }
}

/// A bounded ring of samples: pushing past `cap` drops the oldest.
#[derive(Debug)]
pub struct Ring {
    cap: usize,
    samples: VecDeque<Sample>,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            samples: VecDeque::with_capacity(cap.max(1)),
        }
    }

    pub fn push(&mut self, s: Sample) {
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }
}

/// Aborts the sampler when the admin API (which owns it) is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The dashboard's state: the ring and the task that fills it.
#[derive(Debug)]
pub struct Dashboard {
    ring: Arc<Mutex<Ring>>,
    metrics: Arc<Metrics>,
    hists: Arc<Hists>,
    _sampler: Option<AbortOnDrop>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Dashboard {
    /// Start sampling `metrics` and `fleet` once a second (when called inside a Tokio runtime;
    /// outside one the ring stays empty). The sampler stops when the `Dashboard` is dropped.
    pub fn start(fleet: Arc<Fleet>, metrics: Arc<Metrics>) -> Self {
        let ring = Arc::new(Mutex::new(Ring::new(WINDOW_SECS)));
        let hists = Arc::new(Hists::of(&metrics));
        let sampler = tokio::runtime::Handle::try_current().ok().map(|h| {
            let (ring, metrics, hists) = (ring.clone(), metrics.clone(), hists.clone());
            AbortOnDrop(h.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut prev = (tokio::time::Instant::now(), Totals::read(&metrics, &hists));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let now = (tokio::time::Instant::now(), Totals::read(&metrics, &hists));
                    let secs = now.0.duration_since(prev.0).as_secs_f64();
                    let mut s = Sample::between(&prev.1, &now.1, secs, unix_now());
                    fill_fleet(&mut s, &fleet, &metrics);
                    ring.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                    prev = now;
                }
            }))
        });
        Self {
            ring,
            metrics,
            hists,
            _sampler: sampler,
        }
    }

    /// `GET /v1/dashboard`'s body: `window_secs`, `now` (the fleet this instant, same fields
    /// as a sample without the rates), `indexed_blocks` (worker id → blocks it holds in the
    /// index, all ranks and tiers) and `series` (one array per [`Sample`] field, oldest
    /// first; `null` where a rate had nothing to divide by).
    pub fn json(&self, fleet: &Fleet) -> serde_json::Value {
        let mut now = Sample {
            t: unix_now(),
            ..Default::default()
        };
        fill_fleet(&mut now, fleet, &self.metrics);
        // Blocks each worker holds in the index, all ranks and tiers, by worker id.
        let workers = fleet.registry.all();
        let indexed: serde_json::Map<String, serde_json::Value> = fleet
            .router
            .index()
            .with(|t| {
                workers
                    .iter()
                    .map(|w| {
                        let n: usize = w.spec.ranks().map(|r| t.worker_blocks(r)).sum();
                        (w.id().to_string(), json!(n))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let col = |f: fn(&Sample) -> serde_json::Value| -> Vec<serde_json::Value> {
            ring.iter().map(f).collect()
        };
        json!({
            "window_secs": WINDOW_SECS,
            "indexed_blocks": indexed,
            "now": {
                "t": now.t,
                "inflight": now.inflight,
                "active_requests": now.active_requests,
                "active_prefill_tokens": now.active_prefill_tokens,
                "active_decode_blocks": now.active_decode_blocks,
                "healthy_ranks": now.healthy_ranks,
                "index_entries": now.index_entries,
                "event_stream_lag": self.metrics.event_plane.lag.get(),
                "requests_total": self.hists.read().duration_count,
            },
            "series": {
                "t": col(|s| json!(round(s.t, 1e3))),
                "requests_per_s": col(|s| json!(round(s.requests_per_s, 1e3))),
                "output_tokens_per_s": col(|s| json!(round(s.output_tokens_per_s, 1e3))),
                "ttft_mean_s": col(|s| json!(s.ttft_mean_s.map(|v| round(v, 1e6)))),
                "predicted_hit_rate": col(|s| json!(s.predicted_hit_rate.map(|v| round(v, 1e4)))),
                "reported_hit_rate": col(|s| json!(s.reported_hit_rate.map(|v| round(v, 1e4)))),
                "inflight": col(|s| json!(s.inflight)),
                "active_requests": col(|s| json!(s.active_requests)),
                "active_prefill_tokens": col(|s| json!(s.active_prefill_tokens)),
                "active_decode_blocks": col(|s| json!(s.active_decode_blocks)),
                "healthy_ranks": col(|s| json!(s.healthy_ranks)),
                "index_entries": col(|s| json!(s.index_entries)),
            },
        })
    }
}

/// The fleet's load, health and index size into `s`.
fn fill_fleet(s: &mut Sample, fleet: &Fleet, metrics: &Metrics) {
    let snap = snapshot(fleet);
    s.inflight = metrics.inflight.get();
    s.index_entries = snap.index_entries;
    for r in &snap.ranks {
        s.active_requests += r.active_requests;
        s.active_prefill_tokens += r.active_prefill_tokens;
        s.active_decode_blocks += r.active_decode_blocks;
        s.healthy_ranks += u64::from(r.health == "healthy");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_cap_samples() {
        let mut r = Ring::new(3);
        assert!(r.is_empty());
        for i in 0..10 {
            r.push(Sample {
                t: i as f64,
                ..Default::default()
            });
        }
        assert_eq!(r.len(), 3);
        let ts: Vec<f64> = r.iter().map(|s| s.t).collect();
        assert_eq!(ts, [7.0, 8.0, 9.0]);
        assert!(r.samples.capacity() < 16);
    }

    #[test]
    fn sample_rates_from_counter_deltas() {
        let m = Metrics::new();
        let h = Hists::of(&m);
        let a = Totals::read(&m, &h);
        for _ in 0..4 {
            m.duration.observe(0.5);
        }
        m.ttft.observe(0.1);
        m.ttft.observe(0.3);
        m.input_tokens.inc_by(100);
        m.cached_tokens.inc_by(25);
        m.routed_input_tokens.inc_by(200);
        m.predicted_cached_tokens.inc_by(100);
        m.output_tokens.inc_by(40);
        let b = Totals::read(&m, &h);
        let s = Sample::between(&a, &b, 2.0, 42.0);
        assert_eq!(s.t, 42.0);
        assert_eq!(s.requests_per_s, 2.0);
        assert_eq!(s.output_tokens_per_s, 20.0);
        assert!((s.ttft_mean_s.unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(s.reported_hit_rate, Some(0.25));
        assert_eq!(s.predicted_hit_rate, Some(0.5));
        // Nothing happened: no rate to divide.
        let idle = Sample::between(&b, &b, 1.0, 43.0);
        assert_eq!(idle.requests_per_s, 0.0);
        assert_eq!(idle.ttft_mean_s, None);
        assert_eq!(idle.reported_hit_rate, None);
    }

    #[test]
    fn page_is_self_contained() {
        // No external asset: everything inline, nothing fetched but the admin API's own routes.
        // (The SVG namespace is a name, not a fetch.)
        let page = PAGE.replace("http://www.w3.org/2000/svg", "");
        for bad in [
            "http://", "https://", "//cdn", "<link", "src=", "@import", "url(",
        ] {
            assert!(!page.contains(bad), "the page references {bad}");
        }
        // Data goes into the DOM as text, never as markup.
        assert!(!PAGE.contains("innerHTML"));
        assert!(!PAGE.contains("outerHTML"));
        assert!(!PAGE.contains("insertAdjacentHTML"));
        assert!(!PAGE.contains("document.write"));
    }
}
