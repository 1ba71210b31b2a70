//! How a worker is described ([`WorkerSpec`]): by `--worker`, a workers file, or the admin
//! API; and what a description must satisfy before anything is started for it.

use kvrouter_core::event::{WorkerId, WorkerWithDpRank};
use kvrouter_core::{DeviceType, WorkerRole};
use kvrouter_wire::subscriber::{dp_endpoint, SubscriberConfig};
use serde::{Deserialize, Serialize};

/// Most data-parallel ranks one registration may declare. Each rank runs a KV event
/// subscriber (two threads), so the bound keeps one hostile or mistyped registration from
/// starting thousands of threads.
pub const MAX_DP_SIZE: u32 = 256;
/// Largest block size accepted, tokens (engines use 1–256).
pub const MAX_BLOCK_SIZE: usize = 4096;
/// Longest model name or event topic accepted, bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Most LoRA adapters one registration may list.
pub const MAX_LORA_ADAPTERS: usize = 1024;
/// Longest poll interval a registration may ask for, ms.
pub const MAX_POLL_INTERVAL_MS: u64 = 60_000;
/// The endpoint a worker registered without one serves (Dynamo's default component).
pub const DEFAULT_ENDPOINT: &str = "dynamo.backend.generate";

/// One worker as registered. Every field but `url` is optional; unknown fields are ignored,
/// so the JSON lines `kvrouter mocker` prints are valid specs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Stable id (routing unit is `(id, dp_rank)`); assigned when absent.
    #[serde(default)]
    pub id: Option<WorkerId>,
    /// Base URL of its OpenAI-compatible server, e.g. `http://127.0.0.1:8100`.
    pub url: String,
    /// Model name the worker serves (sent in the `model` field); default: ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// LoRA adapters it serves (vLLM `--lora-modules` names, in that order): a request whose
    /// `model` is one of them goes to a worker serving it, hashed with the adapter; the order
    /// names the numeric `lora_id` of vLLM events without `lora_name` (id = position + 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_adapters: Vec<String>,
    /// ZMQ PUB endpoint of its KV events (rank 0; rank r per vLLM's `port + r` rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events_endpoint: Option<String>,
    /// ZMQ ROUTER endpoint for replaying missed event batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_endpoint: Option<String>,
    /// ZMQ topic of its events (vLLM default: empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events_topic: Option<String>,
    /// Tokens per KV block; must agree across the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// The inference engine it runs: `vllm` (default), `sglang` or `trtllm`. It decides how a
    /// request names its data-parallel rank ([`WorkerSpec::rank_pin`]); KV events on ZMQ are
    /// decoded alike for every engine (their format is told apart per batch and shown per
    /// rank), and a `trtllm` worker without a `kv_events_endpoint` is polled on
    /// `POST /kv_cache_events` instead ([`WorkerSpec::polls_kv_events`]).
    #[serde(default)]
    pub engine: Engine,
    /// `trtllm` workers polled for their events: milliseconds between two polls (default:
    /// `--kv-events-poll-interval-ms`, 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events_poll_interval_ms: Option<u64>,
    /// Data-parallel ranks behind this URL, each indexed, loaded and pinned separately
    /// (requests carry the rank: see [`WorkerSpec::rank_pin`]).
    #[serde(default = "one")]
    pub dp_size: u32,
    /// `cpu` or `gpu` (device-aware-weighted mode).
    #[serde(default)]
    pub device: DeviceType,
    /// KV cache capacity per rank, blocks (busy threshold on decode blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_kv_blocks: Option<u64>,
    /// Tokens per engine step (busy threshold as a fraction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_batched_tokens: Option<u64>,
    /// `prefill`, `decode` or `both` (default): its part in prefill/decode disaggregation.
    #[serde(default)]
    pub role: WorkerRole,
    /// How a prefill worker hands its KV blocks to a decode worker: `vllm` (default; the
    /// `kv_transfer_params` of vLLM's NIXL connector) or `sglang` (bootstrap rooms).
    #[serde(default)]
    pub disaggregation_protocol: DisaggProtocol,
    /// SGLang: the prefill worker's bootstrap port (its `disaggregation_bootstrap_port`,
    /// default 8998).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_port: Option<u16>,
    /// The `namespace.component.endpoint` it serves (default [`DEFAULT_ENDPOINT`]): a
    /// standalone router (`kvrouter router --endpoint`) routes to the workers of its endpoint
    /// only, e.g. `dynamo.prefill.generate` for a prefill pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// How KV blocks move from a prefill worker to a decode worker (spec §13.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisaggProtocol {
    /// Prefill first (`max_tokens: 1`, `kv_transfer_params.do_remote_decode`), then decode
    /// with the `kv_transfer_params` the prefill worker returned.
    #[default]
    Vllm,
    /// The same request to both at once with `bootstrap_host`, `bootstrap_port` and
    /// `bootstrap_room`.
    Sglang,
}

