"""Message stats of the management API as RabbitMQ 3.10 reports them: channels
(`/api/channels`, `/api/channels/{name}`, `/api/connections/{name}/channels`), exchanges
(`publish_in` / `publish_out`) and vhosts, their counts and their `_details.rate`.

What RabbitMQ 3.10.8 does, and these tests check on both targets:
- a channel has `message_stats` once it published or consumed, with the publishing keys
  (publish, confirm, return_unroutable, drop_unroutable) once it published and the
  delivering keys (get, get_no_ack, deliver, deliver_no_ack, redeliver, ack, deliver_get,
  get_empty) once it delivered, got or acknowledged; an idle channel has none;
- an exchange has `publish_in` once a message was published to it and `publish_out` once it
  routed one to a queue (each queue counts);
- a vhost's `message_stats` (the same two groups) keep what its closed connections counted;
- each `_details.rate` is a rate over the last sampling interval: above zero while messages
  flow, back to zero once they stop.

RabbitMQ emits its stats every 5 s by default, so the tests poll with a deadline."""

from __future__ import annotations

import threading
import time
import urllib.parse

import pika
import pytest

from mgmt_target import mgmt_target, poll, vhost  # noqa: F401 (fixtures)

PUBLISH_KEYS = {"publish", "confirm", "return_unroutable", "drop_unroutable"}
DELIVER_KEYS = {"get", "get_no_ack", "deliver", "deliver_no_ack", "redeliver", "ack",
                "deliver_get", "get_empty"}


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def with_details(keys: set[str]) -> set[str]:
    return keys | {k + "_details" for k in keys}


def counts(stats: dict | None) -> dict | None:
    """The counters of a message_stats object (rates left out)."""
    if stats is None:
        return None
    return {k: v for k, v in stats.items() if not k.endswith("_details")}


def connection_name(api, v: str) -> str:
    conns = poll(lambda: [c for c in api.get("/api/connections") if c["vhost"] == v])
    assert len(conns) == 1, conns
    return conns[0]["name"]


def channels_by_number(api, conn: str) -> dict[int, dict]:
    return {c["number"]: c for c in api.get(f"/api/connections/{q(conn)}/channels")}


