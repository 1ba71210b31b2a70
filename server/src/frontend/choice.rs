//! One choice of a response (`n` of them per request) as its worker events arrive: the text
//! run through the reasoning split and the tool-call reader when the request has them, what a
//! streamed chunk of it carries ([`Delta`]), and what a whole response accumulates.

use serde_json::Value;

use super::logprobs::{chat_entries, JoinedCompletions, LogprobsOut};
use super::reasoning::{ReasoningParser, ReasoningSplit};
use super::tools::{ToolCall, ToolCallReader, ToolMode};

/// How a request's output is read and shaped (the same for each of its choices).
#[derive(Clone, Debug, Default)]
pub struct OutputOptions {
    /// Choices per request (`n`).
    pub n: u32,
    /// `stream_options.include_usage`: a final usage chunk.
    pub include_usage: bool,
    pub reasoning: Option<ReasoningParser>,
    pub tools: Option<ToolMode>,
    /// `parallel_tool_calls: false` keeps the first call only.
    pub parallel_tool_calls: bool,
    pub logprobs: Option<LogprobsOut>,
    /// `stream_options.continuous_usage_stats`: usage in every chunk.
    pub continuous_usage: bool,
}

impl OutputOptions {
    /// Whether a chunk is only text: the frontend's fast path writes it without a JSON tree.
    pub fn plain(&self) -> bool {
        self.reasoning.is_none()
            && self.tools.is_none()
            && self.logprobs.is_none()
            && !self.continuous_usage
    }
}

/// What one streamed chunk of a choice carries.
#[derive(Debug, Default)]
pub struct Delta {
    pub content: String,
    pub reasoning: String,
    /// New calls, with their index among the choice's calls.
    pub calls: Vec<(usize, ToolCall)>,
    /// Chat: `logprobs.content` entries; completions: the worker's object.
    pub logprobs: Option<Value>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.content.is_empty()
            && self.reasoning.is_empty()
            && self.calls.is_empty()
            && self.logprobs.is_none()
    }
}

/// One choice in flight.
pub struct Choice {
    pub index: u32,
    reasoning: Option<ReasoningSplit>,
    tools: Option<ToolCallReader>,
    parallel: bool,
    logprobs: Option<LogprobsOut>,
    /// The role was sent (first chat chunk).
    pub role_sent: bool,
    /// The worker's finish reason.
    pub finish: Option<String>,
    /// Calls found so far.
    pub calls: Vec<ToolCall>,
    /// Whole response: content, reasoning, logprobs so far.
    pub content: String,
    pub reasoning_text: String,
    chat_logprobs: Vec<Value>,
    completion_logprobs: JoinedCompletions,
}

impl Choice {
    pub fn new(index: u32, o: &OutputOptions) -> Self {
        Self {
            index,
            reasoning: o.reasoning.map(ReasoningSplit::new),
            tools: o.tools.clone().map(ToolCallReader::new),
            parallel: o.parallel_tool_calls,
            logprobs: o.logprobs,
            role_sent: false,
            finish: None,
            calls: Vec::new(),
            content: String::new(),
            reasoning_text: String::new(),
            chat_logprobs: Vec::new(),
            completion_logprobs: JoinedCompletions::default(),
        }
    }

    /// Read one event's text and logprobs; `last` when the worker says the choice finished.
    pub fn push(&mut self, text: &str, logprobs: Option<&str>, last: bool) -> Delta {
        let mut d = Delta::default();
        let (mut reasoning, mut content) = match &mut self.reasoning {
            Some(r) => {
                let mut s = r.push(text);
                if last {
                    let f = r.finish();
                    s.reasoning += &f.reasoning;
                    s.content += &f.content;
                }
                (s.reasoning, s.content)
            }
            None => (String::new(), text.to_string()),
        };
        if let Some(t) = &mut self.tools {
            let mut p = t.push(&content);
            if last {
                let f = t.finish();
                p.content += &f.content;
                p.calls.extend(f.calls);
            }
            content = p.content;
            for c in p.calls {
                if self.parallel || self.calls.is_empty() {
                    d.calls.push((self.calls.len(), c.clone()));
                    self.calls.push(c);
                }
            }
        }
        std::mem::swap(&mut d.reasoning, &mut reasoning);
        d.content = content;
        if let (Some(mode), Some(raw)) = (self.logprobs, logprobs) {
            match mode {
                LogprobsOut::Completions => {
                    self.completion_logprobs.push(raw);
                    d.logprobs = serde_json::from_str(raw).ok();
                }
                LogprobsOut::Chat { top } => {
                    let e = chat_entries(raw, top);
                    self.chat_logprobs.extend(e.iter().cloned());
                    d.logprobs = Some(Value::Array(e));
                }
            }
        }
        self.content += &d.content;
        self.reasoning_text += &d.reasoning;
        d
    }

    /// The finish reason the client sees: `tool_calls` when calls were made and the model
    /// stopped (auto and `required`, as vLLM; a named function keeps `stop`).
    pub fn finish_reason(&self) -> Option<String> {
        let f = self.finish.clone()?;
        let tool_finish = matches!(
            self.tools.as_ref().map(ToolCallReader::mode),
            Some(ToolMode::Auto(_) | ToolMode::Required)
        );
        Some(if f == "stop" && tool_finish && !self.calls.is_empty() {
            "tool_calls".to_string()
        } else {
            f
        })
    }

    /// The whole response's logprobs, in the endpoint's shape, if asked for.
    pub fn logprobs_value(&mut self) -> Value {
        match self.logprobs {
            None => Value::Null,
            Some(LogprobsOut::Completions) => {
                std::mem::take(&mut self.completion_logprobs).into_value()
            }
            Some(LogprobsOut::Chat { .. }) => {
                serde_json::json!({"content": std::mem::take(&mut self.chat_logprobs)})
            }
        }
    }
}
