//! The engine core: a pure state machine stepped with a clock the caller drives.
//!
//! [`Engine::step`] takes `now` (seconds, any epoch) and returns what the step did: its
//! duration from the [`TimingModel`], the output tokens it produced (stamped `now + duration`),
//! the KV events it caused, and latency observations. No I/O, no clocks, no tasks: the live
//! driver ([`crate::worker`]) sleeps for the duration, tests just advance `now`.
//!
//! By default output tokens are deterministic pseudo-random ids in `0..output_vocab`, seeded by
//! the prompt, never an EOS id, so the request ends by length. A request added with an
//! [`OutputSource`] (see [`crate::sampling::OutputPlan`]) gets its tokens from it instead and
//! ends early when the source says so ([`StopReason`]).
//!
//! In disaggregated serving ([`KvTransfer`]), a prefill worker's engine holds a finished
//! request's blocks until [`Engine::release_held`], and a decode worker's engine admits a
//! request whose prompt KV it received without computing the prompt.
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::events::KvEvent;
use crate::kv_pool::{BlockId, KvPool};
use crate::lora::CacheKeys;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput, SeqId, Sequence};
use crate::timing::TimingModel;

/// Engine parameters (a subset of [`crate::MockerConfig`]).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Blocks in the KV pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Batching limits.
    pub scheduler: SchedulerConfig,
    /// Cache and reuse full blocks.
    pub prefix_caching: bool,
    /// Step durations.
    pub timing: TimingModel,
    /// Seed of the engine block hash (normally [`crate::kv_pool::process_hash_seed`]).
    pub hash_seed: u64,
    /// Prompt token ids must be below this.
    pub vocab_size: u32,
    /// Output token ids are drawn from `0..output_vocab` (≤ `vocab_size`).
    pub output_vocab: u32,
    /// Ids never generated.
    pub eos_token_ids: Vec<u32>,
}

/// Why a request is refused. Messages follow vLLM's wording where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No prompt tokens.
    #[error("The prompt cannot be empty.")]
    EmptyPrompt,
    /// `max_tokens` of 0.
    #[error("max_tokens must be at least 1, got 0.")]
    ZeroMaxTokens,
    /// Prompt plus output can never fit in the KV pool.
    #[error(
        "This model's maximum context length is {capacity} tokens. However, you requested \
         {total} tokens ({prompt} in the prompt, {max_tokens} in the completion). Please reduce \
         the length of the prompt or completion."
    )]
    TooLong {
        /// Tokens the pool can hold.
        capacity: usize,
        /// prompt + max_tokens.
        total: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Requested output tokens.
        max_tokens: usize,
    },
    /// With chunked prefill off, the sequence must fit in one step's token budget.
    #[error(
        "With chunked prefill disabled, prompt plus completion ({total} tokens) must not exceed \
         max_num_batched_tokens ({budget})."
    )]
    ExceedsBatch {
        /// prompt + max_tokens.
        total: usize,
        /// The step budget.
        budget: usize,
    },
    /// A prompt token id outside the vocabulary.
    #[error("Token id {id} is out of vocabulary (vocabulary size {vocab_size}).")]
    TokenOutOfRange {
        /// The offending id.
        id: u64,
        /// Valid ids are below this.
        vocab_size: u32,
    },
}

impl EngineConfig {
    /// Tokens the pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Checks a request before it is queued. `max_token_id` is the largest prompt id.
    pub fn validate(
        &self,
        prompt_len: usize,
        max_token_id: Option<u32>,
        max_tokens: usize,
    ) -> Result<(), RequestError> {
        if prompt_len == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        if max_tokens == 0 {
            return Err(RequestError::ZeroMaxTokens);
        }
        if let Some(id) = max_token_id.filter(|&id| id >= self.vocab_size) {
            return Err(RequestError::TokenOutOfRange {
                id: id.into(),
                vocab_size: self.vocab_size,
            });
        }
        let total = prompt_len.saturating_add(max_tokens);
        if total > self.capacity_tokens() {
            return Err(RequestError::TooLong {
                capacity: self.capacity_tokens(),
                total,
                prompt: prompt_len,
                max_tokens,
            });
        }
        if !self.scheduler.chunked_prefill && total > self.scheduler.max_num_batched_tokens {
            return Err(RequestError::ExceedsBatch {
                total,
                budget: self.scheduler.max_num_batched_tokens,
            });
        }
        Ok(())
    }
}

