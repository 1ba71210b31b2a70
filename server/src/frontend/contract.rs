//! The request contract: every field of vLLM's `/v1/completions` and `/v1/chat/completions`
//! request (vLLM 0.11's `CompletionRequest` / `ChatCompletionRequest`, plus OpenAI's own), and
//! what the frontend does with it. A field is either honoured — forwarded to the worker's
//! completions API, or implemented here — or refused with a 400 that names it; none is
//! accepted and dropped. Unknown fields are refused too. `docs/openai-contract.md` is this
//! table in prose (a test keeps the two in step).

use serde_json::{Map, Value};

use super::request::Endpoint;
use crate::error::ApiError;

/// What happens to a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Sent to the worker unchanged in its `/v1/completions` request.
    Forward,
    /// Read by the frontend (prompt, limits, routing, response shape, parsers).
    Frontend,
    /// Accepted and not used, documented as such (`user`).
    Unused,
    /// Refused with a 400 naming the field unless absent, `null` or the given neutral value
    /// (e.g. `echo: false`).
    Refuse(Neutral),
}

/// The value a refused field may still carry (the one that asks for nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neutral {
    /// Only absent or `null`.
    Nothing,
    False,
    One,
    EmptyObject,
}

/// On which endpoint a field exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    Both,
    Chat,
    Completions,
}

use Disposition::*;
use On::*;

