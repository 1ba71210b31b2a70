"""KvEventPublisher: vLLM-format frames on a real ZMQ PUB socket (read with pyzmq + msgpack, and
by kvrouter's own `kvrouter events` subscriber), the replay socket, arguments refused before
anything is published, and relay mode over recorded vLLM and SGLang frame streams."""

import json
import os
import pathlib
import struct
import subprocess
import time
from typing import Any, Dict, List, Optional

import msgpack
import pytest
import zmq

from helpers import REPO, FakeEngine, kvrouter_bin, Subscriber, capture, decode_batch, replay, u64, wait_for
from kvrouter import KvEventPublisher, RadixTree, compute_block_hash_for_seq

Ctx = zmq.Context[zmq.Socket[bytes]]

TOKENS = list(range(1, 49))  # 3 blocks of 16


def event_of(frames: List[bytes]) -> Dict[str, Any]:
    """The single event of a live message `[topic, seq, payload]`."""
    batch = decode_batch(frames[2])
    assert len(batch) == 3
    ts, events, dp_rank = batch
    assert isinstance(ts, float) and abs(ts - time.time()) < 60
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, dict)
    ev["_dp_rank"] = dp_rank
    return ev


def test_frames_sequence_numbers_and_replay(zctx: Ctx) -> None:
    with KvEventPublisher(worker_id=3, kv_block_size=16, dp_rank=0, topic="kv-events") as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and pub.replay_endpoint
        assert (pub.worker_id, pub.kv_block_size, pub.dp_rank, pub.topic) == (3, 16, 0, "kv-events")
        sub = Subscriber(zctx, pub.endpoint, b"kv-events")
        first = sub.join(pub.publish_cleared)
        start = pub.next_seq
        assert start is not None and start > first

        seq_a = pub.publish_stored(TOKENS[:32], 16, [-5, 2**63 + 7])
        seq_b = pub.publish_stored(TOKENS[32:], [16], [11], parent_hash=2**63 + 7, lora_name="lora-a", cache_salt="s")
        seq_c = pub.publish_removed([11, -5])
        seq_d = pub.publish_cleared()
        assert [seq_a, seq_b, seq_c, seq_d] == [start, start + 1, start + 2, start + 3]
        assert pub.next_seq == start + 4

        got = []
        for _ in range(4):
            frames = sub.recv()
            assert frames is not None and len(frames) == 3
            assert frames[0] == b"kv-events"
            got.append((struct.unpack(">Q", frames[1])[0], event_of(frames)))
        assert [s for s, _ in got] == [seq_a, seq_b, seq_c, seq_d]

        a, b, c, d = (e for _, e in got)
        # vLLM >= 0.24 map encoding; hashes as the unsigned 64-bit values (negatives bit-cast).
        assert a == {
            "type": "BlockStored",
            "block_hashes": [u64(-5), 2**63 + 7],
            "parent_block_hash": None,
            "token_ids": TOKENS[:32],
            "block_size": 16,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "_dp_rank": 0,
        }
        assert b["parent_block_hash"] == 2**63 + 7 and b["lora_name"] == "lora-a" and b["cache_salt"] == "s"
        assert c == {"type": "BlockRemoved", "block_hashes": [11, u64(-5)], "medium": "GPU", "_dp_rank": 0}
        assert d == {"type": "AllBlocksCleared", "_dp_rank": 0}

        # The replay ROUTER serves the same batches (vLLM >= 0.26 reply layout).
        replies = replay(zctx, pub.replay_endpoint, seq_a)
        assert [struct.unpack(">Q", r[1])[0] for r in replies] == [seq_a, seq_b, seq_c, seq_d]
        assert all(r[0] == b"kv-events" for r in replies)
        assert decode_batch(replies[0][2])[1][0]["block_hashes"] == [u64(-5), 2**63 + 7]
        assert len(replay(zctx, pub.replay_endpoint, 0)) == seq_d + 1
        sub.close()
    assert pub.next_seq is None
    with pytest.raises(RuntimeError, match="shut down"):
        pub.publish_cleared()
    pub.shutdown()  # idempotent


