"""The live dashboard (`GET /dashboard` on the admin port) in a real headless browser, Debian's
`chromium`, against a running `kvrouter up` while `kvrouter bench` sends load: the page shows
the workers and non-empty charts, a screenshot is taken mid-benchmark, hostile worker fields stay
text. And the Grafana dashboard (deploy/grafana/kvrouter.json): every query parses (promtool)
and reads only metric names kvrouter exports.

`KVROUTER_UPDATE_SCREENSHOT=1` also writes the mid-benchmark screenshot to docs/dashboard.png
(the README shows it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import DEPLOY, ROOT, free_port, stop, wait_for
from test_prometheus import exported_names

GRAFANA = DEPLOY / "grafana" / "kvrouter.json"
TOKEN = "dash-test-token"
WORKERS = 3


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.fail("chromium is not installed (scripts/test installs Debian's chromium package)")


class Up:
    """`kvrouter up`: mock workers behind a frontend, the admin API on its own port with a
    token."""

    def __init__(self, kvrouter: str, tmp: Path):
        self.kvrouter = kvrouter
        self.port, self.admin = free_port(), free_port()
        self.proc = subprocess.Popen(
            [kvrouter, "up", "--workers", str(WORKERS), "--speedup-ratio", "10",
             "--http-port", str(self.port), "--admin-port", str(self.admin), "--admin-token", TOKEN],
            stdout=(tmp / "up.log").open("w"), stderr=subprocess.STDOUT)
        wait_for(f"http://127.0.0.1:{self.port}/ready", self.proc)

    def admin_get(self, path: str, token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def up(kvrouter_bin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    u = Up(kvrouter_bin, tmp)
    u.tmp = tmp
    yield u
    stop(u.proc)


def browse(up: Up, out: Path, *, screenshot: bool = False, budget_ms: int = 4000,
           token: str | None = TOKEN) -> str:
    """The dashboard as the browser renders it after `budget_ms` of (virtual) time: the DOM
    (`--dump-dom`), or a PNG written to `out`."""
    profile = out.parent / f"chromium-profile-{time.monotonic_ns()}"
    url = f"http://127.0.0.1:{up.admin}/dashboard" + (f"#token={token}" if token else "")
    what = [f"--screenshot={out}"] if screenshot else ["--dump-dom"]
    r = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1400,1000",
         f"--virtual-time-budget={budget_ms}", *what, url],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def chart_points(dom: str, chart: str) -> int:
    m = re.search(rf'<svg[^>]*id="{chart}"[^>]*>', dom)
    assert m, f"no {chart} in the page"
    pts = re.search(r'data-points="(\d+)"', m.group(0))
    return int(pts.group(1)) if pts else 0


def test_page_is_served_and_its_data_needs_the_token(up):
    status, headers, body = up.admin_get("/dashboard", token=None)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert b"<svg" in body and b"https://" not in body
    for path in ("/v1/dashboard", "/v1/workers"):
        assert up.admin_get(path, token=None)[0] == 401
        assert up.admin_get(path, token="wrong")[0] == 401
    status, _, body = up.admin_get("/v1/dashboard")
    assert status == 200
    d = json.loads(body)
    assert d["window_secs"] == 600
    assert d["now"]["healthy_ranks"] == WORKERS
    assert set(d["series"]) >= {"t", "requests_per_s", "ttft_mean_s", "predicted_hit_rate",
                                "reported_hit_rate", "inflight"}
    assert len({len(v) for v in d["series"].values()}) == 1, "series of different lengths"


def test_without_the_token_the_page_asks_for_it(up):
    dom = browse(up, up.tmp / "no-token.png", token=None)
    assert 'data-state="auth"' in dom, dom[-3000:]
    assert '<form id="auth" autocomplete="off" class="show">' in dom
    assert '<tr class="worker"' not in dom


def test_dashboard_in_chromium_during_a_benchmark(up):
    bench = subprocess.Popen(
        [up.kvrouter, "bench", "--url", f"http://127.0.0.1:{up.port}", "--workload", "prefix",
         "--prefixes", "8", "--prefix-len", "512:1024", "--suffix-len", "32:64", "--requests", "100000",
         "--rate", "25", "--max-duration", "40", "--no-progress"],
        stdout=(up.tmp / "bench.log").open("w"), stderr=subprocess.STDOUT)
    try:
        # Some seconds of load in the ring first.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            d = json.loads(up.admin_get("/v1/dashboard")[2])
            s = d["series"]
            if sum(1 for v in s["requests_per_s"] if v > 0) >= 4 and any(v is not None for v in s["ttft_mean_s"]):
                break
            assert bench.poll() is None, (up.tmp / "bench.log").read_text()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail(f"no load in the dashboard's series after 30 s: {d}")

        indexed = d["indexed_blocks"]
        assert sorted(indexed) == [str(i) for i in range(WORKERS)], indexed
        assert sum(indexed.values()) > 0, indexed

        dom = browse(up, up.tmp / "dom.png")
        assert 'data-state="ok"' in dom, dom[-3000:]
        rows = re.findall(r'<tr class="worker" data-worker-id="(\d+)"', dom)
        assert sorted(rows) == [str(i) for i in range(WORKERS)], rows
        assert dom.count('class="healthy"') >= WORKERS
        for chart in ("chart-rate", "chart-ttft", "chart-hit", "chart-load"):
            assert chart_points(dom, chart) > 0, f"{chart} is empty"
        assert "<polyline" in dom

        shot = up.tmp / "dashboard.png"
        browse(up, shot, screenshot=True)
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, "an empty screenshot"
        assert bench.poll() is None, "the benchmark ended before the screenshot"
        if os.environ.get("KVROUTER_UPDATE_SCREENSHOT") == "1":
            shutil.copy(shot, ROOT / "docs" / "dashboard.png")
    finally:
        stop(bench)


def test_hostile_worker_fields_stay_text(up):
    hostile = '<img id="pwned" src=x onerror="document.title=1">'
    # The admin API only takes a bare http://host[:port] URL; the model name is free text.
    spec = {"url": "http://127.0.0.1:9", "model": hostile}
    req = urllib.request.Request(
        f"http://127.0.0.1:{up.admin}/v1/workers", data=json.dumps(spec).encode(), method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            wid = json.load(r)["id"]
    except urllib.error.HTTPError as e:
        pytest.fail(f"registering the hostile worker: {e.code} {e.read()!r}")
    try:
        dom = browse(up, up.tmp / "hostile.png")
        assert 'data-state="ok"' in dom, dom[-3000:]
        assert f'data-worker-id="{wid}"' in dom
        # Shown as text (serialized escaped), never parsed as an element.
        assert "<img" not in dom
        assert '&lt;img id="pwned" src=x onerror="document.title=1"&gt;' in dom
        assert "<title>kvrouter dashboard</title>" in dom
    finally:
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{up.admin}/v1/workers/{wid}", method="DELETE",
            headers={"authorization": f"Bearer {TOKEN}"}), timeout=10).close()


# --- Grafana --------------------------------------------------------------------------------


def grafana_queries() -> list[tuple[str, str]]:
    d = json.loads(GRAFANA.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"variable {v['name']}", v["definition"]))
    return out


def test_grafana_dashboard_has_the_pages_panels():
    titles = {p["title"] for p in json.loads(GRAFANA.read_text())["panels"]}
    assert {"Fleet", "Request rate", "Time to first token", "KV hit rate: predicted vs reported",
            "Load", "Indexed blocks", "Event stream lag"} <= titles


def test_grafana_queries_parse(tmp_path):
    """Each panel query, Grafana's variables given values, as a recording rule promtool checks."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (scripts/test installs Debian's prometheus package)")
    rules = []
    for i, (_, expr) in enumerate(grafana_queries()):
        if expr.startswith("label_values("):
            continue
        expr = expr.replace("$__rate_interval", "1m").replace('"$instance"', '".*"')
        assert "$" not in expr, expr
        rules.append({"record": f"grafana:query_{i}", "expr": expr})
    path = tmp_path / "grafana-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_queries_read_only_exported_metrics(up):
    status, _, _ = up.admin_get("/v1/dashboard")
    assert status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{up.port}/metrics", timeout=5) as r:
        exported = exported_names(r.read().decode())
    used = set()
    for _, expr in grafana_queries():
        used |= set(re.findall(r"\bkvrouter_[a-z0-9_]+\b", expr))
    assert len(used) >= 10, used
    assert used - exported == set(), f"not exported by kvrouter: {sorted(used - exported)}"
