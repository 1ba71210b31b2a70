#!/usr/bin/env python3
"""A pyzmq KV-event subscriber for kvrouter-wire's publisher tests.

    kv_sub.py --sub ENDPOINT --replay ENDPOINT [--topic T]

Prints "live <seq> <topic>" for each live message. On stdin "replay <from>" it asks the replay
ROUTER (DEALER, ["", from]) and prints one JSON line per reply
{"frames": n, "topic": str, "seq": int, "decoded": <msgpack decode>} up to and including the
end marker (seq -1), then "end".
"""
import argparse
import json
import sys
import threading

import msgpack
import zmq


def jsonable(v):
    if isinstance(v, bytes):
        return {"bytes_hex": v.hex()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sub", required=True)
    ap.add_argument("--replay", required=True)
    ap.add_argument("--topic", default="")
    a = ap.parse_args()
    ctx = zmq.Context()
    out = threading.Lock()

    def say(s):
        with out:
            print(s, flush=True)

    def live():
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, a.topic.encode())
        sub.connect(a.sub)
        while True:
            topic, seq, payload = sub.recv_multipart()
            msgpack.unpackb(payload)  # must decode
            say(f"live {int.from_bytes(seq, 'big')} {topic.decode()}")

    threading.Thread(target=live, daemon=True).start()
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "replay":
            d = ctx.socket(zmq.DEALER)
            d.connect(a.replay)
            d.send_multipart([b"", int(cmd[1]).to_bytes(8, "big")])
            while True:
                frames = d.recv_multipart()
                assert frames[0] == b"", frames
                body = frames[1:]
                topic, seq, payload = body if len(body) == 3 else (b"", *body)
                seq = int.from_bytes(seq, "big", signed=True)
                dec = msgpack.unpackb(payload) if payload else None
                keys = [list(e.keys()) if isinstance(e, dict) else None for e in dec[1]] if dec else None
                say(json.dumps({"frames": len(frames), "topic": topic.decode(), "seq": seq,
                                "decoded": jsonable(dec), "event_keys": keys}))
                if seq == -1:
                    break
            d.close()
            say("end")
        elif cmd and cmd[0] == "quit":
            break


if __name__ == "__main__":
    main()
