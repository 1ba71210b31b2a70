//! `kvrouter router` flags: the command line of `python -m dynamo.router` (spec §9.1, §9.3) —
//! `--endpoint` and `--router-block-size` required, the `--router-*` family shared with the
//! frontend ([`RouterArgs`]), the same worker sources and health checks ([`FleetArgs`]) — plus
//! the address of its HTTP API.

use std::ffi::OsString;
use std::net::SocketAddr;

use clap::Args;
use kvrouter_core::config::ConfigError;
use kvrouter_core::{RouterConfig, RouterMode};

use crate::config::{bracket, FleetArgs, ListenerArgs, RouterArgs};
use crate::workers::spec::{validate_endpoint_name, MAX_BLOCK_SIZE};

/// Everything `kvrouter router` accepts.
#[derive(Args, Clone, Debug)]
pub struct RouterServiceConfig {
    /// The `namespace.component.endpoint` whose workers this router routes to (workers
    /// register with an `endpoint` field, default `dynamo.backend.generate`; others are
    /// ignored).
    #[arg(long, env = "DYN_ROUTER_ENDPOINT", value_parser = parse_endpoint)]
    pub endpoint: String,
    /// Tokens per KV block: what requests are hashed with. Must match the workers' (a worker
    /// registering another block size is refused); not taken from them.
    #[arg(long, alias = "block-size", env = "DYN_ROUTER_BLOCK_SIZE",
          value_parser = parse_block_size)]
    pub router_block_size: usize,
    /// Address the router's HTTP API listens on (loopback unless told otherwise).
    #[arg(long, env = "KVROUTER_ROUTER_HTTP_HOST", default_value = "127.0.0.1")]
    pub http_host: String,
    /// Port of the router's HTTP API (0 = any free port).
    #[arg(long, env = "KVROUTER_ROUTER_HTTP_PORT", default_value_t = 8090)]
    pub http_port: u16,
    /// The URL others reach this router at, announced in `--discovery-backend` file or etcd
    /// (so that frontends given its endpoint name find it). Default: `http://` and the
    /// listening address, the host name in place of an unspecified one (`0.0.0.0`).
    #[arg(long, env = "KVROUTER_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// The router's flags (the same as `kvrouter frontend`'s).
    #[command(flatten)]
    pub router: RouterArgs,
    /// Where workers come from and how they are watched (as for `kvrouter frontend`).
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Limits of the router API's connections and requests.
    #[command(flatten)]
    pub listener: ListenerArgs,
}

/// This machine's host name (`localhost` if it has none that is UTF-8).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if r == 0 && !h.is_empty() => h.to_string(),
        _ => "localhost".into(),
    }
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    validate_endpoint_name(s).map(|()| s.to_string())
}

fn parse_block_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(b) if (1..=MAX_BLOCK_SIZE).contains(&b) => Ok(b),
        _ => Err(format!("a block size is 1..={MAX_BLOCK_SIZE} tokens")),
    }
}