/// The inference engine a worker runs (`engine` of its registration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// vLLM (and engines serving its API, e.g. `kvrouter mocker`).
    #[default]
    Vllm,
    /// SGLang.
    Sglang,
    /// TensorRT-LLM (`trtllm-serve`).
    Trtllm,
}

impl Engine {
    /// `"vllm"`, `"sglang"` or `"trtllm"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Trtllm => "trtllm",
        }
    }
}

/// How a worker request names the data-parallel rank it must run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankPin {
    /// Nothing to name: the worker has one rank.
    None,
    /// vLLM's `X-data-parallel-rank: r` header (its API server reads it into
    /// `data_parallel_rank`).
    Header(u32),
    /// SGLang's `"data_parallel_rank": r` body field: every SGLang release with DP routing
    /// reads it (recent ones also as `routed_dp_rank`, or from the header; the header only
    /// exists in recent ones).
    BodyField(u32),
}

fn one() -> u32 {
    1
}

impl WorkerSpec {
    /// A worker known by URL only.
    pub fn from_url(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            dp_size: 1,
            ..Default::default()
        }
    }

    /// Parse a JSON array of specs or JSON lines (blank lines and `#` comments skipped).
    /// Errors: the first malformed entry, with its line number.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let t = text.trim_start();
        if t.starts_with('[') {
            return serde_json::from_str(t).map_err(|e| e.to_string());
        }
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
        Ok(out)
    }

    /// Check every field before anything is started for the worker. Errors: a message for
    /// the client naming the field.
    pub fn validate(&self) -> Result<(), String> {
        validate_url(&self.url)?;
        if self.dp_size == 0 || self.dp_size > MAX_DP_SIZE {
            return Err(format!(
                "dp_size must be 1..={MAX_DP_SIZE}, got {} (each rank costs two event threads)",
                self.dp_size
            ));
        }
        if let Some(b) = self.block_size {
            if b == 0 || b > MAX_BLOCK_SIZE {
                return Err(format!("block_size must be 1..={MAX_BLOCK_SIZE}, got {b}"));
            }
        }
        for (k, v) in [
            ("total_kv_blocks", self.total_kv_blocks),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
        ] {
            if v == Some(0) {
                return Err(format!("{k} must be > 0"));
            }
        }
        for (k, v) in [
            ("kv_events_endpoint", &self.kv_events_endpoint),
            ("replay_endpoint", &self.replay_endpoint),
        ] {
            if let Some(e) = v {
                validate_zmq_endpoint(k, e, self.dp_size)?;
            }
        }
        if let Some(e) = &self.endpoint {
            validate_endpoint_name(e)?;
        }
        if let Some(ms) = self.kv_events_poll_interval_ms {
            if !(1..=MAX_POLL_INTERVAL_MS).contains(&ms) {
                return Err(format!(
                    "kv_events_poll_interval_ms must be 1..={MAX_POLL_INTERVAL_MS}, got {ms}"
                ));
            }
        }
        if self.replay_endpoint.is_some() && self.kv_events_endpoint.is_none() {
            return Err("replay_endpoint needs a kv_events_endpoint".into());
        }
        for (k, v) in [
            ("kv_events_topic", &self.kv_events_topic),
            ("model", &self.model),
        ] {
            if v.as_ref().is_some_and(|t| t.len() > MAX_NAME_LEN) {
                return Err(format!("{k} is longer than {MAX_NAME_LEN} bytes"));
            }
        }
        validate_lora_adapters(&self.lora_adapters)?;
        Ok(())
    }

    /// The endpoint it serves ([`DEFAULT_ENDPOINT`] when not given).
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT)
    }

    /// Its ranks.
    pub fn ranks(&self) -> impl Iterator<Item = WorkerWithDpRank> + '_ {
        let id = self.id.unwrap_or(0);
        (0..self.dp_size).map(move |r| WorkerWithDpRank::new(id, r))
    }

    /// How a request to rank `dp_rank` names it: nothing for a one-rank worker; else, for
    /// every rank including 0 (an unnamed request is the engine's to place, and its choice
    /// need not be ours), SGLang's body field or the header the others read.
    pub fn rank_pin(&self, dp_rank: u32) -> RankPin {
        if self.dp_size <= 1 && dp_rank == 0 {
            return RankPin::None;
        }
        match self.engine {
            Engine::Sglang => RankPin::BodyField(dp_rank),
            Engine::Vllm | Engine::Trtllm => RankPin::Header(dp_rank),
        }
    }

    /// Whether its KV events are polled from TensorRT-LLM's `POST /kv_cache_events` (a
    /// `trtllm` worker without a ZMQ `kv_events_endpoint`; with one, its publisher of vLLM's
    /// format is subscribed to like any other).
    pub fn polls_kv_events(&self) -> bool {
        self.engine == Engine::Trtllm && self.kv_events_endpoint.is_none()
    }

    /// The KV event endpoint of one rank.
    pub fn rank_endpoint(&self, rank: u32) -> Option<String> {
        self.kv_events_endpoint
            .as_deref()
            .map(|e| dp_endpoint(e, rank))
    }

    /// The KV event subscriber of each rank that publishes events (its endpoint, replay
    /// endpoint and topic), for `block_size`-token blocks and messages of at most
    /// `max_frame_bytes`.
    pub fn subscriber_configs(
        &self,
        block_size: u32,
        max_frame_bytes: usize,
    ) -> Vec<SubscriberConfig> {
        self.ranks()
            .filter_map(|rank| {
                Some(SubscriberConfig {
                    worker: rank,
                    endpoint: self.rank_endpoint(rank.dp_rank)?,
                    replay_endpoint: self
                        .replay_endpoint
                        .as_deref()
                        .map(|e| dp_endpoint(e, rank.dp_rank)),
                    topic: self.kv_events_topic.clone().unwrap_or_default(),
                    block_size,
                    max_frame_bytes,
                    lora_adapters: self.lora_adapters.clone().into(),
                    ..Default::default()
                })
            })
            .collect()
    }
}

