//! The frontend's per-request preprocessing (JSON parse, chat template, tokenization), as
//! `parse_request` does it for the API: a 3.3k-token English and a ~3.6k-token multilingual
//! chat prompt, and the last turn of a 20-turn conversation with and without the prompt
//! cache against a single-turn prompt of the same new text.
//! `cargo bench -p kvrouter-bench --bench frontend`
use criterion::{criterion_group, criterion_main, Criterion};

// The allocator the kvrouter binary ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use kvrouter_preprocess::{Preprocessor, PromptCache};
use kvrouter_server::frontend::request::{parse_request, Endpoint, Limits};
use serde_json::{json, Value};

const MODEL: &str = "m";

fn limits() -> Limits {
    Limits {
        context_length: 1 << 20,
        max_tokens: 1,
        client_routing: true,
        tool_parser: None,
        reasoning_parser: None,
    }
}

fn chat(messages: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": MODEL, "messages": messages, "max_tokens": 1})).unwrap()
}

fn conversation(turns: usize, last: &str) -> Value {
    let mut m =
        vec![json!({"role": "system", "content": "You are a meticulous assistant. ".repeat(30)})];
    for k in 0..turns {
        m.push(json!({"role": "user", "content": format!("Question {k}: {}", "tell me more about routing ".repeat(20))}));
        m.push(json!({"role": "assistant", "content": format!("Answer {k}: {}", "the router keeps a prefix tree ".repeat(30))}));
    }
    m.push(json!({"role": "user", "content": last}));
    json!(m)
}

fn bench(c: &mut Criterion) {
    let pre = Preprocessor::from_model_dir(kvrouter_server::vendored_model_dir()).unwrap();
    let words = " the of and to in is that for it as was with be by on not"
        .split(' ')
        .collect::<Vec<_>>();
    let english: String = (0..3300)
        .map(|i| words[1 + i % (words.len() - 1)])
        .collect::<Vec<_>>()
        .join(" ");
    let multi = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/multilingual.txt"
    ))
    .unwrap();
    let lines: Vec<&str> = multi.lines().collect();
    let multilingual = format!("{multi}{multi}{}", lines[..lines.len() / 2].join("\n"));
    let mut g = c.benchmark_group("parse_request");
    for (name, text) in [
        ("english_3.3k", &english),
        ("multilingual_3.6k", &multilingual),
    ] {
        let body = chat(json!([{"role": "user", "content": text}]));
        g.bench_function(name, |b| {
            b.iter(|| {
                parse_request(
                    Endpoint::ChatCompletions,
                    &body,
                    MODEL,
                    &pre,
                    None,
                    limits(),
                )
                .unwrap()
            })
        });
    }
    let new_text =
        "And what happens when a worker restarts with an empty cache? Explain step by step.";
    let single = chat(json!([{"role": "user", "content": new_text}]));
    g.bench_function("single_turn", |b| {
        b.iter(|| {
            parse_request(
                Endpoint::ChatCompletions,
                &single,
                MODEL,
                &pre,
                None,
                limits(),
            )
            .unwrap()
        })
    });
    let last = chat(conversation(19, new_text));
    let n = parse_request(
        Endpoint::ChatCompletions,
        &last,
        MODEL,
        &pre,
        None,
        limits(),
    )
    .unwrap()
    .tokens
    .len();
    eprintln!("20-turn conversation: {n} tokens");
    g.bench_function("turn_20_no_cache", |b| {
        b.iter(|| {
            parse_request(
                Endpoint::ChatCompletions,
                &last,
                MODEL,
                &pre,
                None,
                limits(),
            )
            .unwrap()
        })
    });
    // The cache holds the previous turn (as a live conversation leaves it).
    let cache = PromptCache::new(1 << 22);
    let q18 = format!("Question 18: {}", "tell me more about routing ".repeat(20));
    let previous = chat(conversation(18, &q18));
    let _ = parse_request(
        Endpoint::ChatCompletions,
        &previous,
        MODEL,
        &pre,
        Some(&cache),
        limits(),
    )
    .unwrap();
    g.bench_function("turn_20_template_only", |b| {
        let v: Value = serde_json::from_slice(&last).unwrap();
        b.iter(|| pre.apply_chat_template(&v["messages"], true).unwrap())
    });
    g.bench_function("turn_20_cached", |b| {
        b.iter(|| {
            parse_request(
                Endpoint::ChatCompletions,
                &last,
                MODEL,
                &pre,
                Some(&cache),
                limits(),
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
