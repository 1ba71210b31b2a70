//! Tokenization cost per prompt: the fast path against the `tokenizers` library's full
//! pipeline, on a ~4k-token English prompt and a chat-rendered prompt, with the vendored Qwen3
//! tokenizer. `cargo bench -p kvrouter-preprocess --bench encode`
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
    for (name, section) in [("ascii", "section 3"), ("unicode", "§3")] {
        let text = prompt(1, 2400, section);
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
