//! Large prompts are templated and tokenized off the async threads (issue 14 item 4): while
//! several ~100k-token chat prompts arrive, a running stream keeps its pace.
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvrouter_core::RouterMode;
use serde_json::json;

use crate::common::*;

/// ~100k tokens of text no cache or memo has seen: words of random CJK characters.
fn big_text(seed: u32) -> String {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut s = String::with_capacity(400_000);
    for i in 0..110_000u32 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        s.push(char::from_u32(0x4e00 + x % 0x5000).unwrap_or('中'));
        if i % 6 == 5 {
            s.push(' ');
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_stream_keeps_its_pace_while_large_prompts_are_tokenized() {
    let s = stack(RouterMode::Kv, 1, |c| {
        c.mocker.speedup_ratio = 1.0;
        c.frontend.preprocess_threads = Some(1);
    })
    .await;
    let url = s.url();
    let c = client();
    // The stream: ~6 ms between tokens (the mock engine's decode step).
    let mut body = completion_body(&prompt(1, 64), 600);
    body["ignore_eos"] = json!(true);
    let r = start_stream(&c, &url, body).await;
    assert_eq!(r.status(), 200);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let reader = tokio::spawn(async move {
        let mut st = r.bytes_stream();
        while let Some(b) = st.next().await {
            if b.is_err() || tx.send(Instant::now()).is_err() {
                break;
            }
        }
    });
    // Steady state first.
    for _ in 0..20 {
        rx.recv().await.expect("the stream runs");
    }
    // Four large chat prompts at once (each refused after tokenizing: over the context).
    let texts: Vec<String> = (0..4).map(big_text).collect();
    let t0 = Instant::now();
    let bigs = texts.into_iter().map(|text| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let t = Instant::now();
            let r = c
                .post(format!("{url}/v1/chat/completions"))
                .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}))
                .send()
                .await
                .expect("sent");
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            (status, t.elapsed())
        }
    });
    let results = futures::future::join_all(bigs).await;
    let window = t0.elapsed();
    for (status, _) in &results {
        assert_eq!(*status, 400, "over the context length, after tokenizing");
    }
    // Gaps between the stream's chunks while the prompts were being tokenized.
    let mut times = Vec::new();
    while let Ok(t) = rx.try_recv() {
        times.push(t);
    }
    let during: Vec<Instant> = times.into_iter().filter(|t| *t <= t0 + window).collect();
    let max_gap = during
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(window);
    let mut parse: Vec<Duration> = results.iter().map(|r| r.1).collect();
    parse.sort();
    let first = parse[0];
    // Tokenizing one prompt took `first`; a stream stalled behind it would show a gap of that
    // size (two such prompts block both async threads). Off the async threads, the gaps stay
    // at the engine's pace.
    assert!(
        during.len() >= 5 && max_gap < first / 2,
        "stream stalled: max gap {max_gap:?} with {} chunks in {window:?}; one prompt took {first:?} ({parse:?})",
        during.len()
    );
    eprintln!(
        "max gap {max_gap:?}, {} chunks in {window:?}, parse {parse:?}",
        during.len()
    );
    reader.abort();
    s.stop().await;
}
