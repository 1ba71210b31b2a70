//! Engine-level KV events as vLLM and SGLang put them on the wire, with every optional field of
//! every released version, and their MessagePack codec.
//!
//! Wire shapes (`kv-event-wire.md` §2.2, `dynamo-router-spec.md` §3.2–3.3):
//!
//! * batch: array `[ts: f64, events: array, dp_rank: int|nil]` (third element optional); a map
//!   `{"ts", "events", "data_parallel_rank"}` is tolerated (vLLM main-branch snapshot).
//! * event, vLLM ≤ 0.23: positional array with the tag first, trailing defaults omitted:
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//!   lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window]`,
//!   `["BlockRemoved", block_hashes, medium, group_idx, kv_cache_spec_kind,
//!   kv_cache_spec_sliding_window]`, `["AllBlocksCleared"]`. Dynamo's positional extension puts
//!   `block_mm_infos` (an array) at index 9; that is recognised by its type.
//! * event, vLLM ≥ 0.24 and SGLang: map with `"type"` plus field names.
//!
//! Block hashes are normalised to `u64` ([`crate::msgpack::Reader::read_hash`]). Unknown tags and
//! unknown fields are skipped and counted in [`DecodeStats`]; an event whose fields have the
//! wrong types is skipped and counted (the rest of the batch survives); only a batch whose
//! MessagePack structure itself is broken fails as a whole.

use kvrouter_core::event::{BlockMmInfo, MmObject};

use crate::msgpack::{Kind, MsgpackError, Reader, Writer};

/// One `KVEventBatch`: the events of one engine scheduler step, in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineBatch {
    /// Wall-clock seconds since the Unix epoch (engine `time.time()`); informational.
    pub ts: f64,
    /// Events in the order the engine produced them.
    pub events: Vec<EngineEvent>,
    /// Data-parallel rank of the publisher; `None` when the engine sent nil or omitted it.
    pub dp_rank: Option<u32>,
}

/// One engine KV event.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Newly cached full blocks.
    BlockStored(BlockStored),
    /// Evicted blocks.
    BlockRemoved(BlockRemoved),
    /// Every block of this publisher is gone (`reset_prefix_cache`).
    AllBlocksCleared,
}

/// A chain of newly cached full blocks (vLLM/SGLang `BlockStored`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// Engine hash of each block (normalised to 64 bits), in chain order.
    pub block_hashes: Vec<u64>,
    /// Engine hash of the block before the first one; `None` at the sequence start.
    pub parent_block_hash: Option<u64>,
    /// All blocks' tokens concatenated: `block_hashes.len() * block_size` ids.
    pub token_ids: Vec<u32>,
    /// Tokens per block, as the engine is configured.
    pub block_size: u32,
    /// vLLM's numeric LoRA id (not hashed; `lora_name` is).
    pub lora_id: Option<i64>,
    /// Storage medium: `"GPU"`, `"CPU"`, ... (vLLM ≥ 0.11, SGLang).
    pub medium: Option<String>,
    /// LoRA adapter name (vLLM ≥ 0.20, SGLang `format: dynamo`).
    pub lora_name: Option<String>,
    /// Per block: vLLM's untagged extra hash keys (vLLM ≥ 0.20).
    pub extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    /// KV-cache group of a hybrid model (vLLM ≥ 0.20).
    pub group_idx: Option<u32>,
    /// e.g. `"full_attention"`, `"sliding_window"` (vLLM ≥ 0.33).
    pub kv_cache_spec_kind: Option<String>,
    /// Sliding-window size in tokens of that group (vLLM ≥ 0.33).
    pub kv_cache_spec_sliding_window: Option<u32>,
    /// `"LOCAL"` / `"REMOTE"` (vLLM ≥ 0.33, Dynamo).
    pub locality: Option<String>,
    /// Cache namespace (SGLang, Dynamo/TRT-LLM relays).
    pub cache_salt: Option<String>,
    /// Per block multimodal objects (Dynamo/TRT-LLM relays).
    pub block_mm_infos: Option<Vec<Option<BlockMmInfo>>>,
    /// Eagle speculative decoding windows (Dynamo relays).
    pub is_eagle: Option<bool>,
}

/// Blocks evicted (vLLM/SGLang `BlockRemoved`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    /// Engine hashes of the evicted blocks (normalised to 64 bits).
    pub block_hashes: Vec<u64>,
    /// Storage medium the blocks left (`"GPU"`, ...).
    pub medium: Option<String>,
    /// KV-cache group (vLLM ≥ 0.20).
    pub group_idx: Option<u32>,
    /// Kind of that group (vLLM ≥ 0.33 maps, Dynamo positional tail).
    pub kv_cache_spec_kind: Option<String>,
    /// Sliding window of that group, in tokens.
    pub kv_cache_spec_sliding_window: Option<u32>,
    /// `"LOCAL"` / `"REMOTE"` (vLLM ≥ 0.33).
    pub locality: Option<String>,
}

/// One of vLLM's per-block extra hash keys (`kv_cache_utils._gen_extra_keys`, published untagged):
/// the LoRA name or cache salt (strings), a multimodal `(identifier, offset)` tuple, or a
/// prompt-embedding digest (bytes).
#[derive(Debug, Clone, PartialEq)]
pub enum ExtraKey {
    /// LoRA name or cache salt.
    Str(String),
    /// A multimodal object: its identifier (hashed with `hash_mm_identifier`) and token offset.
    Mm { identifier: String, offset: i64 },
    /// An integer key (not produced by released vLLM; kept for tolerance).
    Int(i64),
    /// A digest (prompt embeddings): not reproducible by a router.
    Bytes(Vec<u8>),
    /// Any other shape (kept so that counting is possible; never hashed).
    Other,
}

