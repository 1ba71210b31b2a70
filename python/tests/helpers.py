"""Helpers of the kvrouter package tests: KV event JSON builders, a ZMQ subscriber and
replay client speaking vLLM's wire format (pyzmq + msgpack), and a fake engine publishing
recorded frames with a replay ring."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack
import zmq

REPO = pathlib.Path(__file__).resolve().parents[2]
END_SEQ = b"\xff" * 8


def shared_dir() -> pathlib.Path:
    """`../shared` beside the repository, or `$KVROUTER_SHARED`."""
    return pathlib.Path(os.environ.get("KVROUTER_SHARED", REPO.parent / "shared"))


def capture(name: str) -> List[Dict[str, Any]]:
    """The recorded frames of `shared/data/kv-events/<name>` (one JSON object per message)."""
    path = shared_dir() / "data" / "kv-events" / name
    with open(path) as f:
        return [json.loads(line) for line in f]


def stored(
    event_id: int,
    blocks: Sequence[Tuple[int, int]],
    parent: Optional[int] = None,
    dp_rank: int = 0,
) -> bytes:
    """A JSON `KvCacheEvent` storing `(engine hash, local hash)` blocks."""
    ev = {
        "event_id": event_id,
        "data": {
            "stored": {
                "parent_hash": parent,
                "blocks": [{"block_hash": b, "tokens_hash": t} for b, t in blocks],
            }
        },
        "dp_rank": dp_rank,
    }
    return json.dumps(ev).encode()


def removed(event_id: int, hashes: Sequence[int], dp_rank: int = 0) -> bytes:
    """A JSON `KvCacheEvent` removing blocks by engine hash."""
    ev = {"event_id": event_id, "data": {"removed": {"block_hashes": list(hashes)}}, "dp_rank": dp_rank}
    return json.dumps(ev).encode()


def cleared(event_id: int, dp_rank: int = 0) -> bytes:
    return json.dumps({"event_id": event_id, "data": "cleared", "dp_rank": dp_rank}).encode()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def decode_batch(payload: bytes) -> List[Any]:
    """A msgpack `KVEventBatch` `[ts, events, dp_rank]`."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    assert isinstance(batch, list)
    return batch


def u64(v: Any) -> int:
    """An engine hash as the unsigned 64-bit value the wire normalises it to: signed values
    bit-cast, digests (vLLM with int hashes off) folded to their last 8 bytes, big-endian."""
    if isinstance(v, bytes):
        return int.from_bytes(v[-8:], "big")
    assert isinstance(v, int)
    return v & 0xFFFF_FFFF_FFFF_FFFF


class Subscriber:
    """A SUB socket on a publisher, as a kvrouter frontend (or any vLLM consumer) opens one."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, topic: bytes = b"") -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)

    def recv(self, timeout_ms: int = 5000) -> Optional[List[bytes]]:
        if self.sock.poll(timeout_ms) == 0:
            return None
        return self.sock.recv_multipart()

    def join(self, publish_probe: Callable[[], int], timeout: float = 10.0) -> int:
        """Publishes probes until one arrives (a PUB drops what it sends before the
        subscription reaches it); returns the seq of the first probe received. Later probes
        that were in flight are drained."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            publish_probe()
            msg = self.recv(100)
            if msg is not None:
                first = struct.unpack(">Q", msg[1])[0]
                while self.recv(200) is not None:
                    pass
                return int(first)
        raise AssertionError("the subscription never took effect")

    def close(self) -> None:
        self.sock.close()


def replay(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, start: int, timeout_ms: int = 5000) -> List[List[bytes]]:
    """Asks a replay ROUTER for every batch from `start`, as vLLM's consumers do (DEALER,
    `["", start as 8-byte big-endian]`); returns the reply bodies up to the end marker."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", struct.pack(">Q", start)])
        out: List[List[bytes]] = []
        while True:
            if dealer.poll(timeout_ms) == 0:
                raise AssertionError("replay: no end marker")
            frames = dealer.recv_multipart()
            assert frames[0] == b"", frames
            if frames[2] == END_SEQ:
                return out
            out.append(frames[1:])
    finally:
        dealer.close()


class FakeEngine:
    """A PUB socket plus a replay ROUTER holding every batch it published: the two sockets of
    a vLLM engine's `--kv-events-config`, fed with recorded or hand-made payloads."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], with_replay: bool = True, topic: bytes = b"") -> None:
        self.topic = topic
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint: str = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ring: List[Tuple[int, bytes]] = []
        self.lock = threading.Lock()
        self.next_seq = 0
        self.replay_endpoint: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if with_replay:
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind("tcp://127.0.0.1:*")
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._thread = threading.Thread(target=self._serve, args=(router,), daemon=True)
            self._thread.start()

    def send(self, payload: bytes, seq: Optional[int] = None) -> int:
        """Publishes one payload with the next seq (or `seq`); keeps it for replay."""
        with self.lock:
            s = self.next_seq if seq is None else seq
            self.next_seq = s + 1
            self.ring.append((s, payload))
        self.pub.send_multipart([self.topic, struct.pack(">Q", s), payload])
        return s

    def _serve(self, router: zmq.Socket[bytes]) -> None:
        while not self._stop.is_set():
            if router.poll(50) == 0:
                continue
            ident, _, start = router.recv_multipart()
            first = struct.unpack(">Q", start)[0]
            with self.lock:
                batches = [b for b in self.ring if b[0] >= first]
            for s, payload in batches:
                router.send_multipart([ident, b"", self.topic, struct.pack(">Q", s), payload])
            router.send_multipart([ident, b"", b"", END_SEQ, b""])
        router.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.pub.close()


def kvrouter_bin() -> Optional[pathlib.Path]:
    """kvrouter's binary: `$KVROUTER_BIN` (scripts/test sets it), or a debug build in
    `$CARGO_TARGET_DIR` or `target/`."""
    env = os.environ.get("KVROUTER_BIN")
    if env:
        return pathlib.Path(env)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    p = target / "debug" / "kvrouter"
    return p if p.exists() else None


class Mocker:
    """`kvrouter mocker`: mock vLLM workers (OpenAI API, prefix cache, ZMQ KV events) in a
    child process; `workers` are the JSON lines it prints (workers-file schema)."""

    def __init__(self, num_workers: int = 2, block_size: int = 16, *extra: str) -> None:
        import subprocess

        exe = kvrouter_bin()
        if exe is None:
            import pytest

            pytest.skip("no kvrouter binary: run through scripts/test or `cargo build -p kvrouter`")
        self.proc = subprocess.Popen(
            [str(exe), "mocker", "--num-workers", str(num_workers), "--block-size", str(block_size),
             "--speedup-ratio", "10", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout is not None
        self.workers: List[Dict[str, Any]] = []
        for _ in range(num_workers):
            line = self.proc.stdout.readline()
            if not line:
                self.close()
                raise AssertionError("kvrouter mocker exited before printing its workers")
            self.workers.append(json.loads(line))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
