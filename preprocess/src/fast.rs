//! A faster path through the `tokenizers` pipeline for byte-level BPE tokenizers (Qwen, Llama 3,
//! GPT-2 style), giving the same ids as `Tokenizer::encode` without building an `Encoding`.
//!
//! The library builds offsets, alignments and a `NormalizedString` for every piece of every
//! prompt; for routing only the ids matter, and most of the library's time (~6 ms for a 4k-token
//! prompt here) goes to that bookkeeping. This path does the same steps — split on added
//! tokens (leftmost-longest), NFC (skipped when the quick check says the text is already
//! NFC), split with the pre-tokenizer's regex
//! (`Isolated`), byte-level map, BPE — and memoises each pre-token's ids per thread. BPE itself
//! still goes through the library, so exactness rests on the normalisation and splitting (both
//! tested against `Tokenizer::encode` in `tests/fast_encode.rs`).
//!
//! For the Qwen2/3 split pattern the regex itself is replaced by a scanner that tries the
//! pattern's alternatives in order with its backtracking outcomes, on bytes for ASCII text
//! ([`qwen_ascii_piece`]) and on characters for any other ([`qwen_piece`]). The scanner's
//! character classes (`\p{L}`, `\p{N}`, `\s`) are asked of Oniguruma — the engine the library
//! splits with — once per code point and cached, so both agree on every Unicode version detail.
//!
//! It is used only when `tokenizer.json` has exactly this shape: normalizer `NFC` or none;
//! pre-tokenizer `Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)]`; model `BPE`
//! without dropout, byte fallback or affixes; post-processor `ByteLevel` or none; added tokens
//! without `lstrip`/`rstrip`/`single_word`/`normalized`. Any other tokenizer takes the
//! library path.

use std::cell::RefCell;
use std::collections::HashMap;

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value as Json;
use thread_local::ThreadLocal;
use tokenizers::{Model, Tokenizer};

/// Pre-tokens memoised per thread before the memo is cleared.
const MEMO_LIMIT: usize = 200_000;

type Memo = HashMap<Box<str>, Box<[u32]>, foldhash::fast::RandomState>;

/// See the module docs.
pub(crate) struct FastEncoder {
    added: Option<AhoCorasick>,
    added_ids: Vec<u32>,
    split: onig::Regex,
    /// The pattern is Qwen2/3's: text can be split by [`qwen_ascii_piece`] / [`qwen_piece`].
    qwen_pattern: bool,
    /// Character classes of the pattern, as the regex engine itself decides them.
    classes: Classes,
    byte_char: [char; 256],
    memo: ThreadLocal<RefCell<Memo>>,
}

impl std::fmt::Debug for FastEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastEncoder")
            .field("added_tokens", &self.added_ids.len())
            .finish()
    }
}

/// Whether NFC leaves `s` unchanged, by the quick check of the normalisation crate the
/// library itself uses (`Maybe` counts as no).
fn already_nfc(s: &str) -> bool {
    use unicode_normalization_alignments::{is_nfc_quick, IsNormalized};
    is_nfc_quick(s.chars()) == IsNormalized::Yes
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    out
}

fn is(v: &Json, key: &str, want: &str) -> bool {
    v.get(key).and_then(Json::as_str) == Some(want)
}

fn falsy(v: &Json, key: &str) -> bool {
    matches!(
        v.get(key),
        None | Some(Json::Null) | Some(Json::Bool(false))
    )
}

