//! The output-shaping request fields over real HTTP, streamed and not: `seed`, `stop`,
//! `stop_token_ids`, `logprobs`, `n`, structured output, tool calls and reasoning.
use std::path::PathBuf;

use kvrouter_mocker::{spawn_workers, MockerConfig, RunningWorker, ToolCalls};
use kvrouter_preprocess::{ChatTemplateArgs, Preprocessor};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

fn qwen3_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qwen3")
}

fn no_tokenizer() -> MockerConfig {
    MockerConfig {
        num_gpu_blocks: 512,
        block_size: 16,
        speedup_ratio: 0.0,
        vocab_size: 1000,
        ..Default::default()
    }
}

fn qwen3() -> MockerConfig {
    MockerConfig {
        model_path: Some(qwen3_dir()),
        num_gpu_blocks: 1024,
        block_size: 16,
        speedup_ratio: 0.0,
        ..Default::default()
    }
}

/// The workers these tests share (loading the tokenizer takes seconds in a debug build).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum W {
    /// No tokenizer, vocabulary of 1000.
    Ids,
    /// The vendored Qwen3 tokenizer.
    Qwen3,
    /// Qwen3 with `--reasoning`.
    Reasoning,
    /// Qwen3 with `--tool-calls never`.
    NoTools,
}

/// Base URL of the shared worker `w`, started on first use in a runtime of its own that lives
/// as long as the test binary (each test has its own runtime; they only talk HTTP to it).
fn worker(w: W) -> String {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static URLS: OnceLock<Mutex<HashMap<W, String>>> = OnceLock::new();
    let mut urls = URLS.get_or_init(Default::default).lock().unwrap();
    if let Some(u) = urls.get(&w) {
        return u.clone();
    }
    let cfg = match w {
        W::Ids => no_tokenizer(),
        W::Qwen3 => qwen3(),
        W::Reasoning => MockerConfig {
            reasoning: true,
            ..qwen3()
        },
        W::NoTools => MockerConfig {
            tool_calls: ToolCalls::Never,
            ..qwen3()
        },
    };
    let running: RunningWorker = std::thread::spawn(move || {
        let rt = RT.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        });
        rt.block_on(async { spawn_workers(&cfg, 1).await.unwrap().pop().unwrap() })
    })
    .join()
    .unwrap();
    let url = running.info.url.clone();
    // Kept running for the rest of the process.
    std::mem::forget(running);
    urls.insert(w, url.clone());
    url
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// POSTs, expects 200, returns the body.
async fn ok(url: &str, body: Value) -> Value {
    let (s, v) = post(url, body).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// POSTs, expects a 400 naming `param`.
async fn refused(url: &str, body: Value, param: &str) -> String {
    let (s, v) = post(url, body).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], param, "{v}");
    v["error"]["message"].as_str().unwrap().to_owned()
}

/// The raw `data:` payloads of a stream (the `[DONE]` sentinel last).
async fn sse_raw(url: &str, mut body: Value) -> Vec<String> {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let chunks: Vec<String> = text
        .split("\n\n")
        .filter(|s| !s.is_empty())
        .map(|s| s.strip_prefix("data: ").expect("data line").to_owned())
        .collect();
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    chunks
}

/// One choice rebuilt from a stream.
#[derive(Debug, Default, Clone)]
struct Streamed {
    text: String,
    token_ids: Vec<u64>,
    finish_reason: Value,
    stop_reason: Value,
    /// Each content chunk's `logprobs`.
    logprobs: Vec<Value>,
    chunks: usize,
    role_chunks: usize,
}

/// Streams `body` and rebuilds every choice; returns them and the usage chunk.
async fn stream(url: &str, body: Value) -> (Vec<Streamed>, Value) {
    let chunks = sse_raw(url, body).await;
    let mut out: Vec<Streamed> = Vec::new();
    let mut usage = Value::Null;
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            assert_eq!(v["choices"], json!([]));
            usage = u.clone();
            continue;
        }
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1, "one choice per chunk: {v}");
        let ch = &choices[0];
        let i = ch["index"].as_u64().unwrap() as usize;
        if out.len() <= i {
            out.resize(i + 1, Streamed::default());
        }
        let s = &mut out[i];
        assert!(s.finish_reason.is_null(), "chunk after the finish: {v}");
        if ch.get("delta").is_some_and(|d| d.get("role").is_some()) {
            s.role_chunks += 1;
            continue;
        }
        s.chunks += 1;
        let piece = ch
            .get("text")
            .or_else(|| ch["delta"].get("content"))
            .and_then(Value::as_str)
            .unwrap();
        s.text.push_str(piece);
        if let Some(ids) = ch.get("token_ids").and_then(Value::as_array) {
            s.token_ids.extend(ids.iter().map(|t| t.as_u64().unwrap()));
        }
        if !ch["logprobs"].is_null() {
            s.logprobs.push(ch["logprobs"].clone());
        }
        s.finish_reason = ch["finish_reason"].clone();
        s.stop_reason = ch["stop_reason"].clone();
    }
    for s in &out {
        assert!(!s.finish_reason.is_null(), "every choice finishes: {s:?}");
    }
    (out, usage)
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn text(choice: &Value) -> &str {
    choice
        .get("text")
        .or_else(|| choice["message"].get("content"))
        .and_then(Value::as_str)
        .unwrap()
}

