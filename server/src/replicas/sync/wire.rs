//! The replica sync message: a JSON batch of booking operations from one router, shaped after
//! the reference's `ActiveSequenceEventBatch` (`dynamo-router-spec.md` §5.1), packed under
//! size bounds on the way out and validated field by field on the way in.
//!
//! ```json
//! {"router_id": "router-a", "epoch": 7, "seq": 12, "events": [
//!   {"request_id": "r1", "worker": {"worker_id": 3, "dp_rank": 0}, "data": {"AddRequest": {
//!     "token_sequence": [..], "local_hashes": [..], "isl": 700, "cached_tokens": 640,
//!     "block_size": 64, "track_active_blocks": true, "assume_kv_reuse": true,
//!     "track_prefill_tokens": true, "expected_prefill_duration": 0.012}}},
//!   {"request_id": "r1", "worker": {"worker_id": 3, "dp_rank": 0}, "data": "MarkPrefillCompleted"},
//!   {"request_id": "r1", "worker": {"worker_id": 3, "dp_rank": 0}, "data": "Free"}]}
//! ```
//!
//! Differences from the reference: `router_id` is per batch (one sender per batch), not per
//! event; `epoch` and `seq` let a receiver notice a sender that restarted or lost operations
//! ([`super::peers`]); an add carries the local block hashes (for the receiver's predicted or
//! approximate index), the cached tokens and the booking options, so the receiver books
//! exactly what the sender booked; `expected_prefill_duration` is in seconds.

use std::borrow::Cow;
use std::time::Duration;

use kvrouter_core::hash::{LocalBlockHash, SequenceHash};
use kvrouter_core::sequences::BookingOptions;
use kvrouter_core::{BookingRecord, BookingTerms, RequestHashes, WorkerWithDpRank};
use serde::{Deserialize, Serialize};

/// Operations per message at most (the reference's `MAX_REPLICA_BATCH_EVENTS`, §5.1).
pub const MAX_BATCH_OPS: usize = 256;
/// A received message larger than this is dropped unread.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// A received message with more operations than this is malformed (senders send ≤ 256).
const MAX_RECEIVED_OPS: usize = 4 * MAX_BATCH_OPS;
/// Longest router id and request id accepted.
pub const MAX_ID_BYTES: usize = 256;
/// Largest prompt accepted in an add (tokens).
const MAX_ISL: u64 = 1 << 24;
/// Longest predicted prefill accepted in an add.
const MAX_PREFILL_SECS: f64 = 3600.0;

/// One operation on a booking, as sent and as received.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// The sender's id of the request (`r<n>`, `x:<caller id>`).
    pub request_id: String,
    pub worker: WorkerWithDpRank,
    pub kind: OpKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    /// Booked as `booking` (its `worker` is the op's), hashes of `block_size`-token blocks.
    Add {
        block_size: usize,
        booking: BookingRecord,
    },
    PrefillComplete,
    Free,
}

/// A decoded message: its sender and operations, each valid or why not.
#[derive(Debug)]
pub struct Batch {
    pub router_id: String,
    pub epoch: u64,
    pub seq: u64,
    pub ops: Vec<Result<Op, Invalid>>,
}

/// Why a message could not be read at all.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a replica sync batch: {0}")]
    Json(String),
    #[error("router id empty, longer than {MAX_ID_BYTES} bytes or not [A-Za-z0-9_.-]")]
    RouterId,
    #[error("more than {MAX_RECEIVED_OPS} operations")]
    TooManyOps,
}

/// Why one operation of a message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid replica sync operation: {0}")]
pub struct Invalid(pub &'static str);

#[derive(Serialize, Deserialize)]
struct WireBatch<'a> {
    #[serde(borrow)]
    router_id: Cow<'a, str>,
    epoch: u64,
    seq: u64,
    events: Vec<WireEvent<'a>>,
}

#[derive(Serialize, Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    worker: WorkerWithDpRank,
    data: WireData<'a>,
}

#[derive(Serialize, Deserialize)]
enum WireData<'a> {
    #[serde(borrow)]
    AddRequest(WireAdd<'a>),
    MarkPrefillCompleted,
    Free,
}

#[derive(Serialize, Deserialize)]
struct WireAdd<'a> {
    token_sequence: Cow<'a, [SequenceHash]>,
    local_hashes: Cow<'a, [LocalBlockHash]>,
    isl: u64,
    cached_tokens: u64,
    block_size: u64,
    track_active_blocks: bool,
    assume_kv_reuse: bool,
    track_prefill_tokens: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expected_prefill_duration: Option<f64>,
}

