#!/usr/bin/env python3
"""Writes the seed and regression inputs of the fuzz targets into broker/fuzz/seeds/.

Each input is one client byte stream (protocol header included). `tests/fuzz_corpus.rs` replays
every file through the codec and the connection state machine in the normal test run, and
cargo-fuzz starts from them (`cargo +nightly fuzz run connection_state corpus/connection_state seeds`).
Regenerate with `python3 broker/fuzz/make_corpus.py` after changing a case below.
"""
import struct
from pathlib import Path

OUT = Path(__file__).resolve().parent / "seeds"
HEADER = b"AMQP\x00\x00\x09\x01"


def frame(kind, ch, payload):
    return struct.pack(">BHI", kind, ch, len(payload)) + payload + b"\xce"


def short(s):
    b = s.encode()
    return bytes([len(b)]) + b


def long(b):
    return struct.pack(">I", len(b)) + b


def table(entries):
    """entries: bytes of key/value pairs already encoded."""
    return long(entries)


def nested(levels, arrays=False):
    """A field table nested `levels` deep, every other level an array when `arrays`."""
    v = b"F" + table(b"")
    for i in range(1, levels):
        array = arrays and i % 2 == 1 and i != levels - 1
        v = (b"A" + long(v)) if array else (b"F" + table(short("k") + v))
    return v[1:]


def start_ok(props):
    return frame(1, 0, struct.pack(">HH", 10, 11) + props + short("PLAIN")
                 + long(b"\0guest\0guest") + short("en_US"))


def method(ch, cls, mid, args=b""):
    return frame(1, ch, struct.pack(">HH", cls, mid) + args)


def handshake():
    return (HEADER + start_ok(table(b""))
            + method(0, 10, 31, struct.pack(">HIH", 0, 131072, 0))
            + method(0, 10, 40, short("/") + short("") + b"\0")
            + method(1, 20, 10, short("")))


def queue_declare(ch, name, args):
    return method(ch, 50, 10, struct.pack(">H", 0) + short(name) + b"\x00" + args)


def publish(ch, rk, body, headers=None):
    flags = 0
    props = b""
    if headers is not None:
        flags |= 1 << 13
        props += headers
    return (method(ch, 60, 40, struct.pack(">H", 0) + short("") + short(rk) + b"\0")
            + frame(2, ch, struct.pack(">HHQH", 60, 0, len(body), flags) + props)
            + frame(3, ch, body))


CASES = {
    # The crash inputs of the security review: deep tables overflowed a thread's stack.
    "crash-start-ok-nested-1550": HEADER + start_ok(nested(1550)),
    "crash-headers-nested-5000": handshake() + queue_declare(1, "q", table(b""))
    + publish(1, "q", b"abc", nested(5000, arrays=True)),
    "crash-queue-arguments-nested-126": handshake() + queue_declare(1, "q", nested(126)),
    # The limit itself, both sides.
    "limit-headers-16": handshake() + publish(1, "q", b"ok", nested(16, arrays=True)),
    "limit-headers-17": handshake() + publish(1, "q", b"no", nested(17, arrays=True)),
    # Seeds: a normal session, and frame-level faults.
    "seed-publish-get-ack": handshake() + queue_declare(1, "q", table(b""))
    + publish(1, "q", b"hello") + method(1, 60, 70, struct.pack(">H", 0) + short("q") + b"\0")
    + method(1, 60, 80, struct.pack(">QB", 1, 0)),
    "seed-declared-4gib-frame": handshake() + struct.pack(">BHI", 1, 1, 0xFFFFFFF0),
    "seed-bad-frame-end": handshake() + frame(1, 1, struct.pack(">HH", 20, 40))[:-1] + b"\x00",
    "seed-unknown-frame-type": handshake() + frame(9, 1, b"x"),
    "seed-body-before-header": handshake() + frame(3, 1, b"body"),
    "seed-unknown-field-tag": HEADER + start_ok(table(short("k") + b"Z")),
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in CASES.items():
        (OUT / name).write_bytes(data)
    print(f"{len(CASES)} inputs in {OUT}")


if __name__ == "__main__":
    main()
