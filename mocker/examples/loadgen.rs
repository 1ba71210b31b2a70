//! Closed-loop HTTP load generator for mock workers: measures requests/s.
//!
//! ```sh
//! # terminal 1: 16 mock workers on one core, no modelled delays
//! TOKIO_WORKER_THREADS=1 taskset -c 0 target/release/kvrouter mocker --num-workers 16 \
//!     --speedup-ratio 0 --http-port 8100 > /tmp/workers.jsonl
//! # terminal 2: the load on the other core
//! taskset -c 1 target/release/examples/loadgen --workers-file /tmp/workers.jsonl \
//!     --prompt-tokens 4096 --max-tokens 16 --concurrency 64 --seconds 20
//! ```
//!
//! Every request carries a distinct 4k-token prompt (unique prefixes, so every request
//! prefills and publishes its blocks) unless `--shared` is given. Against a frontend, add
//! `--url http://127.0.0.1:8000 --model NAME`; `--text` sends a text prompt of about the same
//! length (the frontend tokenizes it), `--stream` asks for SSE. Bodies are serialised before
//! the run so the client spends its time on HTTP only. `--chat` sends chat requests (text from
//! `--text-file F`, else the words prompt); every request asks for `ignore_eos`.
//! `--cpu-pid PID` reports that process's CPU (utime + stime) per request counted.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

struct Args {
    urls: Vec<String>,
    prompt_tokens: usize,
    max_tokens: usize,
    concurrency: usize,
    seconds: f64,
    distinct: usize,
    model: Option<String>,
    text: bool,
    stream: bool,
    chat: bool,
    text_file: Option<String>,
    cpu_pid: Option<u32>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        urls: Vec::new(),
        prompt_tokens: 4096,
        max_tokens: 16,
        concurrency: 64,
        seconds: 20.0,
        distinct: 4096,
        model: None,
        text: false,
        stream: false,
        chat: false,
        text_file: None,
        cpu_pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--workers-file" => {
                let text = std::fs::read_to_string(val()?)?;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let v: serde_json::Value = serde_json::from_str(line)?;
                    let url = v["url"]
                        .as_str()
                        .ok_or_else(|| anyhow::anyhow!("no url in {line}"))?;
                    a.urls.push(url.to_owned());
                }
            }
            "--url" => a.urls.push(val()?),
            "--prompt-tokens" => a.prompt_tokens = val()?.parse()?,
            "--max-tokens" => a.max_tokens = val()?.parse()?,
            "--concurrency" => a.concurrency = val()?.parse()?,
            "--seconds" => a.seconds = val()?.parse()?,
            "--distinct" => a.distinct = val()?.parse()?,
            "--shared" => a.distinct = 1,
            "--model" => a.model = Some(val()?),
            "--text" => a.text = true,
            "--stream" => a.stream = true,
            "--chat" => a.chat = true,
            "--text-file" => a.text_file = Some(val()?),
            "--cpu-pid" => a.cpu_pid = Some(val()?.parse()?),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    if a.urls.is_empty() {
        anyhow::bail!("give --workers-file or --url");
    }
    Ok(a)
}

const WORDS: [&str; 32] = [
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " was", " with",
    " be", " by", " on", " not", " he", " this", " are", " or", " his", " from", " at", " which",
    " but", " have", " an", " had", " they", " you", " were", " their",
];

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let file_text = match &args.text_file {
        Some(p) => Some(std::fs::read_to_string(p)?),
        None => None,
    };
    // Distinct prompts: the first token of each differs, so no two share a block.
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..args.distinct)
            .map(|i| {
                let prompt: Vec<u32> = (0..args.prompt_tokens)
                    .map(|j| {
                        if j == 0 {
                            i as u32 % 150_000
                        } else {
                            ((j * 7919 + i * 31) % 150_000) as u32
                        }
                    })
                    .collect();
                let mut body = serde_json::json!({
                    "prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": true,
                });
                let text = if let Some(t) = &file_text {
                    // The file's text, distinct per request by its first line.
                    Some(format!("Request {i}:\n{t}"))
                } else if args.text || args.chat {
                    // Common English words (one Qwen3 token each with their leading space),
                    // distinct per request: about prompt_tokens tokens.
                    let words: Vec<&str> = prompt
                        .iter()
                        .map(|t| WORDS[*t as usize % WORDS.len()])
                        .collect();
                    Some(format!("Request {i}:{}", words.concat()))
                } else {
                    None
                };
                if let Some(t) = text {
                    if args.chat {
                        let o = body.as_object_mut().expect("an object");
                        o.remove("prompt");
                        o.insert(
                            "messages".into(),
                            serde_json::json!([{"role": "user", "content": t}]),
                        );
                    } else {
                        body["prompt"] = t.into();
                    }
                }
                if let Some(m) = &args.model {
                    body["model"] = m.clone().into();
                }
                if args.stream {
                    body["stream"] = true.into();
                }
                Bytes::from(serde_json::to_vec(&body).expect("serialise"))
            })
            .collect(),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let urls: Arc<Vec<String>> = Arc::new(
        args.urls
            .iter()
            .map(|u| {
                if args.chat {
                    format!("{u}/v1/chat/completions")
                } else {
                    format!("{u}/v1/completions")
                }
            })
            .collect(),
    );
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, urls, bodies) = (client.clone(), urls.clone(), bodies.clone());
        let (ok, failed, counting, stop, next) = (
            ok.clone(),
            failed.clone(),
            counting.clone(),
            stop.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                let url = &urls[n % urls.len()];
                let body = bodies[n % bodies.len()].clone();
                let r = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let good = match r {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                if counting.load(Ordering::Relaxed) {
                    if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Warm up (connections, allocator), then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = args.cpu_pid.map(cpu_seconds);
    counting.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    counting.store(false, Ordering::Relaxed);
    let cpu1 = args.cpu_pid.map(cpu_seconds);
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let cpu_ms = match (cpu0, cpu1) {
        (Some(a), Some(b)) if ok > 0 => format!("{:.4}", (b - a) * 1e3 / ok as f64),
        _ => "null".into(),
    };
    println!(
        "{{\"requests_ok\":{ok},\"requests_failed\":{failed},\"seconds\":{dt:.2},\"requests_per_second\":{:.1},\"workers\":{},\"prompt_tokens\":{},\"max_tokens\":{},\"concurrency\":{},\"cpu_ms_per_request\":{cpu_ms}}}",
        ok as f64 / dt,
        urls.len(),
        args.prompt_tokens,
        args.max_tokens,
        args.concurrency
    );
    Ok(())
}

/// utime + stime of a process, seconds (`/proc/PID/stat` fields 14 and 15, in clock ticks
/// of 100 Hz, the Linux USER_HZ).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    (ticks(11) + ticks(12)) / 100.0
}
