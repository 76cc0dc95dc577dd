"""The health and monitoring endpoints probes and tools call, the vhost limits the broker
enforces, per-vhost definitions and connections, and the fields monitoring reads, with RabbitMQ
3.10's shapes and status codes. Every test passes against Debian's RabbitMQ 3.10.8
(WARREN_TEST_TARGET=rabbitmq), whose statistics lag by up to 5 s: such fields are polled."""

import json
import urllib.request
import uuid

import pika
import pytest

from conftest import free_port
from mgmt_target import mgmt_target, vhost  # noqa: F401 (fixtures)
from mgmt_target import poll


def connect(broker, vhost, **kw):
    return pika.BlockingConnection(broker.params(virtual_host=vhost, **kw))


def node_name(api):
    return api.get("/api/overview")["node"]


def test_node_probes(mgmt_target):
    broker, api = mgmt_target
    assert api.call("GET", "/api/healthchecks/node") == (200, {"status": "ok"})
    assert api.call("GET", f"/api/healthchecks/node/{node_name(api)}") == (200, {"status": "ok"})
    assert api.call("GET", "/api/healthchecks/node/nobody@nowhere")[0] == 404
    assert api.call("GET", "/api/health/checks/local-alarms") == (200, {"status": "ok"})
    assert api.call("GET", "/api/health/checks/virtual-hosts") == (200, {"status": "ok"})


def test_listener_probes(mgmt_target):
    broker, api = mgmt_target
    port = broker.port
    assert api.call("GET", f"/api/health/checks/port-listener/{port}") == (
        200, {"status": "ok", "port": port})
    unused = free_port()
    status, body = api.call("GET", f"/api/health/checks/port-listener/{unused}")
    assert status == 503
    assert (body["status"], body["reason"], body["missing"]) == ("failed", "No active listener", unused)
    assert port in body["ports"]
    assert api.call("GET", "/api/health/checks/port-listener/abc") == (
        400, {"error": "bad_request", "reason": "Invalid port"})
    for alias in ("amqp", "amqp091", "AMQP0-9-1"):
        assert api.call("GET", f"/api/health/checks/protocol-listener/{alias}") == (
            200, {"status": "ok", "protocol": "amqp"})
    status, body = api.call("GET", "/api/health/checks/protocol-listener/mqtt")
    assert status == 503
    assert (body["missing"], body["reason"]) == ("mqtt", "No active listener")
    assert "amqp" in body["protocols"] and "http" in body["protocols"]


def test_certificate_expiration(mgmt_target):
    _, api = mgmt_target
    # No TLS listener here: nothing expires.
    assert api.call("GET", "/api/health/checks/certificate-expiration/1/weeks") == (200, {"status": "ok"})
    assert api.call("GET", "/api/health/checks/certificate-expiration/3/Months") == (200, {"status": "ok"})
    assert api.call("GET", "/api/health/checks/certificate-expiration/x/days") == (
        400, {"error": "bad_request", "reason": "Invalid expiration value."})
    assert api.call("GET", "/api/health/checks/certificate-expiration/1/fortnights") == (
        400, {"error": "bad_request",
              "reason": "Time unit not recognised. Supported units: days, weeks, months, years."})


def test_node_memory_and_limits_are_real(mgmt_target):
    _, api = mgmt_target
    node = node_name(api)
    mem = api.get(f"/api/nodes/{node}/memory")["memory"]
    assert mem["total"]["rss"] > 1_000_000 and "strategy" in mem
    assert api.call("GET", "/api/nodes/nobody@nowhere/memory")[0] == 404
    n = poll(lambda: (lambda n: n if "mem_used" in n else None)(api.get(f"/api/nodes/{node}")))
    assert n["mem_used"] > 1_000_000  # the process's memory, not only its messages
    for used, total in (("fd_used", "fd_total"), ("sockets_used", "sockets_total"),
                        ("proc_used", "proc_total")):
        assert 0 < n[total] and 0 <= n[used] <= n[total], (used, n[used], total, n[total])


def test_small_lists_have_rabbitmqs_shapes(mgmt_target):
    _, api = mgmt_target
    assert isinstance(api.get("/api/parameters"), list)
    assert api.get("/api/parameters/federation-upstream") == []
    assert all({"name", "value"} <= p.keys() for p in api.get("/api/global-parameters"))
    assert isinstance(api.get("/api/extensions"), list)
    flags = api.get("/api/feature-flags")
    assert flags and all({"name", "desc", "state", "stability", "provided_by"} <= f.keys() for f in flags)
    assert {"implicit_default_bindings", "drop_unroutable_metric"} <= {f["name"] for f in flags}
    assert api.get("/api/topic-permissions") == []
    auth = api.get("/api/auth")
    assert auth["enable_uaa"] is False
    # The login page reads it before logging in: no credentials needed.
    with urllib.request.urlopen(api.base + "/api/auth", timeout=10) as r:
        assert r.status == 200
        assert json.loads(r.read())["enable_uaa"] is False


