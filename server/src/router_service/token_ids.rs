//! Request bodies of the router API with their `token_ids` read in one pass over the text.
//!
//! A 4k-token prompt is ~28 KB of JSON: through serde, visiting each element cost ~30 ns a
//! token, and capturing the array raw then reading it still scanned it twice — three
//! quarters, then half of the router's CPU for a query. Here the top-level object is split
//! once: the `token_ids` array is parsed where it stands, every other member is copied as
//! text into a small object that serde reads as usual (so its checks and messages stay
//! serde's: unknown, missing, mistyped fields).

use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A request whose `token_ids` are filled in after serde has read the rest.
pub trait WithTokenIds: DeserializeOwned {
    /// Where the ids go (a field serde skips).
    fn token_ids_mut(&mut self) -> &mut Vec<u32>;
}

const NOT_IDS: &str = "`token_ids` must be an array of integers in 0..=4294967295";

/// Parse a request body. Errors: 400 for a body that is not a JSON object, a missing,
/// duplicated or malformed `token_ids`, or what serde finds wrong with the other members.
pub fn parse<T: WithTokenIds>(body: &[u8]) -> Result<T, ApiError> {
    let bad = |m: &str| ApiError::bad_request(format!("invalid body: {m}"));
    // Serde reads the other members first, so that an unknown field (`tokens`) is named
    // before the missing `token_ids`.
    let (ids, rest) = split(body).map_err(bad)?;
    let mut req: T = serde_json::from_slice(&rest).map_err(|e| {
        // Positions would point into the shortened text: leave them out.
        let msg = e.to_string();
        let at = format!(" at line {} column {}", e.line(), e.column());
        bad(msg.strip_suffix(&at).unwrap_or(&msg))
    })?;
    *req.token_ids_mut() =
        ids.ok_or_else(|| bad("missing field `token_ids`").param("token_ids"))?;
    Ok(req)
}

/// The `token_ids` of a JSON object body, and the object's other members as JSON text.
/// Errors: not an object, broken structure, or bad token ids. The other members' values are
/// only delimited here; serde checks them.
fn split(b: &[u8]) -> Result<(Option<Vec<u32>>, Vec<u8>), &'static str> {
    const NOT_OBJECT: &str = "the body must be a JSON object";
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return Err(NOT_OBJECT);
    }
    i += 1;
    let mut rest = Vec::with_capacity(256);
    rest.push(b'{');
    let mut ids = None;
    i = skip_ws(b, i);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return Err(NOT_OBJECT);
            }
            let key_start = i;
            let key_end = skip_string(b, i)?;
            i = skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return Err(NOT_OBJECT);
            }
            i = skip_ws(b, i + 1);
            if &b[key_start..key_end] == b"\"token_ids\"" {
                if ids.is_some() {
                    return Err("duplicate field `token_ids`");
                }
                let (v, end) = ids_at(&b[i..])?;
                ids = Some(v);
                i += end;
            } else {
                let end = skip_value(b, i)?;
                if rest.len() > 1 {
                    rest.push(b',');
                }
                rest.extend_from_slice(&b[key_start..end]);
                i = end;
            }
            i = skip_ws(b, i);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Err(NOT_OBJECT),
            }
        }
    }
    if skip_ws(b, i) != b.len() {
        return Err("trailing characters after the object");
    }
    rest.push(b'}');
    Ok((ids, rest))
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index after the string starting at `b[i]` (a `"`).
fn skip_string(b: &[u8], i: usize) -> Result<usize, &'static str> {
    let mut j = i + 1;
    while let Some(&c) = b.get(j) {
        match c {
            b'\\' => j += 2,
            b'"' => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err("unterminated string")
}

/// The index after the value starting at `b[i]`: a string, an object or array (nesting
/// counted, strings skipped), or a scalar (up to the next delimiter).
fn skip_value(b: &[u8], i: usize) -> Result<usize, &'static str> {
    match b.get(i) {
        None => Err("a value is missing"),
        Some(b'"') => skip_string(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&c) = b.get(j) {
                match c {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Err("unterminated object or array")
        }
        Some(_) => {
            let mut j = i;
            while !matches!(
                b.get(j),
                None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            ) {
                j += 1;
            }
            Ok(j)
        }
    }
}

/// Token ids from the text of a JSON array of non-negative integers (`[1, 2,3]`), the whole
/// of `s`. Errors: anything else (not an array; a sign, fraction, exponent, leading zero, or
/// a value over `u32::MAX`).
pub fn parse_token_ids(s: &[u8]) -> Result<Vec<u32>, &'static str> {
    match ids_at(s)? {
        (ids, end) if end == s.len() => Ok(ids),
        _ => Err(NOT_IDS),
    }
}