fn prompt(n: u32, salt: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 17 + salt) % 1000).collect()
}

// ---------- seed ----------

#[tokio::test]
async fn seed_replays_exactly_streamed_or_not() {
    let w = worker(W::Ids);
    let url = format!("{}/v1/completions", w);
    let p = prompt(40, 1);
    let req = |seed: Option<i64>| {
        let mut b = json!({"prompt": p, "max_tokens": 12});
        if let Some(s) = seed {
            b["seed"] = json!(s);
        }
        b
    };
    let a = ok(&url, req(Some(7))).await;
    let b = ok(&url, req(Some(7))).await;
    let a_ids = ids(&a["choices"][0]["token_ids"]);
    assert_eq!(a_ids.len(), 12);
    assert_eq!(
        a_ids,
        ids(&b["choices"][0]["token_ids"]),
        "same seed, same tokens"
    );
    let c = ok(&url, req(Some(8))).await;
    assert_ne!(a_ids, ids(&c["choices"][0]["token_ids"]), "another seed");
    let unseeded = ok(&url, req(None)).await;
    assert_ne!(a_ids, ids(&unseeded["choices"][0]["token_ids"]));
    let neg = ok(&url, req(Some(-3))).await;
    assert_eq!(ids(&neg["choices"][0]["token_ids"]).len(), 12);
    let (s, _) = stream(&url, req(Some(7))).await;
    assert_eq!(s[0].token_ids, a_ids, "streamed replay");
    assert_eq!(s[0].finish_reason, "length");
    // A different prompt with the same seed gives different tokens.
    let other = ok(
        &url,
        json!({"prompt": prompt(40, 2), "max_tokens": 12, "seed": 7}),
    )
    .await;
    assert_ne!(a_ids, ids(&other["choices"][0]["token_ids"]));
    refused(&url, json!({"prompt": p, "seed": "x"}), "seed").await;
}

// ---------- stop ----------

/// A stop string of 3 characters from the middle of `text`, and the text before its first
/// occurrence.
fn middle_stop(text: &str) -> (String, String) {
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 12, "output too short: {text:?}");
    let mut at = chars.len() / 2;
    while chars[at..at + 3]
        .iter()
        .any(|c| *c == '\u{FFFD}' || c.is_whitespace())
    {
        at += 1;
    }
    let stop: String = chars[at..at + 3].iter().collect();
    let before = text[..text.find(&stop).unwrap()].to_owned();
    (stop, before)
}

#[tokio::test]
async fn stop_strings_cut_the_output_on_both_apis() {
    let w = worker(W::Qwen3);
    let comp = format!("{}/v1/completions", w);
    let base = json!({"prompt": "Tell me a story.", "max_tokens": 40, "seed": 11});
    let full = ok(&comp, base.clone()).await;
    let full_text = text(&full["choices"][0]).to_owned();
    let (stop, before) = middle_stop(&full_text);
    let mut req = base.clone();
    req["stop"] = json!(["never-seen-string", stop]);
    let v = ok(&comp, req.clone()).await;
    let c = &v["choices"][0];
    assert_eq!(text(c), before, "truncated before the stop string");
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], stop.as_str());
    let used = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used < 40, "generation ended early: {used}");
    // Streamed: the same text, finish and token count.
    let (s, usage) = stream(&comp, req.clone()).await;
    assert_eq!(s[0].text, before);
    assert_eq!(s[0].finish_reason, "stop");
    assert_eq!(s[0].stop_reason, stop.as_str());
    assert_eq!(usage["completion_tokens"], used);
    // A single stop string as a plain string; kept in the output when asked.
    req["stop"] = json!(stop);
    req["include_stop_str_in_output"] = json!(true);
    let v = ok(&comp, req.clone()).await;
    assert_eq!(text(&v["choices"][0]), format!("{before}{stop}"));
    let (s, _) = stream(&comp, req).await;
    assert_eq!(s[0].text, format!("{before}{stop}"));

    // Chat: the same rule.
    let chat = format!("{}/v1/chat/completions", w);
    let base =
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "seed": 3});
    let full = ok(&chat, base.clone()).await;
    let (stop, before) = middle_stop(text(&full["choices"][0]));
    let mut req = base;
    req["stop"] = json!(stop);
    let v = ok(&chat, req.clone()).await;
    assert_eq!(text(&v["choices"][0]), before);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], stop.as_str());
    let (s, _) = stream(&chat, req).await;
    assert_eq!(s[0].text, before);
    assert_eq!(s[0].stop_reason, stop.as_str());
    refused(&comp, json!({"prompt": "x", "stop": 5}), "stop").await;
}

