"""Quorum queues (`x-queue-type: quorum`) as one RabbitMQ 3.10.8 node has them, with pika and kombu:
the declare checks and their reply texts, `x-delivery-count` on every delivery, `x-delivery-limit`
dropping or dead-lettering a message returned too often, quorum's overflow rules, no global QoS,
and `"type": "quorum"` in the management API. Every test passes against RabbitMQ 3.10.8
(WARREN_TEST_TARGET=rabbitmq), where each behaviour was first observed."""

import time
import uuid

import kombu
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker, NackError

from mgmt_target import mgmt_target  # noqa: F401 (fixture)
from conftest import TARGET
from mgmt_target import poll

QUORUM = {"x-queue-type": "quorum"}


def qname(prefix):
    return f"quorum.{prefix}.{uuid.uuid4().hex[:8]}"


def declare_error(broker, name, **kw):
    """The (code, text) a declare is refused with, or None if it is taken (then deleted)."""
    conn = broker.connect()
    try:
        ch = conn.channel()
        try:
            ch.queue_declare(name, **kw)
        except ChannelClosedByBroker as e:
            return e.reply_code, e.reply_text
        ch.queue_delete(name)
        return None
    finally:
        if conn.is_open:
            conn.close()


@pytest.mark.parametrize("kw,reason", [
    (dict(durable=False), "invalid property 'non-durable'"),
    (dict(durable=True, exclusive=True), "invalid property 'exclusive-owner'"),
    (dict(durable=True, auto_delete=True), "invalid property 'auto-delete'"),
    # RabbitMQ checks auto-delete before exclusivity and durability.
    (dict(durable=False, exclusive=True, auto_delete=True), "invalid property 'auto-delete'"),
    (dict(durable=True, extra={"x-max-priority": 5}), "invalid arg 'x-max-priority'"),
    (dict(durable=True, extra={"x-queue-mode": "lazy"}), "invalid arg 'x-queue-mode'"),
    (dict(durable=True, extra={"x-queue-master-locator": "min-masters"}),
     "invalid arg 'x-queue-master-locator'"),
    # The arguments are checked before the properties.
    (dict(durable=False, extra={"x-max-priority": 5}), "invalid arg 'x-max-priority'"),
])
def test_a_quorum_declare_is_refused_as_rabbitmq_refuses_it(broker, kw, reason):
    name = qname("refused")
    args = dict(QUORUM, **kw.pop("extra", {}))
    err = declare_error(broker, name, arguments=args, **kw)
    assert err is not None, "declared"
    code, text = err
    assert code == 406
    suffix = " of queue type rabbit_quorum_queue" if "arg" in reason else ""
    assert text == f"PRECONDITION_FAILED - {reason} for queue '{name}' in vhost '/'{suffix}"


def test_quorum_arguments_are_refused_on_classic_queues_and_quorum_takes_its_own(broker):
    name = qname("classic")
    code, text = declare_error(broker, name, durable=True, arguments={"x-delivery-limit": 3})
    assert (code, text) == (406, f"PRECONDITION_FAILED - invalid arg 'x-delivery-limit' for queue "
                                 f"'{name}' in vhost '/' of queue type rabbit_classic_queue")
    code, text = declare_error(broker, name, durable=True, arguments={"x-queue-type": "foo"})
    assert (code, text) == (406, f"PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{name}' "
                                 f"in vhost '/': \"unsupported queue type 'foo'\"")
    for extra in ({"x-delivery-limit": -1}, {"x-delivery-limit": "abc"},
                  {"x-overflow": "reject-publish-dlx"}, {"x-quorum-initial-group-size": 3},
                  {"x-dead-letter-strategy": "at-least-once"}, {"x-single-active-consumer": True}):
        assert declare_error(broker, name, durable=True, arguments=dict(QUORUM, **extra)) is None, extra


def deliveries_by_get(ch, q, settle):
    """basic.get until the queue is empty, settling each with settle(ch, tag); returns
    (x-delivery-count, redelivered) of each delivery."""
    seen = []
    for _ in range(10):
        m, props, _ = get(ch, q)
        if m is None:
            break
        seen.append(((props.headers or {}).get("x-delivery-count"), m.redelivered))
        settle(ch, m.delivery_tag)
    return seen


