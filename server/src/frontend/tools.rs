//! Tool calls: the model's tool-call text parsed into OpenAI `tool_calls`, streamed or whole,
//! with `--tool-call-parser` named as vLLM names its parsers:
//!
//! * `hermes` (Qwen2.5/Qwen3, Hermes): `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`,
//!   any number of them, text before the first one is content;
//! * `llama3_json`: the whole output is `{"name": …, "parameters": {…}}` (or `arguments`),
//!   several separated by `;`, optionally after `<|python_tag|>`;
//! * `mistral`: content, then `[TOOL_CALLS]` and a JSON array of `{"name", "arguments"}`.
//!
//! With `tool_choice` `required` or a named function the worker is constrained to JSON (see
//! [`required_schema`]) and the output is read as that JSON, as vLLM does.
//!
//! Text that does not parse as a tool call is returned as content, never dropped. A call is
//! emitted whole once its closing marker (or the end of the output) is reached; content around
//! calls streams as it comes, with a possible partial marker held back.

use std::str::FromStr;

use serde_json::{json, Value};

use super::reasoning::partial_tag_len;

/// Which tool-call format the model writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallParser {
    Hermes,
    Llama3Json,
    Mistral,
}

impl FromStr for ToolCallParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hermes" => Ok(Self::Hermes),
            "llama3_json" => Ok(Self::Llama3Json),
            "mistral" => Ok(Self::Mistral),
            _ => Err(format!(
                "unknown tool-call parser {s:?}: expected hermes, llama3_json or mistral"
            )),
        }
    }
}

/// One parsed call: the function's name and its arguments as a JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// How a request's output is read for tool calls.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolMode {
    /// `tool_choice: "auto"` with a configured parser.
    Auto(ToolCallParser),
    /// `tool_choice: "required"`: the output is a JSON array of `{"name", "parameters"}`.
    Required,
    /// A named function: the output is its arguments.
    Named(String),
}

/// The structured-output schema that makes a worker write tool calls, vLLM's
/// (`_get_json_schema_from_tool` in `vllm/entrypoints/openai/protocol.py`): for `required`, an
/// array (at least one; at most one without parallel calls) of `{"name", "parameters"}`
/// objects, one variant per tool; for a named function, its `parameters`.
pub fn required_schema(tools: &[Value], named: Option<&str>, parallel: bool) -> Option<Value> {
    let params = |t: &Value| {
        t.pointer("/function/parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}))
    };
    if let Some(name) = named {
        let t = tools
            .iter()
            .find(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))?;
        return Some(params(t));
    }
    let variants: Vec<Value> = tools
        .iter()
        .map(|t| {
            let name = t.pointer("/function/name").cloned().unwrap_or(Value::Null);
            json!({
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params(t)},
                "required": ["name", "parameters"],
            })
        })
        .collect();
    let mut s = json!({"type": "array", "minItems": 1, "items": {"anyOf": variants}});
    if !parallel {
        s["maxItems"] = json!(1);
    }
    Some(s)
}

/// A call from a JSON object with a name and `arguments` (or `parameters`).
fn call_from(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => {
            serde_json::from_str::<Value>(s).ok()?;
            s.clone()
        }
        Some(a) => a.to_string(),
    };
    Some(ToolCall { name, arguments })
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_TOKEN: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Streaming content, watching for the start of a call.
    Content,
    /// Inside a Hermes `<tool_call>` block.
    InCall,
    /// Everything from here to the end is read as JSON at the end.
    Rest,
}

/// One choice's tool-call reader, fed the output (after any reasoning split) chunk by chunk.
#[derive(Debug)]
pub struct ToolCallReader {
    mode: ToolMode,
    state: State,
    held: String,
    /// At the start of the output (nothing but whitespace seen yet).
    at_start: bool,
    /// Nothing but whitespace since the last call (whitespace between calls is not content).
    after_call: bool,
    /// Calls emitted so far.
    pub calls: usize,
}

/// What a chunk of output turned into.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

impl ToolCallReader {
    pub fn new(mode: ToolMode) -> Self {
        let state = match mode {
            ToolMode::Auto(_) => State::Content,
            ToolMode::Required | ToolMode::Named(_) => State::Rest,
        };
        Self {
            mode,
            state,
            held: String::new(),
            at_start: true,
            after_call: false,
            calls: 0,
        }
    }

    /// How this reader reads the output.
    pub fn mode(&self) -> &ToolMode {
        &self.mode
    }