#[tokio::test]
async fn stop_token_ids_end_the_choice() {
    let w = worker(W::Ids);
    let url = format!("{}/v1/completions", w);
    let p = prompt(30, 4);
    let full = ok(&url, json!({"prompt": p, "max_tokens": 10, "seed": 1})).await;
    let toks = ids(&full["choices"][0]["token_ids"]);
    let i = (3..10).find(|&i| !toks[..i].contains(&toks[i])).unwrap();
    let req = json!({"prompt": p, "max_tokens": 10, "seed": 1, "stop_token_ids": [toks[i]]});
    let v = ok(&url, req.clone()).await;
    let c = &v["choices"][0];
    assert_eq!(ids(&c["token_ids"]), toks[..=i].to_vec());
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], toks[i]);
    assert_eq!(v["usage"]["completion_tokens"], i as u64 + 1);
    let (s, usage) = stream(&url, req).await;
    assert_eq!(s[0].token_ids, toks[..=i].to_vec());
    assert_eq!(s[0].finish_reason, "stop");
    assert_eq!(s[0].stop_reason, toks[i]);
    assert_eq!(usage["completion_tokens"], i as u64 + 1);
    refused(
        &url,
        json!({"prompt": p, "stop_token_ids": [-1]}),
        "stop_token_ids",
    )
    .await;
    // Stop strings need a tokenizer.
    let m = refused(&url, json!({"prompt": p, "stop": "x"}), "stop").await;
    assert!(m.contains("tokenizer"), "{m}");

    // With a tokenizer the stop token's text is left out of the output.
    let w = worker(W::Qwen3);
    let url = format!("{}/v1/completions", w);
    let base =
        json!({"prompt": "Count with me.", "max_tokens": 10, "seed": 2, "return_token_ids": true});
    let full = ok(&url, base.clone()).await;
    let toks = ids(&full["choices"][0]["token_ids"]);
    let i = (3..10).find(|&i| !toks[..i].contains(&toks[i])).unwrap();
    let mut shorter = base.clone();
    shorter["max_tokens"] = json!(i);
    let prefix = ok(&url, shorter).await;
    let mut req = base;
    req["stop_token_ids"] = json!([toks[i]]);
    let v = ok(&url, req.clone()).await;
    assert_eq!(text(&v["choices"][0]), text(&prefix["choices"][0]));
    let (s, _) = stream(&url, req).await;
    assert_eq!(s[0].text, text(&prefix["choices"][0]));
}

// ---------- logprobs ----------

/// A JSON object read in document order.
#[derive(Debug)]
struct Ordered(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of token to logprob")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, f64>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Debug, Deserialize)]
struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f64>,
    top_logprobs: Vec<Ordered>,
    text_offset: Vec<usize>,
}

fn check_completion_logprobs(lp: &CompletionLogprobs, k: usize, n: usize) {
    assert_eq!(lp.tokens.len(), n);
    assert_eq!(lp.token_logprobs.len(), n);
    assert_eq!(lp.top_logprobs.len(), n);
    assert_eq!(lp.text_offset.len(), n);
    for i in 0..n {
        let v = lp.token_logprobs[i];
        assert!(v.is_finite() && v <= 0.0, "{v}");
        let top = &lp.top_logprobs[i].0;
        assert_eq!(top.len(), k.max(1), "{top:?}");
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "sorted: {top:?}");
        assert!(top.iter().all(|(_, v)| v.is_finite() && *v <= 0.0));
        let sampled = top.iter().find(|(t, _)| *t == lp.tokens[i]);
        assert_eq!(
            sampled.map(|s| s.1),
            Some(v),
            "sampled token in its top list"
        );
    }
}

