//! A cache of tokenized prompt prefixes, so that a conversation's next turn — which repeats
//! every earlier turn verbatim — costs about its new text.
//!
//! Exactness: the fast path splits text on added tokens (`<|im_start|>`, `<|im_end|>`, …)
//! before anything else, and encodes the pieces between them independently. So at the end of
//! an added-token match, `encode(T) == encode(T[..b]) ++ encode(T[b..])`. The cache keeps, per
//! prompt, the ids of its longest such prefix, keyed by the prefix's text (XXH3-128 of its
//! bytes and its length); a later prompt looks up its own boundaries from the longest down and
//! encodes only what follows the first hit. Tests compare every result with a fresh encode.
//!
//! Bounded: entries hold at most `budget_tokens` ids in all, least recently used dropped
//! first; prefixes shorter than [`MIN_PREFIX_TOKENS`] are not kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use xxhash_rust::xxh3::Xxh3;

use crate::{Preprocessor, Result};

/// Shortest prefix worth keeping, tokens.
pub const MIN_PREFIX_TOKENS: usize = 128;
/// Boundaries looked up per prompt, from its end.
const MAX_LOOKUPS: usize = 64;

#[derive(Debug)]
struct Entry {
    ids: Arc<[u32]>,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<(u128, usize), Entry>,
    tokens: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

/// See the module doc.
#[derive(Debug)]
pub struct PromptCache {
    inner: Mutex<Inner>,
    budget_tokens: usize,
}

/// Counters of a [`PromptCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub tokens: usize,
}

impl PromptCache {
    /// A cache holding at most `budget_tokens` ids (4 bytes each).
    pub fn new(budget_tokens: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            budget_tokens,
        }
    }

    /// Hits, misses and size.
    pub fn stats(&self) -> PromptCacheStats {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        PromptCacheStats {
            hits: g.hits,
            misses: g.misses,
            entries: g.map.len(),
            tokens: g.tokens,
        }
    }

    /// The entry of the longest of `keys` (ordered by prefix length) that is cached; counted
    /// as a hit or a miss.
    fn longest(&self, keys: &[(u128, usize)]) -> Option<(usize, Arc<[u32]>)> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.clock += 1;
        let now = g.clock;
        let found = keys.iter().rev().find_map(|k| {
            let e = g.map.get_mut(k)?;
            e.last_used = now;
            Some((k.1, e.ids.clone()))
        });
        if found.is_some() {
            g.hits += 1;
        } else {
            g.misses += 1;
        }
        found
    }

    #[cfg(test)]
    fn get(&self, key: (u128, usize)) -> Option<Arc<[u32]>> {
        self.longest(&[key]).map(|(_, ids)| ids)
    }

    fn put(&self, key: (u128, usize), ids: &[u32]) {
        if ids.len() < MIN_PREFIX_TOKENS || ids.len() > self.budget_tokens {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.map.contains_key(&key) {
            return;
        }
        g.clock += 1;
        let now = g.clock;
        g.tokens += ids.len();
        g.map.insert(
            key,
            Entry {
                ids: ids.into(),
                last_used: now,
            },
        );
        if g.tokens > self.budget_tokens {
            // Drop the least recently used until a quarter of the budget is free.
            let target = self.budget_tokens - self.budget_tokens / 4;
            let mut by_age: Vec<((u128, usize), u64, usize)> = g
                .map
                .iter()
                .map(|(k, e)| (*k, e.last_used, e.ids.len()))
                .collect();
            by_age.sort_unstable_by_key(|x| x.1);
            for (k, _, n) in by_age {
                if g.tokens <= target {
                    break;
                }
                g.map.remove(&k);
                g.tokens -= n;
            }
        }
    }
}

impl Preprocessor {
    /// [`encode`](Self::encode) with `cache`: the longest cached prefix of `text` that ends
    /// at an added token is reused, and the ids of `text`'s own longest such prefix are kept
    /// for the next turn. Always the same ids as `encode(text)`. Tokenizers without the fast
    /// path are encoded in full.
    pub fn encode_cached(&self, text: &str, cache: &PromptCache) -> Result<Vec<u32>> {
        let Some(fast) = &self.fast else {
            return self.encode(text);
        };
        let ends = fast.added_token_ends(text);
        if ends.is_empty() {
            return self.encode(text);
        }
        // Key of each boundary's prefix, by one streaming hash over the text.
        let mut h = Xxh3::new();
        let mut keys = Vec::with_capacity(ends.len());
        let mut at = 0;
        for &b in &ends {
            h.update(&text.as_bytes()[at..b]);
            at = b;
            keys.push((h.digest128(), b));
        }
        // A conversation's earlier turns end near the end: the last boundaries are enough.
        let hit = cache.longest(&keys[keys.len().saturating_sub(MAX_LOOKUPS)..]);
        let last = *ends.last().unwrap_or(&0);
        let (from, mut ids) = match hit {
            Some((b, ids)) => (b, ids.to_vec()),
            None => (0, Vec::new()),
        };
        if from < last {
            ids.extend(self.encode(&text[from..last])?);
            if let Some(&k) = keys.last() {
                cache.put(k, &ids);
            }
        }
        ids.extend(self.encode(&text[last..])?);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_eviction_keeps_the_budget() {
        let c = PromptCache::new(1000);
        for i in 0..20u128 {
            c.put((i, 0), &[7u32; 200]);
        }
        let s = c.stats();
        assert!(s.tokens <= 1000, "{s:?}");
        assert!(c.get((19, 0)).is_some(), "the newest stays");
        assert!(c.get((0, 0)).is_none(), "the oldest went");
        c.put((99, 0), &[1u32; 10]);
        assert!(c.get((99, 0)).is_none(), "short prefixes are not kept");
    }
}
