//! HF-style model directory → tokenizer + chat template → token ids.
//!
//! [`Preprocessor::from_model_dir`] loads `tokenizer.json` and `tokenizer_config.json` (and, when
//! present, `chat_template.jinja` and `generation_config.json`) from a Hugging Face model
//! directory. Chat messages are rendered with the model's own chat template the way
//! `transformers`' `apply_chat_template` does (jinja with `trim_blocks`, `lstrip_blocks`, loop
//! controls, Python string methods via `minijinja-contrib`'s pycompat, `raise_exception`,
//! `strftime_now`, a `tojson` that prints like Python's `json.dumps`), then tokenized **once,
//! without adding special tokens again** (the template already wrote them).
//!
//! ```no_run
//! let p = kvrouter_preprocess::Preprocessor::from_model_dir("models/qwen3")?;
//! let text = p.apply_chat_template(&serde_json::json!([{"role": "user", "content": "Hi"}]), true)?;
//! let ids = p.encode(&text)?; // [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
//! # Ok::<(), kvrouter_preprocess::PreprocessError>(())
//! ```
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

mod cache;
mod detok;
mod fast;

pub use cache::{PromptCache, PromptCacheStats};
pub use detok::IncrementalDecoder;
use fast::FastEncoder;

/// Everything that can go wrong while loading a model directory or preprocessing a request.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `tokenizer.json` is not a tokenizer the `tokenizers` crate can load.
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad {
        /// The file.
        path: PathBuf,
        /// The library's message.
        message: String,
    },
    /// A JSON config file is not valid JSON of the expected shape.
    #[error("invalid {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model has no chat template, so chat messages cannot be rendered.
    #[error("the model has no chat template")]
    NoChatTemplate,
    /// The chat template does not compile.
    #[error("chat template does not compile: {0}")]
    TemplateSyntax(String),
    /// The request's messages are not an array of message objects.
    #[error("invalid messages: {0}")]
    InvalidMessages(String),
    /// Rendering failed (including the template's own `raise_exception`).
    #[error("chat template rendering failed: {0}")]
    TemplateRender(String),
    /// Encoding text to token ids failed.
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// Decoding token ids to text failed (for example an id outside the vocabulary).
    #[error("detokenization failed: {0}")]
    Decode(String),
}

/// Shorthand for this crate's results.
pub type Result<T, E = PreprocessError> = std::result::Result<T, E>;

/// What a chat request contributes to the template context (HF `apply_chat_template` names).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatTemplateArgs<'a> {
    /// OpenAI-style `messages`: an array of `{"role", "content", ...}` objects; `content` is a
    /// string, `null`, or a list of parts of which the `{"type":"text","text":...}` ones are
    /// joined with `"\n"` (vLLM's "string" content format).
    pub messages: &'a Json,
    /// OpenAI `tools` (array of `{"type":"function","function":{...}}`), passed as `tools`.
    pub tools: Option<&'a Json>,
    /// Append the assistant turn header (`add_generation_prompt`).
    pub add_generation_prompt: bool,
    /// Extra template variables (vLLM's `chat_template_kwargs`, e.g. `enable_thinking`).
    pub extra: Option<&'a serde_json::Map<String, Json>>,
}

