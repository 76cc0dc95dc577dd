"""A broker of the selected target (WARREN_TEST_TARGET) with its management HTTP API, for tests
that drive both AMQP and the API the way rabbitmqadmin and monitoring scripts do.

warren-broker gets `--mgmt 127.0.0.1:0`; RabbitMQ gets the rabbitmq_management plugin on a free
port (its start takes a few seconds longer)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (
    TARGET,
    Broker,
    _STARTED,
    _addr_port,
    _launch_rabbitmq,
    _wait_for_listeners,
    free_port,
    register_log,
    stop_process,
    tail,
    warren_binary,
)

import subprocess


@dataclass
class Api:
    """The management API of one broker, as guest."""
    base: str
    user: str = "guest"
    password: str = "guest"

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", "Basic " + token)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> object:
        status, body = self.call("GET", path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def ok(self, method: str, path: str, body: object | None = None) -> object:
        status, reply = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {reply}"
        return reply


def _start_warren(tmp: Path) -> tuple[Broker, Api]:
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    args = [str(warren_binary()), "--amqp", "127.0.0.1:0", "--mgmt", "127.0.0.1:0",
            "--data-dir", str(data)]
    log_path = tmp / "broker.log"
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp, start_new_session=True)
    _STARTED.append(proc)
    found = _wait_for_listeners(proc, log_path, {"amqp", "mgmt"}, timeout=20)
    broker = Broker(target="warren", proc=proc, log_path=log_path, port=_addr_port(found["amqp"]),
                    listeners=found)
    return broker, Api(f"http://{found['mgmt']}")


def _start_rabbitmq(tmp: Path) -> tuple[Broker, Api]:
    port, http_port, dist_port = free_port(), free_port(), free_port()
    conf = tmp / "rabbitmq.conf"
    conf.write_text(f"listeners.tcp.1 = 127.0.0.1:{port}\n"
                    f"management.tcp.port = {http_port}\n"
                    "management.tcp.ip = 127.0.0.1\n"
                    "loopback_users.guest = true\n")
    (tmp / "enabled_plugins").write_text("[rabbitmq_management].\n")
    env = dict(os.environ)
    env.update(
        HOME=str(tmp),
        RABBITMQ_NODENAME=f"warren-mgmt-{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost",
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_MNESIA_BASE=str(tmp / "mnesia"),
        RABBITMQ_LOG_BASE=str(tmp / "log"),
        RABBITMQ_LOGS="-",
        RABBITMQ_CONFIG_FILE=str(conf),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(tmp / "enabled_plugins"),
    )
    broker = _launch_rabbitmq(tmp, env, port, free_port(), 1)
    api = Api(f"http://127.0.0.1:{http_port}")
    deadline = time.monotonic() + 60
    while True:
        try:
            if api.call("GET", "/api/overview")[0] == 200:
                return broker, api
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_process(broker.proc)
            pytest.fail("RabbitMQ's management API did not answer; log:\n" + tail(broker.log_path),
                        pytrace=False)
        time.sleep(0.5)


@pytest.fixture(scope="session")
def mgmt_target(tmp_path_factory) -> tuple[Broker, Api]:
    """(broker, api) of the selected target, started once per session."""
    tmp = tmp_path_factory.mktemp(f"{TARGET}-mgmt")
    if TARGET == "rabbitmq":
        broker, api = _start_rabbitmq(tmp)
    else:
        broker, api = _start_warren(tmp)
    register_log(f"{TARGET} broker with management ({broker.log_path})", broker.log_path)
    yield broker, api
    stop_process(broker.proc, timeout=4 if TARGET == "rabbitmq" else 10)


@pytest.fixture
def vhost(mgmt_target, request):
    """A fresh vhost (named after the test module) where guest has every permission, deleted
    after the test."""
    _, api = mgmt_target
    prefix = request.module.__name__.removeprefix("test_").replace("_", "-")
    v = f"{prefix}-{uuid.uuid4().hex[:8]}"
    api.ok("PUT", f"/api/vhosts/{v}", {})
    api.ok("PUT", f"/api/permissions/{v}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    yield v
    api.call("DELETE", f"/api/vhosts/{v}")


def poll(fn, timeout=15.0, interval=0.2):
    """fn() until it returns something truthy (the value), or fail with the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out; last value {last!r}")


# Debian's rabbitmq-server ships rabbitmqadmin inside the management plugin (on PATH or not).
_PLUGIN_CLI = Path("/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8/plugins/"
                   "rabbitmq_management-3.10.8/priv/www/cli/rabbitmqadmin")
RABBITMQADMIN = shutil.which("rabbitmqadmin") or (str(_PLUGIN_CLI) if _PLUGIN_CLI.exists() else None)
