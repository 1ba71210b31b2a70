//! Mooncake request traces (FAST'25 release format) and prompt synthesis.
//!
//! One JSON object per line: `timestamp` (ms since trace start), `input_length`,
//! `output_length` (tokens) and `hash_ids`: ids of 512-token prefix blocks, equal ids meaning an
//! equal prefix block (`../shared/data/traces/README.md`).

use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

/// Tokens per Mooncake hash id.
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TraceRequest {
    /// Arrival, ms since trace start.
    pub timestamp: u64,
    /// Prompt length, tokens.
    pub input_length: usize,
    /// Generated tokens.
    pub output_length: usize,
    /// Ids of the prompt's 512-token blocks, in order (the last one may be partial).
    pub hash_ids: Vec<u64>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A line is not a trace request (`line` is 1-based).
    #[error("{path}:{line}: {reason}")]
    Parse {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Read the first `limit` requests of a Mooncake JSONL trace (all when `None`). Blank lines are
/// skipped; a malformed line is an error naming it.
pub fn load_trace(path: &Path, limit: Option<usize>) -> Result<Vec<TraceRequest>, TraceError> {
    let (out, skipped) = load_trace_skipping(path, limit)?;
    match skipped.into_iter().next() {
        None => Ok(out),
        Some(bad) => Err(TraceError::Parse {
            path: path.display().to_string(),
            line: bad.line,
            reason: bad.reason,
        }),
    }
}

/// A trace line that was not a request, skipped by [`load_trace_skipping`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedLine {
    /// 1-based line number.
    pub line: usize,
    /// Why it is not a request.
    pub reason: String,
}

impl std::fmt::Display for SkippedLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// [`load_trace`] that skips malformed lines instead of failing: the first `limit` good
/// requests (all when `None`), and every bad line met before the limit was reached, with its
/// number. Fails only when the file cannot be read.
pub fn load_trace_skipping(
    path: &Path,
    limit: Option<usize>,
) -> Result<(Vec<TraceRequest>, Vec<SkippedLine>), TraceError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TraceError::Io {
        path: p.clone(),
        source,
    })?;
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let line = line.map_err(|source| TraceError::Io {
            path: p.clone(),
            source,
        })?;
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<TraceRequest>(&line) {
            Ok(r) => out.push(r),
            Err(e) => skipped.push(SkippedLine {
                line: i + 1,
                reason: e.to_string(),
            }),
        }
    }
    Ok((out, skipped))
}

/// First token id used for synthetic prompts: above Qwen3's low ids (bytes, punctuation).
pub const VOCAB_START: u32 = 1_000;
/// Size of the id range used for synthetic prompts: ids `VOCAB_START..VOCAB_START + VOCAB_SPAN`
/// (1,000–150,999) are all regular Qwen3 vocabulary tokens (151,643 of them; the special
/// tokens start at 151,643).
pub const VOCAB_SPAN: u64 = 150_000;

/// The fixed run of `MOONCAKE_BLOCK_TOKENS` token ids standing for one hash id: real vocabulary
/// ids, deterministic, different for different ids.
pub fn hash_id_tokens(hash_id: u64) -> impl Iterator<Item = u32> {
    (0..MOONCAKE_BLOCK_TOKENS as u64).map(move |j| {
        VOCAB_START + (splitmix64(hash_id.wrapping_mul(1 << 20) ^ j) % VOCAB_SPAN) as u32
    })
}

/// A prompt of exactly `input_length` tokens whose 512-token blocks are the hash ids' runs (the
/// last one cut). Equal leading ids give equal leading tokens.
pub fn synthesize_prompt(req: &TraceRequest) -> Vec<u32> {
    let mut out = Vec::with_capacity(req.input_length);
    for &id in &req.hash_ids {
        let need = req.input_length - out.len();
        if need == 0 {
            break;
        }
        out.extend(hash_id_tokens(id).take(need));
    }
    // Traces promise len(hash_ids) == ceil(input_length / 512); pad defensively if not.
    let mut filler = u64::MAX;
    while out.len() < req.input_length {
        let need = req.input_length - out.len();
        out.extend(hash_id_tokens(filler).take(need));
        filler -= 1;
    }
    out
}

