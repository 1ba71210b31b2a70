//! Structured output for the mock: a JSON value made up from a JSON Schema (or a random JSON
//! object), deterministically from a request's [`Rng`].
//!
//! Supported schema keywords: `type` (one or a list of `object`, `array`, `string`,
//! `integer`, `number`, `boolean`, `null`), `properties`, `required`, `additionalProperties`,
//! `items`, `minItems`, `maxItems`, `minLength`, `maxLength`, `format` (the [`FORMATS`]),
//! `minimum`, `maximum`,
//! `exclusiveMinimum`, `exclusiveMaximum`, `enum`, `const`, `anyOf`, `oneOf`, a one-element
//! `allOf`, and `$ref` to `#`, `#/$defs/…` or `#/definitions/…`; annotations (`title`,
//! `description`, `default`, `examples`, `$schema`, `$id`, `$comment`, …) are ignored.
//! [`check`] refuses anything else, so a schema the mock cannot honour is an error rather
//! than silently ignored; [`generate`] alone (used for tool-call arguments, whose schemas come
//! from prompts) simply ignores keywords it does not know.
//!
//! Hostile schemas are bounded: nesting of the schema ([`MAX_SCHEMA_DEPTH`]) and of the value
//! ([`MAX_VALUE_DEPTH`], which also stops recursive `$ref`s), values generated
//! ([`MAX_NODES`]) and their string bytes ([`MAX_TEXT`]), `minItems` and `minLength`
//! ([`MAX_MIN_LEN`]). Past the soft depth the
//! generator takes the smallest choices (optional properties left out, `minItems` items,
//! `anyOf` branches tried in order) so recursive schemas still terminate.
use serde_json::{Map, Number, Value};

use crate::sampling::Rng;

/// Deepest schema nesting [`check`] walks.
pub const MAX_SCHEMA_DEPTH: usize = 64;
/// Deepest nesting of a generated value (and of `$ref` chains).
pub const MAX_VALUE_DEPTH: usize = 16;
/// Most values (nodes) one generated document may hold.
pub const MAX_NODES: usize = 4096;
/// Largest `minItems` / `minLength` honoured.
pub const MAX_MIN_LEN: u64 = 4096;
/// Most bytes of string content one generated document may hold.
pub const MAX_TEXT: usize = 256 * 1024;
/// From this depth on, the generator makes the smallest choices.
const SOFT_DEPTH: usize = 4;

/// Why a schema cannot be honoured.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at schema path `{path}`)")]
pub struct SchemaError {
    /// JSON-pointer-like location in the schema, `#` for the root.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn err<T>(path: &str, message: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError {
        path: path.to_owned(),
        message: message.into(),
    })
}

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
];

const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
];

/// String `format`s the generator can honour.
pub const FORMATS: &[&str] = &[
    "date-time",
    "date",
    "time",
    "email",
    "uri",
    "url",
    "uuid",
    "ipv4",
    "hostname",
];

const TYPES: &[&str] = &[
    "object", "array", "string", "integer", "number", "boolean", "null",
];

/// Checks that every keyword of `schema` (and of its `$defs`) is supported and well-formed,
/// and that every `$ref` resolves.
pub fn check(schema: &Value) -> Result<(), SchemaError> {
    check_at(schema, schema, "#", 0)
}

