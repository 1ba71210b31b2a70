//! vLLM v1-style continuous batching over the [`KvPool`].
//!
//! Per step ([`Scheduler::schedule`]), one token budget (`max_num_batched_tokens`) is spent:
//!
//! 1. on the **running** queue first, oldest first: a decoding sequence needs 1 token, a sequence
//!    still in (chunked) prefill the rest of its prompt up to the budget. When its blocks
//!    cannot be allocated, the newest running sequence is **preempted** (blocks released,
//!    progress reset, put back at the head of the waiting queue: recompute, vLLM's LIFO
//!    policy) until it fits or it is itself the one preempted;
//! 2. then, if nothing was preempted this step, on admitting **waiting** sequences in order
//!    while fewer than `max_num_seqs` run: the prefix already cached is reused (at least one
//!    token is always computed), and the rest of the prompt is scheduled, chunked to the
//!    remaining budget when chunked prefill is on, or only if it fits whole when it is off.
//!    A sequence whose prompt KV was pulled from a prefill worker (`kv_received`) is
//!    admitted with every prompt token but the last already computed: its transferred full
//!    blocks are cached at once (one `Stored` event), and its one token is a decode, not a
//!    prefill, in the step's timing.
//!
//! After the step ran, [`Scheduler::commit`] advances each scheduled sequence and caches the
//! blocks it filled, emitting one `Stored` event per sequence (a contiguous chain).
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::events::KvEvent;
use crate::kv_pool::{BlockId, KvPool, Registered};
use crate::lora::CacheKeys;

/// Identifier of a request inside one engine.
pub type SeqId = u64;

/// Batching limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// At most this many sequences run at once (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Tokens computed per step (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Split long prefills across steps (`--enable-chunked-prefill`).
    pub chunked_prefill: bool,
}

/// One request's scheduling state.
#[derive(Debug)]
pub struct Sequence {
    /// Engine-local id.
    pub id: SeqId,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    /// Prompt length.
    pub prompt_len: usize,
    /// Tokens whose KV is computed (in `blocks`).
    pub num_computed: usize,
    /// Block table: block i holds tokens `i*block_size ..`.
    pub blocks: Vec<BlockId>,
    /// Engine hashes of the full blocks of `tokens` computed so far (a prefix of them).
    pub hashes: Vec<u64>,
    /// Leading blocks of `blocks` that are cached in the pool.
    pub num_registered: usize,
    /// Prefix-cache hit (tokens) at first admission; None until admitted.
    pub cached_tokens: Option<usize>,
    /// Times this sequence was preempted.
    pub num_preemptions: u32,
    /// Output tokens wanted.
    pub max_tokens: usize,
    /// Arrival time (engine clock, seconds).
    pub arrival: f64,
    /// Emission time of the last output token (engine clock, seconds).
    pub last_token_at: f64,
    /// Seed of the deterministic output tokens.
    pub output_seed: u64,
    /// Where the output tokens come from instead, when set.
    pub output: Option<Box<dyn crate::engine::OutputSource>>,
    /// Prefill worker: keep the blocks referenced when the sequence finishes, for a decode
    /// worker to pull (see [`crate::engine::Engine::release_held`]).
    pub hold_on_finish: bool,
    /// Decode worker: the prompt's KV arrived from a prefill worker, so admission computes only
    /// the last prompt token. Cleared by preemption (the KV is gone; it is recomputed).
    pub kv_received: bool,
    /// Its adapter and cache salt: its blocks are cached apart from other keys' (see
    /// [`crate::lora`]). None: neither.
    pub keys: Option<Arc<CacheKeys>>,
}

impl Sequence {
    /// A new waiting sequence.
    pub fn new(
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        arrival: f64,
        output_seed: u64,
    ) -> Self {
        let prompt_len = prompt.len();
        Self {
            id,
            tokens: prompt,
            prompt_len,
            num_computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            num_registered: 0,
            cached_tokens: None,
            num_preemptions: 0,
            max_tokens,
            arrival,
            last_token_at: arrival,
            output_seed,
            output: None,
            hold_on_finish: false,
            kv_received: false,
            keys: None,
        }
    }

    /// Output tokens generated so far.
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// The sequence.
    pub id: SeqId,
    /// Tokens computed for it in this step.
    pub num_new: usize,
    /// Whether these are prefill (prompt or recompute) tokens rather than one decode token.
    pub is_prefill: bool,
}

