//! The reasoning split and the tool-call reader read what a worker streams: any text, cut
//! anywhere. Properties: no panic, and the same result however the text is chunked; text with
//! no marker passes through untouched.
use kvrouter_server::frontend::reasoning::{ReasoningParser, ReasoningSplit};
use kvrouter_server::frontend::tools::{ToolCallParser, ToolCallReader, ToolMode};
use proptest::prelude::*;

/// Text built from pieces that look like markers, JSON and multi-byte characters.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("</th".to_string()),
        Just("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>".to_string()),
        Just("<think>a</think>".to_string()),
        Just("<tool_call>".to_string()),
        Just("</tool_call>".to_string()),
        Just("<tool_".to_string()),
        Just("[TOOL_CALLS]".to_string()),
        Just("<|python_tag|>".to_string()),
        Just("{\"name\": \"f\", \"arguments\": {\"x\": 1}}".to_string()),
        Just("[{\"name\": \"g\", \"arguments\": {}}]".to_string()),
        Just(";".to_string()),
        Just(" ".to_string()),
        Just("  ".to_string()),
        Just("\n".to_string()),
        Just(" x".to_string()),
        "[a-z{}\":<>/]{0,6}",
        "\\PC{0,3}",
    ];
    prop::collection::vec(piece, 0..16).prop_map(|v| v.concat())
}

/// `s` cut at the given fractions (on char boundaries).
fn chunks(s: &str, cuts: &[f64]) -> Vec<String> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|f| {
            let mut i = (f * s.len() as f64) as usize;
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            i
        })
        .collect();
    at.push(0);
    at.push(s.len());
    at.sort_unstable();
    at.windows(2).map(|w| s[w[0]..w[1]].to_string()).collect()
}

fn split(p: ReasoningParser, parts: &[String]) -> (String, String) {
    let mut r = ReasoningSplit::new(p);
    let (mut a, mut b) = (String::new(), String::new());
    for c in parts {
        let o = r.push(c);
        a += &o.reasoning;
        b += &o.content;
    }
    let o = r.finish();
    (a + &o.reasoning, b + &o.content)
}

fn read(mode: ToolMode, parts: &[String]) -> (String, Vec<(String, String)>) {
    let mut r = ToolCallReader::new(mode);
    let (mut content, mut calls) = (String::new(), Vec::new());
    for c in parts {
        let o = r.push(c);
        content += &o.content;
        calls.extend(o.calls.into_iter().map(|c| (c.name, c.arguments)));
    }
    let o = r.finish();
    content += &o.content;
    calls.extend(o.calls.into_iter().map(|c| (c.name, c.arguments)));
    (content, calls)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn reasoning_split_does_not_depend_on_chunking(s in text(), cuts in prop::collection::vec(0.0..1.0f64, 0..16)) {
        for p in [ReasoningParser::Qwen3, ReasoningParser::DeepseekR1] {
            let whole = split(p, std::slice::from_ref(&s));
            prop_assert_eq!(split(p, &chunks(&s, &cuts)), whole.clone(), "{:?}", p);
            if !s.contains("think>") {
                // Nothing to split: all content (qwen3) or all reasoning (deepseek_r1).
                let all = whole.0.clone() + &whole.1;
                prop_assert_eq!(all, s.clone());
            }
        }
    }

    #[test]
    fn tool_calls_do_not_depend_on_chunking(s in text(), cuts in prop::collection::vec(0.0..1.0f64, 0..16)) {
        for mode in [
            ToolMode::Auto(ToolCallParser::Hermes),
            ToolMode::Auto(ToolCallParser::Llama3Json),
            ToolMode::Auto(ToolCallParser::Mistral),
            ToolMode::Required,
            ToolMode::Named("f".into()),
        ] {
            let whole = read(mode.clone(), std::slice::from_ref(&s));
            prop_assert_eq!(read(mode.clone(), &chunks(&s, &cuts)), whole.clone(), "{:?}", mode);
            for (_, args) in &whole.1 {
                prop_assert!(serde_json::from_str::<serde_json::Value>(args).is_ok(), "arguments are JSON: {}", args);
            }
        }
        if !s.contains("<tool_call>") {
            prop_assert_eq!(read(ToolMode::Auto(ToolCallParser::Hermes), std::slice::from_ref(&s)), (s.clone(), vec![]));
        }
    }
}