/// The contract: `(field, endpoints, disposition, why refused)`. Order follows the docs table.
pub const FIELDS: &[(&str, On, Disposition, &str)] = &[
    // What the frontend reads.
    ("model", Both, Frontend, ""),
    ("messages", Chat, Frontend, ""),
    ("prompt", Completions, Frontend, ""),
    ("stream", Both, Frontend, ""),
    ("stream_options", Both, Frontend, ""),
    ("max_tokens", Both, Frontend, ""),
    ("max_completion_tokens", Chat, Frontend, ""),
    ("n", Both, Frontend, ""),
    ("logprobs", Both, Frontend, ""),
    ("top_logprobs", Chat, Frontend, ""),
    ("tools", Chat, Frontend, ""),
    ("tool_choice", Chat, Frontend, ""),
    ("parallel_tool_calls", Chat, Frontend, ""),
    ("add_generation_prompt", Chat, Frontend, ""),
    ("chat_template_kwargs", Chat, Frontend, ""),
    ("reasoning_effort", Chat, Frontend, ""),
    ("add_special_tokens", Both, Frontend, ""),
    ("cache_salt", Both, Frontend, ""),
    ("nvext", Both, Frontend, ""),
    // Sampling and stopping, forwarded.
    ("temperature", Both, Forward, ""),
    ("top_p", Both, Forward, ""),
    ("top_k", Both, Forward, ""),
    ("min_p", Both, Forward, ""),
    ("seed", Both, Forward, ""),
    ("presence_penalty", Both, Forward, ""),
    ("frequency_penalty", Both, Forward, ""),
    ("repetition_penalty", Both, Forward, ""),
    ("length_penalty", Both, Forward, ""),
    ("logit_bias", Both, Forward, ""),
    ("allowed_token_ids", Both, Forward, ""),
    ("bad_words", Both, Forward, ""),
    ("stop", Both, Forward, ""),
    ("stop_token_ids", Both, Forward, ""),
    ("include_stop_str_in_output", Both, Forward, ""),
    ("ignore_eos", Both, Forward, ""),
    ("min_tokens", Both, Forward, ""),
    ("skip_special_tokens", Both, Forward, ""),
    ("spaces_between_special_tokens", Both, Forward, ""),
    ("priority", Both, Forward, ""),
    ("vllm_xargs", Both, Forward, ""),
    // Structured output, forwarded (vLLM's names across versions).
    ("response_format", Both, Forward, ""),
    ("structured_outputs", Both, Forward, ""),
    ("guided_json", Both, Forward, ""),
    ("guided_regex", Both, Forward, ""),
    ("guided_choice", Both, Forward, ""),
    ("guided_grammar", Both, Forward, ""),
    ("structural_tag", Both, Forward, ""),
    ("guided_decoding_backend", Both, Forward, ""),
    ("guided_whitespace_pattern", Both, Forward, ""),
    // Accepted, unused.
    ("user", Both, Unused, ""),
    // Refused.
    (
        "echo",
        Both,
        Refuse(Neutral::False),
        "echoing the prompt is not supported",
    ),
    (
        "suffix",
        Completions,
        Refuse(Neutral::Nothing),
        "suffix (fill-in-the-middle) is not supported",
    ),
    (
        "best_of",
        Completions,
        Refuse(Neutral::One),
        "best_of > 1 is not supported (vLLM V1 dropped it)",
    ),
    (
        "use_beam_search",
        Both,
        Refuse(Neutral::False),
        "beam search is not supported",
    ),
    (
        "prompt_logprobs",
        Both,
        Refuse(Neutral::Nothing),
        "prompt logprobs are not supported",
    ),
    (
        "return_tokens_as_token_ids",
        Both,
        Refuse(Neutral::False),
        "token-id logprob strings are not supported",
    ),
    (
        "return_token_ids",
        Both,
        Refuse(Neutral::False),
        "returning token ids is not supported",
    ),
    (
        "truncate_prompt_tokens",
        Both,
        Refuse(Neutral::Nothing),
        "prompt truncation is not supported; send a prompt that fits",
    ),
    (
        "prompt_embeds",
        Completions,
        Refuse(Neutral::Nothing),
        "prompt embeddings are not supported",
    ),
    (
        "continue_final_message",
        Chat,
        Refuse(Neutral::False),
        "continuing the final message is not supported",
    ),
    (
        "chat_template",
        Chat,
        Refuse(Neutral::Nothing),
        "a client-supplied chat template is not accepted",
    ),
    (
        "documents",
        Chat,
        Refuse(Neutral::Nothing),
        "documents are not supported by the served chat template",
    ),
    (
        "mm_processor_kwargs",
        Chat,
        Refuse(Neutral::Nothing),
        "multimodal input is not supported",
    ),
    (
        "logits_processors",
        Both,
        Refuse(Neutral::Nothing),
        "custom logits processors are not accepted",
    ),
    (
        "kv_transfer_params",
        Both,
        Refuse(Neutral::Nothing),
        "disaggregated prefill/decode parameters are not supported",
    ),
    (
        "request_id",
        Both,
        Refuse(Neutral::Nothing),
        "the response id is the frontend's (also in the x-request-id header)",
    ),
    (
        "functions",
        Chat,
        Refuse(Neutral::Nothing),
        "`functions` is deprecated; use `tools`",
    ),
    (
        "function_call",
        Chat,
        Refuse(Neutral::Nothing),
        "`function_call` is deprecated; use `tool_choice`",
    ),
    (
        "audio",
        Chat,
        Refuse(Neutral::Nothing),
        "audio output is not supported",
    ),
    (
        "modalities",
        Chat,
        Refuse(Neutral::Nothing),
        "output modalities other than text are not supported",
    ),
    (
        "prediction",
        Chat,
        Refuse(Neutral::Nothing),
        "predicted outputs are not supported",
    ),
    (
        "web_search_options",
        Chat,
        Refuse(Neutral::Nothing),
        "web search is not supported",
    ),
    (
        "store",
        Chat,
        Refuse(Neutral::False),
        "stored completions are not supported",
    ),
    (
        "metadata",
        Chat,
        Refuse(Neutral::Nothing),
        "metadata is only for stored completions, which are not supported",
    ),
    (
        "service_tier",
        Chat,
        Refuse(Neutral::Nothing),
        "service tiers are not supported",
    ),
];

