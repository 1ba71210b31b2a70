//! One mock engine on the virtual clock: the mocker's own [`Engine`] (scheduler, KV pool,
//! timing model), stepped the way its live driver steps it — a step starts when the engine is
//! idle and has work, its results (tokens, KV events) come out when the step's modelled
//! duration has passed, and the next step starts right then. Requests that arrive meanwhile
//! join the next step, as they would on the live worker.
//!
//! KV events leave as the live worker's do: the mocker's events in vLLM's wire model
//! ([`kvrouter_mocker::to_engine_events`]), converted for the router by the subscriber's
//! [`Converter`] (local hashes recomputed from the token ids).

use kvrouter_core::event::{RouterEvent, WorkerWithDpRank};
use kvrouter_mocker::engine::{Engine, EngineConfig, RequestError, StepOutput};
use kvrouter_mocker::scheduler::SeqId;
use kvrouter_wire::{Converter, EngineBatch};

/// A mock engine stepped on a virtual clock.
pub struct VirtualEngine {
    engine: Engine,
    converter: Converter,
    out: StepOutput,
    busy: bool,
    steps: u64,
}

impl VirtualEngine {
    /// An idle engine with an empty pool, publishing as `worker`.
    pub fn new(worker: WorkerWithDpRank, cfg: EngineConfig) -> Self {
        let converter = Converter::new(worker, cfg.block_size as u32);
        Self {
            engine: Engine::new(cfg),
            converter,
            out: StepOutput::default(),
            busy: false,
            steps: 0,
        }
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        self.engine.config()
    }

    /// Whether a step is in flight.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Steps run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Queues a request that arrived at `now` (it joins the next step). Errors: the engine
    /// refuses it (see [`EngineConfig::validate`]).
    pub fn add(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        now: f64,
    ) -> Result<(), RequestError> {
        self.engine.add_request(id, prompt, max_tokens, now)
    }

    /// Starts a step at `now` if the engine is idle and has work; returns when it ends.
    pub fn start_step(&mut self, now: f64) -> Option<f64> {
        if self.busy || !self.engine.has_work() {
            return None;
        }
        self.engine.step(now, &mut self.out);
        self.steps += 1;
        let did_nothing = self.out.tokens.is_empty()
            && self.out.prefill_tokens == 0
            && self.out.decode_seqs == 0
            && self.out.events.is_empty();
        if did_nothing {
            // Cannot happen with requests the engine accepted; never spin on the clock.
            return None;
        }
        self.busy = true;
        Some(now + self.out.duration.max(0.0))
    }

    /// Ends the step in flight: its output (tokens, KV events in the mocker's vocabulary) and
    /// the router's view of its KV events, appended to `events`.
    pub fn end_step(&mut self, events: &mut Vec<RouterEvent>) -> &StepOutput {
        self.busy = false;
        if !self.out.events.is_empty() {
            let batch = EngineBatch {
                ts: 0.0,
                events: kvrouter_mocker::to_engine_events(&self.out.events),
                dp_rank: Some(self.converter.worker().dp_rank),
            };
            self.converter.convert_batch(&batch, events);
        }
        &self.out
    }
}