/// What the decoder counted: things it skipped instead of failing on, and the wire format of
/// each batch it decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Events with a tag other than the three known ones.
    pub unknown_events: u64,
    /// Fields (map keys or extra positional elements) the decoder does not know.
    pub unknown_fields: u64,
    /// Events whose fields had the wrong types (skipped, rest of the batch kept).
    pub malformed_events: u64,
    /// Decoded batches by the wire format their events showed.
    pub formats: FormatCounts,
}

impl DecodeStats {
    /// Adds another batch's counts.
    pub fn add(&mut self, o: &DecodeStats) {
        self.unknown_events += o.unknown_events;
        self.unknown_fields += o.unknown_fields;
        self.malformed_events += o.malformed_events;
        self.formats.add(&o.formats);
    }

    /// Events or fields skipped (everything but the format counts).
    pub fn skipped(&self) -> u64 {
        self.unknown_events + self.unknown_fields + self.malformed_events
    }
}

/// Which engine's encoding a batch's events show (`kv-event-wire.md` §2.2 and §2.5). All are
/// decoded alike; the format is told apart for operators and tests, from evidence in the
/// `BlockStored` events:
///
/// * [`VllmArray`](Self::VllmArray): positional events (vLLM ≤ 0.23);
/// * [`VllmMap`](Self::VllmMap): map events with a nil `lora_name` (vLLM ≥ 0.24 always
///   writes it: it has no default) or a vLLM-only field (`extra_keys`, `group_idx`,
///   `kv_cache_spec_*`, `locality`, `ownership`, `lookahead_token_ids`), or a map batch;
/// * [`Sglang`](Self::Sglang): map events with `lora_id` but no `lora_name` (SGLang omits a
///   nil `lora_name`), or an SGLang-only field (`cache_salt`, `session_id`);
/// * [`Trtllm`](Self::Trtllm): TensorRT-LLM's JSON events polled over HTTP
///   ([`crate::trtllm`]; never on ZMQ: its ZMQ publisher writes vLLM's map events);
/// * [`Unknown`](Self::Unknown): no evidence (only removals or clears, or another shape,
///   e.g. Dynamo's relays).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// No evidence either way.
    #[default]
    Unknown,
    /// vLLM ≤ 0.23 positional events.
    VllmArray,
    /// vLLM ≥ 0.24 map events.
    VllmMap,
    /// SGLang map events.
    Sglang,
    /// TensorRT-LLM JSON events (`POST /kv_cache_events`).
    Trtllm,
}

impl WireFormat {
    /// Every format, in [`FormatCounts`] order.
    pub const ALL: [WireFormat; 5] = [
        WireFormat::VllmArray,
        WireFormat::VllmMap,
        WireFormat::Sglang,
        WireFormat::Trtllm,
        WireFormat::Unknown,
    ];

    /// `"vllm_array"`, `"vllm_map"`, `"sglang"`, `"trtllm"` or `"unknown"` (metric label
    /// values).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VllmArray => "vllm_array",
            Self::VllmMap => "vllm_map",
            Self::Sglang => "sglang",
            Self::Trtllm => "trtllm",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for WireFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Batches counted per [`WireFormat`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FormatCounts {
    /// vLLM ≤ 0.23 positional batches.
    pub vllm_array: u64,
    /// vLLM ≥ 0.24 map batches.
    pub vllm_map: u64,
    /// SGLang batches.
    pub sglang: u64,
    /// TensorRT-LLM polls that returned events.
    pub trtllm: u64,
    /// Batches without evidence.
    pub unknown: u64,
}

impl FormatCounts {
    /// The count of `f`.
    pub fn get(&self, f: WireFormat) -> u64 {
        match f {
            WireFormat::VllmArray => self.vllm_array,
            WireFormat::VllmMap => self.vllm_map,
            WireFormat::Sglang => self.sglang,
            WireFormat::Trtllm => self.trtllm,
            WireFormat::Unknown => self.unknown,
        }
    }

    /// Counts one batch of format `f`.
    pub fn count(&mut self, f: WireFormat) {
        match f {
            WireFormat::VllmArray => self.vllm_array += 1,
            WireFormat::VllmMap => self.vllm_map += 1,
            WireFormat::Sglang => self.sglang += 1,
            WireFormat::Trtllm => self.trtllm += 1,
            WireFormat::Unknown => self.unknown += 1,
        }
    }

    /// Adds another set of counts.
    pub fn add(&mut self, o: &FormatCounts) {
        self.vllm_array += o.vllm_array;
        self.vllm_map += o.vllm_map;
        self.sglang += o.sglang;
        self.trtllm += o.trtllm;
        self.unknown += o.unknown;
    }
}

/// Event encoding for [`encode_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// vLLM ≥ 0.24: each event a map with `"type"` first.
    #[default]
    Map,
    /// vLLM ≤ 0.23: each event a positional array with the tag first.
    Array,
    /// SGLang 0.5.23 (`sglang/srt/disaggregation/kv_events.py`): map events whose hashes are
    /// signed int64, `lora_id` always present, `medium`, `cache_salt` and `lora_name` only
    /// when set, none of vLLM's other fields; the batch's third element is `attn_dp_rank`.
    Sglang,
}

/// Decodes one msgpack `KVEventBatch` payload (frame 2 of a message).
///
/// Errors only when the batch's own structure is unusable (not an array/map, truncated, no
/// events array); individual bad events are counted in `stats` and skipped.
pub fn decode_batch(payload: &[u8], stats: &mut DecodeStats) -> Result<EngineBatch, MsgpackError> {
    let mut r = Reader::new(payload);
    let mut batch = EngineBatch::default();
    let mut format = None;
    match r.peek_kind()? {
        Kind::Map => {
            // Only vLLM's main branch ever wrote a map batch.
            format = Some(WireFormat::VllmMap);
            let n = r.read_map_len()?;
            let mut saw_events = false;
            for _ in 0..n {
                let key = r.read_str()?;
                match key {
                    "ts" => batch.ts = r.read_f64()?,
                    "events" => {
                        batch.events = decode_events(&mut r, stats, &mut format)?;
                        saw_events = true;
                    }
                    "data_parallel_rank" | "dp_rank" | "attn_dp_rank" => {
                        batch.dp_rank = opt_u32(&mut r)?
                    }
                    _ => {
                        stats.unknown_fields += 1;
                        r.skip()?;
                    }
                }
            }
            if !saw_events {
                return Err(MsgpackError::Type {
                    expected: "batch with events",
                    marker: payload[0],
                    at: 0,
                });
            }
        }
        _ => {
            let n = r.read_array_len()?;
            if n < 2 {
                return Err(MsgpackError::Type {
                    expected: "batch array [ts, events, dp_rank?]",
                    marker: payload[0],
                    at: 0,
                });
            }
            batch.ts = r.read_f64()?;
            batch.events = decode_events(&mut r, stats, &mut format)?;
            if n >= 3 {
                batch.dp_rank = opt_u32(&mut r)?;
            }
            for _ in 3..n {
                stats.unknown_fields += 1;
                r.skip()?;
            }
        }
    }
    stats.formats.count(format.unwrap_or_default());
    Ok(batch)
}

/// `format` is set by the first event that shows one (see [`WireFormat`]).
fn decode_events(
    r: &mut Reader<'_>,
    stats: &mut DecodeStats,
    format: &mut Option<WireFormat>,
) -> Result<Vec<EngineEvent>, MsgpackError> {
    let n = r.read_array_len()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = r.position();
        match decode_event(r, stats, format) {
            Ok(Some(ev)) => out.push(ev),
            Ok(None) => stats.unknown_events += 1,
            Err(_) => {
                // Re-read the event structurally; if even that fails the batch is broken.
                r.seek(start);
                r.skip()?;
                stats.malformed_events += 1;
            }
        }
    }
    Ok(out)
}

