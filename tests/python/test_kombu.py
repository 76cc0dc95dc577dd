"""kombu with the pyamqp transport (py-amqp underneath), as Celery uses it."""

import socket
import time

import pytest
from amqp.exceptions import NotFound
from kombu import Connection, Consumer, Exchange, Producer, Queue


@pytest.fixture
def kconn(broker):
    broker.assert_alive()
    with Connection(
        f"pyamqp://guest:guest@{broker.host}:{broker.port}//",
        connect_timeout=5,
        transport_options={"confirm_publish": True},
    ) as c:
        c.connect()
        yield c


def test_kombu_producer_consumer_round_trip(kconn, qname):
    exchange = Exchange(qname + ".ex", type="direct", durable=False, auto_delete=True)
    queue = Queue(qname, exchange=exchange, routing_key="jobs", durable=False, auto_delete=True)
    producer = Producer(kconn.channel())
    payloads = [{"n": i, "text": "héllo", "list": [1, 2, 3]} for i in range(10)]
    for p in payloads:
        producer.publish(p, exchange=exchange, routing_key="jobs", declare=[queue],
                         serializer="json", headers={"h": "v"}, retry=False)
    received = []

    def on_message(body, message):
        received.append((body, message.headers, message.content_type))
        message.ack()

    with Consumer(kconn.channel(), queues=[queue], callbacks=[on_message], accept=["json"]):
        deadline = time.monotonic() + 10
        while len(received) < len(payloads) and time.monotonic() < deadline:
            try:
                kconn.drain_events(timeout=1)
            except socket.timeout:
                pass
    assert [r[0] for r in received] == payloads
    assert all(r[1] == {"h": "v"} and r[2] == "application/json" for r in received)


def test_kombu_simple_queue_round_trip(kconn, qname):
    q = kconn.SimpleQueue(qname, queue_opts={"auto_delete": True, "durable": False},
                          exchange_opts={"durable": False, "auto_delete": True})
    try:
        q.put({"hello": "world"}, serializer="json")
        q.put(b"raw-bytes", serializer=None, content_type="application/data", content_encoding="binary")
        assert len(q) == 2  # passive queue.declare message_count
        m1 = q.get(block=True, timeout=5)
        assert m1.payload == {"hello": "world"}
        m1.ack()
        m2 = q.get(block=True, timeout=5)
        assert m2.body == b"raw-bytes"
        m2.ack()
        with pytest.raises(q.Empty):
            q.get(block=True, timeout=0.5)
    finally:
        q.close()


def _passive_count(kconn, name):
    ch = kconn.channel()
    try:
        return ch.queue_declare(name, passive=True).message_count
    finally:
        if ch.is_open:
            ch.close()


def test_kombu_queue_message_ttl_expires_messages(kconn, qname):
    queue = Queue(qname, exchange=Exchange("", type="direct"), routing_key=qname,
                  durable=False, message_ttl=1.0)
    bound = queue(kconn.channel())
    bound.declare()
    producer = Producer(kconn.channel())
    producer.publish({"short": "lived"}, routing_key=qname, serializer="json", retry=False)
    assert _passive_count(kconn, qname) == 1
    time.sleep(1.8)
    # Gone after the TTL: neither counted nor delivered.
    assert _passive_count(kconn, qname) == 0
    assert bound.get(no_ack=True) is None
    # A fresh message within its TTL is still delivered.
    producer.publish({"fresh": True}, routing_key=qname, serializer="json", retry=False)
    msg = bound.get(no_ack=True)
    assert msg is not None and msg.payload == {"fresh": True}
    bound.delete()


def test_kombu_queue_expires_deletes_unused_queue(kconn, qname):
    queue = Queue(qname, exchange=Exchange("", type="direct"), routing_key=qname,
                  durable=False, expires=2.0)
    bound = queue(kconn.channel())
    bound.declare()
    Producer(kconn.channel()).publish({"x": 1}, routing_key=qname, serializer="json", retry=False)
    # Still there well within the expiry (publishing does not count as use, declaring does).
    time.sleep(0.8)
    assert _passive_count(kconn, qname) == 1
    time.sleep(3.0)
    # Unused for longer than x-expires: deleted, messages and all.
    with pytest.raises(NotFound) as exc:
        _passive_count(kconn, qname)
    assert exc.value.reply_code == 404
