//! Which tokens a mock request outputs and when it stops: seeds, the seeded token choice,
//! stop strings and stop token ids (vLLM's rules), and made-up but well-formed logprobs.
//!
//! Everything is a pure function of a 64-bit seed and the token index, so a request and its
//! replay (same seed, same prompt) produce the same tokens and the same logprobs, streamed or
//! not.
//!
//! * Without `seed` a request's tokens come from [`prompt_seed`] (the same prompt gives the
//!   same output, the mocker's behaviour from the start); with `seed` from
//!   [`choice_seed`]`(prompt, seed, choice)`; choice `i > 0` of `n` always mixes in `i`.
//! * [`OutputPlan`] is the engine-side [`OutputSource`] of a request that asks for more than
//!   the defaults: forced tokens first (structured output, a tool call, a reasoning block),
//!   then EOS or seeded random tokens, stopping at stop token ids and stop strings.
//! * [`StopText`] is vLLM's incremental stop-string check over detokenized output, used by the
//!   engine (to stop generating) and by the HTTP layer (to truncate and hold text back).
use std::fmt;
use std::sync::Arc;

use kvrouter_preprocess::{IncrementalDecoder, Preprocessor};

use crate::engine::{OutputSource, StopReason};

/// The SplitMix64 finaliser: a well-mixed 64-bit hash of `z`.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small deterministic generator (SplitMix64 stream) for per-request choices.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose whole stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self(splitmix64(seed ^ 0x6a09_e667_f3bc_c908))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.0)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi` (`lo` when `hi <= lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below(hi - lo + 1)
        }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Seed of a request's output when it gives none: its length and its last (up to) 64 tokens,
/// so identical prompts produce identical outputs without hashing the whole prompt.
pub fn prompt_seed(prompt: &[u32]) -> u64 {
    let tail = &prompt[prompt.len().saturating_sub(64)..];
    let mut h = 0x9e37_79b9_7f4a_7c15u64 ^ prompt.len() as u64;
    for &t in tail {
        h = splitmix64(h ^ u64::from(t));
    }
    h
}

