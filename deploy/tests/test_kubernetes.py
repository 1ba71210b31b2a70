"""The Kubernetes manifests (deploy/kubernetes): every overlay renders with `kubectl kustomize`,
every object is valid against the Kubernetes schemas (`kubernetes-validate`, offline; the
ServiceMonitor CRD checked structurally here), references between objects resolve, the
workers files agree with the worker pods they name, and the kvrouter containers' flags and
variables are ones the real binary accepts: each kvrouter container is started from its
rendered configuration and must come up with the workers it was given."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import kubernetes_validate
import pytest
import yaml

from conftest import DEPLOY, free_port, http_get, stop, wait_for

K8S = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
# Custom resources kubernetes-validate has no schema for; checked by check_servicemonitor.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Annotations a worker pod carries (README "Deploy on Kubernetes").
ANNOTATIONS = {"http-port", "kv-events-port", "kv-replay-port", "block-size", "role", "engine", "model"}
ENV_PREFIXES = ("DYN_", "KVROUTER_", "NATS_", "ETCD_")


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / target)],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {target}:\n{out.stderr}"
    return tuple(o for o in yaml.safe_load_all(out.stdout) if o)


def objects(target: str, kind: str) -> list[dict]:
    return [o for o in render(target) if o["kind"] == kind]


def by_name(target: str, kind: str, name: str) -> dict:
    found = [o for o in objects(target, kind) if o["metadata"]["name"] == name]
    assert found, f"{target}: no {kind} named {name}"
    return found[0]


def workloads(target: str) -> list[dict]:
    return [o for o in render(target) if o["kind"] in ("Deployment", "StatefulSet")]


def kvrouter_containers(target: str):
    for w in workloads(target):
        for c in w["spec"]["template"]["spec"]["containers"]:
            if c["image"].split(":")[0].rsplit("/", 1)[-1] == "kvrouter":
                yield w, c


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kubectl_has_kustomize_5():
    """The manifests use Kustomize 5 features (labels, components); an older kubectl (Debian's
    kubernetes-client is 1.20) would not render them."""
    out = subprocess.run(["kubectl", "version", "--client", "-o", "json"],
                         capture_output=True, text=True, check=True)
    version = json.loads(out.stdout).get("kustomizeVersion", "v0")
    assert int(version.lstrip("v").split(".")[0]) >= 5, f"kubectl's kustomize is {version}"


def test_every_overlay_is_listed_in_the_readme():
    readme = (DEPLOY.parent / "README.md").read_text()
    for o in OVERLAYS:
        assert f"kubectl apply -k deploy/kubernetes/overlays/{o}" in readme, o
    for a in ANNOTATIONS:
        assert f"kvrouter.dev/{a}" in readme, a


def check_servicemonitor(target: str, sm: dict) -> list[str]:
    """The parts of the Prometheus Operator's ServiceMonitor schema these manifests use, and
    that it selects a Service of the render by labels and a named port of it."""
    errs = []
    allowed = {"apiVersion", "kind", "metadata"} | {"spec"}
    errs += [f"unknown field {k}" for k in sm if k not in allowed]
    spec = sm.get("spec") or {}
    errs += [f"unknown spec field {k}" for k in spec
             if k not in {"selector", "endpoints", "namespaceSelector", "jobLabel",
                          "targetLabels", "podTargetLabels", "sampleLimit"}]
    sel = (spec.get("selector") or {}).get("matchLabels")
    if not isinstance(sel, dict) or not sel:
        return errs + ["spec.selector.matchLabels missing"]
    services = [s for s in objects(target, "Service")
                if selects(sel, s["metadata"].get("labels", {}))]
    if not services:
        errs.append(f"selects no Service: {sel}")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return errs + ["spec.endpoints missing"]
    duration = re.compile(r"^(\d+(ms|s|m|h))+$")
    for e in endpoints:
        errs += [f"unknown endpoint field {k}" for k in e
                 if k not in {"port", "path", "interval", "scrapeTimeout", "scheme",
                              "honorLabels", "relabelings", "metricRelabelings"}]
        if not isinstance(e.get("port"), str):
            errs.append("endpoint port must be a port name")
        for s in services:
            if e.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                errs.append(f"Service {s['metadata']['name']} has no port named {e.get('port')}")
        if not str(e.get("path", "/metrics")).startswith("/"):
            errs.append("endpoint path must start with /")
        for k in ("interval", "scrapeTimeout"):
            if k in e and not duration.match(str(e[k])):
                errs.append(f"endpoint {k} {e[k]!r} is not a duration")
    return errs


@pytest.mark.parametrize("target", TARGETS)
def test_objects_are_valid(target):
    version = kubernetes_validate.latest_version()
    errors = []
    for o in render(target):
        name = f"{o['kind']}/{o['metadata']['name']}"
        if (o["apiVersion"], o["kind"]) in CRDS:
            errors += [f"{name}: {e}" for e in check_servicemonitor(target, o)]
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name}: {e.message} at {'/'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name}: no schema for {o['apiVersion']} {o['kind']}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve(target):
    """ConfigMaps, ServiceAccounts and headless Services that workloads name exist (Kustomize
    renames generated ConfigMaps with a hash), and Services and PodDisruptionBudgets select
    pods of the render."""
    errors = []
    names = {(o["kind"], o["metadata"]["name"]) for o in render(target)}
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(target)]
    for w in workloads(target):
        spec = w["spec"]["template"]["spec"]
        wname = f"{w['kind']}/{w['metadata']['name']}"
        if not selects(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]):
            errors.append(f"{wname}: selector does not match its pods")
        refs = [("ConfigMap", v["configMap"]["name"]) for v in spec.get("volumes", []) if "configMap" in v]
        for c in spec["containers"]:
            refs += [("ConfigMap", e["configMapRef"]["name"]) for e in c.get("envFrom", [])]
        if "serviceAccountName" in spec:
            refs.append(("ServiceAccount", spec["serviceAccountName"]))
        if w["kind"] == "StatefulSet":
            refs.append(("Service", w["spec"]["serviceName"]))
            svc = by_name(target, "Service", w["spec"]["serviceName"])
            if svc["spec"].get("clusterIP") != "None":
                errors.append(f"{wname}: its Service {svc['metadata']['name']} is not headless")
        errors += [f"{wname}: no {k} {n}" for k, n in refs if (k, n) not in names]
    for s in objects(target, "Service") + objects(target, "PodDisruptionBudget"):
        sel = s["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        if not any(selects(sel, labels) for labels in pod_labels) and target != "base":
            errors.append(f"{s['kind']}/{s['metadata']['name']} selects no pod")
    for rb in objects(target, "RoleBinding"):
        if ("Role", rb["roleRef"]["name"]) not in names:
            errors.append(f"RoleBinding {rb['metadata']['name']}: no Role {rb['roleRef']['name']}")
        for s in rb["subjects"]:
            if ("ServiceAccount", s["name"]) not in names or not s.get("namespace"):
                errors.append(f"RoleBinding {rb['metadata']['name']}: subject {s}")
    for o in render(target):
        for c in (o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])):
            if ":" not in c["image"].rsplit("/", 1)[-1]:
                errors.append(f"{o['kind']}/{o['metadata']['name']}: image {c['image']} has no tag")
    assert not errors, "\n".join(errors)


def test_discovery_role_grants_what_kubernetes_discovery_uses():
    """Kubernetes discovery (server/src/workers/discovery/kubernetes) lists and watches pods in
    its namespace, nothing else: the Role grants exactly that."""
    role = objects("base", "Role")[0]
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {("", "pods"): {"list", "watch"}}
    code = (DEPLOY.parent / "server/src/workers/discovery/kubernetes/mod.rs").read_text()
    calls = set(re.findall(r"self\.api\.(\w+)\(", code))
    assert calls == {"list", "watch"}, calls


@pytest.mark.parametrize("target", TARGETS)
def test_kvrouter_containers_are_probed_limited_and_unprivileged(target):
    found = list(kvrouter_containers(target))
    assert found
    for w, c in found:
        name = f"{w['metadata']['name']}/{c['name']}"
        assert c["livenessProbe"]["httpGet"]["path"] == "/live", name
        if c["args"][0] == "relay":
            # A sidecar: no readiness probe, which would take its engine out of Services.
            assert "readinessProbe" not in c, name
            port = c["livenessProbe"]["httpGet"]["port"]
            status = next(p["containerPort"] for p in c["ports"] if p["name"] == port)
            assert f"--system-port={status}" in c["args"], name
        else:
            assert c["readinessProbe"]["httpGet"]["path"] == "/ready", name
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
        pod = w["spec"]["template"]["spec"]
        non_root = c.get("securityContext", {}).get("runAsNonRoot",
                                                    pod.get("securityContext", {}).get("runAsNonRoot"))
        assert non_root is True, name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
    deployments = [w for w, _ in found if w["metadata"]["name"] == "kvrouter-frontend"]
    assert deployments, "no frontend"
    pdb = by_name(target, "PodDisruptionBudget", "kvrouter-frontend")
    assert selects(pdb["spec"]["selector"]["matchLabels"],
                   deployments[0]["spec"]["template"]["metadata"]["labels"])


# --- The kvrouter containers against the real binary ------------------------------------------


@functools.cache
def help_text(kvrouter_bin: str, command: str) -> str:
    out = subprocess.run([kvrouter_bin, command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, f"kvrouter {command} --help: {out.stderr}"
    return out.stdout


def container_env(target: str, c: dict, pod: str | None = None) -> dict[str, str | None]:
    """The container's environment as Kubernetes gives it (ConfigMaps resolved). A value from
    the downward API is None, or with `pod` (a pod's name, e.g. `vllm-0`) what that pod of the
    render would get: its name, namespace or ordinal."""
    env: dict[str, str | None] = {}
    for src in c.get("envFrom", []):
        env.update(by_name(target, "ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        env[e["name"]] = e.get("value")
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if field and pod is not None:
            env[e["name"]] = {
                "metadata.name": pod,
                "metadata.namespace": "kvrouter",
                "metadata.labels['apps.kubernetes.io/pod-index']": pod.rpartition("-")[2],
            }[field]
    return env


def expand(arg: str, env: dict[str, str | None]) -> str:
    """`$(VAR)` references in an argument expanded from the container's environment, as the
    kubelet does."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1)) or m.group(0), arg)


def discovers_pods(target: str, c: dict) -> bool:
    """Whether this kvrouter container finds its workers by Kubernetes discovery."""
    args = dict(a.partition("=")[::2] for a in c["args"][1:])
    backend = args.get("--discovery-backend") or args.get("--discovery") \
        or container_env(target, c).get("DYN_DISCOVERY_BACKEND")
    return backend == "kubernetes"


def worker_selector(target: str, c: dict) -> dict[str, str]:
    """The equality label selector a discovering container watches pods with."""
    args = dict(a.partition("=")[::2] for a in c["args"][1:])
    sel = args.get("--worker-selector") or container_env(target, c).get("KVROUTER_WORKER_SELECTOR") \
        or "kvrouter.dev/worker=true"
    terms = [t.split("=", 1) for t in sel.split(",")]
    assert all(len(t) == 2 and "!" not in t[0] for t in terms), f"not an equality selector: {sel}"
    return dict(terms)


def selected_pods(target: str, selector: dict[str, str]) -> list[tuple[dict, str]]:
    """The worker pods of the render `selector` selects: (StatefulSet, pod name)."""
    return [(s, f"{s['metadata']['name']}-{i}") for s in objects(target, "StatefulSet")
            if selects(selector, s["spec"]["template"]["metadata"]["labels"])
            for i in range(s["spec"]["replicas"])]


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


@pytest.mark.parametrize("target", TARGETS)
def test_flags_and_variables_are_accepted(target, kvrouter_bin):
    """Every flag of a kvrouter container is in `kvrouter <command> --help`, and every
    DYN_*/KVROUTER_*/NATS_*/ETCD_* variable it is given is one that command reads."""
    errors = []
    for w, c in kvrouter_containers(target):
        command, args = c["args"][0], c["args"][1:]
        text = help_text(kvrouter_bin, command)
        for f in flags(args):
            if not re.search(rf"(^|[\s,]){re.escape(f)}([\s=<,]|$)", text, re.M):
                errors.append(f"{w['metadata']['name']}: kvrouter {command} has no flag {f}")
        for name in container_env(target, c):
            if name.startswith(ENV_PREFIXES) and f"[env: {name}=" not in text:
                errors.append(f"{w['metadata']['name']}: kvrouter {command} does not read {name}")
    assert not errors, "\n".join(errors)


def test_flag_check_catches_a_misspelled_flag(kvrouter_bin):
    text = help_text(kvrouter_bin, "frontend")
    assert re.search(r"(^|[\s,])--router-temperature([\s=<,]|$)", text, re.M)
    assert not re.search(r"(^|[\s,])--router-temprature([\s=<,]|$)", text, re.M)
    assert "[env: DYN_ROUTER_TEMPERATURE=" in text and "[env: DYN_ROUTER_TEMPRATURE=" not in text


@pytest.fixture(scope="module")
def nats_url():
    """A real nats-server with JetStream, for containers configured with NATS_SERVER."""
    exe = shutil.which("nats-server")
    if exe is None:
        pytest.fail("nats-server is not installed (scripts/test installs Debian's)")
    port = free_port()
    proc = subprocess.Popen([exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd",
                             f"/tmp/kvrouter-deploy-nats-{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield f"nats://127.0.0.1:{port}"
    stop(proc)
    shutil.rmtree(f"/tmp/kvrouter-deploy-nats-{port}", ignore_errors=True)


class FakeKubeApi:
    """Just enough of the Kubernetes API for a discovering kvrouter: `GET
    /api/v1/namespaces/kvrouter/pods` lists `pods` (a PodList), and with `watch=true` holds the
    watch open without events until stopped. Requests must carry the kubeconfig's token and
    the expected label selector (anything else is answered 403)."""

    TOKEN = "deploy-test-token"

    def __init__(self, pods: list[dict], selector: str):
        self.pods, self.selector, self.seen = pods, selector, []
        self.stopping = threading.Event()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.seen.append((url.path, q))
                if (url.path != "/api/v1/namespaces/kvrouter/pods"
                        or self.headers.get("Authorization") != f"Bearer {api.TOKEN}"
                        or q.get("labelSelector") != api.selector):
                    self.send_response(403)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if q.get("watch") in ("true", "1"):
                    self.end_headers()  # a close-delimited stream of events: none come
                    api.stopping.wait(60)
                    return
                body = json.dumps({"kind": "PodList", "apiVersion": "v1",
                                   "metadata": {"resourceVersion": "1000"},
                                   "items": api.pods}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        host, port = self.server.server_address[:2]
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": f"http://{host}:{port}"}}],
            "users": [{"name": "test", "user": {"token": self.TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        return path

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def pod_of(sts: dict, name: str, ip: str) -> dict:
    """A ready pod of StatefulSet `sts` as the API server lists it, at `ip`."""
    template = sts["spec"]["template"]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "kvrouter", "uid": str(uuid.uuid4()),
                     "resourceVersion": "1000",
                     "labels": {**template["metadata"]["labels"],
                                "apps.kubernetes.io/pod-index": name.rpartition("-")[2]},
                     "annotations": template["metadata"].get("annotations", {})},
        "spec": template["spec"],
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"},
                                  {"type": "ContainersReady", "status": "True"}]},
    }


@pytest.mark.parametrize("target", TARGETS)
def test_kvrouter_containers_start_with_their_rendered_configuration(target, kvrouter_bin,
                                                                     tmp_path, nats_url):
    """Each kvrouter container runs as the manifests configure it — its args, its variables,
    its mounted files — on loopback ports instead of the pod's: it must start and serve /live.
    A frontend or router must register exactly its workers: those of its workers file (their
    DNS names do not resolve here: they stay out of the routing set, as on a cluster before
    the pods are up), or with Kubernetes discovery the ready pods its selector selects, listed
    by a fake API server through a kubeconfig (each at its own loopback address). A relay
    sidecar must serve /metrics and reach NATS."""
    for w, c in kvrouter_containers(target):
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        mounts: dict[str, Path] = {}
        for m in c.get("volumeMounts", []):
            vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
            if "configMap" in vol:
                d = tmp_path / name / m["name"]
                d.mkdir(parents=True)
                for fname, text in by_name(target, "ConfigMap", vol["configMap"]["name"])["data"].items():
                    (d / fname).write_text(text)
                mounts[m["mountPath"]] = d

        def local(value: str) -> str:
            for mount, d in mounts.items():
                if value.startswith(mount + "/"):
                    return str(d) + value[len(mount):]
            return value

        port, admin = free_port(), free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(ENV_PREFIXES) and k not in ("KUBECONFIG", "POD_NAMESPACE")}
        pod_env = container_env(target, c, f"{name}-0")
        for k, v in pod_env.items():
            env[k] = local(v or "")
        env.update({"DYN_HTTP_HOST": "127.0.0.1", "DYN_HTTP_PORT": str(port),
                    "KVROUTER_ROUTER_HTTP_HOST": "127.0.0.1",
                    "KVROUTER_ROUTER_HTTP_PORT": str(port), "KVROUTER_ADMIN_PORT": str(admin)})
        if "NATS_SERVER" in env:
            env["NATS_SERVER"] = nats_url
        args = []
        for a in c["args"]:
            a = expand(a, pod_env)
            f, _, v = a.partition("=")
            if f in ("--http-port", "--system-port"):
                a = f"{f}={port}"
            elif f in ("--http-host", "--system-host"):
                a = f"{f}=127.0.0.1"
            elif v:
                a = f"{f}={local(v)}"
            args.append(a)
        api = None
        if c["args"][0] == "relay":
            expected = None
        elif discovers_pods(target, c):
            selector = worker_selector(target, c)
            chosen = selected_pods(target, selector)
            assert chosen, f"{name}: its selector {selector} selects no worker pod"
            pods = [pod_of(sts, pod, f"127.0.0.{10 + i}") for i, (sts, pod) in enumerate(chosen)]
            api = FakeKubeApi(pods, ",".join(f"{k}={v}" for k, v in selector.items()))
            env["KUBECONFIG"] = str(api.kubeconfig(tmp_path / f"{name}.kubeconfig"))
            expected = {f"http://{p['status']['podIP']}:{p['metadata']['annotations']['kvrouter.dev/http-port']}"
                        for p in pods}
        else:
            workers_file = next((local(v) for k, v in
                                 [*(a.partition("=")[::2] for a in c["args"]),
                                  ("--workers-file", env.get("KVROUTER_WORKERS_FILE") or "")]
                                 if k == "--workers-file" and v), None)
            assert workers_file, f"{name}: no workers file"
            expected = {json.loads(l)["url"] for l in Path(workers_file).read_text().splitlines() if l.strip()}
        log = (tmp_path / f"{name}-{c['name']}.log").open("w")
        proc = subprocess.Popen([kvrouter_bin, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(f"http://127.0.0.1:{port}/live", proc)
            if expected is None:
                deadline = time.monotonic() + 30
                while "kvrouter_relay_publishing 1" not in http_get(f"http://127.0.0.1:{port}/metrics")[1].decode():
                    assert time.monotonic() < deadline, f"{name}/{c['name']}: the relay never reached NATS"
                    time.sleep(0.2)
                continue
            deadline = time.monotonic() + 30
            while True:
                workers = json.loads(wait_for(f"http://127.0.0.1:{admin}/v1/workers", proc))["workers"]
                got = {wk["spec"]["url"] for wk in workers}
                if got == expected or api is None or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert got == expected, f"{name}: registered {got}, expected {expected}"
            if api is not None:
                assert {wk["source"] for wk in workers} == {f"kubernetes:kvrouter/{p['metadata']['name']}" for p in pods}
                assert any(q.get("watch") == "true" for _, q in api.seen), api.seen
        finally:
            stop(proc)
            log.close()
            if api is not None:
                api.stop()
        assert "Error" not in (tmp_path / f"{name}-{c['name']}.log").read_text().split("\n")[0]


# --- Workers files against the worker pods ----------------------------------------------------


def engine_settings(c: dict) -> dict:
    """Model, block size, HTTP port and KV event ports of a vLLM or SGLang container, from its
    command line."""
    args = c["args"]
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                k, v = a, args[i + 1]
                i += 1
            else:
                k, v = a, ""
            opts[k] = v
        else:
            opts.setdefault("model", a)
        i += 1
    events = json.loads(opts["--kv-events-config"])
    port = lambda e: int(e.rsplit(":", 1)[1])  # noqa: E731
    return {
        # Which engine the command line starts: it decides how the router pins a rank.
        "engine": "sglang" if "sglang" in " ".join(c.get("command", [])) else "vllm",
        "model": opts.get("model") or opts.get("--model-path"),
        "block_size": int(opts.get("--block-size") or opts["--page-size"]),
        "http_port": int(opts["--port"]),
        "kv_events_port": port(events["endpoint"]),
        "kv_replay_port": port(events["replay_endpoint"]),
        "events_on": events.get("enable_kv_cache_events", True) and events.get("publisher", "zmq") == "zmq",
    }


# Every overlay brings worker pods (the base brings none).
WORKER_TARGETS = [f"overlays/{o}" for o in OVERLAYS]


@pytest.mark.parametrize("target", WORKER_TARGETS)
def test_workers_files_agree_with_the_worker_pods(target):
    """Each workers-file entry names a pod of a StatefulSet through its headless Service, with
    the ports, block size, role and model the pod's engine flags and kvrouter.dev/*
    annotations say; each worker pod is in a workers file or selected by a frontend's
    Kubernetes discovery (whose annotations must then say what its engine does); the kvrouter
    reading them uses the same block size. A block size that differs anywhere is the silent failure of KV
    routing (no overlap ever found)."""
    errors = []
    listed = set()
    for w, c in kvrouter_containers(target):
        if c["args"][0] == "relay":
            continue  # test_relay_sidecars_relay_their_own_pod
        env = container_env(target, c)
        args = dict(a.partition("=")[::2] for a in c["args"][1:])
        router_block = int(args.get("--router-block-size") or env.get("DYN_KV_CACHE_BLOCK_SIZE") or 0)
        spec = w["spec"]["template"]["spec"]
        if discovers_pods(target, c):
            # What Kubernetes discovery reads from each selected pod's annotations, checked as a
            # workers-file line naming the pod.
            lines = []
            for sts, pod in selected_pods(target, worker_selector(target, c)):
                ann = {k.removeprefix("kvrouter.dev/"): v for k, v in
                       sts["spec"]["template"]["metadata"].get("annotations", {}).items()}
                host = f"{pod}.{sts['spec']['serviceName']}"
                lines.append({
                    "url": f"http://{host}:{ann.get('http-port', 0)}",
                    "kv_events_endpoint": f"tcp://{host}:{ann.get('kv-events-port', 0)}",
                    "replay_endpoint": f"tcp://{host}:{ann.get('kv-replay-port', 0)}",
                    "block_size": int(ann.get("block-size", 0)),
                    "model": ann.get("model"), "role": ann.get("role", "both"),
                    "engine": ann.get("engine", "vllm"),
                })
            assert lines, f"{w['metadata']['name']}: its selector selects no worker pod"
        else:
            path = args.get("--workers-file") or env["KVROUTER_WORKERS_FILE"]
            mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            data = by_name(target, "ConfigMap", vol["configMap"]["name"])["data"]
            lines = [json.loads(l) for l in data[path[len(mount["mountPath"]) + 1:]].splitlines() if l.strip()]
            assert lines, f"{w['metadata']['name']}: empty workers file"
        for e in lines:
            u = urlparse(e["url"])
            pod, _, svc_name = u.hostname.partition(".")
            sts_name, _, ordinal = pod.rpartition("-")
            sts = by_name(target, "StatefulSet", sts_name)
            where = f"{w['metadata']['name']}: {e['url']}"
            if sts["spec"]["serviceName"] != svc_name:
                errors.append(f"{where}: {sts_name} pods are under {sts['spec']['serviceName']}")
            if not int(ordinal) < sts["spec"]["replicas"]:
                errors.append(f"{where}: {sts_name} has {sts['spec']['replicas']} replicas")
            listed.add(pod)
            ann = {k.removeprefix("kvrouter.dev/"): v for k, v in
                   sts["spec"]["template"]["metadata"]["annotations"].items()}
            if set(ann) != ANNOTATIONS:
                errors.append(f"{where}: annotations {sorted(ann)}")
                continue
            eng = engine_settings(sts["spec"]["template"]["spec"]["containers"][0])
            svc = by_name(target, "Service", svc_name)
            svc_ports = {p["port"] for p in svc["spec"]["ports"]}
            ev, rp = (urlparse(e[k].replace("tcp://", "http://")) for k in ("kv_events_endpoint", "replay_endpoint"))
            checks = {
                "http port": (u.port, int(ann["http-port"]), eng["http_port"]),
                "kv events port": (ev.port, int(ann["kv-events-port"]), eng["kv_events_port"]),
                "replay port": (rp.port, int(ann["kv-replay-port"]), eng["kv_replay_port"]),
                "block size": (e["block_size"], int(ann["block-size"]), eng["block_size"], router_block),
                "model": (e["model"], ann["model"], eng["model"]),
                "role": (e.get("role", "both"), ann["role"]),
                "engine": (e.get("engine", "vllm"), ann["engine"], eng["engine"]),
                "kv events host": (ev.hostname, rp.hostname, u.hostname),
            }
            for what, values in checks.items():
                if len(set(values)) != 1:
                    errors.append(f"{where}: {what} differs: {values}")
            if not eng["events_on"]:
                errors.append(f"{where}: the engine publishes no ZMQ KV events")
            for p in (u.port, ev.port, rp.port):
                if p not in svc_ports:
                    errors.append(f"{where}: Service {svc_name} does not list port {p}")
    worker_sets = [s for s in objects(target, "StatefulSet")
                   if "kvrouter.dev/block-size" in s["spec"]["template"]["metadata"].get("annotations", {})]
    assert worker_sets, f"{target}: no annotated worker StatefulSet"
    for sts in worker_sets:
        for i in range(sts["spec"]["replicas"]):
            if f"{sts['metadata']['name']}-{i}" not in listed:
                errors.append(f"pod {sts['metadata']['name']}-{i} is in no workers file")
    assert not errors, "\n".join(errors)


def test_relay_sidecars_relay_their_own_pod():
    """A relay sidecar (replicas-nats) relays its own pod's engine — on the pod's loopback, at
    the ports and block size the engine flags say — under the id the frontends' workers file
    gives that pod, for every ordinal of the StatefulSet."""
    target = "overlays/replicas-nats"
    relays = [(w, c) for w, c in kvrouter_containers(target) if c["args"][0] == "relay"]
    assert relays, "no relay sidecar"
    env = container_env(target, next(c for w, c in kvrouter_containers(target) if w["kind"] == "Deployment"))
    assert env["DYN_EVENT_PLANE"] == "nats"
    entries = {urlparse(e["url"]).hostname.partition(".")[0]: e for e in
               map(json.loads, filter(str.strip, by_name(target, "ConfigMap", next(
                   v["configMap"]["name"] for v in objects(target, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]
                   if "configMap" in v))["data"]["workers.jsonl"].splitlines()))}
    for sts, c in relays:
        eng = engine_settings(sts["spec"]["template"]["spec"]["containers"][0])
        for i in range(sts["spec"]["replicas"]):
            pod = f"{sts['metadata']['name']}-{i}"
            args = [expand(a, container_env(target, c, pod)) for a in c["args"]]
            (spec,) = [json.loads(a.partition("=")[2]) for a in args if a.startswith("--worker-json=")]
            assert spec["id"] == entries[pod]["id"], (pod, spec, entries[pod])
            assert spec["url"] == f"http://127.0.0.1:{eng['http_port']}", spec
            assert spec["kv_events_endpoint"] == f"tcp://127.0.0.1:{eng['kv_events_port']}", spec
            assert spec["replay_endpoint"] == f"tcp://127.0.0.1:{eng['kv_replay_port']}", spec
            assert spec["block_size"] == eng["block_size"] == entries[pod]["block_size"], spec
        assert container_env(target, c)["NATS_SERVER"] == env["NATS_SERVER"]