def test_publish_batch_and_dp_rank(zctx: Ctx) -> None:
    pub = KvEventPublisher(9, 4, dp_rank=2, replay_endpoint=None)
    assert pub.replay_endpoint is None
    seq = pub.publish_batch(
        [
            {"type": "removed", "block_hashes": [1]},
            {"type": "stored", "token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "num_block_tokens": [4, 4], "block_hashes": [2, 3]},
            {"type": "cleared"},
        ]
    )
    assert seq == 0
    with pytest.raises(ValueError, match=r"events\[1\]: unknown key 'tokens'"):
        pub.publish_batch([{"type": "cleared"}, {"type": "stored", "tokens": []}])
    with pytest.raises(ValueError, match=r"events\[0\]: unknown type 'evicted'"):
        pub.publish_batch([{"type": "evicted"}])
    with pytest.raises(ValueError, match=r"events\[0\]: missing 'block_hashes'"):
        pub.publish_batch([{"type": "removed"}])
    with pytest.raises(ValueError, match="empty"):
        pub.publish_batch([])
    assert pub.next_seq == 1
    sub = Subscriber(zctx, pub.endpoint)
    sub.join(pub.publish_cleared)
    pub.publish_batch([{"type": "removed", "block_hashes": [1]}, {"type": "cleared"}])
    frames = sub.recv()
    assert frames is not None
    _, events, rank = decode_batch(frames[2])
    assert rank == 2
    assert [e["type"] for e in events] == ["BlockRemoved", "AllBlocksCleared"]
    sub.close()
    pub.shutdown()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_block_tokens": 16, "block_hashes": [1, 2]}, ValueError, "token_ids has 48 tokens; 2 block"),
        ({"num_block_tokens": 8, "block_hashes": [1, 2, 3]}, ValueError, r"num_block_tokens\[0\] = 8"),
        ({"num_block_tokens": [16, 16], "block_hashes": [1, 2, 3]}, ValueError, "2 entries for 3 block_hashes"),
        ({"num_block_tokens": [16, 16, 15], "block_hashes": [1, 2, 3]}, ValueError, r"num_block_tokens\[2\] = 15"),
        ({"num_block_tokens": 16, "block_hashes": []}, ValueError, "empty"),
        ({"num_block_tokens": 16, "block_hashes": [1, "2", 3]}, TypeError, r"block_hashes\[1\] must be an int, not str"),
        ({"num_block_tokens": 16, "block_hashes": [1, 2.0, 3]}, TypeError, "not float"),
        ({"num_block_tokens": 16, "block_hashes": [1, 2, 2**64]}, OverflowError, r"block_hashes\[2\]"),
        ({"num_block_tokens": 16, "block_hashes": [1, 2, -(2**63) - 1]}, OverflowError, r"block_hashes\[2\]"),
        ({"num_block_tokens": 16, "block_hashes": [1, 2, 1]}, ValueError, "repeats"),
        ({"num_block_tokens": 16, "block_hashes": [1, 2, 3], "parent_hash": 2}, ValueError, "parent_hash is one of"),
        ({"num_block_tokens": 16, "block_hashes": [1, 2, 3], "parent_hash": "p"}, TypeError, "parent_hash must be an int"),
        ({"num_block_tokens": 16, "block_hashes": [1, 2, 3], "block_mm_infos": [None]}, ValueError, "1 entries for 3 blocks"),
        ({"num_block_tokens": 16, "block_hashes": [1, 2, 3], "is_eagle": True}, ValueError, "eagle"),
        ({"num_block_tokens": "16", "block_hashes": [1, 2, 3]}, TypeError, "num_block_tokens"),
    ],
)
def test_bad_arguments_raise_before_publishing(kwargs: Dict[str, Any], error: type, match: str) -> None:
    with KvEventPublisher(1, 16) as pub:
        with pytest.raises(error, match=match):
            pub.publish_stored(TOKENS, **kwargs)
        assert pub.next_seq == 0
        with pytest.raises(TypeError, match=r"token_ids\[0\]"):
            pub.publish_stored([None] * 48, 16, [1, 2, 3])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="nothing to remove"):
            pub.publish_removed([])
        with pytest.raises(TypeError):
            pub.publish_removed(["x"])  # type: ignore[list-item]
        assert pub.next_seq == 0
        # Eagle stores carry one look-ahead token.
        assert pub.publish_stored(TOKENS + [0], 16, [1, 2, 3], is_eagle=True) == 0


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="kv_block_size"):
        KvEventPublisher(1, 0)
    with pytest.raises(ValueError, match="need zmq_endpoint"):
        KvEventPublisher(1, 16, zmq_topic="kv")
    with pytest.raises(RuntimeError, match="zmq"):
        KvEventPublisher(1, 16, endpoint="bogus://x")
    with pytest.raises(OverflowError):
        KvEventPublisher(-1, 16)