fn check_at(root: &Value, s: &Value, path: &str, depth: usize) -> Result<(), SchemaError> {
    if depth > MAX_SCHEMA_DEPTH {
        return err(
            path,
            format!("the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep"),
        );
    }
    let o = match s {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return err(path, "the schema `false` accepts no value"),
        Value::Object(o) => o,
        _ => return err(path, "a schema must be an object or a boolean"),
    };
    for (k, v) in o {
        let here = format!("{path}/{k}");
        if ANNOTATIONS.contains(&k.as_str()) {
            if k == "$defs" || k == "definitions" {
                let Some(defs) = v.as_object() else {
                    return err(&here, "must be an object of schemas");
                };
                for (name, d) in defs {
                    check_at(root, d, &format!("{here}/{name}"), depth + 1)?;
                }
            }
            continue;
        }
        if !KEYWORDS.contains(&k.as_str()) {
            return err(
                &here,
                format!("the keyword `{k}` is not supported by the mock engine"),
            );
        }
        match k.as_str() {
            "type" => {
                let names: Vec<&Value> = match v {
                    Value::Array(a) if !a.is_empty() => a.iter().collect(),
                    Value::String(_) => vec![v],
                    _ => return err(&here, "must be a type name or a non-empty list of them"),
                };
                for n in names {
                    if !n.as_str().is_some_and(|n| TYPES.contains(&n)) {
                        return err(&here, format!("unknown type {n}"));
                    }
                }
            }
            "properties" => {
                let Some(props) = v.as_object() else {
                    return err(&here, "must be an object of schemas");
                };
                for (name, p) in props {
                    check_at(root, p, &format!("{here}/{name}"), depth + 1)?;
                }
            }
            "required" if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) => {
                return err(&here, "must be a list of property names");
            }
            "additionalProperties" if v.is_boolean() => {}
            "additionalProperties" | "items" => {
                if k == "items" && v.is_array() {
                    return err(&here, "tuple `items` (a list of schemas) is not supported");
                }
                check_at(root, v, &here, depth + 1)?;
            }
            "minItems" | "maxItems" | "minLength" | "maxLength" if v.as_u64().is_none() => {
                return err(&here, "must be a non-negative integer");
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" if !v.is_number() => {
                return err(&here, "must be a number");
            }
            "format" if !v.as_str().is_some_and(|f| FORMATS.contains(&f)) => {
                return err(
                    &here,
                    format!(
                        "the string format {v} is not supported (supported: {})",
                        FORMATS.join(", ")
                    ),
                );
            }
            "enum" if v.as_array().is_none_or(|a| a.is_empty()) => {
                return err(&here, "must be a non-empty list");
            }
            "anyOf" | "oneOf" | "allOf" => {
                let Some(list) = v.as_array().filter(|a| !a.is_empty()) else {
                    return err(&here, "must be a non-empty list of schemas");
                };
                if k == "allOf" && list.len() != 1 {
                    return err(&here, "only a one-element `allOf` is supported");
                }
                for (i, b) in list.iter().enumerate() {
                    check_at(root, b, &format!("{here}/{i}"), depth + 1)?;
                }
            }
            "$ref" => {
                let Some(r) = v.as_str() else {
                    return err(&here, "must be a string");
                };
                resolve(root, r, &here)?;
            }
            _ => {} // checked above, or `const` (any value)
        }
    }
    Ok(())
}

fn resolve<'a>(root: &'a Value, r: &str, path: &str) -> Result<&'a Value, SchemaError> {
    if r == "#" {
        return Ok(root);
    }
    let ok = r.starts_with("#/$defs/") || r.starts_with("#/definitions/");
    match r.strip_prefix('#').filter(|_| ok).and_then(|p| root.pointer(p)) {
        Some(v) => Ok(v),
        None => err(
            path,
            format!("`$ref` {r:?} does not resolve (only `#`, `#/$defs/…` and `#/definitions/…` are supported)"),
        ),
    }
}

/// A value valid against `schema` (its supported keywords; call [`check`] first to refuse
/// the others), chosen with `rng`. Errors: the schema is malformed, contradictory, or needs a
/// value beyond the bounds (see the module docs).
pub fn generate(schema: &Value, rng: &mut Rng) -> Result<Value, SchemaError> {
    let mut g = Gen {
        root: schema,
        rng,
        nodes: 0,
        text: 0,
    };
    g.value(schema, "#", 0)
}

/// A small random JSON object (`response_format: {"type": "json_object"}`).
pub fn random_object(rng: &mut Rng) -> Value {
    let mut m = Map::new();
    for _ in 0..rng.range(1, 4) {
        let key = rng.pick(WORDS).to_string();
        let v = match rng.below(4) {
            0 => Value::String(words(rng, 1, 3)),
            1 => Value::from(rng.range(0, 1000)),
            2 => Value::Bool(rng.chance(0.5)),
            _ => Value::Array(
                (0..rng.range(1, 3))
                    .map(|_| Value::String(rng.pick(WORDS).to_string()))
                    .collect(),
            ),
        };
        m.insert(key, v);
    }
    Value::Object(m)
}

/// `value` as Python's `json.dumps` writes it (`", "` and `": "` separators), the way models
/// tend to write JSON.
pub fn to_text(value: &Value) -> String {
    let mut buf = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut buf, kvrouter_preprocess::PyCompactFormatter);
    // Serialising a Value into memory cannot fail.
    let _ = serde::Serialize::serialize(value, &mut ser);
    String::from_utf8(buf).unwrap_or_default()
}

