"""The official `openai` SDK against a running kvrouter frontend.

Usage: python openai_sdk.py BASE_URL MODEL   (BASE_URL ends in /v1)
Exits non-zero on the first failed check.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)

ids = [m.id for m in client.models.list()]
assert ids == [model], ids

# Chat, streamed, with usage.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello"}],
    max_tokens=8,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage, roles = "", None, []
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        if ch.delta.role:
            roles.append(ch.delta.role)
        text += ch.delta.content or ""
assert roles == ["assistant"], roles
assert text, "no streamed content"
assert usage is not None and usage.completion_tokens == 8, usage
assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens >= 0

# Chat, not streamed.
resp = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
)
assert resp.choices[0].message.content, resp
assert resp.usage.prompt_tokens == 9, resp.usage

# Completions: token ids and text; a repeat of a long prompt hits the cache.
long_prompt = list(range(1000, 1000 + 1024))
client.completions.create(model=model, prompt=long_prompt, max_tokens=2)
import time

cached = 0
for _ in range(50):
    r = client.completions.create(model=model, prompt=long_prompt, max_tokens=2)
    cached = r.usage.prompt_tokens_details.cached_tokens
    if cached > 0:
        break
    time.sleep(0.05)
assert cached >= 960, f"cached_tokens {cached}"
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3)
assert r.choices[0].text and r.usage.completion_tokens == 3, r

# Errors surface as the SDK's exception types.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError:
    pass
try:
    client.chat.completions.create(model=model, messages=[], max_tokens=1)
    raise AssertionError("empty messages accepted")
except openai.BadRequestError:
    pass

print("openai sdk: all checks passed")
