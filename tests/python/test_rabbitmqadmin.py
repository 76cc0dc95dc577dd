"""rabbitmqadmin (v1, as Debian ships it with rabbitmq-server) and pyrabbit2 against the management
API: list (sorted, with columns), declare, publish, get, delete, export, and pyrabbit2's paging
name filter. Every test passes against Debian's RabbitMQ 3.10.8 (WARREN_TEST_TARGET=rabbitmq)."""

import json
import subprocess

import pytest

from mgmt_target import mgmt_target, vhost  # noqa: F401 (fixtures)
from mgmt_target import poll, RABBITMQADMIN

needs_admin = pytest.mark.skipif(RABBITMQADMIN is None, reason="rabbitmqadmin not installed "
                                 "(Debian's rabbitmq-server ships it)")


def admin(api, vhost, *args):
    host, port = api.base.removeprefix("http://").rsplit(":", 1)
    r = subprocess.run([RABBITMQADMIN, "-H", host, "-P", port, "-u", "guest", "-p", "guest",
                        "-V", vhost, *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"rabbitmqadmin {args}: {r.stdout} {r.stderr}"
    return r.stdout


@needs_admin
def test_rabbitmqadmin_declare_publish_get_list_sort_export_delete(mgmt_target, vhost, tmp_path):
    _, api = mgmt_target
    for q in ("zeta", "alpha", "mid"):
        admin(api, vhost, "declare", "queue", f"name={q}", "durable=false")
    assert "Message published" in admin(api, vhost, "publish", "exchange=amq.default",
                                        "routing_key=alpha", "payload=hello admin")
    poll(lambda: api.get(f"/api/queues/{vhost}/alpha").get("messages") == 1)
    got = json.loads(admin(api, vhost, "-f", "raw_json", "get", "queue=alpha",
                           "ackmode=ack_requeue_false"))
    assert [m["payload"] for m in got] == ["hello admin"]

    rows = json.loads(admin(api, vhost, "-f", "raw_json", "list", "queues", "name", "durable",
                            "--sort=name"))
    assert [r["name"] for r in rows] == ["alpha", "mid", "zeta"]
    assert all(r.keys() == {"name", "durable"} for r in rows)
    rows = json.loads(admin(api, vhost, "-f", "raw_json", "list", "queues", "name",
                            "--sort=name", "--sort-reverse"))
    assert [r["name"] for r in rows] == ["zeta", "mid", "alpha"]
    tsv = admin(api, vhost, "-f", "tsv", "list", "queues", "name", "--sort=name")
    assert tsv.split() == ["name", "alpha", "mid", "zeta"] or tsv.split() == ["alpha", "mid", "zeta"]

    out = tmp_path / "defs.json"
    assert "Exported definitions" in admin(api, vhost, "export", str(out))
    defs = json.loads(out.read_text())
    # With -V, rabbitmqadmin exports that vhost's definitions (entries without a vhost field).
    assert {"alpha", "mid", "zeta"} <= {q["name"] for q in defs["queues"]}

    admin(api, vhost, "delete", "queue", "name=zeta")
    assert api.call("GET", f"/api/queues/{vhost}/zeta")[0] == 404
    # And the export goes back in: existing queues are kept, the deleted one comes back.
    assert "Uploaded definitions" in admin(api, vhost, "import", str(out))
    assert api.get(f"/api/queues/{vhost}/zeta")["name"] == "zeta"


def test_pyrabbit2_declare_publish_get_filter_delete(mgmt_target, vhost):
    from pyrabbit2.api import Client

    _, api = mgmt_target
    cl = Client(api.base.removeprefix("http://"), "guest", "guest")
    assert cl.is_alive(vhost)
    cl.create_exchange(vhost, "py.x", "direct")
    for q in ("py.b", "py.a", "other"):
        cl.create_queue(vhost, q, durable=False)
    cl.create_binding(vhost, "py.x", "py.a", "rk")
    assert cl.publish(vhost, "py.x", "rk", "hello pyrabbit2")
    # RabbitMQ's queue statistics come some seconds after the queue.
    poll(lambda: cl.get_queue(vhost, "py.a").get("messages") == 1)
    assert cl.get_queue_depth(vhost, "py.a") == 1
    msgs = cl.get_messages(vhost, "py.a", count=1, requeue=False)
    assert [m["payload"] for m in msgs] == ["hello pyrabbit2"]
    # A name pattern makes pyrabbit2 page through the results.
    assert sorted(q["name"] for q in cl.get_queues(vhost, pattern="py.")) == ["py.a", "py.b"]
    assert [q["name"] for q in cl.get_queues(vhost, pattern="^py\\.b$", regex=True)] == ["py.b"]
    assert cl.get_exchange(vhost, "py.x")["type"] == "direct"
    assert [b["routing_key"] for b in cl.get_queue_bindings(vhost, "py.a")] == ["py.a", "rk"]
    assert any(q["name"] == "py.b" for q in cl.get_definitions()["queues"])
    assert isinstance(cl.get_extensions(), list)
    assert cl.get_nodes() and cl.get_overview()["management_version"]
    cl.delete_queue(vhost, "py.b")
    # (is_alive declared the aliveness-test queue)
    assert [q["name"] for q in cl.get_queues(vhost)] == ["aliveness-test", "other", "py.a"]
    cl.delete_exchange(vhost, "py.x")