/// Why a request ended before `max_tokens` (vLLM's `FINISHED_STOPPED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An EOS token (stop reason `null`).
    Eos,
    /// One of the request's `stop_token_ids`.
    TokenId(u32),
    /// The request's stop string with this index.
    Str(usize),
}

/// Chooses a request's output tokens, one index at a time (0, 1, 2, … each once), and says
/// when one ends the request.
pub trait OutputSource: Send + fmt::Debug {
    /// The `index`-th output token, and `Some` when it ends the request.
    fn next_token(&mut self, index: usize) -> (u32, Option<StopReason>);
}

/// A request's part in a KV transfer between a prefill and a decode worker (disaggregated
/// serving, see [`crate::disagg`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvTransfer {
    /// Aggregated: computed here, freed here when the request ends.
    #[default]
    None,
    /// Prefill worker: computed here, then held (referenced, never evicted) when the request
    /// ends, until [`Engine::release_held`].
    Send,
    /// Decode worker: the prompt's KV was pulled from a prefill worker. Admission allocates
    /// and caches the prompt's blocks without computing them; only the last prompt token is
    /// recomputed (for its logits, as vLLM does), in a decode-sized step.
    Receive,
}

/// One output token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenOutput {
    /// The request.
    pub id: SeqId,
    /// The token id.
    pub token: u32,
    /// 0 for the first output token.
    pub index: usize,
    /// Whether this was the last token (finish reason "stop" when `stop` is set, else
    /// "length").
    pub finished: bool,
    /// Why the request stopped at this token, when it did before `max_tokens`.
    pub stop: Option<StopReason>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prefix-cache hit at first admission, in tokens.
    pub cached_tokens: usize,
}

/// What one step did. Reused across steps (`step` clears it).
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Wall seconds the step takes (already scaled by the speedup ratios).
    pub duration: f64,
    /// Uncached prefill tokens computed.
    pub prefill_tokens: usize,
    /// Sequences that decoded one token.
    pub decode_seqs: usize,
    /// Tokens produced, at `now + duration`.
    pub tokens: Vec<TokenOutput>,
    /// KV events, in order (removals from scheduling, then stores).
    pub events: Vec<KvEvent>,
    /// Time to first token of requests that got their first token (seconds).
    pub ttft: Vec<f64>,
    /// Inter-token latencies of decode tokens (seconds).
    pub itl: Vec<f64>,
    /// Requests preempted in this step.
    pub num_preempted: usize,
    /// Prompt tokens looked up in the prefix cache at admission.
    pub prefix_queries: usize,
    /// Of those, tokens that hit.
    pub prefix_hits: usize,
    /// Requests finished in this step.
    pub finished: Vec<SeqId>,
}

impl StepOutput {
    fn clear(&mut self) {
        self.duration = 0.0;
        self.prefill_tokens = 0;
        self.decode_seqs = 0;
        self.tokens.clear();
        self.events.clear();
        self.ttft.clear();
        self.itl.clear();
        self.num_preempted = 0;
        self.prefix_queries = 0;
        self.prefix_hits = 0;
        self.finished.clear();
    }
}

/// The engine: KV pool + scheduler + timing + token generation.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    pool: KvPool,
    sched: Scheduler,
    sched_out: SchedulerOutput,
    done: Vec<Sequence>,
    /// Block tables of finished [`KvTransfer::Send`] requests, until released.
    held: HashMap<SeqId, Vec<BlockId>>,
}