/// What [`Scheduler::schedule`] decided.
#[derive(Debug, Default)]
pub struct SchedulerOutput {
    /// Scheduled sequences, running ones first.
    pub scheduled: Vec<Scheduled>,
    /// Sequences preempted in this step.
    pub preempted: Vec<SeqId>,
    /// Prompt tokens looked up in the prefix cache at admission (vLLM `prefix_cache_queries`).
    pub prefix_queries: usize,
    /// Of those, tokens found cached (vLLM `prefix_cache_hits`).
    pub prefix_hits: usize,
}

impl SchedulerOutput {
    fn clear(&mut self) {
        self.scheduled.clear();
        self.preempted.clear();
        self.prefix_queries = 0;
        self.prefix_hits = 0;
    }
}

/// Waiting and running queues plus every live sequence.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Running sequences.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Waiting sequences (new and preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// A live sequence.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// A live sequence, mutably.
    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.seqs.get_mut(&id)
    }

    /// Queues a new sequence at the back of the waiting queue. Replaces a live one with the
    /// same id (callers use unique ids).
    pub fn add(&mut self, seq: Sequence, pool: &mut KvPool) {
        let id = seq.id;
        if self.seqs.contains_key(&id) {
            self.remove(id, pool);
        }
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
    }

    /// Removes a sequence wherever it is and releases its blocks (tail first, so a request's
    /// own tail is evicted before its prefix). Returns it, if it was live.
    pub fn remove(&mut self, id: SeqId, pool: &mut KvPool) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        } else if let Some(i) = self.waiting.iter().position(|&r| r == id) {
            self.waiting.remove(i);
        }
        free_blocks(&mut seq, pool);
        Some(seq)
    }

    /// Removes every id in `ids` from the running queue (one pass) and releases their blocks.
    pub fn finish_running(&mut self, ids: &[SeqId], pool: &mut KvPool, out: &mut Vec<Sequence>) {
        if ids.is_empty() {
            return;
        }
        self.running.retain(|r| !ids.contains(r));
        for id in ids {
            if let Some(mut seq) = self.seqs.remove(id) {
                free_blocks(&mut seq, pool);
                out.push(seq);
            }
        }
    }

    /// Decides one step; see the module docs.
    pub fn schedule(&mut self, pool: &mut KvPool, out: &mut SchedulerOutput) {
        out.clear();
        let bs = pool.block_size();
        let mut budget = self.cfg.max_num_batched_tokens;

        // 1. Running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let remaining = seq.tokens.len() - seq.num_computed;
            let num_new = remaining.min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            let is_prefill =
                seq.num_computed < seq.tokens.len().saturating_sub(1) || seq.num_generated() == 0;
            let mut scheduled = false;
            loop {
                let seq = self.seqs.get_mut(&id).expect("running sequence is live");
                if grow(seq, pool, bs, num_new) {
                    scheduled = true;
                    break;
                }
                // Preempt the newest running sequence (maybe this one).
                let Some(victim) = self.running.pop() else {
                    break;
                };
                let v = self
                    .seqs
                    .get_mut(&victim)
                    .expect("running sequence is live");
                free_blocks(v, pool);
                v.num_computed = 0;
                v.num_registered = 0;
                v.num_preemptions += 1;
                v.kv_received = false;
                self.waiting.push_front(victim);
                out.preempted.push(victim);
                if victim == id {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            out.scheduled.push(Scheduled {
                id,
                num_new,
                is_prefill,
            });
            budget -= num_new;
            i += 1;
        }

        // 2. Admissions, unless this step had to preempt.
        if !out.preempted.is_empty() {
            return;
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let n = seq.tokens.len();
            // Hit at most (n - 1) tokens: the last one must be computed to produce logits.
            let max_hit_blocks = (n - 1) / bs;
            ensure_hashes(seq, pool, max_hit_blocks);
            let hit = pool.match_prefix(&seq.hashes[..max_hit_blocks]);
            // KV pulled from a prefill worker covers the prompt; like vLLM, the last prompt
            // token is recomputed for its logits, in a decode-sized step.
            let received = seq.kv_received && seq.num_generated() == 0;
            let computed = if received { n - 1 } else { hit * bs };
            let want = n - computed;
            if !self.cfg.chunked_prefill && want > budget {
                break;
            }
            let num_new = want.min(budget);
            let need_new = (computed + num_new).div_ceil(bs) - hit;
            let hit_evictable = seq.hashes[..hit]
                .iter()
                .filter(|h| pool.lookup(**h).is_some_and(|b| pool.is_evictable(b)))
                .count();
            if pool.num_available() < need_new + hit_evictable {
                break;
            }
            for h in &seq.hashes[..hit] {
                let b = pool.lookup(*h).expect("matched block is cached");
                pool.touch(b);
                seq.blocks.push(b);
            }
            for _ in 0..need_new {
                let b = pool.allocate().expect("availability checked");
                seq.blocks.push(b);
            }
            seq.num_computed = computed;
            seq.num_registered = hit;
            if received {
                // The transferred blocks join this worker's prefix cache (Stored events).
                register_full_blocks(pool, seq);
            }
            if seq.cached_tokens.is_none() {
                seq.cached_tokens = Some(computed);
                out.prefix_queries += n;
                out.prefix_hits += hit * bs;
            }
            self.waiting.pop_front();
            self.running.push(id);
            out.scheduled.push(Scheduled {
                id,
                num_new,
                is_prefill: !received,
            });
            budget -= num_new;
        }
    }

    /// Records that `s.num_new` tokens of `s.id` were computed: caches the blocks they filled
    /// and emits one `Stored` event for the newly cached chain.
    pub fn commit(&mut self, pool: &mut KvPool, s: &Scheduled) {
        let Some(seq) = self.seqs.get_mut(&s.id) else {
            return;
        };
        seq.num_computed = (seq.num_computed + s.num_new).min(seq.tokens.len());
        register_full_blocks(pool, seq);
    }
}

