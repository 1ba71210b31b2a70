//! Redraw a `kvrouter bench --out DIR` report (report.md and the SVG plots) from its
//! `results.json` and `requests.jsonl`:
//! `cargo run -p kvrouter-bench --example replot -- DIR`.
use kvrouter_bench::client::RequestRecord;
use kvrouter_bench::report::{write_all, Results};

fn main() -> Result<(), String> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("usage: replot DIR")?);
    let read =
        |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: {e}"));
    let results: Results =
        serde_json::from_str(&read("results.json")?).map_err(|e| e.to_string())?;
    let mut records: Vec<(String, Vec<RequestRecord>)> = results
        .runs
        .iter()
        .map(|r| (r.mode.clone(), Vec::new()))
        .collect();
    for line in read("requests.jsonl")?.lines() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let mode = v["mode"].as_str().unwrap_or_default().to_string();
        let rec: RequestRecord = serde_json::from_value(v).map_err(|e| e.to_string())?;
        if let Some((_, recs)) = records.iter_mut().find(|(m, _)| *m == mode) {
            recs.push(rec);
        }
    }
    for p in write_all(&dir, &results, &records)? {
        println!("{}", p.display());
    }
    Ok(())
}
