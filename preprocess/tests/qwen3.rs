//! The real Qwen3 tokenizer files, as vendored in the repository (`models/qwen3/`).
use kvrouter_preprocess::{ChatTemplateArgs, PreprocessError, Preprocessor};
use serde_json::json;
use std::path::PathBuf;

fn qwen3_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qwen3")
}

fn qwen3() -> Preprocessor {
    Preprocessor::from_model_dir(qwen3_dir()).expect("load qwen3 tokenizer")
}

#[test]
fn hi_renders_and_encodes_exactly() {
    let p = qwen3();
    assert!(p.has_chat_template());
    let text = p
        .apply_chat_template(&json!([{"role": "user", "content": "Hi"}]), true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = p.encode(&text).unwrap();
    assert_eq!(
        ids,
        [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
    );
    // Decoding round-trips when special tokens are kept.
    assert_eq!(p.decode_with(&ids, false).unwrap(), text);
    assert_eq!(p.decode(&ids).unwrap(), "user\nHi\nassistant\n");
}

#[test]
fn config_facts() {
    let p = qwen3();
    assert_eq!(p.context_length(), Some(131072));
    assert_eq!(p.eos_token(), Some("<|im_end|>"));
    assert_eq!(p.eos_token_ids(), &[151645]);
    assert_eq!(p.bos_token(), None);
    assert_eq!(p.vocab_size(), 151669);
}

#[test]
fn without_generation_prompt_and_with_system_and_parts() {
    let p = qwen3();
    let msgs = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]);
    let text = p.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n"
    );
}

#[test]
fn tools_and_tool_role_and_kwargs() {
    let p = qwen3();
    let msgs = json!([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "sunny"},
    ]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
    let extra = json!({"enable_thinking": false});
    let text = p
        .render_chat(&ChatTemplateArgs {
            messages: &msgs,
            tools: Some(&tools),
            add_generation_prompt: true,
            extra: extra.as_object(),
        })
        .unwrap();
    assert!(text.starts_with("<|im_start|>system\n# Tools\n"), "{text}");
    // Python json.dumps separators, as transformers' tojson.
    assert!(
        text.contains("\n{\"function\": {\"name\": \"get_weather\"}, \"type\": \"function\"}\n")
            || text.contains(
                "\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"}}\n"
            ),
        "{text}"
    );
    assert!(text.contains(
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"
    ), "{text}");
    assert!(
        text.contains("<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"),
        "{text}"
    );
    assert!(
        text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{text}"
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let p = qwen3();
    assert!(matches!(
        p.apply_chat_template(&json!("not a list"), true),
        Err(PreprocessError::InvalidMessages(_))
    ));
    assert!(matches!(
        p.apply_chat_template(&json!([{"content": "no role"}]), true),
        Err(PreprocessError::InvalidMessages(_))
    ));
    assert!(matches!(
        p.decode(&[u32::MAX]),
        Err(PreprocessError::Decode(_))
    ));
    assert!(matches!(
        Preprocessor::from_model_dir("/nonexistent/dir"),
        Err(PreprocessError::Io { .. })
    ));
}

#[test]
fn raise_exception_and_missing_template() {
    let dir = std::env::temp_dir().join(format!("kvr-pre-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        qwen3_dir().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    // No config: no template.
    let p = Preprocessor::from_model_dir(&dir).unwrap();
    assert!(!p.has_chat_template());
    assert!(matches!(
        p.apply_chat_template(&json!([]), true),
        Err(PreprocessError::NoChatTemplate)
    ));
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% if messages|length == 0 %}{{ raise_exception('need a message') }}{% endif %}{{ bos_token }}x",
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<|im_start|>"}}"#,
    )
    .unwrap();
    let p = Preprocessor::from_model_dir(&dir).unwrap();
    match p.apply_chat_template(&json!([]), true) {
        Err(PreprocessError::TemplateRender(m)) => assert_eq!(m, "need a message"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.apply_chat_template(&json!([{"role": "user", "content": "a"}]), true)
            .unwrap(),
        "<|im_start|>x"
    );
    std::fs::write(dir.join("chat_template.jinja"), "{% if %}").unwrap();
    assert!(matches!(
        Preprocessor::from_model_dir(&dir),
        Err(PreprocessError::TemplateSyntax(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
