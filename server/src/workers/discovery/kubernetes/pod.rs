//! A worker pod as a registration: whether it takes requests now, and the [`WorkerSpec`] its
//! `kvrouter.dev/*` annotations describe (README "Deploy on Kubernetes"):
//!
//! | annotation | spec field | value |
//! |---|---|---|
//! | `kvrouter.dev/http-port` (required) | `url` = `http://<podIP>:<port>` | 1–65535 |
//! | `kvrouter.dev/kv-events-port` | `kv_events_endpoint` = `tcp://<podIP>:<port>` | 1–65535 (rank r: port + r) |
//! | `kvrouter.dev/kv-replay-port` | `replay_endpoint` = `tcp://<podIP>:<port>` | 1–65535, with a KV events port |
//! | `kvrouter.dev/block-size` | `block_size` | tokens per KV block, 1–4096 |
//! | `kvrouter.dev/role` | `role` | `both` (default), `prefill`, `decode` |
//! | `kvrouter.dev/engine` | `engine` | `vllm` (default), `sglang`, `trtllm` |
//! | `kvrouter.dev/model` | `model` | the model name the engine serves |
//! | `kvrouter.dev/lora-adapters` | `lora_adapters` | adapter names, comma-separated, in `--lora-modules` order |
//! | `kvrouter.dev/dp-size` | `dp_size` | data-parallel ranks, 1–256 |
//! | `kvrouter.dev/endpoint` | `endpoint` | `namespace.component.endpoint` |
//! | `kvrouter.dev/total-kv-blocks` | `total_kv_blocks` | KV blocks per rank, > 0 |
//! | `kvrouter.dev/max-num-batched-tokens` | `max_num_batched_tokens` | tokens per step, > 0 |
//!
//! A pod whose annotations do not read — a port that is not one, a block size out of range,
//! an unknown role, an unknown `kvrouter.dev/` annotation (a misspelt name would silently
//! leave a default, such as no KV events) — is not a worker: it is skipped with the reason.
//!
//! The worker's `id` is the pod's UID hashed (xxh3, 53 bits so JSON readers such as the
//! dashboard's JavaScript read it exactly): stable while the pod lives, new for a pod
//! recreated under the same name.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use crate::workers::spec::WorkerSpec;

/// The prefix of the annotations read.
pub const PREFIX: &str = "kvrouter.dev/";

/// Every annotation read, without [`PREFIX`].
pub const ANNOTATIONS: [&str; 12] = [
    "http-port",
    "kv-events-port",
    "kv-replay-port",
    "block-size",
    "role",
    "engine",
    "model",
    "lora-adapters",
    "dp-size",
    "endpoint",
    "total-kv-blocks",
    "max-num-batched-tokens",
];

/// What a pod is to discovery.
#[derive(Debug, PartialEq)]
pub enum PodWorker {
    /// Ready, with an address: this worker, and the restarts of the pod's containers (an
    /// engine restarted in place starts with an empty cache: its registration is renewed).
    Ready(Box<WorkerSpec>, u64),
    /// Not ready, terminating or without an address yet (its annotations read).
    NotReady,
    /// Its annotations do not describe a worker: why.
    Invalid(String),
}

/// What `pod` is to discovery.
pub fn worker_of(pod: &Pod) -> PodWorker {
    let empty = BTreeMap::new();
    let meta = &pod.metadata;
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let status = pod.status.as_ref();
    let ip = status.and_then(|s| s.pod_ip.as_deref()).unwrap_or_default();
    let uid = meta.uid.as_deref().unwrap_or_default();
    // Read before readiness: a misannotated pod is reported while it starts, not once ready.
    let spec = match spec_of(annotations, if ip.is_empty() { "0.0.0.0" } else { ip }, uid) {
        Ok(spec) => spec,
        Err(e) => return PodWorker::Invalid(e),
    };
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready || ip.is_empty() || meta.deletion_timestamp.is_some() {
        return PodWorker::NotReady;
    }
    let restarts = status
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| {
            c.iter()
                .map(|c| u64::try_from(c.restart_count).unwrap_or(0))
                .sum()
        });
    PodWorker::Ready(Box::new(spec), restarts)
}

