//! The admin API (runtime registration, bearer token) and health-driven membership.
use std::time::Duration;

use kvrouter_core::RouterMode;
use kvrouter_mocker::spawn_workers;
use kvrouter_server::up::worker_spec;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_and_leave_at_runtime_behind_a_token() {
    let s = stack(RouterMode::RoundRobin, 1, |c| {
        c.frontend.fleet.admin_token = Some("s3cret".into())
    })
    .await;
    let admin = s.frontend.admin_url().expect("admin API served");
    let c = client();
    let r = c.get(format!("{admin}/v1/workers")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{admin}/v1/workers"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let extra = spawn_workers(&s_mocker(), 1).await.unwrap();
    let spec = worker_spec(&extra[0]);
    let r = c
        .post(format!("{admin}/v1/workers"))
        .bearer_auth("s3cret")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let added: Value = r.json().await.unwrap();
    let id = added["id"].as_u64().expect("id assigned");
    // The same URL twice is refused; so is a different block size.
    let r = c
        .post(format!("{admin}/v1/workers"))
        .bearer_auth("s3cret")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(format!("{admin}/v1/workers"))
        .bearer_auth("s3cret")
        .json(&json!({"url": "http://127.0.0.1:1", "block_size": 16}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("block size"));
    let r = c
        .post(format!("{admin}/v1/workers"))
        .bearer_auth("s3cret")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let list: Value = c
        .get(format!("{admin}/v1/workers"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = list["workers"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    // Each says where it came from: the embedded stack's worker, then the admin API's.
    let mut sources: Vec<&str> = listed
        .iter()
        .map(|w| w["source"].as_str().unwrap())
        .collect();
    sources.sort();
    assert_eq!(sources, ["admin", "static"], "{list}");
    // Round-robin now reaches the new worker.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..4 {
        let (st, w, _) = complete(&c, &s.url(), completion_body(&prompt(i, 50), 1)).await;
        assert_eq!(st, 200);
        seen.insert(w.unwrap());
    }
    assert!(seen.contains(&id), "{seen:?}");

    let r = c
        .delete(format!("{admin}/v1/workers/{id}"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .delete(format!("{admin}/v1/workers/{id}"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    for i in 0..4 {
        let (st, w, _) = complete(&c, &s.url(), completion_body(&prompt(i, 50), 1)).await;
        assert_eq!(st, 200);
        assert_ne!(w, Some(id));
    }
    for w in extra {
        w.stop().await;
    }
    s.stop().await;
}

fn s_mocker() -> kvrouter_mocker::MockerConfig {
    kvrouter_mocker::MockerConfig {
        speedup_ratio: 0.0,
        num_gpu_blocks: 1024,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_leaves_the_routing_set_and_comes_back_when_healthy() {
    let mut s = stack(RouterMode::Kv, 2, |_| {}).await;
    let c = client();
    let tokens = prompt(9, 512);
    let (_, w0, _) = complete(&c, &s.url(), completion_body(&tokens, 1)).await;
    let index = s.frontend.fleet.router.index().clone();
    assert!(eventually(10.0, || index.current_size() >= 8).await);
    let victim = w0.unwrap();
    let port = kill_worker(&mut s, victim).await;
    let fleet = s.frontend.fleet.clone();
    assert!(
        eventually(5.0, || !fleet.registry.get(victim).unwrap().is_healthy()).await,
        "health check missed the dead worker"
    );
    assert!(
        eventually(5.0, || index.find_matches(&[], false).scores.is_empty()
            && index.current_size() == 0)
        .await,
        "its index entries were not cleared"
    );
    // Requests keep working on the survivor.
    for i in 0..3 {
        let (st, w, v) = complete(&c, &s.url(), completion_body(&prompt(20 + i, 100), 1)).await;
        assert_eq!(st, 200, "{v}");
        assert_ne!(w, Some(victim));
    }
    // A worker answering on the same address again is back in the routing set.
    let mut cfg = s_mocker();
    cfg.http_port = port;
    let back = spawn_workers(&cfg, 1)
        .await
        .expect("restart on the same port");
    assert!(
        eventually(5.0, || fleet.registry.get(victim).unwrap().is_healthy()).await,
        "worker never came back"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(fleet
        .router
        .ranks()
        .iter()
        .any(|(w, _)| w.worker.worker_id == victim));
    for w in back {
        w.stop().await;
    }
    s.stop().await;
}