/// The `"logprobs"` objects of a raw stream, parsed in order.
fn raw_logprobs(chunks: &[String]) -> Vec<CompletionLogprobs> {
    #[derive(Deserialize)]
    struct Chunk {
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        logprobs: Option<CompletionLogprobs>,
    }
    chunks[..chunks.len() - 1]
        .iter()
        .filter_map(|c| serde_json::from_str::<Chunk>(c).ok())
        .filter_map(|c| c.choices.into_iter().next())
        .filter_map(|c| c.logprobs)
        .collect()
}

#[tokio::test]
async fn completion_logprobs_have_vllms_shape() {
    let w = worker(W::Qwen3);
    let url = format!("{}/v1/completions", w);
    let req = json!({"prompt": "The weather today", "max_tokens": 6, "seed": 9, "logprobs": 3});
    let r = reqwest::Client::new()
        .post(&url)
        .json(&req)
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    #[derive(Deserialize)]
    struct Resp {
        choices: Vec<Ch>,
    }
    #[derive(Deserialize)]
    struct Ch {
        logprobs: CompletionLogprobs,
        text: String,
    }
    let resp: Resp = serde_json::from_str(&body).unwrap();
    let lp = &resp.choices[0].logprobs;
    check_completion_logprobs(lp, 3, 6);
    assert_eq!(lp.text_offset[0], 0);
    for i in 1..6 {
        assert_eq!(
            lp.text_offset[i],
            lp.text_offset[i - 1] + lp.tokens[i - 1].chars().count()
        );
    }
    assert!(!resp.choices[0].text.is_empty());
    // Streamed: each chunk carries its own token's logprobs, the same values.
    let chunks = sse_raw(&url, req.clone()).await;
    let per_chunk = raw_logprobs(&chunks);
    assert_eq!(per_chunk.len(), 6);
    for (i, c) in per_chunk.iter().enumerate() {
        check_completion_logprobs(c, 3, 1);
        assert_eq!(c.token_logprobs[0], lp.token_logprobs[i]);
        assert_eq!(c.tokens[0], lp.tokens[i]);
    }
    // logprobs 0: only the sampled token; over 20 refused.
    let v = ok(&url, json!({"prompt": "x", "max_tokens": 2, "logprobs": 0})).await;
    assert_eq!(
        v["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .unwrap()
            .len(),
        1
    );
    let m = refused(&url, json!({"prompt": "x", "logprobs": 21}), "logprobs").await;
    assert!(m.contains("max allowed: 20"), "{m}");
    refused(&url, json!({"prompt": "x", "logprobs": -2}), "logprobs").await;
    // Without a tokenizer, tokens are vLLM's `token_id:N` placeholders.
    let w2 = worker(W::Ids);
    let v = ok(
        &format!("{}/v1/completions", w2),
        json!({"prompt": [1, 2, 3], "max_tokens": 3, "logprobs": 2}),
    )
    .await;
    let c = &v["choices"][0];
    let first = ids(&c["token_ids"])[0];
    assert_eq!(c["logprobs"]["tokens"][0], format!("token_id:{first}"));
}

fn check_chat_logprobs(content: &[Value], k: usize) {
    for e in content {
        let tok = e["token"].as_str().unwrap();
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp.is_finite() && lp <= 0.0);
        assert_eq!(
            ids(&e["bytes"]),
            tok.bytes().map(u64::from).collect::<Vec<_>>()
        );
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), k);
        let vals: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(vals.windows(2).all(|w| w[0] >= w[1]), "{vals:?}");
        if k > 0 {
            assert!(top
                .iter()
                .any(|t| t["token"] == tok && t["logprob"].as_f64() == Some(lp)));
        }
    }
}

#[tokio::test]
async fn chat_logprobs_have_vllms_shape() {
    let w = worker(W::Qwen3);
    let url = format!("{}/v1/chat/completions", w);
    let req = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
        "seed": 4, "logprobs": true, "top_logprobs": 2});
    let v = ok(&url, req.clone()).await;
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(content.len(), 5);
    check_chat_logprobs(&content, 2);
    let (s, _) = stream(&url, req).await;
    assert_eq!(s[0].logprobs.len(), 5);
    for (i, lp) in s[0].logprobs.iter().enumerate() {
        let c = lp["content"].as_array().unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0], content[i]);
    }
    // logprobs alone: no alternatives.
    let v = ok(
        &url,
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": true}),
    )
    .await;
    check_chat_logprobs(
        v["choices"][0]["logprobs"]["content"].as_array().unwrap(),
        0,
    );
    let v = ok(
        &url,
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    )
    .await;
    assert!(v["choices"][0]["logprobs"].is_null());
    refused(&url, json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 21}), "top_logprobs").await;
    refused(
        &url,
        json!({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}),
        "top_logprobs",
    )
    .await;
}