/// Seed of choice `choice` of a request: [`prompt_seed`] for choice 0 without a user seed
/// (the default output), else mixed with the user's `seed` and the choice index, so the same
/// seed and prompt replay exactly and the `n` choices differ.
pub fn choice_seed(prompt_seed: u64, user_seed: Option<i64>, choice: usize) -> u64 {
    let mut s = prompt_seed;
    if let Some(u) = user_seed {
        s = splitmix64(s ^ splitmix64(u as u64 ^ 0x243f_6a88_85a3_08d3));
    }
    if choice > 0 {
        s = splitmix64(s ^ (choice as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    }
    s
}

/// The `index`-th seeded output token: uniform in `0..output_vocab`, skipping `eos` ids.
pub fn random_token(seed: u64, index: usize, output_vocab: u32, eos: &[u32]) -> u32 {
    let range = u64::from(output_vocab.max(1));
    let mut x = splitmix64(seed.wrapping_add(index as u64));
    loop {
        let t = (x % range) as u32;
        if !eos.contains(&t) || eos.len() as u64 >= range {
            return t;
        }
        x = splitmix64(x);
    }
}

// ---------- stop conditions ----------

/// What ends a request early, as asked (`stop`, `stop_token_ids`,
/// `include_stop_str_in_output`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopSpec {
    /// Stop strings (empty ones dropped).
    pub strings: Vec<String>,
    /// Stop token ids.
    pub token_ids: Vec<u32>,
    /// Keep the stop string (and a stop token's text) in the output.
    pub include_in_output: bool,
}

impl StopSpec {
    /// Whether nothing can stop the request before `max_tokens`.
    pub fn is_empty(&self) -> bool {
        self.strings.is_empty() && self.token_ids.is_empty()
    }

    /// Characters a stream holds back so a stop string can still be cut (vLLM's
    /// `stop_buffer_length`: longest stop string − 1, 0 when stop strings are kept).
    pub fn buffer_chars(&self) -> usize {
        if self.include_in_output {
            return 0;
        }
        self.strings
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(1)
            .saturating_sub(1)
    }
}

/// vLLM's `check_stop_strings`: looks for each stop string, in list order, where it could
/// overlap the `new_bytes` just appended to `text`. Returns the index of the first one found
/// and the byte length to truncate `text` to (None: keep all of it, the stop string kept and
/// ending the text).
pub fn check_stop_strings(
    text: &str,
    new_bytes: usize,
    stops: &[String],
    include: bool,
) -> Option<(usize, Option<usize>)> {
    if new_bytes == 0 {
        return None;
    }
    for (i, stop) in stops.iter().enumerate() {
        let mut from = (text.len() + 1).saturating_sub(new_bytes + stop.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let Some(at) = text[from..].find(stop.as_str()).map(|p| p + from) else {
            continue;
        };
        if include {
            let end = at + stop.len();
            return Some((i, (end < text.len()).then_some(end)));
        }
        return Some((i, Some(at)));
    }
    None
}

/// The detokenized output of one sequence with vLLM's stop-string rule applied after each
/// token: text is appended, checked, and truncated at the first stop string.
#[derive(Debug, Clone)]
pub struct StopText {
    decoder: IncrementalDecoder,
    /// Output text so far (truncated once a stop string was found).
    pub text: String,
    /// Index of the stop string found, if any.
    pub stopped: Option<usize>,
}

impl StopText {
    /// An empty output (special tokens skipped, as vLLM's default `skip_special_tokens`).
    pub fn new() -> Self {
        Self {
            decoder: IncrementalDecoder::new(true),
            text: String::new(),
            stopped: None,
        }
    }

    /// Adds `token` (its text left out when `skip_text`: a stop token not kept in the
    /// output), flushing held-back bytes when `last`; returns the bytes appended and whether
    /// a stop string ended the output at this token.
    pub fn push(
        &mut self,
        pre: &Preprocessor,
        token: u32,
        skip_text: bool,
        last: bool,
        stop: &StopSpec,
    ) -> (usize, bool) {
        if self.stopped.is_some() {
            return (0, false);
        }
        let before = self.text.len();
        if !skip_text {
            let mut new = self.decoder.push(pre, &[token]).unwrap_or_default();
            if last {
                new.push_str(&self.decoder.finish(pre).unwrap_or_default());
            }
            self.text.push_str(&new);
        }
        let added = self.text.len() - before;
        if let Some((i, cut)) =
            check_stop_strings(&self.text, added, &stop.strings, stop.include_in_output)
        {
            if let Some(c) = cut {
                self.text.truncate(c);
            }
            self.stopped = Some(i);
            return (self.text.len().saturating_sub(before), true);
        }
        (added, false)
    }
}

impl Default for StopText {
    fn default() -> Self {
        Self::new()
    }
}

// ---------- the engine-side plan ----------

/// What follows a request's forced tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterForced {
    /// The answer is complete: emit EOS (finish reason `stop`); with no EOS id known, the
    /// last forced token ends the request.
    Eos,
    /// Keep generating seeded random tokens until `max_tokens`.
    Continue,
}

/// The engine-side output of a request that asks for more than the defaults; see the module
/// docs. Stop strings need the tokenizer (`pre`).
pub struct OutputPlan {
    /// Seed of the random tokens.
    pub seed: u64,
    /// Random tokens are drawn from `0..output_vocab`.
    pub output_vocab: u32,
    /// EOS ids: never drawn at random; the first one ends a forced answer.
    pub eos: Vec<u32>,
    /// Tokens emitted first, in order.
    pub forced: Vec<u32>,
    /// What comes after them.
    pub after: AfterForced,
    /// Stop conditions.
    pub stop: Arc<StopSpec>,
    /// Tokenizer, for stop strings.
    pub pre: Option<Arc<Preprocessor>>,
    text: StopText,
    done: bool,
}

impl fmt::Debug for OutputPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputPlan")
            .field("seed", &self.seed)
            .field("forced", &self.forced.len())
            .field("after", &self.after)
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl OutputPlan {
    /// A plan; `pre` is needed only for stop strings.
    pub fn new(
        seed: u64,
        output_vocab: u32,
        eos: Vec<u32>,
        forced: Vec<u32>,
        after: AfterForced,
        stop: Arc<StopSpec>,
        pre: Option<Arc<Preprocessor>>,
    ) -> Self {
        Self {
            seed,
            output_vocab,
            eos,
            forced,
            after,
            stop,
            pre,
            text: StopText::new(),
            done: false,
        }
    }

    /// The `index`-th token and whether it is a stop token (before stop strings).
    fn token_at(&self, index: usize) -> (u32, Option<StopReason>) {
        if let Some(&t) = self.forced.get(index) {
            let last_forced = index + 1 == self.forced.len();
            if last_forced && self.after == AfterForced::Eos && self.eos.is_empty() {
                return (t, Some(StopReason::Eos));
            }
            return (t, None);
        }
        if self.after == AfterForced::Eos {
            if let Some(&e) = self.eos.first() {
                return (e, Some(StopReason::Eos));
            }
        }
        let t = random_token(self.seed, index, self.output_vocab, &self.eos);
        (t, None)
    }
}

impl OutputSource for OutputPlan {
    fn next_token(&mut self, index: usize) -> (u32, Option<StopReason>) {
        let (token, mut stop) = self.token_at(index);
        if self.done {
            return (token, Some(StopReason::Eos));
        }
        if stop.is_none() && self.stop.token_ids.contains(&token) {
            stop = Some(StopReason::TokenId(token));
        }
        if stop.is_none() && !self.stop.strings.is_empty() {
            if let Some(pre) = &self.pre {
                if let (_, true) = self.text.push(pre, token, false, false, &self.stop) {
                    stop = self.text.stopped.map(StopReason::Str);
                }
            }
        }
        self.done = stop.is_some();
        (token, stop)
    }
}

// ---------- logprobs ----------

/// Most alternatives a request may ask for (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;

/// Made-up logprobs of one output position: the sampled token's logprob and up to
/// [`MAX_LOGPROBS`] ranked alternatives. Fixed by `(seed, index)` alone, so the sampled
/// token's value does not depend on how many alternatives are asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct PositionLogprobs {
    /// Logprobs of ranks 0.. (sorted descending, finite, ≤ 0).
    pub values: [f32; MAX_LOGPROBS],
    /// The sampled token's rank in `values`.
    pub rank: usize,
}

