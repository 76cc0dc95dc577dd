"""Queue fields of GET /api/queues/{vhost}/{name} that monitoring reads, truthful as RabbitMQ 3.10.8's:
message_bytes_unacknowledged with message_bytes_ready and message_bytes, idle_since (present only
while the queue is idle, RFC 3339 with milliseconds), consumer_capacity and consumer_utilisation.
Passes against RabbitMQ 3.10.8 (WARREN_TEST_TARGET=rabbitmq), whose statistics lag by up to 5 s:
fields are polled until they settle."""

import re
import time
import uuid
from datetime import datetime, timedelta, timezone

from mgmt_target import mgmt_target  # noqa: F401 (fixture)
from mgmt_target import poll

IDLE_SINCE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(\+|-)\d\d:\d\d$")


def name(prefix):
    return f"fields.{prefix}.{uuid.uuid4().hex[:8]}"


def queue_when(api, q, cond, timeout=20.0):
    """The queue's JSON once cond(json) holds."""
    return poll(lambda: (lambda j: j if cond(j) else None)(api.get(f"/api/queues/%2F/{q}")),
                timeout=timeout)


def test_unacknowledged_bytes_are_counted_apart_from_ready_ones(mgmt_target):
    broker, api = mgmt_target
    q = name("bytes")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    for body in (b"a" * 10, b"b" * 20, b"c" * 30):
        ch.basic_publish("", q, body)
    held = [ch.basic_get(q)[0] for _ in range(2)]  # 10 + 20 bytes, not acknowledged
    assert all(m is not None for m in held)
    j = queue_when(api, q, lambda j: j.get("messages_unacknowledged") == 2 and j.get("messages_ready") == 1)
    assert j["message_bytes_unacknowledged"] == 30
    assert j["message_bytes_ready"] == 30
    assert j["message_bytes"] == 60
    ch.basic_ack(held[0].delivery_tag)
    j = queue_when(api, q, lambda j: j.get("messages_unacknowledged") == 1)
    assert (j["message_bytes_unacknowledged"], j["message_bytes"]) == (20, 50)
    ch.basic_nack(held[1].delivery_tag, requeue=True)
    j = queue_when(api, q, lambda j: j.get("messages_ready") == 2)
    assert (j["message_bytes_unacknowledged"], j["message_bytes_ready"], j["message_bytes"]) == (0, 50, 50)
    conn.close()


def test_idle_since_shows_while_the_queue_is_idle_and_goes_while_it_works(mgmt_target):
    broker, api = mgmt_target
    q = name("idle")
    conn = broker.connect()
    ch = conn.channel()
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m")
    j = queue_when(api, q, lambda j: "idle_since" in j and j.get("messages") == 1)
    assert IDLE_SINCE.match(j["idle_since"]), j["idle_since"]
    since = datetime.fromisoformat(j["idle_since"])
    assert before <= since <= datetime.now(timezone.utc), j["idle_since"]
    # Working (a publish every 0.2 s): the field goes.
    deadline = time.monotonic() + 20
    busy = None
    while time.monotonic() < deadline:
        ch.basic_publish("", q, b"m")
        j = api.get(f"/api/queues/%2F/{q}")
        if "idle_since" not in j:
            busy = j
            break
        time.sleep(0.2)
    assert busy is not None, f"still idle_since {j.get('idle_since')} while publishing"
    conn.close()


def test_consumer_capacity_is_the_share_of_time_consumers_could_take_messages(mgmt_target):
    broker, api = mgmt_target
    free, limited = name("free"), name("limited")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(free)
    ch.queue_declare(limited)
    j = queue_when(api, free, lambda j: "consumer_capacity" in j)
    assert j["consumers"] == 0 and j["consumer_capacity"] == 0 and j["consumer_utilisation"] == 0
    consumer = broker.connect()
    cch = consumer.channel()
    got = []
    cch.basic_consume(free, lambda c, m, p, b: c.basic_ack(m.delivery_tag))
    cch.basic_qos(prefetch_count=1)
    cch.basic_consume(limited, lambda c, m, p, b: got.append(m.delivery_tag))
    for _ in range(3):
        ch.basic_publish("", free, b"m")
    # A message waits behind the consumer's prefetch of one for two seconds ...
    ch.basic_publish("", limited, b"1")
    ch.basic_publish("", limited, b"2")
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        consumer.process_data_events(0.1)
    assert len(got) == 1
    cch.basic_ack(got[0])
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        consumer.process_data_events(0.1)
    assert len(got) == 2
    cch.basic_ack(got[1])
    consumer.process_data_events(0.1)
    # ... then none waits: the capacity is on its way back up, short of 1.
    j = queue_when(api, limited, lambda j: j.get("consumers") == 1 and j.get("messages") == 0)
    assert 0 < j["consumer_capacity"] < 1, j["consumer_capacity"]
    assert 0 < j["consumer_utilisation"] < 1, j["consumer_utilisation"]
    # A consumer that always had room: 1.
    j = queue_when(api, free, lambda j: j.get("consumers") == 1 and j.get("messages") == 0)
    assert j["consumer_capacity"] == 1.0 and j["consumer_utilisation"] == 1.0
    consumer.close()
    conn.close()
