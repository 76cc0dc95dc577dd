"""`warren-up`, the seed's whole topology in one command, as a user runs it: the front ports
serve pika, a Celery worker and the management UI; kill -9 of a queue's master (through
`warren-up kill`) under confirmed publishing loses nothing; `--nodes 2` (with its witness)
survives either node's death; Ctrl-C (SIGINT) leaves no process and no bound port; a taken front
port is refused with what to do.

warren only: warren-up starts warren-broker and warren-lb processes. Every front address is
127.0.0.1:0 (warren-up reads the bound ports back into <data-dir>/warren-up.json)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cluster_support import (History, check_history, consumer, drain, eventually, join_all, pika_params,
                             publisher, start_recording_worker, start_threads)
from conftest import TARGET, _STARTED, register_log, tail, unregister_log, warren_binary

pytestmark = pytest.mark.skipif(TARGET != "warren", reason="warren-up starts warren processes")


class WarrenUp:
    def __init__(self, proc: subprocess.Popen, data: Path, out: Path):
        self.proc, self.data, self.out = proc, data, out

    @property
    def queue_nodes(self) -> int:
        """Nodes that hold queues (a witness holds none)."""
        return sum(1 for n in self.state["nodes"] if n != "witness")

    @property
    def state(self) -> dict:
        return json.loads((self.data / "warren-up.json").read_text())

    def front(self, name: str) -> str:
        return self.state["lb"][name]

    def ctl(self, *args: str) -> str:
        r = subprocess.run([str(up_binary()), *args, "--data-dir", str(self.data)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, f"warren-up {' '.join(args)}: {r.stderr}"
        return r.stdout

    def api(self, path: str, via: str | None = None):
        req = urllib.request.Request(f"http://{via or self.front('mgmt')}{path}")
        req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def node_api(self, short: str, path: str):
        return self.api(path, via=self.state["nodes"][short]["mgmt"])


def up_binary() -> Path:
    return warren_binary().parent / "warren-up"


def start_up(tmp: Path, *extra: str) -> WarrenUp:
    binary = up_binary()
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: build the binaries first (`cargo build --bins`)", pytrace=False)
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "up"
    out = tmp / "warren-up.out"
    args = [str(binary), "--amqp", "127.0.0.1:0", "--mgmt", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--data-dir", str(data), "--status-interval", "1", "--failure-detection-ms", "1000", *extra]
    with open(out, "wb") as f:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _STARTED.append(proc)
    register_log(f"warren-up output ({out})", out)
    up = WarrenUp(proc, data, out)

    def ready():
        assert proc.poll() is None, f"warren-up exited ({proc.returncode}):\n{tail(out)}"
        return (data / "warren-up.json").exists() and up.state.get("ready")
    eventually("warren-up ready", ready, timeout=90)
    for log in data.glob("*.log"):
        register_log(f"{log.name} ({log})", log)
    return up


def pids(up: WarrenUp) -> list[int]:
    st = up.state
    return [n["pid"] for n in st["nodes"].values() if n.get("pid")] + [st["lb_pid"]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def bound(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def interrupt(up: WarrenUp) -> None:
    """Ctrl-C: SIGINT to warren-up alone (the terminal would send it to its process group, which
    its children are not in)."""
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=90) == 0, tail(up.out)
    unregister_log(f"warren-up output ({up.out})")


def celery_round_trip(up: WarrenUp, tmp: Path, n: int = 20) -> None:
    """A Celery worker and a confirm_publish producer through warren-up's AMQP port: n tasks run."""
    w = start_recording_worker(tmp, f"pyamqp://guest:guest@{up.front('amqp')}//", "up-tasks", "up@localhost")
    try:
        producer = subprocess.run(
            [sys.executable, "-c", f"import recording_app\nfor i in range({n}): recording_app.record.apply_async((i,))"],
            env=w.env, cwd=tmp, capture_output=True, text=True, timeout=120)
        assert producer.returncode == 0, producer.stderr
        eventually(f"{n} tasks ran", lambda: set(w.ran()) >= set(range(n)), timeout=60)
    finally:
        w.stop()