impl PositionLogprobs {
    /// The logprobs of output position `index` of a request with `seed`.
    pub fn new(seed: u64, index: usize) -> Self {
        let mut rng = Rng::new(splitmix64(seed ^ 0x1f83_d9ab_fb41_bd6b).wrapping_add(index as u64));
        let mut values = [0f32; MAX_LOGPROBS];
        let mut v = -(0.001 + 1.5 * rng.unit() * rng.unit());
        for slot in &mut values {
            *slot = v as f32;
            v -= 0.05 + 1.5 * rng.unit();
        }
        // Mostly the top token, sometimes a runner-up, rarely anything in the top 20.
        let u = rng.unit();
        let rank = if u < 0.7 {
            0
        } else if u < 0.85 {
            1
        } else if u < 0.93 {
            2
        } else {
            rng.below(MAX_LOGPROBS as u64) as usize
        };
        Self { values, rank }
    }

    /// The sampled token's logprob.
    pub fn sampled(&self) -> f32 {
        self.values[self.rank]
    }

    /// `k` ranked entries `(id, logprob)` (at least 1: the sampled token is always among
    /// them, at its rank when that is below `k`, else last), sorted by logprob descending,
    /// ids distinct. `alternative(j)` proposes the j-th candidate id; `accept(id)` says
    /// whether it may be used and records it (e.g. its text differs from those taken; it is
    /// called on `sampled` first). A bounded number of candidates is tried.
    pub fn top(
        &self,
        sampled: u32,
        k: usize,
        mut alternative: impl FnMut(u64) -> u32,
        mut accept: impl FnMut(u32) -> bool,
    ) -> Vec<(u32, f32)> {
        let k = k.clamp(1, MAX_LOGPROBS);
        let sampled_slot = self.rank.min(k - 1);
        accept(sampled);
        let mut out = Vec::with_capacity(k);
        let mut j = 0u64;
        for r in 0..k {
            if r == sampled_slot {
                out.push((sampled, self.sampled()));
                continue;
            }
            while j < 64 * MAX_LOGPROBS as u64 {
                let c = alternative(j);
                j += 1;
                if c != sampled && !out.iter().any(|&(o, _)| o == c) && accept(c) {
                    out.push((c, self.values[r]));
                    break;
                }
            }
        }
        out
    }
}