/// A loaded model directory: tokenizer, special tokens, chat template, context length.
pub struct Preprocessor {
    tokenizer: Tokenizer,
    /// Same ids as the library, faster; `None` for tokenizers of another shape.
    fast: Option<FastEncoder>,
    env: Option<Environment<'static>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
    context_length: Option<usize>,
    vocab_size: usize,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor")
            .field("vocab_size", &self.vocab_size)
            .field("fast_encode", &self.fast.is_some())
            .field("has_chat_template", &self.env.is_some())
            .field("eos_token_ids", &self.eos_token_ids)
            .field("context_length", &self.context_length)
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat";

impl Preprocessor {
    /// Loads `dir/tokenizer.json` (required), `dir/tokenizer_config.json` (optional: special
    /// tokens, `chat_template`, `model_max_length`), `dir/chat_template.jinja` (optional, wins
    /// over the config's template) and `dir/generation_config.json` (optional: `eos_token_id`).
    ///
    /// Errors: [`PreprocessError::Io`], [`PreprocessError::TokenizerLoad`],
    /// [`PreprocessError::Config`], [`PreprocessError::TemplateSyntax`].
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path).map_err(|source| PreprocessError::Io {
            path: tok_path.clone(),
            source,
        })?;
        let tokenizer =
            Tokenizer::from_bytes(&bytes).map_err(|e| PreprocessError::TokenizerLoad {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        let fast = serde_json::from_slice::<Json>(&bytes)
            .ok()
            .and_then(|j| FastEncoder::new(&j));

        let cfg_path = dir.join("tokenizer_config.json");
        let config = read_json_opt(&cfg_path)?.unwrap_or(Json::Null);
        let bos_token = special_token(&config, "bos_token");
        let eos_token = special_token(&config, "eos_token");

        let mut template = match config.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // Some configs carry a list of named templates; HF uses the one named "default".
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_owned),
            _ => None,
        };
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            template = Some(std::fs::read_to_string(&jinja_path).map_err(|source| {
                PreprocessError::Io {
                    path: jinja_path.clone(),
                    source,
                }
            })?);
        }
        let env = template.map(build_env).transpose()?;

        // HF uses 1e30-ish sentinels for "no limit"; treat anything absurd as unknown.
        let context_length = config
            .get("model_max_length")
            .and_then(Json::as_f64)
            .filter(|v| *v >= 1.0 && *v < 1e12)
            .map(|v| v as usize);

        let mut eos_token_ids = Vec::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_token_ids.push(id);
        }
        if let Some(gen) = read_json_opt(&dir.join("generation_config.json"))? {
            let ids: Vec<u32> = match gen.get("eos_token_id") {
                Some(Json::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
                Some(Json::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64().map(|v| v as u32))
                    .collect(),
                _ => Vec::new(),
            };
            for id in ids {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(Self {
            tokenizer,
            fast,
            env,
            bos_token,
            eos_token,
            eos_token_ids,
            context_length,
            vocab_size,
        })
    }

    /// Whether the model directory provided a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.env.is_some()
    }

    /// The model's context length in tokens (`model_max_length`), when the config states one.
    pub fn context_length(&self) -> Option<usize> {
        self.context_length
    }

    /// Token ids that end generation: the config's `eos_token` plus `generation_config.json`'s
    /// `eos_token_id`(s), without duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// `bos_token` of the config, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// `eos_token` of the config, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Number of token ids, added tokens included (valid ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders `messages` (a JSON array) with the chat template; see [`Self::render_chat`].
    pub fn apply_chat_template(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_chat(&ChatTemplateArgs {
            messages,
            tools: None,
            add_generation_prompt,
            extra: None,
        })
    }

    /// Renders a chat request with the model's template: context `messages` (content
    /// normalised to strings), `tools`, `add_generation_prompt`, `bos_token`, `eos_token`, plus
    /// `args.extra`.
    ///
    /// Errors: [`PreprocessError::NoChatTemplate`], [`PreprocessError::InvalidMessages`],
    /// [`PreprocessError::TemplateRender`] (also for the template's `raise_exception`).
    pub fn render_chat(&self, args: &ChatTemplateArgs<'_>) -> Result<String> {
        let env = self.env.as_ref().ok_or(PreprocessError::NoChatTemplate)?;
        let messages = normalize_messages(args.messages)?;
        let mut ctx = serde_json::Map::new();
        if let Some(extra) = args.extra {
            for (k, v) in extra {
                ctx.insert(k.clone(), v.clone());
            }
        }
        ctx.insert("messages".into(), messages);
        if let Some(tools) = args.tools.filter(|t| !t.is_null()) {
            ctx.insert("tools".into(), tools.clone());
        }
        ctx.insert(
            "add_generation_prompt".into(),
            args.add_generation_prompt.into(),
        );
        let tok = |t: &Option<String>| t.clone().map(Json::String).unwrap_or(Json::Null);
        ctx.insert("bos_token".into(), tok(&self.bos_token));
        ctx.insert("eos_token".into(), tok(&self.eos_token));
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| PreprocessError::TemplateRender(e.to_string()))?;
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| PreprocessError::TemplateRender(render_error_message(&e)))
    }

    /// Token ids of `text`, without adding special tokens (for rendered chat prompts, whose
    /// template already contains them). Errors: [`PreprocessError::Encode`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS
    /// etc.), as vLLM does for plain-text completion prompts. Errors: [`PreprocessError::Encode`].
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // The fast path applies only where the post-processor adds nothing (ByteLevel / none).
        if let Some(f) = &self.fast {
            return f
                .encode(&self.tokenizer, text)
                .map_err(|e| PreprocessError::Encode(e.to_string()));
        }
        self.encode_reference(text, add_special_tokens)
    }

    /// Token ids of `text` through the `tokenizers` library's full pipeline, bypassing the
    /// fast path (which must give the same ids; tests and benchmarks compare the two).
    /// Errors: [`PreprocessError::Encode`].
    pub fn encode_reference(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| PreprocessError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether [`Self::encode`] takes the fast byte-level BPE path.
    pub fn has_fast_encode(&self) -> bool {
        self.fast.is_some()
    }

    /// Which path [`Self::encode`] takes, for a startup log line.
    pub fn encode_path(&self) -> &'static str {
        match &self.fast {
            Some(f) if f.has_scanner() => {
                "fast: byte-level BPE, Qwen2/3 split pattern scanned without the regex engine"
            }
            Some(_) => "fast: byte-level BPE, the tokenizer's split regex",
            None => "library: this tokenizer's pipeline is not the byte-level BPE the fast path implements",
        }
    }

    /// Text of `ids`, skipping special tokens. Errors: [`PreprocessError::Decode`].
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// Text of `ids`; `skip_special_tokens` as in HF. Errors: [`PreprocessError::Decode`].
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(PreprocessError::Decode(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab_size
            )));
        }
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| PreprocessError::Decode(e.to_string()))
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| PreprocessError::Config {
                path: path.to_owned(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PreprocessError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A special token from the config: a string or an AddedToken object `{"content": ...}`.
fn special_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Content as a string, vLLM's default "string" format: text parts joined by newlines,
/// `null` → `""`. Other message fields pass through unchanged.
fn normalize_messages(messages: &Json) -> Result<Json> {
    let list = messages
        .as_array()
        .ok_or_else(|| PreprocessError::InvalidMessages("messages must be an array".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let obj = m.as_object().ok_or_else(|| {
            PreprocessError::InvalidMessages(format!("messages[{i}] must be an object"))
        })?;
        if !obj.get("role").is_some_and(Json::is_string) {
            return Err(PreprocessError::InvalidMessages(format!(
                "messages[{i}].role must be a string"
            )));
        }
        let mut obj = obj.clone();
        let content = match obj.get("content") {
            None | Some(Json::Null) => Json::String(String::new()),
            Some(Json::String(_)) => obj["content"].clone(),
            Some(Json::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let t = match part {
                        Json::String(s) => Some(s.as_str()),
                        Json::Object(p) => match p.get("type").and_then(Json::as_str) {
                            Some("text") | None => p.get("text").and_then(Json::as_str),
                            Some(other) => {
                                return Err(PreprocessError::InvalidMessages(format!(
                                    "messages[{i}].content[{j}]: unsupported part type {other:?}"
                                )))
                            }
                        },
                        _ => None,
                    };
                    let t = t.ok_or_else(|| {
                        PreprocessError::InvalidMessages(format!(
                            "messages[{i}].content[{j}] must be a text part"
                        ))
                    })?;
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(t);
                }
                Json::String(text)
            }
            Some(_) => {
                return Err(PreprocessError::InvalidMessages(format!(
                    "messages[{i}].content must be a string, null or a list of parts"
                )))
            }
        };
        obj.insert("content".into(), content);
        out.push(Json::Object(obj));
    }
    Ok(Json::Array(out))
}

/// A jinja environment configured like transformers' `_compile_jinja_template`.
fn build_env(source: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned(TEMPLATE_NAME, source)
        .map_err(|e| PreprocessError::TemplateSyntax(e.to_string()))?;
    Ok(env)
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn render_error_message(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_owned(),
        _ => e.to_string(),
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// i.e. `", "`/`": "` separators when compact, no HTML escaping (minijinja's own escapes).
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("sort_keys")?; // accepted; key order is the input's
    kwargs.assert_all_used()?;
    let mut buf = Vec::new();
    let res = match indent {
        Some(n) => {
            let ind = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&ind);
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            serde::Serialize::serialize(&value, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PyCompactFormatter);
            serde::Serialize::serialize(&value, &mut ser)
        }
    };
    res.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let s = String::from_utf8(buf)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(s))
}

/// Python `json.dumps` default separators: `", "` between items, `": "` after keys (what the
/// chat templates' `tojson` writes, and how models tend to write JSON).
pub struct PyCompactFormatter;

impl serde_json::ser::Formatter for PyCompactFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `strftime_now(fmt)` (used by Llama 3 templates) for the common directives
/// `%Y %m %d %B %b %H %M %S %%`, in UTC.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&fmt, secs)
}

