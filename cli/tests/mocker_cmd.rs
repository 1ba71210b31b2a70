//! `kvrouter mocker` end to end: the real binary prints one workers-file line per worker, with
//! explicit ids when `--worker-id-base` is given (what relays and replicas must agree on).
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The lines a `kvrouter mocker` with `extra` flags prints for 2 workers.
fn lines(extra: &[&str]) -> Vec<serde_json::Value> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .args(["mocker", "--num-workers", "2", "--http-port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut v = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        v.push(serde_json::from_str(&line).expect("a JSON line"));
    }
    let _ = child.kill();
    let _ = child.wait();
    v
}

#[test]
fn worker_id_base_numbers_the_printed_workers() {
    let ids = |v: &[serde_json::Value]| v.iter().map(|w| w["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&lines(&["--worker-id-base", "7"])), [7, 8]);
    assert_eq!(
        ids(&lines(&[])),
        [serde_json::Value::Null, serde_json::Value::Null],
        "no id unless asked"
    );
}