/// Whether `id` is a usable router id: 1 to [`MAX_ID_BYTES`] bytes of `[A-Za-z0-9_.-]`
/// (so that `peer:<router id>:<request id>` names one peer's request unambiguously).
pub fn valid_router_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// One operation as a JSON event.
pub fn encode_op(op: &Op) -> Vec<u8> {
    let data = match &op.kind {
        OpKind::Add {
            block_size,
            booking: b,
        } => WireData::AddRequest(WireAdd {
            token_sequence: Cow::Borrowed(&b.hashes.sequence),
            local_hashes: Cow::Borrowed(&b.hashes.local),
            isl: b.isl as u64,
            cached_tokens: b.cached_tokens as u64,
            block_size: *block_size as u64,
            track_active_blocks: b.terms.opts.track_active_blocks,
            assume_kv_reuse: b.terms.opts.assume_kv_reuse,
            track_prefill_tokens: b.terms.opts.track_prefill_tokens,
            expected_prefill_duration: b.terms.predicted_prefill.map(|d| d.as_secs_f64()),
        }),
        OpKind::PrefillComplete => WireData::MarkPrefillCompleted,
        OpKind::Free => WireData::Free,
    };
    let ev = WireEvent {
        request_id: Cow::Borrowed(&op.request_id),
        worker: op.worker,
        data,
    };
    // Serializing plain structs of strings, integers, floats and bools to memory cannot fail
    // (a non-finite float becomes `null`).
    serde_json::to_vec(&ev).unwrap_or_default()
}

/// Packs encoded events into messages of at most [`MAX_BATCH_OPS`] events and `max_bytes`
/// bytes, each with the sender's header and the next sequence number.
pub struct Packer {
    /// `{"router_id":"…","epoch":`.
    head: String,
    max_bytes: usize,
}

/// Messages ready to publish (each with its number of events), and how many events did not
/// fit in any.
#[derive(Debug, Default)]
pub struct Packed {
    pub messages: Vec<(Vec<u8>, usize)>,
    pub too_large: usize,
}

impl Packer {
    pub fn new(router_id: &str, max_bytes: usize) -> Self {
        let id = serde_json::to_string(router_id).unwrap_or_default();
        Self {
            head: format!("{{\"router_id\":{id},\"epoch\":"),
            max_bytes,
        }
    }

    /// Messages of `events` (encoded by [`encode_op`]) for `epoch`, numbered from `*seq`
    /// (advanced past them). No events: one empty message (a heartbeat). An event too large
    /// for a message on its own is left out and counted.
    pub fn pack(&self, epoch: u64, seq: &mut u64, events: &[Vec<u8>]) -> Packed {
        let mut out = Packed::default();
        let mut start = self.start(epoch, *seq);
        let mut msg = start.clone();
        let mut n = 0;
        let close = 2; // "]}"
        for ev in events {
            let sep = usize::from(n > 0);
            if n > 0 && (n == MAX_BATCH_OPS || msg.len() + sep + ev.len() + close > self.max_bytes)
            {
                msg.extend_from_slice(b"]}");
                out.messages.push((std::mem::take(&mut msg), n));
                *seq += 1;
                start = self.start(epoch, *seq);
                msg = start.clone();
                n = 0;
            }
            if start.len() + ev.len() + close > self.max_bytes {
                out.too_large += 1;
                continue;
            }
            if n > 0 {
                msg.push(b',');
            }
            msg.extend_from_slice(ev);
            n += 1;
        }
        if n > 0 || out.messages.is_empty() {
            msg.extend_from_slice(b"]}");
            out.messages.push((msg, n));
            *seq += 1;
        }
        out
    }

    fn start(&self, epoch: u64, seq: u64) -> Vec<u8> {
        format!("{}{epoch},\"seq\":{seq},\"events\":[", self.head).into_bytes()
    }
}

/// Read a message. Errors: too large, not a batch (bad JSON, missing fields, an unknown
/// operation), a bad router id, too many operations. Each operation is then validated on its
/// own ([`Invalid`]).
pub fn decode(payload: &[u8]) -> Result<Batch, Malformed> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(Malformed::TooLarge(payload.len()));
    }
    let b: WireBatch<'_> =
        serde_json::from_slice(payload).map_err(|e| Malformed::Json(e.to_string()))?;
    if !valid_router_id(&b.router_id) {
        return Err(Malformed::RouterId);
    }
    if b.events.len() > MAX_RECEIVED_OPS {
        return Err(Malformed::TooManyOps);
    }
    Ok(Batch {
        router_id: b.router_id.into_owned(),
        epoch: b.epoch,
        seq: b.seq,
        ops: b.events.into_iter().map(op_of).collect(),
    })
}

