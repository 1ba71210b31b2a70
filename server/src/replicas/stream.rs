//! The NATS side shared by relays and routers: connecting, and the endpoint's KV event
//! stream (created by whoever needs it first, with the same settings).

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};

use super::Names;

/// Default age after which the stream drops a message (the reference's 1 h).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);

/// Largest message a router reads from the stream, bytes (a relay's messages are far
/// smaller: a few hundred events). Larger ones are skipped and counted.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Most events a relay puts in one message.
pub const MAX_EVENTS_PER_MESSAGE: usize = 256;

/// The stream's `max_age`: `DYN_NATS_STREAM_MAX_AGE` (seconds) or [`DEFAULT_MAX_AGE`].
pub fn max_age() -> Duration {
    std::env::var("DYN_NATS_STREAM_MAX_AGE")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(DEFAULT_MAX_AGE, Duration::from_secs_f64)
}

/// A client of `url` named `name` that keeps reconnecting forever, also when the server is
/// not up yet at start. Errors: a malformed URL.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|n| Duration::from_millis((50 * n as u64).min(1000)))
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// A JetStream context whose API calls and publish acks time out after 5 s.
pub fn jetstream(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(client)
}

/// The endpoint's KV event stream, created if missing: subjects
/// [`Names::event_subjects`], file storage, [`max_age`]. Errors: NATS unreachable or
/// JetStream disabled.
pub async fn ensure_stream(
    js: &jetstream::Context,
    names: &Names,
) -> anyhow::Result<jetstream::stream::Stream> {
    js.get_or_create_stream(stream::Config {
        name: names.stream(),
        subjects: vec![names.event_subjects()],
        storage: stream::StorageType::File,
        max_age: max_age(),
        ..Default::default()
    })
    .await
    .with_context(|| {
        format!(
            "creating or opening the JetStream stream {}",
            names.stream()
        )
    })
}

/// The worker id of an event subject (`<prefix>.kv_events.<worker_id>`).
pub fn subject_worker(subject: &str) -> Option<u64> {
    subject.rsplit_once('.')?.1.parse().ok()
}

/// A consumer name from a router id: characters NATS does not allow in names become `_`.
pub fn consumer_name(router_id: &str) -> String {
    router_id
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_subjects() {
        assert_eq!(
            subject_worker("namespace.a.component.b.kv_events.42"),
            Some(42)
        );
        assert_eq!(subject_worker("namespace.a.component.b.kv_events.x"), None);
        assert_eq!(consumer_name("router a.b*>"), "router_a_b__");
    }
}