def get(ch, q, no_ack=False, wait=1.0):
    """basic.get, trying again for `wait` seconds while the queue is empty (RabbitMQ's quorum
    queues apply returns asynchronously)."""
    deadline = time.monotonic() + wait
    while True:
        r = ch.basic_get(q, auto_ack=no_ack)
        if r[0] is not None or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_every_delivery_carries_x_delivery_count_and_the_limit_dead_letters(broker):
    q, dl = qname("limit"), qname("dl")
    conn = broker.connect()
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(dl, durable=True)
    ch.queue_declare(q, durable=True, arguments=dict(
        QUORUM, **{"x-delivery-limit": 2, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dl}))
    ch.basic_publish("", q, b"poison", pika.BasicProperties(headers={"mine": 1}))
    seen = deliveries_by_get(ch, q, lambda c, t: c.basic_nack(t, requeue=True))
    # A limit of 2 returns: delivered three times, counted 0, 1, 2 (RabbitMQ 3.10.8).
    assert seen == [(0, False), (1, True), (2, True)]
    m, props, body = get(ch, dl, no_ack=True)
    assert body == b"poison"
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    assert props.headers["mine"] == 1
    assert "x-delivery-count" not in props.headers, "dead-lettered as published"
    # basic.reject counts as a return too.
    ch.basic_publish("", q, b"again")
    seen = deliveries_by_get(ch, q, lambda c, t: c.basic_reject(t, requeue=True))
    assert seen == [(0, False), (1, True), (2, True)]
    conn.close()


def test_a_closed_channel_returns_count_and_classic_queues_have_no_count(broker):
    q, classic = qname("close"), qname("classic")
    conn = broker.connect()
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(q, durable=True, arguments=dict(QUORUM, **{"x-delivery-limit": 1}))
    ch.queue_declare(classic)
    ch.basic_publish("", q, b"m")
    ch.basic_publish("", classic, b"m")
    counts = []
    for _ in range(3):
        c2 = broker.connect()
        m, props, _ = get(c2.channel(), q)
        if m is None:
            c2.close()
            break
        counts.append(props.headers["x-delivery-count"])
        c2.close()  # unacked: returned
    assert counts == [0, 1], "returned once by its channel closing, then past its limit: dropped"
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    m, props, _ = get(ch, classic)
    ch.basic_nack(m.delivery_tag, requeue=True)
    m, props, _ = get(ch, classic, no_ack=True)
    assert m.redelivered and not (props.headers or {}).get("x-delivery-count")
    conn.close()


def test_a_negative_or_non_integer_delivery_limit_is_taken_as_rabbitmq_takes_it(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.confirm_delivery()
    neg, text = qname("neg"), qname("text")
    ch.queue_declare(neg, durable=True, arguments=dict(QUORUM, **{"x-delivery-limit": -1}))
    ch.queue_declare(text, durable=True, arguments=dict(QUORUM, **{"x-delivery-limit": "abc"}))
    for q in (neg, text):
        ch.basic_publish("", q, b"m")
    assert deliveries_by_get(ch, neg, lambda c, t: c.basic_nack(t, requeue=True)) == [(0, False)]
    # Not an integer: no limit.
    seen = []
    for _ in range(4):
        m, props, _ = get(ch, text)
        seen.append(props.headers["x-delivery-count"])
        ch.basic_nack(m.delivery_tag, requeue=True)
    assert seen == [0, 1, 2, 3]
    conn.close()


def test_quorum_overflow_takes_one_past_the_limit_and_reject_publish_dlx_drops_the_head(broker):
    conn = broker.connect()
    ch = conn.channel()
    ch.confirm_delivery()
    rp, dlx, dl = qname("rp"), qname("rpdlx"), qname("dl")
    ch.queue_declare(rp, durable=True, arguments=dict(
        QUORUM, **{"x-max-length": 1, "x-overflow": "reject-publish"}))
    outcome = []
    for i in range(4):
        try:
            ch.basic_publish("", rp, str(i).encode())
            outcome.append("ack")
        except NackError:
            outcome.append("nack")
    # Refused once over the limit, not at it: two taken.
    assert outcome == ["ack", "ack", "nack", "nack"]
    assert ch.queue_declare(rp, passive=True).method.message_count == 2
    ch.queue_declare(dl, durable=True)
    ch.queue_declare(dlx, durable=True, arguments=dict(QUORUM, **{
        "x-max-length": 1, "x-overflow": "reject-publish-dlx",
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dl}))
    for b in (b"1", b"2", b"3"):
        ch.basic_publish("", dlx, b)  # confirmed: reject-publish-dlx is drop-head here
    assert get(ch, dlx, no_ack=True)[2] == b"3"
    heads = []
    for _ in range(2):
        m, props, body = get(ch, dl, no_ack=True)
        heads.append((body, props.headers["x-first-death-reason"]))
    assert heads == [(b"1", "maxlen"), (b"2", "maxlen")]
    conn.close()


def test_a_consumer_under_global_qos_is_refused_with_540(broker):
    q = qname("gqos")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q, durable=True, arguments=QUORUM)
    ch.basic_qos(prefetch_count=10, global_qos=True)
    with pytest.raises(ConnectionClosedByBroker) as e:
        ch.basic_consume(q, lambda *a: None)
    assert e.value.reply_code == 540
    assert e.value.reply_text == f"NOT_IMPLEMENTED - queue '{q}' in vhost '/' does not support global qos"
    # Per-consumer prefetch (what Celery uses for quorum queues) is fine.
    conn = broker.connect()
    ch = conn.channel()
    ch.basic_qos(prefetch_count=10)
    ch.basic_consume(q, lambda *a: None)
    conn.close()