    /// Feed the next chunk of output.
    pub fn push(&mut self, text: &str) -> Parsed {
        let mut out = Parsed::default();
        self.held.push_str(text);
        loop {
            match self.state {
                State::Rest => return out,
                State::InCall => {
                    let Some(i) = self.held.find(HERMES_CLOSE) else {
                        return out;
                    };
                    let body = self.held[..i].to_string();
                    self.held.drain(..i + HERMES_CLOSE.len());
                    self.hermes_call(&body, true, &mut out);
                    self.state = State::Content;
                }
                State::Content => {
                    let parser = match self.mode {
                        ToolMode::Auto(p) => p,
                        _ => unreachable!("required and named read the rest"),
                    };
                    if self.at_start {
                        let t = self.held.trim_start();
                        if t.is_empty() {
                            return out;
                        }
                        if parser == ToolCallParser::Llama3Json {
                            if t.starts_with('{') || t.starts_with(PYTHON_TAG) {
                                self.state = State::Rest;
                                return out;
                            }
                            if PYTHON_TAG.starts_with(t) {
                                return out;
                            }
                        }
                        self.at_start = false;
                    }
                    let tag = match parser {
                        ToolCallParser::Hermes => HERMES_OPEN,
                        ToolCallParser::Mistral => MISTRAL_TOKEN,
                        ToolCallParser::Llama3Json => {
                            out.content.push_str(&self.held);
                            self.held.clear();
                            return out;
                        }
                    };
                    if let Some(i) = self.held.find(tag) {
                        let before = &self.held[..i];
                        // Whitespace between calls is not content.
                        if !before.trim().is_empty() {
                            self.after_call = false;
                        }
                        if !self.after_call {
                            out.content.push_str(before);
                        }
                        self.held.drain(..i + tag.len());
                        self.state = match parser {
                            ToolCallParser::Hermes => State::InCall,
                            _ => State::Rest,
                        };
                    } else {
                        let keep = partial_tag_len(&self.held, tag);
                        let emit = self.held.len() - keep;
                        if self.after_call && self.held[..emit].trim().is_empty() {
                            // Whitespace after a call: content if text follows, dropped if
                            // another call or the end does; held until we know.
                            return out;
                        }
                        if emit > 0 {
                            self.after_call = false;
                        }
                        out.content.push_str(&self.held[..emit]);
                        self.held.drain(..emit);
                        return out;
                    }
                }
            }
        }
    }

    /// A Hermes block's body: a call, or (not JSON) the block back as content.
    fn hermes_call(&mut self, body: &str, closed: bool, out: &mut Parsed) {
        match serde_json::from_str::<Value>(body.trim())
            .ok()
            .as_ref()
            .and_then(call_from)
        {
            Some(c) => {
                self.calls += 1;
                self.after_call = true;
                out.calls.push(c);
            }
            None => {
                self.after_call = false;
                out.content.push_str(HERMES_OPEN);
                out.content.push_str(body);
                if closed {
                    out.content.push_str(HERMES_CLOSE);
                }
            }
        }
    }

