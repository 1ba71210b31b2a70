//! Incremental detokenization: the text of a growing token sequence, one delta at a time, in
//! O(new tokens) per step — vLLM's `detokenize_incrementally` (prefix and read offsets): each
//! step decodes only the few tokens since the last emitted boundary, and holds text back while
//! it ends in an incomplete UTF-8 character (U+FFFD).

use crate::{Preprocessor, Result};

/// Decoding state of one output sequence.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context (its text is already emitted).
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// A decoder for a new sequence.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Every token pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Add `new` tokens; returns the text that became complete (empty while a character is
    /// still cut). Errors: a token outside the vocabulary.
    pub fn push(&mut self, pre: &Preprocessor, new: &[u32]) -> Result<String> {
        self.ids.extend_from_slice(new);
        let prefix = pre.decode_with(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = pre.decode_with(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// The text still held back (an incomplete character at the very end decodes as U+FFFD).
    pub fn finish(&mut self, pre: &Preprocessor) -> Result<String> {
        let prefix = pre.decode_with(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = pre.decode_with(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_owned())
    }
}