/// At most [`MAX_LORA_ADAPTERS`] adapters, each named once, by a non-empty name of at most
/// [`MAX_NAME_LEN`] bytes. Errors: a message naming the rule and the adapter.
fn validate_lora_adapters(names: &[String]) -> Result<(), String> {
    if names.len() > MAX_LORA_ADAPTERS {
        return Err(format!(
            "lora_adapters lists {} adapters, at most {MAX_LORA_ADAPTERS}",
            names.len()
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    for n in names {
        if n.is_empty() || n.len() > MAX_NAME_LEN {
            return Err(format!(
                "lora_adapters: a name must be 1..={MAX_NAME_LEN} bytes, got {} bytes",
                n.len()
            ));
        }
        if !seen.insert(n.as_str()) {
            return Err(format!("lora_adapters names {n:?} twice"));
        }
    }
    Ok(())
}

/// An endpoint name is `namespace.component.endpoint`: three non-empty parts of ASCII
/// letters, digits, `_` and `-`. Errors: a message naming the rule.
pub fn validate_endpoint_name(e: &str) -> Result<(), String> {
    let parts: Vec<&str> = e.split('.').collect();
    let ok = e.len() <= MAX_NAME_LEN
        && parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "endpoint must be namespace.component.endpoint (three non-empty parts of letters, digits, `_`, `-`), got {e:?}"
        ))
    }
}

/// A worker URL must be `http://host[:port]`: no credentials, path, query or fragment. TLS to
/// workers is not spoken (put them on a private network, or a TLS proxy beside each).
fn validate_url(u: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "worker url must be http://host[:port] ({why}), got {u:?}"
        ))
    };
    if u.starts_with("https://") {
        return bad("https is not supported");
    }
    let Some(rest) = u.strip_prefix("http://") else {
        return bad("scheme");
    };
    let auth = rest.strip_suffix('/').unwrap_or(rest);
    if auth.is_empty() {
        return bad("no host");
    }
    if auth.contains('@') {
        return bad("credentials");
    }
    if auth.contains(['/', '?', '#']) {
        return bad("path, query or fragment");
    }
    let (host, port) = match auth.strip_prefix('[') {
        Some(v6) => {
            let Some((h, after)) = v6.split_once(']') else {
                return bad("unclosed IPv6 address");
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return bad("bad IPv6 address");
            }
            (h, after.strip_prefix(':'))
        }
        None => match auth.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        },
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !host_ok {
        return bad("host");
    }
    if let Some(p) = port {
        if !p.parse::<u16>().is_ok_and(|p| p > 0) {
            return bad("port");
        }
    }
    Ok(())
}

