//! Block hashing, bit-compatible with NVIDIA Dynamo 1.6.1.
//!
//! Source of every rule: `dynamo-router-spec.md` §2 (verified against the 1.6.1 binary) and the
//! test vectors of its Appendix A, which are unit tests below.
//!
//! * A prompt is cut into consecutive chunks of exactly `block_size` tokens from token 0; a
//!   trailing partial chunk is not hashed.
//! * Local block hash = XXH3-64 of the chunk's tokens as little-endian `u32`, seed [`XXH3_SEED`].
//!   A LoRA name and a cache salt change the seed ([`salt_seed`]); multimodal blocks append their
//!   sorted `mm_hash` values as little-endian `u64`.
//! * Sequence hash chains local hashes: `seq[0] = local[0]`,
//!   `seq[i] = XXH3-64(LE(seq[i-1]) ‖ LE(local[i]), 1337)`. It names a whole prefix.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

use crate::event::BlockMmInfo;

/// Dynamo's `XXH3_SEED` (also the chain seed of its tokens crate).
pub const XXH3_SEED: u64 = 1337;

macro_rules! hash_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }
    };
}

hash_newtype!(
    /// Content hash of one block of tokens (Dynamo `LocalBlockHash`): what the index is keyed by.
    LocalBlockHash
);
hash_newtype!(
    /// Chained hash of a whole prefix ending at a block (Dynamo `SequenceHash`).
    SequenceHash
);
hash_newtype!(
    /// An engine's own block hash (Dynamo `ExternalSequenceBlockHash`). Opaque to the router:
    /// used only to resolve parents and removals within one worker's events. Signed engine
    /// hashes are bit-cast, 32-byte digests are folded to 64 bits by the wire decoder.
    ExternalHash
);

/// What besides the tokens changes a block's hash. Empty strings count as absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashOptions<'a> {
    /// LoRA adapter name (`lora_name` on the wire).
    pub lora_name: Option<&'a str>,
    /// Cache namespace (`cache_salt` on the wire, `cache_namespace` in Dynamo's Python API).
    pub cache_salt: Option<&'a str>,
    /// Eagle speculative decoding: hash windows of `block_size + 1` tokens, stride `block_size`.
    pub is_eagle: bool,
}

impl HashOptions<'_> {
    /// The XXH3 seed these options give (see [`salt_seed`]).
    pub fn seed(&self) -> u64 {
        salt_seed(self.lora_name, self.cache_salt)
    }
}

/// Dynamo's `compute_salt_hash`: `1337 +wrap XXH3(lora_name, 0) +wrap XXH3(cache_salt, 1)`, each
/// term only when the string is present and non-empty.
pub fn salt_seed(lora_name: Option<&str>, cache_salt: Option<&str>) -> u64 {
    let mut seed = XXH3_SEED;
    if let Some(name) = lora_name.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3_64_with_seed(name.as_bytes(), 0));
    }
    if let Some(salt) = cache_salt.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3_64_with_seed(salt.as_bytes(), 1));
    }
    seed
}

/// Number of hashable blocks in a prompt of `num_tokens` tokens.
pub fn num_full_blocks(num_tokens: usize, block_size: usize, is_eagle: bool) -> usize {
    match (block_size, is_eagle) {
        (0, _) => 0,
        (bs, false) => num_tokens / bs,
        (bs, true) => num_tokens.saturating_sub(1) / bs,
    }
}

/// Number of blocks the request occupies for load accounting: `ceil(isl / block_size)`
/// (counts the partial tail that hashing drops; spec §2.1).
pub fn request_blocks(isl: usize, block_size: usize) -> usize {
    if block_size == 0 {
        0
    } else {
        isl.div_ceil(block_size)
    }
}

/// Local hash of one chunk of tokens with a given seed and optional multimodal objects.
///
/// Allocation-free unless the block has more than 8 multimodal objects.
pub fn block_hash(tokens: &[u32], seed: u64, mm: Option<&BlockMmInfo>) -> LocalBlockHash {
    let mm = mm.filter(|m| !m.mm_objects.is_empty());
    match mm {
        None => LocalBlockHash(hash_tokens(tokens, seed)),
        Some(info) => {
            let mut mm_hashes: SmallVec<[u64; 8]> =
                info.mm_objects.iter().map(|o| o.mm_hash).collect();
            mm_hashes.sort_unstable();
            let mut h = Xxh3::with_seed(seed);
            update_tokens(&mut h, tokens);
            for v in mm_hashes {
                h.update(&v.to_le_bytes());
            }
            LocalBlockHash(h.digest())
        }
    }
}

