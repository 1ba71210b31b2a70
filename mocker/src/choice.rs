//! The HTTP side of one choice: its tokens turned into text deltas (stop strings cut, text
//! held back while it could still start one, as vLLM's detokenizer does), its finish reason,
//! and its logprobs in the completions or chat shape.
use std::sync::Arc;

use kvrouter_preprocess::Preprocessor;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;

use crate::engine::{StopReason, TokenOutput};
use crate::sampling::{alternative_token, PositionLogprobs, StopSpec, StopText};

/// Per-request settings shared by its choices.
#[derive(Debug, Clone)]
pub struct ChoiceSpec {
    /// Chat API shapes (else completions).
    pub chat: bool,
    /// Stop conditions.
    pub stop: Arc<StopSpec>,
    /// Characters a stream holds back ([`StopSpec::buffer_chars`]).
    pub hold_chars: usize,
    /// Alternatives per position when logprobs are asked for.
    pub logprobs: Option<usize>,
    /// EOS ids (a stopping EOS adds no text).
    pub eos: Vec<u32>,
    /// Alternatives are drawn from `0..output_vocab`.
    pub output_vocab: u32,
    /// Streamed: each delta's `text_offset` starts at the text already sent (vLLM).
    pub streaming: bool,
}

/// How a choice finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// `"stop"` or `"length"`.
    pub reason: &'static str,
    /// The stop string or stop token id; null for EOS and length.
    pub stop_reason: Value,
}

/// vLLM's `finish_reason` / `stop_reason` for a request that ended with `stop` (None: by
/// length).
pub fn finish_of(stop: Option<StopReason>, spec: &StopSpec) -> Finish {
    match stop {
        None => Finish {
            reason: "length",
            stop_reason: Value::Null,
        },
        Some(StopReason::Eos) => Finish {
            reason: "stop",
            stop_reason: Value::Null,
        },
        Some(StopReason::TokenId(id)) => Finish {
            reason: "stop",
            stop_reason: id.into(),
        },
        Some(StopReason::Str(i)) => Finish {
            reason: "stop",
            stop_reason: spec
                .strings
                .get(i)
                .map_or(Value::Null, |s| Value::String(s.clone())),
        },
    }
}

/// What one token adds to a choice.
#[derive(Debug, Default)]
pub struct Delta {
    /// Text now visible.
    pub text: String,
    /// Logprobs of the token, when asked for.
    pub logprobs: Option<Logprobs>,
    /// Set on the choice's last token.
    pub finish: Option<Finish>,
}

/// One choice's output state.
#[derive(Debug)]
pub struct ChoiceState {
    spec: Arc<ChoiceSpec>,
    pre: Option<Arc<Preprocessor>>,
    seed: u64,
    text: StopText,
    /// Bytes of `text.text` already handed out.
    sent: usize,
    /// Characters of it (for `text_offset`).
    sent_chars: usize,
    /// Output tokens so far.
    pub generated: usize,
    /// Set once finished.
    pub finish: Option<Finish>,
    /// Prompt tokens and cache hit reported with the last token.
    pub usage: (usize, usize),
    /// Logprobs accumulated (non-streamed).
    logprobs: Option<Logprobs>,
    next_offset: usize,
}

impl ChoiceState {
    /// A choice whose tokens were chosen with `seed` (its logprobs derive from it too).
    pub fn new(spec: Arc<ChoiceSpec>, pre: Option<Arc<Preprocessor>>, seed: u64) -> Self {
        Self {
            spec,
            pre,
            seed,
            text: StopText::new(),
            sent: 0,
            sent_chars: 0,
            generated: 0,
            finish: None,
            usage: (0, 0),
            logprobs: None,
            next_offset: 0,
        }
    }

    /// Adds the engine's next token. After the choice finished (a stop string the engine
    /// had not seen yet), further tokens are ignored.
    pub fn push(&mut self, t: &TokenOutput) -> Delta {
        if self.finish.is_some() {
            return Delta::default();
        }
        self.generated += 1;
        let stop_token = match t.stop {
            Some(StopReason::TokenId(_)) => true,
            Some(StopReason::Eos) => self.spec.eos.contains(&t.token),
            _ => false,
        };
        let skip = stop_token && !self.spec.stop.include_in_output;
        let mut found = false;
        if let Some(pre) = &self.pre {
            found = self
                .text
                .push(pre, t.token, skip, t.finished, &self.spec.stop)
                .1;
        }
        let done = t.finished || found;
        let mut delta = Delta::default();
        if done {
            let f = match self.text.stopped {
                Some(i) => finish_of(Some(StopReason::Str(i)), &self.spec.stop),
                None => finish_of(t.stop, &self.spec.stop),
            };
            self.usage = (t.prompt_tokens, t.cached_tokens);
            self.finish = Some(f.clone());
            delta.finish = Some(f);
        }
        let text = &self.text.text;
        let mut end = text.len();
        if !done {
            let hold = self.spec.hold_chars;
            if hold > 0 {
                end = text
                    .char_indices()
                    .rev()
                    .nth(hold - 1)
                    .map_or(0, |(i, _)| i);
            }
        }
        if end > self.sent && end <= text.len() {
            delta.text = text[self.sent..end].to_owned();
            self.sent = end;
        }
        let offset = if self.spec.streaming {
            self.sent_chars
        } else {
            self.next_offset
        };
        self.sent_chars += delta.text.chars().count();
        if let Some(k) = self.spec.logprobs {
            let lp = self.token_logprobs(t.token, t.index, k, offset);
            if self.spec.streaming {
                delta.logprobs = Some(lp);
            } else {
                match &mut self.logprobs {
                    Some(acc) => acc.extend(lp),
                    None => self.logprobs = Some(lp),
                }
            }
        }
        delta
    }