fn strftime_utc(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime_utc("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S", 1_709_251_199),
            "2024-02-29 23:59:59"
        );
        assert_eq!(strftime_utc("%B %%", 1_700_000_000), "November %");
    }

    #[test]
    fn python_style_tojson() {
        let env = build_env("{{ x | tojson }}|{{ x | tojson(indent=2) }}".into()).unwrap();
        let out = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(minijinja::context! { x => serde_json::json!({"a": [1, "<b>"], "c": null}) })
            .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, \"<b>\"], \"c\": null}|{\n  \"a\": [\n    1,\n    \"<b>\"\n  ],\n  \"c\": null\n}"
        );
    }

    #[test]
    fn content_parts_are_joined() {
        let m = serde_json::json!([{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                                   {"role":"assistant","content":null}]);
        let n = normalize_messages(&m).unwrap();
        assert_eq!(n[0]["content"], "a\nb");
        assert_eq!(n[1]["content"], "");
        assert!(matches!(
            normalize_messages(
                &serde_json::json!([{"role":"user","content":[{"type":"image_url"}]}])
            ),
            Err(PreprocessError::InvalidMessages(_))
        ));
        assert!(matches!(
            normalize_messages(&serde_json::json!({"role":"user"})),
            Err(PreprocessError::InvalidMessages(_))
        ));
    }
}
