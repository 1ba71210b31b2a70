//! `kvrouter register` end to end: the real binary writes a worker's registration under the
//! file discovery root, keeps it fresh, and withdraws it on SIGTERM.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

#[test]
fn announces_refreshes_and_withdraws_a_registration() {
    let root = std::env::temp_dir().join(format!("kvrouter-register-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .args(["register", "--file-kv"])
        .arg(&root)
        .args([
            "--discovery-lease-secs",
            "0.6",
            "--endpoint",
            "ns.prefill.generate",
            "--worker-json",
            r#"{"url": "http://127.0.0.1:9/", "block_size": 16}"#,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let path = std::path::PathBuf::from(line.trim());
    assert!(
        path.starts_with(root.join("ns/prefill/generate")),
        "{path:?}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["url"], "http://127.0.0.1:9/");
    assert_eq!(v["endpoint"], "ns.prefill.generate");
    // The lease is renewed: after two lease periods the file is still fresh.
    std::thread::sleep(Duration::from_millis(1200));
    let age = SystemTime::now()
        .duration_since(std::fs::metadata(&path).unwrap().modified().unwrap())
        .unwrap_or_default();
    assert!(
        age < Duration::from_millis(600),
        "not refreshed: {age:?} old"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().unwrap().success());
    assert!(!path.exists(), "withdrawn on SIGTERM");
    let bad = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .args(["register", "--file-kv"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(!bad.status.success(), "nothing to register is an error");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn kubernetes_discovery_needs_no_register_sidecar() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
        .args(["register", "--discovery", "kubernetes", "--worker-json"])
        .arg(r#"{"url": "http://127.0.0.1:9"}"#)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let why = if cfg!(feature = "kubernetes") {
        "needs no sidecar: annotate the worker pods"
    } else {
        "--features kubernetes"
    };
    assert!(err.contains(why), "{err}");
}
