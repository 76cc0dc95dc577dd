"""Publishing through the management API goes the way an AMQP publish does: routed through
alternate exchanges, mandatory (`routed: false` when nothing takes it) and confirmed (a queue
that refuses it, reject-publish when full, makes it a 400). Passes against RabbitMQ 3.10.8
(WARREN_TEST_TARGET=rabbitmq) and warren."""

import uuid

from mgmt_target import mgmt_target  # noqa: F401 (fixture)


def publish(api, exchange, rk, payload="x", properties=None):
    return api.call("POST", f"/api/exchanges/%2F/{exchange}/publish",
                    {"properties": properties or {}, "routing_key": rk, "payload": payload,
                     "payload_encoding": "string"})


def test_http_publish_is_mandatory_confirmed_and_follows_alternate_exchanges(mgmt_target):
    broker, api = mgmt_target
    tag = uuid.uuid4().hex[:8]
    full, ae, x, aeq, dq = (f"pub.{n}.{tag}" for n in ("full", "ae", "x", "aeq", "durable"))
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(full, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    assert publish(api, "amq.default", full) == (200, {"routed": True})
    status, reply = publish(api, "amq.default", full)
    assert status == 400, reply
    assert reply["reason"] == "rejected Unable to publish message. Check queue limits."
    assert publish(api, "amq.default", f"nowhere.{tag}") == (200, {"routed": False})
    ch.exchange_declare(ae, "fanout")
    ch.exchange_declare(x, "direct", arguments={"alternate-exchange": ae})
    ch.queue_declare(aeq)
    ch.queue_bind(aeq, ae)
    assert publish(api, x, "unbound") == (200, {"routed": True})
    # A persistent message to a durable queue is confirmed (on disk) before the answer.
    ch.queue_declare(dq, durable=True)
    assert publish(api, "amq.default", dq, "kept", {"delivery_mode": 2}) == (200, {"routed": True})
    assert ch.basic_get(dq, auto_ack=True)[2] == b"kept"
    assert ch.basic_get(aeq, auto_ack=True)[2] == b"x"
    for q in (full, aeq, dq):
        ch.queue_delete(q)
    ch.exchange_delete(x)
    ch.exchange_delete(ae)
    conn.close()