impl RouterServiceConfig {
    /// The flags' defaults for `endpoint` and `block_size`, whatever the environment says, on
    /// ephemeral ports (tests, embedded use).
    pub fn new(endpoint: &str, block_size: usize) -> Self {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            c: RouterServiceConfig,
        }
        let cmd = P::command().mut_args(|a| a.env(None::<&'static str>));
        let bs = block_size.to_string();
        let m = cmd
            .try_get_matches_from([
                "kvrouter",
                "--endpoint",
                endpoint,
                "--router-block-size",
                &bs,
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut c = P::from_arg_matches(&m)
            .expect("every other flag has a default")
            .c;
        c.http_port = 0;
        c.fleet.admin_port = 0;
        c
    }

    /// The core's configuration: KV mode with these flags. Errors: out-of-range values.
    pub fn router_config(&self) -> Result<RouterConfig, ConfigError> {
        let kv = self.router.kv_config();
        kv.validate()?;
        Ok(RouterConfig {
            mode: RouterMode::Kv,
            kv,
            thresholds: self.router.thresholds(),
            ..Default::default()
        })
    }

    /// The router API's socket address. Errors: an unparsable host.
    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(format!("{}:{}", bracket(&self.http_host), self.http_port).parse()?)
    }

    /// The URL announced in discovery for a router listening on `bound`.
    pub fn advertised_url(&self, bound: SocketAddr) -> String {
        if let Some(u) = &self.advertise_url {
            return u.trim_end_matches('/').to_string();
        }
        if bound.ip().is_unspecified() {
            format!("http://{}:{}", host_name(), bound.port())
        } else {
            format!("http://{bound}")
        }
    }
}

/// Old spellings `kvrouter router` accepts and their current names (spec §9.1, §9.3).
pub const LEGACY_FLAGS: &[(&str, &str)] = &[
    ("--block-size", "--router-block-size"),
    ("--kv-events", "--router-kv-events"),
    ("--no-kv-events", "--no-router-kv-events"),
    (
        "--kv-overlap-score-weight",
        "--router-kv-overlap-score-weight",
    ),
    ("--track-active-blocks", "--router-track-active-blocks"),
    (
        "--no-track-active-blocks",
        "--no-router-track-active-blocks",
    ),
    ("--assume-kv-reuse", "--router-assume-kv-reuse"),
    ("--no-assume-kv-reuse", "--no-router-assume-kv-reuse"),
];

/// The legacy flags used on a command line, as `(old, new)`, for a deprecation warning each.
pub fn legacy_flags_used(
    args: impl IntoIterator<Item = OsString>,
) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    for a in args {
        let Some(a) = a.to_str() else { continue };
        if a == "--" {
            break;
        }
        let name = a.split_once('=').map_or(a, |(n, _)| n);
        if let Some(&pair) = LEGACY_FLAGS.iter().find(|(old, _)| *old == name) {
            if !out.contains(&pair) {
                out.push(pair);
            }
        }
    }
    out
}

/// Log a deprecation warning for each legacy flag on the command line `args`.
pub fn warn_legacy_flags(args: impl IntoIterator<Item = OsString>) {
    for (old, new) in legacy_flags_used(args) {
        tracing::warn!("{old} is deprecated: use {new}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        c: RouterServiceConfig,
    }

    #[test]
    fn the_reference_command_line_parses() {
        let args = [
            "kvrouter",
            "--endpoint",
            "dynamo.prefill.generate",
            "--router-block-size",
            "64",
            "--router-reset-states",
            "--no-router-track-active-blocks",
        ];
        let c = P::try_parse_from(args).unwrap().c;
        assert_eq!(c.endpoint, "dynamo.prefill.generate");
        assert_eq!(c.router_block_size, 64);
        assert!(c.fleet.replicas.router_reset_states);
        assert_eq!(c.http_port, 8090);
        let cfg = c.router_config().unwrap();
        assert_eq!(cfg.mode, RouterMode::Kv);
        assert!(!cfg.kv.router_track_active_blocks);
    }

    #[test]
    fn endpoint_and_block_size_are_required_and_checked() {
        for (args, why) in [
            (&["--router-block-size", "64"][..], "--endpoint"),
            (&["--endpoint", "a.b.c"], "--router-block-size"),
            (
                &["--endpoint", "a.b", "--router-block-size", "64"],
                "namespace.component.endpoint",
            ),
            (&["--endpoint", "a.b.c", "--router-block-size", "0"], "1..="),
        ] {
            let e = P::try_parse_from(std::iter::once("kvrouter").chain(args.iter().copied()))
                .err()
                .unwrap_or_else(|| panic!("{args:?} parsed"))
                .to_string();
            assert!(e.contains(why), "{args:?}: {e}");
        }
    }

    #[test]
    fn legacy_spellings_are_accepted_and_reported() {
        let args = [
            "kvrouter",
            "--endpoint",
            "ns.backend.generate",
            "--block-size=16",
            "--kv-overlap-score-weight",
            "2",
            "--no-track-active-blocks",
            "--no-kv-events",
        ];
        let c = P::try_parse_from(args).unwrap().c;
        assert_eq!(c.router_block_size, 16);
        let kv = c.router_config().unwrap().kv;
        assert_eq!(kv.overlap_score_weight, Some(2.0));
        assert!(!kv.router_track_active_blocks && !kv.use_kv_events);
        let used = legacy_flags_used(args.iter().map(OsString::from));
        assert_eq!(
            used.iter().map(|(old, _)| *old).collect::<Vec<_>>(),
            [
                "--block-size",
                "--kv-overlap-score-weight",
                "--no-track-active-blocks",
                "--no-kv-events"
            ]
        );
        assert!(legacy_flags_used(
            ["kvrouter", "--router-block-size", "16"]
                .iter()
                .map(OsString::from)
        )
        .is_empty());
    }

    #[test]
    fn new_gives_defaults_on_ephemeral_ports() {
        let c = RouterServiceConfig::new("dynamo.prefill.generate", 32);
        assert_eq!((c.http_port, c.fleet.admin_port), (0, 0));
        assert_eq!(c.router.router_temperature, 0.0);
        assert_eq!(c.router_block_size, 32);
    }
}