def test_an_exchange_put_without_a_type_is_direct(mgmt_target, vhost):
    _, api = mgmt_target
    api.ok("PUT", f"/api/exchanges/{vhost}/no-type", {"durable": True})
    e = api.get(f"/api/exchanges/{vhost}/no-type")
    assert (e["type"], e["durable"]) == ("direct", True)


def test_users_without_permissions(mgmt_target):
    _, api = mgmt_target
    u = f"noperm-{uuid.uuid4().hex[:6]}"
    api.ok("PUT", f"/api/users/{u}", {"password": "pw", "tags": ""})
    try:
        assert u in [x["name"] for x in api.get("/api/users/without-permissions")]
        assert "guest" not in [x["name"] for x in api.get("/api/users/without-permissions")]
        api.ok("PUT", f"/api/permissions/%2F/{u}", {"configure": "", "write": "", "read": ""})
        assert u not in [x["name"] for x in api.get("/api/users/without-permissions")]
    finally:
        api.call("DELETE", f"/api/users/{u}")


def test_vhost_limits_are_listed_validated_and_enforced(mgmt_target, vhost):
    broker, api = mgmt_target
    assert api.get(f"/api/vhost-limits/{vhost}") == []
    api.ok("PUT", f"/api/vhost-limits/{vhost}/max-connections", {"value": 1})
    api.ok("PUT", f"/api/vhost-limits/{vhost}/max-queues", {"value": 2})
    assert api.get(f"/api/vhost-limits/{vhost}") == [
        {"vhost": vhost, "value": {"max-connections": 1, "max-queues": 2}}]
    assert {"vhost": vhost, "value": {"max-connections": 1, "max-queues": 2}} in api.get("/api/vhost-limits")
    assert {"vhost": vhost, "component": "vhost-limits", "name": "limits",
            "value": {"max-connections": 1, "max-queues": 2}} in api.get("/api/parameters/vhost-limits")
    status, body = api.call("PUT", f"/api/vhost-limits/{vhost}/max-queues", {"value": "x"})
    assert status == 400 and "max-queues should be a number" in body["reason"]
    status, body = api.call("PUT", f"/api/vhost-limits/{vhost}/max-foo", {"value": 1})
    assert status == 400 and "Unrecognised terms" in body["reason"]
    assert api.call("PUT", "/api/vhost-limits/no-such-vhost/max-queues", {"value": 1}) == (
        404, {"error": "not_found", "reason": "vhost_not_found"})

    # max-queues: the third queue is refused (406), a redeclare is not.
    c = connect(broker, vhost)
    ch = c.channel()
    ch.queue_declare("l1")
    ch.queue_declare("l2")
    ch.queue_declare("l1")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare("l3")
    assert e.value.reply_code == 406
    assert "queue limit in vhost" in e.value.reply_text and "(2) is reached" in e.value.reply_text

    # max-connections: one is open, the next is refused with 530.
    poll(lambda: len(api.get(f"/api/vhosts/{vhost}/connections")) == 1)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connect(broker, vhost)
    # Cleared: both are allowed again.
    api.ok("DELETE", f"/api/vhost-limits/{vhost}/max-connections")
    api.ok("DELETE", f"/api/vhost-limits/{vhost}/max-queues")
    assert api.get(f"/api/vhost-limits/{vhost}") == []
    c2 = connect(broker, vhost)
    c2.channel().queue_declare("l3")
    c2.close()
    c.close()


def test_a_negative_or_zero_limit(mgmt_target, vhost):
    broker, api = mgmt_target
    api.ok("PUT", f"/api/vhost-limits/{vhost}/max-connections", {"value": -1})
    connect(broker, vhost).close()
    api.ok("PUT", f"/api/vhost-limits/{vhost}/max-connections", {"value": 0})
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connect(broker, vhost)


def test_vhost_connections_and_channels(mgmt_target, vhost):
    broker, api = mgmt_target
    c = connect(broker, vhost)
    c.channel()
    c.channel()
    other = broker.connect()
    try:
        conns = poll(lambda: api.get(f"/api/vhosts/{vhost}/connections"))
        assert len(conns) == 1 and conns[0]["vhost"] == vhost
        chans = poll(lambda: len(api.get(f"/api/vhosts/{vhost}/channels")) == 2
                     and api.get(f"/api/vhosts/{vhost}/channels"))
        assert {ch["vhost"] for ch in chans} == {vhost}
        assert api.call("GET", "/api/vhosts/no-such-vhost/connections")[0] == 404
    finally:
        other.close()
        c.close()