fn applies(on: On, endpoint: Endpoint) -> bool {
    matches!(
        (on, endpoint),
        (Both, _) | (Chat, Endpoint::ChatCompletions) | (Completions, Endpoint::Completions)
    )
}

/// The disposition of `field` on `endpoint`, `None` when it is not part of that API.
pub fn disposition(endpoint: Endpoint, field: &str) -> Option<Disposition> {
    FIELDS
        .iter()
        .find(|(f, on, _, _)| *f == field && applies(*on, endpoint))
        .map(|(_, _, d, _)| *d)
}

/// Check every top-level field of a request against the contract. Errors: a 400 naming the
/// first unknown field, or the first refused field that asks for something.
pub fn check(endpoint: Endpoint, obj: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in obj {
        let Some((field, _, d, why)) = FIELDS
            .iter()
            .find(|(f, on, _, _)| f == k && applies(*on, endpoint))
        else {
            let api = match endpoint {
                Endpoint::Completions => "/v1/completions",
                Endpoint::ChatCompletions => "/v1/chat/completions",
            };
            return Err(ApiError::bad_request(format!(
                "unsupported field `{k}`: it is not part of {api} (see docs/openai-contract.md)"
            )));
        };
        if let Refuse(neutral) = d {
            let asks_nothing = v.is_null()
                || match neutral {
                    Neutral::Nothing => false,
                    Neutral::False => *v == Value::Bool(false),
                    Neutral::One => v.as_u64() == Some(1),
                    Neutral::EmptyObject => v.as_object().is_some_and(Map::is_empty),
                };
            if !asks_nothing {
                return Err(
                    ApiError::bad_request(format!("unsupported field `{k}`: {why}")).param(field),
                );
            }
        }
    }
    Ok(())
}

/// The fields forwarded to the worker unchanged, present and not `null`.
pub fn forwarded(endpoint: Endpoint, obj: &Map<String, Value>) -> Map<String, Value> {
    obj.iter()
        .filter(|(k, v)| !v.is_null() && disposition(endpoint, k) == Some(Forward))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn unknown_and_refused_fields_are_named_neutral_values_pass() {
        let e = check(
            Endpoint::ChatCompletions,
            &obj(serde_json::json!({"model": "m", "frobnicate": 1})),
        )
        .unwrap_err();
        assert!(e.message.contains("`frobnicate`"), "{}", e.message);
        let e = check(
            Endpoint::Completions,
            &obj(serde_json::json!({"echo": true})),
        )
        .unwrap_err();
        assert!(e.message.contains("`echo`"), "{}", e.message);
        // Chat-only fields are unknown on /v1/completions.
        let e = check(
            Endpoint::Completions,
            &obj(serde_json::json!({"tools": []})),
        )
        .unwrap_err();
        assert!(e.message.contains("`tools`"), "{}", e.message);
        for ok in [
            serde_json::json!({"echo": false, "best_of": 1, "use_beam_search": false, "suffix": null}),
            serde_json::json!({"user": "u-1", "seed": 3}),
        ] {
            check(Endpoint::Completions, &obj(ok)).unwrap();
        }
    }

    #[test]
    fn the_docs_table_lists_every_field_with_its_disposition() {
        let doc = include_str!("../../../docs/openai-contract.md");
        for (f, on, d, _) in FIELDS {
            let word = match d {
                Forward => "forwarded",
                Frontend => "frontend",
                Unused => "unused",
                Refuse(_) => "refused",
            };
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{f}` |")))
                .unwrap_or_else(|| panic!("docs/openai-contract.md has no row for `{f}`"));
            assert!(row.contains(word), "row of `{f}` should say {word}: {row}");
            let where_ = match on {
                Both => "both",
                Chat => "chat",
                Completions => "completions",
            };
            assert!(
                row.contains(where_),
                "row of `{f}` should say {where_}: {row}"
            );
        }
    }
}