def promise_through_kills(up: WarrenUp, queue: str, victims: list[str]) -> str:
    """Two confirming publishers and two consumers through the front AMQP port; each victim (a
    node, or `master` for the queue's master at that moment) is killed with `warren-up kill`
    then started again, in turn. Every confirmed message must be consumed."""
    import pika
    params = pika_params(up.front("amqp"))
    conn = pika.BlockingConnection(params)
    conn.channel().queue_declare(queue, durable=True)
    conn.close()
    eventually("the queue mirrored on every node and in sync", lambda: len(
        up.api(f"/api/queues/%2F/{queue}").get("synchronised_slave_nodes", [])) == up.queue_nodes - 1,
        timeout=30)
    h, stop = History(), threading.Event()
    t0 = time.monotonic()
    threads = start_threads((publisher, params, "p1", queue, stop, h), (publisher, params, "p2", queue, stop, h),
                            (consumer, params, "c1", queue, stop, h), (consumer, params, "c2", queue, stop, h))
    events = []
    try:
        for victim in victims:
            time.sleep(2)
            confirmed = len(h.confirmed)
            if victim == "master":
                victim = up.api(f"/api/queues/%2F/{queue}")["node"].split("@")[0]
            out = up.ctl("kill", victim)
            assert "killed" in out, out
            events.append((f"killed {victim}", time.monotonic()))
            eventually("confirms resume after the kill", lambda: len(h.confirmed) > confirmed + 20, timeout=30)
            time.sleep(1)
            up.ctl("start", victim)
            events.append((f"started {victim}", time.monotonic()))
            eventually(f"{victim} back in sync", lambda: len(
                up.api(f"/api/queues/%2F/{queue}").get("synchronised_slave_nodes", [])) == up.queue_nodes - 1,
                timeout=60)
    finally:
        stop.set()
        join_all(threads, "client")
    drain(h)
    return check_history(h, t0, events)


@pytest.mark.timeout(300)
def test_warren_up_serves_pika_celery_and_the_ui_and_a_master_kill_loses_nothing(tmp_path):
    up = start_up(tmp_path)
    st = up.state
    assert sorted(st["nodes"]) == ["r1", "r2", "r3"]
    # The UI and the API answer through the front management port, for the whole cluster.
    with urllib.request.urlopen(f"http://{up.front('mgmt')}/", timeout=10) as r:
        assert r.status == 200 and b"<html" in r.read().lower()
    nodes = up.api("/api/nodes")
    assert sorted(n["name"] for n in nodes) == ["r1@localhost", "r2@localhost", "r3@localhost"]
    assert all(n["running"] for n in nodes)
    policy = up.api("/api/policies/%2F/ha-all")
    assert policy["definition"] == {"ha-mode": "all", "ha-sync-mode": "automatic"}
    # The ELB's periodic resets are on by default.
    faults = json.loads(urllib.request.urlopen(
        f"http://{up.front('admin')}/listeners/amqp/faults", timeout=10).read())
    assert any(f.get("kind") == "reset" and f.get("name") == "elb-periodic" for f in faults), faults
    celery_round_trip(up, tmp_path)
    print(promise_through_kills(up, "up-promise", ["master", "master"]))
    # The status line counts what runs.
    status = up.ctl("status")
    assert "nodes 3/3 up" in status, status
    before = pids(up)
    ports = [up.front(k) for k in ("amqp", "mgmt", "admin")] + [
        n[k] for n in up.state["nodes"].values() for k in ("amqp", "mgmt", "cluster")]
    interrupt(up)
    left = [p for p in before if alive(p)]
    assert not left, f"still running after Ctrl-C: {left}"
    taken = [a for a in ports if bound(a)]
    assert not taken, f"still bound after Ctrl-C: {taken}"
    assert not (up.data / "control.sock").exists()


@pytest.mark.timeout(300)
def test_two_nodes_and_their_witness_survive_either_nodes_death(tmp_path):
    up = start_up(tmp_path, "--nodes", "2", "--chaos", "none")
    st = up.state
    assert sorted(st["nodes"]) == ["r1", "r2", "witness"]
    nodes = up.api("/api/nodes")
    assert len(nodes) == 3 and sum(1 for n in nodes if n.get("witness")) == 1
    print(promise_through_kills(up, "up-two", ["r1", "r2"]))
    interrupt(up)