fn opt_u32(r: &mut Reader<'_>) -> Result<Option<u32>, MsgpackError> {
    if r.try_nil()? {
        Ok(None)
    } else {
        r.read_u32().map(Some)
    }
}

fn opt_i64(r: &mut Reader<'_>) -> Result<Option<i64>, MsgpackError> {
    if r.try_nil()? {
        Ok(None)
    } else {
        r.read_i64().map(Some)
    }
}

fn opt_hash(r: &mut Reader<'_>) -> Result<Option<u64>, MsgpackError> {
    if r.try_nil()? {
        Ok(None)
    } else {
        r.read_hash().map(Some)
    }
}

fn opt_string(r: &mut Reader<'_>) -> Result<Option<String>, MsgpackError> {
    if r.try_nil()? {
        Ok(None)
    } else {
        r.read_str().map(|s| Some(s.to_owned()))
    }
}

fn hashes(r: &mut Reader<'_>) -> Result<Vec<u64>, MsgpackError> {
    if r.try_nil()? {
        return Ok(Vec::new());
    }
    let n = r.read_array_len()?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(r.read_hash()?);
    }
    Ok(v)
}

fn tokens(r: &mut Reader<'_>) -> Result<Vec<u32>, MsgpackError> {
    if r.try_nil()? {
        return Ok(Vec::new());
    }
    let n = r.read_array_len()?;
    let mut v = Vec::new();
    r.read_u32s_into(n, &mut v)?;
    Ok(v)
}

fn extra_keys(r: &mut Reader<'_>) -> Result<Option<Vec<Option<Vec<ExtraKey>>>>, MsgpackError> {
    if r.try_nil()? {
        return Ok(None);
    }
    let n = r.read_array_len()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if r.try_nil()? {
            out.push(None);
            continue;
        }
        let k = r.read_array_len()?;
        let mut keys = Vec::with_capacity(k);
        for _ in 0..k {
            keys.push(extra_key(r)?);
        }
        out.push(Some(keys));
    }
    Ok(Some(out))
}

fn extra_key(r: &mut Reader<'_>) -> Result<ExtraKey, MsgpackError> {
    Ok(match r.peek_kind()? {
        Kind::Str => ExtraKey::Str(r.read_str()?.to_owned()),
        Kind::Int => ExtraKey::Int(r.read_i64()?),
        Kind::Bin => ExtraKey::Bytes(r.read_bin()?.to_vec()),
        Kind::Array => {
            let start = r.position();
            let n = r.read_array_len()?;
            if n == 2 && r.peek_kind()? == Kind::Str {
                let identifier = r.read_str()?.to_owned();
                if r.peek_kind()? == Kind::Int {
                    let offset = r.read_i64()?;
                    return Ok(ExtraKey::Mm { identifier, offset });
                }
            }
            r.seek(start);
            r.skip()?;
            ExtraKey::Other
        }
        _ => {
            r.skip()?;
            ExtraKey::Other
        }
    })
}

