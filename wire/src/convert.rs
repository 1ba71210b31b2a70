//! Engine events → core [`RouterEvent`]s for one `(worker, dp_rank)` publisher.
//!
//! Rules (`dynamo-router-spec.md` §3.2 "Conversion rules", §2.4; issue 3 item 2):
//!
//! * every block's local hash is recomputed from its `token_ids` slice with the core hashing
//!   ([`kvrouter_core::hash::block_hash`]): seed from `lora_name` and `cache_salt`, multimodal
//!   objects from `block_mm_infos` or vLLM's `(identifier, offset)` extra keys; the engine hash
//!   is kept as the opaque [`ExternalHash`];
//! * `medium` → [`StorageTier`] (unknown media count and map to `device`);
//! * dropped, counted, warned once per reason: events of non-full-attention KV groups,
//!   `locality` other than `LOCAL`, stores whose `block_size` differs from the worker's, batches
//!   for another dp_rank;
//! * self-referencing stores (parent among the block hashes, or a hash twice) become no-ops;
//! * `token_ids` shorter than `blocks × block_size`: the full blocks are kept, the rest dropped;
//! * event ids come from a per-converter counter (Dynamo assigns its own; engine `seq` is not
//!   an event id).
//!
//! vLLM puts a request's `cache_salt` only into the extra keys of its first block. To hash
//! later stores of the same chain with the same salt, the converter remembers which engine
//! hashes belong to salted chains (only those; the map is empty without salts).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kvrouter_core::event::{
    BlockMmInfo, KvCacheEvent, KvCacheEventData, MmObject, RemovedData, RouterEvent, StorageTier,
    StoredBlock, StoredData, WorkerWithDpRank,
};
use kvrouter_core::hash::{
    block_hash, hash_mm_identifier, num_full_blocks, salt_seed, ExternalHash,
};

use crate::engine::{BlockRemoved, BlockStored, EngineBatch, EngineEvent, ExtraKey};

/// Counters of one converter. All are totals since creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Engine events seen.
    pub events_in: u64,
    /// Router events emitted (stored + removed + cleared).
    pub events_out: u64,
    /// Stored events emitted.
    pub stored: u64,
    /// Removed events emitted.
    pub removed: u64,
    /// Cleared events emitted (engine `AllBlocksCleared` and [`Converter::cleared`]).
    pub cleared: u64,
    /// Blocks in emitted stored events.
    pub blocks_stored: u64,
    /// Events of a KV-cache group that is not full attention (hybrid / sliding-window models).
    pub dropped_non_full_attention: u64,
    /// Events with `locality` other than `LOCAL`.
    pub dropped_remote: u64,
    /// Stores whose `block_size` differs from the worker's configured one.
    pub dropped_block_size: u64,
    /// Whole batches published for another dp_rank.
    pub dropped_wrong_rank: u64,
    /// Stores whose parent or a block hash repeats inside the event (no-ops).
    pub self_referencing: u64,
    /// Stores whose `token_ids` cover fewer blocks than `block_hashes` lists.
    pub short_tokens: u64,
    /// Stores or removals that carried no blocks.
    pub empty: u64,
    /// `medium` strings not in the spec's table (mapped to `device`).
    pub unknown_medium: u64,
    /// Extra keys that are neither a LoRA name, a cache salt nor a multimodal object (e.g.
    /// prompt-embedding digests): the router cannot reproduce them, the block is hashed without.
    pub unsupported_extra_keys: u64,
    /// Stores with a `lora_id` but no `lora_name` (vLLM ≤ 0.19) that the worker's adapter
    /// list could not name: hashed without the LoRA (their blocks never match a request
    /// for the adapter).
    pub lora_without_name: u64,
    /// Stores with a `lora_id` but no `lora_name` named from the worker's adapter list.
    pub lora_named_by_id: u64,
}

#[derive(Clone, Copy)]
#[repr(u32)]
enum Warn {
    Group = 1,
    Remote = 2,
    BlockSize = 4,
    Rank = 8,
    SelfRef = 16,
    Short = 32,
    Medium = 64,
    ExtraKey = 128,
    LoraName = 256,
}

/// Upper bound on remembered salted engine hashes (cleared when exceeded; worst case later
/// stores of a salted chain get hashed without their salt).
const MAX_SALTED: usize = 1 << 20;

