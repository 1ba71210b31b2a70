//! TensorRT-LLM's KV cache events: the JSON array `trtllm-serve` answers on
//! `POST /kv_cache_events` (`kv-event-wire.md` §3), decoded ([`decode_events`]), encoded for
//! the mock engine ([`encode_events`]), and turned into [`RouterEvent`]s per data-parallel rank
//! ([`TrtWorker`], [`TrtRank`]).
//!
//! Element shape: `{"event_id", "window_size", "attention_dp_rank"?, "data": {"type":
//! "created" | "stored" | "removed" | "updated", ...}}`.
//!
//! Conversion rules:
//!
//! * **Order**: `event_id` increases by one per event and rank (the engine buffers at most
//!   `event_buffer_max_size` events and drops the oldest, and each poll drains the buffer:
//!   there is no replay). A jump forward (a gap) or back (an engine restart) clears the rank's
//!   index entries ([`Converter::cleared`]); what it caches after that rebuilds them. The
//!   first event seen may start anywhere (a router joining a running engine) without a clear.
//! * **Blocks**: the engine's `block_hash` is opaque; each block's tokens are re-hashed at the
//!   router's block size. TensorRT-LLM's default block is 32 tokens: an engine block of
//!   `k × block_size` tokens becomes `k` router blocks, the last keeping the engine hash (so
//!   the next block's `parent_hash` names it) and the others a hash derived from it and their
//!   position. A block whose token count is not a multiple of the router's block size (a
//!   partial last block, or an engine block size the router's does not divide) ends its chain:
//!   it and the rest of the event are skipped and counted, as Dynamo skips partial blocks. A
//!   block with a non-zero `token_extra_id` (multimodal or prompt-tuning tokens, which the
//!   router cannot hash as the engine does) ends its chain the same way.
//! * **Tiers**: `cache_level` 0 is device memory, 1 host memory ([`StorageTier`]); other levels
//!   are skipped and counted. An `updated` event whose `cache_level` changed moves the block:
//!   a removal from the old tier, and a store in the new one when its parent is indexed there
//!   (each tier's index is prefix-chained; the router remembers every held block's hashes and
//!   level, at most [`MAX_HELD_BLOCKS`] per rank). `removed` carries no level: the remembered
//!   one decides the tier. Stores whose parent the rank does not hold (stored before the router
//!   joined, or before a clear) are skipped and counted: the index would reject them.
//! * **Windows**: with variable sliding-window attention each window size has its own pool and
//!   events; only the full-attention window (the largest `window_size` seen) describes the
//!   reusable prefix. Events of smaller windows are ignored and counted; a larger window
//!   appearing after events of a smaller one were used clears the rank first.
//! * `created` gives the capacity per level ([`TrtRankStats::capacity`]); priority updates are
//!   counted and otherwise ignored.
//!
//! Bounds: the caller limits the body size; [`decode_events`] keeps at most `max_events`
//! elements (the rest are counted, and show as a gap on the next poll); JSON nesting is
//! bounded by `serde_json`'s recursion limit. Nothing here panics on any input.

use std::collections::HashMap;

use kvrouter_core::event::{
    KvCacheEventData, RouterEvent, StorageTier, StoredBlock, StoredData, WorkerWithDpRank,
};
use kvrouter_core::hash::{ExternalHash, LocalBlockHash};
use serde::de::{DeserializeSeed, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::convert::{ConvertStats, Converter};
use crate::engine::{BlockRemoved, BlockStored, EngineEvent};

/// Default most events kept from one poll's answer.
pub const DEFAULT_MAX_EVENTS: usize = 65_536;
/// Most blocks remembered per rank (hashes and level, ~64 bytes each); beyond it the rank is
/// cleared and starts over.
pub const MAX_HELD_BLOCKS: usize = 1 << 20;

/// One TensorRT-LLM KV cache event.
#[derive(Debug, Clone, PartialEq)]
pub struct TrtEvent {
    /// Per rank, increasing by one per event.
    pub event_id: u64,
    /// Attention window of the block pool the event is about (tokens).
    pub window_size: Option<u64>,
    /// Attention data-parallel rank (absent without attention DP: rank 0).
    pub attention_dp_rank: Option<u32>,
    /// What happened.
    pub data: TrtData,
}

/// The `data` of a [`TrtEvent`].
#[derive(Debug, Clone, PartialEq)]
pub enum TrtData {
    /// The cache was built: blocks per cache level (0 = device, 1 = host).
    Created {
        num_blocks_per_cache_level: Vec<u64>,
    },
    /// A chain of newly stored blocks hanging from `parent_hash` (`None`: sequence start).
    Stored {
        parent_hash: Option<u64>,
        blocks: Vec<TrtBlock>,
    },
    /// Evicted blocks.
    Removed { block_hashes: Vec<u64> },
    /// A block moved between levels and/or changed priority.
    Updated {
        block_hash: u64,
        /// `(old, new)` cache level.
        cache_level: Option<(i64, i64)>,
        /// `(old, new)` retention priority.
        priority: Option<(i64, i64)>,
    },
    /// A `type` this decoder does not know (skipped, its `event_id` still counts).
    Unknown,
    /// A known `type` whose fields do not parse (treated as a gap: what it said is lost).
    Malformed,
}

/// One block of a `stored` event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrtBlock {
    /// The engine's hash of the block (opaque; signed values bit-cast).
    pub block_hash: u64,
    /// `(token_id, token_extra_id)` per token.
    pub tokens: Vec<(u32, u64)>,
    /// 0 = device, 1 = host.
    pub cache_level: i64,
    /// Retention priority (default 35 in TensorRT-LLM).
    pub priority: i64,
}

