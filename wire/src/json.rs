//! Canonical JSON lines of [`RouterEvent`]s (`dynamo-router-spec.md` §3.1): one event per line,
//! `{"worker_id":7,"storage_tier":"device","event":{"event_id":0,"data":{"stored":{...}},"dp_rank":0}}`.
//! The shape is the serde derive of `kvrouter_core::event`; these helpers only frame it.
//!
//! [`parse_kv_cache_event`] reads one `KvCacheEvent` (the event without its worker, as Dynamo's
//! `RadixTree.apply_event` takes it) with a fast path for the shapes publishers write and
//! serde_json for everything else, so that what it accepts and the errors it gives are
//! serde's.

use std::io::{BufRead, Write};

use kvrouter_core::event::{KvCacheEvent, RouterEvent};

use crate::WireError;

/// One event as a single JSON line (no trailing newline).
pub fn to_json_line(ev: &RouterEvent) -> String {
    // Serialising these plain structs cannot fail (no maps with non-string keys, no floats).
    serde_json::to_string(ev).unwrap_or_default()
}

/// Parses one JSON line; unknown fields (e.g. `residency_domain`) are ignored.
pub fn from_json_line(line: &str) -> Result<RouterEvent, WireError> {
    Ok(serde_json::from_str(line.trim())?)
}

