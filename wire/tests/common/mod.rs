//! Helpers shared by the integration tests: the recorded frames in `shared/data/kv-events/`.
#![allow(dead_code)]

use std::path::PathBuf;

/// `$KVROUTER_SHARED`, else `<repo>/../shared`.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("KVROUTER_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

pub fn kv_events_dir() -> PathBuf {
    shared_dir().join("data/kv-events")
}

/// One recorded message.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub file: String,
    pub topic: String,
    pub seq: u64,
    pub payload: Vec<u8>,
    /// The capture harness's generic msgpack decode (Python), an independent oracle.
    pub decoded: serde_json::Value,
}

pub fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Every `*.jsonl` under `kv-events/`, sorted, as `dir/file.jsonl` names.
pub fn all_files() -> Vec<String> {
    let root = kv_events_dir();
    let mut out = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display())) {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "jsonl") {
                out.push(
                    f.strip_prefix(&root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

pub fn load(name: &str) -> Vec<Recorded> {
    let path = kv_events_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["frames"], 3, "{name}: recorded message without 3 frames");
            Recorded {
                file: name.to_owned(),
                topic: v["topic"].as_str().unwrap().to_owned(),
                seq: v["seq"].as_u64().unwrap(),
                payload: hex(v["payload_hex"].as_str().unwrap()),
                decoded: v["decoded"].clone(),
            }
        })
        .collect()
}

/// A hash as the oracle shows it: int (signed or unsigned) or `{"bytes_hex": ...}` (low 64 bits).
pub fn oracle_hash(v: &serde_json::Value) -> u64 {
    if let Some(u) = v.as_u64() {
        return u;
    }
    if let Some(i) = v.as_i64() {
        return i as u64;
    }
    let b = hex(v["bytes_hex"].as_str().expect("hash"));
    u64::from_be_bytes(b[b.len() - 8..].try_into().unwrap())
}

/// Python interpreter for the pyzmq tests: `$KVROUTER_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("KVROUTER_PYTHON").unwrap_or_else(|_| "python3".into())
}