/// Converts one publisher's engine events. Not thread-safe by design: one per subscriber.
#[derive(Debug)]
pub struct Converter {
    worker: WorkerWithDpRank,
    block_size: u32,
    next_event_id: u64,
    stats: ConvertStats,
    warned: u32,
    salted: HashMap<u64, Box<str>>,
    lora_adapters: Arc<[String]>,
}

impl Converter {
    /// A converter for `worker` whose engine runs with `block_size` tokens per block.
    pub fn new(worker: WorkerWithDpRank, block_size: u32) -> Self {
        Self {
            worker,
            block_size,
            next_event_id: 0,
            stats: ConvertStats::default(),
            warned: 0,
            salted: HashMap::new(),
            lora_adapters: Arc::from([]),
        }
    }

    /// Names a store's `lora_id` when it carries no `lora_name` (vLLM before `lora_name` was
    /// published): `adapters[id - 1]`, as vLLM's API server numbers the adapters of
    /// `--lora-modules` from 1 in the order given (`OpenAIServingModels.lora_id_counter`).
    pub fn with_lora_adapters(mut self, adapters: Arc<[String]>) -> Self {
        self.lora_adapters = adapters;
        self
    }

    /// The worker rank events are addressed to.
    pub fn worker(&self) -> WorkerWithDpRank {
        self.worker
    }

    /// Counters since creation.
    pub fn stats(&self) -> ConvertStats {
        self.stats
    }

    /// The id the next emitted event will get.
    pub fn next_event_id(&self) -> u64 {
        self.next_event_id
    }

    fn warn_once(&mut self, w: Warn, msg: std::fmt::Arguments<'_>) {
        if self.warned & w as u32 == 0 {
            self.warned |= w as u32;
            tracing::warn!(worker = %self.worker, "{msg} (counted; warned once)");
        }
    }

    fn emit(&mut self, tier: StorageTier, data: KvCacheEventData, out: &mut Vec<RouterEvent>) {
        match &data {
            KvCacheEventData::Stored(s) => {
                self.stats.stored += 1;
                self.stats.blocks_stored += s.blocks.len() as u64;
            }
            KvCacheEventData::Removed(_) => self.stats.removed += 1,
            KvCacheEventData::Cleared => self.stats.cleared += 1,
        }
        self.stats.events_out += 1;
        let event_id = self.next_event_id;
        self.next_event_id += 1;
        out.push(RouterEvent {
            worker_id: self.worker.worker_id,
            storage_tier: tier,
            event: KvCacheEvent {
                event_id,
                data,
                dp_rank: self.worker.dp_rank,
            },
        });
    }

    /// A store whose blocks are already hashed (a block TensorRT-LLM moved between tiers,
    /// whose tokens the move does not repeat), appended to `out` with the next event id.
    pub fn emit_stored(&mut self, tier: StorageTier, data: StoredData, out: &mut Vec<RouterEvent>) {
        self.emit(tier, KvCacheEventData::Stored(data), out);
    }

    /// A `Cleared` event for this worker (used when its stream cannot be recovered).
    pub fn cleared(&mut self, out: &mut Vec<RouterEvent>) {
        self.salted.clear();
        self.emit(StorageTier::Device, KvCacheEventData::Cleared, out);
    }

    /// Converts a whole batch, appending to `out`. A batch for another dp_rank is dropped.
    pub fn convert_batch(&mut self, batch: &EngineBatch, out: &mut Vec<RouterEvent>) {
        if let Some(rank) = batch.dp_rank {
            if rank != self.worker.dp_rank {
                self.stats.dropped_wrong_rank += 1;
                let mine = self.worker.dp_rank;
                self.warn_once(
                    Warn::Rank,
                    format_args!("batch for dp_rank {rank} on the subscriber of rank {mine}"),
                );
                return;
            }
        }
        for ev in &batch.events {
            self.convert_event(ev, out);
        }
    }

    /// Converts one event, appending 0 or 1 router events to `out`.
    pub fn convert_event(&mut self, ev: &EngineEvent, out: &mut Vec<RouterEvent>) {
        self.stats.events_in += 1;
        match ev {
            EngineEvent::BlockStored(s) => self.stored(s, out),
            EngineEvent::BlockRemoved(r) => self.removed(r, out),
            EngineEvent::AllBlocksCleared => self.cleared(out),
        }
    }

