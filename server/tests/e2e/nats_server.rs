//! A real NATS server with JetStream (Debian's `nats-server`), started by a test on a free
//! loopback port with its store in a temporary directory, restartable on the same port and
//! store, and stopped on drop.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
}

impl NatsServer {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kvrouter-nats-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self {
            child: None,
            dir,
            port,
        };
        s.child = Some(spawn(&s.dir, port));
        s.wait_up();
        s
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kill the server (SIGKILL: no graceful shutdown, as a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(&self.dir, self.port));
        self.wait_up();
    }

    fn wait_up(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nats-server did not start on port {}", self.port);
    }
}

fn spawn(dir: &Path, port: u16) -> Child {
    let bin = std::env::var("KVROUTER_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start `{bin}` ({e}): install Debian's nats-server (scripts/test does)")
        })
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
