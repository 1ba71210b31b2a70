"""The Prometheus rules (deploy/prometheus): `promtool check rules`, the promtool unit tests,
every metric they read is one kvrouter exports, and end to end: a real Prometheus server
scrapes two real kvrouter frontends in front of mock workers, one told the workers' block size
and one told another, and KVRoutingSilentlyDegraded fires for the second only."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import DEPLOY, free_port, http_get, stop, wait_for

RULES = DEPLOY / "prometheus" / "kvrouter-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "kvrouter-rules.test.yml"
BLOCK = 16


def tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed (scripts/test installs Debian's prometheus package)")
    return exe


def test_promtool_check_rules():
    out = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests():
    out = subprocess.run([tool("promtool"), "test", "rules", str(RULE_TESTS)],
                         capture_output=True, text=True, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fired = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
             if t.get("exp_alerts")}
    assert alerts - fired == set(), f"alerts no unit test makes fire: {sorted(alerts - fired)}"


# --- A running stack ------------------------------------------------------------------------


class Stack:
    """Mock workers (block size 16) behind a kvrouter frontend in kv mode."""

    def __init__(self, kvrouter: str, tmp: Path, name: str, frontend_block_size: int | None):
        self.procs: list[subprocess.Popen] = []
        self.tmp = tmp
        mocker = subprocess.Popen(
            [kvrouter, "mocker", "--num-workers", "2", "--http-port", "0", "--block-size", str(BLOCK),
             "--speedup-ratio", "50", "--model-path", str(DEPLOY.parent / "models" / "qwen3")],
            stdout=subprocess.PIPE, stderr=(tmp / f"{name}-mocker.log").open("w"), text=True)
        self.procs.append(mocker)
        workers = [json.loads(mocker.stdout.readline()) for _ in range(2)]
        args = []
        if frontend_block_size is not None:
            # The router told another block size than the engines use, the workers registered
            # without theirs: what an operator gets by setting DYN_KV_CACHE_BLOCK_SIZE wrong.
            for w in workers:
                w.pop("block_size")
            args = ["--kv-cache-block-size", str(frontend_block_size)]
        wf = tmp / f"{name}-workers.jsonl"
        wf.write_text("".join(json.dumps(w) + "\n" for w in workers))
        self.port = free_port()
        self.frontend = subprocess.Popen(
            [kvrouter, "frontend", "--router-mode", "kv", "--http-port", str(self.port), "--no-admin",
             "--workers-file", str(wf), *args],
            stdout=(tmp / f"{name}-frontend.log").open("w"), stderr=subprocess.STDOUT)
        self.procs.append(self.frontend)
        wait_for(f"http://127.0.0.1:{self.port}/ready", self.frontend)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def complete(self, prompt: list[int]) -> dict:
        req = urllib.request.Request(
            f"http://{self.target}/v1/completions",
            data=json.dumps({"model": "Qwen/Qwen3-0.6B", "prompt": prompt, "max_tokens": 2}).encode(),
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def close(self):
        for p in reversed(self.procs):
            stop(p)


@pytest.fixture(scope="module")
def stacks(kvrouter_bin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stacks")
    good = Stack(kvrouter_bin, tmp, "agree", None)
    bad = Stack(kvrouter_bin, tmp, "disagree", 2 * BLOCK)
    yield good, bad
    good.close()
    bad.close()


def exported_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\w+)", line)
        if m:
            name, kind = m.groups()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[^{\s]+", line).group(0))
    return names


def test_rules_read_only_exported_metrics(stacks):
    good, _ = stacks
    good.complete(list(range(1000, 1100)))
    status, body = http_get(f"http://{good.target}/metrics")
    assert status == 200
    exported = exported_names(body.decode())
    used = set(re.findall(r"\bkvrouter_[a-z0-9_]+\b", RULES.read_text()))
    assert used, "no kvrouter metric in the rules"
    assert used - exported == set(), f"not exported by kvrouter: {sorted(used - exported)}"


# --- A real Prometheus server ---------------------------------------------------------------


def fast_rules(dest: Path) -> Path:
    """The rules as they are, evaluated every second and with every `for` shortened to 5 s
    (their expressions, labels and annotations unchanged)."""
    rules = yaml.safe_load(RULES.read_text())
    for g in rules["groups"]:
        g["interval"] = "1s"
        for r in g["rules"]:
            if "for" in r:
                r["for"] = "5s"
    path = dest / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prometheus(stacks, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    good, bad = stacks
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(fast_rules(tmp))],
        "scrape_configs": [{"job_name": "kvrouter", "static_configs": [
            {"targets": [good.target, bad.target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(tmp / "prometheus.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/-/ready", proc)
        yield url
    finally:
        stop(proc)


def api(url: str, path: str, **params) -> dict:
    q = f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(q, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def degraded_alerts(url: str) -> list[dict]:
    return [a for a in api(url, "alerts")["alerts"] if a["labels"]["alertname"] == "KVRoutingSilentlyDegraded"]


def test_prometheus_fires_when_block_sizes_disagree_and_not_when_they_agree(stacks, prometheus):
    good, bad = stacks
    stop_traffic = threading.Event()
    cached = {good.target: 0, bad.target: 0}

    def traffic():
        # A few prompts of 25 blocks of 16 tokens, each sent again and again: the engines find
        # them in their caches whichever worker gets them.
        prompts = [list(range(10_000 * k, 10_000 * k + 25 * BLOCK)) for k in range(1, 4)]
        i = 0
        while not stop_traffic.is_set():
            for s in stacks:
                usage = s.complete(prompts[i % len(prompts)])["usage"]
                cached[s.target] += usage["prompt_tokens_details"]["cached_tokens"]
            i += 1
            time.sleep(0.1)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 120
        firing = []
        while time.monotonic() < deadline and not firing:
            assert t.is_alive(), "traffic stopped"
            firing = [a for a in degraded_alerts(prometheus) if a["state"] == "firing"]
            time.sleep(1)
        assert firing, f"KVRoutingSilentlyDegraded never fired: {api(prometheus, 'alerts')}"
        assert {a["labels"]["instance"] for a in firing} == {bad.target}, firing
        assert firing[0]["labels"]["severity"] == "critical"
        # Both frontends were scraped and evaluated all along: the engines behind both report
        # hits; the router that agrees with its engines predicts them, the other does not.
        for s in stacks:
            assert cached[s.target] > 0, cached
        rate = {r["metric"]["instance"]: float(r["value"][1]) for r in
                api(prometheus, "query", query="kvrouter:router_predicted_cached_tokens:rate5m")["result"]}
        assert rate[good.target] > 0 and rate[bad.target] == 0, rate
        # A few more evaluations: agreement never even makes it pending.
        time.sleep(5)
        assert {a["labels"]["instance"] for a in degraded_alerts(prometheus)} == {bad.target}
    finally:
        stop_traffic.set()
        t.join(timeout=30)