/// Caches the full blocks of `seq.num_computed` tokens not cached yet, emitting one `Stored`
/// event per new contiguous chain.
fn register_full_blocks(pool: &mut KvPool, seq: &mut Sequence) {
    let bs = pool.block_size();
    let full = seq.num_computed / bs;
    if !pool.prefix_caching() {
        seq.num_registered = full;
        return;
    }
    ensure_hashes(seq, pool, full);
    let mut first_new: Option<usize> = None;
    for k in seq.num_registered..full {
        let parent = k.checked_sub(1).map(|p| seq.blocks[p]);
        match pool.register(seq.blocks[k], seq.hashes[k], parent) {
            Registered::New => {
                first_new.get_or_insert(k);
            }
            Registered::Existing(other) => {
                seq.blocks[k] = other;
                // Cannot follow a new block (the cache is prefix-closed); flush if it did.
                if let Some(f) = first_new.take() {
                    emit_stored(pool, seq, f, k);
                }
            }
            Registered::Disabled => {}
        }
    }
    if let Some(f) = first_new {
        emit_stored(pool, seq, f, full);
    }
    seq.num_registered = full;
}

fn emit_stored(pool: &mut KvPool, seq: &Sequence, from: usize, to: usize) {
    let bs = pool.block_size();
    pool.push_event(KvEvent::Stored {
        block_hashes: seq.hashes[from..to].to_vec(),
        parent_block_hash: from.checked_sub(1).map(|p| seq.hashes[p]),
        token_ids: seq.tokens[from * bs..to * bs].to_vec(),
        block_size: bs as u32,
        keys: seq.keys.clone(),
    });
}

/// Extends `seq.hashes` to cover its first `n` full blocks.
fn ensure_hashes(seq: &mut Sequence, pool: &mut KvPool, n: usize) {
    let bs = pool.block_size();
    // A keyed sequence's chain starts from its keys' seed: its blocks never match another
    // key's, nor unkeyed ones.
    let start = seq
        .keys
        .as_ref()
        .map(|k| k.chain_seed())
        .filter(|s| *s != 0);
    while seq.hashes.len() < n {
        let k = seq.hashes.len();
        let parent = seq.hashes.last().copied().or(start);
        let h = pool.hash_block(parent, &seq.tokens[k * bs..(k + 1) * bs]);
        seq.hashes.push(h);
    }
}

/// Allocates the blocks `seq` needs to compute `num_new` more tokens. All or nothing.
fn grow(seq: &mut Sequence, pool: &mut KvPool, bs: usize, num_new: usize) -> bool {
    let need = (seq.num_computed + num_new)
        .div_ceil(bs)
        .saturating_sub(seq.blocks.len());
    if pool.num_available() < need {
        return false;
    }
    for _ in 0..need {
        let b = pool.allocate().expect("availability checked");
        seq.blocks.push(b);
    }
    true
}

fn free_blocks(seq: &mut Sequence, pool: &mut KvPool) {
    for b in seq.blocks.drain(..).rev() {
        pool.release(b);
    }
}