/// The token ids of the array at the start of `s`, and the index after its `]`.
fn ids_at(s: &[u8]) -> Result<(Vec<u32>, usize), &'static str> {
    if s.first() != Some(&b'[') {
        return Err(NOT_IDS);
    }
    let mut out = Vec::with_capacity(s.len().min(1 << 20) / 6 + 1);
    // One pass over the bytes: `v` and `digits` are the number being read; `need_value` says
    // a number must come next (after `[` or `,`) rather than a comma or the end.
    let (mut v, mut digits) = (0u64, 0u32);
    let mut need_value = true;
    let mut first_zero = false;
    for (i, &b) in s.iter().enumerate().skip(1) {
        match b {
            b'0'..=b'9' => {
                if digits == 0 {
                    if !need_value {
                        return Err(NOT_IDS); // two values without a comma
                    }
                    first_zero = b == b'0';
                } else if first_zero {
                    return Err(NOT_IDS); // a leading zero
                }
                // At most 10 digits (checked here): no overflow in u64 before the range check.
                v = v * 10 + u64::from(b - b'0');
                digits += 1;
                if digits > 10 {
                    return Err(NOT_IDS);
                }
            }
            b',' | b']' | b' ' | b'\t' | b'\n' | b'\r' => {
                if digits > 0 {
                    out.push(u32::try_from(v).map_err(|_| NOT_IDS)?);
                    (v, digits) = (0, 0);
                    need_value = false;
                }
                match b {
                    b',' if need_value => return Err(NOT_IDS), // `[,` or `,,`
                    b',' => need_value = true,
                    b']' if need_value && !out.is_empty() => return Err(NOT_IDS), // `,]`
                    b']' => return Ok((out, i + 1)),
                    _ => {}
                }
            }
            _ => return Err(NOT_IDS),
        }
    }
    Err(NOT_IDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Req {
        #[serde(skip)]
        token_ids: Vec<u32>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        extra: Option<serde_json::Value>,
    }

    impl WithTokenIds for Req {
        fn token_ids_mut(&mut self) -> &mut Vec<u32> {
            &mut self.token_ids
        }
    }

    #[test]
    fn token_ids_parse_as_serde_would_and_refuse_what_it_would() {
        for ok in ["[]", "[ ]", "[0]", "[1,2,3]", "[ 7 ,\n8\t, 4294967295 ]"] {
            let want: Vec<u32> = serde_json::from_str(ok).unwrap();
            assert_eq!(parse_token_ids(ok.as_bytes()), Ok(want), "{ok}");
        }
        for bad in [
            "",
            "1",
            "[",
            "[1",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[-1]",
            "[1.0]",
            "[1e3]",
            "[01]",
            "[4294967296]",
            "[12345678901]",
            "[\"1\"]",
            "[null]",
            "[[1]]",
            "{}",
            "[,]",
            "[1,,2]",
        ] {
            assert!(parse_token_ids(bad.as_bytes()).is_err(), "{bad:?}");
            assert!(serde_json::from_str::<Vec<u32>>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_rest_of_the_body_goes_through_serde() {
        let body = br#" { "name": "a,}]\"[{", "token_ids" : [5, 6],
                          "extra": {"x": [1, {"y": "}"}], "z": -1.5e3} } "#;
        let r: Req = parse(body).unwrap();
        let extra = serde_json::json!({"x": [1, {"y": "}"}], "z": -1.5e3});
        assert_eq!(
            r,
            Req {
                token_ids: vec![5, 6],
                name: Some("a,}]\"[{".into()),
                extra: Some(extra),
            }
        );
        let r: Req =
            parse(br#"{"token_ids": [1], "extra": {"a": [true, "]"]}, "name": "n"}"#).unwrap();
        assert_eq!(
            r,
            Req {
                token_ids: vec![1],
                name: Some("n".into()),
                extra: Some(serde_json::json!({"a": [true, "]"]})),
            }
        );
        for (body, why) in [
            (&b"[1, 2]"[..], "must be a JSON object"),
            (b"{}", "missing field `token_ids`"),
            (b"{\"name\": \"x\"}", "missing field `token_ids`"),
            (
                b"{\"token_ids\": [1], \"token_ids\": [2]}",
                "duplicate field",
            ),
            (b"{\"token_ids\": [1, -2]}", "array of integers"),
            (b"{\"token_ids\": \"1\"}", "array of integers"),
            (b"{\"token_ids\": [1]} x", "trailing characters"),
            (b"{\"token_ids\": [1], \"nam\": 1}", "unknown field `nam`"),
            (b"{\"token_ids\": [1], \"name\": 5}", "invalid type"),
            (
                b"{\"token_ids\": [1], \"name\": \"x}",
                "unterminated string",
            ),
            (b"{\"token_ids\": [1] \"name\": 5}", "must be a JSON object"),
        ] {
            let e = parse::<Req>(body).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(why), "{body:?}: {}", e.message);
            assert!(!e.message.contains(" column "), "{}", e.message);
        }
    }
}