    /// The whole output text (after the last token).
    pub fn text(&self) -> &str {
        &self.text.text
    }

    /// Accumulated logprobs (non-streamed).
    pub fn take_logprobs(&mut self) -> Option<Logprobs> {
        self.logprobs.take()
    }

    fn token_str(&self, id: u32) -> String {
        match &self.pre {
            Some(p) => p.decode_with(&[id], false).unwrap_or_default(),
            None => format!("token_id:{id}"),
        }
    }

    fn token_logprobs(&mut self, token: u32, index: usize, k: usize, offset: usize) -> Logprobs {
        let pos = PositionLogprobs::new(self.seed, index);
        let (seed, vocab) = (self.seed, self.spec.output_vocab);
        let mut taken: Vec<(u32, String)> = Vec::with_capacity(k + 1);
        let top = pos.top(
            token,
            k,
            |j| alternative_token(seed, index, j, vocab),
            |id| {
                let s = self.token_str(id);
                if taken.iter().any(|(_, t)| *t == s) {
                    return false;
                }
                taken.push((id, s));
                true
            },
        );
        let text_of = |id: u32| {
            taken
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        };
        let tok = text_of(token);
        let lp = pos.sampled();
        if self.spec.chat {
            let top = if k == 0 {
                Vec::new()
            } else {
                top.iter()
                    .map(|&(id, v)| {
                        let s = text_of(id);
                        ChatTop {
                            bytes: s.as_bytes().to_vec(),
                            token: s,
                            logprob: v,
                        }
                    })
                    .collect()
            };
            Logprobs::Chat {
                content: vec![ChatLogprob {
                    bytes: tok.as_bytes().to_vec(),
                    token: tok,
                    logprob: lp,
                    top_logprobs: top,
                }],
            }
        } else {
            self.next_offset = offset + tok.chars().count();
            Logprobs::Completion {
                text_offset: vec![offset],
                token_logprobs: vec![lp],
                top_logprobs: vec![TopMap(
                    top.iter().map(|&(id, v)| (text_of(id), v)).collect(),
                )],
                tokens: vec![tok],
            }
        }
    }
}

/// Logprobs of some tokens, in vLLM's completions or chat shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Logprobs {
    /// `/v1/completions`.
    Completion {
        /// Character offset of each token in the output text.
        text_offset: Vec<usize>,
        /// Each token's logprob.
        token_logprobs: Vec<f32>,
        /// Each token's text.
        tokens: Vec<String>,
        /// Each position's top alternatives, `{text: logprob}` in rank order.
        top_logprobs: Vec<TopMap>,
    },
    /// `/v1/chat/completions`.
    Chat {
        /// One entry per token.
        content: Vec<ChatLogprob>,
    },
}

impl Logprobs {
    fn extend(&mut self, other: Logprobs) {
        match (self, other) {
            (
                Logprobs::Completion {
                    text_offset,
                    token_logprobs,
                    tokens,
                    top_logprobs,
                },
                Logprobs::Completion {
                    text_offset: a,
                    token_logprobs: b,
                    tokens: c,
                    top_logprobs: d,
                },
            ) => {
                text_offset.extend(a);
                token_logprobs.extend(b);
                tokens.extend(c);
                top_logprobs.extend(d);
            }
            (Logprobs::Chat { content }, Logprobs::Chat { content: c }) => content.extend(c),
            _ => {}
        }
    }
}

/// A `{token: logprob}` object written in rank order.
#[derive(Debug, Clone, PartialEq)]
pub struct TopMap(pub Vec<(String, f32)>);

impl Serialize for TopMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// One token of chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatLogprob {
    /// Its text.
    pub token: String,
    /// Its logprob.
    pub logprob: f32,
    /// UTF-8 bytes of its text.
    pub bytes: Vec<u8>,
    /// The top alternatives.
    pub top_logprobs: Vec<ChatTop>,
}

/// One alternative of chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTop {
    /// Its text.
    pub token: String,
    /// Its logprob.
    pub logprob: f32,
    /// UTF-8 bytes of its text.
    pub bytes: Vec<u8>,
}
