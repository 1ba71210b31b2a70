//! `compute_block_hash_for_seq` (and the sequence-hash helper): the core's hashing.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use kvrouter_core::event::BlockMmInfo;
use kvrouter_core::hash::LocalBlockHash;
use kvrouter_core::hash::{compute_block_hashes, compute_sequence_hashes, HashOptions};

use crate::ints::{extract_u32s_into, extract_u64s, u64_list, Range};

/// Per-block multimodal infos from Python (`[None | {"mm_objects": [{"mm_hash": int,
/// "offsets": [[start, end], ...]}]}]`).
pub fn extract_mm_infos(
    obj: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<Vec<Option<BlockMmInfo>>>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let value = crate::json::to_json(obj, "block_mm_infos")?;
    serde_json::from_value(value).map(Some).map_err(|e| {
        PyTypeError::new_err(format!(
            "block_mm_infos must be a list of None or {{\"mm_objects\": [{{\"mm_hash\": int, \"offsets\": [[int, int], ...]}}]}}: {e}"
        ))
    })
}

/// Local block hashes of `tokens`, as the router and the frontend compute them.
pub fn hash_tokens(
    py: Python<'_>,
    tokens: &Bound<'_, PyAny>,
    kv_block_size: usize,
    mm: Option<&Bound<'_, PyAny>>,
    lora_name: Option<&str>,
    is_eagle: Option<bool>,
    cache_salt: Option<&str>,
) -> PyResult<Vec<LocalBlockHash>> {
    if kv_block_size == 0 {
        return Err(PyValueError::new_err("kv_block_size must be > 0"));
    }
    let mm = extract_mm_infos(mm)?;
    let opts = HashOptions {
        lora_name,
        cache_salt,
        is_eagle: is_eagle.unwrap_or(false),
    };
    // The token buffer is reused per thread: a long prompt's fresh buffer each call costs page
    // faults comparable to hashing it. (Taken out while in use, so that a call re-entered from
    // an item's `__index__` gets its own.)
    let mut buf = SCRATCH.with(|s| s.take());
    buf.clear();
    let result = extract_u32s_into(tokens, "tokens", &mut buf)
        .map(|()| py.detach(|| compute_block_hashes(&buf, kv_block_size, &opts, mm.as_deref())));
    if buf.capacity() <= MAX_SCRATCH_TOKENS {
        SCRATCH.with(|s| s.set(buf));
    }
    result
}

/// Largest token buffer kept per thread between calls (4 MiB).
const MAX_SCRATCH_TOKENS: usize = 1 << 20;

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Local block hashes of the full blocks of a token sequence (Dynamo's
/// `compute_block_hash_for_seq`): XXH3-64 with seed 1337 of each block's tokens as little-endian
/// u32, the seed changed by a LoRA name and a cache namespace, multimodal hashes appended.
#[pyfunction]
#[pyo3(signature = (tokens, kv_block_size, block_mm_infos=None, lora_name=None, is_eagle=None, cache_namespace=None))]
pub fn compute_block_hash_for_seq<'py>(
    py: Python<'py>,
    tokens: &Bound<'_, PyAny>,
    kv_block_size: usize,
    block_mm_infos: Option<&Bound<'_, PyAny>>,
    lora_name: Option<&str>,
    is_eagle: Option<bool>,
    cache_namespace: Option<&str>,
) -> PyResult<Bound<'py, PyList>> {
    let hashes = hash_tokens(
        py,
        tokens,
        kv_block_size,
        block_mm_infos,
        lora_name,
        is_eagle,
        cache_namespace,
    )?;
    u64_list(py, hashes.iter().map(|h| h.0))
}

/// Sequence hashes (`seq[0] = local[0]`, `seq[i] = XXH3(LE(seq[i-1]) ‖ LE(local[i]), 1337)`)
/// of a chain of local block hashes from the sequence start.
#[pyfunction]
pub fn compute_seq_hash_for_block<'py>(
    py: Python<'py>,
    block_hashes: &Bound<'_, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let local: Vec<LocalBlockHash> = extract_u64s(block_hashes, "block_hashes", Range::U64)?
        .into_iter()
        .map(LocalBlockHash)
        .collect();
    u64_list(py, compute_sequence_hashes(&local).iter().map(|h| h.0))
}
