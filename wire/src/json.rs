//! Canonical JSON lines of [`RouterEvent`]s (`dynamo-router-spec.md` §3.1): one event per line,
//! `{"worker_id":7,"storage_tier":"device","event":{"event_id":0,"data":{"stored":{...}},"dp_rank":0}}`.
//! The shape is the serde derive of `kvrouter_core::event`; these helpers only frame it.

use std::io::{BufRead, Write};

use kvrouter_core::event::RouterEvent;

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
}
