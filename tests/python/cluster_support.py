"""Clustered warren-broker processes and warren-lb for the cluster tests: start a node (loopback,
ports picked at run time, or given addresses, optionally under a wrapper such as `ip netns exec`),
restart it where it was, poll until something holds, start a balancer in front of the nodes; pika
publishers with confirms and consumers with manual acks (a thread and a connection each: pika is
not thread-safe) recording a history, and the checker of that history.

Every process started here is in conftest's _STARTED (killed at exit even if a teardown never
runs) and has its log registered, so a failing test's report carries it. WARREN_TEST_LOG sets the
nodes' RUST_LOG (info by default), as for the Rust cluster tests."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pika
import pika.exceptions
import pytest

from conftest import _STARTED, register_log, stop_process, tail, unregister_log, warren_binary

_LISTENING = re.compile(r"listening proto=(\w+) addr=(\S+)")
_LB_LISTENING = re.compile(r"listening listener=(\S+) addr=(\S+)")


class Node:
    """One broker process of a cluster. `restart()` starts it again with the same command line
    (same name and data directory; without `--join`: a restarted node rejoins the cluster in its
    data directory) on the AMQP address it had (where a load balancer expects it), appending to
    the same log."""

    def __init__(self, name: str, proc, log: Path, addrs: dict[str, str], args: list[str],
                 protos: tuple[str, ...], user: str = "guest", password: str = "guest"):
        self.name, self.proc, self.log, self.addrs = name, proc, log, addrs
        self.args, self.protos = args, protos
        self.user, self.password = user, password

    def api(self, method: str, path: str, body=None, timeout: float = 10):
        req = urllib.request.Request(f"http://{self.addrs['mgmt']}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode())
        cred = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", "Basic " + cred)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
            return json.loads(data) if data else None

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self) -> "Node":
        args = list(self.args)
        if "amqp" in self.addrs:
            args[args.index("--amqp") + 1] = self.addrs["amqp"]
        if "--join" in args:
            i = args.index("--join")
            del args[i:i + 2]
        return _launch(self.name, args, self.log, self.protos, self.user, self.password)

    def stop(self) -> None:
        stop_process(self.proc)
        unregister_log(self.log_name)

    @property
    def log_name(self) -> str:
        return f"{self.name} log ({self.log})"


class Procs:
    """The nodes and balancers a test started, stopped (and their logs unregistered) by the
    `cluster_procs` fixture after the test's report is made, so a failure's report has them."""

    def __init__(self):
        self.items: list = []

    def add(self, p):
        self.items.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.items):
            p.stop()
        self.items.clear()


@pytest.fixture
def cluster_procs():
    procs = Procs()
    yield procs
    procs.stop_all()


def start_node(tmp: Path, name: str, secret: Path, join: str | None, *, fd_ms: int = 1000,
               amqp: str = "127.0.0.1:0", mgmt: str = "127.0.0.1:0", cluster: str = "127.0.0.1:0",
               extra: tuple[str, ...] = (), protos: tuple[str, ...] = ("amqp", "mgmt", "cluster"),
               wrap: tuple[str, ...] = (), user: str = "guest", password: str = "guest") -> Node:
    """Starts `name` with its data directory and log under `tmp` (named after the part of `name`
    before the @). `wrap` goes before the binary (`ip netns exec NS`); `protos` are the listeners
    it must report before it counts as started (a witness has no AMQP listener)."""
    binary = warren_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} is missing: build the binaries first (`cargo build --bins`)", pytrace=False)
    data = tmp / name.split("@")[0]
    data.mkdir(parents=True, exist_ok=True)
    args = [*wrap, str(binary), "--node-name", name, "--data-dir", str(data),
            "--amqp", amqp, "--mgmt", mgmt, "--cluster-listen", cluster,
            "--cluster-secret-file", str(secret), "--cluster-failure-detection-ms", str(fd_ms), *extra]
    if join:
        args += ["--join", join]
    return _launch(name, args, data.with_suffix(".log"), protos, user, password)


def _launch(name: str, args: list[str], log: Path, protos: tuple[str, ...], user: str, password: str) -> Node:
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as f:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, RUST_LOG=os.environ.get("WARREN_TEST_LOG", "info")),
                                start_new_session=True)
    _STARTED.append(proc)
    node = Node(name, proc, log, {}, args, protos, user, password)
    register_log(node.log_name, log)
    deadline = time.monotonic() + 30
    while True:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
        node.addrs = dict(_LISTENING.findall(text))
        if set(protos) <= node.addrs.keys():
            return node
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"{name} did not start ({' '.join(args)}):\n{tail(log, start)}", pytrace=False)
        time.sleep(0.05)


def eventually(what: str, f, timeout: float = 30.0, interval: float = 0.1):
    """Polls `f` until it returns something true (returned), or fails after `timeout` seconds.
    An exception from `f` counts as not yet (a node that is still starting or was just killed)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            if v := f():
                return v
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"never true within {timeout} s: {what}"
                                 + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


