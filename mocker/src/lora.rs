//! LoRA adapters and cache salts: what besides its tokens keys a request's KV blocks.
//!
//! * **Adapters** (vLLM's `--enable-lora --lora-modules name=path ...`): a request whose
//!   `model` names an adapter runs with it; vLLM numbers the adapters from 1 in the order
//!   given (`OpenAIServingModels.lora_id_counter`), which is the `lora_id` of its events.
//! * **Cache salt** (vLLM's `cache_salt` request field): a non-empty string that keeps a
//!   tenant's blocks apart from everyone else's.
//!
//! vLLM folds both into its block hashes as extra keys (`kv_cache_utils`
//! `generate_block_hash_extra_keys`: the adapter name in every block, the salt in the first
//! block only), so a prompt under two adapters or two salts never shares a cached block. The
//! mock starts the chain of engine hashes from a seed of the keys instead
//! ([`CacheKeys::chain_seed`]): the same separation, since every block hash chains from the
//! first. Its KV events carry the keys as vLLM's do ([`CacheKeys::extra_keys`]): `lora_id`,
//! `lora_name`, and `extra_keys` with the name in every block and the salt in a chain's
//! first block.
use std::str::FromStr;

use kvrouter_wire::engine::ExtraKey;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Most adapters one worker serves (`--lora-modules`).
pub const MAX_LORA_MODULES: usize = 1024;
/// Longest adapter name accepted, bytes.
pub const MAX_KEY_LEN: usize = 256;

/// One `--lora-modules` entry: `name=path`, or vLLM's JSON form
/// `{"name": ..., "path": ..., "base_model_name": ...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraModule {
    /// The name requests use as their `model`.
    pub name: String,
    /// Where the adapter's weights are (listed as the model's `root`; the mock loads nothing).
    pub path: String,
}

#[derive(serde::Deserialize)]
struct JsonModule {
    name: String,
    path: String,
    #[serde(default)]
    #[allow(dead_code)] // accepted as vLLM does; the mock serves one base model
    base_model_name: Option<String>,
}

impl FromStr for LoraModule {
    type Err = String;

    /// Errors: not `name=path` nor the JSON form, or an empty or over-long name.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, path) = if s.trim_start().starts_with('{') {
            let m: JsonModule =
                serde_json::from_str(s).map_err(|e| format!("invalid LoRA module JSON: {e}"))?;
            (m.name, m.path)
        } else {
            let (n, p) = s
                .split_once('=')
                .ok_or_else(|| format!("a LoRA module is name=path, got {s:?}"))?;
            (n.to_string(), p.to_string())
        };
        if name.is_empty() || name.len() > MAX_KEY_LEN {
            return Err(format!(
                "a LoRA module name must be 1..={MAX_KEY_LEN} bytes, got {name:?}"
            ));
        }
        Ok(Self { name, path })
    }
}

/// A request's adapter: its name and vLLM's numeric id for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lora {
    /// `--lora-modules` name.
    pub name: String,
    /// Position in `--lora-modules` plus 1.
    pub id: i64,
}

/// The adapter named `model` among `modules`, with its id.
pub fn find_adapter(modules: &[LoraModule], model: &str) -> Option<Lora> {
    let i = modules.iter().position(|m| m.name == model)?;
    Some(Lora {
        name: model.to_string(),
        id: i as i64 + 1,
    })
}

/// What besides its tokens keys a request's blocks. Requests without either share one empty
/// key (and the mock's unkeyed hashes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheKeys {
    /// The adapter the request runs with.
    pub lora: Option<Lora>,
    /// Its `cache_salt`.
    pub cache_salt: Option<String>,
}

impl CacheKeys {
    /// Neither an adapter nor a salt.
    pub fn is_empty(&self) -> bool {
        self.lora.is_none() && self.cache_salt.is_none()
    }

    /// Where the chain of engine hashes starts (the "parent" of the first block): 0 without
    /// keys, else a digest of both keys with distinct seeds, so that an adapter named like a
    /// salt is still another key.
    pub fn chain_seed(&self) -> u64 {
        let mut seed = 0u64;
        if let Some(l) = &self.lora {
            seed ^= xxh3_64_with_seed(l.name.as_bytes(), 0x4c6f_5241);
        }
        if let Some(s) = &self.cache_salt {
            seed ^= xxh3_64_with_seed(s.as_bytes(), 0x5361_6c74);
        }
        seed
    }

