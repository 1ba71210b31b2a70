#!/usr/bin/env python3
"""A pyzmq KV-event publisher driven over stdin, for kvrouter-wire's socket tests.

It behaves like vLLM's ZmqEventPublisher (PUB socket, 3-frame messages, replay ROUTER with a
ring buffer) but sends the *recorded* payloads of shared/data/kv-events and lets the test
script faults, including a hostile replay ring. Usage:

    kv_pub.py --pub tcp://127.0.0.1:* [--connect] [--replay tcp://127.0.0.1:*]
              [--layout new|old] [--topic T] FILE.jsonl...

Prints one JSON line {"endpoint", "replay"} once bound, then one "ok <next_seq> <cursor>" line
per command read from stdin:

    send N      publish the next N recorded payloads (seq assigned, buffered for replay)
    skip N      buffer the next N payloads for replay but do not send them live (a gap)
    garbage     publish [topic, seq, undecodable bytes] (consumes a seq)
    badframes   publish a 2-frame, a 4-frame and a bad-seq-length message (no seq consumed)
    oversize B  publish the next recorded payload padded to at least B bytes with an unknown
                field (still a decodable batch; consumes a seq, buffered for replay)
    drop_ring   forget the replay buffer (replay becomes incomplete)
    restart     sequence numbers start again at 0 and the buffer is emptied
    hostile M   how the replay ROUTER answers from now on (M and its arguments):
                  off            honestly (the default)
                  seq S          one batch (recorded payload 0) with seq S, then the end marker
                  dup            3 batches past the newest seq, then every buffered batch twice,
                                 then the end marker
                  extra          3 batches past the newest seq, then the buffered batches, then
                                 the end marker
                  stream B MS    a batch of B zero bytes every MS ms with seqs 2^40, 2^40+1, ...
                                 and no end marker, until the requester leaves (or 60 s)
    quit
"""
import argparse
import json
import sys
import threading
import time

import msgpack
import zmq

END = (2**64 - 1).to_bytes(8, "big")
FAR = 2**40


def load(files):
    out = []
    for f in files:
        with open(f) as fh:
            for line in fh:
                if line.strip():
                    out.append(bytes.fromhex(json.loads(line)["payload_hex"]))
    return out


def padded(payload, size):
    """The batch with an unknown field of `size` bytes added to its first event."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    event = batch[1][0]
    if isinstance(event, dict):
        event["x_test_padding"] = b"\0" * size
    else:
        event.append(b"\0" * size)
    return msgpack.packb(batch, use_bin_type=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pub", required=True)
    ap.add_argument("--connect", action="store_true", help="connect the PUB (vLLM non-wildcard mode)")
    ap.add_argument("--replay")
    ap.add_argument("--layout", choices=["new", "old"], default="new")
    ap.add_argument("--topic", default="")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()

    payloads = load(a.files)
    topic = a.topic.encode()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    if a.connect:
        pub.connect(a.pub)
        endpoint = a.pub
    else:
        pub.bind(a.pub)
        endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()

    lock = threading.Lock()
    ring = []  # (seq, payload)
    hostile = ["off"]
    seq = 0
    replay_ep = None
    stop = threading.Event()
    if a.replay:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        # Sending to a requester that left raises instead of dropping: ends a hostile stream.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.bind(a.replay)
        replay_ep = router.getsockopt(zmq.LAST_ENDPOINT).decode()

        def reply(ident, s, p):
            body = [s.to_bytes(8, "big"), p] if a.layout == "old" else [topic, s.to_bytes(8, "big"), p]
            router.send_multipart([ident, b""] + body, copy=False)

        def answer(ident, start):
            with lock:
                items = [(s, p) for s, p in ring if s >= start]
                mode, newest = list(hostile), seq
            extras = [(newest + i, payloads[0]) for i in range(3)]
            if mode[0] == "seq":
                items = [(int(mode[1]), payloads[0])]
            elif mode[0] == "dup":
                items = extras + [x for it in items for x in (it, it)]
            elif mode[0] == "extra":
                items = extras + items
            elif mode[0] == "stream":
                size, gap = int(mode[1]), int(mode[2]) / 1000.0
                blob, t0, i = b"\0" * size, time.monotonic(), 0
                while not stop.is_set() and time.monotonic() - t0 < 60:
                    reply(ident, FAR + i, blob)
                    i += 1
                    time.sleep(gap)
                return
            for s, p in items:
                reply(ident, s, p)
            end = [END, b""] if a.layout == "old" else [b"", END, b""]
            router.send_multipart([ident, b""] + end)

        def serve():
            while not stop.is_set():
                if not router.poll(50):
                    continue
                frames = router.recv_multipart()
                ident, start = frames[0], int.from_bytes(frames[-1], "big")
                try:
                    answer(ident, start)
                except zmq.ZMQError:
                    pass  # the requester left (EHOSTUNREACH)

        threading.Thread(target=serve, daemon=True).start()

    print(json.dumps({"endpoint": endpoint, "replay": replay_ep}), flush=True)
    cursor = 0

    def next_payload():
        nonlocal cursor
        p = payloads[cursor % len(payloads)]
        cursor += 1
        return p

    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        op, n = cmd[0], int(cmd[1]) if len(cmd) > 1 and cmd[1].isdigit() else 1
        if op in ("send", "skip"):
            for _ in range(n):
                p = next_payload()
                with lock:
                    ring.append((seq, p))
                if op == "send":
                    pub.send_multipart([topic, seq.to_bytes(8, "big"), p])
                with lock:
                    seq += 1
        elif op == "garbage":
            p = b"\xc1not msgpack"
            with lock:
                ring.append((seq, p))
            pub.send_multipart([topic, seq.to_bytes(8, "big"), p])
            with lock:
                seq += 1
        elif op == "oversize":
            p = padded(next_payload(), n)
            with lock:
                ring.append((seq, p))
            pub.send_multipart([topic, seq.to_bytes(8, "big"), p])
            with lock:
                seq += 1
        elif op == "badframes":
            pub.send_multipart([topic, b"only two"])
            pub.send_multipart([topic, seq.to_bytes(8, "big"), b"\x90", b"extra"])
            pub.send_multipart([topic, b"\x00\x01", b"\x90"])
        elif op == "drop_ring":
            with lock:
                ring.clear()
        elif op == "restart":
            with lock:
                ring.clear()
                seq = 0
        elif op == "hostile":
            with lock:
                hostile[:] = cmd[1:] or ["off"]
        elif op == "quit":
            break
        print(f"ok {seq} {cursor}", flush=True)
    stop.set()


if __name__ == "__main__":
    main()