/// What [`decode_events`] counted besides the events it returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrtDecodeStats {
    /// Elements without a usable `event_id` (skipped; the next id shows the gap).
    pub malformed: u64,
    /// Elements past `max_events` (skipped; the next poll shows the gap).
    pub over_limit: u64,
}

/// A 64-bit engine hash: unsigned, or signed and bit-cast.
fn hash<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct H;
    impl Visitor<'_> for H {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a 64-bit integer hash")
        }
        fn visit_u64<E>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E>(self, v: i64) -> Result<u64, E> {
            Ok(v as u64)
        }
    }
    d.deserialize_any(H)
}

fn opt_hash<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct W(#[serde(deserialize_with = "hash")] u64);
    Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
}

fn hashes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    struct W(#[serde(deserialize_with = "hash")] u64);
    Ok(Vec::<W>::deserialize(d)?.into_iter().map(|w| w.0).collect())
}

#[derive(Deserialize)]
struct RawEvent {
    event_id: u64,
    #[serde(default)]
    window_size: Option<u64>,
    #[serde(default)]
    attention_dp_rank: Option<u32>,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct RawCreated {
    num_blocks_per_cache_level: Vec<u64>,
}

#[derive(Deserialize)]
struct RawStored {
    #[serde(default, deserialize_with = "opt_hash")]
    parent_hash: Option<u64>,
    blocks: Vec<RawBlock>,
}

#[derive(Deserialize)]
struct RawBlock {
    #[serde(deserialize_with = "hash")]
    block_hash: u64,
    tokens: Vec<RawToken>,
    #[serde(default)]
    cache_level: i64,
    #[serde(default)]
    priority: i64,
}

#[derive(Deserialize)]
struct RawToken {
    token_id: u32,
    #[serde(default)]
    token_extra_id: u64,
}

#[derive(Deserialize)]
struct RawRemoved {
    #[serde(deserialize_with = "hashes")]
    block_hashes: Vec<u64>,
}

#[derive(Deserialize)]
struct RawUpdated {
    #[serde(deserialize_with = "hash")]
    block_hash: u64,
    #[serde(default)]
    cache_level: Option<RawDiff>,
    #[serde(default)]
    priority: Option<RawDiff>,
}

#[derive(Deserialize)]
struct RawDiff {
    new_value: i64,
    old_value: i64,
}

fn data(v: Value) -> TrtData {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
    let parsed = match kind {
        "created" => serde_json::from_value::<RawCreated>(v).map(|c| TrtData::Created {
            num_blocks_per_cache_level: c.num_blocks_per_cache_level,
        }),
        "stored" => serde_json::from_value::<RawStored>(v).map(|s| TrtData::Stored {
            parent_hash: s.parent_hash,
            blocks: s
                .blocks
                .into_iter()
                .map(|b| TrtBlock {
                    block_hash: b.block_hash,
                    tokens: b
                        .tokens
                        .into_iter()
                        .map(|t| (t.token_id, t.token_extra_id))
                        .collect(),
                    cache_level: b.cache_level,
                    priority: b.priority,
                })
                .collect(),
        }),
        "removed" => serde_json::from_value::<RawRemoved>(v).map(|r| TrtData::Removed {
            block_hashes: r.block_hashes,
        }),
        "updated" => serde_json::from_value::<RawUpdated>(v).map(|u| TrtData::Updated {
            block_hash: u.block_hash,
            cache_level: u.cache_level.map(|d| (d.old_value, d.new_value)),
            priority: u.priority.map(|d| (d.old_value, d.new_value)),
        }),
        _ => return TrtData::Unknown,
    };
    parsed.unwrap_or(TrtData::Malformed)
}

/// Collects at most `max` elements of the top-level array as JSON values.
struct Elements<'a> {
    max: usize,
    out: &'a mut Vec<Value>,
    over: &'a mut u64,
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of KV cache events")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while self.out.len() < self.max {
            match seq.next_element::<Value>()? {
                Some(v) => self.out.push(v),
                None => return Ok(()),
            }
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {
            *self.over += 1;
        }
        Ok(())
    }
}

