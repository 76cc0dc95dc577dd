"""pika (BlockingConnection) against the broker: confirms, returns, nacks, get, consume, routing, errors."""

import time

import pika
import pytest
from pika.exceptions import (
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    NackError,
    ProbableAuthenticationError,
    UnroutableError,
)

PERSISTENT = pika.BasicProperties(delivery_mode=2)


def message_count(conn, queue):
    """Ready messages in `queue`, from a passive declare on a fresh channel."""
    ch = conn.channel()
    try:
        return ch.queue_declare(queue, passive=True).method.message_count
    finally:
        ch.close()


def test_confirm_delivery_publish_is_acked(ch, conn, qname):
    ch.queue_declare(qname, durable=True)
    ch.confirm_delivery()
    # basic_publish on a confirming channel blocks until basic.ack; raises on nack/return.
    for i in range(5):
        ch.basic_publish("", qname, f"m{i}".encode(), PERSISTENT, mandatory=True)
    assert message_count(conn, qname) == 5
    ch.queue_delete(qname)


def test_mandatory_publish_to_unbound_key_raises_unroutable(ch, qname):
    ch.exchange_declare(qname, "direct", auto_delete=True)
    ch.confirm_delivery()
    with pytest.raises(UnroutableError) as exc:
        ch.basic_publish(qname, "no-queue-bound-here", b"lost", mandatory=True)
    (returned,) = exc.value.messages
    assert returned.method.reply_code == 312
    assert returned.method.reply_text == "NO_ROUTE"
    assert returned.method.exchange == qname
    assert returned.method.routing_key == "no-queue-bound-here"
    assert returned.body == b"lost"
    # Unroutable without mandatory is confirmed silently; the channel stays usable.
    ch.basic_publish(qname, "no-queue-bound-here", b"dropped")
    ch.exchange_delete(qname)


def test_reject_publish_overflow_raises_nack(ch, conn, qname):
    ch.queue_declare(qname, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", qname, b"first")
    with pytest.raises(NackError) as exc:
        ch.basic_publish("", qname, b"second")
    assert "Nack" in repr(exc.value)
    assert message_count(conn, qname) == 1
    method, _, body = ch.basic_get(qname, auto_ack=True)
    assert body == b"first"
    ch.queue_delete(qname)


def test_basic_get_message_and_empty(ch, qname):
    ch.queue_declare(qname)
    assert ch.basic_get(qname) == (None, None, None)
    props = pika.BasicProperties(content_type="text/plain", headers={"k": "v"}, correlation_id="c-1")
    ch.basic_publish("", qname, b"hello", props)
    ch.basic_publish("", qname, b"world")
    method, got_props, body = ch.basic_get(qname)
    assert body == b"hello"
    assert method.redelivered is False
    assert method.message_count == 1  # messages left after this one
    assert got_props.content_type == "text/plain"
    assert got_props.headers == {"k": "v"}
    assert got_props.correlation_id == "c-1"
    ch.basic_ack(method.delivery_tag)
    method, _, body = ch.basic_get(qname, auto_ack=True)
    assert body == b"world" and method.message_count == 0
    assert ch.basic_get(qname) == (None, None, None)
    ch.queue_delete(qname)


def test_consumer_receives_n_messages_in_order_with_ack(ch, conn, qname):
    n = 200
    ch.queue_declare(qname)
    ch.confirm_delivery()
    for i in range(n):
        ch.basic_publish("", qname, str(i).encode())
    ch.basic_qos(prefetch_count=20)
    got = []

    def on_message(c, method, props, body):
        got.append(int(body))
        c.basic_ack(method.delivery_tag)

    tag = ch.basic_consume(qname, on_message)
    deadline = time.monotonic() + 15
    while len(got) < n and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.5)
    assert got == list(range(n))
    ch.basic_cancel(tag)
    assert message_count(conn, qname) == 0
    ch.queue_delete(qname)


def test_nack_with_requeue_redelivers_with_redelivered_flag(ch, conn, qname):
    ch.queue_declare(qname)
    ch.basic_publish("", qname, b"again")
    method, _, body = ch.basic_get(qname)
    assert (body, method.redelivered) == (b"again", False)
    ch.basic_nack(method.delivery_tag, requeue=True)
    method, _, body = ch.basic_get(qname)
    assert (body, method.redelivered) == (b"again", True)
    # nack without requeue drops it
    ch.basic_nack(method.delivery_tag, requeue=False)
    assert ch.basic_get(qname) == (None, None, None)

    # The same through a consumer: unacked deliveries come back redelivered when it is cancelled.
    ch.basic_publish("", qname, b"consumed")
    seen = []
    tag = ch.basic_consume(qname, lambda c, m, p, b: seen.append((b, m.redelivered, m.delivery_tag)))
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.2)
    assert seen and seen[0][:2] == (b"consumed", False)
    ch.basic_reject(seen[0][2], requeue=True)
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.2)
    assert len(seen) == 2 and seen[1][:2] == (b"consumed", True)
    ch.basic_ack(seen[1][2])
    ch.basic_cancel(tag)
    ch.queue_delete(qname)


