//! The prompt-prefix cache gives exactly a fresh tokenization's ids, turn after turn of a
//! conversation rendered by the real Qwen3 chat template, and reuses the earlier turns.
use std::path::PathBuf;
use std::sync::OnceLock;

use kvrouter_preprocess::{Preprocessor, PromptCache};
use proptest::prelude::*;
use serde_json::json;

fn qwen3() -> &'static Preprocessor {
    static P: OnceLock<Preprocessor> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qwen3");
        Preprocessor::from_model_dir(dir).expect("vendored Qwen3 tokenizer loads")
    })
}

/// The rendered prompt of a conversation of `turns` (user, assistant) pairs plus one user
/// message, with the generation prompt.
fn render(system: &str, turns: &[(String, String)], last: &str) -> String {
    let mut msgs = vec![json!({"role": "system", "content": system})];
    for (u, a) in turns {
        msgs.push(json!({"role": "user", "content": u}));
        msgs.push(json!({"role": "assistant", "content": a}));
    }
    msgs.push(json!({"role": "user", "content": last}));
    qwen3().apply_chat_template(&json!(msgs), true).unwrap()
}

#[test]
fn a_twenty_turn_conversation_is_exact_and_reuses_its_history() {
    let p = qwen3();
    let cache = PromptCache::new(1 << 20);
    let system = "You are a meticulous assistant. ".repeat(40);
    let mut turns = Vec::new();
    for k in 0..20 {
        let user = format!("Question {k}: what about 東京 and Москва, item {}?", k * 7);
        let text = render(&system, &turns, &user);
        let cached = p.encode_cached(&text, &cache).unwrap();
        assert_eq!(
            cached,
            p.encode_reference(&text, false).unwrap(),
            "turn {k}"
        );
        turns.push((user, format!("Answer {k}: 🚀 {}", "details ".repeat(k + 3))));
    }
    let s = cache.stats();
    assert!(s.hits >= 18, "later turns reuse earlier ones: {s:?}");
}

#[test]
fn prompts_full_of_added_tokens_and_without_any() {
    let p = qwen3();
    let cache = PromptCache::new(1 << 16);
    let many = "<|im_start|>x<|im_end|>".repeat(5000);
    for t in [
        many.as_str(),
        "plain text, no special token at all",
        "",
        "<|im_end|>",
    ] {
        assert_eq!(
            p.encode_cached(t, &cache).unwrap(),
            p.encode_reference(t, false).unwrap()
        );
        assert_eq!(
            p.encode_cached(t, &cache).unwrap(),
            p.encode_reference(t, false).unwrap()
        );
    }
}

fn content() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z ]{0,40}",
        "[\\u{4e00}-\\u{4e40} \\n]{0,20}",
        Just("<|im_end|>".to_string()),
        Just("<think>\nhmm\n</think>\n\n".to_string()),
        Just("<|im_start|>assistant".to_string()),
        "\\PC{0,10}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_conversations_match_a_fresh_encode(
        system in content(),
        turns in prop::collection::vec((content(), content()), 0..8),
        last in content(),
    ) {
        let p = qwen3();
        let cache = PromptCache::new(4096);
        for k in 0..=turns.len() {
            let text = render(&system, &turns[..k], &last);
            prop_assert_eq!(p.encode_cached(&text, &cache).unwrap(), p.encode_reference(&text, false).unwrap());
        }
    }
}