/// Decodes one `POST /kv_cache_events` answer: a JSON array of events, at most `max_events`
/// of them kept. An element without a usable `event_id` is skipped and counted; one whose
/// `data` has an unknown `type` or bad fields is kept as [`TrtData::Unknown`] or
/// [`TrtData::Malformed`]. Errors: the body is not a JSON array.
pub fn decode_events(
    body: &[u8],
    max_events: usize,
    stats: &mut TrtDecodeStats,
) -> Result<Vec<TrtEvent>, serde_json::Error> {
    let mut values = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    Elements {
        max: max_events,
        out: &mut values,
        over: &mut stats.over_limit,
    }
    .deserialize(&mut de)?;
    de.end()?;
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        match serde_json::from_value::<RawEvent>(v) {
            Ok(r) => out.push(TrtEvent {
                event_id: r.event_id,
                window_size: r.window_size,
                attention_dp_rank: r.attention_dp_rank,
                data: data(r.data),
            }),
            Err(_) => stats.malformed += 1,
        }
    }
    Ok(out)
}

/// Encodes events as `trtllm-serve` answers them (`KVCacheEventSerializer`'s shapes;
/// `attention_dp_rank` only when set). [`TrtData::Unknown`] and [`TrtData::Malformed`] are
/// written as `{"type": "unknown"}`.
pub fn encode_events(events: &[TrtEvent]) -> Vec<u8> {
    let diff = |d: Option<(i64, i64)>| {
        d.map(|(old, new)| json!({"type": "event_diff", "new_value": new, "old_value": old}))
    };
    let arr: Vec<Value> = events
        .iter()
        .map(|e| {
            let data = match &e.data {
                TrtData::Created {
                    num_blocks_per_cache_level,
                } => json!({"type": "created", "num_blocks_per_cache_level": num_blocks_per_cache_level}),
                TrtData::Stored {
                    parent_hash,
                    blocks,
                } => json!({
                    "type": "stored",
                    "parent_hash": parent_hash,
                    "blocks": blocks.iter().map(|b| json!({
                        "type": "stored_block",
                        "block_hash": b.block_hash,
                        "tokens": b.tokens.iter().map(|&(id, extra)| json!({
                            "type": "unique_token", "token_id": id, "token_extra_id": extra,
                        })).collect::<Vec<_>>(),
                        "cache_level": b.cache_level,
                        "priority": b.priority,
                    })).collect::<Vec<_>>(),
                }),
                TrtData::Removed { block_hashes } => {
                    json!({"type": "removed", "block_hashes": block_hashes})
                }
                TrtData::Updated {
                    block_hash,
                    cache_level,
                    priority,
                } => json!({
                    "type": "updated",
                    "block_hash": block_hash,
                    "cache_level": diff(*cache_level),
                    "priority": diff(*priority),
                }),
                TrtData::Unknown | TrtData::Malformed => json!({"type": "unknown"}),
            };
            let mut o = json!({"event_id": e.event_id, "data": data});
            if let Some(w) = e.window_size {
                o["window_size"] = json!(w);
            }
            if let Some(r) = e.attention_dp_rank {
                o["attention_dp_rank"] = json!(r);
            }
            o
        })
        .collect();
    serde_json::to_vec(&arr).unwrap_or_else(|_| b"[]".to_vec())
}

