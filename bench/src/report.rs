//! Reports of a benchmark: a table for stdout, `results.json`, `report.md`, `requests.jsonl` and
//! three SVG plots (`ttft_cdf.svg`, `hit_rate.svg`, `throughput.svg`, drawn with `plotters`).

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bound::Bound;
use crate::client::RequestRecord;
use crate::runner::RunReport;
use crate::stats::Summary;

/// Shape of the workload that was sent (same for every run).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// `prefix` or `mooncake`.
    pub kind: String,
    /// Requests in the workload.
    pub requests: usize,
    /// Prompt lengths, tokens.
    pub isl: Option<Summary>,
    /// Output lengths asked (`max_tokens`).
    pub osl: Option<Summary>,
    /// How requests were released.
    pub schedule: String,
}

/// Everything `results.json` holds: `config` (every flag), `workload`, `runs` (one per mode)
/// and `bound` (pooled-LRU and infinite-cache hit rates).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// The full configuration, as given (flags and the command line).
    pub config: serde_json::Value,
    /// What was sent.
    pub workload: WorkloadInfo,
    /// One entry per mode / endpoint, in run order.
    pub runs: Vec<RunReport>,
    /// What one cache of the fleet's total size would hit.
    pub bound: Bound,
}

fn ms(s: &Option<Summary>, f: impl Fn(&Summary) -> f64) -> String {
    s.as_ref().map_or("–".into(), |s| format!("{:.1}", f(s)))
}

fn rate(x: Option<f64>) -> String {
    x.map_or("–".into(), |x| format!("{x:.3}"))
}

fn overhead(r: &RunReport) -> String {
    r.router_overhead_us
        .as_ref()
        .and_then(|m| m.get("total"))
        .map_or("–".into(), |us| format!("{us:.1}"))
}

/// A plain-text table of the runs and the bound (for stdout).
pub fn table(res: &Results) -> String {
    let mut s = String::new();
    let w = &res.workload;
    s.push_str(&format!(
        "{} workload: {} requests, {}\n\n",
        w.kind, w.requests, w.schedule
    ));
    s.push_str(&format!(
        "{:<14} {:>6} {:>6} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>8} {:>7} {:>9} {:>6} {:>8}\n",
        "mode",
        "hit",
        "pred",
        "TTFT p50",
        "p90",
        "p99",
        "ITL p50",
        "p99",
        "e2e p50",
        "p99",
        "req/s",
        "out tok/s",
        "errors",
        "route µs"
    ));
    for r in &res.runs {
        s.push_str(&format!(
            "{:<14} {:>6} {:>6} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>8} {:>7.2} {:>9.0} {:>6} {:>8}\n",
            r.mode,
            rate(r.hit_rate),
            rate(r.predicted_hit_rate),
            ms(&r.ttft_ms, |s| s.p50),
            ms(&r.ttft_ms, |s| s.p90),
            ms(&r.ttft_ms, |s| s.p99),
            ms(&r.itl_ms, |s| s.p50),
            ms(&r.itl_ms, |s| s.p99),
            ms(&r.e2e_ms, |s| s.p50),
            ms(&r.e2e_ms, |s| s.p99),
            r.requests_per_s,
            r.output_tokens_per_s,
            r.errors,
            overhead(r),
        ));
    }
    let b = &res.bound;
    s.push_str(&format!(
        "\nbound: pooled LRU of {} blocks × {} tokens: hit {:.3}; infinite cache: hit {:.3}\n",
        b.capacity_blocks, b.block_size, b.pooled_lru_hit_rate, b.infinite_hit_rate
    ));
    for r in &res.runs {
        if let Some(w) = &r.requests_per_worker {
            s.push_str(&format!(
                "{} requests per worker: {}\n",
                r.mode,
                per_worker(w)
            ));
        }
    }
    for r in &res.runs {
        if let Some(h) = r.engine_hit_rate {
            s.push_str(&format!(
                "- {} engine hit rate (1 − computed / prompt tokens, every worker): {h:.3}; KV blocks transferred to decode workers: {}\n",
                r.mode,
                r.transferred_blocks.unwrap_or(0)
            ));
        }
    }
    for r in &res.runs {
        for e in &r.error_samples {
            s.push_str(&format!("{} error: {e}\n", r.mode));
        }
    }
    s
}

