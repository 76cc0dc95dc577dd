"""More of the RabbitMQ dialect through pika: errors with their codes, queue arguments, dead-lettering,
priorities, tx, exchange-to-exchange bindings, alternate exchanges, direct reply-to, heartbeats."""

import time

import pika
import pytest
from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker

from test_pika import message_count


def wait_for(conn, cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    return cond()


def assert_channel_error(fn, code, text_prefix):
    with pytest.raises(ChannelClosedByBroker) as exc:
        fn()
    assert exc.value.reply_code == code, repr(exc.value)
    assert exc.value.reply_text.startswith(text_prefix), repr(exc.value)


# ---------------------------------------------------------------- errors


def test_publish_to_missing_exchange_closes_channel_404(conn, qname):
    ch = conn.channel()
    ch.confirm_delivery()
    assert_channel_error(lambda: ch.basic_publish(qname + ".nope", "k", b"x"), 404, "NOT_FOUND")
    assert conn.is_open


def test_redeclare_queue_with_different_arguments_406(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, arguments={"x-message-ttl": 1000}, auto_delete=True)
    ch.queue_declare(qname, arguments={"x-message-ttl": 1000}, auto_delete=True)  # same: fine
    assert_channel_error(lambda: ch.queue_declare(qname, arguments={"x-message-ttl": 2000}, auto_delete=True),
                         406, "PRECONDITION_FAILED")
    ch = conn.channel()
    assert_channel_error(lambda: ch.queue_declare(qname, durable=True, arguments={"x-message-ttl": 1000},
                                                  auto_delete=True), 406, "PRECONDITION_FAILED")
    conn.channel().queue_delete(qname)


def test_declare_amq_prefixed_exchange_403(conn):
    ch = conn.channel()
    ch.exchange_declare("amq.direct", "direct", durable=True, passive=True)  # exists
    assert_channel_error(lambda: ch.exchange_declare("amq.interop-test", "direct"), 403, "ACCESS_REFUSED")


def test_exclusive_queue_is_locked_to_its_connection_and_vanishes_with_it(broker, qname):
    owner = broker.connect()
    other = broker.connect()
    try:
        owner.channel().queue_declare(qname, exclusive=True)
        assert_channel_error(lambda: other.channel().queue_declare(qname, passive=True), 405, "RESOURCE_LOCKED")
        owner.close()
        ch = other.channel()
        deadline = time.monotonic() + 5
        while True:  # deletion follows the close; give it a moment, but it must happen
            try:
                ch.queue_declare(qname, passive=True)
            except ChannelClosedByBroker as e:
                assert e.reply_code == 404
                break
            assert time.monotonic() < deadline, "exclusive queue outlived its connection"
            time.sleep(0.1)
    finally:
        for c in (owner, other):
            if c.is_open:
                c.close()


def test_queue_delete_if_empty_and_if_unused_406(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname)
    ch.basic_publish("", qname, b"x")
    assert message_count(conn, qname) == 1
    assert_channel_error(lambda: ch.queue_delete(qname, if_empty=True), 406, "PRECONDITION_FAILED")
    ch = conn.channel()
    tag = ch.basic_consume(qname, lambda *a: None)
    ch2 = conn.channel()
    assert_channel_error(lambda: ch2.queue_delete(qname, if_unused=True), 406, "PRECONDITION_FAILED")
    ch.basic_cancel(tag)
    assert conn.channel().queue_delete(qname).method.message_count == 1


def test_publish_with_foreign_user_id_closes_channel_406(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    ch.confirm_delivery()
    ch.basic_publish("", qname, b"mine", pika.BasicProperties(user_id="guest"))  # own user: accepted
    assert_channel_error(lambda: ch.basic_publish("", qname, b"x", pika.BasicProperties(user_id="mallory")),
                         406, "PRECONDITION_FAILED")


# ---------------------------------------------------------------- queue behaviour


def test_server_named_queue_and_auto_delete_after_last_consumer(conn):
    ch = conn.channel()
    name = ch.queue_declare("", auto_delete=True).method.queue
    assert name.startswith("amq.gen-")
    t1 = ch.basic_consume(name, lambda *a: None)
    t2 = ch.basic_consume(name, lambda *a: None)
    assert t1 != t2 and t1.startswith("ctag")
    ch.basic_cancel(t1)
    assert ch.queue_declare(name, passive=True).method.consumer_count == 1
    ch.basic_cancel(t2)
    assert_channel_error(lambda: ch.queue_declare(name, passive=True), 404, "NOT_FOUND")


def test_prefetch_count_limits_unacked_deliveries(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    for i in range(10):
        ch.basic_publish("", qname, str(i).encode())
    ch.basic_qos(prefetch_count=3)
    got = []
    ch.basic_consume(qname, lambda c, m, p, b: got.append(m.delivery_tag))
    wait_for(conn, lambda: len(got) >= 3)
    conn.process_data_events(time_limit=0.5)  # more would arrive now if the limit were not kept
    assert len(got) == 3
    ch.basic_ack(got[0])
    assert wait_for(conn, lambda: len(got) >= 4)
    conn.process_data_events(time_limit=0.3)
    assert len(got) == 4
    ch.basic_ack(got[-1], multiple=True)
    assert wait_for(conn, lambda: len(got) >= 7)
    conn.process_data_events(time_limit=0.3)
    assert len(got) == 7


def test_single_active_consumer_gets_everything(broker, qname):
    conn = broker.connect()
    try:
        ch1, ch2 = conn.channel(), conn.channel()
        ch1.queue_declare(qname, exclusive=True, arguments={"x-single-active-consumer": True})
        got1, got2 = [], []
        ch1.basic_consume(qname, lambda c, m, p, b: (got1.append(b), c.basic_ack(m.delivery_tag)))
        tag2 = ch2.basic_consume(qname, lambda c, m, p, b: (got2.append(b), c.basic_ack(m.delivery_tag)))
        for i in range(6):
            ch1.basic_publish("", qname, str(i).encode())
        assert wait_for(conn, lambda: len(got1) + len(got2) >= 6)
        assert (len(got1), len(got2)) == (6, 0)
        ch1.close()  # the active consumer goes away: the second one takes over
        ch2.basic_publish("", qname, b"after")
        assert wait_for(conn, lambda: got2 == [b"after"]), got2
        ch2.basic_cancel(tag2)
    finally:
        conn.close()


def test_basic_recover_requeues_unacked_as_redelivered(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    ch.basic_publish("", qname, b"a")
    ch.basic_publish("", qname, b"b")
    first = [ch.basic_get(qname)[0] for _ in range(2)]
    assert [m.redelivered for m in first] == [False, False]
    ch.basic_recover(requeue=True)
    again = [ch.basic_get(qname) for _ in range(2)]
    assert sorted(b for _, _, b in again) == [b"a", b"b"]
    assert all(m.redelivered for m, _, _ in again)


def test_channel_close_requeues_unacked_deliveries(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    ch.basic_publish("", qname, b"held")
    held = conn.channel()
    method, _, _ = held.basic_get(qname)
    assert method is not None and message_count(conn, qname) == 0
    held.close()
    method, _, body = ch.basic_get(qname, auto_ack=True)
    assert body == b"held" and method.redelivered


def test_drop_head_overflow_keeps_newest(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True, arguments={"x-max-length": 2})
    ch.confirm_delivery()
    for b in (b"1", b"2", b"3"):
        ch.basic_publish("", qname, b)
    assert [ch.basic_get(qname, auto_ack=True)[2] for _ in range(3)] == [b"2", b"3", None]


def test_priority_queue_delivers_highest_priority_first(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True, arguments={"x-max-priority": 10})
    ch.confirm_delivery()
    for prio in (1, 5, None, 9, 5):
        ch.basic_publish("", qname, str(prio).encode(), pika.BasicProperties(priority=prio))
    bodies = [ch.basic_get(qname, auto_ack=True)[2] for _ in range(5)]
    assert bodies == [b"9", b"5", b"5", b"1", b"None"]


def test_per_message_expiration(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    ch.confirm_delivery()
    ch.basic_publish("", qname, b"short", pika.BasicProperties(expiration="200"))
    ch.basic_publish("", qname, b"long", pika.BasicProperties(expiration="60000"))
    time.sleep(0.6)
    method, props, body = ch.basic_get(qname, auto_ack=True)
    assert body == b"long"
    assert ch.basic_get(qname) == (None, None, None)


def test_dead_lettering_on_expiry_and_reject_adds_x_death(conn, qname):
    ch = conn.channel()
    dlx, dlq = qname + ".dlx", qname + ".dlq"
    ch.exchange_declare(dlx, "direct", auto_delete=True)
    ch.queue_declare(dlq, exclusive=True)
    ch.queue_bind(dlq, dlx, "dead")
    ch.queue_declare(qname, exclusive=True, arguments={
        "x-message-ttl": 200, "x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead"})
    ch.confirm_delivery()
    ch.basic_publish("", qname, b"expired", pika.BasicProperties(headers={"app": "interop"}))
    deadline = time.monotonic() + 5
    while message_count(conn, dlq) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    method, props, body = ch.basic_get(dlq, auto_ack=True)
    assert body == b"expired"
    assert props.headers["app"] == "interop"
    (death,) = props.headers["x-death"]
    assert death["reason"] == "expired"
    assert death["queue"] == qname
    assert death["exchange"] == ""
    assert death["routing-keys"] == [qname]
    assert death["count"] == 1
    # Rejected without requeue: dead-lettered with reason "rejected".
    ch.basic_publish("", qname, b"rejected")
    m, _, _ = ch.basic_get(qname)
    ch.basic_reject(m.delivery_tag, requeue=False)
    deadline = time.monotonic() + 5
    while message_count(conn, dlq) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    method, props, body = ch.basic_get(dlq, auto_ack=True)
    assert body == b"rejected"
    assert props.headers["x-death"][0]["reason"] == "rejected"


def test_consumer_cancelled_by_broker_when_queue_deleted(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname)
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = ch.basic_consume(qname, lambda *a: None)
    conn.channel().queue_delete(qname)
    assert wait_for(conn, lambda: cancelled == [tag]), cancelled
    assert ch.is_open


# ---------------------------------------------------------------- routing


def test_exchange_to_exchange_binding(conn, qname):
    ch = conn.channel()
    src, dst = qname + ".src", qname + ".dst"
    ch.exchange_declare(src, "topic")
    ch.exchange_declare(dst, "fanout")
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, dst)
    ch.exchange_bind(destination=dst, source=src, routing_key="orders.*")
    ch.confirm_delivery()
    ch.basic_publish(src, "orders.new", b"routed")
    ch.basic_publish(src, "invoices.new", b"not-routed")
    assert [ch.basic_get(q, auto_ack=True)[2] for _ in range(2)] == [b"routed", None]
    ch.exchange_unbind(destination=dst, source=src, routing_key="orders.*")
    ch.basic_publish(src, "orders.new", b"after-unbind")
    assert ch.basic_get(q) == (None, None, None)
    ch.exchange_delete(src)
    ch.exchange_delete(dst)


def test_alternate_exchange_takes_unroutable_messages(conn, qname):
    ch = conn.channel()
    main, ae = qname + ".main", qname + ".ae"
    ch.exchange_declare(ae, "fanout", auto_delete=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, ae)
    ch.exchange_declare(main, "direct", auto_delete=True, arguments={"alternate-exchange": ae})
    ch.confirm_delivery()
    ch.basic_publish(main, "nobody-bound", b"to-ae", mandatory=True)  # routed via the AE: no return
    assert ch.basic_get(q, auto_ack=True)[2] == b"to-ae"
    ch.exchange_delete(main)
    ch.exchange_delete(ae)


def test_direct_reply_to_rpc(conn, qname):
    client, server = conn.channel(), conn.channel()
    server.queue_declare(qname, exclusive=True)
    replies = []
    client.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: replies.append((b, p.correlation_id)),
                         auto_ack=True)
    client.basic_publish("", qname, b"ping",
                         pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="42"))
    method, props, body = None, None, None
    deadline = time.monotonic() + 5
    while method is None and time.monotonic() < deadline:
        method, props, body = server.basic_get(qname, auto_ack=True)
    assert body == b"ping"
    assert props.reply_to.startswith("amq.rabbitmq.reply-to.") and len(props.reply_to) > 24, props.reply_to
    server.basic_publish("", props.reply_to, b"pong", pika.BasicProperties(correlation_id=props.correlation_id))
    assert wait_for(conn, lambda: replies == [(b"pong", "42")]), replies


def test_tx_commit_and_rollback(conn, qname):
    ch = conn.channel()
    ch.queue_declare(qname, exclusive=True)
    ch.tx_select()
    ch.basic_publish("", qname, b"one")
    assert message_count(conn, qname) == 0  # held until commit
    ch.tx_commit()
    assert message_count(conn, qname) == 1
    ch.basic_publish("", qname, b"two")
    ch.tx_rollback()
    assert message_count(conn, qname) == 1
    m, _, body = ch.basic_get(qname)
    assert body == b"one"
    ch.basic_ack(m.delivery_tag)
    assert message_count(conn, qname) == 0  # acks too wait for the commit
    ch.tx_rollback()
    ch.basic_recover(requeue=True)  # the ack was rolled back: the message is still unacked
    m, _, body = ch.basic_get(qname)
    assert body == b"one"
    ch.basic_ack(m.delivery_tag)
    ch.tx_commit()
    assert message_count(conn, qname) == 0


# ---------------------------------------------------------------- framing and heartbeats


def test_large_message_with_small_frame_max(broker, qname):
    conn = broker.connect(frame_max=4096)
    try:
        assert conn._impl.params.frame_max == 4096
        ch = conn.channel()
        ch.queue_declare(qname, exclusive=True)
        ch.confirm_delivery()
        body = bytes(i % 251 for i in range(3 * 1024 * 1024 + 17))
        ch.basic_publish("", qname, body)
        assert ch.basic_get(qname, auto_ack=True)[2] == body
    finally:
        conn.close()


def test_client_missing_heartbeats_is_disconnected(broker):
    conn = broker.connect(heartbeat=1)
    try:
        time.sleep(4.5)  # no I/O at all: the client sends no heartbeats
        with pytest.raises(AMQPConnectionError):
            for _ in range(20):
                conn.process_data_events(time_limit=0.1)
                conn.channel()  # an RPC: fails once the broker has dropped us
    finally:
        if conn.is_open:
            conn.close()