/// Counters of one rank's conversion, totals since creation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrtRankStats {
    /// Events of this rank seen (every type).
    pub events_in: u64,
    /// `event_id` jumps forward (events lost): the rank was cleared.
    pub gaps: u64,
    /// `event_id` went back (the engine restarted): the rank was cleared.
    pub restarts: u64,
    /// Events of a sliding-window pool (a `window_size` below the full-attention one).
    pub window_ignored: u64,
    /// Events with an unknown `type` (skipped).
    pub unknown_events: u64,
    /// Events of a known type with unparsable fields (handled as a gap).
    pub malformed: u64,
    /// Blocks skipped because their token count is not a multiple of the router's block size
    /// (partial blocks, or an engine block smaller than the router's), with the rest of their
    /// event.
    pub partial_blocks: u64,
    /// Blocks skipped because a token has a `token_extra_id` (multimodal, prompt tuning).
    pub extra_id_blocks: u64,
    /// Blocks of a `cache_level` other than 0 and 1 (skipped).
    pub unknown_level: u64,
    /// Stores skipped because their parent is not held by the rank.
    pub orphans: u64,
    /// Removals and updates of blocks the rank does not hold (ignored).
    pub unknown_blocks: u64,
    /// Blocks moved between tiers (`updated` with a `cache_level` change).
    pub moves: u64,
    /// Priority-only updates (ignored).
    pub priority_updates: u64,
    /// Times more than [`MAX_HELD_BLOCKS`] were held (the rank was cleared).
    pub overflows: u64,
    /// Capacity per cache level from the last `created` event (blocks).
    pub capacity: Vec<u64>,
    /// The `event_id` expected next.
    pub next_event_id: Option<u64>,
    /// The converter's counters (stores, removals, clears emitted; its filters).
    pub convert: ConvertStats,
}

/// A block the rank holds: where and under which hashes it is indexed.
struct Held {
    level: u8,
    /// Whether it is in its level's index (a moved block whose parent is not there is not).
    indexed: bool,
    parent: Option<u64>,
    /// Router hashes of its sub-blocks, in order.
    local: Box<[LocalBlockHash]>,
}

/// The engine hash of sub-block `i` of `n` of engine block `h`: the last keeps `h`, the others
/// a mix of `h` and `i` (SplitMix64's finaliser).
pub fn sub_block_hash(h: u64, i: usize, n: usize) -> u64 {
    if i + 1 == n {
        return h;
    }
    let mut z = h ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn tier(level: u8) -> StorageTier {
    if level == 0 {
        StorageTier::Device
    } else {
        StorageTier::HostPinned
    }
}

fn medium(level: u8) -> &'static str {
    if level == 0 {
        "GPU"
    } else {
        "CPU"
    }
}

/// One rank's TensorRT-LLM events → [`RouterEvent`]s (see the module doc).
pub struct TrtRank {
    conv: Converter,
    block_size: usize,
    held: HashMap<u64, Held>,
    /// Largest `window_size` seen: the full-attention window.
    window: Option<u64>,
    /// Whether an event of `window` was used (a larger window then clears).
    used: bool,
    stats: TrtRankStats,
}

impl TrtRank {
    /// A converter for `worker`, hashing at the router's `block_size` tokens (≥ 1).
    pub fn new(worker: WorkerWithDpRank, block_size: u32) -> Self {
        Self {
            conv: Converter::new(worker, block_size),
            block_size: block_size.max(1) as usize,
            held: HashMap::new(),
            window: None,
            used: false,
            stats: TrtRankStats::default(),
        }
    }

    /// Counters since creation.
    pub fn stats(&self) -> TrtRankStats {
        let mut s = self.stats.clone();
        s.convert = self.conv.stats();
        s
    }