def test_channel_message_stats_count_each_kind_of_work(mgmt_target, vhost):
    broker, api = mgmt_target
    conn = broker.connect(virtual_host=vhost)
    try:
        idle = conn.channel()
        publisher = conn.channel()
        publisher.confirm_delivery()
        dropper = conn.channel()
        feeder = conn.channel()
        getter = conn.channel()
        consumer = conn.channel()
        auto = conn.channel()

        publisher.exchange_declare("x", "fanout")
        publisher.exchange_declare("lonely", "fanout")
        publisher.queue_declare("q")
        publisher.queue_declare("q2")
        publisher.queue_declare("empty")
        publisher.queue_bind("q", "x")
        for _ in range(5):
            publisher.basic_publish("x", "", b"m")
        with pytest.raises(pika.exceptions.UnroutableError):
            publisher.basic_publish("lonely", "", b"m", mandatory=True)
        dropper.basic_publish("lonely", "", b"m")
        for _ in range(3):
            feeder.basic_publish("", "q2", b"m")

        # get (auto ack), get + ack, get + requeue, get again (redelivered), get on empty.
        assert getter.basic_get("q", auto_ack=True)[0] is not None
        m = getter.basic_get("q", auto_ack=False)[0]
        getter.basic_ack(m.delivery_tag)
        m = getter.basic_get("q", auto_ack=False)[0]
        getter.basic_nack(m.delivery_tag, requeue=True)
        m = getter.basic_get("q", auto_ack=True)[0]
        assert m.redelivered
        assert getter.basic_get("empty", auto_ack=True)[0] is None

        acked = []
        consumer.basic_consume(
            "q", lambda ch, m, p, b: (ch.basic_ack(m.delivery_tag), acked.append(1)))
        got = []
        auto.basic_consume("q2", lambda ch, m, p, b: got.append(1), auto_ack=True)
        deadline = time.monotonic() + 10
        while (len(acked) < 2 or len(got) < 3) and time.monotonic() < deadline:
            conn.process_data_events(0.1)
        assert (len(acked), len(got)) == (2, 3)

        zero_pub = dict.fromkeys(PUBLISH_KEYS, 0)
        zero_del = dict.fromkeys(DELIVER_KEYS, 0)
        want = {
            idle.channel_number: None,
            publisher.channel_number: {**zero_pub, "publish": 6, "confirm": 6,
                                       "return_unroutable": 1},
            dropper.channel_number: {**zero_pub, "publish": 1, "drop_unroutable": 1},
            feeder.channel_number: {**zero_pub, "publish": 3},
            getter.channel_number: {**zero_del, "get": 2, "get_no_ack": 2, "redeliver": 1,
                                    "ack": 1, "get_empty": 1, "deliver_get": 4},
            consumer.channel_number: {**zero_del, "deliver": 2, "ack": 2, "deliver_get": 2},
            auto.channel_number: {**zero_del, "deliver_no_ack": 3, "deliver_get": 3},
        }
        name = connection_name(api, vhost)

        def settled():
            conn.process_data_events(0)
            chans = channels_by_number(api, name)
            have = {n: counts(chans[n].get("message_stats")) if n in chans else "missing"
                    for n in want}
            return chans if have == want else None

        try:
            chans = poll(settled, timeout=20)
        except BaseException:
            chans = channels_by_number(api, name)
            print({n: chans.get(n, {}).get("message_stats") for n in want})
            raise
        # Which keys: the publishing ones, the delivering ones, each with its rate.
        assert "message_stats" not in chans[idle.channel_number]
        assert set(chans[publisher.channel_number]["message_stats"]) == with_details(PUBLISH_KEYS)
        assert set(chans[getter.channel_number]["message_stats"]) == with_details(DELIVER_KEYS)
        for k in PUBLISH_KEYS:
            rate = chans[publisher.channel_number]["message_stats"][k + "_details"]["rate"]
            assert isinstance(rate, (int, float)) and rate >= 0

        # The same object from /api/channels and /api/channels/{name}.
        one = chans[getter.channel_number]
        assert counts(api.get(f"/api/channels/{q(one['name'])}")["message_stats"]) == \
            want[getter.channel_number]
        listed = {c["name"]: c for c in api.get("/api/channels")}
        assert counts(listed[one["name"]]["message_stats"]) == want[getter.channel_number]
        assert "message_stats" not in listed[chans[idle.channel_number]["name"]]
    finally:
        conn.close()


def test_exchange_publish_in_and_out(mgmt_target, vhost):
    broker, api = mgmt_target
    conn = broker.connect(virtual_host=vhost)
    try:
        ch = conn.channel()
        ch.exchange_declare("two", "fanout")
        ch.exchange_declare("lonely", "fanout")
        ch.exchange_declare("unused", "fanout")
        ch.queue_declare("q1")
        ch.queue_declare("q2")
        ch.queue_bind("q1", "two")
        ch.queue_bind("q2", "two")
        for _ in range(4):
            ch.basic_publish("two", "", b"m")
        for _ in range(3):
            ch.basic_publish("lonely", "", b"m")
        for _ in range(2):
            ch.basic_publish("", "q1", b"m")
        ch.queue_declare("q1", passive=True)  # a round trip: the publishes are in

        want = {
            "two": {"publish_in": 4, "publish_out": 8},
            "lonely": {"publish_in": 3},
            "": {"publish_in": 2, "publish_out": 2},
            "unused": None,
            "amq.direct": None,
        }

        def settled():
            xs = {x["name"]: x for x in api.get(f"/api/exchanges/{q(vhost)}")}
            have = {n: counts(xs[n].get("message_stats")) for n in want}
            return xs if have == want else None

        xs = poll(settled, timeout=20)
        assert set(xs["two"]["message_stats"]) == {
            "publish_in", "publish_in_details", "publish_out", "publish_out_details"}
        assert set(xs["lonely"]["message_stats"]) == {"publish_in", "publish_in_details"}
        assert "message_stats" not in xs["unused"]
        one = api.get(f"/api/exchanges/{q(vhost)}/two")
        assert counts(one["message_stats"]) == want["two"]
        default = api.get(f"/api/exchanges/{q(vhost)}/amq.default")
        assert counts(default["message_stats"]) == want[""]
        every = [x for x in api.get("/api/exchanges") if x["vhost"] == vhost and x["name"] == "two"]
        assert counts(every[0]["message_stats"]) == want["two"]
    finally:
        conn.close()


