"""Definitions exported by warren-broker's management API import into Debian's RabbitMQ.

The other direction (a `rabbitmqctl export_definitions` file imported into warren, its password hash
accepted over AMQP) is broker/tests/definitions.rs. Here warren exports a durable topic exchange, a
durable queue with an argument, a binding, and a user with a password, and RabbitMQ imports the file
with `rabbitmqctl import_definitions`: the user logs in to RabbitMQ with the password it was given on
warren (so the salted SHA-256 hash warren wrote is RabbitMQ's format), and a publish to the exchange
reaches the queue through the imported binding.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pika
import pytest

from conftest import (
    _STARTED,
    RABBITMQ_SERVER,
    Broker,
    _addr_port,
    _wait_for_listeners,
    register_log,
    start_rabbitmq,
    stop_process,
    unregister_log,
    warren_binary,
)

RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


def start_warren_mgmt(tmp: Path) -> tuple[Broker, str]:
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    args = [str(warren_binary()), "--amqp", "127.0.0.1:0", "--mgmt", "127.0.0.1:0",
            "--data-dir", str(data)]
    log_path = tmp / "warren.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp, start_new_session=True)
    _STARTED.append(proc)
    found = _wait_for_listeners(proc, log_path, {"amqp", "mgmt"}, timeout=20)
    broker = Broker(target="warren", proc=proc, log_path=log_path,
                    port=_addr_port(found["amqp"]), listeners=found)
    return broker, f"http://{found['mgmt']}"


def api(base: str, method: str, path: str, body: object | None = None) -> bytes:
    req = urllib.request.Request(base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


@pytest.mark.timeout(150)
def test_warren_export_imports_into_rabbitmq(tmp_path, tls_files):
    if not os.access(RABBITMQ_SERVER, os.X_OK) or not os.access(RABBITMQCTL, os.X_OK):
        pytest.skip(f"{RABBITMQ_SERVER} / {RABBITMQCTL} not installed "
                    "(scripts/setup-test-env installs Debian's rabbitmq-server when run as root)")
    wtmp = tmp_path / "warren"
    wtmp.mkdir()
    warren, base = start_warren_mgmt(wtmp)
    register_log("warren (export side)", warren.log_path)
    try:
        conn = warren.connect()
        ch = conn.channel()
        ch.exchange_declare("interop.x", "topic", durable=True)
        ch.queue_declare("interop.q", durable=True, arguments={"x-max-length": 10})
        ch.queue_bind("interop.q", "interop.x", routing_key="a.#")
        conn.close()
        api(base, "PUT", "/api/users/carol", {"password": "s3cret", "tags": "management"})
        api(base, "PUT", "/api/permissions/%2F/carol",
            {"configure": ".*", "write": ".*", "read": ".*"})
        exported = json.loads(api(base, "GET", "/api/definitions"))
    finally:
        unregister_log("warren (export side)")
        stop_process(warren.proc)
    carol = [u for u in exported["users"] if u["name"] == "carol"]
    assert carol and carol[0]["hashing_algorithm"] == "rabbit_password_hashing_sha256", carol
    assert "s3cret" not in json.dumps(exported), "clear-text password in the export"
    defs = tmp_path / "warren-definitions.json"
    defs.write_text(json.dumps(exported))

    rtmp = tmp_path / "rabbitmq"
    rtmp.mkdir()
    rabbit = start_rabbitmq(rtmp, (tls_files.cert, tls_files.key, tls_files.ca))
    register_log("rabbitmq (import side)", rabbit.log_path)
    try:
        m = re.search(r"(warren-interop-[\w-]+@localhost)",
                      rabbit.log_path.read_text("utf-8", "replace"))
        assert m, "RabbitMQ node name not in its log"
        # The node's Erlang cookie is in its HOME; /usr/sbin/rabbitmqctl would switch user.
        r = subprocess.run([RABBITMQCTL, "-n", m.group(1), "import_definitions", str(defs)],
                           env=dict(os.environ, HOME=str(rtmp)), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, f"import_definitions failed: {r.stdout}\n{r.stderr}"

        # carol's password, hashed by warren, works on RabbitMQ.
        params = pika.ConnectionParameters(
            host="127.0.0.1", port=rabbit.port,
            credentials=pika.PlainCredentials("carol", "s3cret"), connection_attempts=1)
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.exchange_declare("interop.x", "topic", durable=True, passive=True)
        ok = ch.queue_declare("interop.q", durable=True, passive=True)
        assert ok.method.message_count == 0
        ch.confirm_delivery()
        ch.basic_publish("interop.x", "a.b.c", b"through the imported binding")
        method, _props, body = ch.basic_get("interop.q", auto_ack=True)
        assert method is not None and body == b"through the imported binding"
        # The imported argument is the queue's: a redeclare without it is refused (406).
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            ch.queue_declare("interop.q", durable=True)
        assert e.value.reply_code == 406
        conn.close()
        # A wrong password is refused: the hash is checked, not ignored.
        bad = pika.ConnectionParameters(
            host="127.0.0.1", port=rabbit.port,
            credentials=pika.PlainCredentials("carol", "wrong"), connection_attempts=1)
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(bad)
    finally:
        unregister_log("rabbitmq (import side)")
        stop_process(rabbit.proc, timeout=4)