    /// Blocks held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn clear(&mut self, out: &mut Vec<RouterEvent>) {
        self.held.clear();
        self.used = false;
        self.conv.cleared(out);
    }

    /// Applies one event of this rank, appending router events to `out`.
    pub fn apply(&mut self, ev: &TrtEvent, out: &mut Vec<RouterEvent>) {
        self.stats.events_in += 1;
        match self.stats.next_event_id {
            Some(next) if ev.event_id > next => {
                self.stats.gaps += 1;
                tracing::warn!(worker = %self.conv.worker(), expected = next, got = ev.event_id,
                    "TensorRT-LLM KV events lost (event_id gap; no replay exists): rank cleared");
                self.clear(out);
            }
            Some(next) if ev.event_id < next => {
                self.stats.restarts += 1;
                tracing::warn!(worker = %self.conv.worker(), expected = next, got = ev.event_id,
                    "TensorRT-LLM event_id went back (engine restart?): rank cleared");
                self.clear(out);
            }
            _ => {}
        }
        self.stats.next_event_id = Some(ev.event_id.saturating_add(1));
        if let Some(w) = ev.window_size {
            match self.window {
                Some(full) if w < full => {
                    self.stats.window_ignored += 1;
                    return;
                }
                Some(full) if w > full && self.used => self.clear(out),
                _ => {}
            }
            self.window = Some(self.window.map_or(w, |f| f.max(w)));
        }
        self.used = true;
        match &ev.data {
            TrtData::Created {
                num_blocks_per_cache_level,
            } => self.stats.capacity = num_blocks_per_cache_level.iter().take(8).copied().collect(),
            TrtData::Stored {
                parent_hash,
                blocks,
            } => self.stored(*parent_hash, blocks, out),
            TrtData::Removed { block_hashes } => self.removed(block_hashes, out),
            TrtData::Updated {
                block_hash,
                cache_level,
                priority,
            } => match cache_level {
                Some((_, new)) => self.moved(*block_hash, *new, out),
                None if priority.is_some() => self.stats.priority_updates += 1,
                None => {}
            },
            TrtData::Unknown => self.stats.unknown_events += 1,
            TrtData::Malformed => {
                self.stats.malformed += 1;
                self.stats.gaps += 1;
                self.clear(out);
            }
        }
        if self.held.len() > MAX_HELD_BLOCKS {
            self.stats.overflows += 1;
            self.clear(out);
        }
    }

    fn level(&mut self, l: i64) -> Option<u8> {
        match l {
            0 | 1 => Some(l as u8),
            _ => {
                self.stats.unknown_level += 1;
                None
            }
        }
    }

    fn stored(&mut self, parent: Option<u64>, blocks: &[TrtBlock], out: &mut Vec<RouterEvent>) {
        let bs = self.block_size;
        let mut parent = parent;
        let mut i = 0;
        while i < blocks.len() {
            let Some(level) = self.level(blocks[i].cache_level) else {
                return;
            };
            if let Some(p) = parent {
                match self.held.get(&p) {
                    Some(h) if h.indexed && h.level == level => {}
                    _ => {
                        self.stats.orphans += 1;
                        return;
                    }
                }
            }
            // One run of blocks of the same level, cut where a chain must end.
            let mut s = BlockStored {
                parent_block_hash: parent,
                block_size: bs as u32,
                medium: Some(medium(level).into()),
                ..Default::default()
            };
            let mut spans = Vec::new();
            let mut end = false;
            while i < blocks.len() && blocks[i].cache_level == level as i64 {
                let b = &blocks[i];
                let n = b.tokens.len() / bs;
                if n == 0 || !b.tokens.len().is_multiple_of(bs) {
                    self.stats.partial_blocks += 1;
                    end = true;
                    break;
                }
                if b.tokens.iter().any(|&(_, x)| x != 0) {
                    self.stats.extra_id_blocks += 1;
                    end = true;
                    break;
                }
                for k in 0..n {
                    s.block_hashes.push(sub_block_hash(b.block_hash, k, n));
                }
                s.token_ids.extend(b.tokens.iter().map(|&(t, _)| t));
                spans.push((b.block_hash, n));
                i += 1;
            }
            if !spans.is_empty() {
                let start = out.len();
                self.conv
                    .convert_event(&EngineEvent::BlockStored(s), &mut *out);
                let locals: Vec<LocalBlockHash> = match out.get(start).map(|e| &e.event.data) {
                    Some(KvCacheEventData::Stored(d)) => {
                        d.blocks.iter().map(|b| b.tokens_hash).collect()
                    }
                    _ => return, // rejected by the converter's filters (counted there)
                };
                let mut at = 0;
                for &(h, n) in &spans {
                    let Some(local) = locals.get(at..at + n) else {
                        break;
                    };
                    self.held.insert(
                        h,
                        Held {
                            level,
                            indexed: true,
                            parent,
                            local: local.into(),
                        },
                    );
                    parent = Some(h);
                    at += n;
                }
            }
            if end {
                return;
            }
        }
    }

    fn removed(&mut self, hashes: &[u64], out: &mut Vec<RouterEvent>) {
        for level in [0u8, 1] {
            let mut rm = BlockRemoved {
                medium: Some(medium(level).into()),
                ..Default::default()
            };
            for h in hashes {
                if let Some(b) = self.held.get(h) {
                    if b.level == level && b.indexed {
                        let n = b.local.len();
                        rm.block_hashes
                            .extend((0..n).map(|k| sub_block_hash(*h, k, n)));
                    }
                }
            }
            if !rm.block_hashes.is_empty() {
                self.conv
                    .convert_event(&EngineEvent::BlockRemoved(rm), &mut *out);
            }
        }
        for h in hashes {
            if self.held.remove(h).is_none() {
                self.stats.unknown_blocks += 1;
            }
        }
    }

    fn moved(&mut self, h: u64, new: i64, out: &mut Vec<RouterEvent>) {
        let Some(new) = self.level(new) else {
            self.removed(&[h], out);
            return;
        };
        let Some(b) = self.held.get(&h) else {
            self.stats.unknown_blocks += 1;
            return;
        };
        if b.level == new {
            return;
        }
        self.stats.moves += 1;
        let n = b.local.len();
        let ext: Vec<ExternalHash> = (0..n)
            .map(|k| ExternalHash(sub_block_hash(h, k, n)))
            .collect();
        if b.indexed {
            let rm = BlockRemoved {
                block_hashes: ext.iter().map(|e| e.0).collect(),
                medium: Some(medium(b.level).into()),
                ..Default::default()
            };
            self.conv
                .convert_event(&EngineEvent::BlockRemoved(rm), &mut *out);
        }
        let parent = b.parent;
        let chained = match parent {
            None => true,
            Some(p) => self
                .held
                .get(&p)
                .is_some_and(|pb| pb.level == new && pb.indexed),
        };
        if chained {
            let data = StoredData {
                parent_hash: parent.map(ExternalHash),
                start_position: None,
                blocks: ext
                    .iter()
                    .zip(b.local.iter())
                    .map(|(&block_hash, &tokens_hash)| StoredBlock {
                        block_hash,
                        tokens_hash,
                        mm_extra_info: None,
                    })
                    .collect(),
            };
            self.conv.emit_stored(tier(new), data, out);
        }
        if let Some(b) = self.held.get_mut(&h) {
            b.level = new;
            b.indexed = chained;
        }
    }
}