// ---------- n ----------

#[tokio::test]
async fn n_choices_are_independent_and_interleaved() {
    let w = worker(W::Ids);
    let url = format!("{}/v1/completions", w);
    let p = prompt(50, 6);
    let req = json!({"prompt": p, "max_tokens": 4, "n": 3, "seed": 5});
    let v = ok(&url, req.clone()).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut outs = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
        outs.push(ids(&c["token_ids"]));
    }
    assert!(
        outs[0] != outs[1] && outs[1] != outs[2] && outs[0] != outs[2],
        "{outs:?}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], 50);
    let (s, usage) = stream(&url, req).await;
    assert_eq!(s.len(), 3);
    for i in 0..3 {
        assert_eq!(s[i].token_ids, outs[i], "choice {i} streamed");
        assert_eq!(s[i].chunks, 4);
    }
    assert_eq!(usage["completion_tokens"], 12);
    // Without a seed the choices differ too, and choice 0 is the default output.
    let v = ok(&url, json!({"prompt": p, "max_tokens": 4, "n": 2})).await;
    let d = ok(&url, json!({"prompt": p, "max_tokens": 4})).await;
    assert_ne!(v["choices"][0]["token_ids"], v["choices"][1]["token_ids"]);
    assert_eq!(v["choices"][0]["token_ids"], d["choices"][0]["token_ids"]);
    refused(&url, json!({"prompt": p, "n": 17}), "n").await;
    refused(&url, json!({"prompt": p, "n": 0}), "n").await;
    refused(&url, json!({"prompt": p, "n": 1000000000000u64}), "n").await;

    // Chat: one role chunk per choice, then interleaved content.
    let w = worker(W::Qwen3);
    let url = format!("{}/v1/chat/completions", w);
    let req = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2, "seed": 1});
    let v = ok(&url, req.clone()).await;
    let (s, usage) = stream(&url, req).await;
    assert_eq!(s.len(), 2);
    for i in 0..2 {
        assert_eq!(s[i].role_chunks, 1);
        assert_eq!(s[i].text, text(&v["choices"][i]));
    }
    assert_ne!(text(&v["choices"][0]), text(&v["choices"][1]));
    assert_eq!(usage["completion_tokens"], 6);
}

// ---------- structured output ----------

/// A tiny JSON Schema validator for the keywords these tests use.
fn valid(v: &Value, s: &Value, root: &Value) -> Result<(), String> {
    let fail = |m: &str| Err(format!("{m}: {v} against {s}"));
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        return valid(v, root.pointer(&r[1..]).unwrap(), root);
    }
    if let Some(c) = s.get("const") {
        return if v == c { Ok(()) } else { fail("const") };
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return if e.contains(v) { Ok(()) } else { fail("enum") };
    }
    if let Some(a) = s.get("anyOf").or(s.get("oneOf")).and_then(Value::as_array) {
        return if a.iter().any(|b| valid(v, b, root).is_ok()) {
            Ok(())
        } else {
            fail("anyOf")
        };
    }
    let ty = s.get("type").and_then(Value::as_str);
    match ty {
        Some("object") => {
            let o = v.as_object().ok_or("not an object")?;
            for r in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !o.contains_key(r.as_str().unwrap()) {
                    return fail("required");
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            for (k, x) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => valid(x, ps, root)?,
                    None if s.get("additionalProperties") == Some(&json!(false)) => {
                        return fail("additional property")
                    }
                    None => {}
                }
            }
        }
        Some("array") => {
            let a = v.as_array().ok_or("not an array")?;
            let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
            let max = s
                .get("maxItems")
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX) as usize;
            if a.len() < min || a.len() > max {
                return fail("items count");
            }
            if let Some(is) = s.get("items") {
                for x in a {
                    valid(x, is, root)?;
                }
            }
        }
        Some("string") => {
            let t = v.as_str().ok_or("not a string")?;
            let n = t.chars().count() as u64;
            if n < s.get("minLength").and_then(Value::as_u64).unwrap_or(0)
                || n > s
                    .get("maxLength")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX)
            {
                return fail("length");
            }
        }
        Some("integer") | Some("number") => {
            let x = v.as_f64().ok_or("not a number")?;
            if ty == Some("integer") && !(v.is_i64() || v.is_u64()) {
                return fail("not an integer");
            }
            if s.get("minimum")
                .and_then(Value::as_f64)
                .is_some_and(|m| x < m)
                || s.get("maximum")
                    .and_then(Value::as_f64)
                    .is_some_and(|m| x > m)
            {
                return fail("range");
            }
        }
        Some("boolean") if !v.is_boolean() => return fail("not a boolean"),
        Some("null") if !v.is_null() => return fail("not null"),
        _ => {}
    }
    Ok(())
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": 0.5, "maximum": 1.5},
            "active": {"type": "boolean"},
            "kind": {"const": "person"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "pet": {"anyOf": [{"$ref": "#/$defs/pet"}, {"type": "null"}]},
            "note": {"type": "null"}
        },
        "required": ["name", "age", "score", "active", "kind", "tags", "pet"],
        "additionalProperties": false,
        "$defs": {"pet": {"type": "object", "properties": {"species": {"type": "string", "enum": ["cat", "dog"]}}, "required": ["species"]}}
    })
}

fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let s = person_schema();
    valid(&v, &s, &s).unwrap();
}

#[tokio::test]
async fn json_object_and_json_schema_outputs_parse_and_validate() {
    let w = worker(W::Qwen3);
    let comp = format!("{}/v1/completions", w);
    let chat = format!("{}/v1/chat/completions", w);
    let msgs = json!([{"role": "user", "content": "Give me JSON"}]);
    // json_object, both APIs, streamed and not.
    for (url, mut req) in [
        (
            &comp,
            json!({"prompt": "JSON:", "max_tokens": 200, "seed": 1}),
        ),
        (
            &chat,
            json!({"messages": msgs, "max_tokens": 200, "seed": 1}),
        ),
    ] {
        req["response_format"] = json!({"type": "json_object"});
        let v = ok(url, req.clone()).await;
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "stop", "{v}");
        let parsed: Value = serde_json::from_str(text(c)).unwrap();
        assert!(parsed.is_object());
        let (s, _) = stream(url, req).await;
        assert_eq!(s[0].text, text(c));
        assert_eq!(s[0].finish_reason, "stop");
    }
    // A schema through each of vLLM's fields.
    let schema = person_schema();
    let fields = [
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}}),
        json!({"guided_json": schema}),
        json!({"guided_json": schema.to_string()}),
        json!({"structured_outputs": {"json": schema}}),
    ];
    for (i, f) in fields.iter().enumerate() {
        for seed in 0..4 {
            let mut req = json!({"prompt": "Person:", "max_tokens": 400, "seed": seed, "n": 2});
            for (k, v) in f.as_object().unwrap() {
                req[k] = v.clone();
            }
            let v = ok(&comp, req.clone()).await;
            for c in v["choices"].as_array().unwrap() {
                assert_eq!(c["finish_reason"], "stop", "field {i}: {v}");
                check_person(text(c));
            }
            if seed == 0 {
                let (s, _) = stream(&comp, req.clone()).await;
                for (j, sc) in s.iter().enumerate() {
                    assert_eq!(sc.text, text(&v["choices"][j]));
                }
                let mut chat_req = req.clone();
                chat_req.as_object_mut().unwrap().remove("prompt");
                chat_req["messages"] = msgs.clone();
                let cv = ok(&chat, chat_req.clone()).await;
                check_person(text(&cv["choices"][0]));
                let (s, _) = stream(&chat, chat_req).await;
                assert_eq!(s[0].text, text(&cv["choices"][0]));
            }
        }
    }
    // max_tokens runs out first: the truncated prefix, finish "length".
    let req = json!({"prompt": "Person:", "max_tokens": 400, "seed": 3, "guided_json": schema});
    let whole = ok(&comp, req.clone()).await;
    let mut short = req;
    short["max_tokens"] = json!(5);
    let v = ok(&comp, short).await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(text(&whole["choices"][0]).starts_with(text(&v["choices"][0])));
    // Unsupported constructs are refused, naming the field.
    let m = refused(
        &comp,
        json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}}}),
        "response_format",
    )
    .await;
    assert!(m.contains("pattern"), "{m}");
    refused(
        &comp,
        json!({"prompt": "x", "guided_regex": "a+"}),
        "guided_regex",
    )
    .await;
    refused(
        &comp,
        json!({"prompt": "x", "guided_grammar": "root ::= \"a\""}),
        "guided_grammar",
    )
    .await;
    refused(
        &comp,
        json!({"prompt": "x", "structured_outputs": {"regex": "a+"}}),
        "structured_outputs",
    )
    .await;
    refused(
        &comp,
        json!({"prompt": "x", "response_format": {"type": "json_schema"}}),
        "response_format",
    )
    .await;
    refused(
        &chat,
        json!({"messages": msgs, "guided_json": "{not json"}),
        "guided_json",
    )
    .await;
    // Recursion that can never end: a clear 400.
    let endless = json!({"$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}}, "$ref": "#/$defs/a"});
    refused(
        &comp,
        json!({"prompt": "x", "guided_json": endless}),
        "guided_json",
    )
    .await;

    // Without a tokenizer: a 400 saying why.
    let w = worker(W::Ids);
    let m = refused(
        &format!("{}/v1/completions", w),
        json!({"prompt": [1, 2], "response_format": {"type": "json_object"}}),
        "response_format",
    )
    .await;
    assert!(m.contains("tokenizer"), "{m}");
}

#[tokio::test]
async fn guided_choice_picks_one_of_the_strings() {
    let w = worker(W::Qwen3);
    let comp = format!("{}/v1/completions", w);
    let chat = format!("{}/v1/chat/completions", w);
    let options = ["positive", "negative", "neutral"];
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..12 {
        let v = ok(
            &comp,
            json!({"prompt": "Sentiment:", "seed": seed, "guided_choice": options}),
        )
        .await;
        let t = text(&v["choices"][0]).to_owned();
        assert!(options.contains(&t.as_str()), "{t:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        seen.insert(t);
    }
    assert!(seen.len() > 1, "the seed picks the option");
    let req = json!({"messages": [{"role": "user", "content": "Sentiment?"}],
        "structured_outputs": {"choice": options}, "seed": 2});
    let v = ok(&chat, req.clone()).await;
    assert!(options.contains(&text(&v["choices"][0])));
    let (s, _) = stream(&chat, req).await;
    assert_eq!(s[0].text, text(&v["choices"][0]));
    let (s, _) = stream(&comp, json!({"prompt": "S:", "guided_choice": options})).await;
    assert!(options.contains(&s[0].text.as_str()));
    refused(
        &comp,
        json!({"prompt": "x", "guided_choice": []}),
        "guided_choice",
    )
    .await;
}

// ---------- tool calls and reasoning ----------

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}])
}