def _drain(ch, queue):
    bodies = []
    while True:
        method, _, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return sorted(bodies)
        bodies.append(body.decode())


def test_topic_exchange_routing(ch, qname):
    ex = qname + ".topic"
    ch.exchange_declare(ex, "topic", auto_delete=True)
    q_star, q_hash, q_exact = (ch.queue_declare("", exclusive=True).method.queue for _ in range(3))
    ch.queue_bind(q_star, ex, "a.*.c")
    ch.queue_bind(q_hash, ex, "a.#")
    ch.queue_bind(q_exact, ex, "a.b.c")
    ch.confirm_delivery()
    for key in ["a.b.c", "a.x.c", "a", "a.b.c.d", "b.b.c", "a.b"]:
        ch.basic_publish(ex, key, key.encode())
    assert _drain(ch, q_star) == ["a.b.c", "a.x.c"]
    assert _drain(ch, q_hash) == sorted(["a", "a.b", "a.b.c", "a.b.c.d", "a.x.c"])
    assert _drain(ch, q_exact) == ["a.b.c"]
    ch.exchange_delete(ex)


def test_fanout_exchange_routing(ch, qname):
    ex = qname + ".fanout"
    ch.exchange_declare(ex, "fanout", auto_delete=True)
    queues = [ch.queue_declare("", exclusive=True).method.queue for _ in range(3)]
    for q, key in zip(queues, ["x", "y", ""]):
        ch.queue_bind(q, ex, key)
    ch.confirm_delivery()
    ch.basic_publish(ex, "ignored-key", b"to-all")
    for q in queues:
        assert _drain(ch, q) == ["to-all"]
    ch.exchange_delete(ex)


def test_headers_exchange_routing(ch, qname):
    ex = qname + ".headers"
    ch.exchange_declare(ex, "headers", auto_delete=True)
    q_all, q_any = (ch.queue_declare("", exclusive=True).method.queue for _ in range(2))
    ch.queue_bind(q_all, ex, "", arguments={"x-match": "all", "format": "pdf", "type": "report"})
    ch.queue_bind(q_any, ex, "", arguments={"x-match": "any", "format": "pdf", "type": "report"})
    ch.confirm_delivery()
    for name, headers in [
        ("both", {"format": "pdf", "type": "report"}),
        ("format-only", {"format": "pdf"}),
        ("wrong-value", {"format": "zip", "type": "log"}),
        ("none", None),
    ]:
        ch.basic_publish(ex, "", name.encode(), pika.BasicProperties(headers=headers))
    assert _drain(ch, q_all) == ["both"]
    assert _drain(ch, q_any) == ["both", "format-only"]
    ch.exchange_delete(ex)


def test_passive_declare_of_missing_queue_closes_channel_404(conn, qname):
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.queue_declare(qname + ".missing", passive=True)
    assert exc.value.reply_code == 404
    assert exc.value.reply_text.startswith("NOT_FOUND")
    assert ch.is_closed
    # A soft error closes only the channel; the connection goes on.
    assert conn.is_open
    ch2 = conn.channel()
    ch2.queue_declare(qname, exclusive=True)


def test_wrong_password_is_refused_403(broker):
    params = broker.params(credentials=pika.PlainCredentials("guest", "not-the-password"))
    with pytest.raises((ProbableAuthenticationError, ConnectionClosedByBroker)) as exc:
        pika.BlockingConnection(params)
    # RabbitMQ advertises authentication_failure_close and sends connection.close 403 ACCESS_REFUSED
    # (pika wraps it in ProbableAuthenticationError); a bare TCP close would not carry the 403.
    text = str(exc.value)
    if isinstance(exc.value, ConnectionClosedByBroker):
        assert exc.value.reply_code == 403, text
    assert "(403)" in text and "ACCESS_REFUSED" in text, text
    broker.assert_alive()


def test_heartbeat_negotiated_and_idle_connection_stays_up(broker, qname):
    conn = broker.connect(heartbeat=2)
    try:
        impl = conn._impl
        assert impl.params.heartbeat == 2
        checker = impl._heartbeat_checker
        assert checker is not None
        conn.sleep(5)  # idle: only heartbeats on the wire, serviced by the I/O loop
        assert conn.is_open
        # The broker must send heartbeats at the negotiated rate (2s timeout -> about one a second).
        assert checker._heartbeat_frames_received >= 2, checker._heartbeat_frames_received
        ch = conn.channel()
        ch.queue_declare(qname, exclusive=True)
    finally:
        if conn.is_open:
            conn.close()
