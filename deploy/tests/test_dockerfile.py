"""The Dockerfile. No Docker engine runs on these machines, so the image is not built here:
the file is parsed and checked (stages, locked build, non-root user, every COPY source present
and not ignored), and its runtime stage is reproduced in a chroot — the binary under test, its
shared libraries, the tokenizer where the Dockerfile puts it, the image's user and variables —
where the frontend must start and serve the vendored model, and the HEALTHCHECK command must
tell a serving container from a dead one."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, free_port, http_get, stop, wait_for

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out, stage, buf = [], -1, ""
    for line in DOCKERFILE.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        buf += " " + s[:-1] if s.endswith("\\") else " " + s
        if s.endswith("\\"):
            continue
        instr, _, args = buf.strip().partition(" ")
        buf = ""
        if instr.upper() == "FROM":
            stage += 1
        out.append((stage, instr.upper(), args.strip()))
    return out


def stage_of(name: str) -> int:
    for st, i, a in instructions():
        if i == "FROM" and a.split()[-1] == name:
            return st
    raise AssertionError(f"no stage {name}")


def final(instr: str) -> list[str]:
    last = max(st for st, _, _ in instructions())
    return [a for st, i, a in instructions() if st == last and i == instr]


def build_workdir() -> str:
    return [a for st, i, a in instructions() if st == stage_of("build") and i == "WORKDIR"][-1]


def test_stages_and_locked_build():
    froms = [a for _, i, a in instructions() if i == "FROM"]
    assert len(froms) == 2, froms
    assert froms[0].startswith("rust:") and froms[0].endswith(" AS build"), froms[0]
    assert re.match(r"debian:\S+-slim AS runtime$", froms[1]), froms[1]
    runs = " ".join(a for st, i, a in instructions() if st == stage_of("build") and i == "RUN")
    assert "cargo build --release --locked -p kvrouter --features etcd,nats,kubernetes" in runs
    assert "protobuf-compiler" in runs
    assert final("ENTRYPOINT") == ['["kvrouter"]']


def test_runs_as_a_non_root_user():
    (user,) = final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric uid (runAsNonRoot can check it)"
    runs = " ".join(final("RUN"))
    assert f"--uid {uid}" in runs and (not gid or f"--gid {gid}" in runs or gid == uid), runs


def ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    for p in patterns:
        for i in range(len(parts)):
            prefix = "/".join(parts[: i + 1])
            if fnmatch.fnmatch(prefix, p) or (p.startswith("**/") and fnmatch.fnmatch(parts[i], p[3:])):
                return True
    return False


def dockerignore() -> list[str]:
    return [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
            if l.strip() and not l.startswith("#")]


def test_dockerignore_keeps_build_outputs_out():
    pats = dockerignore()
    for p in ["target", "cli/fuzz/target", ".venv", ".git", "python/.venv"]:
        assert ignored(p, pats), p
    for p in ["Cargo.lock", "server/src/lib.rs", "models/qwen3/tokenizer.json", "docs/openai-contract.md"]:
        assert not ignored(p, pats), p


def test_every_copy_source_is_in_the_build_context():
    pats = dockerignore()
    copies = [a for _, i, a in instructions() if i == "COPY"]
    assert copies
    for a in copies:
        words = [w for w in a.split() if not w.startswith("--")]
        if "--from=" in a:
            continue
        for src in words[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            if src != ".":
                assert not ignored(src, pats), f"COPY {src}: excluded by .dockerignore"
    built = " ".join(a for st, i, a in instructions() if st == stage_of("build") and i == "RUN")
    for a in copies:
        if "--from=build" in a:
            src = a.split()[1]
            assert src in built, f"COPY --from=build {src}: the build stage does not make it"


def test_tokenizer_is_where_the_binary_looks():
    """vendored_model_dir() is <crate dir>/../models/qwen3, fixed at compile time: the crate
    dir in the image's build is <WORKDIR>/server, which must exist at run time for the `..`."""
    lib = (ROOT / "server" / "src" / "lib.rs").read_text()
    assert 'concat!(env!("CARGO_MANIFEST_DIR"), "/../models/qwen3")' in lib
    wd = build_workdir()
    assert f"COPY models/qwen3 {wd}/models/qwen3" in [f"COPY {a}" for a in final("COPY")]
    assert any(f"mkdir -p {wd}/server" in r for r in final("RUN"))