    /// Common filters of both event kinds; true = keep.
    fn keep(
        &mut self,
        locality: &Option<String>,
        kind: &Option<String>,
        window: Option<u32>,
        group: Option<u32>,
    ) -> bool {
        if let Some(l) = locality {
            if !l.eq_ignore_ascii_case("LOCAL") {
                self.stats.dropped_remote += 1;
                self.warn_once(
                    Warn::Remote,
                    format_args!("event with locality {l:?} dropped"),
                );
                return false;
            }
        }
        if !is_full_attention(kind.as_deref(), window, group) {
            self.stats.dropped_non_full_attention += 1;
            self.warn_once(
                Warn::Group,
                format_args!("event of KV group {group:?} ({kind:?}, window {window:?}) dropped: only full attention is routed on"),
            );
            return false;
        }
        true
    }

    fn tier(&mut self, medium: &Option<String>) -> StorageTier {
        match medium.as_deref() {
            None => StorageTier::Device,
            Some(m) => StorageTier::from_medium(m).unwrap_or_else(|| {
                self.stats.unknown_medium += 1;
                self.warn_once(
                    Warn::Medium,
                    format_args!("unknown medium {m:?} mapped to device"),
                );
                StorageTier::Device
            }),
        }
    }

    fn stored(&mut self, s: &BlockStored, out: &mut Vec<RouterEvent>) {
        if !self.keep(
            &s.locality,
            &s.kv_cache_spec_kind,
            s.kv_cache_spec_sliding_window,
            s.group_idx,
        ) {
            return;
        }
        if s.block_size != self.block_size {
            self.stats.dropped_block_size += 1;
            let (got, want) = (s.block_size, self.block_size);
            self.warn_once(
                Warn::BlockSize,
                format_args!("store with block_size {got} dropped, worker configured with {want}"),
            );
            return;
        }
        if is_self_referencing(s) {
            self.stats.self_referencing += 1;
            self.warn_once(
                Warn::SelfRef,
                format_args!("self-referencing store ignored"),
            );
            return;
        }
        let bs = self.block_size as usize;
        let eagle = s.is_eagle.unwrap_or(false);
        let full = num_full_blocks(s.token_ids.len(), bs, eagle);
        let n = s.block_hashes.len().min(full);
        if n < s.block_hashes.len() {
            self.stats.short_tokens += 1;
            let (have, need) = (s.token_ids.len(), s.block_hashes.len() * bs);
            self.warn_once(
                Warn::Short,
                format_args!("store with {have} tokens for {need}: tail blocks dropped"),
            );
        }
        if n == 0 {
            self.stats.empty += 1;
            return;
        }
        let adapters;
        let mut lora_name = s.lora_name.as_deref().filter(|n| !n.is_empty());
        if let (Some(id), None) = (s.lora_id, lora_name) {
            adapters = self.lora_adapters.clone();
            let named = usize::try_from(id)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| adapters.get(i));
            match named {
                Some(name) => {
                    self.stats.lora_named_by_id += 1;
                    lora_name = Some(name.as_str());
                }
                None => {
                    self.stats.lora_without_name += 1;
                    self.warn_once(
                        Warn::LoraName,
                        format_args!("store with lora_id {id} but no lora_name, and no adapter of the worker's lora_adapters by that id: hashed without the LoRA"),
                    );
                }
            }
        }