/// Poll-level counters of a [`TrtWorker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrtWorkerStats {
    /// Answers decoded (every poll whose body was a JSON array).
    pub bodies: u64,
    /// Answers that were not a JSON array.
    pub decode_errors: u64,
    /// Events skipped by the decoder (no `event_id`, or past the per-poll limit).
    pub skipped: u64,
    /// Events for a rank the worker does not have.
    pub wrong_rank: u64,
}

/// Every rank of one TensorRT-LLM worker: routes each event of a poll's answer to its rank's
/// [`TrtRank`] by `attention_dp_rank` (absent = 0).
pub struct TrtWorker {
    ranks: Vec<TrtRank>,
    max_events: usize,
    stats: TrtWorkerStats,
}

impl TrtWorker {
    /// Ranks `0..dp_size` of worker `worker_id`, at the router's `block_size`, keeping at most
    /// `max_events` events of one answer.
    pub fn new(worker_id: u64, dp_size: u32, block_size: u32, max_events: usize) -> Self {
        Self {
            ranks: (0..dp_size.max(1))
                .map(|r| TrtRank::new(WorkerWithDpRank::new(worker_id, r), block_size))
                .collect(),
            max_events,
            stats: TrtWorkerStats::default(),
        }
    }

    /// Its ranks, by rank.
    pub fn ranks(&self) -> &[TrtRank] {
        &self.ranks
    }

    /// Poll-level counters.
    pub fn stats(&self) -> TrtWorkerStats {
        self.stats
    }

