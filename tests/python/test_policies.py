"""Policies and operator policies that take effect, driven as RabbitMQ users drive them: pika for
AMQP, the management API the way rabbitmqadmin and scripts call it, and rabbitmqadmin itself.
Every test passes against Debian's RabbitMQ 3.10.8 (WARREN_TEST_TARGET=rabbitmq), whose
management statistics lag by up to 5 s: API fields are polled until they settle."""

import subprocess
import time
import uuid

import pika
import pytest

from mgmt_target import mgmt_target  # noqa: F401 (fixtures)
from mgmt_target import poll, RABBITMQADMIN


def name(prefix):
    return f"pol.{prefix}.{uuid.uuid4().hex[:8]}"


def count(ch, q):
    return ch.queue_declare(q, passive=True).method.message_count


def bodies(ch, q, n):
    out = []
    for _ in range(n):
        m, _, body = ch.basic_get(q, auto_ack=True)
        if m is None:
            break
        out.append(body.decode())
    return out


def queue_json(api, q):
    return api.get(f"/api/queues/%2F/{q}")


def put_policy(api, pname, pattern, definition, apply_to="queues", priority=0, kind="policies"):
    api.ok("PUT", f"/api/{kind}/%2F/{pname}",
           {"pattern": pattern, "definition": definition, "apply-to": apply_to, "priority": priority})


def test_a_max_length_policy_trims_a_live_queue_and_shows_in_the_api(mgmt_target):
    broker, api = mgmt_target
    q, p = name("maxlen"), name("p")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    for i in range(20):
        ch.basic_publish("", q, str(i).encode())
    assert poll(lambda: count(ch, q) == 20)
    put_policy(api, p, f"^{q}$", {"max-length": 10})
    # The oldest go (drop-head), at once.
    assert poll(lambda: count(ch, q) == 10)
    j = poll(lambda: (lambda j: j if j.get("policy") == p else None)(queue_json(api, q)))
    assert j["effective_policy_definition"] == {"max-length": 10}
    assert j["operator_policy"] is None
    # The limit holds for new publishes; clearing the policy lifts it.
    ch.basic_publish("", q, b"20")
    assert poll(lambda: count(ch, q) == 10)
    api.ok("DELETE", f"/api/policies/%2F/{p}")
    j = poll(lambda: (lambda j: j if j.get("policy") is None else None)(queue_json(api, q)))
    assert j["effective_policy_definition"] == {}
    ch.basic_publish("", q, b"21")
    assert poll(lambda: count(ch, q) == 11)
    assert bodies(ch, q, 11) == [str(i) for i in range(11, 22)]
    ch.queue_delete(q)
    conn.close()


def test_policy_dead_lettering_ttl_and_the_arguments_that_win(mgmt_target):
    broker, api = mgmt_target
    q, dlq, p = name("dl"), name("dlq"), name("p")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(dlq)
    # The queue's own x-max-length (5) is lower than the policy's (10): 5 applies; the
    # policy's dead-letter-exchange applies since the queue names none.
    ch.queue_declare(q, arguments={"x-max-length": 5})
    put_policy(api, p, f"^{q}$", {"max-length": 10, "dead-letter-exchange": "",
                                   "dead-letter-routing-key": dlq, "message-ttl": 200})
    for i in range(8):
        ch.basic_publish("", q, str(i).encode())
    # 3 dropped at the head into the dead-letter queue (maxlen), the other 5 expire (200 ms).
    assert poll(lambda: count(ch, dlq) == 8)
    assert count(ch, q) == 0
    reasons = []
    for _ in range(8):
        m, props, _ = ch.basic_get(dlq, auto_ack=True)
        reasons.append(props.headers["x-death"][0]["reason"])
    assert sorted(reasons) == ["expired"] * 5 + ["maxlen"] * 3
    # An x-dead-letter-exchange argument wins over the policy's.
    q2 = name("dl2")
    ch.queue_declare(q2 + ".dead")
    ch.queue_declare(q2, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": q2 + ".dead",
                                    "x-max-length": 1})
    put_policy(api, p, f"^{q2}$", {"dead-letter-exchange": "", "dead-letter-routing-key": dlq})
    time.sleep(0.3)
    ch.basic_publish("", q2, b"a")
    ch.basic_publish("", q2, b"b")
    assert poll(lambda: count(ch, q2 + ".dead") == 1)
    assert count(ch, dlq) == 0
    api.ok("DELETE", f"/api/policies/%2F/{p}")
    for x in (q, q2, q2 + ".dead", dlq):
        ch.queue_delete(x)
    conn.close()


