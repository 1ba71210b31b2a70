//! A CPU-only mock inference engine with vLLM's HTTP API, KV events and metrics.
