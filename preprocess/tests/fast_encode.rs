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
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_texts_match_the_library(parts in prop::collection::vec(piece(), 0..40)) {
        let text: String = parts.concat();
        let p = qwen3();
        prop_assert_eq!(p.encode(&text).unwrap(), p.encode_reference(&text, false).unwrap(), "text {:?}", text);
    }
}