def test_vhost_definitions_export_and_import(mgmt_target, vhost):
    _, api = mgmt_target
    api.ok("PUT", f"/api/queues/{vhost}/dq", {"durable": True, "arguments": {"x-max-length": 3}})
    api.ok("PUT", f"/api/exchanges/{vhost}/dx", {"type": "fanout", "durable": True})
    api.ok("POST", f"/api/bindings/{vhost}/e/dx/q/dq", {"routing_key": "", "arguments": {}})
    d = api.get(f"/api/definitions/{vhost}")
    assert {"queues", "exchanges", "bindings", "policies", "parameters"} <= d.keys()
    [q] = d["queues"]
    assert q["name"] == "dq" and q["arguments"] == {"x-max-length": 3} and "vhost" not in q
    assert [x["name"] for x in d["exchanges"]] == ["dx"]
    assert [(b["source"], b["destination"]) for b in d["bindings"]] == [("dx", "dq")]

    # Into another vhost: the same objects appear there.
    other = f"health-copy-{uuid.uuid4().hex[:6]}"
    api.ok("PUT", f"/api/vhosts/{other}", {})
    try:
        api.ok("POST", f"/api/definitions/{other}", d)
        assert api.get(f"/api/queues/{other}/dq")["arguments"] == {"x-max-length": 3}
        assert api.get(f"/api/exchanges/{other}/dx")["type"] == "fanout"
        assert len(api.get(f"/api/exchanges/{other}/dx/bindings/source")) == 1
    finally:
        api.call("DELETE", f"/api/vhosts/{other}")


def test_an_import_keeps_an_existing_queue_and_imports_the_rest(mgmt_target, vhost):
    _, api = mgmt_target
    api.ok("PUT", f"/api/queues/{vhost}/keep", {"durable": True, "arguments": {"x-max-length": 5}})
    doc = {"queues": [
        {"name": "keep", "vhost": vhost, "durable": True, "auto_delete": False,
         "arguments": {"x-max-length": 99}},
        {"name": "fresh", "vhost": vhost, "durable": True, "auto_delete": False, "arguments": {}},
    ], "exchanges": [
        {"name": "amq.direct", "vhost": vhost, "type": "direct", "durable": True,
         "auto_delete": False, "internal": False, "arguments": {}},
    ]}
    status, _ = api.call("POST", "/api/definitions", doc)
    assert status in (200, 201, 204)
    assert api.get(f"/api/queues/{vhost}/keep")["arguments"] == {"x-max-length": 5}
    assert api.get(f"/api/queues/{vhost}/fresh")["name"] == "fresh"


def test_put_accepts_what_rabbitmq_accepts(mgmt_target, vhost):
    _, api = mgmt_target
    # pyrabbit2 sends "arguments": []; durable defaults to false, as RabbitMQ's PUT.
    assert api.call("PUT", f"/api/queues/{vhost}/argl", {"arguments": []})[0] == 201
    assert api.get(f"/api/queues/{vhost}/argl")["durable"] is False
    assert api.call("PUT", f"/api/exchanges/{vhost}/argx", {"type": "topic", "arguments": []})[0] == 201
    x = api.get(f"/api/exchanges/{vhost}/argx")
    assert (x["durable"], x["arguments"]) == (False, {})


def test_monitoring_fields(mgmt_target, vhost):
    broker, api = mgmt_target
    c = connect(broker, vhost)
    ch = c.channel()
    ch.queue_declare("mon")
    for _ in range(5):
        ch.basic_publish("", "mon", b"hello")
    ch2 = c.channel()
    ch2.basic_qos(prefetch_count=10)
    ch2.basic_consume("mon", lambda *a: None)
    c.process_data_events(0.5)
    try:
        q = poll(lambda: (lambda q: q if "consumer_capacity" in q and q.get("consumers") == 1 else None)(
            api.get(f"/api/queues/{vhost}/mon")))
        assert 0.0 <= q["consumer_capacity"] <= 1.0
        assert 0.0 <= q["consumer_utilisation"] <= 1.0
        assert "message_bytes_unacknowledged" in q
        v = poll(lambda: (lambda v: v if v.get("message_stats", {}).get("publish") == 5 else None)(
            api.get(f"/api/vhosts/{vhost}")))
        assert v["message_stats"]["deliver_get"] == 5
        assert "publish_details" in v["message_stats"]
    finally:
        c.close()