fn per_worker(w: &std::collections::BTreeMap<String, u64>) -> String {
    w.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Markdown report: configuration, one table row per mode plus the bound, and the plots
/// (linked as files beside it).
pub fn markdown(res: &Results) -> String {
    let mut s = String::new();
    let w = &res.workload;
    let tool = res
        .config
        .get("tool")
        .and_then(|t| t.as_str())
        .unwrap_or("kvrouter bench");
    s.push_str(&format!("# {tool}: {} workload\n\n", w.kind));
    if let Some(cmd) = res.config.get("command").and_then(|c| c.as_str()) {
        s.push_str(&format!("```sh\n{cmd}\n```\n\n"));
    }
    s.push_str(&format!("{} requests, {}", w.requests, w.schedule));
    if let (Some(i), Some(o)) = (&w.isl, &w.osl) {
        s.push_str(&format!(
            "; prompt tokens mean {:.0} (p50 {:.0}, p99 {:.0}), output tokens mean {:.0}",
            i.mean, i.p50, i.p99, o.mean
        ));
    }
    s.push_str(".\n\n");
    s.push_str(
        "| mode | hit rate | predicted hit | TTFT p50 / p90 / p99 / mean (ms) | ITL p50 / p99 (ms) \
         | e2e p50 / p99 (ms) | req/s | output tok/s | errors | routing µs |\n",
    );
    s.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for r in &res.runs {
        s.push_str(&format!(
            "| {} | {} | {} | {} / {} / {} / {} | {} / {} | {} / {} | {:.2} | {:.0} | {} | {} |\n",
            r.mode,
            rate(r.hit_rate),
            rate(r.predicted_hit_rate),
            ms(&r.ttft_ms, |s| s.p50),
            ms(&r.ttft_ms, |s| s.p90),
            ms(&r.ttft_ms, |s| s.p99),
            ms(&r.ttft_ms, |s| s.mean),
            ms(&r.itl_ms, |s| s.p50),
            ms(&r.itl_ms, |s| s.p99),
            ms(&r.e2e_ms, |s| s.p50),
            ms(&r.e2e_ms, |s| s.p99),
            r.requests_per_s,
            r.output_tokens_per_s,
            r.errors,
            overhead(r),
        ));
    }
    let b = &res.bound;
    s.push_str(&format!(
        "| *bound: one pooled LRU cache, {} blocks of {}* | {:.3} | | | | | | | | |\n",
        b.capacity_blocks, b.block_size, b.pooled_lru_hit_rate
    ));
    s.push_str(&format!(
        "| *bound: infinite cache* | {:.3} | | | | | | | | |\n\n",
        b.infinite_hit_rate
    ));
    s.push_str(if tool == "kvrouter replay" {
        "Replayed in virtual time through the mocker's engines and the router core: hit rate = \
         Σ engine-reported cached tokens / Σ prompt tokens; predicted hit = Σ cached tokens the \
         router expected / Σ routed prompt tokens; routing µs = mean wall time of the core's \
         route call. Latencies and rates are in virtual time; ITL is every gap between \
         successive tokens.\n\n"
    } else {
        "Hit rate = Σ `usage.prompt_tokens_details.cached_tokens` / Σ `usage.prompt_tokens`; \
         predicted hit and routing µs (mean, stage `total`) from the router's `/metrics` when \
         it has them. ITL is every gap between successive streamed token chunks.\n\n"
    });
    for r in &res.runs {
        if let Some(w) = &r.requests_per_worker {
            s.push_str(&format!(
                "- {} requests per worker: {}\n",
                r.mode,
                per_worker(w)
            ));
        }
    }
    for r in &res.runs {
        for e in &r.error_samples {
            s.push_str(&format!("- {} error: `{e}`\n", r.mode));
        }
    }
    s.push('\n');
    s.push_str(
        "![TTFT CDF](ttft_cdf.svg)\n![hit rate](hit_rate.svg)\n![throughput](throughput.svg)\n",
    );
    s
}

type PlotResult = Result<String, String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Samples past which a TTFT CDF is drawn through this many quantiles instead of every step.
const CDF_POINTS: usize = 1000;

/// SVG: the CDF of TTFT (ms, log axis) per run. `runs` pairs a label with its TTFT samples.
pub fn ttft_cdf_svg(runs: &[(String, Vec<f64>)]) -> PlotResult {
    let mut out = String::new();
    {
        // x is log10(ms) on a linear axis, labelled in ms: readable ticks at any span.
        let all = runs.iter().flat_map(|(_, v)| v.iter().copied());
        let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
        let (lo, hi) = if lo.is_finite() && hi > 0.0 {
            ((lo.max(1e-3)).log10() - 0.05, hi.log10() + 0.05)
        } else {
            (0.0, 3.0)
        };
        let root = SVGBackend::with_string(&mut out, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("TTFT CDF", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(lo..hi, 0.0f64..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("time to first token (ms, log scale)")
            .y_desc("fraction of requests")
            .x_labels(10)
            .x_label_formatter(&|x| {
                let v = 10f64.powf(*x);
                if v >= 100.0 {
                    format!("{v:.0}")
                } else if v >= 10.0 {
                    format!("{v:.1}")
                } else {
                    format!("{v:.2}")
                }
            })
            .draw()
            .map_err(err)?;
        for (i, (label, v)) in runs.iter().enumerate() {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = if v.len() <= CDF_POINTS {
                v.iter()
                    .enumerate()
                    .flat_map(|(k, &x)| {
                        let x = x.max(1e-3).log10();
                        [(x, k as f64 / n), (x, (k + 1) as f64 / n)]
                    })
                    .collect()
            } else {
                // A long run drawn at CDF_POINTS quantiles: the same curve, a file of kilobytes.
                (0..=CDF_POINTS)
                    .map(|q| {
                        let f = q as f64 / CDF_POINTS as f64;
                        let x = v[((n - 1.0) * f).round() as usize];
                        (x.max(1e-3).log10(), f)
                    })
                    .collect()
            };
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// One bar chart: `values` per label, value printed above each bar, optional horizontal
/// reference lines `(label, y)`.
struct Bars<'a> {
    title: &'a str,
    y_desc: &'a str,
    labels: &'a [String],
    values: &'a [f64],
    y_max: f64,
    refs: &'a [(String, f64)],
    fmt: &'a dyn Fn(f64) -> String,
}

fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    b: Bars<'_>,
) -> Result<(), String> {
    let Bars {
        title,
        y_desc,
        labels,
        values,
        y_max,
        refs,
        fmt,
    } = b;
    let n = labels.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(err)?;
    for (i, &v) in values.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), v),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 18, 18);
        chart.draw_series(std::iter::once(bar)).map_err(err)?;
        let style = TextStyle::from(("sans-serif", 15).into_font()).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Bottom,
            ),
        );
        chart
            .draw_series(std::iter::once(Text::new(
                fmt(v),
                (SegmentValue::CenterOf(i), v),
                style,
            )))
            .map_err(err)?;
    }
    for (k, (label, y)) in refs.iter().enumerate() {
        let color = if k == 0 {
            BLACK
        } else {
            RGBColor(120, 120, 120)
        };
        chart
            .draw_series(LineSeries::new(
                vec![(SegmentValue::Exact(0), *y), (SegmentValue::Last, *y)],
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("{label} {}", fmt(*y)))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    if !refs.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// SVG: measured KV hit rate per run (bars; predicted hit rate in the label when known) with
/// the pooled-LRU and infinite-cache bounds as horizontal lines.
pub fn hit_rate_svg(res: &Results) -> PlotResult {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let labels: Vec<String> = res
            .runs
            .iter()
            .map(|r| match r.predicted_hit_rate {
                Some(p) if p > 0.0 => format!("{} (predicted {p:.3})", r.mode),
                _ => r.mode.clone(),
            })
            .collect();
        let values: Vec<f64> = res.runs.iter().map(|r| r.hit_rate.unwrap_or(0.0)).collect();
        let refs = vec![
            (
                "pooled LRU bound".to_string(),
                res.bound.pooled_lru_hit_rate,
            ),
            ("infinite cache".to_string(), res.bound.infinite_hit_rate),
        ];
        let y_max = values
            .iter()
            .chain(refs.iter().map(|(_, y)| y))
            .fold(0.0f64, |a, &b| a.max(b));
        let y_max = (y_max * 1.25).clamp(0.05, 1.05);
        bars(
            &root,
            Bars {
                title: "KV cache hit rate (Σ cached / Σ prompt tokens)",
                y_desc: "hit rate",
                labels: &labels,
                values: &values,
                y_max,
                refs: &refs,
                fmt: &|v| format!("{v:.3}"),
            },
        )?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// SVG: requests/s and output tokens/s per run, side by side.
pub fn throughput_svg(res: &Results) -> PlotResult {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(500);
        let labels: Vec<String> = res.runs.iter().map(|r| r.mode.clone()).collect();
        let rps: Vec<f64> = res.runs.iter().map(|r| r.requests_per_s).collect();
        let tps: Vec<f64> = res.runs.iter().map(|r| r.output_tokens_per_s).collect();
        let top = |v: &[f64]| v.iter().fold(0.0f64, |a, &b| a.max(b)).max(1e-9) * 1.2;
        bars(
            &left,
            Bars {
                title: "requests/s",
                y_desc: "requests/s",
                labels: &labels,
                values: &rps,
                y_max: top(&rps),
                refs: &[],
                fmt: &|v| format!("{v:.2}"),
            },
        )?;
        bars(
            &right,
            Bars {
                title: "output tokens/s",
                y_desc: "tokens/s",
                labels: &labels,
                values: &tps,
                y_max: top(&tps),
                refs: &[],
                fmt: &|v| format!("{v:.0}"),
            },
        )?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// Write `results.json`, `report.md`, `requests.jsonl` (one line per request: `mode` plus the
/// request's record) and the three SVGs into `dir` (created if needed). `records` pairs each
/// run's label with its records. Returns the paths written. Errors: I/O, or a plot that could
/// not be drawn.
pub fn write_all(
    dir: &Path,
    res: &Results,
    records: &[(String, Vec<RequestRecord>)],
) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let mut put = |name: &str, data: &[u8]| -> Result<(), String> {
        let p = dir.join(name);
        std::fs::write(&p, data).map_err(|e| format!("writing {}: {e}", p.display()))?;
        written.push(p);
        Ok(())
    };
    let json = serde_json::to_vec_pretty(res).map_err(err)?;
    put("results.json", &json)?;
    put("report.md", markdown(res).as_bytes())?;
    let mut lines = Vec::new();
    for (mode, recs) in records {
        let mut sorted: Vec<&RequestRecord> = recs.iter().collect();
        sorted.sort_by_key(|r| r.index);
        for r in sorted {
            let mut v = serde_json::to_value(r).map_err(err)?;
            v["mode"] = serde_json::Value::String(mode.clone());
            serde_json::to_writer(&mut lines, &v).map_err(err)?;
            lines.write_all(b"\n").map_err(err)?;
        }
    }
    put("requests.jsonl", &lines)?;
    let ttfts: Vec<(String, Vec<f64>)> = records
        .iter()
        .map(|(m, recs)| {
            let v = recs
                .iter()
                .filter(|r| r.ok)
                .filter_map(|r| r.ttft_ms)
                .collect();
            (m.clone(), v)
        })
        .collect();
    put("ttft_cdf.svg", ttft_cdf_svg(&ttfts)?.as_bytes())?;
    put("hit_rate.svg", hit_rate_svg(res)?.as_bytes())?;
    put("throughput.svg", throughput_svg(res)?.as_bytes())?;
    Ok(written)
}