    /// Decodes one answer and converts its events in order into `out`; returns per rank
    /// whether the answer had events for it. Errors: the body is not a JSON array (nothing
    /// applied).
    pub fn apply_body(
        &mut self,
        body: &[u8],
        out: &mut Vec<RouterEvent>,
    ) -> Result<Vec<bool>, serde_json::Error> {
        let mut ds = TrtDecodeStats::default();
        let events = match decode_events(body, self.max_events, &mut ds) {
            Ok(e) => e,
            Err(e) => {
                self.stats.decode_errors += 1;
                return Err(e);
            }
        };
        self.stats.bodies += 1;
        self.stats.skipped += ds.malformed + ds.over_limit;
        let mut seen = vec![false; self.ranks.len()];
        for ev in &events {
            let r = ev.attention_dp_rank.unwrap_or(0) as usize;
            match self.ranks.get_mut(r) {
                Some(rank) => {
                    rank.apply(ev, out);
                    seen[r] = true;
                }
                None => self.stats.wrong_rank += 1,
            }
        }
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::hash::{compute_block_hashes, HashOptions};

    fn stored(id: u64, parent: Option<u64>, blocks: &[(u64, std::ops::Range<u32>)]) -> TrtEvent {
        TrtEvent {
            event_id: id,
            window_size: Some(4096),
            attention_dp_rank: None,
            data: TrtData::Stored {
                parent_hash: parent,
                blocks: blocks
                    .iter()
                    .map(|(h, t)| TrtBlock {
                        block_hash: *h,
                        tokens: t.clone().map(|t| (t, 0)).collect(),
                        cache_level: 0,
                        priority: 35,
                    })
                    .collect(),
            },
        }
    }

    fn locals(e: &RouterEvent) -> Vec<u64> {
        match &e.event.data {
            KvCacheEventData::Stored(s) => s.blocks.iter().map(|b| b.tokens_hash.0).collect(),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn the_serialisers_shapes_decode_and_round_trip() {
        let body = br#"[
          {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [100, 50]}, "window_size": 4096},
          {"event_id": 1, "data": {"type": "stored", "parent_hash": null, "blocks": [
            {"type": "stored_block", "block_hash": 18446744073709551615,
             "tokens": [{"type": "unique_token", "token_id": 5, "token_extra_id": 0}],
             "lora_id": null, "cache_level": 0, "priority": 35}]}, "window_size": 4096, "attention_dp_rank": 1},
          {"event_id": 2, "data": {"type": "removed", "block_hashes": [-1, 7]}, "window_size": 4096},
          {"event_id": 3, "data": {"type": "updated", "block_hash": 7,
            "cache_level": {"type": "event_diff", "new_value": 1, "old_value": 0}, "priority": null}, "window_size": 4096},
          {"event_id": 4, "data": {"type": "future_kind"}},
          {"event_id": 5, "data": {"type": "stored", "blocks": 3}},
          {"data": {"type": "removed", "block_hashes": []}}
        ]"#;
        let mut st = TrtDecodeStats::default();
        let ev = decode_events(body, 100, &mut st).unwrap();
        assert_eq!(st.malformed, 1);
        assert_eq!(ev.len(), 6);
        assert!(
            matches!(&ev[1].data, TrtData::Stored { blocks, .. } if blocks[0].block_hash == u64::MAX && blocks[0].tokens == [(5, 0)])
        );
        assert_eq!(ev[1].attention_dp_rank, Some(1));
        assert_eq!(
            ev[2].data,
            TrtData::Removed {
                block_hashes: vec![u64::MAX, 7]
            }
        );
        assert!(matches!(
            ev[3].data,
            TrtData::Updated {
                cache_level: Some((0, 1)),
                priority: None,
                ..
            }
        ));
        assert_eq!(
            (&ev[4].data, &ev[5].data),
            (&TrtData::Unknown, &TrtData::Malformed)
        );
        let again = decode_events(&encode_events(&ev[..4]), 100, &mut st).unwrap();
        assert_eq!(again, ev[..4]);
        // Limits and non-arrays.
        let mut st = TrtDecodeStats::default();
        assert_eq!(decode_events(body, 2, &mut st).unwrap().len(), 2);
        assert_eq!(st.over_limit, 5);
        for bad in [&b"{}"[..], b"[", b"", b"[1] x", b"null"] {
            assert!(decode_events(bad, 10, &mut st).is_err());
        }
    }

    #[test]
    fn engine_blocks_are_rehashed_at_the_router_block_size() {
        let tokens: Vec<u32> = (0..96).collect();
        let want: Vec<u64> = compute_block_hashes(&tokens, 16, &HashOptions::default(), None)
            .iter()
            .map(|h| h.0)
            .collect();
        let mut r = TrtRank::new(WorkerWithDpRank::new(3, 0), 16);
        let mut out = Vec::new();
        // Two 32-token engine blocks, then a third continuing the chain, then a partial one.
        r.apply(&stored(0, None, &[(100, 0..32), (101, 32..64)]), &mut out);
        r.apply(
            &stored(1, Some(101), &[(102, 64..96), (103, 96..100)]),
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(locals(&out[0]), want[..4]);
        assert_eq!(locals(&out[1]), want[4..]);
        let KvCacheEventData::Stored(s) = &out[1].event.data else {
            unreachable!()
        };
        assert_eq!(s.parent_hash, Some(ExternalHash(101)));
        assert_eq!(s.blocks[1].block_hash, ExternalHash(102));
        let st = r.stats();
        assert_eq!((st.partial_blocks, r.held()), (1, 3));
        // Removing an engine block removes its two router blocks.
        out.clear();
        r.apply(
            &TrtEvent {
                event_id: 2,
                window_size: None,
                attention_dp_rank: None,
                data: TrtData::Removed {
                    block_hashes: vec![102, 999],
                },
            },
            &mut out,
        );
        let KvCacheEventData::Removed(rm) = &out[0].event.data else {
            unreachable!()
        };
        assert_eq!(
            rm.block_hashes,
            [ExternalHash(sub_block_hash(102, 0, 2)), ExternalHash(102)]
        );
        assert_eq!(r.stats().unknown_blocks, 1);
        // An orphan (parent not held) is skipped.
        out.clear();
        r.apply(&stored(3, Some(555), &[(104, 0..32)]), &mut out);
        assert!(out.is_empty());
        assert_eq!(r.stats().orphans, 1);
    }

    #[test]
    fn gaps_restarts_windows_and_moves() {
        let mut r = TrtRank::new(WorkerWithDpRank::new(1, 0), 32);
        let mut out = Vec::new();
        // A late join starting at 10 clears nothing; 12 after 10 is a gap.
        r.apply(&stored(10, None, &[(1, 0..32)]), &mut out);
        r.apply(&stored(12, None, &[(2, 0..32)]), &mut out);
        assert_eq!(r.stats().gaps, 1);
        assert!(matches!(out[1].event.data, KvCacheEventData::Cleared));
        assert_eq!(r.held(), 1);
        // Back to 0: a restart.
        r.apply(&stored(0, None, &[(3, 0..32)]), &mut out);
        assert_eq!(r.stats().restarts, 1);
        // A smaller window is ignored.
        let mut sw = stored(1, None, &[(4, 0..32)]);
        sw.window_size = Some(128);
        out.clear();
        r.apply(&sw, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.stats().window_ignored, 1);
        // Moving block 3 to host: removed from the device tier, stored in the host tier.
        r.apply(
            &TrtEvent {
                event_id: 2,
                window_size: Some(4096),
                attention_dp_rank: None,
                data: TrtData::Updated {
                    block_hash: 3,
                    cache_level: Some((0, 1)),
                    priority: None,
                },
            },
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].storage_tier, StorageTier::Device);
        assert!(matches!(out[0].event.data, KvCacheEventData::Removed(_)));
        assert_eq!(out[1].storage_tier, StorageTier::HostPinned);
        assert!(matches!(out[1].event.data, KvCacheEventData::Stored(_)));
        // Its removal now goes to the host tier.
        out.clear();
        r.apply(
            &TrtEvent {
                event_id: 3,
                window_size: Some(4096),
                attention_dp_rank: None,
                data: TrtData::Removed {
                    block_hashes: vec![3],
                },
            },
            &mut out,
        );
        assert_eq!(out[0].storage_tier, StorageTier::HostPinned);
        assert_eq!(r.stats().moves, 1);
    }

    #[test]
    fn a_worker_routes_events_by_attention_dp_rank() {
        let mut w = TrtWorker::new(9, 2, 32, 100);
        let mut a = stored(0, None, &[(1, 0..32)]);
        a.attention_dp_rank = Some(1);
        let mut b = stored(0, None, &[(2, 0..32)]);
        b.attention_dp_rank = Some(5);
        let body = encode_events(&[a, b, stored(0, None, &[(3, 0..32)])]);
        let mut out = Vec::new();
        assert_eq!(w.apply_body(&body, &mut out).unwrap(), [true, true]);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].event.dp_rank, out[1].event.dp_rank), (1, 0));
        assert_eq!(w.stats().wrong_rank, 1);
        assert!(w.apply_body(b"<html>", &mut out).is_err());
        assert_eq!(w.stats().decode_errors, 1);
    }
}
