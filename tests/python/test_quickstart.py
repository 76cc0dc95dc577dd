"""README's quick start, with a real client: the warren-lb command line of the quick start (read
from README.md, addresses swapped for free loopback ports) in front of the broker, and pika
publishing through it. Without publisher confirms some messages are lost, silently; with
confirms (and republishing what was not acked, as kombu does for Celery) none is.

The load balancer is the built binary (`warren-lb` next to the broker binary), so the flags are
the ones a user types. The consumer counts straight from the broker.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import uuid

import pika
import pika.exceptions
import pytest

from conftest import REPO, TARGET, register_log, stop_process, unregister_log, warren_binary

N = 400
SENTINEL = b"end"
RESET_AFTER = 40  # README's `--reset-after-publish 40`


def quick_start_lb_args() -> list[str]:
    """The words of README's `target/release/warren-lb --listen ...` line in `## Quick start`."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"^\s*target/release/warren-lb (--listen(?:[^\n]*\\\n)*[^\n]*)$", section, re.M)
    assert m, "README's quick start has no warren-lb line"
    words = shlex.split(m.group(1).replace("\\\n", " "))
    return [w for w in words if w != "&"]


@pytest.fixture
def lb(broker, tmp_path):
    words = quick_start_lb_args()
    assert "--reset-after-publish" in words, words
    assert words[words.index("--reset-after-publish") + 1] == str(RESET_AFTER), words
    args, it = [], iter(words)
    for w in it:
        args.append(w)
        if w in ("--listen", "--admin"):
            next(it)
            args.append("127.0.0.1:0")
        elif w == "--backend":
            next(it)
            args.append(f"{broker.host}:{broker.port}")
    binary = warren_binary().parent / "warren-lb"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} is missing: build the binaries first (`cargo build --bins`)", pytrace=False)
    log = tmp_path / "warren-lb.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(binary), *args], stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, RUST_LOG="info"), start_new_session=True)
    register_log(f"warren-lb log ({log})", log)
    deadline = time.monotonic() + 20
    addr = None
    while addr is None:
        m = re.search(r"listening listener=default addr=(\S+)", log.read_text("utf-8", "replace"))
        if m:
            addr = m.group(1)
        elif proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"warren-lb {' '.join(args)} did not listen:\n{log.read_text()}", pytrace=False)
        else:
            time.sleep(0.05)
    host, port = addr.rsplit(":", 1)
    yield host, int(port), log
    stop_process(proc)
    unregister_log(f"warren-lb log ({log})")


def through(broker, host: str, port: int) -> pika.BlockingConnection:
    """A connection through the balancer; a reset may hit the handshake, so it tries again."""
    last = None
    for _ in range(20):
        try:
            return pika.BlockingConnection(pika.ConnectionParameters(
                host=host, port=port, credentials=pika.PlainCredentials("guest", "guest"),
                connection_attempts=1, socket_timeout=5, stack_timeout=10))
        except pika.exceptions.AMQPError as e:
            last = e
    raise AssertionError(f"no connection through warren-lb: {last!r}")


def publish_without_confirms(broker, lb, queue: str) -> tuple[list[int], int]:
    """Publishes 0..N; a publish that raises is sent again on a new connection (the application
    knows about that one). Returns the ids whose basic_publish returned, and the connections."""
    host, port, _ = lb
    sent, conns, i = [], 0, 0
    while i < N:
        c = through(broker, host, port)
        conns += 1
        ch = c.channel()
        try:
            while i < N:
                ch.basic_publish("", queue, str(i).encode())
                sent.append(i)
                i += 1
            c.close()
        except pika.exceptions.AMQPError:
            continue
    return sent, conns


def publish_with_confirms(broker, lb, queue: str) -> tuple[list[int], int]:
    """Publishes 0..N, each confirmed before the next; an unconfirmed one goes out again on a
    new connection, as kombu's confirm_publish with retries does."""
    host, port, _ = lb
    sent, conns, i = [], 0, 0
    while i < N:
        c = through(broker, host, port)
        conns += 1
        try:
            ch = c.channel()
            ch.confirm_delivery()
            while i < N:
                ch.basic_publish("", queue, str(i).encode())  # returns once acked, raises if not
                sent.append(i)
                i += 1
            c.close()
        except pika.exceptions.AMQPError:
            continue
    return sent, conns


def resets_after_publish(log) -> int:
    """How many connections warren-lb's event log says it reset for the `reset-after-publish`
    rule. Without confirms, how many publishes a connection gets into the socket before it sees
    the reset is a matter of timing (all the rest may fit), so the connections the publisher
    opened are not a measure of the resets; the balancer's own events are."""
    return log.read_text("utf-8", "replace").count('"rule":"reset-after-publish"')


def received(broker, queue: str) -> dict[int, int]:
    """Sends the sentinel straight to the broker (confirmed) and counts every id delivered before it."""
    c = broker.connect()
    ch = c.channel()
    ch.confirm_delivery()
    ch.basic_publish("", queue, SENTINEL)
    seen: dict[int, int] = {}
    for _method, _props, body in ch.consume(queue, auto_ack=True, inactivity_timeout=30):
        assert body is not None, "the sentinel never arrived"
        if body == SENTINEL:
            break
        seen[int(body)] = seen.get(int(body), 0) + 1
    c.close()
    return seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("confirms", [False, True], ids=["no-confirms", "confirms"])
def test_the_quick_start_loses_messages_without_confirms_and_none_with(broker, lb, confirms):
    if TARGET != "warren":
        pytest.skip("the quick start runs warren-broker")
    queue = f"quickstart.{uuid.uuid4().hex[:8]}"
    c = broker.connect()
    c.channel().queue_declare(queue, durable=True)
    c.close()
    publish = publish_with_confirms if confirms else publish_without_confirms
    sent, conns = publish(broker, lb, queue)
    seen = received(broker, queue)
    lost = [i for i in sent if i not in seen]
    print(f"confirms={confirms}: sent {len(sent)} over {conns} connections, received {len(seen)}, "
          f"lost {len(lost)}, duplicated {sum(n - 1 for n in seen.values())}")
    resets = resets_after_publish(lb[2])
    assert 1 <= resets <= conns, f"{resets} reset-after-publish events for {conns} connections"
    if confirms:
        # Each connection has its 40th publish discarded by the reset, so it confirms 39 at most:
        # the 400 need at least 11 connections, whatever the timing.
        assert conns >= -(-N // (RESET_AFTER - 1)), conns
        assert len(sent) == N
        assert lost == [], lost
    else:
        assert lost, "without confirms, the resets after a publish lose messages"