/// The Hermes call in `text` (after any reasoning block): (name, arguments).
fn parse_call(text: &str) -> (String, Value) {
    let at = text
        .find("<tool_call>\n")
        .unwrap_or_else(|| panic!("no tool call: {text:?}"));
    let inner = text[at..]
        .strip_prefix("<tool_call>\n")
        .and_then(|t| t.strip_suffix("\n</tool_call>"))
        .unwrap_or_else(|| panic!("not a Hermes call: {text:?}"));
    let v: Value = serde_json::from_str(inner).unwrap();
    (
        v["name"].as_str().unwrap().to_owned(),
        v["arguments"].clone(),
    )
}

fn check_weather_call(text: &str) {
    let (name, args) = parse_call(text);
    assert_eq!(name, "get_weather");
    let schema = &weather_tools()[0]["function"]["parameters"];
    valid(&args, schema, schema).unwrap();
}

/// Token ids of a conversation rendered with the vendored Qwen3 template, as a router sends.
fn qwen3_prompt(
    messages: &Value,
    tools: Option<&Value>,
    extra: Option<&serde_json::Map<String, Value>>,
) -> (Vec<u32>, String) {
    static PRE: std::sync::OnceLock<Preprocessor> = std::sync::OnceLock::new();
    let p = PRE.get_or_init(|| Preprocessor::from_model_dir(qwen3_dir()).unwrap());
    let text = p
        .render_chat(&ChatTemplateArgs {
            messages,
            tools,
            add_generation_prompt: true,
            extra,
        })
        .unwrap();
    (p.encode(&text).unwrap(), text)
}