fn op_of(ev: WireEvent<'_>) -> Result<Op, Invalid> {
    if ev.request_id.is_empty() || ev.request_id.len() > MAX_ID_BYTES {
        return Err(Invalid("request_id empty or too long"));
    }
    let kind = match ev.data {
        WireData::MarkPrefillCompleted => OpKind::PrefillComplete,
        WireData::Free => OpKind::Free,
        WireData::AddRequest(a) => {
            if a.block_size == 0 || a.block_size > MAX_ISL {
                return Err(Invalid("block_size out of range"));
            }
            if a.isl == 0 || a.isl > MAX_ISL || a.cached_tokens > a.isl {
                return Err(Invalid("isl or cached_tokens out of range"));
            }
            let blocks = a.isl.div_ceil(a.block_size) as usize;
            if a.token_sequence.len() > blocks || a.local_hashes.len() != a.token_sequence.len() {
                return Err(Invalid("hash lists do not match the prompt"));
            }
            let predicted_prefill = match a.expected_prefill_duration {
                None => None,
                Some(s) if s.is_finite() && (0.0..=MAX_PREFILL_SECS).contains(&s) => {
                    Some(Duration::from_secs_f64(s))
                }
                Some(_) => return Err(Invalid("expected_prefill_duration out of range")),
            };
            OpKind::Add {
                block_size: a.block_size as usize,
                booking: BookingRecord {
                    worker: ev.worker,
                    hashes: RequestHashes {
                        local: a.local_hashes.into_owned(),
                        sequence: a.token_sequence.into_owned(),
                    },
                    isl: a.isl as usize,
                    cached_tokens: a.cached_tokens as usize,
                    terms: BookingTerms {
                        opts: BookingOptions {
                            track_active_blocks: a.track_active_blocks,
                            assume_kv_reuse: a.assume_kv_reuse,
                            track_prefill_tokens: a.track_prefill_tokens,
                        },
                        predicted_prefill,
                    },
                },
            }
        }
    };
    Ok(Op {
        request_id: ev.request_id.into_owned(),
        worker: ev.worker,
        kind,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn add(id: &str, blocks: u64) -> Op {
        let w = WorkerWithDpRank::new(3, 1);
        Op {
            request_id: id.into(),
            worker: w,
            kind: OpKind::Add {
                block_size: 4,
                booking: BookingRecord {
                    worker: w,
                    hashes: RequestHashes {
                        local: (0..blocks).map(LocalBlockHash).collect(),
                        sequence: (0..blocks).map(|i| SequenceHash(u64::MAX - i)).collect(),
                    },
                    isl: blocks as usize * 4 + 2,
                    cached_tokens: 4,
                    terms: BookingTerms {
                        opts: BookingOptions {
                            assume_kv_reuse: false,
                            ..Default::default()
                        },
                        predicted_prefill: Some(Duration::from_millis(250)),
                    },
                },
            },
        }
    }

    fn ops(b: &Batch) -> Vec<Op> {
        b.ops.iter().map(|o| o.clone().unwrap()).collect()
    }

    #[test]
    fn operations_round_trip() {
        let w = WorkerWithDpRank::new(3, 1);
        let sent = vec![
            add("r1", 5),
            Op {
                request_id: "x:caller \"id\"".into(),
                worker: w,
                kind: OpKind::PrefillComplete,
            },
            Op {
                request_id: "r1".into(),
                worker: w,
                kind: OpKind::Free,
            },
        ];
        let events: Vec<_> = sent.iter().map(encode_op).collect();
        let mut seq = 41;
        let packed = Packer::new("router-a", 1 << 20).pack(9, &mut seq, &events);
        assert_eq!((packed.messages.len(), packed.too_large, seq), (1, 0, 42));
        let b = decode(&packed.messages[0].0).unwrap();
        assert_eq!((b.router_id.as_str(), b.epoch, b.seq), ("router-a", 9, 41));
        assert_eq!(ops(&b), sent);
    }

    #[test]
    fn messages_hold_at_most_256_operations_and_max_bytes() {
        let events: Vec<_> = (0..600)
            .map(|i| encode_op(&add(&format!("r{i}"), 1)))
            .collect();
        let mut seq = 0;
        let p = Packer::new("a", 1 << 20).pack(1, &mut seq, &events);
        let sizes: Vec<usize> = p
            .messages
            .iter()
            .map(|(m, n)| {
                assert_eq!(decode(m).unwrap().ops.len(), *n);
                *n
            })
            .collect();
        assert_eq!(sizes, [256, 256, 88]);
        assert_eq!(seq, 3);
        let seqs: Vec<u64> = p
            .messages
            .iter()
            .map(|(m, _)| decode(m).unwrap().seq)
            .collect();
        assert_eq!(seqs, [0, 1, 2]);
        // A byte bound of ~3 events per message; one event too large on its own is dropped.
        let one = events[0].len();
        let mut evs = events[..7].to_vec();
        evs.insert(3, encode_op(&add("huge", 400)));
        let p = Packer::new("a", 60 + 3 * (one + 1)).pack(1, &mut seq, &evs);
        assert_eq!(p.too_large, 1);
        let got: Vec<Vec<String>> = p
            .messages
            .iter()
            .map(|(m, _)| {
                assert!(m.len() <= 60 + 3 * (one + 1));
                ops(&decode(m).unwrap())
                    .into_iter()
                    .map(|o| o.request_id)
                    .collect()
            })
            .collect();
        assert_eq!(
            got,
            [vec!["r0", "r1", "r2"], vec!["r3", "r4", "r5"], vec!["r6"]]
        );
        // No events: a heartbeat.
        let p = Packer::new("a", 1 << 20).pack(1, &mut seq, &[]);
        assert_eq!(p.messages[0].1, 0);
        assert!(decode(&p.messages[0].0).unwrap().ops.is_empty());
    }

    #[test]
    fn hostile_messages_are_refused_without_panicking() {
        for bad in [
            &b""[..],
            b"null",
            b"{\"router_id\":\"a\"}",
            b"{\"router_id\":\"a\",\"epoch\":1,\"seq\":1,\"events\":[{\"request_id\":\"r\",\"worker\":{\"worker_id\":1},\"data\":\"Explode\"}]}",
            b"{\"router_id\":\"a\",\"epoch\":-1,\"seq\":1,\"events\":[]}",
            b"{\"router_id\":\"a:b\",\"epoch\":1,\"seq\":1,\"events\":[]}",
            b"{\"router_id\":\"\",\"epoch\":1,\"seq\":1,\"events\":[]}",
            b"\xff\xfe",
        ] {
            assert!(decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            decode(&vec![b' '; MAX_MESSAGE_BYTES + 1]).unwrap_err(),
            Malformed::TooLarge(MAX_MESSAGE_BYTES + 1)
        );
        let many = format!(
            "{{\"router_id\":\"a\",\"epoch\":1,\"seq\":1,\"events\":[{}]}}",
            vec![
                "{\"request_id\":\"r\",\"worker\":{\"worker_id\":1},\"data\":\"Free\"}";
                MAX_RECEIVED_OPS + 1
            ]
            .join(",")
        );
        assert_eq!(decode(many.as_bytes()).unwrap_err(), Malformed::TooManyOps);
        // Field by field: each bad operation refused on its own, the good one kept.
        let ev = |add: &str| {
            format!(
                "{{\"request_id\":\"r\",\"worker\":{{\"worker_id\":1}},\"data\":{{\"AddRequest\":{{{add}}}}}}}"
            )
        };
        let good = "\"token_sequence\":[1,2],\"local_hashes\":[3,4],\"isl\":9,\"cached_tokens\":0,\"block_size\":4,\"track_active_blocks\":true,\"assume_kv_reuse\":true,\"track_prefill_tokens\":true";
        let evs = [
            ev(good),
            ev(&good.replace("\"isl\":9", "\"isl\":0")),
            ev(&good.replace("\"isl\":9", "\"isl\":99999999999")),
            ev(&good.replace("\"cached_tokens\":0", "\"cached_tokens\":10")),
            ev(&good.replace("\"block_size\":4", "\"block_size\":0")),
            ev(&good.replace("\"isl\":9", "\"isl\":4")),
            ev(&good.replace("[3,4]", "[3]")),
            ev(&format!("{good},\"expected_prefill_duration\":1e300")),
            ev(&format!("{good},\"expected_prefill_duration\":-1")),
            format!(
                "{{\"request_id\":\"{}\",\"worker\":{{\"worker_id\":1}},\"data\":\"Free\"}}",
                "x".repeat(MAX_ID_BYTES + 1)
            ),
        ];
        let msg = format!(
            "{{\"router_id\":\"a\",\"epoch\":1,\"seq\":1,\"events\":[{}]}}",
            evs.join(",")
        );
        let b = decode(msg.as_bytes()).unwrap();
        assert!(b.ops[0].is_ok());
        for (i, o) in b.ops.iter().enumerate().skip(1) {
            assert!(o.is_err(), "event {i} accepted");
        }
    }
}
