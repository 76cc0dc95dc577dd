"""What third-party clients' own test suites found different from RabbitMQ 3.10.8 (issue 15):
channel numbers up to 65535, the close handshake with writes still in flight (pika, aio-pika,
Node amqplib), and the server's product property. Every test passes against both targets."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pika
import pytest
from pika.exceptions import ConnectionClosedByBroker

from conftest import REPO, TARGET

NODE_DIR = REPO / "tests" / "node"


def test_pika_opens_channel_65535(broker, qname):
    """RabbitMQ limits how many channels are open, not their numbers."""
    conn = broker.connect()
    try:
        assert conn._impl.params.channel_max == 2047
        ch = conn.channel(channel_number=65535)
        assert ch.channel_number == 65535
        ch.queue_declare(qname, exclusive=True)
        ch.basic_publish("", qname, b"on 65535")
        _, _, body = ch.basic_get(qname, auto_ack=True)
        assert body == b"on 65535"
        low = conn.channel()
        assert low.channel_number == 1
        ch.close()
    finally:
        conn.close()


def test_pika_channel_max_counts_open_channels(broker):
    conn = broker.connect(channel_max=3)
    try:
        for n in (10, 2000, 60000):
            conn.channel(channel_number=n)
        with pytest.raises(ConnectionClosedByBroker) as exc:
            conn.channel(channel_number=7)
        assert exc.value.reply_code == 530
        assert exc.value.reply_text == (
            "NOT_ALLOWED - number of channels opened (3) has reached the negotiated channel_max (3)"
        )
    finally:
        if conn.is_open:
            conn.close()


def test_product_property_per_target(broker):
    """The default `server-identity` is warren's own; RabbitMQ says RabbitMQ."""
    conn = broker.connect()
    try:
        props = conn._impl.server_properties
    finally:
        conn.close()
    want = {"rabbitmq": ("RabbitMQ", "3.10.8"), "warren": ("warren", None)}[TARGET]
    assert props["product"] == want[0]
    if want[1] is not None:
        assert props["version"] == want[1]
    caps = props["capabilities"]
    for c in ("publisher_confirms", "basic.nack", "consumer_cancel_notify", "connection.blocked",
              "authentication_failure_close", "per_consumer_qos", "direct_reply_to"):
        assert caps.get(c) is True, c


def test_aio_pika_close_with_publishes_pending(broker):
    """Producers keep publishing 1 MiB messages while the connection closes: close() returns
    cleanly and every producer ends with aiormq's closed-connection errors, never with a socket
    error (EPIPE, ECONNRESET) from a broker that dropped the socket under the client's writes."""
    import aio_pika
    import aiormq

    async def run() -> list[BaseException]:
        conn = await aio_pika.connect(f"amqp://guest:guest@{broker.host}:{broker.port}/", timeout=10)
        ch = await conn.channel(publisher_confirms=False)
        q = await ch.declare_queue("", exclusive=True)
        body = b"x" * (1 << 20)
        sent = 0
        errors: list[BaseException] = []

        async def producer() -> None:
            nonlocal sent
            while True:
                try:
                    await ch.default_exchange.publish(aio_pika.Message(body), routing_key=q.name)
                    sent += 1
                except Exception as e:  # what a pending publish is told
                    errors.append(e)
                    return

        tasks = [asyncio.create_task(producer()) for _ in range(8)]
        while sent < 10:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(conn.close(), 5)
        assert conn.is_closed
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending, f"{len(pending)} publishes still waiting after close"
        return errors

    errors = asyncio.run(run())
    assert len(errors) == 8
    for e in errors:
        # aiormq's FutureStore rejects with a bare Exception when its reader task ends (on
        # close-ok) before the writer gets back from drain(): a client race that a fast
        # close-ok triggers, seen against RabbitMQ too. The socket errors are what matter.
        # (aiormq's own errors subclass ConnectionError; a bare OSError would be the socket's.)
        closed = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError)
        assert isinstance(e, closed) or type(e) is Exception, repr(e)
        assert "reset" not in str(e).lower() and "broken pipe" not in str(e).lower(), repr(e)


def _node_ready() -> str | None:
    """Why the Node harness cannot run, or None."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not installed (scripts/setup-test-env installs the harness when they are)"
    if not (NODE_DIR / "node_modules" / "amqplib").is_dir():
        return "tests/node has no node_modules: run scripts/setup-test-env (npm ci in tests/node)"
    return None


@pytest.mark.timeout(60)
def test_amqplib_close_with_publishes_pending(broker):
    """Node amqplib queues publishes behind connection.close; the broker must keep reading after
    close-ok until the client closes, or the client's writes get EPIPE and its close() hangs."""
    why = _node_ready()
    if why:
        pytest.skip(why)
    url = f"amqp://guest:guest@{broker.host}:{broker.port}/%2F"
    for attempt in range(3):
        r = subprocess.run(
            ["node", str(NODE_DIR / "close_with_pending.js"), url, "5000"],
            capture_output=True, text=True, timeout=30, cwd=NODE_DIR,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"attempt {attempt + 1}: exit {r.returncode}\n{out}"
        assert "closed cleanly" in out, out
        if TARGET == "warren":
            # warren closes with a FIN once the client has closed; RabbitMQ resets (SO_LINGER 0).
            assert "note:" not in out, out