/// Writes events as JSON lines.
pub fn write_json_lines<'a, W: Write>(
    mut w: W,
    events: impl IntoIterator<Item = &'a RouterEvent>,
) -> std::io::Result<()> {
    for ev in events {
        serde_json::to_writer(&mut w, ev)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// Events as one JSON array of the same canonical objects (a message of the NATS event plane:
/// consecutive events of one worker rank).
pub fn to_json_array(events: &[RouterEvent]) -> Vec<u8> {
    // As `to_json_line`: these plain structs always serialise.
    serde_json::to_vec(events).unwrap_or_default()
}

/// Parses a JSON array of events (as [`to_json_array`] writes). Errors: anything else.
pub fn from_json_array(bytes: &[u8]) -> Result<Vec<RouterEvent>, WireError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// Reads JSON lines (blank lines skipped). Errors carry the 1-based line number.
pub fn read_json_lines<R: BufRead>(r: R) -> Result<Vec<RouterEvent>, WireError> {
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(from_json_line(&line).map_err(|e| WireError::Line {
            line: i + 1,
            source: Box::new(e),
        })?);
    }
    Ok(out)
}

/// Parses one JSON `KvCacheEvent` (`{"event_id", "data", "dp_rank"}`), exactly as
/// `serde_json::from_slice` would, faster for plain input.
///
/// The fast path takes objects with only the known keys (each once, in any order, any JSON
/// whitespace), keys without escapes, unsigned integers, `null`s, `"cleared"` and
/// `mm_extra_info: null`; on anything else (escapes, unknown or repeated keys, multimodal
/// infos, floats, malformed input) it gives up and serde_json parses the whole input.
pub fn parse_kv_cache_event(json: &[u8]) -> Result<KvCacheEvent, serde_json::Error> {
    match fast::kv_cache_event(json) {
        Some(ev) => Ok(ev),
        None => serde_json::from_slice(json),
    }
}

/// The fast path of [`parse_kv_cache_event`]: `None` means "let serde_json decide".
mod fast {
    use kvrouter_core::event::{
        KvCacheEvent, KvCacheEventData, RemovedData, StoredBlock, StoredData,
    };
    use kvrouter_core::hash::{ExternalHash, LocalBlockHash};

    pub fn kv_cache_event(b: &[u8]) -> Option<KvCacheEvent> {
        let mut p = Parser { b, i: 0 };
        let (mut event_id, mut data, mut dp_rank) = (None, None, None);
        p.object(|p, key| match key {
            b"event_id" if event_id.is_none() => {
                event_id = Some(p.u64()?);
                Some(())
            }
            b"data" if data.is_none() => {
                data = Some(p.data()?);
                Some(())
            }
            b"dp_rank" if dp_rank.is_none() => {
                dp_rank = Some(u32::try_from(p.u64()?).ok()?);
                Some(())
            }
            _ => None,
        })?;
        p.ws();
        if p.i != b.len() {
            return None;
        }
        Some(KvCacheEvent {
            event_id: event_id?,
            data: data?,
            dp_rank: dp_rank.unwrap_or(0),
        })
    }

    struct Parser<'a> {
        b: &'a [u8],
        i: usize,
    }

    /// The value of eight ASCII digits, or None if any byte is not a digit (SWAR, as simdjson's
    /// `parse_eight_digits_unrolled`).
    #[inline]
    fn eight_digits(bytes: &[u8]) -> Option<u64> {
        let chunk = u64::from_le_bytes(bytes.try_into().ok()?);
        let low = chunk.wrapping_sub(0x3030_3030_3030_3030);
        // Every byte in '0'..='9': its high nibble is 3 and adding 6 does not carry into it.
        let digits = (chunk & 0xF0F0_F0F0_F0F0_F0F0) == 0x3030_3030_3030_3030
            && (chunk.wrapping_add(0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0)
                == 0x3030_3030_3030_3030;
        if !digits {
            return None;
        }
        let v = (low.wrapping_mul(10)).wrapping_add(low >> 8);
        let v = ((v & 0x0000_00FF_0000_00FF).wrapping_mul(100 + (1_000_000 << 32))
            + ((v >> 16) & 0x0000_00FF_0000_00FF).wrapping_mul(1 + (10_000 << 32)))
            >> 32;
        Some(v)
    }

    impl<'a> Parser<'a> {
        fn ws(&mut self) {
            while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
                self.i += 1;
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.b.get(self.i).copied()
        }

        fn eat(&mut self, c: u8) -> Option<()> {
            (self.peek()? == c).then(|| self.i += 1)
        }

        fn literal(&mut self, lit: &[u8]) -> Option<()> {
            self.ws();
            let end = self.i + lit.len();
            (self.b.get(self.i..end)? == lit).then(|| self.i = end)
        }

        /// A string without escapes or control characters.
        fn string(&mut self) -> Option<&'a [u8]> {
            self.eat(b'"')?;
            let rest = &self.b[self.i..];
            let len = rest
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
            if rest[len] != b'"' {
                return None;
            }
            self.i += len + 1;
            Some(&rest[..len])
        }

        /// An unsigned integer in JSON syntax (no sign, fraction, exponent or leading zero).
        fn u64(&mut self) -> Option<u64> {
            self.ws();
            let rest = &self.b[self.i..];
            // Eight digits at a time while they last, then one at a time; 19 digits cannot
            // overflow, a 20th is checked.
            let mut v: u64 = 0;
            let mut n = 0;
            while n + 8 <= 16 {
                match rest.get(n..n + 8).and_then(eight_digits) {
                    Some(d) => {
                        v = v * 100_000_000 + d;
                        n += 8;
                    }
                    None => break,
                }
            }
            while let Some(&c) = rest.get(n) {
                let d = c.wrapping_sub(b'0');
                if d > 9 {
                    break;
                }
                if n >= 19 {
                    if n > 19 {
                        return None;
                    }
                    v = v.checked_mul(10)?.checked_add(u64::from(d))?;
                } else {
                    v = v * 10 + u64::from(d);
                }
                n += 1;
            }
            if n == 0 || (n > 1 && rest[0] == b'0') {
                return None;
            }
            if matches!(rest.get(n), Some(b'.' | b'e' | b'E')) {
                return None;
            }
            self.i += n;
            Some(v)
        }

        fn opt_u64(&mut self) -> Option<Option<u64>> {
            if self.peek()? == b'n' {
                self.literal(b"null")?;
                return Some(None);
            }
            self.u64().map(Some)
        }

        /// `{ "key": value, ... }`, each value read by `member`.
        fn object(&mut self, mut member: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
            self.eat(b'{')?;
            if self.peek()? == b'}' {
                self.i += 1;
                return Some(());
            }
            loop {
                let key = self.string()?;
                self.eat(b':')?;
                member(self, key)?;
                match self.peek()? {
                    b',' => self.i += 1,
                    b'}' => {
                        self.i += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        /// `[ value, ... ]`, each value read by `item`.
        fn array<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
            self.eat(b'[')?;
            let mut out = Vec::new();
            if self.peek()? == b']' {
                self.i += 1;
                return Some(out);
            }
            loop {
                out.push(item(self)?);
                match self.peek()? {
                    b',' => self.i += 1,
                    b']' => {
                        self.i += 1;
                        return Some(out);
                    }
                    _ => return None,
                }
            }
        }

        /// `"cleared"`, `{"stored": {...}}` or `{"removed": {...}}`.
        fn data(&mut self) -> Option<KvCacheEventData> {
            if self.peek()? == b'"' {
                return (self.string()? == b"cleared").then_some(KvCacheEventData::Cleared);
            }
            let mut data = None;
            self.object(|p, key| {
                if data.is_some() {
                    return None;
                }
                data = Some(match key {
                    b"stored" => KvCacheEventData::Stored(p.stored()?),
                    b"removed" => KvCacheEventData::Removed(p.removed()?),
                    _ => return None,
                });
                Some(())
            })?;
            data
        }

        fn stored(&mut self) -> Option<StoredData> {
            let (mut parent, mut start, mut blocks) = (None, None, None);
            self.object(|p, key| {
                match key {
                    b"parent_hash" if parent.is_none() => parent = Some(p.opt_u64()?),
                    b"start_position" if start.is_none() => {
                        start = Some(match p.opt_u64()? {
                            Some(v) => Some(u32::try_from(v).ok()?),
                            None => None,
                        })
                    }
                    b"blocks" if blocks.is_none() => blocks = Some(p.array(Self::block)?),
                    _ => return None,
                }
                Some(())
            })?;
            Some(StoredData {
                parent_hash: parent.flatten().map(ExternalHash),
                start_position: start.flatten(),
                blocks: blocks?,
            })
        }

        fn block(&mut self) -> Option<StoredBlock> {
            let (mut block_hash, mut tokens_hash, mut mm) = (None, None, false);
            self.object(|p, key| {
                match key {
                    b"block_hash" if block_hash.is_none() => block_hash = Some(p.u64()?),
                    b"tokens_hash" if tokens_hash.is_none() => tokens_hash = Some(p.u64()?),
                    b"mm_extra_info" if !mm => {
                        p.literal(b"null")?;
                        mm = true;
                    }
                    _ => return None,
                }
                Some(())
            })?;
            Some(StoredBlock {
                block_hash: ExternalHash(block_hash?),
                tokens_hash: LocalBlockHash(tokens_hash?),
                mm_extra_info: None,
            })
        }

        fn removed(&mut self) -> Option<RemovedData> {
            let mut hashes = None;
            self.object(|p, key| match key {
                b"block_hashes" if hashes.is_none() => {
                    hashes = Some(p.array(|p| p.u64().map(ExternalHash))?);
                    Some(())
                }
                _ => None,
            })?;
            Some(RemovedData {
                block_hashes: hashes?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter_core::event::{KvCacheEventData, RemovedData, WorkerWithDpRank};
    use kvrouter_core::hash::ExternalHash;

    #[test]
    fn round_trip_and_exact_shape() {
        let evs = vec![
            RouterEvent::new(WorkerWithDpRank::new(3, 1), 4, KvCacheEventData::Cleared),
            RouterEvent::new(
                WorkerWithDpRank::new(3, 1),
                5,
                KvCacheEventData::Removed(RemovedData {
                    block_hashes: vec![ExternalHash(u64::MAX)],
                }),
            ),
        ];
        assert_eq!(
            to_json_line(&evs[0]),
            r#"{"worker_id":3,"storage_tier":"device","event":{"event_id":4,"data":"cleared","dp_rank":1}}"#
        );
        assert_eq!(
            to_json_line(&evs[1]),
            r#"{"worker_id":3,"storage_tier":"device","event":{"event_id":5,"data":{"removed":{"block_hashes":[18446744073709551615]}},"dp_rank":1}}"#
        );
        let mut buf = Vec::new();
        write_json_lines(&mut buf, &evs).unwrap();
        assert_eq!(read_json_lines(&buf[..]).unwrap(), evs);
        let err = read_json_lines(&b"\n{\"worker_id\":1}\n"[..]).unwrap_err();
        assert!(matches!(err, WireError::Line { line: 2, .. }), "{err}");
    }

    /// What serde_json says, and what the fast path says when it answers.
    fn check(json: &str) {
        let serde: Result<KvCacheEvent, _> = serde_json::from_str(json);
        if let Some(ev) = fast::kv_cache_event(json.as_bytes()) {
            assert_eq!(serde.as_ref().ok(), Some(&ev), "{json}");
        }
        let ours = parse_kv_cache_event(json.as_bytes());
        assert_eq!(ours.is_ok(), serde.is_ok(), "{json}");
        if let (Ok(a), Ok(b)) = (ours, serde) {
            assert_eq!(a, b, "{json}");
        }
    }

    #[test]
    fn kv_cache_event_fast_path_agrees_with_serde() {
        let fast_ok = [
            r#"{"event_id":0,"data":"cleared","dp_rank":0}"#,
            r#"{"event_id": 5, "data": {"removed": {"block_hashes": [1, 18446744073709551615]}}, "dp_rank": 3}"#,
            r#" { "dp_rank" : 1 ,"data":{"stored":{"blocks":[{"tokens_hash":2,"block_hash":1,"mm_extra_info":null}],"parent_hash":null,"start_position":7}},"event_id":9 } "#,
            r#"{"event_id":1,"data":{"stored":{"parent_hash":4,"blocks":[]}}}"#,
            r#"{"event_id":1,"data":{"removed":{"block_hashes":[]}}}"#,
        ];
        for j in fast_ok {
            assert!(fast::kv_cache_event(j.as_bytes()).is_some(), "{j}");
            check(j);
        }
        let to_serde = [
            r#"{"event_id":1,"data":"cleared","extra":{"a":[1,2]}}"#,
            r#"{"event_id":1,"data":"clea\u0072ed"}"#,
            r#"{"event_id":1,"data":{"stored":{"parent_hash":null,"blocks":[{"block_hash":1,"tokens_hash":2,"mm_extra_info":{"mm_objects":[{"mm_hash":3,"offsets":[[0,1]]}]}}]}}}"#,
            r#"{"event_id":1.0,"data":"cleared"}"#,
            r#"{"event_id":-1,"data":"cleared"}"#,
            r#"{"event_id":01,"data":"cleared"}"#,
            r#"{"event_id":18446744073709551616,"data":"cleared"}"#,
            r#"{"event_id":1,"event_id":2,"data":"cleared"}"#,
            r#"{"event_id":1,"data":"cleared",}"#,
            r#"{"event_id":1,"data":"cleared"} x"#,
            r#"{"event_id":1,"data":{"removed":{"block_hashes":[1,]}}}"#,
            r#"{"event_id":1,"data":{"removed":{"block_hashes":[1]},"stored":{"blocks":[]}}}"#,
            r#"{"event_id":1,"data":{"stored":{"parent_hash":null}}}"#,
            r#"{"event_id":1,"dp_rank":4294967296,"data":"cleared"}"#,
            r#"{"event_id":1}"#,
            r#"{"data":"cleared"}"#,
            r#"{"event_id":1,"data":"exploded"}"#,
            "",
            "{",
            "[]",
        ];
        for j in to_serde {
            assert!(fast::kv_cache_event(j.as_bytes()).is_none(), "{j}");
            check(j);
        }
        // Integers of every length, around the eight-digit chunks and the u64 limit.
        let mut numbers: Vec<String> = (0..=20).map(|n| "9".repeat(n)).collect();
        numbers.extend((1..=20).map(|n| format!("1{}", "0".repeat(n - 1))));
        numbers.extend(
            [
                "0",
                "00",
                "12345678",
                "123456780",
                "1234567812345678",
                "18446744073709551615",
            ]
            .map(String::from),
        );
        numbers.extend(
            [
                "18446744073709551616",
                "18446744073709551620",
                "99999999999999999999",
            ]
            .map(String::from),
        );
        for n in &numbers {
            check(&format!(
                r#"{{"event_id":{n},"data":{{"removed":{{"block_hashes":[{n},{n}]}}}}}}"#
            ));
        }
        let ev = fast::kv_cache_event(br#"{"event_id":18446744073709551615,"data":"cleared"}"#);
        assert_eq!(ev.map(|e| e.event_id), Some(u64::MAX));
    }

    proptest::proptest! {
        /// Generated events in any key order and spacing, then byte-level damage: the fast path
        /// never disagrees with serde_json.
        #[test]
        fn kv_cache_event_fast_path_never_disagrees(
            kind in 0u8..3,
            event_id in proptest::num::u64::ANY,
            dp_rank in proptest::option::of(0u32..4),
            parent in proptest::option::of(proptest::option::of(proptest::num::u64::ANY)),
            hashes in proptest::collection::vec((proptest::num::u64::ANY, proptest::num::u64::ANY), 0..5),
            order in proptest::collection::vec(0usize..8, 8),
            space in 0usize..3,
            damage in proptest::option::of((0usize..400, 0u8..128, 0u8..3)),
        ) {
            let sp = ["", " ", "\n\t "][space];
            let obj = |mut members: Vec<String>| {
                let n = members.len();
                for (i, o) in order.iter().enumerate().take(n) {
                    members.swap(i, o % n);
                }
                format!("{{{sp}{}{sp}}}", members.join(&format!("{sp},{sp}")))
            };
            let data = match kind {
                0 => "\"cleared\"".to_string(),
                1 => format!(
                    "{{\"removed\":{}}}",
                    obj(vec![format!(
                        "\"block_hashes\":{sp}[{}]",
                        hashes.iter().map(|h| h.0.to_string()).collect::<Vec<_>>().join(",")
                    )])
                ),
                _ => {
                    let blocks: Vec<String> = hashes
                        .iter()
                        .map(|(e, t)| obj(vec![format!("\"block_hash\":{e}"), format!("\"tokens_hash\":{sp}{t}")]))
                        .collect();
                    let mut m = vec![format!("\"blocks\":[{}]", blocks.join(","))];
                    if let Some(p) = parent {
                        m.push(format!("\"parent_hash\":{}", p.map_or("null".into(), |v| v.to_string())));
                    }
                    format!("{{\"stored\":{sp}{}}}", obj(m))
                }
            };
            let mut members = vec![format!("\"event_id\":{sp}{event_id}"), format!("\"data\":{data}")];
            if let Some(r) = dp_rank {
                members.push(format!("\"dp_rank\":{r}"));
            }
            let mut json = obj(members).into_bytes();
            check(std::str::from_utf8(&json).unwrap());
            if let Some((at, byte, how)) = damage {
                let at = at % (json.len() + 1);
                match how {
                    0 => json.truncate(at),
                    1 => json.insert(at, byte),
                    _ => if at < json.len() { json[at] = byte; },
                }
                if let Ok(text) = std::str::from_utf8(&json) {
                    check(text);
                }
            }
        }
    }
}