def healthcheck_script() -> str:
    (hc,) = final("HEALTHCHECK")
    cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert cmd[:2] == ["bash", "-c"]
    assert "/live" in cmd[2]
    return cmd[2]


def image_env() -> dict[str, str]:
    env = {}
    for a in final("ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", a)))
    return env


@pytest.fixture(scope="module")
def rootfs(kvrouter_bin, tmp_path_factory):
    """The runtime stage's file system, built by hand: the binary, the shared libraries it
    links, and the Dockerfile's COPY models/qwen3 and mkdir, with the build WORKDIR mapped to
    the checkout the binary under test was built in."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root (CI runs as root)")
    binary = Path(kvrouter_bin).read_bytes()
    compiled = f"{ROOT}/server/../models/qwen3".encode()
    assert compiled in binary, "the binary under test was not built from this checkout"
    root = tmp_path_factory.mktemp("rootfs")
    root.chmod(0o755)  # the image's / (pytest makes its directories 0700)
    (root / "usr/local/bin").mkdir(parents=True)
    shutil.copy2(kvrouter_bin, root / "usr/local/bin/kvrouter")
    libs = re.findall(r"(/\S+) \(0x", subprocess.run(["ldd", kvrouter_bin], capture_output=True,
                                                      text=True, check=True).stdout)
    for lib in libs:
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest)
    wd = build_workdir()
    for a in final("COPY"):
        src, dst = a.split()[-2:]
        if src.startswith("models/"):
            shutil.copytree(ROOT / src, root / dst.replace(wd, str(ROOT), 1).lstrip("/"))
    for r in final("RUN"):
        for d in re.findall(r"mkdir -p (\S+)", r):
            (root / d.replace(wd, str(ROOT), 1).lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777)
    return root


def run_in_image(rootfs: Path, port: int, log: Path) -> subprocess.Popen:
    user = final("USER")[0]
    env = {**image_env(), "DYN_HTTP_HOST": "127.0.0.1", "DYN_HTTP_PORT": str(port),
           "KVROUTER_ADMIN_PORT": str(free_port()), "PATH": "/usr/local/bin"}
    cmd = json.loads(final("CMD")[0])
    return subprocess.Popen([shutil.which("chroot") or "/usr/sbin/chroot", f"--userspec={user}", str(rootfs), "/usr/local/bin/kvrouter", *cmd],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_image_runs_the_frontend_as_its_user_with_the_vendored_tokenizer(rootfs, tmp_path):
    port = free_port()
    proc = run_in_image(rootfs, port, tmp_path / "frontend.log")
    try:
        wait_for(f"http://127.0.0.1:{port}/live", proc)
        status, body = http_get(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and b"Qwen/Qwen3-0.6B" in body, body
        uid = final("USER")[0].split(":")[0]
        owner = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s", owner, re.M), owner

        env = {"PATH": os.environ["PATH"], "DYN_HTTP_PORT": str(port), "KVROUTER_ROUTER_HTTP_PORT": str(free_port())}
        hc = subprocess.run(["bash", "-c", healthcheck_script()], env=env, timeout=10)
        assert hc.returncode == 0, "HEALTHCHECK fails on a serving frontend"
    finally:
        stop(proc)
    hc = subprocess.run(["bash", "-c", healthcheck_script()], env=env, timeout=10)
    assert hc.returncode != 0, "HEALTHCHECK passes with nothing listening"


def test_without_the_server_dir_the_tokenizer_is_not_found(rootfs, tmp_path):
    """The mkdir the Dockerfile does is needed: the same image without it fails to start."""
    server = rootfs / str(ROOT).lstrip("/") / "server"
    server.rmdir()
    try:
        proc = run_in_image(rootfs, free_port(), tmp_path / "frontend.log")
        assert proc.wait(timeout=60) != 0
        assert "loading the tokenizer" in (tmp_path / "frontend.log").read_text()
    finally:
        server.mkdir()
