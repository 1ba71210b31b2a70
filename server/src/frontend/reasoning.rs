//! `--reasoning-parser`: splits a model's `<think>…</think>` block from its answer, as vLLM's
//! reasoning parsers of the same names do, streamed or whole. The reasoning goes to the chat
//! message's `reasoning_content`, the rest to `content`.
//!
//! * `qwen3`: the output is reasoning only when it opens with `<think>` (Qwen3 with
//!   `enable_thinking: false` writes no block); it ends at `</think>`.
//! * `deepseek_r1`: everything up to `</think>` is reasoning, with or without an opening
//!   `<think>` (DeepSeek-R1's template opens the block in the prompt).
//!
//! A tag split across two chunks is held back until it is complete, so no chunk ever shows a
//! partial tag.

use std::str::FromStr;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Which reasoning format the model writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningParser {
    Qwen3,
    DeepseekR1,
}

impl FromStr for ReasoningParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qwen3" => Ok(Self::Qwen3),
            "deepseek_r1" => Ok(Self::DeepseekR1),
            _ => Err(format!(
                "unknown reasoning parser {s:?}: expected qwen3 or deepseek_r1"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not yet known whether the output opens a block.
    Start,
    Reasoning,
    Content,
}

/// One choice's reasoning split, fed the output text chunk by chunk.
#[derive(Debug)]
pub struct ReasoningSplit {
    parser: ReasoningParser,
    state: State,
    /// Text held back: a possible partial tag.
    held: String,
}

/// What a chunk of output turned into.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

/// The length of the longest suffix of `s` that is a proper prefix of `tag`: text to hold
/// back because a marker may be starting (also used by the tool-call reader).
pub(super) fn partial_tag_len(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ReasoningSplit {
    pub fn new(parser: ReasoningParser) -> Self {
        Self {
            parser,
            state: State::Start,
            held: String::new(),
        }
    }

    /// Feed the next chunk of output.
    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        self.held.push_str(text);
        loop {
            match self.state {
                State::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning;
                    } else if OPEN.starts_with(t) {
                        return out; // maybe the opening tag, not complete yet
                    } else {
                        self.state = match self.parser {
                            ReasoningParser::Qwen3 => State::Content,
                            ReasoningParser::DeepseekR1 => State::Reasoning,
                        };
                    }
                }
                State::Reasoning => {
                    if let Some(i) = self.held.find(CLOSE) {
                        out.reasoning.push_str(&self.held[..i]);
                        self.held.drain(..i + CLOSE.len());
                        self.state = State::Content;
                    } else {
                        let keep = partial_tag_len(&self.held, CLOSE);
                        let emit = self.held.len() - keep;
                        out.reasoning.push_str(&self.held[..emit]);
                        self.held.drain(..emit);
                        return out;
                    }
                }
                State::Content => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// The output ended: whatever was held back, where it belongs.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Reasoning => Split {
                reasoning: held,
                content: String::new(),
            },
            State::Start if self.parser == ReasoningParser::DeepseekR1 => Split {
                reasoning: held,
                content: String::new(),
            },
            _ => Split {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Split `text` fed in every chunking into pieces of `step` bytes (on char boundaries).
    fn run(p: ReasoningParser, text: &str, step: usize) -> Split {
        let mut s = ReasoningSplit::new(p);
        let mut all = Split::default();
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            let o = s.push(&text[i..j]);
            assert!(!o.reasoning.contains('<') || !o.reasoning.contains("</th"));
            all.reasoning += &o.reasoning;
            all.content += &o.content;
            i = j;
        }
        let o = s.finish();
        all.reasoning += &o.reasoning;
        all.content += &o.content;
        all
    }

    #[test]
    fn splits_the_same_in_any_chunking() {
        let cases = [
            (
                ReasoningParser::Qwen3,
                "<think>\nI should greet.\n</think>\n\nHello!",
                "\nI should greet.\n",
                "\n\nHello!",
            ),
            (
                ReasoningParser::Qwen3,
                "Hello, no thinking.",
                "",
                "Hello, no thinking.",
            ),
            (
                ReasoningParser::Qwen3,
                "<think>cut short by max_tokens",
                "cut short by max_tokens",
                "",
            ),
            (
                ReasoningParser::DeepseekR1,
                "prefilled block</think>answer",
                "prefilled block",
                "answer",
            ),
            (
                ReasoningParser::DeepseekR1,
                "<think>a < b</think>ok",
                "a < b",
                "ok",
            ),
            (
                ReasoningParser::DeepseekR1,
                "never closed",
                "never closed",
                "",
            ),
            (
                ReasoningParser::Qwen3,
                "<think>日本語</think>答え",
                "日本語",
                "答え",
            ),
        ];
        for (p, text, reasoning, content) in cases {
            for step in [1, 2, 3, 5, 8, 100] {
                let s = run(p, text, step);
                assert_eq!(
                    (s.reasoning.as_str(), s.content.as_str()),
                    (reasoning, content),
                    "{p:?} {text:?} step {step}"
                );
            }
        }
    }

    #[test]
    fn a_partial_closing_tag_is_held_back() {
        let mut s = ReasoningSplit::new(ReasoningParser::Qwen3);
        assert_eq!(s.push("<think>abc</th").reasoning, "abc");
        let o = s.push("ink>done");
        assert_eq!((o.reasoning.as_str(), o.content.as_str()), ("", "done"));
    }
}