    /// The output ended: calls in what was held back, or that text as content.
    pub fn finish(&mut self) -> Parsed {
        let mut out = Parsed::default();
        let held = std::mem::take(&mut self.held);
        match (&self.state, &self.mode) {
            (State::InCall, _) => self.hermes_call(&held, false, &mut out),
            (State::Content, _) => {
                if !self.after_call || !held.trim().is_empty() {
                    out.content = held;
                }
            }
            (State::Rest, mode) => {
                let calls = match mode {
                    ToolMode::Named(name) => {
                        serde_json::from_str::<Value>(held.trim()).ok().map(|args| {
                            vec![ToolCall {
                                name: name.clone(),
                                arguments: args.to_string(),
                            }]
                        })
                    }
                    ToolMode::Required => match serde_json::from_str::<Value>(held.trim()) {
                        Ok(Value::Array(a)) if !a.is_empty() => {
                            a.iter().map(call_from).collect::<Option<Vec<_>>>()
                        }
                        _ => None,
                    },
                    ToolMode::Auto(ToolCallParser::Mistral) => {
                        match serde_json::from_str::<Value>(held.trim()) {
                            Ok(Value::Array(a)) if !a.is_empty() => {
                                a.iter().map(call_from).collect::<Option<Vec<_>>>()
                            }
                            Ok(v @ Value::Object(_)) => call_from(&v).map(|c| vec![c]),
                            _ => None,
                        }
                    }
                    ToolMode::Auto(_) => {
                        let t = held.trim();
                        let t = t.strip_prefix(PYTHON_TAG).unwrap_or(t);
                        t.split(';')
                            .map(|p| {
                                serde_json::from_str::<Value>(p.trim())
                                    .ok()
                                    .as_ref()
                                    .and_then(call_from)
                            })
                            .collect::<Option<Vec<_>>>()
                    }
                };
                match calls {
                    Some(c) => {
                        self.calls += c.len();
                        out.calls = c;
                    }
                    None => {
                        if matches!(self.mode, ToolMode::Auto(ToolCallParser::Mistral)) {
                            out.content.push_str(MISTRAL_TOKEN);
                        }
                        out.content.push_str(&held);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: ToolMode, text: &str, step: usize) -> Parsed {
        let mut r = ToolCallReader::new(mode);
        let mut all = Parsed::default();
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            let o = r.push(&text[i..j]);
            all.content += &o.content;
            all.calls.extend(o.calls);
            i = j;
        }
        let o = r.finish();
        all.content += &o.content;
        all.calls.extend(o.calls);
        all
    }

    fn call(name: &str, args: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn every_parser_reads_its_format_in_any_chunking() {
        let hermes = ToolMode::Auto(ToolCallParser::Hermes);
        let llama = ToolMode::Auto(ToolCallParser::Llama3Json);
        let mistral = ToolMode::Auto(ToolCallParser::Mistral);
        let w = r#"{"city":"Paris"}"#;
        let cases: Vec<(ToolMode, &str, &str, Vec<ToolCall>)> = vec![
            (hermes.clone(), "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", "", vec![call("get_weather", w)]),
            (hermes.clone(), "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>", "Let me check.\n", vec![call("a", "{}"), call("b", "{\"x\": 1}")]),
            (hermes.clone(), "No tools needed: 1 < 2.", "No tools needed: 1 < 2.", vec![]),
            (hermes.clone(), "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", vec![]),
            (hermes.clone(), "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}", "", vec![call("a", "{}")]),
            (llama.clone(), "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", "", vec![call("get_weather", w)]),
            (llama.clone(), "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {}}", "", vec![call("a", "{}"), call("b", "{}")]),
            (llama.clone(), "{not a call", "{not a call", vec![]),
            (llama.clone(), "Plain answer.", "Plain answer.", vec![]),
            (mistral.clone(), "Sure.[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]", "Sure.", vec![call("get_weather", w)]),
            (mistral.clone(), "[TOOL_CALLS]oops", "[TOOL_CALLS]oops", vec![]),
            (ToolMode::Required, "[{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}]", "", vec![call("get_weather", w)]),
            (ToolMode::Named("get_weather".into()), "{\"city\": \"Paris\"}", "", vec![call("get_weather", w)]),
        ];
        for (mode, text, content, calls) in cases {
            for step in [1, 2, 4, 7, 1000] {
                let p = run(mode.clone(), text, step);
                assert_eq!(p.content, content, "{mode:?} {text:?} step {step}");
                assert_eq!(p.calls, calls, "{mode:?} {text:?} step {step}");
            }
        }
    }

    #[test]
    fn whitespace_after_a_call_is_kept_when_text_follows_in_any_chunking() {
        // Found by the chunking property (tests/parsers.rs): a whitespace-only chunk after a
        // call was dropped, so " x" streamed in two chunks came out as "x".
        let t = "<tool_call>{\"name\":\"f\",\"arguments\":{}}</tool_call> x";
        for step in [1, 2, 3, 1000] {
            assert_eq!(
                run(ToolMode::Auto(ToolCallParser::Hermes), t, step).content,
                " x",
                "step {step}"
            );
        }
        let t = "<tool_call>{\"name\":\"f\",\"arguments\":{}}</tool_call>\n \n";
        assert_eq!(
            run(ToolMode::Auto(ToolCallParser::Hermes), t, 1).content,
            ""
        );
    }

    #[test]
    fn content_streams_before_a_call_and_partial_tags_are_held() {
        let mut r = ToolCallReader::new(ToolMode::Auto(ToolCallParser::Hermes));
        assert_eq!(r.push("Checking <tool").content, "Checking ");
        let p = r.push("_call>{\"name\":\"f\",\"arguments\":{}}</tool_call>");
        assert_eq!((p.content.as_str(), p.calls), ("", vec![call("f", "{}")]));
    }

    #[test]
    fn the_required_schema_is_vllms() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}),
        ];
        let s = required_schema(&tools, None, false).unwrap();
        assert_eq!(s["type"], "array");
        assert_eq!(s["maxItems"], 1);
        assert_eq!(s["items"]["anyOf"][0]["properties"]["name"]["enum"][0], "f");
        let n = required_schema(&tools, Some("f"), true).unwrap();
        assert_eq!(n["properties"]["x"]["type"], "integer");
        assert!(required_schema(&tools, Some("g"), true).is_none());
    }
}
