//! Processes, HTTP helpers and polling shared by the fault tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The model the frontend serves (the vendored tokenizer's).
pub const MODEL: &str = "Qwen/Qwen3-0.6B";
/// Tokens per KV block everywhere in the suite (also the recorded KV-event frames' size).
pub const BLOCK: usize = 16;
/// Hang guard of process start-up.
const START_SECS: f64 = 60.0;

/// One test at a time: each starts several processes on a machine that may have two cores.
/// (An async lock: the guard is held across the test's awaits, and each test has its own
/// runtime.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The `kvrouter` binary under test (`KVROUTER_FAULTS_BIN` overrides it).
pub fn bin() -> PathBuf {
    std::env::var_os("KVROUTER_FAULTS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kvrouter")))
}

/// Python with pyzmq and msgpack (`scripts/test` makes one and sets `KVROUTER_PYTHON`).
pub fn python() -> String {
    std::env::var("KVROUTER_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `$KVROUTER_SHARED`, else `<repo>/../shared`.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("KVROUTER_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

/// A unique path in the temp directory for this test process.
fn temp_path(stem: &str, ext: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "kvrouter-faults-{}-{}-{stem}.{ext}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A file removed when dropped (also when the test panics while it is being used).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A line a child printed: `true` for stdout, `false` for stderr.
type Line = (bool, String);

/// A child process started by a test. Killed (SIGCONT, then SIGKILL) and reaped on drop; a
/// failing test prints the tail of its output.
pub struct Proc {
    pub name: String,
    pub pid: i32,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Line>,
    log: Arc<Mutex<Vec<String>>>,
    reaped: bool,
}

impl Proc {
    /// Spawn `cmd` with stdout and stderr captured (and stdin piped if `stdin`).
    pub fn spawn(name: &str, mut cmd: Command, stdin: bool) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        let pid = child.id() as i32;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = channel();
        let out = child.stdout.take().expect("stdout piped");
        let err = child.stderr.take().expect("stderr piped");
        for (is_out, pipe) in [
            (true, Box::new(out) as Box<dyn std::io::Read + Send>),
            (false, Box::new(err)),
        ] {
            let (tx, log) = (tx.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    {
                        let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                        l.push(format!("{}{line}", if is_out { "[out] " } else { "" }));
                        if l.len() > 20_000 {
                            l.drain(..10_000);
                        }
                    }
                    let _ = tx.send((is_out, line));
                }
            });
        }
        Self {
            name: name.to_string(),
            pid,
            stdin: child.stdin.take(),
            child,
            lines: rx,
            log,
            reaped: false,
        }
    }

    /// Whether it has exited (reaps it if so).
    pub fn exited(&mut self) -> bool {
        if self.reaped {
            return true;
        }
        if let Ok(Some(_)) = self.child.try_wait() {
            self.reaped = true;
        }
        self.reaped
    }

    /// Panics (with its log) unless it is still running.
    pub fn assert_alive(&mut self) {
        if self.exited() {
            panic!(
                "{} (pid {}) exited: {:?}\n{}",
                self.name,
                self.pid,
                self.child.try_wait(),
                self.tail(80)
            );
        }
    }

    /// Send `sig` to it (only while it is ours: not yet reaped, so the pid cannot be reused).
    pub fn signal(&mut self, sig: i32) {
        assert!(!self.exited(), "{} already exited", self.name);
        // SAFETY: kill(2) on the pid of our own unreaped child.
        let r = unsafe { libc::kill(self.pid, sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.pid);
    }

    /// SIGKILL it and reap it.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: as in `signal`; a stopped process must be continued to die promptly.
        unsafe {
            libc::kill(self.pid, libc::SIGCONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// The next line on stdout (`out`) or stderr satisfying `pred`, within `secs`; `None` if
    /// the process closed its output first.
    pub fn wait_line(
        &mut self,
        secs: f64,
        out: bool,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((o, l)) if o == out && pred(&l) => return Some(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no expected line within {secs} s\n{}",
                        self.name,
                        self.tail(80)
                    )
                }
            }
        }
    }

    /// Write one line to its stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin piped");
        writeln!(stdin, "{line}").expect("writing to the child's stdin");
        stdin.flush().expect("flushing the child's stdin");
    }

    /// The last `n` lines it printed.
    pub fn tail(&self, n: usize) -> String {
        let l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let from = l.len().saturating_sub(n);
        format!(
            "--- last {} lines of {} (pid {}) ---\n{}",
            l.len() - from,
            self.name,
            self.pid,
            l[from..].join("\n")
        )
    }

    /// `Threads:` and `VmRSS:` (kB) from `/proc/PID/status`.
    pub fn threads_and_rss_kb(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("reading /proc/PID/status");
        let field = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {k} in /proc/PID/status"))
        };
        (field("Threads:"), field("VmRSS:"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.tail(60));
        }
        self.kill();
    }
}