/// Local block hashes of a prompt: one per full block (or eagle window), in order.
///
/// `mm_infos`, when given, is indexed by block; missing entries mean "no multimodal objects".
/// One pass over the tokens; the only allocation is the output vector.
pub fn compute_block_hashes(
    tokens: &[u32],
    block_size: usize,
    opts: &HashOptions<'_>,
    mm_infos: Option<&[Option<BlockMmInfo>]>,
) -> Vec<LocalBlockHash> {
    let n = num_full_blocks(tokens.len(), block_size, opts.is_eagle);
    let seed = opts.seed();
    let window = if opts.is_eagle {
        block_size + 1
    } else {
        block_size
    };
    (0..n)
        .map(|i| {
            let start = i * block_size;
            let mm = mm_infos.and_then(|m| m.get(i)).and_then(Option::as_ref);
            block_hash(&tokens[start..start + window], seed, mm)
        })
        .collect()
}

/// `seq = XXH3-64(LE(parent) ‖ LE(local), 1337)`: the sequence hash of a block whose prefix ends
/// in `parent`.
#[inline]
pub fn chain_hash(parent: SequenceHash, local: LocalBlockHash) -> SequenceHash {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&parent.0.to_le_bytes());
    buf[8..].copy_from_slice(&local.0.to_le_bytes());
    SequenceHash(xxh3_64_with_seed(&buf, XXH3_SEED))
}

/// Sequence hashes of a chain of local hashes starting at the sequence start.
pub fn compute_sequence_hashes(local: &[LocalBlockHash]) -> Vec<SequenceHash> {
    let mut out = Vec::with_capacity(local.len());
    let mut prev: Option<SequenceHash> = None;
    for &l in local {
        let s = match prev {
            None => SequenceHash(l.0),
            Some(p) => chain_hash(p, l),
        };
        out.push(s);
        prev = Some(s);
    }
    out
}

/// Dynamo's `hash_mm_identifier`: a 64-hex-digit digest (vLLM's canonical multimodal id) maps to
/// its first 16 hex digits as a `u64`; any other non-empty string to `XXH3-64(bytes, 0)`.
pub fn hash_mm_identifier(id: &str) -> Option<u64> {
    if id.is_empty() {
        return None;
    }
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return u64::from_str_radix(&id[..16], 16).ok();
    }
    Some(xxh3_64(id.as_bytes()))
}

#[cfg(target_endian = "little")]
#[inline]
fn hash_tokens(tokens: &[u32], seed: u64) -> u64 {
    xxh3_64_with_seed(as_le_bytes(tokens), seed)
}

#[cfg(target_endian = "little")]
#[inline]
fn update_tokens(h: &mut Xxh3, tokens: &[u32]) {
    h.update(as_le_bytes(tokens));
}

/// On little-endian targets a `u32` slice already is its LE byte encoding.
#[cfg(target_endian = "little")]
#[inline]
fn as_le_bytes(tokens: &[u32]) -> &[u8] {
    // SAFETY: u8 has alignment 1 and no invalid bit patterns; the length covers exactly the
    // same memory as the u32 slice.
    unsafe {
        std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), std::mem::size_of_val(tokens))
    }
}

#[cfg(not(target_endian = "little"))]
fn hash_tokens(tokens: &[u32], seed: u64) -> u64 {
    let mut h = Xxh3::with_seed(seed);
    update_tokens(&mut h, tokens);
    h.digest()
}

