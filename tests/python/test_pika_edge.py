"""Edges real clients reach: every property and field type passed through untouched, empty bodies,
many channels, consumer exclusivity, vhost refusal, AMQPLAIN, fair dispatch, concurrent publishers."""

import decimal
import threading
import time
from datetime import datetime, timezone

import amqp
import pika
import pytest
from pika.exceptions import ConnectionClosedByBroker, ProbableAccessDeniedError

from test_pika import message_count
from test_pika_semantics import assert_channel_error, wait_for


def test_all_basic_properties_and_header_field_types_round_trip(ch, qname):
    ch.queue_declare(qname, exclusive=True)
    headers = {
        "str": "text é",
        "bytes": b"\x00\x01raw",
        "true": True,
        "false": False,
        "int": 42,
        "negative": -7,
        "big": 2**40,
        "decimal": decimal.Decimal("3.14"),
        "time": datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc),
        "table": {"nested": {"deeper": "yes"}, "n": 1},
        "array": [1, "two", [3], {"four": 4}, None],
        "void": None,
        "": "empty key",
    }
    props = pika.BasicProperties(
        content_type="application/x-test", content_encoding="gzip", headers=headers, delivery_mode=2,
        priority=3, correlation_id="corr", reply_to="reply.q", expiration="60000", message_id="mid-1",
        timestamp=1700000000, type="kind", user_id="guest", app_id="interop", cluster_id="c1",
    )
    ch.basic_publish("", qname, b"payload", props)
    _, got, body = ch.basic_get(qname, auto_ack=True)
    assert body == b"payload"
    for name in ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
                 "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id",
                 "cluster_id"):
        assert getattr(got, name) == getattr(props, name), name
    assert got.headers == headers


def test_empty_body_and_no_properties(ch, qname):
    ch.queue_declare(qname, exclusive=True)
    ch.confirm_delivery()
    ch.basic_publish("", qname, b"")
    ch.basic_publish("", qname, b"", pika.BasicProperties())
    for _ in range(2):
        method, props, body = ch.basic_get(qname, auto_ack=True)
        assert method is not None and body == b""
        assert props.headers is None and props.content_type is None


def test_many_channels_on_one_connection(conn, qname):
    chans = [conn.channel() for _ in range(200)]
    assert len({c.channel_number for c in chans}) == 200
    chans[0].queue_declare(qname, exclusive=True)
    for i, c in enumerate(chans):
        c.basic_publish("", qname, str(i).encode())
    assert message_count(conn, qname) == 200
    for c in chans[:100]:
        c.close()
    again = [conn.channel() for _ in range(100)]  # numbers are reused after close
    again[-1].queue_purge(qname)
    assert message_count(conn, qname) == 0