def test_the_highest_priority_policy_applies_and_operator_policies_cap_it(mgmt_target):
    broker, api = mgmt_target
    q, low, high, op = name("prio"), name("low"), name("high"), name("op")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    put_policy(api, low, "^pol\\.prio", {"max-length": 7}, priority=1)
    put_policy(api, high, f"^{q}$", {"max-length": 4, "expires": 600000}, priority=5)
    # apply-to exchanges never touches a queue, whatever its priority.
    put_policy(api, name("x"), f"^{q}$", {"alternate-exchange": "nowhere"}, apply_to="exchanges",
               priority=99)
    j = poll(lambda: (lambda j: j if j.get("policy") == high else None)(queue_json(api, q)))
    assert j["effective_policy_definition"] == {"max-length": 4, "expires": 600000}
    # An operator policy: the lower max-length of the two wins, its other keys add up.
    put_policy(api, op, "^pol\\.", {"max-length": 2, "message-ttl": 60000}, kind="operator-policies")
    j = poll(lambda: (lambda j: j if j.get("operator_policy") == op else None)(queue_json(api, q)))
    assert j["policy"] == high
    assert j["effective_policy_definition"] == {"max-length": 2, "expires": 600000, "message-ttl": 60000}
    for i in range(5):
        ch.basic_publish("", q, str(i).encode())
    assert poll(lambda: count(ch, q) == 2)
    listed = api.get("/api/operator-policies/%2F")
    assert [x["name"] for x in listed if x["name"] == op] == [op]
    # Operator policies refuse keys that are not theirs.
    status, reply = api.call("PUT", f"/api/operator-policies/%2F/{name('bad')}",
                             {"pattern": ".", "definition": {"dead-letter-exchange": "x"}})
    assert status == 400 and "not recognised" in str(reply), (status, reply)
    for kind, pname in [("operator-policies", op), ("policies", low), ("policies", high)]:
        api.ok("DELETE", f"/api/{kind}/%2F/{pname}")
    ch.queue_delete(q)
    conn.close()


def test_an_alternate_exchange_from_a_policy_takes_unroutable_messages(mgmt_target):
    broker, api = mgmt_target
    x, ae, q, p = name("x"), name("ae"), name("aeq"), name("p")
    conn = broker.connect()
    ch = conn.channel()
    ch.exchange_declare(x, "direct")
    ch.exchange_declare(ae, "fanout")
    ch.queue_declare(q)
    ch.queue_bind(q, ae)
    put_policy(api, p, f"^{x}$", {"alternate-exchange": ae}, apply_to="exchanges")
    poll(lambda: api.get(f"/api/exchanges/%2F/{x}").get("policy") == p)
    ch.basic_publish(x, "no-binding", b"lost?")
    assert poll(lambda: count(ch, q) == 1)
    api.ok("DELETE", f"/api/policies/%2F/{p}")
    poll(lambda: "policy" not in api.get(f"/api/exchanges/%2F/{x}"))
    ch.basic_publish(x, "no-binding", b"dropped")
    time.sleep(0.3)
    assert count(ch, q) == 1
    ch.exchange_delete(x)
    ch.exchange_delete(ae)
    ch.queue_delete(q)
    conn.close()


def test_a_delivery_limit_policy_dead_letters_a_quorum_queue_message_returned_too_often(mgmt_target):
    broker, api = mgmt_target
    q, dlq, p = name("qq"), name("qqdl"), name("p")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(dlq)
    ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
    put_policy(api, p, f"^{q}$", {"delivery-limit": 2, "dead-letter-exchange": "",
                                   "dead-letter-routing-key": dlq})
    poll(lambda: queue_json(api, q).get("policy") == p)
    ch.basic_publish("", q, b"poison", pika.BasicProperties(delivery_mode=2))
    returns = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m, _, _ = ch.basic_get(q)
        if m is None:
            if count(ch, dlq) == 1:
                break
            time.sleep(0.1)
            continue
        ch.basic_nack(m.delivery_tag, requeue=True)
        returns += 1
    assert count(ch, dlq) == 1, returns
    assert returns == 3, "delivered 3 times: the limit is 2 returns"
    api.ok("DELETE", f"/api/policies/%2F/{p}")
    ch.queue_delete(q)
    ch.queue_delete(dlq)
    conn.close()


def test_bad_policies_are_refused_with_rabbitmqs_reasons(mgmt_target):
    _, api = mgmt_target
    for definition, reason in [
        ({"max-length": -1}, "-1 is not a valid maximum length"),
        ({"overflow": "nope"}, "is not a valid overflow value"),
        ({"expires": 0}, "is not a valid queue expiry"),
        ({"no-such-key": 1}, "are not recognised policy settings"),
    ]:
        status, reply = api.call("PUT", f"/api/policies/%2F/{name('bad')}",
                                 {"pattern": ".", "definition": definition})
        assert status == 400, (definition, status, reply)
        assert reason in reply["reason"].replace("&lt;", "<").replace("&gt;", ">"), (definition, reply)


@pytest.mark.skipif(RABBITMQADMIN is None, reason="rabbitmqadmin not installed "
                    "(scripts/setup-test-env installs Debian's rabbitmq-server, which brings it)")
def test_rabbitmqadmin_declares_and_lists_policies(mgmt_target):
    broker, api = mgmt_target
    host, port = api.base.removeprefix("http://").rsplit(":", 1)
    q, p = name("adm"), name("p")

    def admin(*args):
        r = subprocess.run([RABBITMQADMIN, "-H", host, "-P", port, "-u", "guest", "-p", "guest", *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    for i in range(6):
        ch.basic_publish("", q, str(i).encode())
    admin("declare", "policy", f"name={p}", f"pattern=^{q}$", 'definition={"max-length": 2}',
          "apply-to=queues")
    assert poll(lambda: count(ch, q) == 2)
    assert p in admin("list", "policies", "name", "pattern")
    out = poll(lambda: (lambda o: o if p in o else None)(admin("-f", "tsv", "list", "queues", "name", "policy")))
    assert f"{q}\t{p}" in out
    admin("delete", "policy", f"name={p}")
    ch.queue_delete(q)
    conn.close()