impl FastEncoder {
    /// The fast path for this `tokenizer.json`, or `None` when its pipeline is not the
    /// recognised byte-level BPE shape.
    pub(crate) fn new(config: &Json) -> Option<Self> {
        match config.get("normalizer") {
            None | Some(Json::Null) => {}
            Some(n) if is(n, "type", "NFC") => {}
            Some(_) => return None,
        }
        let pre = config.get("pre_tokenizer")?;
        if !is(pre, "type", "Sequence") {
            return None;
        }
        let [split, byte_level] = pre.get("pretokenizers")?.as_array()?.as_slice() else {
            return None;
        };
        if !is(split, "type", "Split")
            || !is(split, "behavior", "Isolated")
            || !falsy(split, "invert")
        {
            return None;
        }
        let pattern = split.get("pattern")?.get("Regex")?.as_str()?;
        if !is(byte_level, "type", "ByteLevel")
            || !falsy(byte_level, "use_regex")
            || !falsy(byte_level, "add_prefix_space")
        {
            return None;
        }
        let model = config.get("model")?;
        let empty = |k: &str| {
            matches!(model.get(k), None | Some(Json::Null))
                || model.get(k).and_then(Json::as_str) == Some("")
        };
        if !is(model, "type", "BPE")
            || !matches!(model.get("dropout"), None | Some(Json::Null))
            || !falsy(model, "byte_fallback")
            || !falsy(model, "ignore_merges")
            || !empty("continuing_subword_prefix")
            || !empty("end_of_word_suffix")
        {
            return None;
        }
        match config.get("post_processor") {
            None | Some(Json::Null) => {}
            Some(p) if is(p, "type", "ByteLevel") => {}
            Some(_) => return None,
        }
        let mut contents = Vec::new();
        let mut added_ids = Vec::new();
        for t in config.get("added_tokens")?.as_array()? {
            if !falsy(t, "lstrip")
                || !falsy(t, "rstrip")
                || !falsy(t, "single_word")
                || !falsy(t, "normalized")
            {
                return None;
            }
            contents.push(t.get("content")?.as_str()?.to_string());
            added_ids.push(u32::try_from(t.get("id")?.as_u64()?).ok()?);
        }
        let added = if contents.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&contents)
                    .ok()?,
            )
        };
        Some(Self {
            added,
            added_ids,
            split: onig::Regex::new(pattern).ok()?,
            qwen_pattern: pattern == QWEN_PATTERN,
            classes: Classes::new()?,
            byte_char: byte_chars(),
            memo: ThreadLocal::new(),
        })
    }

    /// Byte offsets just past each added-token match of `text` (where encoding can be cut
    /// without changing the ids), in order.
    pub(crate) fn added_token_ends(&self, text: &str) -> Vec<usize> {
        match &self.added {
            Some(ac) => ac.find_iter(text).map(|m| m.end()).collect(),
            None => Vec::new(),
        }
    }

    /// Whether the split pattern is scanned without the regex engine.
    pub(crate) fn has_scanner(&self) -> bool {
        self.qwen_pattern
    }

    /// Token ids of `text` (no special tokens added), as `tokenizer.encode(text, false)`.
    pub(crate) fn encode(&self, tokenizer: &Tokenizer, text: &str) -> tokenizers::Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 8);
        let mut last = 0;
        if let Some(ac) = &self.added {
            for m in ac.find_iter(text) {
                self.segment(tokenizer, &text[last..m.start()], &mut out)?;
                out.push(self.added_ids[m.pattern().as_usize()]);
                last = m.end();
            }
        }
        self.segment(tokenizer, &text[last..], &mut out)?;
        Ok(out)
    }

    fn segment(
        &self,
        tokenizer: &Tokenizer,
        seg: &str,
        out: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        if seg.is_empty() {
            return Ok(());
        }
        if !seg.is_ascii() && !already_nfc(seg) {
            // The library normalises each segment between added tokens, then splits it: do the
            // same (the quick check says `Maybe` for many scripts' marks; most such text is NFC
            // already and normalising is cheap next to splitting).
            use unicode_normalization_alignments::UnicodeNormalization;
            let nfc: String = seg.nfc().map(|(c, _)| c).collect();
            if nfc != seg {
                return self.split(tokenizer, &nfc, out);
            }
        }
        self.split(tokenizer, seg, out)
    }

    /// Split NFC text `seg` with the pattern and encode its pieces.
    fn split(
        &self,
        tokenizer: &Tokenizer,
        seg: &str,
        out: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        let memo = self.memo.get_or(|| RefCell::new(Memo::default()));
        let mut memo = memo.borrow_mut();
        if memo.len() > MEMO_LIMIT {
            memo.clear();
        }
        if self.qwen_pattern && seg.is_ascii() {
            let b = seg.as_bytes();
            let mut p = 0;
            while p < b.len() {
                let e = qwen_ascii_piece(b, p);
                self.piece(tokenizer, &seg[p..e], &mut memo, out)?;
                p = e;
            }
            return Ok(());
        }
        if self.qwen_pattern {
            let mut p = 0;
            while p < seg.len() {
                let e = qwen_piece(seg, p, &self.classes);
                self.piece(tokenizer, &seg[p..e], &mut memo, out)?;
                p = e;
            }
            return Ok(());
        }
        let mut last = 0;
        for (s, e) in self.split.find_iter(seg) {
            if s > last {
                self.piece(tokenizer, &seg[last..s], &mut memo, out)?;
            }
            self.piece(tokenizer, &seg[s..e], &mut memo, out)?;
            last = e;
        }
        if last < seg.len() {
            self.piece(tokenizer, &seg[last..], &mut memo, out)?;
        }
        Ok(())
    }

    fn piece(
        &self,
        tokenizer: &Tokenizer,
        piece: &str,
        memo: &mut Memo,
        out: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        if let Some(ids) = memo.get(piece) {
            out.extend_from_slice(ids);
            return Ok(());
        }
        let mapped: String = piece.bytes().map(|b| self.byte_char[b as usize]).collect();
        let ids: Box<[u32]> = tokenizer
            .get_model()
            .tokenize(&mapped)?
            .into_iter()
            .map(|t| t.id)
            .collect();
        out.extend_from_slice(&ids);
        memo.insert(piece.into(), ids);
        Ok(())
    }
}