/// SplitMix64: a fast, well-mixed 64-bit permutation (Steele et al., 2014).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ids: &[u64], len: usize) -> TraceRequest {
        TraceRequest {
            timestamp: 0,
            input_length: len,
            output_length: 1,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn equal_ids_give_equal_blocks_and_exact_lengths() {
        let a = synthesize_prompt(&req(&[0, 1, 2], 1100));
        let b = synthesize_prompt(&req(&[0, 1, 7, 8], 1700));
        let c = synthesize_prompt(&req(&[5], 300));
        assert_eq!((a.len(), b.len(), c.len()), (1100, 1700, 300));
        assert_eq!(a[..1024], b[..1024]);
        assert_ne!(a[1024..1100], b[1024..1100]);
        assert_ne!(
            a[..512],
            c[..300]
                .iter()
                .copied()
                .chain(a[300..512].iter().copied())
                .collect::<Vec<_>>()[..]
        );
        assert!(a
            .iter()
            .all(|&t| (VOCAB_START..VOCAB_START + VOCAB_SPAN as u32).contains(&t)));
        // Distinct ids give distinct runs.
        let runs: std::collections::HashSet<Vec<u32>> =
            (0..200).map(|i| hash_id_tokens(i).collect()).collect();
        assert_eq!(runs.len(), 200);
    }

    #[test]
    fn loads_the_shared_traces() {
        let shared = std::env::var("KVROUTER_SHARED")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared").to_string());
        let path = Path::new(&shared).join("data/traces/synthetic_trace.jsonl");
        let t = load_trace(&path, Some(1000)).unwrap();
        assert_eq!(t.len(), 1000);
        for r in &t {
            assert_eq!(
                r.hash_ids.len(),
                r.input_length.div_ceil(MOONCAKE_BLOCK_TOKENS)
            );
            assert_eq!(synthesize_prompt(r).len(), r.input_length);
        }
        assert_eq!(t[0].input_length, 40160);
    }

    #[test]
    fn synthetic_ids_are_regular_qwen3_tokens() {
        let shared = std::env::var("KVROUTER_SHARED")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared").to_string());
        let pre = kvrouter_preprocess::Preprocessor::from_model_dir(
            Path::new(&shared).join("data/tokenizers/qwen3"),
        )
        .unwrap();
        let tok = pre.tokenizer();
        // 151,643 regular ids; the special (added) tokens start right after.
        assert_eq!(tok.get_vocab_size(false), 151_643);
        assert!(VOCAB_START as u64 + VOCAB_SPAN <= 151_643);
        assert_eq!(tok.id_to_token(151_643).as_deref(), Some("<|endoftext|>"));
        for id in [VOCAB_START, VOCAB_START + VOCAB_SPAN as u32 - 1] {
            assert!(tok.id_to_token(id).is_some(), "{id}");
        }
    }

    #[test]
    fn malformed_lines_name_their_place() {
        let dir = std::env::temp_dir().join(format!("kvrouter-trace-{}", std::process::id()));
        std::fs::write(
            &dir,
            "{\"timestamp\":0,\"input_length\":1,\"output_length\":1,\"hash_ids\":[0]}\n\n{oops}\n",
        )
        .unwrap();
        let err = load_trace(&dir, None).unwrap_err().to_string();
        assert!(err.contains(":3:"), "{err}");
        let (ok, skipped) = load_trace_skipping(&dir, None).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].line, 3);
        assert!(
            skipped[0].to_string().starts_with("line 3: "),
            "{}",
            skipped[0]
        );
        std::fs::remove_file(&dir).ok();
    }
}
