//! What `--engine sglang` changes: the KV events and the usage object as SGLang makes them.
//!
//! **Events** (SGLang 0.5.23, `sglang/srt/mem_cache/events.py` and
//! `sglang/srt/disaggregation/kv_events.py`; `kv-event-wire.md` §2.2): one `BlockStored` per
//! page (block), each linked to the previous page by `parent_block_hash`, with `lora_id` nil,
//! `medium` `"GPU"`, and a keyed request's `lora_name` (its `format: dynamo`) and
//! `cache_salt` on every page; one `BlockRemoved` per evicted block; hashes on the wire as signed
//! int64 and the batch's third element the rank (`attn_dp_rank`), all written by the wire
//! crate's [`Encoding::Sglang`](kvrouter_wire::Encoding::Sglang).
//!
//! **Usage** (`sglang/srt/entrypoints/openai/usage_processor.py`, `protocol.py`): `{
//! "prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
//! "reasoning_tokens" }`, where `prompt_tokens_details` is `{"cached_tokens": n}` only when
//! the server runs with `--enable-cache-report` and `n > 0`, else null — and absent from the
//! final usage chunk of a stream, which SGLang writes without its null fields. Every other
//! chunk of a stream carries `"usage": null`.
use kvrouter_wire::{BlockRemoved, BlockStored, EngineEvent};
use serde::Serialize;

use crate::events::KvEvent;
use crate::http::CachedTokens;

/// The engine's events as SGLang publishes them: one `BlockStored` per page.
pub fn sglang_events(events: &[KvEvent]) -> Vec<EngineEvent> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        match e {
            KvEvent::Stored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                keys,
            } => {
                let bs = *block_size as usize;
                let keys = keys.as_deref();
                let mut parent = *parent_block_hash;
                for (i, &h) in block_hashes.iter().enumerate() {
                    let tokens = token_ids.get(i * bs..(i + 1) * bs).unwrap_or_default();
                    out.push(EngineEvent::BlockStored(BlockStored {
                        block_hashes: vec![h],
                        parent_block_hash: parent,
                        token_ids: tokens.to_vec(),
                        block_size: *block_size,
                        medium: Some("GPU".into()),
                        lora_name: keys.and_then(|k| Some(k.lora.as_ref()?.name.clone())),
                        cache_salt: keys.and_then(|k| k.cache_salt.clone()),
                        ..Default::default()
                    }));
                    parent = Some(h);
                }
            }
            KvEvent::Removed { block_hash } => out.push(EngineEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![*block_hash],
                medium: Some("GPU".into()),
                ..Default::default()
            })),
            KvEvent::AllCleared => out.push(EngineEvent::AllBlocksCleared),
        }
    }
    out
}

/// SGLang's `UsageInfo`, in its field order.
#[derive(Serialize, Debug, PartialEq)]
pub(crate) struct SglangUsage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    /// Outer None: not written (a stream's usage chunk); inner None: `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<Option<CachedTokens>>,
    reasoning_tokens: usize,
}

impl SglangUsage {
    /// The usage of a request: `cache_report` is `--enable-cache-report`; `chunk` whether it
    /// goes in a stream's final chunk (null fields left out).
    pub(crate) fn new(
        prompt: usize,
        completion: usize,
        cached: usize,
        cache_report: bool,
        chunk: bool,
    ) -> Self {
        let details = (cache_report && cached > 0).then_some(CachedTokens {
            cached_tokens: cached,
        });
        Self {
            prompt_tokens: prompt,
            total_tokens: prompt + completion,
            completion_tokens: completion,
            prompt_tokens_details: match (details, chunk) {
                (None, true) => None,
                (d, _) => Some(d),
            },
            reasoning_tokens: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_are_split_per_page_and_chained() {
        let ev = [
            KvEvent::Stored {
                block_hashes: vec![10, 11, 12],
                parent_block_hash: Some(9),
                token_ids: (0..6).collect(),
                block_size: 2,
                keys: None,
            },
            KvEvent::Removed { block_hash: 10 },
            KvEvent::AllCleared,
        ];
        let out = sglang_events(&ev);
        assert_eq!(out.len(), 5);
        let stored: Vec<(Vec<u64>, Option<u64>, Vec<u32>)> = out[..3]
            .iter()
            .map(|e| match e {
                EngineEvent::BlockStored(s) => {
                    assert_eq!((s.block_size, s.medium.as_deref()), (2, Some("GPU")));
                    (
                        s.block_hashes.clone(),
                        s.parent_block_hash,
                        s.token_ids.clone(),
                    )
                }
                e => panic!("{e:?}"),
            })
            .collect();
        assert_eq!(
            stored,
            [
                (vec![10], Some(9), vec![0, 1]),
                (vec![11], Some(10), vec![2, 3]),
                (vec![12], Some(11), vec![4, 5]),
            ]
        );
        assert!(matches!(&out[3], EngineEvent::BlockRemoved(r) if r.block_hashes == [10]));
        assert_eq!(out[4], EngineEvent::AllBlocksCleared);
    }

    #[test]
    fn usage_reports_cached_tokens_as_sglang_does() {
        let j = |u: SglangUsage| serde_json::to_string(&u).unwrap();
        assert_eq!(
            j(SglangUsage::new(10, 2, 8, true, false)),
            r#"{"prompt_tokens":10,"total_tokens":12,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":8},"reasoning_tokens":0}"#
        );
        // Without --enable-cache-report, or without a hit: null, or absent in a stream.
        for (cached, report) in [(8, false), (0, true)] {
            assert!(j(SglangUsage::new(10, 2, cached, report, false))
                .contains(r#""prompt_tokens_details":null"#));
            assert!(
                !j(SglangUsage::new(10, 2, cached, report, true)).contains("prompt_tokens_details")
            );
        }
        assert!(j(SglangUsage::new(10, 2, 8, true, true)).contains(r#"{"cached_tokens":8}"#));
    }
}