def test_vhost_message_stats_keep_what_closed_connections_counted(mgmt_target, vhost):
    broker, api = mgmt_target
    assert "message_stats" not in api.get(f"/api/vhosts/{q(vhost)}")
    conn = broker.connect(virtual_host=vhost)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("q")
    for _ in range(3):
        ch.basic_publish("", "q", b"m")
    assert ch.basic_get("q", auto_ack=True)[0] is not None
    acked = []
    ch.basic_consume("q", lambda c, m, p, b: (c.basic_ack(m.delivery_tag), acked.append(1)))
    deadline = time.monotonic() + 10
    while len(acked) < 2 and time.monotonic() < deadline:
        conn.process_data_events(0.1)
    assert len(acked) == 2
    conn.close()

    want = {"publish": 3, "confirm": 3, "return_unroutable": 0, "drop_unroutable": 0,
            "get": 0, "get_no_ack": 1, "deliver": 2, "deliver_no_ack": 0, "redeliver": 0,
            "ack": 2, "deliver_get": 3, "get_empty": 0}
    got = poll(lambda: (lambda v: v if counts(v.get("message_stats")) == want else None)(
        api.get(f"/api/vhosts/{q(vhost)}")), timeout=20)
    assert set(got["message_stats"]) == with_details(PUBLISH_KEYS | DELIVER_KEYS)
    listed = [v for v in api.get("/api/vhosts") if v["name"] == vhost]
    assert counts(listed[0]["message_stats"]) == want


@pytest.mark.timeout(90)
def test_rates_follow_the_traffic(mgmt_target, vhost):
    """While a publisher sends about 40 messages a second, the rates of its channel, of the
    exchange and of the vhost are above zero (and near that); once it stops they fall back
    to zero: a rate over recent samples, not a constant or an average since the start."""
    broker, api = mgmt_target
    setup = broker.connect(virtual_host=vhost)
    sch = setup.channel()
    sch.exchange_declare("flow", "fanout")
    sch.queue_declare("sink", arguments={"x-max-length": 10})
    sch.queue_bind("sink", "flow")
    setup.close()

    stop = threading.Event()
    errors: list[BaseException] = []

    def publish():
        try:
            c = broker.connect(virtual_host=vhost)
            ch = c.channel()
            while not stop.is_set():
                ch.basic_publish("flow", "", b"m")
                c.process_data_events(0.025)
            c.close()
        except BaseException as e:  # reported by the test
            errors.append(e)

    t = threading.Thread(target=publish, daemon=True)
    t.start()

    def rates():
        chans = [c for c in api.get("/api/channels") if c["vhost"] == vhost]
        ch = chans[0].get("message_stats", {}) if chans else {}
        x = api.get(f"/api/exchanges/{q(vhost)}/flow").get("message_stats", {})
        v = api.get(f"/api/vhosts/{q(vhost)}").get("message_stats", {})
        return {
            "channel publish": ch.get("publish_details", {}).get("rate", 0),
            "exchange publish_in": x.get("publish_in_details", {}).get("rate", 0),
            "exchange publish_out": x.get("publish_out_details", {}).get("rate", 0),
            "vhost publish": v.get("publish_details", {}).get("rate", 0),
        }

    try:
        flowing = poll(lambda: (lambda r: r if all(x > 0 for x in r.values()) else None)(rates()),
                       timeout=30, interval=0.5)
        for k, r in flowing.items():
            assert r < 200, (k, flowing)  # about 40/s: a rate, not a count
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors
    poll(lambda: (lambda r: r if all(x == 0 for x in r.values()) else None)(rates()),
         timeout=30, interval=0.5)
