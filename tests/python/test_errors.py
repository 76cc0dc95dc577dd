"""Client mistakes and the RabbitMQ reply codes they get: channel errors close only the channel,
connection errors the connection."""

import time

import amqp
import pika
import pytest
from pika.exceptions import ConnectionClosedByBroker

from test_pika import message_count
from test_pika_semantics import assert_channel_error


def test_double_ack_is_406_unknown_delivery_tag(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    ch.basic_publish("", qname, b"x")
    m, _, _ = ch.basic_get(qname)
    ch.basic_ack(m.delivery_tag)
    ch.basic_ack(m.delivery_tag)  # asynchronous: the error arrives with the next round trip
    assert_channel_error(lambda: ch.queue_declare(qname, passive=True), 406, "PRECONDITION_FAILED")
    assert conn.is_open


def test_bind_with_missing_exchange_or_queue_is_404(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    assert_channel_error(lambda: ch.queue_bind(qname, qname + ".no-exchange", "k"), 404, "NOT_FOUND")
    ch = conn.channel()
    assert_channel_error(lambda: ch.queue_bind(qname + ".no-queue", "amq.direct", "k"), 404, "NOT_FOUND")


def test_tx_select_on_confirm_channel_is_406(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    assert_channel_error(ch.tx_select, 406, "PRECONDITION_FAILED")


def test_basic_get_on_another_connections_exclusive_queue_is_405(broker, qname):
    owner, other = broker.connect(), broker.connect()
    try:
        owner.channel().queue_declare(qname, exclusive=True)
        ch = other.channel()
        assert_channel_error(lambda: ch.basic_get(qname), 405, "RESOURCE_LOCKED")
    finally:
        owner.close()
        other.close()


def test_prefetch_size_is_540_not_implemented(broker):
    conn = broker.connect()
    try:
        ch = conn.channel()
        with pytest.raises((ConnectionClosedByBroker, pika.exceptions.ChannelClosedByBroker)) as exc:
            ch.basic_qos(prefetch_size=1024)
        assert exc.value.reply_code == 540, repr(exc.value)
        assert exc.value.reply_text.startswith("NOT_IMPLEMENTED"), repr(exc.value)
    finally:
        if conn.is_open:
            conn.close()


def test_publish_immediate_is_540_not_implemented(broker, qname):
    c = amqp.Connection(f"{broker.host}:{broker.port}", userid="guest", password="guest", connect_timeout=5)
    c.connect()
    try:
        ch = c.channel()
        ch.queue_declare(qname, exclusive=True)
        ch.basic_publish(amqp.Message(b"now"), exchange="", routing_key=qname, immediate=True)
        with pytest.raises(amqp.exceptions.AMQPNotImplementedError) as exc:
            for _ in range(20):
                c.drain_events(timeout=0.2)
        assert exc.value.reply_code == 540
    except TimeoutError:
        raise AssertionError("no error for basic.publish immediate=true")
    finally:
        try:
            c.close()
        except Exception:
            pass
    broker.assert_alive()


def test_reject_publish_dlx_nacks_and_dead_letters(conn, qname):
    ch = conn.channel()
    dlq = qname + ".dlq"
    ch.queue_declare(dlq, exclusive=True)
    ch.queue_declare(qname, exclusive=True, arguments={
        "x-max-length": 1, "x-overflow": "reject-publish-dlx",
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    ch.confirm_delivery()
    ch.basic_publish("", qname, b"kept")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", qname, b"refused")
    deadline = time.monotonic() + 5
    while message_count(conn, dlq) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    _, props, body = ch.basic_get(dlq, auto_ack=True)
    assert body == b"refused"
    assert props.headers["x-death"][0]["reason"] == "maxlen"
    assert ch.basic_get(qname, auto_ack=True)[2] == b"kept"
