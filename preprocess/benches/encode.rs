//! Tokenization cost per prompt: the fast path against the `tokenizers` library's full
//! pipeline, on a ~4k-token English prompt, the same with a non-ASCII character every 17
//! words, and a ~3.3k-token multilingual text (`bench/data/multilingual.txt`: CJK, Cyrillic,
//! Arabic, Devanagari, Greek, emoji, code), with the vendored Qwen3 tokenizer.
//! `cargo bench -p kvrouter-preprocess --bench encode`
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvrouter_preprocess::Preprocessor;

const WORDS: [&str; 32] = [
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " was", " with",
    " be", " by", " on", " not", " he", " this", " are", " or", " his", " from", " at", " which",
    " but", " have", " an", " had", " they", " you", " were", " their",
];

fn prompt(seed: usize, words: usize, section: &str) -> String {
    let mut s = format!("Request {seed}:");
    for j in 0..words {
        s.push_str(WORDS[(j * 7919 + seed * 31) % WORDS.len()]);
        if j % 17 == 16 {
            s.push_str(". Then, 42 items (see ");
            s.push_str(section);
            s.push_str(")\n");
        }
    }
    s
}

fn bench(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qwen3");
    let p = Preprocessor::from_model_dir(dir).expect("vendored tokenizer");
    // ASCII English, and the same with a non-ASCII character every 17 words (split by the
    // regex engine instead of the ASCII scanner).
    let multi = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/data/multilingual.txt"),
    )
    .expect("bench/data/multilingual.txt");
    let half: String = multi
        .lines()
        .take(multi.lines().count() / 2)
        .collect::<Vec<_>>()
        .join("\n");
    let multilingual = format!("{multi}{multi}{half}");
    for (name, text) in [
        ("ascii", prompt(1, 2400, "section 3")),
        ("unicode", prompt(1, 2400, "§3")),
        ("multilingual", multilingual),
    ] {
        let n = p.encode(&text).unwrap().len();
        eprintln!("{name} prompt: {} bytes, {n} tokens", text.len());
        let mut g = c.benchmark_group(format!("encode_{name}"));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function("fast", |b| b.iter(|| p.encode(&text).unwrap()));
        g.bench_function("library", |b| {
            b.iter(|| p.encode_reference(&text, false).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