/// Free TCP ports on 127.0.0.1 (bound then released: a later bind may still race, callers
/// retry).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A `kvrouter mocker` process with one engine: 16-token blocks, 2048 KV blocks, plus `args`.
pub struct Mocker {
    pub proc: Proc,
    /// The JSON line it printed (a valid workers-file entry).
    pub line: Value,
}

impl Mocker {
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::try_start(name, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start one; `Err` (with its log) if it exits before printing its line (e.g. a port in
    /// use).
    pub fn try_start(name: &str, args: &[&str]) -> Result<Self, String> {
        let mut cmd = Command::new(bin());
        cmd.arg("mocker")
            .args(["--block-size", &BLOCK.to_string()])
            .args(["--num-gpu-blocks-override", "2048"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn(name, cmd, false);
        match proc.wait_line(START_SECS, true, |l| l.starts_with('{')) {
            Some(l) => {
                let line: Value = serde_json::from_str(&l).expect("mocker line is JSON");
                Ok(Self { proc, line })
            }
            None => {
                let _ = proc.child.wait();
                proc.reaped = true;
                Err(format!("{name} did not start\n{}", proc.tail(40)))
            }
        }
    }

    pub fn url(&self) -> String {
        self.line["url"].as_str().expect("url").to_string()
    }

    /// Its workers-file entry with `id` set.
    pub fn spec(&self, id: u64) -> Value {
        let mut s = self.line.clone();
        s["id"] = json!(id);
        s
    }
}

/// What came back from a non-streamed request.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// `x-kvrouter-worker-id`.
    pub worker: Option<u64>,
    pub body: Value,
}

impl Reply {
    /// `usage.prompt_tokens_details.cached_tokens` (the engine's prefix-cache hit).
    pub fn cached(&self) -> u64 {
        self.body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
    }
}

/// A `kvrouter frontend` process (kv mode, ephemeral ports) with a workers file.
pub struct Frontend {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT` of the OpenAI API.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin API.
    pub admin: String,
    pub http: reqwest::Client,
    token: Option<String>,
    _file: TempFile,
}

/// An HTTP client for 127.0.0.1 only (no proxy from the environment).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

impl Frontend {
    pub fn start(workers: &[Value], args: &[&str]) -> Self {
        Self::start_with(workers, args, None)
    }

    /// Start one in front of `workers` with `args`; `nofile`: its descriptor limit (soft and
    /// hard), set before exec.
    pub fn start_with(workers: &[Value], args: &[&str], nofile: Option<u64>) -> Self {
        let file = TempFile(temp_path("workers", "jsonl"));
        let text: String = workers.iter().map(|w| format!("{w}\n")).collect();
        std::fs::write(&file.0, text).expect("writing the workers file");
        let mut cmd = Command::new(bin());
        cmd.arg("frontend")
            .args(["--router-mode", "kv"])
            // Loopback only, whatever the binary's defaults.
            .args(["--http-host", "127.0.0.1", "--http-port", "0"])
            .args(["--admin-host", "127.0.0.1", "--admin-port", "0"])
            .arg("--workers-file")
            .arg(&file.0)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        // Flags come from the test only, not from the shell it runs in.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("DYN_") || k.starts_with("KVROUTER_") {
                cmd.env_remove(&*k);
            }
        }
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut proc = Proc::spawn("frontend", cmd, false);
        let serving = proc
            .wait_line(START_SECS, false, |l| {
                l.starts_with("kvrouter frontend: serving")
            })
            .unwrap_or_else(|| panic!("frontend did not start (its log follows)"));
        let url = serving
            .rsplit(" on ")
            .next()
            .expect("serving line names the URL")
            .trim()
            .to_string();
        let admin_line = proc
            .wait_line(START_SECS, false, |l| {
                l.starts_with("kvrouter frontend: admin API on")
            })
            .unwrap_or_else(|| panic!("frontend did not start its admin API (its log follows)"));
        let admin = admin_line
            .rsplit(" on ")
            .next()
            .expect("admin line names the URL")
            .trim()
            .trim_end_matches("/v1/workers")
            .to_string();
        assert!(
            url.starts_with("http://127.0.0.1:") && admin.starts_with("http://127.0.0.1:"),
            "{url} {admin}"
        );
        let token = args
            .iter()
            .position(|a| *a == "--admin-token")
            .map(|i| args[i + 1].to_string());
        Self {
            proc,
            url,
            admin,
            http: client(),
            token,
            _file: file,
        }
    }

    /// `host:port` of the OpenAI API.
    pub fn api_addr(&self) -> std::net::SocketAddr {
        self.url
            .trim_start_matches("http://")
            .parse()
            .expect("api address")
    }

    /// A non-streamed `/v1/completions` (hang guard 60 s).
    pub async fn complete(&self, body: Value) -> Reply {
        let r = self
            .http
            .post(format!("{}/v1/completions", self.url))
            .json(&body)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap_or_else(|e| panic!("completion request failed: {e}\n{}", self.proc.tail(40)));
        let status = r.status().as_u16();
        let worker = worker_header(&r);
        let body = r.json::<Value>().await.unwrap_or(Value::Null);
        Reply {
            status,
            worker,
            body,
        }
    }

    /// A completion that must succeed: its reply.
    pub async fn complete_ok(&self, body: Value) -> Reply {
        let r = self.complete(body).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", self.proc.tail(40));
        r
    }

    /// A streamed `/v1/completions` (`stream: true` is set), once its response head is in.
    pub async fn stream(&self, mut body: Value) -> Sse {
        body["stream"] = json!(true);
        let r = self
            .http
            .post(format!("{}/v1/completions", self.url))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("stream request failed: {e}"));
        assert_eq!(r.status().as_u16(), 200, "stream refused: {r:?}");
        Sse {
            worker: worker_header(&r),
            resp: r,
            buf: Vec::new(),
            events: Vec::new(),
            ended: false,
        }
    }

    /// `GET /metrics` (hang guard 30 s).
    pub async fn metrics(&self) -> Prom {
        let r = self
            .http
            .get(format!("{}/metrics", self.url))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /metrics failed: {e}"));
        assert_eq!(r.status().as_u16(), 200, "GET /metrics");
        Prom::parse(&r.text().await.expect("metrics text"))
    }

    /// An admin API request with the bearer token, if the frontend has one.
    pub fn admin_req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let b = self
            .http
            .request(method, format!("{}{path}", self.admin))
            .timeout(Duration::from_secs(30));
        match &self.token {
            Some(t) => b.bearer_auth(t),
            None => b,
        }
    }

    /// `GET /v1/workers` on the admin API: the workers by id.
    pub async fn workers(&self) -> BTreeMap<u64, Value> {
        let r = self
            .admin_req(reqwest::Method::GET, "/v1/workers")
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /v1/workers failed: {e}\n{}", self.proc.tail(40)));
        assert_eq!(r.status().as_u16(), 200, "GET /v1/workers");
        let v: Value = r.json().await.expect("workers JSON");
        v["workers"]
            .as_array()
            .expect("workers array")
            .iter()
            .map(|w| (w["spec"]["id"].as_u64().expect("worker id"), w.clone()))
            .collect()
    }

    /// One worker's admin entry.
    pub async fn worker(&self, id: u64) -> Value {
        self.workers()
            .await
            .remove(&id)
            .unwrap_or_else(|| panic!("worker {id} is not listed"))
    }

    /// Asserts that no rank of any worker has anything booked.
    pub async fn assert_no_bookings(&self) {
        let ws = self.workers().await;
        for (id, w) in &ws {
            for r in w["ranks"].as_array().expect("ranks") {
                let booked: Vec<u64> = [
                    "active_requests",
                    "active_decode_blocks",
                    "active_prefill_tokens",
                ]
                .iter()
                .map(|k| r[*k].as_u64().unwrap_or(u64::MAX))
                .collect();
                assert_eq!(booked, [0, 0, 0], "worker {id} rank still booked: {r}");
            }
        }
    }

    /// `kvrouter_kv_index_entries`.
    pub async fn index_entries(&self) -> u64 {
        self.metrics().await.get("kvrouter_kv_index_entries", &[]) as u64
    }

    /// `kvrouter_router_predicted_cached_tokens_total`.
    pub async fn predicted(&self) -> u64 {
        self.metrics()
            .await
            .get("kvrouter_router_predicted_cached_tokens_total", &[]) as u64
    }
}

fn worker_header(r: &reqwest::Response) -> Option<u64> {
    r.headers()
        .get("x-kvrouter-worker-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A worker's health (`healthy` | `suspect` | `removed`) from its admin entry.
pub fn health(w: &Value) -> String {
    w["health"].as_str().unwrap_or("?").to_string()
}

/// Rank 0's booked requests from an admin entry.
pub fn active_requests(w: &Value) -> u64 {
    w["ranks"][0]["active_requests"].as_u64().unwrap_or(0)
}

/// Rank 0's KV event subscriber (every counter and its `state`) from an admin entry.
pub fn events(w: &Value) -> &Value {
    &w["ranks"][0]["kv_events"]
}

/// Rank 0's KV event counter `k`.
pub fn counter(w: &Value, k: &str) -> u64 {
    events(w)[k]
        .as_u64()
        .unwrap_or_else(|| panic!("no kv_events counter {k:?} in {}", w["ranks"][0]))
}

/// A completion body: `tokens` as the prompt, `max_tokens`, pinned to `worker` if given.
pub fn body(tokens: &[u32], max_tokens: u32, worker: Option<u64>) -> Value {
    let mut b = json!({"model": MODEL, "prompt": tokens, "max_tokens": max_tokens});
    if let Some(w) = worker {
        b["nvext"] = json!({"backend_instance_id": w});
    }
    b
}

/// `n` token ids, distinct from the first one for distinct seeds.
pub fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1000 + (seed.wrapping_mul(7919).wrapping_add(i * 104_729)) % 100_000)
        .collect()
}

/// Tokens of the full blocks of an `n`-token prompt (what an engine can have cached).
pub fn full_blocks(n: usize) -> u64 {
    (n / BLOCK * BLOCK) as u64
}

/// A streamed response being read.
pub struct Sse {
    resp: reqwest::Response,
    buf: Vec<u8>,
    /// Every `data:` payload read so far.
    pub events: Vec<String>,
    /// `x-kvrouter-worker-id`.
    pub worker: Option<u64>,
    ended: bool,
}

impl Sse {
    /// The next `data:` payload, or `None` at the end of the body (or a broken body); panics
    /// if nothing comes within `secs` (hang guard).
    pub async fn next(&mut self, secs: f64) -> Option<String> {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.buf.drain(..i + 2).collect();
                let text = String::from_utf8_lossy(&ev);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                let d = data.join("\n");
                self.events.push(d.clone());
                return Some(d);
            }
            if self.ended {
                return None;
            }
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(b))) => self.buf.extend_from_slice(&b),
                Ok(Ok(None)) | Ok(Err(_)) => self.ended = true,
                Err(_) => panic!(
                    "stream: nothing within {secs} s (a hang); events so far: {:?}",
                    self.events
                ),
            }
        }
    }

    /// Reads until a chunk with generated text arrives (the request is running on the worker).
    pub async fn first_token(&mut self, secs: f64) {
        loop {
            let ev = self
                .next(secs)
                .await
                .expect("stream ended before its first token");
            let v: Value = serde_json::from_str(&ev).unwrap_or(Value::Null);
            assert!(
                v.get("error").is_none(),
                "error before the first token: {ev}"
            );
            // The frontend sends a chunk per generated token (its text may be empty: mock
            // workers without a tokenizer have none) and one with the finish reason.
            let choice = &v["choices"][0];
            assert!(
                choice["finish_reason"].is_null(),
                "the stream finished before it could be faulted: {ev}"
            );
            if choice.is_object() {
                return;
            }
        }
    }

    /// Reads to the end (hang guard `secs` per event); returns the events read now.
    pub async fn rest(&mut self, secs: f64) -> Vec<String> {
        let from = self.events.len();
        let end = Instant::now() + Duration::from_secs_f64(secs * 20.0);
        while self.next(secs).await.is_some() {
            assert!(Instant::now() < end, "stream never ends (a hang)");
        }
        self.events[from..].to_vec()
    }
}

/// A parsed Prometheus text exposition.
#[derive(Debug, Default)]
pub struct Prom {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Prom {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let mut map = BTreeMap::new();
            for kv in labels.split(',').filter(|s| !s.is_empty()) {
                if let Some((k, v)) = kv.split_once('=') {
                    map.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
                }
            }
            samples.push((name.to_string(), map, value));
        }
        Self { samples }
    }

    /// The sum of the samples of `name` whose labels include `labels` (0 if none).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// Polls `f` every 50 ms until it returns `Ok`, for at most `secs` (a hang guard); `Err`
/// carries the last observation for the failure message.
pub async fn poll<T, F, Fut>(what: &str, secs: f64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let end = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() > end {
                    panic!("timed out after {secs} s waiting for {what}; last seen: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until worker `id`'s health is `want`.
pub async fn until_health(fe: &Frontend, id: u64, want: &str, secs: f64) -> Value {
    poll(&format!("worker {id} {want}"), secs, || async move {
        let w = fe.worker(id).await;
        if health(&w) == want {
            Ok(w)
        } else {
            Err(format!(
                "{} ({} failures)",
                health(&w),
                w["consecutive_failures"]
            ))
        }
    })
    .await
}

/// Waits until `kvrouter_kv_index_entries` is `want`.
pub async fn until_entries(fe: &Frontend, want: u64, secs: f64) {
    poll(&format!("{want} index entries"), secs, || async move {
        let n = fe.index_entries().await;
        if n == want {
            Ok(())
        } else {
            Err(format!("{n} entries"))
        }
    })
    .await
}

/// A pinned completion with the router's prediction for it: `(predicted cached tokens,
/// the worker's reported cached tokens, reply)`. Nothing else may be routed meanwhile.
pub async fn predicted_and_cached(fe: &Frontend, tokens: &[u32], worker: u64) -> (u64, u64, Reply) {
    let before = fe.predicted().await;
    let r = fe.complete_ok(body(tokens, 2, Some(worker))).await;
    let after = fe.predicted().await;
    assert_eq!(r.worker, Some(worker), "{r:?}");
    (after - before, r.cached(), r)
}

/// The pyzmq KV-event publisher of the wire tests (`wire/tests/py/kv_pub.py`), sending the
/// recorded vLLM 0.33 frames of `shared-prefix.jsonl` (16-token blocks), with a replay ROUTER.
pub struct PyPub {
    pub proc: Proc,
    pub endpoint: String,
    pub replay: String,
}

impl PyPub {
    pub fn start() -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../wire/tests/py/kv_pub.py");
        let file = shared_dir().join("data/kv-events/vllm-0.33.0/shared-prefix.jsonl");
        assert!(file.exists(), "recorded frames missing: {}", file.display());
        let mut cmd = Command::new(python());
        cmd.arg(script)
            .args([
                "--pub",
                "tcp://127.0.0.1:*",
                "--replay",
                "tcp://127.0.0.1:*",
            ])
            .arg(&file);
        let mut proc = Proc::spawn("kv_pub.py", cmd, true);
        let hello = proc
            .wait_line(START_SECS, true, |l| l.starts_with('{'))
            .unwrap_or_else(|| {
                panic!("kv_pub.py did not start (pyzmq and msgpack missing? run scripts/test)")
            });
        let v: Value = serde_json::from_str(&hello).expect("kv_pub.py hello line");
        Self {
            endpoint: v["endpoint"].as_str().expect("endpoint").to_string(),
            replay: v["replay"].as_str().expect("replay").to_string(),
            proc,
        }
    }

    /// Runs one command; returns the publisher's next sequence number.
    pub fn cmd(&mut self, c: &str) -> u64 {
        self.proc.send_line(c);
        let reply = self
            .proc
            .wait_line(30.0, true, |l| l.starts_with("ok "))
            .unwrap_or_else(|| panic!("kv_pub.py exited on {c:?}\n{}", self.proc.tail(40)));
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("ok <next_seq> <cursor>")
    }
}

impl Drop for PyPub {
    fn drop(&mut self) {
        let _ = self.proc.stdin.as_mut().map(|s| writeln!(s, "quit"));
        self.proc.kill();
    }
}