/// `[{"mm_objects": [{"mm_hash": u64, "offsets": [[s, e], ...]}]} | nil, ...]` (Dynamo shape).
fn mm_infos(r: &mut Reader<'_>) -> Result<Option<Vec<Option<BlockMmInfo>>>, MsgpackError> {
    if r.try_nil()? {
        return Ok(None);
    }
    let n = r.read_array_len()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if r.try_nil()? {
            out.push(None);
            continue;
        }
        let mut info = BlockMmInfo::default();
        let fields = r.read_map_len()?;
        for _ in 0..fields {
            if r.read_str()? != "mm_objects" {
                r.skip()?;
                continue;
            }
            let objs = r.read_array_len()?;
            for _ in 0..objs {
                let mut obj = MmObject::default();
                let of = r.read_map_len()?;
                for _ in 0..of {
                    match r.read_str()? {
                        "mm_hash" => obj.mm_hash = r.read_hash()?,
                        "offsets" => {
                            let k = r.read_array_len()?;
                            for _ in 0..k {
                                if r.read_array_len()? != 2 {
                                    return Err(MsgpackError::Type {
                                        expected: "[start, end]",
                                        marker: 0,
                                        at: r.position(),
                                    });
                                }
                                obj.offsets.push((r.read_u32()?, r.read_u32()?));
                            }
                        }
                        _ => r.skip()?,
                    }
                }
                info.mm_objects.push(obj);
            }
        }
        out.push(Some(info));
    }
    Ok(Some(out))
}

/// Reads one field by name into `f`. Returns false for unknown names (value skipped).
fn named_field(r: &mut Reader<'_>, name: &[u8], s: &mut BlockStored) -> Result<bool, MsgpackError> {
    match name {
        b"block_hashes" => s.block_hashes = hashes(r)?,
        b"parent_block_hash" => s.parent_block_hash = opt_hash(r)?,
        b"token_ids" => s.token_ids = tokens(r)?,
        b"block_size" => s.block_size = opt_u32(r)?.unwrap_or(0),
        b"lora_id" => s.lora_id = opt_i64(r)?,
        b"medium" => s.medium = opt_string(r)?,
        b"lora_name" => s.lora_name = opt_string(r)?,
        b"extra_keys" => s.extra_keys = extra_keys(r)?,
        b"group_idx" => s.group_idx = opt_u32(r)?,
        b"kv_cache_spec_kind" => s.kv_cache_spec_kind = opt_string(r)?,
        b"kv_cache_spec_sliding_window" => s.kv_cache_spec_sliding_window = opt_u32(r)?,
        b"locality" => s.locality = opt_string(r)?,
        b"cache_salt" => s.cache_salt = opt_string(r)?,
        b"block_mm_infos" => s.block_mm_infos = mm_infos(r)?,
        b"is_eagle" => {
            s.is_eagle = if r.try_nil()? {
                None
            } else {
                Some(r.read_bool()?)
            }
        }
        // Known vLLM 0.33 / SGLang fields that do not affect routing.
        b"ownership" | b"session_id" | b"lookahead_token_ids" | b"type" => r.skip()?,
        _ => {
            r.skip()?;
            return Ok(false);
        }
    }
    Ok(true)
}

fn finish(tag: &str, s: BlockStored) -> Option<EngineEvent> {
    Some(match tag {
        "BlockStored" => EngineEvent::BlockStored(s),
        "BlockRemoved" => EngineEvent::BlockRemoved(BlockRemoved {
            block_hashes: s.block_hashes,
            medium: s.medium,
            group_idx: s.group_idx,
            kv_cache_spec_kind: s.kv_cache_spec_kind,
            kv_cache_spec_sliding_window: s.kv_cache_spec_sliding_window,
            locality: s.locality,
        }),
        "AllBlocksCleared" => EngineEvent::AllBlocksCleared,
        _ => return None,
    })
}

/// Positional field names after the tag (vLLM ≤ 0.23 declaration order).
const STORED_POSITIONAL: &[&str] = &[
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
];
/// Dynamo's positional tail: `block_mm_infos` at index 9 (array-typed), then these.
const STORED_POSITIONAL_DYNAMO_TAIL: &[&str] = &[
    "block_mm_infos",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
];
const REMOVED_POSITIONAL: &[&str] = &[
    "block_hashes",
    "medium",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
];

/// What one map event's keys say about its wire format ([`WireFormat`]).
#[derive(Default)]
struct MapEvidence {
    lora_id: bool,
    /// `lora_name` present: whether its value was nil.
    lora_name_nil: Option<bool>,
    vllm_only: bool,
    sglang_only: bool,
}

impl MapEvidence {
    /// Notes `key`, whose value is next in `r`.
    fn key(&mut self, key: &[u8], r: &Reader<'_>) -> Result<(), MsgpackError> {
        match key {
            b"lora_id" => self.lora_id = true,
            b"lora_name" => self.lora_name_nil = Some(r.peek_kind()? == Kind::Nil),
            b"extra_keys"
            | b"group_idx"
            | b"kv_cache_spec_kind"
            | b"kv_cache_spec_sliding_window"
            | b"locality"
            | b"ownership"
            | b"lookahead_token_ids" => self.vllm_only = true,
            b"cache_salt" | b"session_id" => self.sglang_only = true,
            _ => {}
        }
        Ok(())
    }

    fn format(&self) -> Option<WireFormat> {
        if self.vllm_only || self.lora_name_nil == Some(true) {
            Some(WireFormat::VllmMap)
        } else if self.sglang_only || (self.lora_id && self.lora_name_nil.is_none()) {
            Some(WireFormat::Sglang)
        } else {
            None
        }
    }
}