def test_a_taken_front_port_is_refused_with_what_to_do(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([str(up_binary()), "--amqp", f"127.0.0.1:{port}", "--mgmt", "127.0.0.1:0",
                            "--admin", "127.0.0.1:0", "--data-dir", str(tmp_path / "up")],
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r
    assert f"127.0.0.1:{port} is not free" in r.stderr, r.stderr
    assert "--amqp 127.0.0.1:" in r.stderr, r.stderr
    # Nothing was started.
    assert not list((tmp_path / "up").glob("r*/"))


@pytest.mark.timeout(180)
def test_a_node_that_exits_is_reported_and_restarted_only_with_restart(tmp_path):
    up = start_up(tmp_path / "plain", "--nodes", "1", "--chaos", "none")
    pid = up.state["nodes"]["r1"]["pid"]
    os.kill(pid, signal.SIGKILL)
    eventually("the exit reported", lambda: "stays down" in up.out.read_text(), timeout=30)
    assert "r1@localhost (pid %d) exited: killed by SIGKILL" % pid in up.out.read_text()
    time.sleep(2)
    assert "restarted" not in up.out.read_text()
    interrupt(up)

    up = start_up(tmp_path / "restart", "--nodes", "1", "--chaos", "none", "--restart")
    pid = up.state["nodes"]["r1"]["pid"]
    os.kill(pid, signal.SIGKILL)
    eventually("restarted", lambda: up.state["nodes"]["r1"]["pid"] not in (None, pid)
               and alive(up.state["nodes"]["r1"]["pid"]), timeout=60)
    assert "r1@localhost restarted" in up.out.read_text()
    # It serves again through the front port.
    import pika
    conn = pika.BlockingConnection(pika_params(up.front("amqp")))
    conn.channel().queue_declare("after-restart", durable=True)
    conn.close()
    # A node stopped through warren-up is not restarted.
    up.ctl("stop", "r1")
    time.sleep(2)
    assert not alive(up.state["nodes"]["r1"]["pid"])
    interrupt(up)


@pytest.mark.timeout(240)
def test_a_config_file_and_a_data_dir_keep_the_topology_between_runs(tmp_path):
    """The same TOML config started twice: the second run finds its nodes, ports and the durable
    queue's persistent messages where the first left them."""
    import pika
    data = tmp_path / "kept"
    conf = tmp_path / "up.toml"
    conf.write_text(f'nodes = 2\nchaos = "none"\ndata-dir = "{data}"\nstatus-interval = 0\n'
                    'amqp = "127.0.0.1:0"\nmgmt = "127.0.0.1:0"\nadmin = "127.0.0.1:0"\n')

    def run() -> WarrenUp:
        binary = up_binary()
        out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}.out"
        with open(out, "wb") as f:
            proc = subprocess.Popen([str(binary), "--config", str(conf)], stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _STARTED.append(proc)
        up = WarrenUp(proc, data, out)
        eventually("warren-up ready", lambda: proc.poll() is None and (data / "warren-up.json").exists()
                   and up.state.get("ready"), timeout=90)
        return up

    up = run()
    first = {n: (s["amqp"], s["mgmt"]) for n, s in up.state["nodes"].items() if n != "witness"}
    conn = pika.BlockingConnection(pika_params(up.front("amqp")))
    ch = conn.channel()
    ch.queue_declare("kept", durable=True)
    ch.confirm_delivery()
    for i in range(50):
        ch.basic_publish("", "kept", f"m{i}".encode(), pika.BasicProperties(delivery_mode=2))
    conn.close()
    interrupt(up)
    assert (data / "r1").is_dir() and not (data / "control.sock").exists()

    up = run()
    assert {n: (s["amqp"], s["mgmt"]) for n, s in up.state["nodes"].items() if n != "witness"} == first
    eventually("the queue's 50 messages back", lambda: up.api("/api/queues/%2F/kept").get("messages") == 50,
               timeout=60)
    conn = pika.BlockingConnection(pika_params(up.front("amqp")))
    ch = conn.channel()
    got = []
    for _ in range(50):
        m = ch.basic_get("kept", auto_ack=True)
        assert m[0] is not None, f"only {len(got)} messages came back"
        got.append(m[2].decode())
    conn.close()
    assert sorted(got) == sorted(f"m{i}" for i in range(50))
    interrupt(up)