#[tokio::test]
async fn tool_calls_in_hermes_format() {
    let w = worker(W::Qwen3);
    let comp = format!("{}/v1/completions", w);
    let chat = format!("{}/v1/chat/completions", w);
    let tools = weather_tools();
    let ask = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let (ids_, rendered) = qwen3_prompt(&ask, Some(&tools), None);
    assert!(rendered.contains("<tools>\n"));
    // Completions with the token-id prompt a router forwards.
    let req = json!({"prompt": ids_, "max_tokens": 200, "seed": 3});
    let v = ok(&comp, req.clone()).await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{v}");
    assert!(
        text(c).starts_with("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "),
        "{}",
        text(c)
    );
    check_weather_call(text(c));
    let (s, _) = stream(&comp, req).await;
    assert_eq!(s[0].text, text(c));
    assert_eq!(s[0].finish_reason, "stop");
    // The same as a text prompt.
    let v = ok(&comp, json!({"prompt": rendered, "max_tokens": 200})).await;
    check_weather_call(text(&v["choices"][0]));
    // Chat with `tools`, streamed and not.
    let req = json!({"messages": ask, "tools": tools, "max_tokens": 200});
    let v = ok(&chat, req.clone()).await;
    check_weather_call(text(&v["choices"][0]));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (s, _) = stream(&chat, req.clone()).await;
    assert_eq!(s[0].text, text(&v["choices"][0]));
    // A named tool_choice, and "none".
    let mut named = req.clone();
    named["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let v = ok(&chat, named).await;
    assert_eq!(parse_call(text(&v["choices"][0])).0, "get_time");
    let mut none = req.clone();
    none["tool_choice"] = json!("none");
    let v = ok(&chat, none).await;
    assert!(!text(&v["choices"][0]).contains("<tool_call>"));
    // Structured output takes precedence.
    let mut both = req.clone();
    both["guided_choice"] = json!(["yes", "no"]);
    let v = ok(&chat, both).await;
    assert!(["yes", "no"].contains(&text(&v["choices"][0])));
    // After the tool answered, the model answers in prose (by length, as usual).
    let answered = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": "{\"temperature\": 21}"}
    ]);
    let (ids2, _) = qwen3_prompt(&answered, Some(&tools), None);
    let v = ok(&comp, json!({"prompt": ids2, "max_tokens": 8})).await;
    assert!(!text(&v["choices"][0]).contains("<tool_call>"));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let v = ok(
        &chat,
        json!({"messages": answered, "tools": tools, "max_tokens": 8}),
    )
    .await;
    assert!(!text(&v["choices"][0]).contains("<tool_call>"));
    // No tools: plain output.
    let (plain, _) = qwen3_prompt(&ask, None, None);
    let v = ok(&comp, json!({"prompt": plain, "max_tokens": 8})).await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // --tool-calls never.
    let w = worker(W::NoTools);
    let v = ok(
        &format!("{}/v1/completions", w),
        json!({"prompt": ids_, "max_tokens": 8}),
    )
    .await;
    assert!(!text(&v["choices"][0]).contains("<tool_call>"));
}

#[tokio::test]
async fn reasoning_opens_with_a_think_block() {
    let w = worker(W::Reasoning);
    let comp = format!("{}/v1/completions", w);
    let chat = format!("{}/v1/chat/completions", w);
    let msgs = json!([{"role": "user", "content": "Why is the sky blue?"}]);
    let think = |t: &str| {
        assert!(t.starts_with("<think>\n"), "{t:?}");
        let end = t.find("\n</think>\n\n").unwrap_or_else(|| panic!("{t:?}"));
        assert!(end > "<think>\n".len() + 10, "a few sentences: {t:?}");
        t[end + "\n</think>\n\n".len()..].to_owned()
    };
    let req = json!({"messages": msgs, "max_tokens": 120, "seed": 1});
    let v = ok(&chat, req.clone()).await;
    let after = think(text(&v["choices"][0]));
    assert!(!after.is_empty(), "an answer follows");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (s, _) = stream(&chat, req).await;
    assert_eq!(s[0].text, text(&v["choices"][0]));
    // Token prompt (as a router sends it).
    let (ids_, _) = qwen3_prompt(&msgs, None, None);
    let v = ok(&comp, json!({"prompt": ids_, "max_tokens": 120})).await;
    think(text(&v["choices"][0]));
    // enable_thinking: false appends an empty think block: no reasoning.
    let mut kw = serde_json::Map::new();
    kw.insert("enable_thinking".into(), json!(false));
    let (no_think, rendered) = qwen3_prompt(&msgs, None, Some(&kw));
    assert!(rendered.ends_with("<think>\n\n</think>\n\n"));
    let v = ok(&comp, json!({"prompt": no_think, "max_tokens": 20})).await;
    assert!(!text(&v["choices"][0]).contains("<think>"));
    let v = ok(&chat, json!({"messages": msgs, "max_tokens": 20, "chat_template_kwargs": {"enable_thinking": false}})).await;
    assert!(!text(&v["choices"][0]).contains("<think>"));
    // Reasoning, then the tool call.
    let v = ok(
        &chat,
        json!({"messages": msgs, "tools": weather_tools(), "max_tokens": 300}),
    )
    .await;
    let after = think(text(&v["choices"][0]));
    assert!(after.starts_with("<tool_call>\n"), "{after:?}");
    check_weather_call(&after);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Reasoning, then the JSON.
    let v = ok(
        &comp,
        json!({"prompt": ids_, "max_tokens": 300, "response_format": {"type": "json_object"}}),
    )
    .await;
    let after = think(text(&v["choices"][0]));
    assert!(serde_json::from_str::<Value>(&after).unwrap().is_object());
}