/// `Ok(None)` = unknown tag (skipped). Errors leave the reader mid-event (caller re-skips).
/// A `BlockStored` sets `format` when it is still unknown and the event shows one.
fn decode_event(
    r: &mut Reader<'_>,
    stats: &mut DecodeStats,
    format: &mut Option<WireFormat>,
) -> Result<Option<EngineEvent>, MsgpackError> {
    let mut f = BlockStored::default();
    match r.peek_kind()? {
        Kind::Array => {
            let n = r.read_array_len()?;
            if n == 0 {
                return Ok(None);
            }
            let tag = r.read_str()?;
            let names: &[&str] = match tag {
                "BlockStored" => STORED_POSITIONAL,
                "BlockRemoved" => REMOVED_POSITIONAL,
                "AllBlocksCleared" => &[],
                _ => {
                    for _ in 1..n {
                        r.skip()?;
                    }
                    return Ok(None);
                }
            };
            format.get_or_insert(WireFormat::VllmArray);
            let mut dynamo_tail = false;
            for i in 1..n {
                // Index 9 holding an array: Dynamo's `block_mm_infos` extension, not vLLM's group_idx.
                if tag == "BlockStored" && i == 9 && r.peek_kind()? == Kind::Array {
                    dynamo_tail = true;
                }
                let name = if dynamo_tail {
                    STORED_POSITIONAL_DYNAMO_TAIL.get(i - 9)
                } else {
                    names.get(i - 1)
                };
                match name {
                    Some(name) => {
                        named_field(r, name.as_bytes(), &mut f)?;
                    }
                    None => {
                        stats.unknown_fields += 1;
                        r.skip()?;
                    }
                }
            }
            Ok(finish(tag, f))
        }
        Kind::Map => {
            let n = r.read_map_len()?;
            let mut tag: Option<&str> = None;
            let mut unknown = 0;
            let mut evidence = format.is_none().then(MapEvidence::default);
            for _ in 0..n {
                let key = r.read_str_bytes()?;
                if key == b"type" {
                    tag = Some(r.read_str()?);
                    continue;
                }
                if let Some(e) = &mut evidence {
                    e.key(key, r)?;
                }
                if !named_field(r, key, &mut f)? {
                    unknown += 1;
                }
            }
            stats.unknown_fields += unknown;
            if tag == Some("BlockStored") {
                if let Some(fmt) = evidence.and_then(|e| e.format()) {
                    *format = Some(fmt);
                }
            }
            Ok(tag.and_then(|t| finish(t, f)))
        }
        _ => Err(MsgpackError::Type {
            expected: "event array or map",
            marker: 0,
            at: r.position(),
        }),
    }
}

/// Encodes a batch as the engines do: `[ts, events, dp_rank]` with events in `encoding`.
///
/// Map encoding follows vLLM 0.33 (`lora_id`, `medium`, `lora_name` always present, other
/// optional fields only when set); array encoding follows vLLM 0.20 (positional, trailing
/// `None`s omitted); SGLang encoding follows SGLang 0.5.23 (see [`Encoding::Sglang`]; the
/// fields it has no slot for are dropped).
pub fn encode_batch(batch: &EngineBatch, encoding: Encoding) -> Vec<u8> {
    let blocks: usize = batch
        .events
        .iter()
        .map(|e| match e {
            EngineEvent::BlockStored(s) => s.token_ids.len() * 3 + s.block_hashes.len() * 9 + 160,
            EngineEvent::BlockRemoved(r) => r.block_hashes.len() * 9 + 64,
            EngineEvent::AllBlocksCleared => 24,
        })
        .sum();
    let mut w = Writer::with_capacity(blocks + 16);
    w.array_len(3);
    w.f64(batch.ts);
    w.array_len(batch.events.len());
    for ev in &batch.events {
        match encoding {
            Encoding::Map => encode_event_map(&mut w, ev),
            Encoding::Array => encode_event_array(&mut w, ev),
            Encoding::Sglang => encode_event_sglang(&mut w, ev),
        }
    }
    match batch.dp_rank {
        Some(r) => w.uint(r as u64),
        None => w.nil(),
    }
    w.into_inner()
}

fn w_hashes(w: &mut Writer, h: &[u64]) {
    w.array_len(h.len());
    for &x in h {
        w.uint(x);
    }
}

fn w_opt_str(w: &mut Writer, s: &Option<String>) {
    match s {
        Some(s) => w.str(s),
        None => w.nil(),
    }
}

fn w_opt_u(w: &mut Writer, v: Option<u64>) {
    match v {
        Some(v) => w.uint(v),
        None => w.nil(),
    }
}

fn w_extra_keys(w: &mut Writer, ek: &[Option<Vec<ExtraKey>>]) {
    w.array_len(ek.len());
    for keys in ek {
        match keys {
            None => w.nil(),
            Some(keys) => {
                w.array_len(keys.len());
                for k in keys {
                    match k {
                        ExtraKey::Str(s) => w.str(s),
                        ExtraKey::Mm { identifier, offset } => {
                            w.array_len(2);
                            w.str(identifier);
                            w.int(*offset);
                        }
                        ExtraKey::Int(v) => w.int(*v),
                        ExtraKey::Bytes(b) => w.bin(b),
                        ExtraKey::Other => w.nil(),
                    }
                }
            }
        }
    }
}

fn w_mm_infos(w: &mut Writer, infos: &[Option<BlockMmInfo>]) {
    w.array_len(infos.len());
    for info in infos {
        match info {
            None => w.nil(),
            Some(info) => {
                w.map_len(1);
                w.str("mm_objects");
                w.array_len(info.mm_objects.len());
                for o in &info.mm_objects {
                    w.map_len(2);
                    w.str("mm_hash");
                    w.uint(o.mm_hash);
                    w.str("offsets");
                    w.array_len(o.offsets.len());
                    for &(a, b) in &o.offsets {
                        w.array_len(2);
                        w.uint(a as u64);
                        w.uint(b as u64);
                    }
                }
            }
        }
    }
}

fn w_tokens(w: &mut Writer, t: &[u32]) {
    w.array_len(t.len());
    for &x in t {
        w.uint(x as u64);
    }
}

