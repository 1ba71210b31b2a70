pub mod bench;
pub mod doctor;
pub mod events;
pub mod frontend;
pub mod hash;
pub mod mocker;
pub mod register;
pub mod relay;
pub mod replay;
pub mod router;
pub mod up;
pub mod worker_args;

/// Log to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub use kvrouter_mocker::cli::shutdown_signal;
