//! ZMQ message framing of KV events (`kv-event-wire.md` §2.1).
//!
//! * live message: `[topic, seq: 8-byte big-endian u64, payload]`;
//! * replay request (DEALER → engine ROUTER): `["", start_seq: 8-byte BE]`;
//! * replay reply body after the empty delimiter: vLLM ≤ 0.25 `[seq, payload]`, vLLM ≥ 0.26 and
//!   SGLang `[topic, seq, payload]`; the end marker has seq −1 (`ff×8`) and an empty payload.

/// Why a multipart message is not a KV-event message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not the expected number of frames.
    #[error("expected {expected} frames, got {got}")]
    FrameCount { expected: &'static str, got: usize },
    /// The sequence frame is not 8 bytes.
    #[error("sequence frame has {0} bytes, expected 8")]
    SeqLength(usize),
}

/// The sequence number of a replay end marker (−1 as 8 bytes `ff…ff`).
pub const END_SEQ: u64 = u64::MAX;

/// One live message, borrowing the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMessage<'a> {
    /// Topic frame (the subscription prefix matched it).
    pub topic: &'a [u8],
    /// Publisher sequence number, from 0.
    pub seq: u64,
    /// msgpack `KVEventBatch`.
    pub payload: &'a [u8],
}

fn seq_of(frame: &[u8]) -> Result<u64, FrameError> {
    let b: [u8; 8] = frame
        .try_into()
        .map_err(|_| FrameError::SeqLength(frame.len()))?;
    Ok(u64::from_be_bytes(b))
}

/// Splits a live PUB message `[topic, seq, payload]`.
pub fn split_message<F: AsRef<[u8]>>(frames: &[F]) -> Result<RawMessage<'_>, FrameError> {
    match frames {
        [topic, seq, payload] => Ok(RawMessage {
            topic: topic.as_ref(),
            seq: seq_of(seq.as_ref())?,
            payload: payload.as_ref(),
        }),
        _ => Err(FrameError::FrameCount {
            expected: "3 (topic, seq, payload)",
            got: frames.len(),
        }),
    }
}

/// One replay reply as a DEALER sees it (with or without the leading empty delimiter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayReply<'a> {
    /// One buffered batch.
    Batch { seq: u64, payload: &'a [u8] },
    /// End marker (seq −1): nothing more follows.
    End,
}

/// Parses a replay reply in either layout. The end marker is seq −1 (payload ignored).
pub fn split_replay_reply<F: AsRef<[u8]>>(frames: &[F]) -> Result<ReplayReply<'_>, FrameError> {
    let body = match frames {
        [first, rest @ ..] if first.as_ref().is_empty() && rest.len() >= 2 => rest,
        _ => frames,
    };
    let (seq, payload) = match body {
        [seq, payload] => (seq.as_ref(), payload.as_ref()),
        [_topic, seq, payload] => (seq.as_ref(), payload.as_ref()),
        _ => {
            return Err(FrameError::FrameCount {
                expected: "2 or 3 replay",
                got: frames.len(),
            })
        }
    };
    let seq = seq_of(seq)?;
    Ok(if seq == END_SEQ {
        ReplayReply::End
    } else {
        ReplayReply::Batch { seq, payload }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_frames() {
        let frames = [b"kv".to_vec(), 5u64.to_be_bytes().to_vec(), vec![0x90]];
        let m = split_message(&frames).unwrap();
        assert_eq!((m.topic, m.seq, m.payload), (&b"kv"[..], 5, &[0x90u8][..]));
        assert_eq!(
            split_message(&[b"kv"]),
            Err(FrameError::FrameCount {
                expected: "3 (topic, seq, payload)",
                got: 1
            })
        );
        assert_eq!(
            split_message(&[&b""[..], &[1, 2][..], &[][..]]),
            Err(FrameError::SeqLength(2))
        );
    }

    #[test]
    fn both_replay_layouts_and_end_marker() {
        let s = 3u64.to_be_bytes();
        let ff = [0xffu8; 8];
        let e: &[u8] = b"";
        assert_eq!(
            split_replay_reply(&[e, &s, b"p"]).unwrap(),
            ReplayReply::Batch {
                seq: 3,
                payload: b"p"
            }
        );
        assert_eq!(
            split_replay_reply(&[e, b"t", &s, b"p"]).unwrap(),
            ReplayReply::Batch {
                seq: 3,
                payload: b"p"
            }
        );
        assert_eq!(
            split_replay_reply(&[&s[..], b"p"]).unwrap(),
            ReplayReply::Batch {
                seq: 3,
                payload: b"p"
            }
        );
        assert_eq!(split_replay_reply(&[e, &ff, e]).unwrap(), ReplayReply::End);
        assert_eq!(
            split_replay_reply(&[e, e, &ff, e]).unwrap(),
            ReplayReply::End
        );
        assert!(split_replay_reply(&[e]).is_err());
        assert!(split_replay_reply(&[e, b"a", b"b", b"c", b"d"]).is_err());
    }
}