/// Candidate alternative token `j` of position `index` (uniform in `0..vocab`).
pub fn alternative_token(seed: u64, index: usize, j: u64, vocab: u32) -> u32 {
    let x = splitmix64(splitmix64(seed ^ 0x5be0_cd19_137e_2179) ^ ((index as u64) << 16) ^ j);
    (x % u64::from(vocab.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_follow_vllm() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Found in the new text: cut before it, or after it when kept.
        assert_eq!(
            check_stop_strings("hello world", 5, &s(&["wor"]), false),
            Some((0, Some(6)))
        );
        assert_eq!(
            check_stop_strings("hello world", 5, &s(&["wor"]), true),
            Some((0, Some(9)))
        );
        assert_eq!(
            check_stop_strings("hello world", 5, &s(&["rld"]), true),
            Some((0, None))
        );
        // Spanning old and new text.
        assert_eq!(
            check_stop_strings("hello world", 1, &s(&["orld"]), false),
            Some((0, Some(7)))
        );
        // Entirely in old text: not looked at again.
        assert_eq!(
            check_stop_strings("hello world", 1, &s(&["ell"]), false),
            None
        );
        // List order wins, as in vLLM.
        assert_eq!(
            check_stop_strings("abc", 3, &s(&["bc", "ab"]), false),
            Some((0, Some(1)))
        );
        assert_eq!(check_stop_strings("héllo", 2, &s(&["é"]), false), None);
        assert_eq!(
            check_stop_strings("héllo", 3, &s(&["él"]), false),
            Some((0, Some(1)))
        );
    }

    #[test]
    fn logprobs_are_well_formed() {
        for index in 0..200 {
            let p = PositionLogprobs::new(42, index);
            for k in [0, 1, 2, 5, 20] {
                let top = p.top(7, k, |j| alternative_token(42, index, j, 50), |_| true);
                assert_eq!(top.len(), k.max(1));
                assert!(top.iter().any(|&(id, v)| id == 7 && v == p.sampled()));
                assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{top:?}");
                assert!(top.iter().all(|&(_, v)| v.is_finite() && v <= 0.0));
                let mut ids: Vec<u32> = top.iter().map(|t| t.0).collect();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), top.len());
            }
        }
    }

    #[test]
    fn seeds() {
        let p = prompt_seed(&[1, 2, 3]);
        assert_eq!(choice_seed(p, None, 0), p);
        assert_ne!(choice_seed(p, Some(1), 0), p);
        assert_ne!(choice_seed(p, Some(1), 0), choice_seed(p, Some(2), 0));
        assert_ne!(choice_seed(p, Some(1), 0), choice_seed(p, Some(1), 1));
    }
}
