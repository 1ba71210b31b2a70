"""The official `openai` SDK, field by field, against a kvrouter frontend started with
`--tool-call-parser hermes --reasoning-parser qwen3` in front of mock workers that think and
call tools (issue 21). Each check is made streamed and not streamed where both exist.

Usage: python openai_fidelity.py BASE_URL MODEL   (BASE_URL ends in /v1)
Exits non-zero on the first failed check; prints one line per check.
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    }
]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def stream_chat(**kw):
    """Streamed chat, gathered per choice: content, reasoning, tool calls, finish, logprobs."""
    out = {}
    for chunk in client.chat.completions.create(model=model, stream=True, **kw):
        for ch in chunk.choices:
            o = out.setdefault(
                ch.index,
                {"content": "", "reasoning": "", "calls": {}, "finish": None, "logprobs": []},
            )
            d = ch.delta
            o["content"] += d.content or ""
            o["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                c = o["calls"].setdefault(tc.index, {"name": "", "arguments": ""})
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
            if ch.finish_reason:
                o["finish"] = ch.finish_reason
            if ch.logprobs and ch.logprobs.content:
                o["logprobs"] += ch.logprobs.content
    return out


# Tool calls, auto: parsed into tool_calls, arguments valid JSON against the schema.
r = client.chat.completions.create(model=model, messages=USER, tools=TOOLS, max_tokens=200)
m = r.choices[0].message
check("tools auto: tool_calls", m.tool_calls and m.tool_calls[0].function.name == "get_weather", m)
args = json.loads(m.tool_calls[0].function.arguments)
check("tools auto: arguments", isinstance(args.get("city"), str) and args.get("unit") in ("celsius", "fahrenheit"), args)
check("tools auto: finish_reason", r.choices[0].finish_reason == "tool_calls", r.choices[0].finish_reason)
check("reasoning: separated", bool(getattr(m, "reasoning_content", None)) and "<think>" not in (m.content or ""), m)
s = stream_chat(messages=USER, tools=TOOLS, max_tokens=200)[0]
check("tools auto, streamed", s["calls"] and s["calls"][0]["name"] == "get_weather", s)
check("tools auto, streamed: arguments", "city" in json.loads(s["calls"][0]["arguments"]), s)
check("tools auto, streamed: finish_reason", s["finish"] == "tool_calls", s)
check("reasoning, streamed", s["reasoning"] and "<think>" not in s["content"] + s["reasoning"], s)

# The conversation goes on after the tool answered: plain content.
follow = USER + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
]
r = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, max_tokens=16, extra_body=NO_THINK)
check("after a tool response: content", r.choices[0].message.content and not r.choices[0].message.tool_calls, r.choices[0].message)

# tool_choice required and named: held to a schema by the worker.
for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
    r = client.chat.completions.create(model=model, messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=200, extra_body=NO_THINK)
    tc = r.choices[0].message.tool_calls
    check(f"tool_choice {choice if isinstance(choice, str) else 'named'}", tc and tc[0].function.name == "get_weather" and "city" in json.loads(tc[0].function.arguments), r.choices[0])
    s = stream_chat(messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=200, extra_body=NO_THINK)[0]
    check(f"tool_choice {choice if isinstance(choice, str) else 'named'}, streamed", s["calls"] and s["calls"][0]["name"] == "get_weather", s)

# Reasoning off through the template: no reasoning_content.
r = client.chat.completions.create(model=model, messages=USER, max_tokens=8, extra_body=NO_THINK)
check("enable_thinking false: no reasoning", not getattr(r.choices[0].message, "reasoning_content", None) and r.choices[0].message.content, r.choices[0].message)

# Structured output: JSON mode and a JSON schema.
r = client.chat.completions.create(model=model, messages=USER, response_format={"type": "json_object"}, max_tokens=200, extra_body=NO_THINK)
check("response_format json_object", isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content)
schema = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "integer"}}, "required": ["city", "temp"]}
fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
r = client.chat.completions.create(model=model, messages=USER, response_format=fmt, max_tokens=200, extra_body=NO_THINK)
v = json.loads(r.choices[0].message.content)
check("response_format json_schema", isinstance(v["city"], str) and isinstance(v["temp"], int), v)
s = stream_chat(messages=USER, response_format=fmt, max_tokens=200, extra_body=NO_THINK)[0]
check("response_format json_schema, streamed", isinstance(json.loads(s["content"])["temp"], int), s)

# Logprobs in chat's shape.
r = client.chat.completions.create(model=model, messages=USER, logprobs=True, top_logprobs=3, max_tokens=6, extra_body=NO_THINK)
lp = r.choices[0].logprobs.content
check("logprobs: one per token", len(lp) == r.usage.completion_tokens, (len(lp), r.usage))
check("logprobs: top_logprobs", all(len(t.top_logprobs) == 3 and t.logprob <= 0 and t.bytes is not None for t in lp), lp[0])
s = stream_chat(messages=USER, logprobs=True, top_logprobs=2, max_tokens=6, extra_body=NO_THINK)[0]
check("logprobs, streamed", len(s["logprobs"]) == 6 and all(len(t.top_logprobs) == 2 for t in s["logprobs"]), s["logprobs"][:1])
c = client.completions.create(model=model, prompt="Once upon a time", logprobs=2, max_tokens=5)
check("completions logprobs", len(c.choices[0].logprobs.tokens) == 5 and len(c.choices[0].logprobs.top_logprobs) == 5, c.choices[0].logprobs)

# n choices, seed, stop.
r = client.chat.completions.create(model=model, messages=USER, n=3, max_tokens=5, seed=7, extra_body=NO_THINK)
check("n = 3", sorted(ch.index for ch in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 15, r.usage)
s = stream_chat(messages=USER, n=2, max_tokens=5, seed=7, extra_body=NO_THINK)
check("n = 2, streamed", sorted(s) == [0, 1] and all(o["finish"] for o in s.values()), s)
a = client.completions.create(model=model, prompt="Tell me a story", max_tokens=24, seed=42).choices[0].text
b = client.completions.create(model=model, prompt="Tell me a story", max_tokens=24, seed=42).choices[0].text
check("seed: same tokens", a == b and a, (a, b))
stop = a[len(a) // 2 : len(a) // 2 + 3]
if stop.strip():
    r = client.completions.create(model=model, prompt="Tell me a story", max_tokens=24, seed=42, stop=[stop])
    check("stop string", r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text and a.startswith(r.choices[0].text), (stop, r.choices[0]))

# Usage in every chunk.
n_chunks = 0
for chunk in client.chat.completions.create(model=model, messages=USER, max_tokens=4, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=NO_THINK):
    n_chunks += 1
    check_usage = chunk.usage is not None and chunk.usage.prompt_tokens > 0
    if not check_usage:
        check("continuous_usage_stats", False, chunk)
check("continuous_usage_stats", n_chunks >= 2)

# Refused fields name themselves.
for extra in [{"echo": True}, {"frobnicate": 1}, {"logprobs": True, "top_logprobs": 99}]:
    try:
        client.chat.completions.create(model=model, messages=USER, max_tokens=4, extra_body=extra)
        check(f"refused {extra}", False, "accepted")
    except openai.BadRequestError as e:
        check(f"refused {list(extra)[-1]}", list(extra)[-1] in str(e), e)

print("openai fidelity: all checks passed")
