"""`/metrics` of a running kvrouter frontend through Python's `prometheus_client` parsers:
the default response with the classic text-format parser, the one negotiated with
`Accept: application/openmetrics-text` with the (strict) OpenMetrics parser. Both must type
every family (no "unknown"/"untyped"), counters as counters, histograms as histograms, and
agree on the families and their values. Expects at least one served request before the scrape.

Usage: python metrics_parse.py BASE_URL   (the server root, without /v1)
Exits non-zero on the first failed check.
"""
import sys
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_classic

base = sys.argv[1].rstrip("/")


def scrape(accept=None):
    req = urllib.request.Request(f"{base}/metrics")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def families(parse, text):
    out = {}
    for f in parse(text):
        assert f.name not in out, f"family {f.name} twice"
        out[f.name] = f
    return out


def total(fam, suffix=""):
    return sum(s.value for s in fam.samples if s.name == fam.name + suffix)


ctype, text = scrape()
assert ctype == "text/plain; version=0.0.4; charset=utf-8", ctype
classic = families(parse_classic, text)

ctype, text = scrape(
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
assert ctype == "application/openmetrics-text; version=1.0.0; charset=utf-8", ctype
assert text.endswith("# EOF\n"), text[-200:]
om = families(parse_openmetrics, text)

for name, parsed in [("classic", classic), ("openmetrics", om)]:
    untyped = sorted(f.name for f in parsed.values() if f.type not in ("counter", "gauge", "histogram"))
    assert not untyped, f"{name}: families not typed: {untyped}"
    for fam, typ in [
        ("kvrouter_frontend_requests", "counter"),
        ("kvrouter_frontend_input_tokens", "counter"),
        ("kvrouter_frontend_output_tokens", "counter"),
        ("kvrouter_router_decisions", "counter"),
        ("kvrouter_kv_events", "counter"),
        ("kvrouter_frontend_time_to_first_token_seconds", "histogram"),
        ("kvrouter_frontend_request_duration_seconds", "histogram"),
        ("kvrouter_frontend_inter_token_latency_seconds", "histogram"),
        ("kvrouter_router_overhead_seconds", "histogram"),
        ("kvrouter_frontend_inflight_requests", "gauge"),
        ("kvrouter_worker_active_requests", "gauge"),
        ("kvrouter_kv_index_entries", "gauge"),
    ]:
        assert fam in parsed, f"{name}: {fam} missing from {sorted(parsed)}"
        assert parsed[fam].type == typ, f"{name}: {fam} typed {parsed[fam].type}, not {typ}"
    reqs = parsed["kvrouter_frontend_requests"]
    assert total(reqs, "_total") > 0, f"{name}: no requests counted: {reqs.samples}"
    assert all(s.labels.get("status") for s in reqs.samples), reqs.samples
    ttft = parsed["kvrouter_frontend_time_to_first_token_seconds"]
    assert total(ttft, "_count") > 0, f"{name}: empty TTFT histogram"
    inf = sum(s.value for s in ttft.samples if s.name.endswith("_bucket") and s.labels["le"] in ("+Inf", "inf"))
    assert inf == total(ttft, "_count"), f"{name}: +Inf bucket {inf} != count"

assert sorted(classic) == sorted(om), (sorted(set(classic) ^ set(om)))
for fam in classic:
    assert classic[fam].type == om[fam].type, (fam, classic[fam].type, om[fam].type)
    if classic[fam].type == "counter":
        a = total(classic[fam], "_total")
        b = total(om[fam], "_total")
        # Scrape-time counters may move between the two scrapes; request counters do not.
        if fam.startswith("kvrouter_frontend_requests"):
            assert a == b, (fam, a, b)

print(f"metrics parse: all checks passed ({len(classic)} families)")
