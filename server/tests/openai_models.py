"""The official `openai` SDK's model endpoints against a running kvrouter frontend:
`models.list` and `models.retrieve` (`GET /v1/models/{id}`, the id percent-encoded).

Usage: python openai_models.py BASE_URL MODEL   (BASE_URL ends in /v1)
Exits non-zero on the first failed check.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)

listed = list(client.models.list())
assert [m.id for m in listed] == [model], listed

m = client.models.retrieve(model)
assert m.id == model and m.object == "model" and m.owned_by == "kvrouter", m
assert m == listed[0], (m, listed[0])
# vLLM's extra field comes through.
assert (m.model_extra or {}).get("max_model_len", 0) > 0, m

for other in ["no-such-model", "Qwen/no-such-model"]:
    try:
        client.models.retrieve(other)
        raise AssertionError(f"unknown model {other!r} retrieved")
    except openai.NotFoundError as e:
        err = e.body if isinstance(e.body, dict) else {}
        # The SDK hands over the `error` object of the body.
        err = err.get("error", err)
        assert err.get("type") == "NotFoundError" and err.get("param") == "model", e.body

print("openai models: all checks passed")