        // Salt: explicit field, else a non-LoRA string among the extra keys, else inherited.
        let mut salt: Option<&str> = s.cache_salt.as_deref().filter(|x| !x.is_empty());
        let mut unsupported = 0u64;
        if let Some(ek) = &s.extra_keys {
            for key in ek.iter().take(n).flatten().flatten() {
                match key {
                    ExtraKey::Str(v) if Some(v.as_str()) == lora_name => {}
                    ExtraKey::Str(v) if salt.is_none() && !v.is_empty() => salt = Some(v.as_str()),
                    ExtraKey::Str(_) | ExtraKey::Mm { .. } => {}
                    _ => unsupported += 1,
                }
            }
        }
        if unsupported > 0 {
            self.stats.unsupported_extra_keys += unsupported;
            self.warn_once(
                Warn::ExtraKey,
                format_args!("extra keys the router cannot hash (e.g. prompt embeddings) ignored"),
            );
        }
        let inherited;
        if salt.is_none() && !self.salted.is_empty() {
            inherited = s
                .parent_block_hash
                .and_then(|p| self.salted.get(&p).cloned());
            salt = inherited.as_deref();
        }
        let seed = salt_seed(lora_name, salt);
        let window = if eagle { bs + 1 } else { bs };

        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let tokens = &s.token_ids[i * bs..i * bs + window];
            let mm = block_mm(s, i);
            let tokens_hash = block_hash(tokens, seed, mm.as_ref());
            blocks.push(StoredBlock {
                block_hash: ExternalHash(s.block_hashes[i]),
                tokens_hash,
                mm_extra_info: mm,
            });
        }
        if let Some(salt) = salt {
            if self.salted.len() + n > MAX_SALTED {
                self.salted.clear();
            }
            let salt: Box<str> = salt.into();
            for &h in &s.block_hashes[..n] {
                self.salted.insert(h, salt.clone());
            }
        }
        let tier = self.tier(&s.medium);
        let data = StoredData {
            parent_hash: s.parent_block_hash.map(ExternalHash),
            start_position: None,
            blocks,
        };
        self.emit(tier, KvCacheEventData::Stored(data), out);
    }

    fn removed(&mut self, r: &BlockRemoved, out: &mut Vec<RouterEvent>) {
        if !self.keep(
            &r.locality,
            &r.kv_cache_spec_kind,
            r.kv_cache_spec_sliding_window,
            r.group_idx,
        ) {
            return;
        }
        if r.block_hashes.is_empty() {
            self.stats.empty += 1;
            return;
        }
        if !self.salted.is_empty() {
            for h in &r.block_hashes {
                self.salted.remove(h);
            }
        }
        let tier = self.tier(&r.medium);
        let data = RemovedData {
            block_hashes: r.block_hashes.iter().copied().map(ExternalHash).collect(),
        };
        self.emit(tier, KvCacheEventData::Removed(data), out);
    }
}

/// Whether an event's KV group is one the router indexes. With `kv_cache_spec_kind` (vLLM
/// ≥ 0.33) the kind decides (full and MLA attention are kept); without it a sliding window
/// marks a non-full group, and a `group_idx` other than 0 is dropped because only the first
/// group's blocks cover the whole prompt in the layouts vLLM uses.
pub fn is_full_attention(kind: Option<&str>, window: Option<u32>, group: Option<u32>) -> bool {
    match kind {
        Some(k) => {
            let k = k.as_bytes();
            let full = k.len() >= 4 && k[..4].eq_ignore_ascii_case(b"full");
            let mla = k.windows(3).any(|w| w.eq_ignore_ascii_case(b"mla"));
            (full || mla) && window.is_none()
        }
        None => window.is_none() && group.unwrap_or(0) == 0,
    }
}

fn is_self_referencing(s: &BlockStored) -> bool {
    let h = &s.block_hashes;
    if let Some(p) = s.parent_block_hash {
        if h.contains(&p) {
            return true;
        }
    }
    if h.len() <= 32 {
        (1..h.len()).any(|i| h[..i].contains(&h[i]))
    } else {
        let mut seen = HashSet::with_capacity(h.len());
        !h.iter().all(|x| seen.insert(*x))
    }
}