    /// vLLM's `extra_keys` of a stored chain of `blocks` blocks, `at_start` when its first
    /// block is the sequence's first: the adapter name in every block, the salt in the
    /// sequence's first block. None without keys.
    pub fn extra_keys(&self, blocks: usize, at_start: bool) -> Option<Vec<Option<Vec<ExtraKey>>>> {
        if self.is_empty() {
            return None;
        }
        Some(
            (0..blocks)
                .map(|i| {
                    let mut keys = Vec::new();
                    if let Some(l) = &self.lora {
                        keys.push(ExtraKey::Str(l.name.clone()));
                    }
                    if let (Some(s), true) = (&self.cache_salt, at_start && i == 0) {
                        keys.push(ExtraKey::Str(s.clone()));
                    }
                    (!keys.is_empty()).then_some(keys)
                })
                .collect(),
        )
    }
}

/// A request's `cache_salt` field: absent or null, else a non-empty string (vLLM refuses an
/// empty one; the body's size bounds its length). Errors: the message for the 400.
pub fn parse_cache_salt(v: Option<&serde_json::Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err("Parameter 'cache_salt' must be a non-empty string if provided.".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_parse_in_both_of_vllms_forms() {
        let m: LoraModule = "sql=/adapters/sql".parse().unwrap();
        assert_eq!((m.name.as_str(), m.path.as_str()), ("sql", "/adapters/sql"));
        let m: LoraModule = r#"{"name": "chat", "path": "/a/chat", "base_model_name": "q"}"#
            .parse()
            .unwrap();
        assert_eq!((m.name.as_str(), m.path.as_str()), ("chat", "/a/chat"));
        for bad in [
            "sql",
            "=path",
            r#"{"name": "x"}"#,
            "{",
            &format!("{}=p", "n".repeat(300)),
        ] {
            assert!(bad.parse::<LoraModule>().is_err(), "{bad}");
        }
        let modules = vec![
            "a=/a".parse::<LoraModule>().unwrap(),
            "b=/b".parse().unwrap(),
        ];
        assert_eq!(find_adapter(&modules, "b").unwrap().id, 2);
        assert_eq!(find_adapter(&modules, "c"), None);
    }

    #[test]
    fn keys_seed_the_chain_and_read_as_vllms_extra_keys() {
        let none = CacheKeys::default();
        assert_eq!((none.chain_seed(), none.extra_keys(2, true)), (0, None));
        let lora = Some(Lora {
            name: "x".into(),
            id: 1,
        });
        let a = CacheKeys {
            lora: lora.clone(),
            cache_salt: None,
        };
        let salted = CacheKeys {
            lora,
            cache_salt: Some("t".into()),
        };
        let salt_named_x = CacheKeys {
            lora: None,
            cache_salt: Some("x".into()),
        };
        let seeds = [
            a.chain_seed(),
            salted.chain_seed(),
            salt_named_x.chain_seed(),
        ];
        assert!(seeds.iter().all(|s| *s != 0));
        assert!(seeds[0] != seeds[1] && seeds[0] != seeds[2] && seeds[1] != seeds[2]);
        let s = |v: &str| ExtraKey::Str(v.into());
        assert_eq!(
            salted.extra_keys(2, true).unwrap(),
            vec![Some(vec![s("x"), s("t")]), Some(vec![s("x")])]
        );
        assert_eq!(
            salted.extra_keys(1, false).unwrap(),
            vec![Some(vec![s("x")])]
        );
        assert_eq!(
            salt_named_x.extra_keys(2, true).unwrap(),
            vec![Some(vec![s("x")]), None]
        );
    }

    #[test]
    fn cache_salt_must_be_a_non_empty_string() {
        use serde_json::json;
        assert_eq!(parse_cache_salt(None), Ok(None));
        assert_eq!(parse_cache_salt(Some(&json!(null))), Ok(None));
        assert_eq!(parse_cache_salt(Some(&json!("t1"))), Ok(Some("t1".into())));
        for bad in [json!(""), json!(3), json!(["a"])] {
            assert!(parse_cache_salt(Some(&bad)).is_err(), "{bad}");
        }
    }
}