def voters(node: Node) -> int:
    return sum(1 for n in node.api("GET", "/api/nodes") if n.get("voter"))


def set_ha_all(node: Node) -> None:
    node.api("PUT", "/api/policies/%2F/ha-all",
             {"pattern": "", "apply-to": "queues", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}})


class Lb:
    def __init__(self, proc, log: Path, addr: str):
        self.proc, self.log, self.addr = proc, log, addr

    @property
    def log_name(self) -> str:
        return f"warren-lb log ({self.log})"

    def stop(self) -> None:
        stop_process(self.proc)
        unregister_log(self.log_name)


def start_lb(tmp: Path, args: list[str], listener: str = "default", config: str | None = None) -> Lb:
    """warren-lb with `args` (and `config` written to a TOML file passed as --config); returns
    once `listener` listens, with its address."""
    lb_bin = warren_binary().parent / "warren-lb"
    if not (lb_bin.is_file() and os.access(lb_bin, os.X_OK)):
        pytest.fail(f"{lb_bin} is missing: build the binaries first (`cargo build --bins`)", pytrace=False)
    if config is not None:
        conf = tmp / "warren-lb.toml"
        conf.write_text(config)
        args = ["--config", str(conf), *args]
    log = tmp / "warren-lb.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(lb_bin), *args], stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, RUST_LOG="info"), start_new_session=True)
    _STARTED.append(proc)
    lb = Lb(proc, log, "")
    register_log(lb.log_name, log)
    deadline = time.monotonic() + 20
    while True:
        found = dict(_LB_LISTENING.findall(log.read_text("utf-8", "replace")))
        if listener in found:
            lb.addr = found[listener]
            return lb
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"warren-lb did not listen:\n{tail(log)}", pytrace=False)
        time.sleep(0.05)


# ---------------------------------------------------------------- a recording Celery worker

RECORDING_APP = '''
import os
from celery import Celery

app = Celery("recording_app")
app.conf.update(
    broker_url=os.environ["RECORD_BROKER"],
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry=True,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_acks_late=True,
    task_default_queue=os.environ["RECORD_QUEUE"],
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    task_serializer="json",
    accept_content=["json"],
)


@app.task(name="recording_app.record")
def record(n):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write(f"{n}\\n")
'''


@dataclass
class RecordingWorker:
    """A Celery worker (solo pool, acks late, one prefetched task) whose task `record(n)` appends
    n to `record`; `env` and `tmp` (on PYTHONPATH: `import recording_app`) serve a producer."""
    proc: subprocess.Popen
    log: Path
    record: Path
    env: dict
    tmp: Path

    def ran(self) -> list[int]:
        return [int(x) for x in self.record.read_text().split()] if self.record.exists() else []

    def stop(self) -> None:
        stop_process(self.proc)
        unregister_log(f"celery worker log ({self.log})")