#[cfg(not(target_endian = "little"))]
fn update_tokens(h: &mut Xxh3, tokens: &[u32]) {
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::MmObject;

    fn range(a: u32, b: u32) -> Vec<u32> {
        (a..=b).collect()
    }

    fn locals(v: &[LocalBlockHash]) -> Vec<u64> {
        v.iter().map(|h| h.0).collect()
    }

    const B0: u64 = 16863443419780771464;
    const B1: u64 = 2287610619914608821;

    #[test]
    fn appendix_a_plain() {
        let none = HashOptions::default();
        assert_eq!(
            locals(&compute_block_hashes(&range(1, 32), 16, &none, None)),
            [B0, B1]
        );
        // Partial tail dropped.
        assert_eq!(
            locals(&compute_block_hashes(&range(1, 39), 16, &none, None)),
            [B0, B1]
        );
        assert_eq!(
            locals(&compute_block_hashes(&range(1, 64), 16, &none, None)),
            [B0, B1, 12129935312930971799, 5453111288643762282]
        );
        assert!(compute_block_hashes(&range(1, 64), 0, &none, None).is_empty());
    }

    #[test]
    fn appendix_a_lora_and_salt() {
        let lora = HashOptions {
            lora_name: Some("my-lora"),
            ..Default::default()
        };
        assert_eq!(
            locals(&compute_block_hashes(&range(1, 32), 16, &lora, None)),
            [4148081000444450790, 2866551892415683476]
        );
        let salt = HashOptions {
            cache_salt: Some("ns1"),
            ..Default::default()
        };
        assert_eq!(
            locals(&compute_block_hashes(&range(1, 32), 16, &salt, None)),
            [10470563794485058852, 9596755744098040008]
        );
        // Empty strings are absent.
        let empty = HashOptions {
            lora_name: Some(""),
            cache_salt: Some(""),
            is_eagle: false,
        };
        assert_eq!(
            locals(&compute_block_hashes(&range(1, 32), 16, &empty, None)),
            [B0, B1]
        );
    }

    #[test]
    fn appendix_a_multimodal() {
        let mm = vec![
            Some(BlockMmInfo {
                mm_objects: vec![MmObject {
                    mm_hash: 0xDEADBEEF,
                    offsets: vec![(0, 4)],
                }],
            }),
            None,
        ];
        let got = compute_block_hashes(&range(1, 32), 16, &HashOptions::default(), Some(&mm));
        assert_eq!(locals(&got), [14529151895984176542, B1]);
    }

    #[test]
    fn multimodal_hashes_are_sorted_before_hashing() {
        let obj = |h| MmObject {
            mm_hash: h,
            offsets: vec![],
        };
        let a = BlockMmInfo {
            mm_objects: vec![obj(5), obj(1), obj(9)],
        };
        let b = BlockMmInfo {
            mm_objects: vec![obj(9), obj(5), obj(1)],
        };
        let t = range(1, 16);
        assert_eq!(
            block_hash(&t, XXH3_SEED, Some(&a)),
            block_hash(&t, XXH3_SEED, Some(&b))
        );
        assert_ne!(
            block_hash(&t, XXH3_SEED, Some(&a)),
            block_hash(&t, XXH3_SEED, None)
        );
    }

    #[test]
    fn appendix_a_eagle() {
        let mut t = range(1, 32);
        t.push(99);
        let eagle = HashOptions {
            is_eagle: true,
            ..Default::default()
        };
        assert_eq!(
            locals(&compute_block_hashes(&t, 16, &eagle, None)),
            [6752489653130089168, 8646629551596238458]
        );
        assert_eq!(num_full_blocks(33, 16, true), 2);
        assert_eq!(num_full_blocks(32, 16, true), 1);
    }

    #[test]
    fn appendix_a_sequence_hashes() {
        let l = compute_block_hashes(&range(1, 64), 16, &HashOptions::default(), None);
        let s: Vec<u64> = compute_sequence_hashes(&l).iter().map(|h| h.0).collect();
        assert_eq!(
            s,
            [
                B0,
                12466389667045779788,
                960926348267535642,
                4923844688253642376
            ]
        );
    }

    #[test]
    fn request_blocks_counts_partial_tail() {
        assert_eq!(request_blocks(39, 16), 3);
        assert_eq!(request_blocks(32, 16), 2);
        assert_eq!(request_blocks(0, 16), 0);
    }

    #[test]
    fn mm_identifier() {
        let hex = "00000000deadbeef".to_string() + &"a".repeat(48);
        assert_eq!(hash_mm_identifier(&hex), Some(0xdeadbeef));
        assert_eq!(hash_mm_identifier("img-1"), Some(xxh3_64(b"img-1")));
        assert_eq!(hash_mm_identifier(""), None);
    }
}