impl Engine {
    /// An idle engine with an empty pool.
    pub fn new(cfg: EngineConfig) -> Self {
        let pool = KvPool::new(
            cfg.num_blocks,
            cfg.block_size,
            cfg.prefix_caching,
            cfg.hash_seed,
        );
        let sched = Scheduler::new(cfg.scheduler);
        Self {
            cfg,
            pool,
            sched,
            sched_out: SchedulerOutput::default(),
            done: Vec::new(),
            held: HashMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The KV pool (read-only).
    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    /// Running requests.
    pub fn num_running(&self) -> usize {
        self.sched.num_running()
    }

    /// Waiting requests.
    pub fn num_waiting(&self) -> usize {
        self.sched.num_waiting()
    }

    /// Whether a step would do anything.
    pub fn has_work(&self) -> bool {
        self.sched.num_running() + self.sched.num_waiting() > 0
    }

    /// A live request's state.
    pub fn sequence(&self, id: SeqId) -> Option<&Sequence> {
        self.sched.get(id)
    }

    /// Queues a request (validate it first with [`EngineConfig::validate`]; an invalid one is
    /// refused here too). `id` must be unique among live requests.
    pub fn add_request(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        now: f64,
    ) -> Result<(), RequestError> {
        self.add_request_with(id, prompt, max_tokens, now, None)
    }

    /// [`Engine::add_request`] with the request's tokens chosen by `output` (None: the
    /// default prompt-seeded tokens).
    pub fn add_request_with(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        now: f64,
        output: Option<Box<dyn OutputSource>>,
    ) -> Result<(), RequestError> {
        self.add_request_kv(id, prompt, max_tokens, now, output, KvTransfer::None)
    }

    /// [`Engine::add_request_with`] for a request that takes part in a KV transfer
    /// (see [`KvTransfer`]).
    pub fn add_request_kv(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        now: f64,
        output: Option<Box<dyn OutputSource>>,
        kv: KvTransfer,
    ) -> Result<(), RequestError> {
        self.add_request_keyed(id, prompt, max_tokens, now, output, kv, None)
    }

    /// [`Engine::add_request_kv`] for a request with a LoRA adapter or a cache salt: its blocks
    /// are cached under `keys` (see [`crate::lora`]).
    #[allow(clippy::too_many_arguments)]
    pub fn add_request_keyed(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        now: f64,
        output: Option<Box<dyn OutputSource>>,
        kv: KvTransfer,
        keys: Option<Arc<CacheKeys>>,
    ) -> Result<(), RequestError> {
        self.cfg
            .validate(prompt.len(), prompt.iter().copied().max(), max_tokens)?;
        let seed = output_seed(&prompt);
        let mut seq = Sequence::new(id, prompt, max_tokens, now, seed);
        seq.output = output;
        seq.keys = keys.filter(|k| !k.is_empty());
        seq.hold_on_finish = kv == KvTransfer::Send;
        seq.kv_received = kv == KvTransfer::Receive;
        self.sched.add(seq, &mut self.pool);
        Ok(())
    }

    /// The block table a finished [`KvTransfer::Send`] request still holds (its
    /// `remote_block_ids`), if it was not released yet.
    pub fn held_blocks(&self, id: SeqId) -> Option<&[BlockId]> {
        self.held.get(&id).map(Vec::as_slice)
    }

    /// Finished requests whose blocks are held.
    pub fn num_held(&self) -> usize {
        self.held.len()
    }

    /// Drops a held request's references (tail first, like a finished request): its cached
    /// blocks become evictable, the others free. False if `id` holds nothing.
    pub fn release_held(&mut self, id: SeqId) -> bool {
        let Some(blocks) = self.held.remove(&id) else {
            return false;
        };
        for b in blocks.into_iter().rev() {
            self.pool.release(b);
        }
        true
    }

    /// Leading full blocks of `prompt` this engine has cached, at most `(len - 1) / block_size`
    /// (what admission could reuse): a decode worker pulls only the blocks after them.
    pub fn prefix_hit_blocks(&mut self, prompt: &[u32]) -> usize {
        if prompt.is_empty() || !self.pool.prefix_caching() {
            return 0;
        }
        let bs = self.cfg.block_size.max(1);
        let n = (prompt.len() - 1) / bs;
        let hashes = crate::kv_pool::engine_block_hashes(self.pool.seed(), &prompt[..n * bs], bs);
        self.pool.match_prefix(&hashes)
    }

    /// Drops a request (client gone) and frees its blocks. False if it was not live.
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.sched.remove(id, &mut self.pool).is_some()
    }

    /// Clears the prefix cache if no request holds blocks (vLLM semantics); the
    /// `AllCleared` event comes out of the next [`Engine::take_events`] / step.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset()
    }