def test_kombu_sees_the_delivery_count_of_a_requeued_message(broker):
    q = qname("kombu")
    with kombu.Connection(f"pyamqp://guest:guest@{broker.host}:{broker.port}//") as conn:
        queue = kombu.Queue(q, routing_key=q, durable=True, queue_arguments=QUORUM)
        with conn.SimpleQueue(queue) as sq:
            sq.put({"n": 1})
            first = sq.get(timeout=5)
            # A consumer's first delivery has no count; basic.get's has 0 (RabbitMQ 3.10.8).
            assert "x-delivery-count" not in first.headers
            first.requeue()
            again = sq.get(timeout=5)
            assert again.payload == {"n": 1}
            assert again.headers.get("x-delivery-count") == 1
            assert again.delivery_info["redelivered"]
            again.ack()


def test_the_management_api_shows_a_quorum_queue_as_rabbitmq_does(mgmt_target):
    broker, api = mgmt_target
    q = qname("api")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q, durable=True, arguments=QUORUM)
    # RabbitMQ shows the members once the queue's first statistics are in.
    j = poll(lambda: (lambda j: j if "leader" in j and "online" in j else None)(
        api.get(f"/api/queues/%2F/{q}")))
    assert j["type"] == "quorum"
    assert j["arguments"] == QUORUM
    assert j["members"] == [j["leader"]] and j["online"] == [j["leader"]]
    listed = [x for x in api.get("/api/queues/%2F") if x["name"] == q]
    assert listed and listed[0]["type"] == "quorum"
    # A quorum queue made through the API is checked like one declared over AMQP.
    status, body = api.call("PUT", f"/api/queues/%2F/{q}.put",
                            {"durable": False, "arguments": QUORUM})
    assert status == 400 and "non-durable" in str(body), (status, body)
    conn.close()


def test_a_definitions_import_checks_a_quorum_queue_as_a_declare(mgmt_target):
    """RabbitMQ answers 204, leaves the refused queue out and imports the rest; warren refuses the
    whole document with 400 naming the entry, as for any invalid entry (nothing half-imported)."""
    broker, api = mgmt_target
    bad, good = qname("imp-bad"), qname("imp-good")
    doc = {"queues": [
        {"name": bad, "vhost": "/", "durable": False, "auto_delete": False, "arguments": QUORUM},
        {"name": good, "vhost": "/", "durable": True, "auto_delete": False, "arguments": QUORUM},
    ]}
    status, body = api.call("POST", "/api/definitions", doc)
    assert api.call("GET", f"/api/queues/%2F/{bad}")[0] == 404, "a non-durable quorum queue was imported"
    if TARGET == "rabbitmq":
        assert status == 204 and api.call("GET", f"/api/queues/%2F/{good}")[0] == 200
    else:
        assert status == 400 and "non-durable" in body["reason"] and bad in body["reason"], (status, body)
        assert api.call("GET", f"/api/queues/%2F/{good}")[0] == 404