/// Words the mock's made-up strings are built from.
pub const WORDS: &[&str] = &[
    "alpha", "river", "stone", "cloud", "maple", "ember", "harbor", "lantern", "meadow", "orbit",
    "pixel", "quartz", "saffron", "timber", "velvet", "willow", "zephyr", "copper", "delta",
    "falcon", "garden", "island", "jasper", "kernel", "lumen", "mosaic", "nectar", "opal",
];

/// Space-separated random words, `lo..=hi` of them.
fn words(rng: &mut Rng, lo: u64, hi: u64) -> String {
    let n = rng.range(lo, hi);
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        let w = *rng.pick(WORDS);
        s.push_str(w);
    }
    s
}

struct Gen<'a> {
    root: &'a Value,
    rng: &'a mut Rng,
    nodes: usize,
    /// String bytes generated so far.
    text: usize,
}

impl Gen<'_> {
    fn value(&mut self, s: &Value, path: &str, depth: usize) -> Result<Value, SchemaError> {
        if depth > MAX_VALUE_DEPTH {
            return err(
                path,
                format!(
                    "the value would nest more than {MAX_VALUE_DEPTH} levels (recursive `$ref`?)"
                ),
            );
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return err(
                path,
                format!("the value would hold more than {MAX_NODES} elements"),
            );
        }
        let o = match s {
            Value::Bool(true) => return Ok(self.any(depth)),
            Value::Bool(false) => return err(path, "the schema `false` accepts no value"),
            Value::Object(o) => o,
            _ => return err(path, "a schema must be an object or a boolean"),
        };
        if let Some(r) = o.get("$ref") {
            let r = r.as_str().unwrap_or_default();
            let target = resolve(self.root, r, &format!("{path}/$ref"))?;
            return self.value(target, &format!("{path}/$ref"), depth + 1);
        }
        if let Some(c) = o.get("const") {
            return Ok(c.clone());
        }
        if let Some(e) = o
            .get("enum")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
        {
            return Ok(self.rng.pick(e).clone());
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(list) = o
                .get(key)
                .and_then(Value::as_array)
                .filter(|a| !a.is_empty())
            {
                return self.branches(list, &format!("{path}/{key}"), depth);
            }
        }
        let ty = self.pick_type(o, depth);
        match ty.as_deref() {
            Some("object") => self.object(o, path, depth),
            Some("array") => self.array(o, path, depth),
            Some("string") => self.string(o, path),
            Some("integer") => self.integer(o, path),
            Some("number") => self.number(o, path),
            Some("boolean") => Ok(Value::Bool(self.rng.chance(0.5))),
            Some("null") => Ok(Value::Null),
            Some(other) => err(&format!("{path}/type"), format!("unknown type {other:?}")),
            None => Ok(self.any(depth)),
        }
    }

    /// One branch of an `anyOf`/`oneOf`: a random one first when shallow, else in order;
    /// the next on failure.
    fn branches(&mut self, list: &[Value], path: &str, depth: usize) -> Result<Value, SchemaError> {
        let start = if depth >= SOFT_DEPTH {
            0
        } else {
            self.rng.below(list.len() as u64) as usize
        };
        let mut last = None;
        for i in 0..list.len() {
            let j = (start + i) % list.len();
            match self.value(&list[j], &format!("{path}/{j}"), depth + 1) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| SchemaError {
            path: path.to_owned(),
            message: "no branch".into(),
        }))
    }

    fn pick_type(&mut self, o: &Map<String, Value>, depth: usize) -> Option<String> {
        match o.get("type") {
            Some(Value::String(t)) => Some(t.clone()),
            Some(Value::Array(a)) if !a.is_empty() => {
                let names: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
                if names.is_empty() {
                    return None;
                }
                if depth >= SOFT_DEPTH {
                    // Prefer a leaf type so recursion ends.
                    for leaf in ["null", "boolean", "integer", "number", "string"] {
                        if names.contains(&leaf) {
                            return Some(leaf.into());
                        }
                    }
                }
                Some(self.rng.pick(&names).to_string())
            }
            _ => {
                let has = |k: &str| o.contains_key(k);
                if has("properties") || has("required") || has("additionalProperties") {
                    Some("object".into())
                } else if has("items") || has("minItems") || has("maxItems") {
                    Some("array".into())
                } else if has("minLength") || has("maxLength") {
                    Some("string".into())
                } else if has("minimum")
                    || has("maximum")
                    || has("exclusiveMinimum")
                    || has("exclusiveMaximum")
                {
                    Some("number".into())
                } else {
                    None
                }
            }
        }
    }

    /// A value for an unconstrained schema: a short string.
    fn any(&mut self, _depth: usize) -> Value {
        Value::String(words(self.rng, 1, 2))
    }

    fn object(
        &mut self,
        o: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<Value, SchemaError> {
        let empty = Map::new();
        let props = o
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let required: Vec<&str> = o
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut out = Map::new();
        for (name, p) in props {
            let req = required.contains(&name.as_str());
            if !req && (depth >= SOFT_DEPTH || !self.rng.chance(0.6)) {
                continue;
            }
            let v = self.value(p, &format!("{path}/properties/{name}"), depth + 1);
            match v {
                Ok(v) => {
                    out.insert(name.clone(), v);
                }
                Err(e) if req => return Err(e),
                Err(_) => {} // an optional property that cannot be made: leave it out
            }
        }
        for name in required {
            if out.contains_key(name) {
                continue;
            }
            let v = match o.get("additionalProperties") {
                Some(Value::Bool(false)) => {
                    return err(
                        &format!("{path}/required"),
                        format!("required property {name:?} is not allowed by `additionalProperties: false`"),
                    )
                }
                Some(s @ Value::Object(_)) => {
                    self.value(s, &format!("{path}/additionalProperties"), depth + 1)?
                }
                _ => self.any(depth + 1),
            };
            out.insert(name.to_owned(), v);
        }
        Ok(Value::Object(out))
    }

    fn array(
        &mut self,
        o: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<Value, SchemaError> {
        let min = o.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        let max = o.get("maxItems").and_then(Value::as_u64);
        if min > MAX_MIN_LEN {
            return err(
                &format!("{path}/minItems"),
                format!("minItems above {MAX_MIN_LEN} is not supported"),
            );
        }
        if max.is_some_and(|m| m < min) {
            return err(path, "maxItems is below minItems");
        }
        let hi = max.unwrap_or(u64::MAX).min(min + 3);
        let n = if depth >= SOFT_DEPTH {
            min
        } else {
            self.rng.range(min.max(1).min(hi), hi)
        };
        let items = o.get("items").unwrap_or(&Value::Bool(true));
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            out.push(self.value(items, &format!("{path}/items[{i}]"), depth + 1)?);
        }
        Ok(Value::Array(out))
    }

    fn string(&mut self, o: &Map<String, Value>, path: &str) -> Result<Value, SchemaError> {
        let min = o.get("minLength").and_then(Value::as_u64).unwrap_or(0);
        let max = o.get("maxLength").and_then(Value::as_u64);
        if min > MAX_MIN_LEN {
            return err(
                &format!("{path}/minLength"),
                format!("minLength above {MAX_MIN_LEN} is not supported"),
            );
        }
        if max.is_some_and(|m| m < min) {
            return err(path, "maxLength is below minLength");
        }
        let max = max.unwrap_or(u64::MAX);
        if let Some(f) = o.get("format").and_then(Value::as_str) {
            if let Some(v) = self.formatted(f) {
                let n = v.chars().count() as u64;
                if n < min || n > max {
                    return err(path, format!("no {f} string fits minLength/maxLength"));
                }
                self.text += v.len();
                return Ok(Value::String(v));
            }
        }
        let target = self.rng.range(min.max(3).min(max), min.max(20).min(max)) as usize;
        self.text += target;
        if self.text > MAX_TEXT {
            return err(
                path,
                format!("the value would hold more than {MAX_TEXT} bytes of strings"),
            );
        }
        let mut s = String::new();
        while s.len() < target {
            if !s.is_empty() {
                s.push(' ');
            }
            let w = *self.rng.pick(WORDS);
            s.push_str(w);
        }
        s.truncate(target);
        // A trailing space reads oddly; words are ASCII, so any byte is a boundary.
        if s.ends_with(' ') {
            s.pop();
            s.push('x');
        }
        Ok(Value::String(s))
    }

    /// A string in one of the [`FORMATS`] (None for others, left unconstrained in lenient use).
    fn formatted(&mut self, f: &str) -> Option<String> {
        let r = &mut *self.rng;
        let word = |r: &mut Rng| *r.pick(WORDS);
        Some(match f {
            "date-time" => format!(
                "20{:02}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                r.range(10, 35),
                r.range(1, 12),
                r.range(1, 28),
                r.below(24),
                r.below(60),
                r.below(60)
            ),
            "date" => format!(
                "20{:02}-{:02}-{:02}",
                r.range(10, 35),
                r.range(1, 12),
                r.range(1, 28)
            ),
            "time" => format!("{:02}:{:02}:{:02}", r.below(24), r.below(60), r.below(60)),
            "email" => format!("{}.{}@{}.com", word(r), word(r), word(r)),
            "uri" | "url" => format!("https://{}.example/{}", word(r), word(r)),
            "uuid" => {
                let (a, b) = (r.next_u64(), r.next_u64());
                format!(
                    "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xfff,
                    0x8000 | ((b >> 48) & 0x3fff),
                    b & 0xffff_ffff_ffff
                )
            }
            "ipv4" => format!("10.{}.{}.{}", r.below(256), r.below(256), r.range(1, 254)),
            "hostname" => format!("{}.{}.example", word(r), word(r)),
            _ => return None,
        })
    }

    fn bounds(o: &Map<String, Value>) -> (Option<f64>, bool, Option<f64>, bool) {
        let f = |k: &str| o.get(k).and_then(Value::as_f64);
        let (mut lo, mut lo_ex) = (f("minimum"), false);
        if let Some(x) = f("exclusiveMinimum") {
            if lo.is_none_or(|l| x >= l) {
                (lo, lo_ex) = (Some(x), true);
            }
        }
        let (mut hi, mut hi_ex) = (f("maximum"), false);
        if let Some(x) = f("exclusiveMaximum") {
            if hi.is_none_or(|h| x <= h) {
                (hi, hi_ex) = (Some(x), true);
            }
        }
        (lo, lo_ex, hi, hi_ex)
    }

    fn integer(&mut self, o: &Map<String, Value>, path: &str) -> Result<Value, SchemaError> {
        const LIM: f64 = 9.0e15; // integers the generator uses, exact in f64 and i64
        let (lo, lo_ex, hi, hi_ex) = Self::bounds(o);
        let lo_i = lo.map(|l| {
            let c = l.ceil();
            if lo_ex && c == l {
                c + 1.0
            } else {
                c
            }
        });
        let hi_i = hi.map(|h| {
            let f = h.floor();
            if hi_ex && f == h {
                f - 1.0
            } else {
                f
            }
        });
        let (a, b) = match (lo_i, hi_i) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => (a, a + 100.0),
            (None, Some(b)) => (b - 100.0, b),
            (None, None) => (0.0, 100.0),
        };
        let (a, b) = (a.max(-LIM), b.min(LIM));
        if a > b {
            return err(
                path,
                format!("no integer within ±{LIM:e} lies within minimum/maximum"),
            );
        }
        let (a, b) = (a as i64, b as i64);
        let span = (b - a) as u64;
        let v = a + self.rng.below(span.saturating_add(1)) as i64;
        Ok(Value::from(v.clamp(a, b)))
    }

    fn number(&mut self, o: &Map<String, Value>, path: &str) -> Result<Value, SchemaError> {
        let (lo, lo_ex, hi, hi_ex) = Self::bounds(o);
        let (a, b) = match (lo, hi) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => (a, a + 100.0),
            (None, Some(b)) => (b - 100.0, b),
            (None, None) => (0.0, 100.0),
        };
        let ok = |x: f64| {
            x.is_finite()
                && (if lo_ex { x > a } else { x >= a })
                && (if hi_ex { x < b } else { x <= b })
        };
        let t = 0.05 + 0.9 * self.rng.unit();
        let raw = a * (1.0 - t) + b * t;
        let rounded = (raw * 100.0).round() / 100.0;
        let x = [rounded, raw, a / 2.0 + b / 2.0, a, b]
            .into_iter()
            .find(|&x| ok(x));
        match x.and_then(Number::from_f64) {
            Some(n) => Ok(Value::Number(n)),
            None => err(path, "no number lies within minimum/maximum"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refuses_unsupported_keywords_with_their_path() {
        let e = check(
            &json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}),
        )
        .unwrap_err();
        assert_eq!(e.path, "#/properties/a/pattern");
        assert!(check(&json!({"$ref": "#/$defs/missing"})).is_err());
        assert!(check(&json!({"type": "strange"})).is_err());
        assert!(check(&json!({"items": [{"type": "string"}]})).is_err());
        assert!(check(&json!(false)).is_err());
    }

    #[test]
    fn recursive_schemas_terminate_or_fail_cleanly() {
        let tree = json!({
            "$defs": {"node": {"type": "object", "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["name", "children"]}},
            "$ref": "#/$defs/node"
        });
        check(&tree).unwrap();
        for seed in 0..50 {
            generate(&tree, &mut Rng::new(seed)).unwrap();
        }
        // Infinitely required recursion: a clear error, no stack overflow.
        let bad = json!({"$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}}, "$ref": "#/$defs/a"});
        assert!(generate(&bad, &mut Rng::new(1)).is_err());
        let loop_ = json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"});
        assert!(generate(&loop_, &mut Rng::new(1)).is_err());
        // Too many elements.
        let wide = json!({"type": "array", "minItems": 4000, "items": {"type": "array", "minItems": 4000}});
        assert!(generate(&wide, &mut Rng::new(1)).is_err());
        let long = json!({"type": "array", "minItems": 100, "items": {"type": "string", "minLength": 4000}});
        assert!(generate(&long, &mut Rng::new(1)).is_err());
        // Bounds far outside what the generator makes: refused, not violated.
        assert!(generate(
            &json!({"type": "integer", "minimum": 1e300}),
            &mut Rng::new(1)
        )
        .is_err());
        let v = generate(
            &json!({"type": "number", "minimum": 1e300}),
            &mut Rng::new(1),
        )
        .unwrap();
        assert!(v.as_f64().unwrap() >= 1e300);
    }

    #[test]
    fn numbers_and_strings_respect_bounds() {
        for seed in 0..200 {
            let r = &mut Rng::new(seed);
            let v = generate(
                &json!({"type": "integer", "minimum": 3, "exclusiveMaximum": 5}),
                r,
            )
            .unwrap();
            assert!((3..5).contains(&v.as_i64().unwrap()));
            let v = generate(
                &json!({"type": "number", "exclusiveMinimum": 0.5, "maximum": 0.6}),
                r,
            )
            .unwrap();
            let x = v.as_f64().unwrap();
            assert!(x > 0.5 && x <= 0.6, "{x}");
            let v = generate(
                &json!({"type": "string", "minLength": 7, "maxLength": 9}),
                r,
            )
            .unwrap();
            let n = v.as_str().unwrap().chars().count();
            assert!((7..=9).contains(&n), "{v}");
            let v = generate(&json!({"type": "string", "format": "uuid"}), r).unwrap();
            assert_eq!(v.as_str().unwrap().len(), 36);
            let v = generate(&json!({"type": "string", "format": "date-time"}), r).unwrap();
            assert_eq!(v.as_str().unwrap().len(), 20, "{v}");
            let v = generate(&json!({"type": "array", "items": {"enum": [1, "a"]}, "minItems": 2, "maxItems": 2}), r).unwrap();
            assert_eq!(v.as_array().unwrap().len(), 2);
        }
        assert!(generate(
            &json!({"type": "integer", "minimum": 3, "maximum": 2}),
            &mut Rng::new(0)
        )
        .is_err());
    }

    #[test]
    fn vllm_tool_choice_required_schema() {
        // What vLLM (and kvrouter's frontend) send for `tool_choice: "required"`.
        let s = json!({"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": ["get_weather"]},
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "title": "City"}}, "required": ["city"]}},
             "required": ["name", "parameters"]}]}});
        check(&s).unwrap();
        for seed in 0..20 {
            let v = generate(&s, &mut Rng::new(seed)).unwrap();
            let calls = v.as_array().unwrap();
            assert!(!calls.is_empty());
            assert_eq!(calls[0]["name"], "get_weather");
            assert!(calls[0]["parameters"]["city"].is_string());
        }
    }

    #[test]
    fn python_style_text() {
        assert_eq!(
            to_text(&json!({"a": [1, 2], "b": "x"})),
            r#"{"a": [1, 2], "b": "x"}"#
        );
    }
}