/// A KV event endpoint the router can connect to: `tcp://host:port` (with room for
/// `dp_size` consecutive ports) or `ipc://path`.
fn validate_zmq_endpoint(field: &str, e: &str, dp_size: u32) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{field} must be tcp://host:port or ipc://path ({why}), got {e:?}"
        ))
    };
    if let Some(rest) = e.strip_prefix("tcp://") {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return bad("no port");
        };
        if host.is_empty() || host == "*" {
            return bad("a host to connect to is needed");
        }
        match port.parse::<u32>() {
            Ok(p) if p > 0 && p + dp_size - 1 <= 65_535 => Ok(()),
            _ => bad("port, plus one per dp rank, must be 1..=65535"),
        }
    } else if let Some(path) = e.strip_prefix("ipc://") {
        if path.is_empty() {
            return bad("empty path");
        }
        Ok(())
    } else {
        bad("transport")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_default_and_are_validated() {
        let spec: WorkerSpec = serde_json::from_str(r#"{"url": "http://127.0.0.1:1"}"#).unwrap();
        assert_eq!(spec.endpoint(), DEFAULT_ENDPOINT);
        assert!(spec.validate().is_ok());
        let spec: WorkerSpec = serde_json::from_str(
            r#"{"url": "http://127.0.0.1:1", "endpoint": "dynamo.prefill.generate"}"#,
        )
        .unwrap();
        assert_eq!(spec.endpoint(), "dynamo.prefill.generate");
        for bad in [
            "dynamo.prefill",
            "a..b",
            "a.b.c.d",
            "a.b c.d",
            "",
            "ns.comp.ep!",
        ] {
            let e = validate_endpoint_name(bad).unwrap_err();
            assert!(e.contains("namespace.component.endpoint"), "{bad}: {e}");
        }
        assert!(validate_endpoint_name("my-ns.prefill_2.generate").is_ok());
    }

    #[test]
    fn the_engine_decides_how_a_rank_is_named() {
        let spec: WorkerSpec = serde_json::from_str(r#"{"url": "http://127.0.0.1:1"}"#).unwrap();
        assert_eq!(
            (spec.engine, spec.rank_pin(0)),
            (Engine::Vllm, RankPin::None)
        );
        let spec: WorkerSpec =
            serde_json::from_str(r#"{"url": "http://127.0.0.1:1", "dp_size": 2}"#).unwrap();
        // Rank 0 too: unnamed, the engine would place it by its own rule.
        assert_eq!(spec.rank_pin(0), RankPin::Header(0));
        assert_eq!(spec.rank_pin(1), RankPin::Header(1));
        let spec: WorkerSpec = serde_json::from_str(
            r#"{"url": "http://127.0.0.1:1", "dp_size": 2, "engine": "sglang"}"#,
        )
        .unwrap();
        assert_eq!(spec.rank_pin(1), RankPin::BodyField(1));
        assert_eq!(
            serde_json::to_value(&spec).unwrap()["engine"],
            serde_json::json!("sglang")
        );
        for e in ["trtllm", "vllm"] {
            let spec: WorkerSpec = serde_json::from_str(&format!(
                r#"{{"url": "http://127.0.0.1:1", "dp_size": 4, "engine": "{e}"}}"#
            ))
            .unwrap();
            assert_eq!(spec.rank_pin(3), RankPin::Header(3), "{e}");
        }
        assert!(serde_json::from_str::<WorkerSpec>(
            r#"{"url": "http://127.0.0.1:1", "engine": "SGLang"}"#
        )
        .is_err());
    }

    #[test]
    fn lora_adapters_are_optional_bounded_and_reach_the_subscribers() {
        let spec: WorkerSpec = serde_json::from_str(
            r#"{"url": "http://127.0.0.1:1", "kv_events_endpoint": "tcp://127.0.0.1:5557",
                "dp_size": 2, "lora_adapters": ["sql", "chat"]}"#,
        )
        .unwrap();
        assert!(spec.validate().is_ok());
        let subs = spec.subscriber_configs(16, 1 << 20);
        assert_eq!(subs.len(), 2);
        for s in &subs {
            assert_eq!(&*s.lora_adapters, ["sql".to_string(), "chat".to_string()]);
        }
        let plain = WorkerSpec::from_url("http://127.0.0.1:1");
        assert!(plain.lora_adapters.is_empty());
        // Left out of the JSON when empty.
        assert!(serde_json::to_value(&plain)
            .unwrap()
            .get("lora_adapters")
            .is_none());
        for (bad, why) in [
            (vec!["a".to_string(), "a".to_string()], "twice"),
            (vec![String::new()], "1..="),
            (vec!["x".repeat(MAX_NAME_LEN + 1)], "1..="),
            (
                (0..=MAX_LORA_ADAPTERS).map(|i| i.to_string()).collect(),
                "at most",
            ),
        ] {
            let spec = WorkerSpec {
                lora_adapters: bad,
                ..plain.clone()
            };
            let e = spec.validate().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