/// The worker described by `annotations` on a pod at `ip` with UID `uid`. Errors: a missing
/// HTTP port, a malformed or out-of-range value, an unknown `kvrouter.dev/` annotation.
pub fn spec_of(
    annotations: &BTreeMap<String, String>,
    ip: &str,
    uid: &str,
) -> Result<WorkerSpec, String> {
    let mut a = BTreeMap::new();
    for (k, v) in annotations {
        let Some(name) = k.strip_prefix(PREFIX) else {
            continue;
        };
        if !ANNOTATIONS.contains(&name) {
            return Err(format!(
                "unknown annotation {k} (known: {})",
                ANNOTATIONS.map(|n| format!("{PREFIX}{n}")).join(", ")
            ));
        }
        a.insert(name, v.trim());
    }
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let port = |name: &str| -> Result<Option<u16>, String> {
        a.get(name)
            .map(|v| match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("{PREFIX}{name}: not a port (1-65535): {v:?}")),
            })
            .transpose()
    };
    fn number<T: std::str::FromStr>(
        a: &BTreeMap<&str, &str>,
        name: &str,
    ) -> Result<Option<T>, String> {
        a.get(name)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| format!("{PREFIX}{name}: not a whole number in range: {v:?}"))
            })
            .transpose()
    }
    let Some(http) = port("http-port")? else {
        return Err(format!("no {PREFIX}http-port annotation"));
    };
    let events = port("kv-events-port")?;
    let replay = port("kv-replay-port")?;
    let role = match a.get("role") {
        None => Default::default(),
        Some(v) => serde_json::from_value(serde_json::Value::String(v.to_string()))
            .map_err(|_| format!("{PREFIX}role: not both, prefill or decode: {v:?}"))?,
    };
    let engine = match a.get("engine") {
        None => Default::default(),
        Some(v) => serde_json::from_value(serde_json::Value::String(v.to_string()))
            .map_err(|_| format!("{PREFIX}engine: not vllm, sglang or trtllm: {v:?}"))?,
    };
    let text = |name: &str| a.get(name).map(|v| v.to_string()).filter(|v| !v.is_empty());
    let spec = WorkerSpec {
        id: Some(xxhash_rust::xxh3::xxh3_64(uid.as_bytes()) & ((1 << 53) - 1)),
        url: format!("http://{host}:{http}"),
        model: text("model"),
        // Names, not their paths: `sql,chat` for `--lora-modules sql=... chat=...`.
        lora_adapters: a
            .get("lora-adapters")
            .map(|v| v.split(',').map(|n| n.trim().to_string()).collect())
            .unwrap_or_default(),
        kv_events_endpoint: events.map(|p| format!("tcp://{host}:{p}")),
        replay_endpoint: replay.map(|p| format!("tcp://{host}:{p}")),
        block_size: number(&a, "block-size")?,
        dp_size: number(&a, "dp-size")?.unwrap_or(1),
        total_kv_blocks: number(&a, "total-kv-blocks")?,
        max_num_batched_tokens: number(&a, "max-num-batched-tokens")?,
        role,
        engine,
        endpoint: text("endpoint"),
        ..Default::default()
    };
    // Ranges and combinations, as for any registration; named by annotation.
    spec.validate().map_err(|e| {
        format!("annotations {PREFIX}*: {e}")
            .replace("kv_events_endpoint", "kv-events-port")
            .replace("replay_endpoint", "kv-replay-port")
    })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
            .collect()
    }

    const UID: &str = "6f1c2a0e-3b7d-4c41-9a55-0d3e2f8b9c17";

    #[test]
    fn every_annotation_lands_in_its_field() {
        let mut a = annotations(&[
            ("http-port", "8000"),
            ("kv-events-port", "5557"),
            ("kv-replay-port", " 5558 "),
            ("block-size", "16"),
            ("role", "decode"),
            ("engine", "sglang"),
            ("model", "Qwen/Qwen3-0.6B"),
            ("lora-adapters", "sql, chat"),
            ("dp-size", "2"),
            ("endpoint", "dynamo.decode.generate"),
            ("total-kv-blocks", "4096"),
            ("max-num-batched-tokens", "8192"),
        ]);
        // Other annotations and labels of the pod are none of ours.
        a.insert("kubectl.kubernetes.io/restartedAt".into(), "x".into());
        let s = spec_of(&a, "10.244.1.17", UID).unwrap();
        assert_eq!(s.url, "http://10.244.1.17:8000");
        assert_eq!(
            s.kv_events_endpoint.as_deref(),
            Some("tcp://10.244.1.17:5557")
        );
        assert_eq!(s.replay_endpoint.as_deref(), Some("tcp://10.244.1.17:5558"));
        assert_eq!(s.block_size, Some(16));
        assert_eq!(s.role, kvrouter_core::WorkerRole::Decode);
        assert_eq!(s.engine, crate::workers::spec::Engine::Sglang);
        assert_eq!(s.model.as_deref(), Some("Qwen/Qwen3-0.6B"));
        assert_eq!(s.lora_adapters, ["sql", "chat"]);
        assert_eq!(s.dp_size, 2);
        assert_eq!(s.endpoint(), "dynamo.decode.generate");
        assert_eq!(s.total_kv_blocks, Some(4096));
        assert_eq!(s.max_num_batched_tokens, Some(8192));
        let id = s.id.unwrap();
        assert!(id < 1 << 53);
        assert_eq!(
            spec_of(&a, "10.244.9.9", UID).unwrap().id,
            Some(id),
            "id from the UID"
        );
        assert_ne!(
            spec_of(&a, "10.244.1.17", "other-uid").unwrap().id,
            Some(id)
        );
        // IPv6 pod addresses are bracketed.
        let s = spec_of(
            &annotations(&[("http-port", "8000"), ("kv-events-port", "5557")]),
            "fd00::17",
            UID,
        )
        .unwrap();
        assert_eq!(s.url, "http://[fd00::17]:8000");
        assert_eq!(
            s.kv_events_endpoint.as_deref(),
            Some("tcp://[fd00::17]:5557")
        );
        // Only the HTTP port is required.
        let s = spec_of(&annotations(&[("http-port", "30000")]), "10.0.0.1", UID).unwrap();
        assert_eq!(
            (s.kv_events_endpoint, s.block_size, s.dp_size),
            (None, None, 1)
        );
    }

    #[test]
    fn malformed_annotations_say_which_and_why() {
        let base = [("http-port", "8000"), ("kv-events-port", "5557")];
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "no kvrouter.dev/http-port"),
            (
                &[("http-port", "http")],
                "kvrouter.dev/http-port: not a port",
            ),
            (&[("http-port", "0")], "kvrouter.dev/http-port: not a port"),
            (
                &[("http-port", "65536")],
                "kvrouter.dev/http-port: not a port",
            ),
            (&[("http-port", "-1")], "kvrouter.dev/http-port: not a port"),
            (
                &[("kv-events-port", "5557/tcp")],
                "kvrouter.dev/kv-events-port: not a port",
            ),
            (
                &[("block-size", "99999999999999999999999999")],
                "kvrouter.dev/block-size: not a whole number",
            ),
            (&[("block-size", "1000000")], "block_size must be 1..=4096"),
            (&[("block-size", "0")], "block_size must be 1..=4096"),
            (
                &[("block-size", "16.5")],
                "kvrouter.dev/block-size: not a whole number",
            ),
            (
                &[("role", "leader")],
                "kvrouter.dev/role: not both, prefill or decode",
            ),
            (
                &[("role", "Decode")],
                "kvrouter.dev/role: not both, prefill or decode",
            ),
            (
                &[("engine", "tgi")],
                "kvrouter.dev/engine: not vllm, sglang or trtllm",
            ),
            (
                &[("lora-adapters", "sql,,chat")],
                "lora_adapters: a name must be",
            ),
            (
                &[("lora-adapters", "sql,sql")],
                "lora_adapters names \"sql\" twice",
            ),
            (&[("dp-size", "100000")], "dp_size must be 1..=256"),
            (&[("dp-size", "0")], "dp_size must be 1..=256"),
            (
                &[("endpoint", "no-dots")],
                "endpoint must be namespace.component.endpoint",
            ),
            (&[("total-kv-blocks", "0")], "total_kv_blocks must be > 0"),
            (
                &[("kv-events-port", "65535"), ("dp-size", "4")],
                "kv-events-port must be",
            ),
            (
                &[("blocksize", "16")],
                "unknown annotation kvrouter.dev/blocksize",
            ),
            (
                &[("model", &"m".repeat(300))],
                "model is longer than 256 bytes",
            ),
        ];
        for (extra, want) in cases {
            let mut pairs: Vec<(&str, &str)> = base
                .iter()
                .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
                .copied()
                .collect();
            if extra.is_empty() {
                pairs.clear();
            }
            pairs.extend(extra.iter().copied());
            let e = spec_of(&annotations(&pairs), "10.0.0.1", UID).unwrap_err();
            assert!(e.contains(want), "{pairs:?}: {e}");
        }
        // A replay port without a KV events port.
        let e = spec_of(
            &annotations(&[("http-port", "1"), ("kv-replay-port", "2")]),
            "10.0.0.1",
            UID,
        )
        .unwrap_err();
        assert!(e.contains("kv-replay-port needs a kv-events-port"), "{e}");
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("a pod")
    }

    fn ready_pod(ready: &str, ip: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "vllm-0", "namespace": "llm", "uid": UID,
                "annotations": {"kvrouter.dev/http-port": "8000", "kvrouter.dev/block-size": "16"}
            },
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}]},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "Ready", "status": ready},
                    {"type": "ContainersReady", "status": ready},
                    {"type": "PodScheduled", "status": "True"}
                ],
                "containerStatuses": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                    "imageID": "", "ready": ready == "True", "restartCount": 2}]
            }
        })
    }

    #[test]
    fn only_ready_pods_with_an_address_are_workers() {
        match worker_of(&pod(ready_pod("True", Some("10.244.0.5")))) {
            PodWorker::Ready(s, restarts) => {
                assert_eq!(s.url, "http://10.244.0.5:8000");
                assert_eq!(restarts, 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            worker_of(&pod(ready_pod("False", Some("10.244.0.5")))),
            PodWorker::NotReady
        );
        assert_eq!(
            worker_of(&pod(ready_pod("True", None))),
            PodWorker::NotReady
        );
        let mut terminating = ready_pod("True", Some("10.244.0.5"));
        terminating["metadata"]["deletionTimestamp"] = "2025-06-01T10:00:00Z".into();
        assert_eq!(worker_of(&pod(terminating)), PodWorker::NotReady);
        // Pending, no status at all: not ready, and its annotations still checked.
        let mut pending = ready_pod("False", None);
        pending["status"] = serde_json::json!({"phase": "Pending"});
        assert_eq!(worker_of(&pod(pending.clone())), PodWorker::NotReady);
        pending["metadata"]["annotations"]["kvrouter.dev/block-size"] = "huge".into();
        assert!(
            matches!(worker_of(&pod(pending)), PodWorker::Invalid(e) if e.contains("block-size"))
        );
        // No annotations at all: not a worker, said so.
        let mut bare = ready_pod("True", Some("10.244.0.5"));
        bare["metadata"]["annotations"] = serde_json::Value::Null;
        assert!(matches!(worker_of(&pod(bare)), PodWorker::Invalid(e) if e.contains("http-port")));
    }
}
