//! Incremental detokenization gives exactly the library's full decode, delta by delta, for
//! random Qwen3 id sequences (multi-byte characters cut across tokens included) pushed in
//! random-sized steps.
use std::path::PathBuf;
use std::sync::OnceLock;

use kvrouter_preprocess::{IncrementalDecoder, Preprocessor};
use proptest::prelude::*;

fn qwen3() -> &'static Preprocessor {
    static P: OnceLock<Preprocessor> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qwen3");
        Preprocessor::from_model_dir(dir).expect("vendored Qwen3 tokenizer loads")
    })
}

fn check(ids: &[u32], steps: &[usize]) {
    let p = qwen3();
    let mut d = IncrementalDecoder::new(true);
    let mut text = String::new();
    let mut at = 0;
    for &s in steps.iter().cycle() {
        if at >= ids.len() {
            break;
        }
        let end = (at + s.max(1)).min(ids.len());
        let delta = d.push(p, &ids[at..end]).unwrap();
        assert!(!delta.contains('\u{FFFD}') || p.decode(&ids[..end]).unwrap().contains('\u{FFFD}'));
        text.push_str(&delta);
        at = end;
    }
    text.push_str(&d.finish(p).unwrap());
    assert_eq!(text, p.decode(ids).unwrap(), "ids {ids:?}");
}

#[test]
fn multilingual_text_round_trips_token_by_token() {
    let p = qwen3();
    let text = "日本語とEnglish, Русский 🚀👩‍💻 ∑ᵢ aᵢ — العربية हिन्दी\n\tcode: fn main() {}";
    let ids = p.encode(text).unwrap();
    check(&ids, &[1]);
    check(&ids, &[2, 3, 1]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn random_ids_decode_the_same_incrementally(
        ids in prop::collection::vec(0u32..151_643, 0..48),
        steps in prop::collection::vec(1usize..5, 1..4),
    ) {
        check(&ids, &steps);
    }
}
