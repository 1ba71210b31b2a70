//! What `--engine trtllm` changes: KV events served as `trtllm-serve` serves them, on
//! `POST /kv_cache_events` (`kv-event-wire.md` §3), instead of published on ZMQ.
//!
//! Each rank keeps its events in a buffer of `--event-buffer-max-size` events (TensorRT-LLM's
//! `event_buffer_max_size`); when it is full the oldest is dropped, so a slow poller sees a
//! jump in `event_id`. A call drains every rank's buffer and answers one JSON array (the wire
//! crate's [`encode_events`]): per rank, `created` first (`num_blocks_per_cache_level`
//! `[gpu_blocks, 0]`), then one `stored` per engine store (blocks chained by `parent_hash`,
//! each with its tokens, `cache_level` 0, priority 35), one `removed` per step's evictions;
//! `window_size` is [`WINDOW_SIZE`], `attention_dp_rank` present only with several ranks (as
//! with attention data parallelism). TensorRT-LLM has no "all cleared" event: a reset removes
//! every held block instead.
//!
//! Usage is reported as TensorRT-LLM's OpenAI server does (`serve/postprocess_handlers.py`):
//! always `prompt_tokens_details: {"cached_tokens": n}`, vLLM's shape.
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use kvrouter_wire::trtllm::{encode_events, TrtBlock, TrtData, TrtEvent};

use crate::events::{EventSink, KvEvent};

/// Attention window the mock's events name (tokens): every block is full attention.
pub const WINDOW_SIZE: u64 = 32_768;
/// Default `--event-buffer-max-size`.
pub const DEFAULT_EVENT_BUFFER_MAX_SIZE: usize = 1024;

struct Rank {
    events: VecDeque<TrtEvent>,
    next_id: u64,
    /// Events dropped because the buffer was full.
    dropped: u64,
}

/// The event buffers of one worker's ranks, shared by their engines and the HTTP handler.
#[derive(Clone)]
pub struct TrtEventBuffers {
    ranks: Arc<Vec<Mutex<Rank>>>,
    capacity: usize,
    with_rank: bool,
}

impl TrtEventBuffers {
    /// Buffers for `dp_size` ranks of at most `capacity` events each (≥ 1), each starting with
    /// its `created` event for `gpu_blocks` blocks.
    pub fn new(dp_size: usize, capacity: usize, gpu_blocks: usize) -> Self {
        let b = Self {
            ranks: Arc::new(
                (0..dp_size.max(1))
                    .map(|_| {
                        Mutex::new(Rank {
                            events: VecDeque::new(),
                            next_id: 0,
                            dropped: 0,
                        })
                    })
                    .collect(),
            ),
            capacity: capacity.max(1),
            with_rank: dp_size > 1,
        };
        for r in 0..b.ranks.len() {
            b.push(
                r,
                TrtData::Created {
                    num_blocks_per_cache_level: vec![gpu_blocks as u64, 0],
                },
            );
        }
        b
    }

    fn push(&self, rank: usize, data: TrtData) {
        let Some(m) = self.ranks.get(rank) else {
            return;
        };
        let mut r = m.lock().unwrap_or_else(|e| e.into_inner());
        if r.events.len() >= self.capacity {
            r.events.pop_front();
            r.dropped += 1;
        }
        let event_id = r.next_id;
        r.next_id += 1;
        r.events.push_back(TrtEvent {
            event_id,
            window_size: Some(WINDOW_SIZE),
            attention_dp_rank: self.with_rank.then_some(rank as u32),
            data,
        });
    }

    /// Every rank's buffered events, oldest first per rank, as the JSON answer; the buffers
    /// are left empty.
    pub fn drain(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for m in self.ranks.iter() {
            all.extend(m.lock().unwrap_or_else(|e| e.into_inner()).events.drain(..));
        }
        encode_events(&all)
    }

    /// Events dropped from full buffers so far, all ranks together.
    pub fn dropped(&self) -> u64 {
        self.ranks
            .iter()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).dropped)
            .sum()
    }

    /// The sink of rank `rank`'s engine.
    pub fn sink(&self, rank: usize) -> TrtSink {
        TrtSink {
            buffers: self.clone(),
            rank,
            held: HashSet::new(),
        }
    }
}

/// One rank's engine events into its buffer, in TensorRT-LLM's shapes.
pub struct TrtSink {
    buffers: TrtEventBuffers,
    rank: usize,
    /// Blocks stored and not removed (what a reset removes).
    held: HashSet<u64>,
}

impl EventSink for TrtSink {
    fn publish(&mut self, _ts: f64, events: &[KvEvent]) {
        let mut removed = Vec::new();
        let flush = |removed: &mut Vec<u64>, b: &TrtEventBuffers, rank| {
            if !removed.is_empty() {
                b.push(
                    rank,
                    TrtData::Removed {
                        block_hashes: std::mem::take(removed),
                    },
                );
            }
        };
        for e in events {
            match e {
                KvEvent::Stored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    // TensorRT-LLM's JSON names no adapter or salt: LoRA is refused without
                    // --trtllm-zmq-events; a salted request's blocks are published unsalted.
                    keys: _,
                } => {
                    flush(&mut removed, &self.buffers, self.rank);
                    let bs = *block_size as usize;
                    let blocks = block_hashes
                        .iter()
                        .enumerate()
                        .map(|(i, &h)| TrtBlock {
                            block_hash: h,
                            tokens: token_ids
                                .get(i * bs..(i + 1) * bs)
                                .unwrap_or_default()
                                .iter()
                                .map(|&t| (t, 0))
                                .collect(),
                            cache_level: 0,
                            priority: 35,
                        })
                        .collect();
                    self.held.extend(block_hashes.iter().copied());
                    self.buffers.push(
                        self.rank,
                        TrtData::Stored {
                            parent_hash: *parent_block_hash,
                            blocks,
                        },
                    );
                }
                KvEvent::Removed { block_hash } => {
                    self.held.remove(block_hash);
                    removed.push(*block_hash);
                }
                KvEvent::AllCleared => {
                    removed.extend(self.held.drain());
                }
            }
        }
        flush(&mut removed, &self.buffers, self.rank);
    }
}
