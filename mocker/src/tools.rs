//! Tool calls and reasoning blocks in the Hermes / Qwen3 format.
//!
//! Qwen3's chat template renders the request's `tools` into the system turn as
//!
//! ```text
//! You are provided with function signatures within <tools></tools> XML tags:
//! <tools>
//! {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
//! </tools>
//! ```
//!
//! one JSON tool per line, and tool results as a user turn of
//! `<tool_response>\n…\n</tool_response>` blocks. The model answers a call as
//! `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`. [`tools_in_text`] finds the
//! tools of a rendered prompt (what a router forwards as token ids), [`hermes_call`] writes the
//! call. With reasoning on, Qwen3 opens its answer with `<think>\n…\n</think>\n\n` unless the
//! prompt already ends with the empty block `enable_thinking: false` appends
//! ([`ends_with_empty_think`]).
use serde_json::Value;

use crate::sampling::Rng;
use crate::structured;

/// A function a request offers.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    /// Function name.
    pub name: String,
    /// JSON Schema of its arguments (`{}` when absent).
    pub parameters: Value,
}

/// Reads one tool: `{"type": "function", "function": {"name", "parameters", …}}` or a bare
/// `{"name", "parameters"}`.
pub fn tool_from_json(v: &Value) -> Option<Tool> {
    let f = v.get("function").unwrap_or(v);
    let name = f.get("name")?.as_str()?.to_owned();
    let parameters = f
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));
    Some(Tool { name, parameters })
}

/// The tools of a request's `tools` field (entries that are not functions skipped).
pub fn tools_from_request(tools: &Value) -> Vec<Tool> {
    tools
        .as_array()
        .map(|a| a.iter().filter_map(tool_from_json).collect())
        .unwrap_or_default()
}

/// The tools listed in the `<tools>\n…\n</tools>` section of a rendered prompt, in order
/// (lines that are not JSON tools skipped; none when there is no section).
pub fn tools_in_text(text: &str) -> Vec<Tool> {
    let Some(start) = text.find("<tools>\n") else {
        return Vec::new();
    };
    let body = &text[start + "<tools>\n".len()..];
    let Some(end) = body.find("</tools>") else {
        return Vec::new();
    };
    body[..end]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter_map(|v| tool_from_json(&v))
        .collect()
}

/// Whether the conversation's last turn (before the generation prompt) is a tool response,
/// i.e. the model should now answer rather than call a tool. With ChatML markers
/// (`<|im_start|>`) the last turn is the one before a trailing `<|im_start|>assistant`
/// prompt; without them, whether the text ends shortly after a `</tool_response>`.
pub fn last_turn_is_tool_response(text: &str) -> bool {
    const START: &str = "<|im_start|>";
    if text.contains(START) {
        let mut turns: Vec<&str> = text.split(START).collect();
        if turns
            .last()
            .is_some_and(|t| t.starts_with("assistant") && !t.contains("<|im_end|>"))
        {
            turns.pop();
        }
        return turns.last().is_some_and(|t| t.contains("<tool_response>"));
    }
    match text.rfind("</tool_response>") {
        Some(p) => text.len() - p < "</tool_response>".len() + 64,
        None => false,
    }
}

/// Whether the prompt ends with Qwen3's empty think block (`enable_thinking: false`).
pub fn ends_with_empty_think(text: &str) -> bool {
    text.ends_with("<think>\n\n</think>\n\n")
}

/// One Hermes tool call of `tool` with arguments made up from its parameters schema (`{}`
/// when the schema cannot be honoured).
pub fn hermes_call(tool: &Tool, rng: &mut Rng) -> String {
    let args = match structured::generate(&tool.parameters, rng) {
        Ok(v @ Value::Object(_)) => v,
        _ => Value::Object(Default::default()),
    };
    format!(
        "<tool_call>\n{{\"name\": {}, \"arguments\": {}}}\n</tool_call>",
        Value::String(tool.name.clone()),
        structured::to_text(&args)
    )
}

const THOUGHTS: &[&str] = &[
    "Okay, let me think about what is being asked here.",
    "The user wants a clear and direct answer.",
    "I should check the details before responding.",
    "Let me consider the relevant facts first.",
    "There may be more than one way to approach this.",
    "I will keep the answer short and accurate.",
    "It helps to break the problem into smaller steps.",
    "Nothing in the request looks ambiguous.",
];

/// A reasoning block: `<think>\n` + a few sentences + `\n</think>\n\n`.
pub fn reasoning_block(rng: &mut Rng) -> String {
    let n = rng.range(2, 4);
    let mut s = String::from("<think>\n");
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        let t = *rng.pick(THOUGHTS);
        s.push_str(t);
    }
    s.push_str("\n</think>\n\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_tools_and_tool_responses() {
        let text = "<|im_start|>system\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n</tools>\n\nFor each function call ...<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n";
        let tools = tools_in_text(text);
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0].name, "get_weather");
        assert!(!last_turn_is_tool_response(text));
        let answered = format!("{text}<tool_call>\n{{}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n");
        assert!(last_turn_is_tool_response(&answered));
        let call = hermes_call(&tools[0], &mut Rng::new(3));
        let inner = call
            .strip_prefix("<tool_call>\n")
            .and_then(|c| c.strip_suffix("\n</tool_call>"))
            .unwrap();
        let v: Value = serde_json::from_str(inner).unwrap();
        assert_eq!(v["name"], "get_weather");
        assert!(v["arguments"]["city"].is_string());
        assert_eq!(
            tools_from_request(&json!([{"type": "function", "function": {"name": "f"}}]))[0].name,
            "f"
        );
    }
}