def test_kvrouter_events_subscribes_as_to_vllm() -> None:
    """kvrouter's own subscriber (`kvrouter events`, the one the frontend runs per worker)
    reads our frames, recomputes each block's hash from its tokens, and the RadixTree fed with
    its output matches the prompt's own hashes."""
    exe = kvrouter_bin()
    if exe is None:
        pytest.skip("no kvrouter binary: run through scripts/test or `cargo build -p kvrouter`")
    assert exe.exists(), exe
    with KvEventPublisher(5, 16) as pub:
        # Published before the subscriber exists: it recovers them from the replay socket.
        pub.publish_stored(TOKENS[:32], 16, [101, 102])
        pub.publish_stored(TOKENS[32:], 16, [103], parent_hash=102, lora_name="l")
        pub.publish_removed([103])
        proc = subprocess.run(
            [str(exe), "events", "--connect", pub.endpoint, "--replay", str(pub.replay_endpoint),
             "--block-size", "16", "--worker-id", "5", "--count", "3"],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 3
    first = lines[0]["event"]["data"]["stored"]
    hashes = compute_block_hash_for_seq(TOKENS[:32], 16)
    assert [b["tokens_hash"] for b in first["blocks"]] == hashes
    assert [b["block_hash"] for b in first["blocks"]] == [101, 102]
    second = lines[1]["event"]["data"]["stored"]
    assert second["parent_hash"] == 102
    assert [b["tokens_hash"] for b in second["blocks"]] == compute_block_hash_for_seq(TOKENS[32:], 16, lora_name="l")
    assert lines[2]["event"]["data"] == {"removed": {"block_hashes": [103]}}
    tree = RadixTree()
    for line in lines[:2]:
        tree.apply_event(5, json.dumps(line))
    assert tree.find_matches(hashes).scores == {(5, 0): 2}


def engine_events(payload: bytes) -> List[Dict[str, Any]]:
    """The events of an engine payload (any vLLM/SGLang encoding) as maps with normalised
    hashes, for comparison with what the relay republished."""
    _, events, *_ = decode_batch(payload)
    out = []
    for ev in events:
        if isinstance(ev, list):  # vLLM <= 0.23 positional arrays
            tag = ev[0]
            if tag == "BlockStored":
                ev = {"type": tag, "block_hashes": ev[1], "parent_block_hash": ev[2], "token_ids": ev[3], "block_size": ev[4]}
            elif tag == "BlockRemoved":
                ev = {"type": tag, "block_hashes": ev[1]}
            else:
                ev = {"type": tag}
        norm: Dict[str, Any] = {"type": ev["type"]}
        if "block_hashes" in ev:
            norm["block_hashes"] = [u64(h) for h in ev["block_hashes"]]
        if ev["type"] == "BlockStored":
            p = ev.get("parent_block_hash")
            norm["parent_block_hash"] = None if p is None else u64(p)
            norm["token_ids"] = ev["token_ids"]
            norm["block_size"] = ev["block_size"]
        out.append(norm)
    return out


def relay_until_received(engine: FakeEngine, pub: KvEventPublisher) -> None:
    """The relay's SUB joins the engine's PUB some time after it starts: send empty batches
    (which the relay drops) until one arrives; the relay replays what it missed."""

    def received() -> bool:
        stats = pub.relay_stats()
        assert stats is not None
        if stats["received"] > 0:
            return True
        engine.send(msgpack.packb([time.time(), [], 0]))
        return False

    wait_for(received, what="the relay to receive")


@pytest.mark.parametrize(
    "name",
    [
        "vllm-0.33.0/shared-prefix.jsonl",
        "vllm-0.20.0/shared-prefix.jsonl",
        "vllm-0.11.0/basic.jsonl",
        "sglang-0.5.23/shared-prefix.jsonl",
        "vllm-0.33.0/mooncake-conversation-12req.jsonl",
        "vllm-0.33.0/basic-bytes-hashes.jsonl",
    ],
)
def test_relay_republishes_recorded_engine_streams(zctx: Ctx, name: str) -> None:
    frames = capture(name)
    engine = FakeEngine(zctx)
    payloads = [bytes.fromhex(f["payload_hex"]) for f in frames]
    for p in payloads:
        engine.send(p)
    pub = KvEventPublisher(1, 16, zmq_endpoint=engine.endpoint, zmq_replay_endpoint=engine.replay_endpoint)
    try:
        relay_until_received(engine, pub)
        wait_for(lambda: (pub.relay_stats() or {}).get("published") == len(payloads), what="republishing")
        stats = pub.relay_stats()
        assert stats is not None and stats["gaps"] == 1 and stats["recovered"] == 1 and stats["cleared"] == 0
        assert pub.replay_endpoint is not None
        out = replay(zctx, pub.replay_endpoint, 0)
        assert [struct.unpack(">Q", r[1])[0] for r in out] == list(range(len(payloads)))
        for reply, original in zip(out, payloads):
            _, events, rank = decode_batch(reply[2])
            assert rank == 0
            assert all(isinstance(e, dict) for e in events)  # re-encoded as maps
            assert engine_events(reply[2]) == engine_events(original)
    finally:
        pub.shutdown()
        engine.close()


def stored_map(hashes: List[int], parent: Optional[int], tokens: List[int], **extra: Any) -> Dict[str, Any]:
    ev: Dict[str, Any] = {
        "type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
        "token_ids": tokens, "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None,
    }
    ev.update(extra)
    return ev


def test_relay_normalises_and_clears_on_gaps_and_restarts(zctx: Ctx) -> None:
    engine = FakeEngine(zctx, with_replay=False)
    pub = KvEventPublisher(1, 16, dp_rank=0, zmq_endpoint=engine.endpoint)
    sub = Subscriber(zctx, pub.endpoint)
    try:
        relay_until_received(engine, pub)
        # Our own subscriber joins the relay's PUB.
        sub.join(pub.publish_cleared)

        def send(events: List[Dict[str, Any]], rank: Optional[int] = 0, seq: Optional[int] = None) -> None:
            engine.send(msgpack.packb([time.time(), events, rank]), seq)

        def recv_types() -> List[str]:
            frames = sub.recv()
            assert frames is not None
            return [e["type"] for e in decode_batch(frames[2])[1]]

        good = stored_map([1], None, TOKENS[:16])
        send([good, stored_map([2], 1, TOKENS[16:32], group_idx=1, kv_cache_spec_kind="sliding_window"),
              stored_map([3], 1, list(range(32)), block_size=32), stored_map([4], 1, TOKENS[16:32], locality="REMOTE")])
        frames = sub.recv()
        assert frames is not None
        _, events, rank = decode_batch(frames[2])
        assert rank == 0 and [e["block_hashes"] for e in events] == [[1]]
        send([good], rank=1)  # another dp rank: dropped whole
        send([{"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}])
        assert recv_types() == ["BlockRemoved"]
        # A gap without a replay endpoint: the relay clears, then goes on.
        send([good], seq=engine.next_seq + 1)
        assert recv_types() == ["AllBlocksCleared"]
        assert recv_types() == ["BlockStored"]
        # The engine restarts (seq back to 0): cleared again.
        send([good], seq=0)
        assert recv_types() == ["AllBlocksCleared"]
        assert recv_types() == ["BlockStored"]
        stats = pub.relay_stats()
        assert stats is not None
        assert stats["filtered_events"] == 3 and stats["restarts"] == 1 and stats["cleared"] == 2
        assert stats["dropped_batches"] >= 1
    finally:
        sub.close()
        pub.shutdown()
        engine.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _stream_messages(url: str, stream: str) -> List[Any]:
    """Every message of a JetStream stream, decoded from JSON (read with the nats-py client)."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out: List[Any] = []
        if info.state.messages == 0:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg(stream, seq)
            assert m.data is not None
            out.append((m.subject, json.loads(m.data)))
        return out
    finally:
        await nc.close()


def test_nats_server_publishes_to_the_event_plane(tmp_path: pathlib.Path) -> None:
    """With `nats_server` what the publisher sends also lands in the endpoint's JetStream stream
    (a real nats-server, read back with the nats-py client), as `kvrouter relay` publishes it:
    JSON arrays of §3.1 RouterEvents of our worker, ids from 0, the router's local hashes."""
    import asyncio
    import shutil

    server = shutil.which(os.environ.get("KVROUTER_NATS_SERVER", "nats-server"))
    assert server, "nats-server is not installed (scripts/test installs Debian's)"
    port = _free_port()
    proc = subprocess.Popen(
        [server, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    try:
        import socket

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(up, what="nats-server")
        with pytest.raises(ValueError, match="rank 0"):
            KvEventPublisher(worker_id=7, kv_block_size=16, dp_rank=1, nats_server=url)
        with pytest.raises(ValueError, match="nats_endpoint"):
            KvEventPublisher(worker_id=7, kv_block_size=16, nats_server=url, nats_endpoint="x")
        stream = "namespace-dynamo-component-backend-kv-events"
        msgs: List[Any] = []
        with KvEventPublisher(worker_id=7, kv_block_size=16, nats_server=url) as pub:
            # Published at once: what the relay's subscriber missed before it joined comes
            # from the publisher's replay ring (its join probe).
            pub.publish_stored(TOKENS, 16, [11, 12, 13])
            pub.publish_removed([13])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    msgs = asyncio.run(_stream_messages(url, stream))
                except Exception:  # the stream is created by the relay once NATS answers
                    msgs = []
                if sum(len(arr) for _, arr in msgs) >= 2:
                    break
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert msgs, "nothing reached the stream"
    assert {s for s, _ in msgs} == {"namespace.dynamo.component.backend.kv_events.7"}
    events = [e for _, arr in msgs for e in arr]
    assert [e["worker_id"] for e in events] == [7] * len(events)
    assert [e["event"]["event_id"] for e in events] == list(range(len(events)))
    stored = [e["event"]["data"]["stored"] for e in events if "stored" in e["event"]["data"]]
    removed = [e["event"]["data"]["removed"] for e in events if "removed" in e["event"]["data"]]
    assert len(stored) == 1 and len(removed) == 1
    assert [b["block_hash"] for b in stored[0]["blocks"]] == [11, 12, 13]
    assert [b["tokens_hash"] for b in stored[0]["blocks"]] == compute_block_hash_for_seq(TOKENS, 16)
    assert removed[0]["block_hashes"] == [13]