def start_recording_worker(tmp: Path, broker_url: str, queue: str, name: str) -> RecordingWorker:
    """Writes recording_app.py into `tmp` and starts its worker on `queue`, confirm_publish on,
    against `broker_url`; returns once it is ready."""
    (tmp / "recording_app.py").write_text(RECORDING_APP)
    record = tmp / "record.txt"
    env = dict(os.environ, RECORD_BROKER=broker_url, RECORD_FILE=str(record), RECORD_QUEUE=queue,
               PYTHONUNBUFFERED="1", PYTHONPATH=str(tmp) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp / "worker.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "recording_app", "worker", "--pool=solo", "-Q", queue,
             "-n", name, "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO"],
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    _STARTED.append(proc)
    register_log(f"celery worker log ({log})", log)
    w = RecordingWorker(proc, log, record, env, tmp)
    try:
        eventually("worker ready", lambda: f"{name} ready." in log.read_text("utf-8", "replace"), timeout=60)
    except AssertionError:
        w.stop()
        raise
    return w


# ---------------------------------------------------------------- clients and their history


@dataclass
class History:
    """What the clients saw. Every publish attempt has a body of its own (`LABEL-N`, the label
    naming the publisher), so a publisher's resend is never taken for a duplicate."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    # body -> when it was sent (every attempt)
    sent: dict[str, float] = field(default_factory=dict)
    # body -> (sent at, confirmed at), time.monotonic()
    confirmed: dict[str, tuple[float, float]] = field(default_factory=dict)
    # deliveries in arrival order: (body, redelivered, when, consumer)
    delivered: list[tuple[str, bool, float, str]] = field(default_factory=list)
    nacked: int = 0
    returned: int = 0
    # label -> when an open connection of that publisher went
    dropped: dict[str, list[float]] = field(default_factory=dict)
    connect_failures: int = 0

    def confirmed_via(self, label: str) -> dict[str, tuple[float, float]]:
        with self.lock:
            return {b: t for b, t in self.confirmed.items() if b.rsplit("-", 1)[0] == label}


def pika_params(addr: str, user: str = "guest", password: str = "guest") -> pika.ConnectionParameters:
    host, port = addr.rsplit(":", 1)
    return pika.ConnectionParameters(host=host, port=int(port), credentials=pika.PlainCredentials(user, password),
                                     connection_attempts=1, socket_timeout=5, stack_timeout=10,
                                     blocked_connection_timeout=10)


def close_quietly(conn) -> None:
    try:
        if conn is not None and conn.is_open:
            conn.close()
    except Exception:  # reset by the balancer, or the node died under it
        pass


def publish_once(ch, queue: str, body: str, h: History) -> bool:
    """One persistent publish with mandatory on a confirm channel; True once confirmed. A nack
    or a return is not a confirm; a lost connection raises."""
    sent_at = time.monotonic()
    with h.lock:
        h.sent[body] = sent_at
    try:
        ch.basic_publish("", queue, body.encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
    except pika.exceptions.NackError:
        with h.lock:
            h.nacked += 1
        return False
    except pika.exceptions.UnroutableError:
        with h.lock:
            h.returned += 1
        return False
    with h.lock:
        h.confirmed[body] = (sent_at, time.monotonic())
    return True


def publisher(params: pika.ConnectionParameters, label: str, queue: str, stop: threading.Event, h: History) -> None:
    """Persistent messages one at a time with confirms (as Celery's confirm_publish), a new body
    for every attempt, reconnecting whenever the connection goes, until `stop`."""
    n = 0
    while not stop.is_set():
        conn = None
        try:
            conn = pika.BlockingConnection(params)
        except Exception:
            with h.lock:
                h.connect_failures += 1
            time.sleep(0.05)
            continue
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            while not stop.is_set():
                n += 1
                if not publish_once(ch, queue, f"{label}-{n}", h):
                    time.sleep(0.02)
        except Exception:  # the connection went (reset, killed or paused node, closed channel)
            with h.lock:
                h.dropped.setdefault(label, []).append(time.monotonic())
            time.sleep(0.05)
        finally:
            close_quietly(conn)


def consumer(params: pika.ConnectionParameters, label: str, queue: str, stop: threading.Event, h: History) -> None:
    """Manual acks, prefetch 20, recording every delivery with its redelivered flag; consumes
    again whenever the broker cancels the consumer (basic.cancel) or the connection goes."""

    def on_message(ch, method, _props, body):
        with h.lock:
            h.delivered.append((body.decode(), bool(method.redelivered), time.monotonic(), label))
        ch.basic_ack(method.delivery_tag)

    while not stop.is_set():
        conn = None
        try:
            conn = pika.BlockingConnection(params)
            ch = conn.channel()
            ch.basic_qos(prefetch_count=20)
            while not stop.is_set():
                if not ch.consumer_tags:
                    ch.basic_consume(queue, on_message, auto_ack=False)
                conn.process_data_events(time_limit=0.2)
        except Exception:
            time.sleep(0.05)
        finally:
            close_quietly(conn)


def start_threads(*targets: tuple) -> list[threading.Thread]:
    """Daemon threads (a client stuck on a dead connection must not hold the interpreter at
    exit), started. Each target is (function, args...)."""
    threads = [threading.Thread(target=t[0], args=t[1:], daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def join_all(threads: list[threading.Thread], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = sum(1 for t in threads if t.is_alive())
    assert not stuck, f"{stuck} {what} thread(s) never returned within {timeout} s of being stopped"


def drain(h: History, timeout: float = 30.0) -> None:
    """Waits until every confirmed body was delivered (or `timeout`: check_history says what
    is missing)."""
    def done():
        with h.lock:
            got = {d[0] for d in h.delivered}
            return all(b in got for b in h.confirmed)
    try:
        eventually("the consumers got every confirmed message", done, timeout=timeout)
    except AssertionError:
        pass


def check_history(h: History, t0: float, events: list[tuple[str, float]]) -> str:
    """The promise from the clients' history: every confirmed body consumed at least once,
    nothing consumed that was never sent, a body consumed again only with redelivered=true.
    Returns a summary; `events` (name, monotonic time) place lost bodies in time (from t0, whose
    wall-clock time is given to match the nodes' logs)."""
    t0_wall = time.time() - (time.monotonic() - t0)
    events = [(f"t0 = {datetime.fromtimestamp(t0_wall, timezone.utc):%H:%M:%S.%f} UTC", t0), *events]
    with h.lock:
        seen: dict[str, int] = {}
        bad_duplicates = []
        for body, redelivered, _, _ in h.delivered:
            seen[body] = seen.get(body, 0) + 1
            if seen[body] > 1 and not redelivered:
                bad_duplicates.append(body)
        lost = sorted(b for b in h.confirmed if b not in seen)
        phantom = sorted(b for b in seen if b not in h.sent)
        if lost:
            detail = "; ".join(f"{b} sent {h.confirmed[b][0] - t0:+.3f} s, confirmed {h.confirmed[b][1] - t0:+.3f} s"
                               for b in lost[:5])
            raise AssertionError(f"confirmed and never consumed: {len(lost)} of {len(h.confirmed)}: {lost[:20]} "
                                 f"({detail}; events {[(e, round(at - t0, 3)) for e, at in events]})")
        assert not phantom, f"consumed, never sent: {phantom[:20]}"
        if bad_duplicates:
            detail = "; ".join(
                f"{b} sent {h.sent[b] - t0:+.3f} s, "
                + (f"confirmed {h.confirmed[b][1] - t0:+.3f} s" if b in h.confirmed else "never confirmed")
                + ", delivered " + ", ".join(f"{at - t0:+.3f} s to {c}{' (redelivered)' if r else ''}"
                                             for d, r, at, c in h.delivered if d == b)
                for b in bad_duplicates[:5])
            raise AssertionError(f"consumed again without redelivered=true: {bad_duplicates[:20]} ({detail}; "
                                 f"events {[(e, round(at - t0, 3)) for e, at in events]})")
        return (f"{len(h.sent)} sent, {len(h.confirmed)} confirmed ({h.nacked} nacked, {h.returned} returned, "
                f"{sum(len(d) for d in h.dropped.values())} publisher connections lost, {h.connect_failures} "
                f"publisher connection attempts failed), {len(h.delivered)} "
                f"deliveries ({sum(1 for n in seen.values() if n > 1)} delivered more than once)")
