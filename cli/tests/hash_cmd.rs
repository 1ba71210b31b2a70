//! `kvrouter hash` end to end: the real binary, stdin in, JSON out.
use std::io::Write;
use std::process::{Command, Stdio};

fn run_hash(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .arg("hash")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn prints_appendix_a_hashes() {
    let tokens: Vec<u32> = (1..=64).collect();
    let out = run_hash(
        &["--block-size", "16"],
        &serde_json::to_string(&tokens).unwrap(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["local"],
        serde_json::json!([
            16863443419780771464u64,
            2287610619914608821u64,
            12129935312930971799u64,
            5453111288643762282u64
        ])
    );
    assert_eq!(
        v["sequence"],
        serde_json::json!([
            16863443419780771464u64,
            12466389667045779788u64,
            960926348267535642u64,
            4923844688253642376u64
        ])
    );
}

#[test]
fn lora_salt_and_eagle_flags() {
    let tokens: Vec<u32> = (1..=32).collect();
    let json = serde_json::to_string(&tokens).unwrap();
    let v: serde_json::Value = serde_json::from_slice(
        &run_hash(&["--block-size", "16", "--lora-name", "my-lora"], &json).stdout,
    )
    .unwrap();
    assert_eq!(
        v["local"],
        serde_json::json!([4148081000444450790u64, 2866551892415683476u64])
    );
    let v: serde_json::Value = serde_json::from_slice(
        &run_hash(&["--block-size", "16", "--cache-salt", "ns1"], &json).stdout,
    )
    .unwrap();
    assert_eq!(
        v["local"],
        serde_json::json!([10470563794485058852u64, 9596755744098040008u64])
    );
    let mut t = tokens.clone();
    t.push(99);
    let v: serde_json::Value = serde_json::from_slice(
        &run_hash(
            &["--block-size", "16", "--eagle"],
            &serde_json::to_string(&t).unwrap(),
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(
        v["local"],
        serde_json::json!([6752489653130089168u64, 8646629551596238458u64])
    );
}

#[test]
fn rejects_bad_input_with_a_clear_error() {
    let out = run_hash(&["--block-size", "16"], "[1, 2, -3]");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON array of token ids"));
    let out = run_hash(&["--block-size", "0"], "[1]");
    assert!(!out.status.success());
}