fn encode_event_map(w: &mut Writer, ev: &EngineEvent) {
    match ev {
        EngineEvent::BlockStored(s) => {
            let opt = [
                s.extra_keys.is_some(),
                s.group_idx.is_some(),
                s.kv_cache_spec_kind.is_some(),
                s.kv_cache_spec_sliding_window.is_some(),
                s.locality.is_some(),
                s.cache_salt.is_some(),
                s.block_mm_infos.is_some(),
                s.is_eagle.is_some(),
            ];
            w.map_len(8 + opt.iter().filter(|&&b| b).count());
            w.str("type");
            w.str("BlockStored");
            w.str("block_hashes");
            w_hashes(w, &s.block_hashes);
            w.str("parent_block_hash");
            w_opt_u(w, s.parent_block_hash);
            w.str("token_ids");
            w_tokens(w, &s.token_ids);
            w.str("block_size");
            w.uint(s.block_size as u64);
            w.str("lora_id");
            match s.lora_id {
                Some(v) => w.int(v),
                None => w.nil(),
            }
            w.str("medium");
            w_opt_str(w, &s.medium);
            w.str("lora_name");
            w_opt_str(w, &s.lora_name);
            if let Some(ek) = &s.extra_keys {
                w.str("extra_keys");
                w_extra_keys(w, ek);
            }
            if let Some(g) = s.group_idx {
                w.str("group_idx");
                w.uint(g as u64);
            }
            if let Some(k) = &s.kv_cache_spec_kind {
                w.str("kv_cache_spec_kind");
                w.str(k);
            }
            if let Some(sw) = s.kv_cache_spec_sliding_window {
                w.str("kv_cache_spec_sliding_window");
                w.uint(sw as u64);
            }
            if let Some(l) = &s.locality {
                w.str("locality");
                w.str(l);
            }
            if let Some(c) = &s.cache_salt {
                w.str("cache_salt");
                w.str(c);
            }
            if let Some(m) = &s.block_mm_infos {
                w.str("block_mm_infos");
                w_mm_infos(w, m);
            }
            if let Some(e) = s.is_eagle {
                w.str("is_eagle");
                w.bool(e);
            }
        }
        EngineEvent::BlockRemoved(rm) => {
            let opt = [
                rm.group_idx.is_some(),
                rm.kv_cache_spec_kind.is_some(),
                rm.kv_cache_spec_sliding_window.is_some(),
                rm.locality.is_some(),
            ];
            w.map_len(3 + opt.iter().filter(|&&b| b).count());
            w.str("type");
            w.str("BlockRemoved");
            w.str("block_hashes");
            w_hashes(w, &rm.block_hashes);
            w.str("medium");
            w_opt_str(w, &rm.medium);
            if let Some(g) = rm.group_idx {
                w.str("group_idx");
                w.uint(g as u64);
            }
            if let Some(k) = &rm.kv_cache_spec_kind {
                w.str("kv_cache_spec_kind");
                w.str(k);
            }
            if let Some(sw) = rm.kv_cache_spec_sliding_window {
                w.str("kv_cache_spec_sliding_window");
                w.uint(sw as u64);
            }
            if let Some(l) = &rm.locality {
                w.str("locality");
                w.str(l);
            }
        }
        EngineEvent::AllBlocksCleared => {
            w.map_len(1);
            w.str("type");
            w.str("AllBlocksCleared");
        }
    }
}

/// SGLang's hashes: the engine's 64 bits as a signed int64 (msgspec writes the
/// non-negative ones as unsigned).
fn w_signed_hashes(w: &mut Writer, h: &[u64]) {
    w.array_len(h.len());
    for &x in h {
        w.int(x as i64);
    }
}

/// SGLang 0.5.23's map events: `KVCacheEvent(tag=True, omit_defaults=True)` with the fields
/// in declaration order. `lora_id` has no default, so it is always written; `medium`,
/// `cache_salt` and `lora_name` (session ids are not modelled) only when set.
fn encode_event_sglang(w: &mut Writer, ev: &EngineEvent) {
    match ev {
        EngineEvent::BlockStored(s) => {
            let opt = [
                s.medium.is_some(),
                s.cache_salt.is_some(),
                s.lora_name.is_some(),
            ];
            w.map_len(6 + opt.iter().filter(|&&b| b).count());
            w.str("type");
            w.str("BlockStored");
            w.str("block_hashes");
            w_signed_hashes(w, &s.block_hashes);
            w.str("parent_block_hash");
            match s.parent_block_hash {
                Some(h) => w.int(h as i64),
                None => w.nil(),
            }
            w.str("token_ids");
            w_tokens(w, &s.token_ids);
            w.str("block_size");
            w.uint(s.block_size as u64);
            w.str("lora_id");
            match s.lora_id {
                Some(v) => w.int(v),
                None => w.nil(),
            }
            if let Some(m) = &s.medium {
                w.str("medium");
                w.str(m);
            }
            if let Some(c) = &s.cache_salt {
                w.str("cache_salt");
                w.str(c);
            }
            if let Some(l) = &s.lora_name {
                w.str("lora_name");
                w.str(l);
            }
        }
        EngineEvent::BlockRemoved(rm) => {
            w.map_len(2 + usize::from(rm.medium.is_some()));
            w.str("type");
            w.str("BlockRemoved");
            w.str("block_hashes");
            w_signed_hashes(w, &rm.block_hashes);
            if let Some(m) = &rm.medium {
                w.str("medium");
                w.str(m);
            }
        }
        EngineEvent::AllBlocksCleared => {
            w.map_len(1);
            w.str("type");
            w.str("AllBlocksCleared");
        }
    }
}

