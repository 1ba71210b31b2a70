//! The fast encode path gives exactly the `tokenizers` library's ids, on hostile and
//! realistic text, with the vendored Qwen3 tokenizer.
use std::path::PathBuf;
use std::sync::OnceLock;

use kvrouter_preprocess::Preprocessor;
use proptest::prelude::*;

fn qwen3() -> &'static Preprocessor {
    static P: OnceLock<Preprocessor> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qwen3");
        Preprocessor::from_model_dir(dir).expect("vendored Qwen3 tokenizer loads")
    })
}

fn same(text: &str) {
    let p = qwen3();
    let fast = p.encode(text).expect("fast");
    let reference = p.encode_reference(text, false).expect("reference");
    assert_eq!(fast, reference, "ids differ for {text:?}");
    assert_eq!(
        p.encode_with(text, true).unwrap(),
        p.encode_reference(text, true).unwrap()
    );
}

#[test]
fn qwen3_takes_the_fast_path() {
    assert!(qwen3().has_fast_encode());
}

#[test]
fn realistic_texts_match_the_library() {
    let chat = qwen3()
        .apply_chat_template(
            &serde_json::json!([
                {"role": "system", "content": "You are a helpful assistant.\n\nRules:\n  1. Be brief.\r\n  2. Cite sources."},
                {"role": "user", "content": "What's 2+2? I'd like   it   explained... <think>maybe</think>"},
                {"role": "assistant", "content": "It's 4.\n\n\n"},
                {"role": "user", "content": "Ünïcödé tëxt, 中文, emoji 🙂, tabs\tand\u{a0}nbsp; CRLF\r\n"},
            ]),
            true,
        )
        .unwrap();
    for t in [
        chat.as_str(),
        "",
        " ",
        "\n\n",
        "Hello world",
        "  leading and trailing  ",
        "don't can't WON'T we'VE they'll I'm he'd",
        "12345 3.14159 1e-9 0x1F",
        "fn main() {\n    println!(\"hi\");\n}\n",
        "<|im_start|><|im_end|><|im_start|>user\n<|im_end|>",
        "<|im_start|x <|endoftext|>text<|endoftext|",
        "a<tool_call>{\"name\": \"f\"}</tool_call>b",
        "   \n   \n\t\t\n",
        "e\u{301} vs é",
        "'\u{17f}a x'\u{17f}t '\u{212a} 'S",
        include_str!("../src/lib.rs"),
    ] {
        same(t);
    }
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z]{1,8}",
        "[0-9]{1,4}",
        "[ \t\r\n]{1,4}",
        "[\x00-\x1f\x7f]{1,3}",
        "[ '\t\r\n]{1,6}",
        "[!-/:-@\\[-`{-~]{1,3}",
        Just("'s".to_string()),
        Just("'LL".to_string()),
        Just("<|im_start|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<think>".to_string()),
        Just("<|im_".to_string()),
        "[àéîõüß中文日本語🙂\u{a0}\u{301}]{1,3}",
        // Every script and the classes' edges: CJK, kana, Hangul, Cyrillic, Greek, Arabic,
        // Hebrew, Devanagari (with its combining marks), Thai, emoji with ZWJ and flags,
        // fullwidth and other numbers (Nd, Nl, No), Unicode spaces (NEL, NBSP, ideographic,
        // line and paragraph separators), long s (folds to s), math and currency.
        "[\u{4e00}-\u{9fff}\u{3040}-\u{30ff}\u{ac00}-\u{d7a3}]{1,6}",
        "[\u{400}-\u{4ff}\u{370}-\u{3ff}]{1,6}",
        "[\u{600}-\u{6ff}\u{5d0}-\u{5ea}\u{900}-\u{97f}\u{e00}-\u{e7f}]{1,6}",
        "[\u{1f300}-\u{1faff}\u{200d}\u{fe0f}\u{1f1e6}-\u{1f1ff}]{1,4}",
        "[\u{ff10}-\u{ff19}\u{2160}-\u{2188}\u{b2}\u{b3}\u{b9}\u{bc}-\u{be}\u{660}-\u{669}]{1,3}",
        "[\u{85}\u{a0}\u{1680}\u{2000}-\u{200b}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}\u{feff} \n]{1,4}",
        "['\u{17f}\u{212a}sStT]{1,3}",
        "[\u{2200}-\u{22ff}\u{20a0}-\u{20bf}\u{2190}-\u{21ff}\u{300}-\u{36f}]{1,4}",
        "\\PC{1,4}",
    ]
}

/// Text the model could produce: random Qwen3 ids (below the special tokens) decoded.
fn decoded() -> impl Strategy<Value = String> {
    prop::collection::vec(0u32..151_643, 1..24)
        .prop_map(|ids| qwen3().decode(&ids).unwrap_or_default())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_texts_match_the_library(parts in prop::collection::vec(piece(), 0..40)) {
        let text: String = parts.concat();
        let p = qwen3();
        prop_assert_eq!(p.encode(&text).unwrap(), p.encode_reference(&text, false).unwrap(), "text {:?}", text);
    }

    #[test]
    fn decoded_model_output_matches_the_library(parts in prop::collection::vec(decoded(), 1..6)) {
        let text: String = parts.concat();
        let p = qwen3();
        prop_assert_eq!(p.encode(&text).unwrap(), p.encode_reference(&text, false).unwrap(), "text {:?}", text);
    }
}

#[test]
fn multilingual_sample_matches_the_library() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/data/multilingual.txt"),
    )
    .unwrap();
    same(&text);
    for line in text.lines() {
        same(line);
    }
}
