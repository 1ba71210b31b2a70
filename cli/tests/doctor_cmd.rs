//! `kvrouter doctor` end to end: the real binary against embedded stacks — it passes a
//! healthy fleet and fails, naming the cause, one whose router was given the wrong block size.
use std::process::{Command, Output};

use kvrouter_core::RouterMode;
use kvrouter_mocker::{spawn_workers, MockerConfig};
use kvrouter_server::up::{worker_spec, EmbeddedStack, UpConfig};
use kvrouter_server::{vendored_model_dir, Frontend, FrontendConfig};

fn mocker() -> MockerConfig {
    MockerConfig {
        model_path: Some(vendored_model_dir()),
        speedup_ratio: 0.0,
        num_gpu_blocks: 1024,
        block_size: 64,
        ..MockerConfig::default()
    }
}

/// Run `kvrouter doctor` against `url` with its admin API at `admin` (off the runtime).
async fn doctor(url: String, admin: Option<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvrouter"));
        c.args(["doctor", &url, "--prompt-words", "600"]);
        if let Some(a) = admin {
            c.args(["--admin-url", &a]);
        }
        c.output().unwrap()
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_a_healthy_fleet() {
    let mut cfg = UpConfig {
        workers: 2,
        mocker: mocker(),
        ..UpConfig::default()
    };
    cfg.frontend.router_mode = RouterMode::Kv;
    let s = EmbeddedStack::start(cfg).await.unwrap();
    let out = doctor(s.url(), s.frontend.admin_url()).await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(t.lines().filter(|l| l.starts_with("OK ")).count(), 2, "{t}");
    assert!(t.contains("block size 64"), "{t}");
    // Without the admin API: the worker the router picks.
    let out = doctor(s.url(), None).await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(t.lines().filter(|l| l.starts_with("OK ")).count(), 1, "{t}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_a_fleet_whose_router_has_the_wrong_block_size() {
    // The engines use 64-token blocks; the router is told 32.
    let workers = spawn_workers(&mocker(), 2).await.unwrap();
    let specs = workers
        .iter()
        .map(|w| {
            let mut s = worker_spec(w);
            s.block_size = None;
            s
        })
        .collect();
    let fc = FrontendConfig {
        router_mode: RouterMode::Kv,
        kv_cache_block_size: Some(32),
        ..FrontendConfig::default()
    };
    let f = Frontend::start(fc, specs).await.unwrap();
    let out = doctor(f.url(), f.admin_url()).await;
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    let fails: Vec<&str> = t.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert_eq!(fails.len(), 2, "{t}");
    for l in fails {
        assert!(
            l.contains("under_predicting") && l.contains("block_size"),
            "{t}"
        );
    }
    assert!(t.contains("2 worker(s) failed"), "{t}");
    // Without the admin API it still fails, with the list of suspects.
    let out = doctor(f.url(), None).await;
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("under_predicting"), "{t}");
    f.stop().await;
    for w in workers {
        w.stop().await;
    }
}
