//! The router's own figures, read from its Prometheus `/metrics` before and after a run.
//!
//! kvrouter's frontend exposes `kvrouter_router_predicted_cached_tokens_total` and
//! `kvrouter_router_routed_input_tokens_total` (predicted hit rate = Δ first / Δ second) and the
//! histogram `kvrouter_router_overhead_seconds{stage=…}` (stages `hashing`, `find_matches`,
//! `selection`, `total`; mean = Δ `_sum` / Δ `_count`, p50 interpolated in the Δ buckets).
//! Another router simply lacks them: every figure is then `None`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counter of tokens the router expected to be cached where it sent them.
pub const PREDICTED_CACHED: &str = "kvrouter_router_predicted_cached_tokens_total";
/// Counter of prompt tokens routed.
pub const ROUTED_INPUT: &str = "kvrouter_router_routed_input_tokens_total";
/// Histogram (seconds) of routing overhead per request, label `stage`.
pub const OVERHEAD: &str = "kvrouter_router_overhead_seconds";
/// Counter of requests routed to each rank, labels `worker_id`, `dp_rank`.
pub const DECISIONS: &str = "kvrouter_router_decisions_total";
/// The overhead stages reported.
pub const STAGES: [&str; 4] = ["hashing", "find_matches", "selection", "total"];

/// One series: its sorted `(label, value)` pairs and its sample value.
type Series = (Vec<(String, String)>, f64);

/// One parsed exposition: metric name → its series. Label values are kept with their escapes
/// unresolved (enough for matching).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples(BTreeMap<String, Vec<Series>>);

impl Samples {
    /// Parse Prometheus text exposition format (comments and malformed lines are skipped).
    pub fn parse(text: &str) -> Samples {
        let mut out: BTreeMap<String, Vec<Series>> = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, rest) = match line.find('{') {
                Some(open) => {
                    let Some(close) = line[open..].rfind('}').map(|c| open + c) else {
                        continue;
                    };
                    (
                        &line[..open],
                        parse_labels(&line[open + 1..close]),
                        &line[close + 1..],
                    )
                }
                None => match line.split_once(char::is_whitespace) {
                    Some((n, r)) => (n, Vec::new(), r),
                    None => continue,
                },
            };
            // Value, then an optional timestamp.
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => match v.parse::<f64>() {
                    Ok(x) => x,
                    Err(_) => continue,
                },
            };
            out.entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        Samples(out)
    }

    /// Sum of metric `name` over the series whose labels include every `(key, value)` of
    /// `filter`. `None` when no series matches.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let series = self.0.get(name)?;
        let mut found = false;
        let mut total = 0.0;
        for (labels, v) in series {
            if filter
                .iter()
                .all(|(k, want)| labels.iter().any(|(lk, lv)| lk == k && lv == want))
            {
                found = true;
                total += v;
            }
        }
        found.then_some(total)
    }

    /// Every series of metric `name`: its sorted labels and value.
    pub fn series(&self, name: &str) -> impl Iterator<Item = &Series> {
        self.0.get(name).into_iter().flatten()
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_string();
        let after = rest[eq + 1..].trim_start();
        let Some(body) = after.strip_prefix('"') else {
            break;
        };
        // Find the closing quote, skipping escaped characters.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in body.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else { break };
        out.push((key, body[..end].to_string()));
        rest = &body[end + 1..];
    }
    out.sort();
    out
}

/// Router figures over one run (deltas between two scrapes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouterFigures {
    /// Δ predicted cached tokens / Δ routed input tokens, 0–1.
    pub predicted_hit_rate: Option<f64>,
    /// Mean routing overhead per request and stage, µs (`hashing`, `find_matches`,
    /// `selection`, `total`; stages the router does not report are absent).
    pub overhead_us: BTreeMap<String, f64>,
    /// Median routing overhead per stage, µs, from the histogram's buckets as Prometheus's
    /// `histogram_quantile(0.5, …)` reads them (linear inside the bucket holding the median).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overhead_p50_us: BTreeMap<String, f64>,
    /// Requests routed to each rank over the run (`kvrouter_router_decisions_total`), keyed
    /// by worker id (`id:rank` when the dp rank is not 0); empty when not exposed.
    pub requests_per_worker: BTreeMap<String, u64>,
}

