"""The promise, with pika, as a history checker (broker/tests/cluster_promise.rs is its Rust
counterpart): a durable mirrored queue (`ha-all`, `ha-sync-mode: automatic`) on two nodes and a
witness (the seed's R1/R2) and on three nodes, behind warren-lb (round robin over every node's AMQP
port, ELB health checks every 200 ms, every connection reset each 2.5 s). Two pika publishers with
confirms (one message in flight, as Celery's confirm_publish) and two pika consumers with manual
acks, all through the balancer, one thread and one connection each, while the queue's master is
killed with SIGKILL three times on a seeded schedule and restarted with the same AMQP address and
data directory (the balancer's backend list stays right), resynchronised before the next kill.

Checked from the clients' history: every confirmed publish is consumed at least once; nothing is
consumed that was never sent; a message consumed again comes with redelivered=true; after every
kill confirmed publishing resumes: the failover, from the kill to the first confirm of a publish
sent after it, is printed (p50, max) and bounded. A nack, a returned (unroutable) publish or a lost
connection is not a confirm: the publisher tries again with a new body, so unconfirmed attempts may
or may not arrive and never count as lost.

warren only: it clusters warren-broker processes."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest

from cluster_support import (History, Node, check_history, cluster_procs, consumer, drain, eventually,  # noqa: F811
                             join_all, pika_params, publisher, set_ha_all, start_lb, start_node, start_threads,
                             voters)
from conftest import TARGET

pytestmark = pytest.mark.skipif(TARGET != "warren", reason="clusters warren-broker processes")

QUEUE = "promise"
KILLS = 3
FAILOVER_BOUND = 15.0
FD_MS = 600
PUBLISHERS = 2
CONSUMERS = 2


@pytest.fixture(autouse=True)
def _quiet_pika(caplog):
    # pika logs every lost connection, with its traceback: expected here, they would bury a failure's report.
    caplog.set_level(logging.CRITICAL, logger="pika")


def placement(nodes: list[Node | None]) -> dict:
    """The queue as the first running node that answers shows it."""
    for n in nodes:
        if n is None:
            continue
        try:
            return n.api("GET", f"/api/queues/%2F/{QUEUE}", timeout=3)
        except Exception:
            continue
    raise AssertionError("no node answers for the queue")


def lb_config(backends: list[str], seed: int) -> str:
    quoted = ", ".join(f'"{b}"' for b in backends)
    return f"""
[admin]
listen = "127.0.0.1:0"

[chaos]
seed = {seed}

[[listener]]
name = "amqp"
bind = "127.0.0.1:0"
backends = [{quoted}]
drain_timeout = "300ms"

[listener.health]
check = "tcp"
interval = "200ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2

[[listener.fault]]
name = "elb-periodic"
kind = "reset"
every = "2500ms"
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize("three", [False, True], ids=["two-nodes-and-a-witness", "three-nodes"])
def test_every_confirmed_message_is_consumed_through_repeated_master_kills(tmp_path, cluster_procs, three):
    seed = 0x5EED_0003 if three else 0x5EED_0002
    rng = random.Random(seed)
    secret = tmp_path / "secret"
    secret.write_text(f"promise-{seed}")
    names = ["a@p3", "b@p3", "c@p3"] if three else ["r1@p2", "r2@p2"]
    nodes: list[Node | None] = []
    stop_pub, stop_con = threading.Event(), threading.Event()
    try:
        for name in names:
            join = nodes[0].addrs["cluster"] if nodes else None
            nodes.append(cluster_procs.add(start_node(tmp_path, name, secret, join, fd_ms=FD_MS)))
        if not three:
            cluster_procs.add(start_node(tmp_path, "w@p2", secret, nodes[0].addrs["cluster"], fd_ms=FD_MS,
                                         extra=("--witness",), protos=("mgmt", "cluster")))
        first = nodes[0]
        eventually("three voters", lambda: voters(first) == 3)
        set_ha_all(first)
        first.api("PUT", f"/api/queues/%2F/{QUEUE}", {"durable": True})
        mirrors = len(nodes) - 1
        in_sync = lambda: len(placement(nodes)["synchronised_slave_nodes"]) == mirrors  # noqa: E731
        eventually("every mirror in sync", in_sync)
        amqp = {n.name: n.addrs["amqp"] for n in nodes}

        lb = cluster_procs.add(start_lb(tmp_path, [], listener="amqp", config=lb_config(list(amqp.values()), seed)))
        h = History()
        via_lb = pika_params(lb.addr)
        publishers = start_threads(*((publisher, via_lb, f"P{i}", QUEUE, stop_pub, h) for i in range(PUBLISHERS)))
        consumers = start_threads(*((consumer, via_lb, f"C{i}", QUEUE, stop_con, h) for i in range(CONSUMERS)))

        # The schedule: wait a while, kill the master, wait for the promotion, restart the killed
        # node where the balancer expects it, wait until it is back in sync.
        kills: list[tuple[str, float]] = []
        events: list[tuple[str, float]] = []
        for k in range(KILLS):
            time.sleep(0.8 + rng.random() * 1.2)
            master = placement(nodes)["node"]
            i = next(j for j, n in enumerate(nodes) if n is not None and n.name == master)
            victim, nodes[i] = nodes[i], None
            killed_at = time.monotonic()
            victim.kill()
            kills.append((master, killed_at))
            events.append((f"{master} killed", killed_at))
            eventually(f"kill {k}: a mirror of {master} promoted",
                       lambda: placement(nodes)["node"] not in (None, master))
            nodes[i] = cluster_procs.add(victim.restart())
            events.append((f"{master} restarted", time.monotonic()))
            eventually(f"kill {k}: {master} back in sync", in_sync)
            events.append((f"{master} in sync", time.monotonic()))
        time.sleep(1.0)
        stop_pub.set()
        join_all(publishers, "publisher")
        drain(h)
        stop_con.set()
        join_all(consumers, "consumer")

        failovers = []
        for master, at in kills:
            after = [c - at for s, c in h.confirmed.values() if s > at]
            assert after, f"no confirm after {master} was killed"
            failovers.append(min(after))
        failovers.sort()
        p50, worst = failovers[len(failovers) // 2], failovers[-1]
        print(f"\npromise with pika ({len(names)} nodes{'' if three else ' and a witness'}, seed {seed:#x}): "
              f"{KILLS} master kills ({', '.join(m for m, _ in kills)}); "
              f"failover p50 {p50 * 1000:.0f} ms, max {worst * 1000:.0f} ms")
        print(check_history(h, kills[0][1], events))
        assert len(h.confirmed) > 200, f"too little got through to mean anything: {len(h.confirmed)} confirmed"
        assert worst < FAILOVER_BOUND, f"a failover took {worst:.1f} s"
    finally:
        stop_pub.set()
        stop_con.set()