def test_exclusive_consumer_and_consume_on_missing_queue(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    ch.basic_consume(qname, lambda *a: None, exclusive=True)
    ch2 = conn.channel()
    assert_channel_error(lambda: ch2.basic_consume(qname, lambda *a: None), 403, "ACCESS_REFUSED")
    ch3 = conn.channel()
    assert_channel_error(lambda: ch3.basic_consume(qname + ".missing", lambda *a: None), 404, "NOT_FOUND")


def test_queue_purge_returns_count(ch, qname):
    ch.queue_declare(qname, exclusive=True)
    ch.confirm_delivery()
    for i in range(7):
        ch.basic_publish("", qname, b"x")
    assert ch.queue_purge(qname).method.message_count == 7
    assert ch.basic_get(qname) == (None, None, None)


def test_unknown_vhost_is_refused(broker):
    with pytest.raises((ProbableAccessDeniedError, ConnectionClosedByBroker)) as exc:
        pika.BlockingConnection(broker.params(virtual_host="no-such-vhost"))
    assert "(530)" in str(exc.value) and "NOT_ALLOWED" in str(exc.value), str(exc.value)
    broker.assert_alive()


@pytest.mark.parametrize("mechanism", ["AMQPLAIN", "PLAIN"])
def test_py_amqp_login_mechanisms(broker, qname, mechanism):
    c = amqp.Connection(f"{broker.host}:{broker.port}", userid="guest", password="guest",
                        login_method=mechanism, connect_timeout=5, confirm_publish=True)
    c.connect()
    try:
        ch = c.channel()
        ch.queue_declare(qname, exclusive=True)
        ch.basic_publish(amqp.Message(b"hi", content_type="text/plain"), exchange="", routing_key=qname)
        msg = ch.basic_get(qname, no_ack=True)
        assert msg.body == b"hi" and msg.properties["content_type"] == "text/plain"
    finally:
        c.close()


def test_py_amqp_wrong_password_is_access_refused(broker):
    c = amqp.Connection(f"{broker.host}:{broker.port}", userid="guest", password="wrong",
                        login_method="AMQPLAIN", connect_timeout=5)
    with pytest.raises(amqp.exceptions.AccessRefused) as exc:
        c.connect()
    assert exc.value.reply_code == 403


def test_round_robin_between_consumers_with_prefetch_1(broker, qname):
    conn = broker.connect()
    try:
        ch1, ch2 = conn.channel(), conn.channel()
        ch1.queue_declare(qname, exclusive=True)
        got = {1: [], 2: []}
        for n, c in ((1, ch1), (2, ch2)):
            c.basic_qos(prefetch_count=1)
            c.basic_consume(qname, lambda c, m, p, b, n=n: (got[n].append(int(b)), c.basic_ack(m.delivery_tag)))
        for i in range(20):
            ch1.basic_publish("", qname, str(i).encode())
        assert wait_for(conn, lambda: len(got[1]) + len(got[2]) == 20)
        assert sorted(got[1] + got[2]) == list(range(20))
        assert 5 <= len(got[1]) <= 15, got  # both consumers take part
    finally:
        conn.close()


def test_concurrent_confirming_publishers_and_consumers_exactly_once(broker, qname):
    setup = broker.connect()
    setup.channel().queue_declare(qname, durable=True)
    publishers, per = 4, 500
    errors = []

    def publish(p):
        try:
            c = broker.connect()
            ch = c.channel()
            ch.confirm_delivery()
            for i in range(per):
                ch.basic_publish("", qname, f"{p}:{i}".encode(), pika.BasicProperties(delivery_mode=2))
            c.close()
        except Exception as e:  # reported below
            errors.append(repr(e))

    received = []
    lock = threading.Lock()
    stop = threading.Event()

    def consume(n):
        try:
            c = broker.connect()
            ch = c.channel()
            ch.basic_qos(prefetch_count=50)

            def on_msg(chan, m, props, body):
                with lock:
                    received.append((n, body.decode()))
                chan.basic_ack(m.delivery_tag)

            ch.basic_consume(qname, on_msg)
            while not stop.is_set():
                c.process_data_events(time_limit=0.2)
            c.close()
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=consume, args=(n,)) for n in range(2)]
    threads += [threading.Thread(target=publish, args=(p,)) for p in range(publishers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 25
    while len(received) < publishers * per and time.monotonic() < deadline and not errors:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert len(received) == publishers * per, f"{len(received)} of {publishers * per}"
    assert len({body for _, body in received}) == len(received), "duplicates"
    for n in range(2):  # each consumer sees each publisher's messages in publishing order
        for p in range(publishers):
            mine = [int(b.split(":")[1]) for c, b in received if c == n and b.startswith(f"{p}:")]
            assert mine == sorted(mine), (n, p)
    setup.channel().queue_delete(qname)
    setup.close()


def test_max_length_bytes_drops_oldest(ch, qname):
    ch.queue_declare(qname, exclusive=True, arguments={"x-max-length-bytes": 10})
    ch.confirm_delivery()
    for b in (b"aaaa", b"bbbb", b"cccc"):
        ch.basic_publish("", qname, b)
    assert [ch.basic_get(qname, auto_ack=True)[2] for _ in range(3)] == [b"bbbb", b"cccc", None]


def test_global_qos_limits_the_channel(conn, qname):
    ch = conn.channel()
    q1 = ch.queue_declare("", exclusive=True).method.queue
    q2 = ch.queue_declare("", exclusive=True).method.queue
    for q in (q1, q2):
        for i in range(5):
            ch.basic_publish("", q, b"x")
    ch.basic_qos(prefetch_count=3, global_qos=True)  # RabbitMQ: shared by all consumers on the channel
    got = []
    ch.basic_consume(q1, lambda c, m, p, b: got.append(m.delivery_tag))
    ch.basic_consume(q2, lambda c, m, p, b: got.append(m.delivery_tag))
    wait_for(conn, lambda: len(got) >= 3)
    conn.process_data_events(time_limit=0.5)
    assert len(got) == 3


def test_unicode_and_255_byte_names(ch):
    uni = "очередь-ü-キュー"
    long_name = "q" * 255
    for name in (uni, long_name):
        ch.queue_declare(name, exclusive=True)
        ch.basic_publish("", name, name.encode())
        assert ch.basic_get(name, auto_ack=True)[2] == name.encode()


def test_exchange_errors_passive_missing_type_mismatch_and_if_unused(conn, qname):
    ch = conn.channel()
    assert_channel_error(lambda: ch.exchange_declare(qname + ".missing", "direct", passive=True), 404, "NOT_FOUND")
    ch = conn.channel()
    ch.exchange_declare(qname, "direct")
    assert_channel_error(lambda: ch.exchange_declare(qname, "fanout"), 406, "PRECONDITION_FAILED")
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, qname, "k")
    assert_channel_error(lambda: ch.exchange_delete(qname, if_unused=True), 406, "PRECONDITION_FAILED")
    ch = conn.channel()
    ch.queue_unbind(q, qname, "k")
    ch.exchange_delete(qname, if_unused=True)
    assert_channel_error(lambda: ch.exchange_declare(qname, "direct", passive=True), 404, "NOT_FOUND")


def test_requeued_message_keeps_its_place_at_the_head(ch, qname):
    ch.queue_declare(qname, exclusive=True)
    for b in (b"1", b"2", b"3"):
        ch.basic_publish("", qname, b)
    m1, _, _ = ch.basic_get(qname)
    m2, _, _ = ch.basic_get(qname)
    ch.basic_nack(m1.delivery_tag, requeue=True)
    order = []
    for _ in range(2):
        m, _, b = ch.basic_get(qname)
        order.append((b, m.redelivered))
    assert order == [(b"1", True), (b"3", False)]


def test_consumer_priorities(broker, qname):
    conn = broker.connect()
    try:
        ch = conn.channel()
        ch.queue_declare(qname, exclusive=True)
        got = {"low": [], "high": []}
        ch.basic_qos(prefetch_count=2)
        ch.basic_consume(qname, lambda c, m, p, b: got["low"].append(m.delivery_tag))
        ch.basic_consume(qname, lambda c, m, p, b: got["high"].append(m.delivery_tag),
                         arguments={"x-priority": 10})
        for i in range(3):
            ch.basic_publish("", qname, str(i).encode())
        assert wait_for(conn, lambda: len(got["low"]) + len(got["high"]) == 3)
        # The high-priority consumer takes what its prefetch allows; only the rest goes to the other.
        assert (len(got["high"]), len(got["low"])) == (2, 1)
    finally:
        conn.close()


def test_overflow_dead_letters_dropped_head_with_reason_maxlen(conn, qname):
    ch = conn.channel()
    dlq = qname + ".dlq"
    ch.queue_declare(dlq, exclusive=True)
    ch.queue_declare(qname, exclusive=True, arguments={
        "x-max-length": 1, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    ch.confirm_delivery()
    ch.basic_publish("", qname, b"old")
    ch.basic_publish("", qname, b"new")
    assert ch.basic_get(qname, auto_ack=True)[2] == b"new"
    deadline = time.monotonic() + 5  # dead-lettering is asynchronous in RabbitMQ
    while message_count(conn, dlq) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    _, props, body = ch.basic_get(dlq, auto_ack=True)
    assert body == b"old"
    assert props.headers["x-death"][0]["reason"] == "maxlen"
