"""Resource alarms as a pika client sees them: a low memory watermark makes the broker send
connection.blocked to a publisher (and stop reading it) until consumers on another connection
drain the queue; then connection.unblocked, and the held-back publishes arrive.

warren: its own broker process with `--vm-memory-high-watermark 256KiB` (paging pushed beyond
the watermark), so publishing a few hundred KiB raises the alarm and draining clears it.

rabbitmq: RabbitMQ's watermark covers the whole Erlang VM (~100 MB at rest, measured as RSS that
does not shrink promptly when queues empty), so no message volume in a test raises and then
clears it reliably. There the test raises the alarm with `rabbitmqctl set_vm_memory_high_watermark
absolute 1` and clears it with `... 0.4` after the drain; everything the client sees is checked
the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pika
import pytest

from conftest import (
    _STARTED,
    TARGET,
    Broker,
    _addr_port,
    _wait_for_listeners,
    register_log,
    start_target,
    stop_process,
    unregister_log,
    warren_binary,
)

RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
BODY = b"x" * 10_240
WATERMARK = "256KiB"


def start_warren_with(tmp: Path, *extra: str) -> Broker:
    """Like conftest.start_warren, with extra command-line flags."""
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    args = [str(warren_binary()), "--amqp", "127.0.0.1:0", "--data-dir", str(data), *extra]
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    log_path = tmp / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=tmp, start_new_session=True,
        )
    _STARTED.append(proc)
    found = _wait_for_listeners(proc, log_path, {"amqp"}, timeout=20)
    return Broker(target="warren", proc=proc, log_path=log_path,
                  port=_addr_port(found["amqp"]), listeners=found)


class Alarm:
    """Raises and clears the memory alarm the way the target allows."""

    def __init__(self, broker: Broker, tmp: Path):
        self.broker = broker
        self.tmp = tmp
        self.node = None
        if broker.target == "rabbitmq":
            m = re.search(r"(warren-interop-[\w-]+@localhost)",
                          broker.log_path.read_text("utf-8", "replace"))
            assert m, "RabbitMQ node name not in its log"
            self.node = m.group(1)

    def _ctl(self, *args: str) -> None:
        # The node's Erlang cookie is in its HOME; /usr/sbin/rabbitmqctl would switch user.
        env = dict(os.environ, HOME=str(self.tmp))
        subprocess.run([RABBITMQCTL, "-n", self.node, *args], env=env, check=True,
                       capture_output=True, timeout=25)

    def before_publishing(self) -> None:
        if self.node:
            self._ctl("set_vm_memory_high_watermark", "absolute", "1")

    def after_drain(self) -> None:
        if self.node:
            self._ctl("set_vm_memory_high_watermark", "0.4")

    def log(self) -> str:
        return self.broker.log_path.read_text("utf-8", "replace")


@pytest.fixture
def alarm(tmp_path, tls_files):
    if TARGET == "rabbitmq":
        b = start_target(tmp_path, tls_files)
    else:
        b = start_warren_with(tmp_path, "--vm-memory-high-watermark", WATERMARK,
                              "--vm-memory-high-watermark-paging-ratio", "10")
    name = f"{b.target} alarm broker log ({b.log_path})"
    register_log(name, b.log_path)
    yield Alarm(b, tmp_path)
    unregister_log(name)
    stop_process(b.proc, timeout=4 if b.target == "rabbitmq" else 10)


def wait_for(what: str, cond, conns, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for c in conns:
            c.process_data_events(time_limit=0.02)


def test_low_memory_watermark_blocks_publisher_until_consumers_drain(alarm, qname):
    b = alarm.broker
    publisher = b.connect()
    events: list[tuple] = []
    publisher.add_on_connection_blocked_callback(
        lambda _c, frame: events.append(("blocked", frame.method.reason)))
    publisher.add_on_connection_unblocked_callback(lambda _c, _f: events.append(("unblocked",)))
    pch = publisher.channel()
    pch.queue_declare(qname)
    alarm.before_publishing()

    # Publish 10 KiB messages until the broker says the connection is blocked.
    sent = 0
    while not events:
        assert sent < 200, "no connection.blocked after 2 MB of messages"
        pch.basic_publish("", qname, BODY + str(sent).encode())
        sent += 1
        publisher.process_data_events(time_limit=0.01)
    assert events == [("blocked", "low on memory")]
    if b.target == "warren":
        assert sent >= 25, f"blocked after {sent} x 10 KiB, below the {WATERMARK} watermark"
        # The connection blocks on the memory counter at once; the alarm's log line follows
        # from the monitor task.
        deadline = time.monotonic() + 5
        while not re.search(r"alarm set resource=memory used=\d+ limit=262144", alarm.log()):
            assert time.monotonic() < deadline, "the memory alarm was never logged"
            time.sleep(0.02)
    # A few more publishes while blocked: not read by the broker until the alarm clears.
    for i in range(sent, sent + 5):
        pch.basic_publish("", qname, BODY + str(i).encode())
    sent += 5
    publisher.process_data_events(time_limit=0.2)

    # Another connection is not blocked: it consumes and acks during the alarm.
    consumer = b.connect()
    cch = consumer.channel()
    cch.basic_qos(prefetch_count=50)
    got: list[bytes] = []

    def on_message(ch, method, _props, body):
        got.append(body)
        ch.basic_ack(method.delivery_tag)

    cch.basic_consume(qname, on_message)
    wait_for("the consumer to drain the queue",
             lambda: cch.queue_declare(qname, passive=True).method.message_count == 0, [consumer])
    alarm.after_drain()
    # Draining clears the alarm: the publisher is unblocked and its held publishes arrive. The
    # alarm has no hysteresis (as RabbitMQ's): it clears as soon as the drain takes memory below
    # the watermark, and the held publishes may take it above again for a moment, so the
    # publisher may be blocked and unblocked more than once; it ends unblocked.
    wait_for("connection.unblocked and every message",
             lambda: len(got) == sent and events[-1:] == [("unblocked",)], [consumer, publisher])
    assert len(events) % 2 == 0
    assert events == [("blocked", "low on memory"), ("unblocked",)] * (len(events) // 2), events
    assert got == [BODY + str(i).encode() for i in range(sent)], "lost, duplicated or reordered"
    if b.target == "warren":
        assert re.search(r"alarm cleared resource=memory used=\d+ limit=262144", alarm.log())
    # The publisher works normally again.
    pch.basic_publish("", qname, b"after")
    wait_for("a publish after unblocking", lambda: got[-1:] == [b"after"], [consumer, publisher])
    publisher.close()
    consumer.close()