    /// Events not yet returned by a step (e.g. after a reset while idle).
    pub fn take_events(&mut self, out: &mut Vec<KvEvent>) {
        self.pool.drain_events(out);
    }

    /// Engine hashes of every cached block, sorted.
    pub fn cached_block_hashes(&self) -> Vec<u64> {
        self.pool.cached_hashes()
    }

    /// Runs one step at time `now` (seconds); see the module docs.
    pub fn step(&mut self, now: f64, out: &mut StepOutput) {
        out.clear();
        self.sched.schedule(&mut self.pool, &mut self.sched_out);
        let so = &self.sched_out;
        out.num_preempted = so.preempted.len();
        out.prefix_queries = so.prefix_queries;
        out.prefix_hits = so.prefix_hits;
        for s in &so.scheduled {
            if s.is_prefill {
                out.prefill_tokens += s.num_new;
            } else {
                out.decode_seqs += 1;
            }
        }
        out.duration = self.cfg.timing.step_seconds(
            out.prefill_tokens,
            out.decode_seqs > 0,
            self.pool.usage(),
        );
        let t = now + out.duration;

        for s in &self.sched_out.scheduled {
            self.sched.commit(&mut self.pool, s);
            let Some(seq) = self.sched.get_mut(s.id) else {
                continue;
            };
            if seq.num_computed < seq.tokens.len() {
                continue; // prefill chunk: no token yet
            }
            let index = seq.num_generated();
            let (token, stop) = match seq.output.as_mut() {
                Some(src) => src.next_token(index),
                None => (next_token(seq.output_seed, index, &self.cfg), None),
            };
            seq.tokens.push(token);
            let finished = stop.is_some() || index + 1 >= seq.max_tokens;
            if index == 0 {
                out.ttft.push(t - seq.arrival);
            } else {
                out.itl.push(t - seq.last_token_at);
            }
            seq.last_token_at = t;
            out.tokens.push(TokenOutput {
                id: s.id,
                token,
                index,
                finished,
                stop,
                prompt_tokens: seq.prompt_len,
                cached_tokens: seq.cached_tokens.unwrap_or(0),
            });
            if finished {
                out.finished.push(s.id);
            }
        }
        for id in &out.finished {
            // A prefill worker keeps a finished transfer's blocks referenced for the decode
            // worker: taking the table leaves nothing for `finish_running` to free.
            if let Some(seq) = self.sched.get_mut(*id).filter(|s| s.hold_on_finish) {
                let blocks = std::mem::take(&mut seq.blocks);
                self.held.insert(*id, blocks);
            }
        }
        self.done.clear();
        self.sched
            .finish_running(&out.finished, &mut self.pool, &mut self.done);
        self.pool.drain_events(&mut out.events);
    }
}

/// Seed of a request's default output tokens ([`crate::sampling::prompt_seed`]).
pub fn output_seed(prompt: &[u32]) -> u64 {
    crate::sampling::prompt_seed(prompt)
}

/// The `index`-th output token of a request with `seed`: uniform in `0..output_vocab`,
/// skipping EOS ids.
pub fn next_token(seed: u64, index: usize, cfg: &EngineConfig) -> u32 {
    crate::sampling::random_token(seed, index, cfg.output_vocab, &cfg.eos_token_ids)
}