/// Multimodal objects of block `i`: `block_mm_infos[i]`, else vLLM `(identifier, offset)` keys.
fn block_mm(s: &BlockStored, i: usize) -> Option<BlockMmInfo> {
    if let Some(info) = s
        .block_mm_infos
        .as_ref()
        .and_then(|m| m.get(i))
        .and_then(Option::as_ref)
    {
        return (!info.mm_objects.is_empty()).then(|| info.clone());
    }
    let keys = s.extra_keys.as_ref()?.get(i)?.as_ref()?;
    let objs: Vec<MmObject> = keys
        .iter()
        .filter_map(|k| match k {
            ExtraKey::Mm { identifier, .. } => {
                hash_mm_identifier(identifier).map(|mm_hash| MmObject {
                    mm_hash,
                    offsets: Vec::new(),
                })
            }
            _ => None,
        })
        .collect();
    (!objs.is_empty()).then_some(BlockMmInfo { mm_objects: objs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::hash::{compute_block_hashes, HashOptions};

    fn w() -> WorkerWithDpRank {
        WorkerWithDpRank::new(7, 0)
    }

    fn store(hashes: &[u64], parent: Option<u64>, first_token: u32) -> BlockStored {
        BlockStored {
            block_hashes: hashes.to_vec(),
            parent_block_hash: parent,
            token_ids: (first_token..first_token + 16 * hashes.len() as u32).collect(),
            block_size: 16,
            medium: Some("GPU".into()),
            ..Default::default()
        }
    }

    fn locals(ev: &RouterEvent) -> Vec<u64> {
        match &ev.event.data {
            KvCacheEventData::Stored(s) => s.blocks.iter().map(|b| b.tokens_hash.0).collect(),
            _ => panic!("not a store: {ev:?}"),
        }
    }

    #[test]
    fn stored_blocks_get_core_hashes_and_sequential_ids() {
        let mut c = Converter::new(w(), 16);
        let mut out = Vec::new();
        c.convert_event(
            &EngineEvent::BlockStored(store(&[10, 11], None, 1)),
            &mut out,
        );
        c.convert_event(
            &EngineEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![11],
                ..Default::default()
            }),
            &mut out,
        );
        c.convert_event(&EngineEvent::AllBlocksCleared, &mut out);
        assert_eq!(locals(&out[0]), [16863443419780771464, 2287610619914608821]);
        assert_eq!(
            out.iter().map(|e| e.event.event_id).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(out[2].event.data, KvCacheEventData::Cleared);
        assert_eq!(c.stats().blocks_stored, 2);
    }

    #[test]
    fn filters_are_counted() {
        let mut c = Converter::new(w(), 16);
        let mut out = Vec::new();
        let mut sw = store(&[1], None, 1);
        sw.kv_cache_spec_kind = Some("sliding_window".into());
        let mut g1 = store(&[2], None, 1);
        g1.group_idx = Some(1);
        let mut remote = store(&[3], None, 1);
        remote.locality = Some("REMOTE".into());
        let mut bs = store(&[4], None, 1);
        bs.block_size = 32;
        let selfref = store(&[5, 6], Some(6), 1);
        let dup = store(&[5, 5], None, 1);
        let mut short = store(&[7, 8], None, 1);
        short.token_ids.truncate(20);
        let mut local = store(&[9], None, 1);
        local.locality = Some("LOCAL".into());
        local.kv_cache_spec_kind = Some("full_attention".into());
        local.medium = Some("CPU_TIER2".into());
        for s in [sw, g1, remote, bs, selfref, dup, short, local] {
            c.convert_event(&EngineEvent::BlockStored(s), &mut out);
        }
        let st = c.stats();
        assert_eq!(st.dropped_non_full_attention, 2);
        assert_eq!(st.dropped_remote, 1);
        assert_eq!(st.dropped_block_size, 1);
        assert_eq!(st.self_referencing, 2);
        assert_eq!(st.short_tokens, 1);
        assert_eq!(out.len(), 2);
        assert_eq!(locals(&out[0]).len(), 1);
        assert_eq!(out[1].storage_tier, StorageTier::Disk);
        assert_eq!(out[1].event.event_id, 1);
    }

    #[test]
    fn wrong_rank_batches_are_dropped() {
        let mut c = Converter::new(WorkerWithDpRank::new(1, 1), 16);
        let mut out = Vec::new();
        let b = EngineBatch {
            ts: 0.0,
            events: vec![EngineEvent::AllBlocksCleared],
            dp_rank: Some(0),
        };
        c.convert_batch(&b, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.stats().dropped_wrong_rank, 1);
        c.convert_batch(
            &EngineBatch {
                dp_rank: None,
                ..b.clone()
            },
            &mut out,
        );
        c.convert_batch(
            &EngineBatch {
                dp_rank: Some(1),
                ..b
            },
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].event.dp_rank, 1);
    }

    #[test]
    fn lora_salt_and_multimodal_change_the_hash_like_core() {
        let tokens: Vec<u32> = (1..=32).collect();
        let mut c = Converter::new(w(), 16);
        let mut out = Vec::new();
        let mut s = store(&[1, 2], None, 1);
        s.lora_name = Some("my-lora".into());
        s.extra_keys = Some(vec![
            Some(vec![
                ExtraKey::Str("my-lora".into()),
                ExtraKey::Str("ns1".into()),
            ]),
            None,
        ]);
        c.convert_event(&EngineEvent::BlockStored(s), &mut out);
        let opts = HashOptions {
            lora_name: Some("my-lora"),
            cache_salt: Some("ns1"),
            is_eagle: false,
        };
        let want: Vec<u64> = compute_block_hashes(&tokens, 16, &opts, None)
            .iter()
            .map(|h| h.0)
            .collect();
        assert_eq!(locals(&out[0]), want);

        // The continuation carries no salt key: inherited from its salted parent.
        let mut next = store(&[3], Some(2), 33);
        next.lora_name = Some("my-lora".into());
        c.convert_event(&EngineEvent::BlockStored(next), &mut out);
        let all: Vec<u32> = (1..=48).collect();
        let want: Vec<u64> = compute_block_hashes(&all, 16, &opts, None)
            .iter()
            .map(|h| h.0)
            .collect();
        assert_eq!(locals(&out[1]), want[2..]);

        // vLLM multimodal extra key (64-hex identifier, offset) → core mm hash.
        let id = format!("{:016x}{}", 0xDEADBEEFu64, "0".repeat(48));
        let mut mm = store(&[20, 21], None, 1);
        mm.extra_keys = Some(vec![
            Some(vec![ExtraKey::Mm {
                identifier: id,
                offset: 0,
            }]),
            None,
        ]);
        c.convert_event(&EngineEvent::BlockStored(mm), &mut out);
        assert_eq!(locals(&out[2]), [14529151895984176542, 2287610619914608821]);
    }

    /// vLLM ≤ 0.19 publishes a LoRA store's `lora_id` only: with the worker's adapters known
    /// (in `--lora-modules` order, ids from 1) it is hashed as the named adapter; an id
    /// beyond the list, or any id without a list, is counted and hashed without the LoRA.
    #[test]
    fn a_lora_id_without_a_name_is_named_from_the_workers_adapters() {
        let tokens: Vec<u32> = (1..=32).collect();
        let hashes = |lora: Option<&str>| -> Vec<u64> {
            let opts = HashOptions {
                lora_name: lora,
                ..Default::default()
            };
            compute_block_hashes(&tokens, 16, &opts, None)
                .iter()
                .map(|h| h.0)
                .collect()
        };
        let adapters: Arc<[String]> = vec!["sql".to_string(), "chat".to_string()].into();
        let mut c = Converter::new(w(), 16).with_lora_adapters(adapters);
        let mut out = Vec::new();
        for (id, want) in [
            (Some(2), Some("chat")),
            (Some(1), Some("sql")),
            (None, None),
        ] {
            let mut s = store(&[1, 2], None, 1);
            s.lora_id = id;
            c.convert_event(&EngineEvent::BlockStored(s), &mut out);
            assert_eq!(locals(out.last().unwrap()), hashes(want), "lora_id {id:?}");
        }
        assert_eq!(
            (c.stats().lora_named_by_id, c.stats().lora_without_name),
            (2, 0)
        );
        // A name on the event wins over the id.
        let mut s = store(&[1, 2], None, 1);
        s.lora_id = Some(1);
        s.lora_name = Some("chat".into());
        c.convert_event(&EngineEvent::BlockStored(s), &mut out);
        assert_eq!(locals(out.last().unwrap()), hashes(Some("chat")));

        for (conv, id) in [(&mut c, 3), (&mut Converter::new(w(), 16), 1)] {
            let mut s = store(&[1, 2], None, 1);
            s.lora_id = Some(id);
            conv.convert_event(&EngineEvent::BlockStored(s), &mut out);
            assert_eq!(locals(out.last().unwrap()), hashes(None), "lora_id {id}");
            assert_eq!(conv.stats().lora_without_name, 1);
        }
        for bad in [0, -1, i64::MAX] {
            let mut s = store(&[1, 2], None, 1);
            s.lora_id = Some(bad);
            c.convert_event(&EngineEvent::BlockStored(s), &mut out);
            assert_eq!(locals(out.last().unwrap()), hashes(None), "lora_id {bad}");
        }
        assert_eq!(c.stats().lora_without_name, 4);
    }
}
