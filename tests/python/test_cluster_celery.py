"""The seed's setup with Celery: two clustered warren-broker nodes (R1, R2) with the `ha-all` policy
behind warren-lb (round robin), a Celery worker and a producer with `confirm_publish` both going
through the balancer, and the master of the task queue killed with SIGKILL while tasks flow.
Every task whose publish was confirmed runs at least once (a redelivered one may run twice).

warren only: it clusters warren-broker processes (the RabbitMQ comparison of clustering is the
cluster benchmark's business)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from cluster_support import eventually, set_ha_all, start_lb, start_node, start_recording_worker, voters
from conftest import TARGET, tail

pytestmark = pytest.mark.skipif(TARGET != "warren", reason="clusters warren-broker processes")

N = 150
KILL_AT = 50

@pytest.fixture
def cluster(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("celery-failover-secret")
    r1 = start_node(tmp_path, "r1@celery", secret, None)
    r2 = start_node(tmp_path, "r2@celery", secret, r1.addrs["cluster"])
    eventually("two voters", lambda: voters(r1) == 2)
    set_ha_all(r1)
    lb = start_lb(tmp_path, ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                             "--backend", r1.addrs["amqp"], "--backend", r2.addrs["amqp"]])
    yield r1, r2, lb.addr
    for p in (lb, r1, r2):
        p.stop()


@pytest.mark.timeout(240)
def test_celery_with_confirm_publish_loses_no_task_when_the_master_is_killed(cluster, tmp_path):
    r1, r2, lb_addr = cluster
    broker_url = f"pyamqp://guest:guest@{lb_addr}//"
    worker = start_recording_worker(tmp_path, broker_url, "tasks", "failover@localhost")
    try:
        sys.path.insert(0, str(tmp_path))
        for k in ("RECORD_BROKER", "RECORD_FILE", "RECORD_QUEUE"):
            os.environ[k] = worker.env[k]
        import recording_app  # noqa: E402  (written by start_recording_worker, configured from the environment)

        queue = r1.api("GET", "/api/queues/%2F/tasks")
        eventually("the task queue mirrored and in sync",
                   lambda: len(r1.api("GET", "/api/queues/%2F/tasks")["synchronised_slave_nodes"]) == 1)
        master = r1 if queue["node"] == r1.name else r2
        survivor = r2 if master is r1 else r1
        sent, resent = [], 0
        for n in range(N):
            if n == KILL_AT:
                master.proc.kill()
                master.proc.wait(timeout=10)
            deadline = time.monotonic() + 60
            while True:
                try:
                    recording_app.record.apply_async((n,), retry=False)
                    sent.append(n)
                    break
                except Exception:  # nacked, or the connection went with the killed node
                    resent += 1
                    assert time.monotonic() < deadline, f"task {n} never confirmed"
                    time.sleep(0.2)
        eventually("a mirror promoted", lambda: survivor.api("GET", "/api/queues/%2F/tasks")["node"] == survivor.name)

        def done():
            have = set(worker.ran())
            return all(n in have for n in sent)
        try:
            eventually("every confirmed task ran", done, timeout=90)
        except AssertionError:
            have = set(worker.ran())
            missing = [n for n in sent if n not in have]
            q = survivor.api("GET", "/api/queues/%2F/tasks")
            raise AssertionError(
                f"confirmed but never run: {missing}; queue on {survivor.name}: ready {q['messages_ready']}, "
                f"unacked {q['messages_unacknowledged']}, consumers {q['consumers']}\n"
                f"worker log:\n{tail(worker.log, max_lines=60)}") from None
        ran = worker.ran()
        assert len(sent) == N and resent >= 0
        print(f"{N} tasks confirmed ({resent} sends retried), {len(ran)} runs "
              f"({len(ran) - len(set(ran))} duplicates), master {master.name} killed at task {KILL_AT}")
    finally:
        worker.stop()