/// Positional (vLLM ≤ 0.23) encoding. Fields the positional layout has no slot for
/// (`cache_salt`, `block_mm_infos`, `is_eagle`) are not representable and are dropped.
fn encode_event_array(w: &mut Writer, ev: &EngineEvent) {
    match ev {
        EngineEvent::BlockStored(s) => {
            // Last present optional positional field decides the length.
            let tail = [
                s.lora_name.is_some(),
                s.extra_keys.is_some(),
                s.group_idx.is_some(),
                s.kv_cache_spec_kind.is_some(),
                s.kv_cache_spec_sliding_window.is_some(),
                s.locality.is_some(),
            ];
            let n_tail = tail.iter().rposition(|&b| b).map_or(0, |i| i + 1);
            w.array_len(7 + n_tail);
            w.str("BlockStored");
            w_hashes(w, &s.block_hashes);
            w_opt_u(w, s.parent_block_hash);
            w_tokens(w, &s.token_ids);
            w.uint(s.block_size as u64);
            match s.lora_id {
                Some(v) => w.int(v),
                None => w.nil(),
            }
            w_opt_str(w, &s.medium);
            for i in 0..n_tail {
                match i {
                    0 => w_opt_str(w, &s.lora_name),
                    1 => match &s.extra_keys {
                        Some(ek) => w_extra_keys(w, ek),
                        None => w.nil(),
                    },
                    2 => w_opt_u(w, s.group_idx.map(u64::from)),
                    3 => w_opt_str(w, &s.kv_cache_spec_kind),
                    4 => w_opt_u(w, s.kv_cache_spec_sliding_window.map(u64::from)),
                    _ => w_opt_str(w, &s.locality),
                }
            }
        }
        EngineEvent::BlockRemoved(rm) => {
            let tail = [
                rm.group_idx.is_some(),
                rm.kv_cache_spec_kind.is_some(),
                rm.kv_cache_spec_sliding_window.is_some(),
            ];
            let n_tail = tail.iter().rposition(|&b| b).map_or(0, |i| i + 1);
            w.array_len(3 + n_tail);
            w.str("BlockRemoved");
            w_hashes(w, &rm.block_hashes);
            w_opt_str(w, &rm.medium);
            for i in 0..n_tail {
                match i {
                    0 => w_opt_u(w, rm.group_idx.map(u64::from)),
                    1 => w_opt_str(w, &rm.kv_cache_spec_kind),
                    _ => w_opt_u(w, rm.kv_cache_spec_sliding_window.map(u64::from)),
                }
            }
        }
        EngineEvent::AllBlocksCleared => {
            w.array_len(1);
            w.str("AllBlocksCleared");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_of(b: &EngineBatch) -> &BlockStored {
        match &b.events[0] {
            EngineEvent::BlockStored(s) => s,
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn map_batch_is_tolerated() {
        // {"ts": 2.5, "events": [["AllBlocksCleared"]], "data_parallel_rank": 3, "x": nil}
        let mut w = Writer::default();
        w.map_len(4);
        w.str("ts");
        w.f64(2.5);
        w.str("events");
        w.array_len(1);
        w.array_len(1);
        w.str("AllBlocksCleared");
        w.str("data_parallel_rank");
        w.uint(3);
        w.str("x");
        w.nil();
        let mut st = DecodeStats::default();
        let b = decode_batch(&w.into_inner(), &mut st).unwrap();
        assert_eq!(
            b,
            EngineBatch {
                ts: 2.5,
                events: vec![EngineEvent::AllBlocksCleared],
                dp_rank: Some(3)
            }
        );
        assert_eq!(st.unknown_fields, 1);
    }

    #[test]
    fn sglang_map_with_signed_hashes_and_cache_salt() {
        let mut w = Writer::default();
        w.array_len(3);
        w.f64(1.0);
        w.array_len(1);
        w.map_len(8);
        w.str("type");
        w.str("BlockStored");
        w.str("block_hashes");
        w.array_len(1);
        w.int(-5);
        w.str("parent_block_hash");
        w.int(-6);
        w.str("token_ids");
        w.array_len(2);
        w.uint(70_000);
        w.uint(1);
        w.str("block_size");
        w.uint(2);
        w.str("lora_id");
        w.int(3);
        w.str("cache_salt");
        w.str("ns1");
        w.str("lora_name");
        w.str("my-lora");
        w.nil(); // batch dp_rank nil (SGLang)
        let b = decode_batch(&w.into_inner(), &mut DecodeStats::default()).unwrap();
        let s = stored_of(&b);
        assert_eq!(s.block_hashes, [(-5i64) as u64]);
        assert_eq!(s.parent_block_hash, Some((-6i64) as u64));
        assert_eq!(s.token_ids, [70_000, 1]);
        assert_eq!(
            (s.lora_id, s.cache_salt.as_deref(), s.lora_name.as_deref()),
            (Some(3), Some("ns1"), Some("my-lora"))
        );
        assert_eq!(b.dp_rank, None);
    }

    #[test]
    fn dynamo_positional_tail_with_mm_infos_is_recognised() {
        // [tag, hashes, parent, tokens, bs, lora_id, medium, lora_name, extra_keys, block_mm_infos, group_idx]
        let mut w = Writer::default();
        w.array_len(3);
        w.f64(1.0);
        w.array_len(1);
        w.array_len(11);
        w.str("BlockStored");
        w.array_len(1);
        w.uint(9);
        w.nil();
        w.array_len(1);
        w.uint(5);
        w.uint(1);
        w.nil();
        w.str("GPU");
        w.nil();
        w.array_len(1);
        w.array_len(2);
        w.str("my-lora");
        w.array_len(2);
        w.str("img");
        w.int(0);
        w_mm_infos(
            &mut w,
            &[Some(BlockMmInfo {
                mm_objects: vec![MmObject {
                    mm_hash: 0xDEAD,
                    offsets: vec![(0, 1)],
                }],
            })],
        );
        w.uint(0);
        w.uint(0);
        let b = decode_batch(&w.into_inner(), &mut DecodeStats::default()).unwrap();
        let s = stored_of(&b);
        assert_eq!(
            s.block_mm_infos.as_ref().unwrap()[0]
                .as_ref()
                .unwrap()
                .mm_objects[0]
                .mm_hash,
            0xDEAD
        );
        assert_eq!(s.group_idx, Some(0));
        let keys = s.extra_keys.as_ref().unwrap()[0].as_ref().unwrap();
        assert_eq!(
            keys,
            &[
                ExtraKey::Str("my-lora".into()),
                ExtraKey::Mm {
                    identifier: "img".into(),
                    offset: 0
                }
            ]
        );
    }

    #[test]
    fn every_optional_field_round_trips_through_the_map_encoding() {
        let s = BlockStored {
            block_hashes: vec![u64::MAX, 1],
            parent_block_hash: Some(7),
            token_ids: (0..2).collect(),
            block_size: 1,
            lora_id: Some(-1),
            medium: Some("CPU".into()),
            lora_name: Some("l".into()),
            extra_keys: Some(vec![
                None,
                Some(vec![ExtraKey::Bytes(vec![1]), ExtraKey::Int(4)]),
            ]),
            group_idx: Some(1),
            kv_cache_spec_kind: Some("sliding_window".into()),
            kv_cache_spec_sliding_window: Some(128),
            locality: Some("REMOTE".into()),
            cache_salt: Some("s".into()),
            block_mm_infos: Some(vec![None, None]),
            is_eagle: Some(true),
        };
        let b = EngineBatch {
            ts: 3.0,
            events: vec![EngineEvent::BlockStored(s)],
            dp_rank: Some(1),
        };
        let mut st = DecodeStats::default();
        assert_eq!(
            decode_batch(&encode_batch(&b, Encoding::Map), &mut st).unwrap(),
            b
        );
        assert_eq!(st.skipped(), 0);
        assert_eq!(st.formats.vllm_map, 1);
    }

    fn stored(hashes: Vec<u64>, parent: Option<u64>) -> EngineEvent {
        EngineEvent::BlockStored(BlockStored {
            token_ids: (0..hashes.len() as u32 * 2).collect(),
            block_hashes: hashes,
            parent_block_hash: parent,
            block_size: 2,
            medium: Some("GPU".into()),
            ..Default::default()
        })
    }

    #[test]
    fn sglang_encoding_writes_signed_hashes_and_only_its_fields() {
        let b = EngineBatch {
            ts: 1.5,
            events: vec![
                stored(vec![(1 << 63) | 5, 7], Some(1 << 63)),
                EngineEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![u64::MAX - (1 << 40)],
                    medium: Some("GPU".into()),
                    ..Default::default()
                }),
                EngineEvent::AllBlocksCleared,
            ],
            dp_rank: Some(2),
        };
        let p = encode_batch(&b, Encoding::Sglang);
        // Hashes at or above 2^63 are negative int64 (0xd3), the others unsigned.
        let neg = |h: u64| {
            let mut v = vec![0xd3];
            v.extend_from_slice(&(h as i64).to_be_bytes());
            v
        };
        for h in [(1 << 63) | 5, 1 << 63, u64::MAX - (1 << 40)] {
            assert!(p.windows(9).any(|w| w == neg(h).as_slice()), "{h:#x}");
        }
        for absent in [
            &b"lora_name"[..],
            b"extra_keys",
            b"group_idx",
            b"cache_salt",
        ] {
            assert!(!p.windows(absent.len()).any(|w| w == absent));
        }
        let mut st = DecodeStats::default();
        assert_eq!(decode_batch(&p, &mut st).unwrap(), b);
        assert_eq!(st.skipped(), 0);
        assert_eq!(st.formats.sglang, 1, "{st:?}");
    }

    #[test]
    fn formats_are_told_apart_by_their_fields() {
        let format = |b: &EngineBatch, enc| {
            let mut st = DecodeStats::default();
            decode_batch(&encode_batch(b, enc), &mut st).unwrap();
            let f = WireFormat::ALL
                .into_iter()
                .filter(|&f| st.formats.get(f) == 1)
                .collect::<Vec<_>>();
            assert_eq!(f.len(), 1, "{st:?}");
            f[0]
        };
        let store = EngineBatch {
            events: vec![stored(vec![1], None)],
            ..Default::default()
        };
        assert_eq!(format(&store, Encoding::Map), WireFormat::VllmMap);
        assert_eq!(format(&store, Encoding::Array), WireFormat::VllmArray);
        assert_eq!(format(&store, Encoding::Sglang), WireFormat::Sglang);
        // An SGLang LoRA store (lora_name set) shows SGLang by its cache_salt.
        let mut salted = store.clone();
        if let EngineEvent::BlockStored(s) = &mut salted.events[0] {
            s.lora_name = Some("a".into());
            s.cache_salt = Some("t".into());
        }
        assert_eq!(format(&salted, Encoding::Sglang), WireFormat::Sglang);
        // Removals and clears carry no evidence, in any encoding.
        let removals = EngineBatch {
            events: vec![
                EngineEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![3],
                    medium: Some("GPU".into()),
                    ..Default::default()
                }),
                EngineEvent::AllBlocksCleared,
            ],
            ..Default::default()
        };
        assert_eq!(format(&removals, Encoding::Map), WireFormat::Unknown);
        assert_eq!(format(&removals, Encoding::Sglang), WireFormat::Unknown);
        assert_eq!(format(&removals, Encoding::Array), WireFormat::VllmArray);
    }
}
