"""Celery 5 end to end: a real worker process, tasks published with confirms, results over rpc://."""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import register_log, stop_process, tail, unregister_log, _STARTED

HERE = Path(__file__).resolve().parent

# "plain": the worker without its broadcast features; "full": as Celery users run it by default
# (mingle at start, gossip and heartbeat events on the celeryev topic exchange).
# "quorum": full, with the task queues declared x-queue-type=quorum (Celery then turns global QoS off and
# keeps a static prefetch; with a direct task exchange countdowns are still held by the worker).
WORKER_MODES = {
    "plain": ["--without-gossip", "--without-mingle", "--without-heartbeat"],
    "full": [],
    "quorum": [],
}


class Worker:
    def __init__(self, proc, log_path, hostname, queue, env):
        self.proc, self.log_path, self.hostname, self.queue, self.env = proc, log_path, hostname, queue, env

    def log(self):
        return tail(self.log_path, max_lines=400)

    def assert_healthy(self):
        text = self.log_path.read_text("utf-8", "replace")
        assert self.proc.poll() is None, f"celery worker exited with {self.proc.returncode}:\n{self.log()}"
        for bad in ("Connection to broker lost", "consumer: Cannot connect", "Unrecoverable error"):
            assert bad not in text, f"worker log says {bad!r}:\n{self.log()}"


@pytest.fixture(scope="module", params=sorted(WORKER_MODES))
def worker(request, _broker_session, tmp_path_factory):
    broker = _broker_session
    broker.assert_alive()
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"celery-{mode}")
    queue = f"interop.celery.{mode}.{uuid.uuid4().hex[:8]}"
    hostname = f"interop-{mode}-{uuid.uuid4().hex[:8]}@localhost"
    env = dict(os.environ)
    env.update(
        WARREN_CELERY_BROKER_URL=f"pyamqp://guest:guest@{broker.host}:{broker.port}//",
        WARREN_CELERY_QUEUE=queue,
        WARREN_CELERY_QUEUE_TYPE="quorum" if mode == "quorum" else "classic",
        PYTHONPATH=str(HERE) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp / "worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=solo", "--concurrency=1",
           "-Q", queue, "-n", hostname, "--loglevel=INFO", *WORKER_MODES[mode]]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp, start_new_session=True)
    _STARTED.append(proc)
    log_name = f"celery worker ({mode}) log ({log_path})"
    register_log(log_name, log_path)
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        text = log_path.read_text("utf-8", "replace")
        if f"{hostname} ready." in text:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    else:
        text = None
    if text is None or f"{hostname} ready." not in text:
        stop_process(proc)
        unregister_log(log_name)
        pytest.fail(f"celery worker ({mode}) did not become ready (exit code {proc.returncode}); "
                    f"command {' '.join(cmd)}\nworker log:\n{tail(log_path)}\n"
                    f"broker log:\n{tail(broker.log_path, max_lines=60)}", pytrace=False)
    w = Worker(proc, log_path, hostname, queue, env)
    yield w
    t0 = time.monotonic()
    code = stop_process(proc, timeout=15)
    unregister_log(log_name)
    print(f"celery worker ({mode}) stopped with exit code {code} after {time.monotonic() - t0:.1f}s")


@pytest.fixture
def app(worker):
    """The producer side: a Celery app in the test process, configured like the worker's."""
    from celery_app import make_app

    a = make_app(worker.env["WARREN_CELERY_BROKER_URL"], worker.queue, worker.env["WARREN_CELERY_QUEUE_TYPE"])
    yield a
    a.close()


def add_sig(app, *args, queue):
    return app.signature("celery_app.add", args=args).set(queue=queue)


@pytest.mark.timeout(90)
def test_celery_worker_runs_tasks_and_returns_results(worker, app):
    results = [app.send_task("celery_app.add", (i, 3), queue=worker.queue) for i in range(20)]
    assert [r.get(timeout=30) for r in results] == [i + 3 for i in range(20)]
    assert app.send_task("celery_app.add", (2, 3), queue=worker.queue).get(timeout=15) == 5
    # An exception in the task comes back through the rpc:// backend too.
    with pytest.raises(ValueError, match="boom"):
        app.send_task("celery_app.fail", ("boom",), queue=worker.queue).get(timeout=15)
    worker.assert_healthy()


@pytest.mark.timeout(90)
def test_celery_inspect_ping_answered_by_worker(worker):
    cmd = [sys.executable, "-m", "celery", "-A", "celery_app", "inspect", "ping",
           "-d", worker.hostname, "--timeout", "10"]
    out = subprocess.run(cmd, env=worker.env, cwd=HERE, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert worker.hostname in out.stdout and "pong" in out.stdout, out.stdout
    worker.assert_healthy()


@pytest.mark.timeout(90)
def test_celery_countdown_tasks_and_group(worker, app):
    # A countdown task is held by the worker, unacked, while it raises its prefetch (basic.qos) and
    # keeps consuming; the group's results all come back through the one rpc:// reply queue.
    from celery import group

    t0 = time.monotonic()
    delayed = app.send_task("celery_app.add", (40, 2), countdown=2, queue=worker.queue)
    now = [app.send_task("celery_app.add", (i, i), queue=worker.queue) for i in range(5)]
    assert [r.get(timeout=20) for r in now] == [0, 2, 4, 6, 8]  # not stuck behind the held task
    assert delayed.get(timeout=30) == 42
    assert time.monotonic() - t0 >= 1.9
    res = group(add_sig(app, i, 100, queue=worker.queue) for i in range(10)).apply_async()
    assert res.get(timeout=30) == [i + 100 for i in range(10)]
    worker.assert_healthy()


@pytest.mark.timeout(90)
def test_celery_control_add_and_cancel_consumer(worker, app):
    # Remote control over the pidbox makes the running worker basic.consume / basic.cancel a queue.
    extra = worker.queue + ".extra"

    options = {}
    if worker.env["WARREN_CELERY_QUEUE_TYPE"] == "quorum":  # declared by the worker like the producer will
        options = {"durable": True, "queue_arguments": {"x-queue-type": "quorum"}}
    replies = app.control.add_consumer(extra, destination=[worker.hostname], reply=True, timeout=10, options=options)
    assert replies and "add consumer" in str(replies[0][worker.hostname].get("ok")), replies
    assert app.send_task("celery_app.add", (20, 22), queue=extra).get(timeout=20) == 42
    replies = app.control.cancel_consumer(extra, destination=[worker.hostname], reply=True, timeout=10)
    assert replies and "no longer consuming" in str(replies[0][worker.hostname].get("ok")), replies
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        # The worker replies before its consumer loop sends basic.cancel: wait for the cancel to land.
        deadline = time.monotonic() + 10
        while ch.queue_declare(extra, passive=True).consumer_count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ch.queue_declare(extra, passive=True).consumer_count == 0
        pending = app.send_task("celery_app.add", (1, 1), queue=extra)
        time.sleep(1.0)
        assert pending.state == "PENDING"  # nobody consumes the queue any more
        assert ch.queue_declare(extra, passive=True).message_count == 1
        ch.queue_delete(extra)
    worker.assert_healthy()