impl RouterFigures {
    /// Figures between scrapes `before` and `after` (`before` may be empty: a fresh router).
    /// `None` when the router exposes none of the metrics.
    pub fn between(before: &Samples, after: &Samples) -> Option<RouterFigures> {
        let delta = |name: &str, filter: &[(&str, &str)]| -> Option<f64> {
            let a = after.sum(name, filter)?;
            Some(a - before.sum(name, filter).unwrap_or(0.0))
        };
        let predicted_hit_rate = match (delta(PREDICTED_CACHED, &[]), delta(ROUTED_INPUT, &[])) {
            (Some(c), Some(t)) if t > 0.0 => Some(c / t),
            _ => None,
        };
        let mut overhead_us = BTreeMap::new();
        for stage in STAGES {
            let f = [("stage", stage)];
            let sum = delta(&format!("{OVERHEAD}_sum"), &f);
            let count = delta(&format!("{OVERHEAD}_count"), &f);
            if let (Some(s), Some(c)) = (sum, count) {
                if c > 0.0 {
                    overhead_us.insert(stage.to_string(), s / c * 1e6);
                }
            }
        }
        let mut overhead_p50_us = BTreeMap::new();
        for stage in STAGES {
            let mut buckets: Vec<(f64, f64)> = after
                .series(&format!("{OVERHEAD}_bucket"))
                .filter(|(l, _)| l.iter().any(|(k, v)| k == "stage" && v == stage))
                .filter_map(|(l, v)| {
                    let le = l.iter().find(|(k, _)| k == "le")?.1.as_str();
                    let bound = match le {
                        "+Inf" => f64::INFINITY,
                        b => b.parse().ok()?,
                    };
                    let f = [("stage", stage), ("le", le)];
                    let was = before.sum(&format!("{OVERHEAD}_bucket"), &f);
                    Some((bound, v - was.unwrap_or(0.0)))
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if let Some(q) = histogram_quantile(0.5, &buckets) {
                overhead_p50_us.insert(stage.to_string(), q * 1e6);
            }
        }
        let mut requests_per_worker = BTreeMap::new();
        for (labels, v) in after.series(DECISIONS) {
            let get = |k: &str| {
                labels
                    .iter()
                    .find(|(lk, _)| lk == k)
                    .map(|(_, v)| v.as_str())
            };
            let filter: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let d = v - before.sum(DECISIONS, &filter).unwrap_or(0.0);
            let key = match (get("worker_id"), get("dp_rank")) {
                (Some(w), Some("0") | None) => w.to_string(),
                (Some(w), Some(r)) => format!("{w}:{r}"),
                (None, _) => continue,
            };
            *requests_per_worker.entry(key).or_insert(0) += d.max(0.0).round() as u64;
        }
        (predicted_hit_rate.is_some() || !overhead_us.is_empty() || !requests_per_worker.is_empty())
            .then_some(RouterFigures {
                predicted_hit_rate,
                overhead_us,
                overhead_p50_us,
                requests_per_worker,
            })
    }
}

/// Quantile `q` (0–1) of a histogram given as cumulative `(upper bound, count)` buckets sorted
/// by bound, the last `+Inf`: Prometheus's `histogram_quantile` (linear interpolation inside
/// the bucket that holds rank `q × total`, from 0 for the first bucket; the largest finite
/// bound when the rank falls in `+Inf`). `None` without observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    // Also None for a NaN count.
    let total = buckets.last()?.1;
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let i = buckets.iter().position(|&(_, c)| c >= rank)?;
    let (hi, c_hi) = buckets[i];
    if hi.is_infinite() {
        return buckets[..i].last().map(|b| b.0);
    }
    let (lo, c_lo) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    if c_hi <= c_lo {
        return Some(hi);
    }
    Some(lo + (hi - lo) * (rank - c_lo) / (c_hi - c_lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_deltas_of_the_named_series() {
        let before = Samples::parse(
            "# HELP x\n# TYPE kvrouter_router_predicted_cached_tokens_total counter\n\
             kvrouter_router_predicted_cached_tokens_total 100\n\
             kvrouter_router_routed_input_tokens_total{model=\"m\"} 400\n\
             kvrouter_router_overhead_seconds_sum{stage=\"total\"} 0.5\n\
             kvrouter_router_overhead_seconds_count{stage=\"total\"} 10\n\
             kvrouter_router_decisions_total{worker_id=\"7\",dp_rank=\"0\"} 5\n",
        );
        let after = Samples::parse(
            "kvrouter_router_predicted_cached_tokens_total 400\n\
             kvrouter_router_routed_input_tokens_total{model=\"m\"} 1000 1712345678\n\
             kvrouter_router_overhead_seconds_sum{stage=\"total\"} 0.5004\n\
             kvrouter_router_overhead_seconds_count{stage=\"total\"} 12\n\
             kvrouter_router_overhead_seconds_sum{stage=\"hashing\",le=\"a,b\\\"c\"} 2e-5\n\
             kvrouter_router_overhead_seconds_count{stage=\"hashing\",le=\"a,b\\\"c\"} 2\n\
             kvrouter_router_overhead_seconds_bucket{stage=\"total\",le=\"+Inf\"} +Inf\n\
             kvrouter_router_decisions_total{dp_rank=\"0\",worker_id=\"7\"} 12\n\
             kvrouter_router_decisions_total{dp_rank=\"1\",worker_id=\"9\"} 3\n\
             garbage line here\n",
        );
        let f = RouterFigures::between(&before, &after).unwrap();
        assert_eq!(f.predicted_hit_rate, Some(0.5));
        assert!((f.overhead_us["total"] - 200.0).abs() < 1e-6, "{:?}", f);
        assert!((f.overhead_us["hashing"] - 10.0).abs() < 1e-6, "{:?}", f);
        assert!(!f.overhead_us.contains_key("selection"));
        let per_worker: Vec<(&str, u64)> = f
            .requests_per_worker
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(per_worker, vec![("7", 7), ("9:1", 3)]);
        assert_eq!(
            after.sum("kvrouter_router_overhead_seconds_bucket", &[("le", "+Inf")]),
            Some(f64::INFINITY)
        );
        // No buckets for the stages above but +Inf's infinite count: no median.
        assert!(f.overhead_p50_us.is_empty(), "{:?}", f);
        // A router without these metrics (a mock worker's vllm:* only).
        let vllm = Samples::parse("vllm:num_requests_running{model_name=\"m\"} 0\n");
        assert_eq!(RouterFigures::between(&Samples::default(), &vllm), None);
    }

    #[test]
    fn the_median_is_interpolated_in_the_delta_buckets() {
        let b = |c: [u32; 4]| {
            Samples::parse(&format!(
                "kvrouter_router_overhead_seconds_bucket{{stage=\"total\",le=\"0.00001\"}} {}\n\
                 kvrouter_router_overhead_seconds_bucket{{stage=\"total\",le=\"0.00003\"}} {}\n\
                 kvrouter_router_overhead_seconds_bucket{{stage=\"total\",le=\"0.00005\"}} {}\n\
                 kvrouter_router_overhead_seconds_bucket{{stage=\"total\",le=\"+Inf\"}} {}\n\
                 kvrouter_router_overhead_seconds_sum{{stage=\"total\"}} 1\n\
                 kvrouter_router_overhead_seconds_count{{stage=\"total\"}} {}\n",
                c[0], c[1], c[2], c[3], c[3]
            ))
        };
        // Before: 100 fast calls. The run adds 10 under 10 µs, 30 in 10–30 µs, 60 in 30–50 µs:
        // rank 50 is 10 into the last finite bucket's 60.
        let f = RouterFigures::between(&b([100, 100, 100, 100]), &b([110, 140, 200, 200])).unwrap();
        let p50 = f.overhead_p50_us["total"];
        assert!((p50 - (30.0 + 20.0 * 10.0 / 60.0)).abs() < 1e-6, "{p50}");
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 1.0), (f64::INFINITY, 5.0)]),
            Some(1.0)
        );
        assert_eq!(
            histogram_quantile(0.5, &[(2.0, 4.0), (f64::INFINITY, 4.0)]),
            Some(1.0)
        );
    }
}