/// The pre-tokenizer regex of Qwen2 and Qwen3.
const QWEN_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `\s` on ASCII, as Oniguruma's Unicode encoding defines it.
fn space(c: u8) -> bool {
    matches!(c, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// End of the match of [`QWEN_PATTERN`] that starts at `p` in ASCII text `b` (`p < b.len()`).
/// Every position starts a match (letters, digits, other, space are all covered), so the
/// pieces tile the text. The alternatives are tried in the pattern's order, with the same
/// backtracking outcomes; `tests/fast_encode.rs` checks the result against the library.
fn qwen_ascii_piece(b: &[u8], p: usize) -> usize {
    let n = b.len();
    let at = |i: usize| if i < n { b[i] } else { 0xff };
    let letter = |c: u8| c.is_ascii_alphabetic();
    let digit = |c: u8| c.is_ascii_digit();
    let letters_from = |mut i: usize| {
        while i < n && letter(b[i]) {
            i += 1;
        }
        i
    };
    let c = b[p];
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c == b'\'' {
        let (x, y) = (
            at(p + 1).to_ascii_lowercase(),
            at(p + 2).to_ascii_lowercase(),
        );
        if matches!(x, b's' | b't' | b'm' | b'd') {
            return p + 2;
        }
        if matches!((x, y), (b'r', b'e') | (b'v', b'e') | (b'l', b'l')) {
            return p + 3;
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if letter(c) {
        return letters_from(p + 1);
    }
    if c != b'\r' && c != b'\n' && !digit(c) && p + 1 < n && letter(b[p + 1]) {
        return letters_from(p + 2);
    }
    // \p{N}
    if digit(c) {
        return p + 1;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    let other = |c: u8| !space(c) && !letter(c) && !digit(c);
    let start = if c == b' ' && p + 1 < n && other(b[p + 1]) {
        p + 1
    } else {
        p
    };
    if other(at(start)) && start < n {
        let mut i = start;
        while i < n && other(b[i]) {
            i += 1;
        }
        while i < n && (b[i] == b'\r' || b[i] == b'\n') {
            i += 1;
        }
        return i;
    }
    // Only whitespace is left: c is `\s`.
    let mut end = p;
    while end < n && space(b[end]) {
        end += 1;
    }
    // \s*[\r\n]+ : up to the last newline of the run.
    if let Some(q) = (p..end).rev().find(|&i| b[i] == b'\r' || b[i] == b'\n') {
        return q + 1;
    }
    // \s+(?!\S) : the whole run at the end of the text, else all but its last character.
    if end == n {
        return end;
    }
    if end - p >= 2 {
        return end - 1;
    }
    // \s+
    end
}

/// What the Qwen pattern distinguishes about a character.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Class {
    /// `\p{L}`.
    Letter = 1,
    /// `\p{N}`.
    Number = 2,
    /// `\r` or `\n`.
    CrLf = 3,
    /// `\s` other than `\r`, `\n`.
    Space = 4,
    /// Anything else (`[^\s\p{L}\p{N}]`).
    Other = 5,
}

/// Code points classified so far (0 = not yet), shared by every encoder of the process: the
/// classes depend only on the regex engine's Unicode tables.
static CLASS_CACHE: [std::sync::atomic::AtomicU8; 0x11_0000] =
    [const { std::sync::atomic::AtomicU8::new(0) }; 0x11_0000];

/// The regexes that classify a character the way the split pattern sees it.
struct Classes {
    letter: onig::Regex,
    number: onig::Regex,
    space: onig::Regex,
}

impl Classes {
    fn new() -> Option<Self> {
        Some(Self {
            letter: onig::Regex::new(r"\A\p{L}\z").ok()?,
            number: onig::Regex::new(r"\A\p{N}\z").ok()?,
            space: onig::Regex::new(r"\A\s\z").ok()?,
        })
    }

    fn of(&self, c: char) -> Class {
        use std::sync::atomic::Ordering::Relaxed;
        if c.is_ascii() {
            let b = c as u8;
            return match b {
                b'\r' | b'\n' => Class::CrLf,
                _ if b.is_ascii_alphabetic() => Class::Letter,
                _ if b.is_ascii_digit() => Class::Number,
                _ if space(b) => Class::Space,
                _ => Class::Other,
            };
        }
        let slot = &CLASS_CACHE[c as usize];
        let cached = slot.load(Relaxed);
        if cached != 0 {
            return match cached {
                1 => Class::Letter,
                2 => Class::Number,
                4 => Class::Space,
                _ => Class::Other,
            };
        }
        let mut buf = [0u8; 4];
        let s: &str = c.encode_utf8(&mut buf);
        let class = if self.letter.is_match(s) {
            Class::Letter
        } else if self.number.is_match(s) {
            Class::Number
        } else if self.space.is_match(s) {
            Class::Space
        } else {
            Class::Other
        };
        slot.store(class as u8, Relaxed);
        class
    }
}

/// `c` case-folds to the ASCII letter `lower` (`(?i:…)` in the contractions). Besides ASCII
/// case, U+017F LATIN SMALL LETTER LONG S folds to `s`.
fn folds_to(c: Option<char>, lower: u8) -> bool {
    match c {
        Some(c) if c.is_ascii() => (c as u8).to_ascii_lowercase() == lower,
        Some('\u{17f}') => lower == b's',
        _ => false,
    }
}

/// End of the match of [`QWEN_PATTERN`] that starts at byte `p` of `s` (`p < s.len()`), for
/// any text: the same alternatives as [`qwen_ascii_piece`], on characters.
fn qwen_piece(s: &str, p: usize, classes: &Classes) -> usize {
    let n = s.len();
    let char_at = |i: usize| s[i..].chars().next();
    let next = |i: usize| i + char_at(i).map_or(0, char::len_utf8);
    let class_at = |i: usize| char_at(i).map(|c| classes.of(c));
    let letters_from = |mut i: usize| {
        while i < n && class_at(i) == Some(Class::Letter) {
            i = next(i);
        }
        i
    };
    let c = class_at(p).unwrap_or(Class::Other);
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if s.as_bytes()[p] == b'\'' {
        let (i1, c1) = (p + 1, char_at(p + 1));
        let i2 = next(i1);
        let c2 = char_at(i2);
        if [b's', b't', b'm', b'd'].iter().any(|&l| folds_to(c1, l)) {
            return i2;
        }
        let two = |a: u8, b: u8| folds_to(c1, a) && folds_to(c2, b);
        if two(b'r', b'e') || two(b'v', b'e') || two(b'l', b'l') {
            return next(i2);
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if c == Class::Letter {
        return letters_from(next(p));
    }
    let q = next(p);
    if c != Class::CrLf && c != Class::Number && q < n && class_at(q) == Some(Class::Letter) {
        return letters_from(next(q));
    }
    // \p{N}
    if c == Class::Number {
        return q;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    let start = if s.as_bytes()[p] == b' ' && q < n && class_at(q) == Some(Class::Other) {
        q
    } else {
        p
    };
    if class_at(start) == Some(Class::Other) {
        let mut i = start;
        while i < n && class_at(i) == Some(Class::Other) {
            i = next(i);
        }
        while i < n && class_at(i) == Some(Class::CrLf) {
            i = next(i);
        }
        return i;
    }
    // Only whitespace is left: c is `\s`.
    let mut end = p;
    let mut last_crlf = None;
    let mut last_start = p;
    while end < n {
        match class_at(end) {
            Some(Class::CrLf) => last_crlf = Some(end),
            Some(Class::Space) => {}
            _ => break,
        }
        last_start = end;
        end = next(end);
    }
    // \s*[\r\n]+ : up to the last newline of the run.
    if let Some(q) = last_crlf {
        return q + 1;
    }
    // \s+(?!\S) : the whole run at the end of the text, else all but its last character.
    if end == n {
        return end;
    }
    if last_start > p {
        return last_start;
    }
    // \s+
    end
}
