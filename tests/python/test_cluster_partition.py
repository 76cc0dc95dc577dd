"""Network partitions, made with network namespaces: each broker node runs in a namespace of its
own (`ip netns exec`), wired by veth pairs to two bridges in a hub namespace: the cluster network
(10.199.1.0/24, the nodes' --cluster-listen) and the client network (10.199.2.0/24, their AMQP and
management listeners). A partition takes a node's cluster link down (`ip link set <veth> down` in
the hub): it is cut off from the other nodes while its clients still reach it, so what it does
with them (pause, or keep them waiting) is seen from the clients' side. The clients (pika, one
thread and one connection each) and the management calls (urllib) run on a thread that entered
the hub namespace (setns(2) affects only the calling thread and the threads it starts).

A: three nodes with `pause_minority`, an `ha-all` queue mastered on C, publishers with confirms
through A and through C, consumers through A and B. C is cut off: it pauses (closes its clients,
refuses new ones, /api/warren/app says paused_by_partition), A and B promote a mirror and
publishing through A is confirmed again; nothing published through C after the cut is confirmed.
Healed, C resumes, comes back as an in-sync mirror, and publishing through it is confirmed again.
B: two nodes and a witness, partition handling `ignore` (the default): the master is cut off from
the other node and the witness. The majority side promotes; the cut-off master cannot confirm (it
waits for its in-sync mirror, which it cannot reach, and cannot commit removing it without a
majority) while probes keep publishing through it; healed, it comes back as a mirror.
In both: every confirmed message is consumed, nothing consumed was never sent, a message consumed
again comes with redelivered=true (cluster_support.check_history).

Needs root and `ip netns` (skipped otherwise); every namespace and process it makes is removed at
the end, and namespaces an earlier run left behind (its pytest process gone) are removed first.
warren only: it clusters warren-broker processes."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import pika
import pytest

from cluster_support import (History, Node, Procs, check_history, close_quietly, consumer, drain, eventually,
                             join_all, pika_params, publish_once, publisher, set_ha_all, start_node, start_threads,
                             voters)
from conftest import TARGET
from netns_support import clean_leftovers, ip, remove_netns, run_in_netns

pytestmark = pytest.mark.skipif(TARGET != "warren", reason="clusters warren-broker processes")

PREFIX = "warren-pt"
QUEUE = "part"
FD_MS = 600
USER = "partition"
USERS_TOML = f"""
[[users]]
name = "{USER}"
password = "{USER}"
tags = ["administrator"]

[[permissions]]
user = "{USER}"
vhost = "/"
"""


@pytest.fixture(autouse=True)
def _quiet_pika(caplog):
    # pika logs every lost connection, with its traceback: expected here, they would bury a failure's report.
    caplog.set_level(logging.CRITICAL, logger="pika")


# ---------------------------------------------------------------- namespaces


class Net:
    """The hub namespace (bridges `brc`, the cluster network, and `brl`, the client network with
    the hub's address 10.199.2.254) and a namespace per node: eth0 on the cluster network
    (10.199.1.N), eth1 on the client network (10.199.2.N). The hub's end of a node's cluster veth
    is c<role>: down, the node is cut off from the others."""

    def __init__(self, roles: tuple[str, ...]):
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.hub = f"{self.tag}-hub"
        self.roles = roles
        self.ns = {r: f"{self.tag}-{r}" for r in roles}
        self.made: list[str] = []
        self.procs = Procs()

    def cluster_ip(self, role: str) -> str:
        return f"10.199.1.{self.roles.index(role) + 1}"

    def client_ip(self, role: str) -> str:
        return f"10.199.2.{self.roles.index(role) + 1}"

    def create(self) -> None:
        ip("netns", "add", self.hub)
        self.made.append(self.hub)
        hub = ("-n", self.hub)
        ip(*hub, "link", "set", "lo", "up")
        for br in ("brc", "brl"):
            ip(*hub, "link", "add", br, "type", "bridge")
            ip(*hub, "link", "set", br, "up")
        ip(*hub, "addr", "add", "10.199.2.254/24", "dev", "brl")
        for r in self.roles:
            ns = self.ns[r]
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            for hub_end, br, dev, addr in ((f"c{r}", "brc", "eth0", self.cluster_ip(r)),
                                           (f"l{r}", "brl", "eth1", self.client_ip(r))):
                ip(*hub, "link", "add", hub_end, "type", "veth", "peer", "name", dev, "netns", ns)
                ip(*hub, "link", "set", hub_end, "master", br)
                ip(*hub, "link", "set", hub_end, "up")
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")

    def cut(self, role: str) -> None:
        ip("-n", self.hub, "link", "set", f"c{role}", "down")

    def heal(self, role: str) -> None:
        ip("-n", self.hub, "link", "set", f"c{role}", "up")

    def destroy(self) -> None:
        self.procs.stop_all()
        for ns in reversed(self.made):
            remove_netns(ns)
        self.made.clear()

    def start(self, tmp: Path, role: str, name: str, join: str | None, extra: tuple[str, ...] = (),
              protos: tuple[str, ...] = ("amqp", "mgmt", "cluster")) -> Node:
        conf = tmp / "users.toml"
        conf.write_text(USERS_TOML)
        secret = tmp / "secret"
        secret.write_text(f"partition-{self.tag}")
        node = start_node(tmp, name, secret, join and f"{self.cluster_ip(join)}:25672", fd_ms=FD_MS,
                          amqp=f"{self.client_ip(role)}:5672", mgmt=f"{self.client_ip(role)}:15672",
                          cluster=f"{self.cluster_ip(role)}:25672", extra=("--config", str(conf), *extra),
                          protos=protos, wrap=("ip", "netns", "exec", self.ns[role]), user=USER, password=USER)
        return self.procs.add(node)


@pytest.fixture
def net(request):
    roles = request.param
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` (ip netns)")
    if ip("netns", "list", check=False).returncode != 0:
        pytest.skip("`ip netns` is not available here")
    clean_leftovers(PREFIX)
    n = Net(roles)
    try:
        n.create()
        run_in_netns(n.hub, lambda: None, timeout=10)
    except (RuntimeError, OSError) as e:
        n.destroy()
        pytest.skip(f"cannot build the namespaces, bridges and veth pairs here: {e}")
    yield n
    n.destroy()
    listed = ip("netns", "list", check=False).stdout.split()
    left = [ns for ns in (n.hub, *n.ns.values()) if ns in listed]
    assert not left, f"namespaces left behind: {left}"


# ---------------------------------------------------------------- helpers


def params(node: Node) -> pika.ConnectionParameters:
    return pika_params(node.addrs["amqp"], USER, USER)


def queue(node: Node) -> dict:
    return node.api("GET", f"/api/queues/%2F/{QUEUE}", timeout=3)


def paused(node: Node) -> bool:
    return node.api("GET", "/api/warren/app", timeout=3)["paused_by_partition"]


def refuses_clients(node: Node) -> bool:
    try:
        pika.BlockingConnection(params(node)).close()
    except Exception:
        return True
    return False


def sent_after(h: History, label: str, t: float) -> bool:
    return any(s > t for s, _ in h.confirmed_via(label).values())


def probe(node: Node, n: int, h: History) -> None:
    """One publish with a confirm on a connection of its own (it may wait long for an answer)."""
    conn = None
    try:
        conn = pika.BlockingConnection(params(node))
        ch = conn.channel()
        ch.confirm_delivery()
        publish_once(ch, QUEUE, f"X-{n}", h)
    except Exception:  # refused, or closed: not confirmed
        pass
    finally:
        close_quietly(conn)


# ---------------------------------------------------------------- A: pause_minority


def scenario_pause_minority(net: Net, tmp: Path) -> None:
    pm = ("--cluster-partition-handling", "pause_minority")
    a = net.start(tmp, "a", "a@pm", None, pm)
    b = net.start(tmp, "b", "b@pm", "a", pm)
    c = net.start(tmp, "c", "c@pm", "a", pm)
    eventually("three voters", lambda: voters(a) == 3)
    set_ha_all(a)
    c.api("PUT", f"/api/queues/%2F/{QUEUE}", {"durable": True})
    eventually("both mirrors in sync", lambda: len(queue(a)["synchronised_slave_nodes"]) == 2)
    assert queue(a)["node"] == c.name, "the queue is mastered where it was declared"

    h = History()
    stop_pub, stop_con = threading.Event(), threading.Event()
    pubs = start_threads((publisher, params(a), "A", QUEUE, stop_pub, h),
                         (publisher, params(c), "C", QUEUE, stop_pub, h))
    cons = start_threads((consumer, params(a), "CA", QUEUE, stop_con, h),
                         (consumer, params(b), "CB", QUEUE, stop_con, h))
    try:
        eventually("confirms through a and through c",
                   lambda: len(h.confirmed_via("A")) >= 50 and len(h.confirmed_via("C")) >= 50)
        cut_begin = time.monotonic()
        net.cut("c")
        cut = time.monotonic()
        events = [("cut", cut)]

        eventually("c pauses", lambda: paused(c), timeout=15)
        paused_at = time.monotonic()
        events.append(("c paused", paused_at))
        eventually("c closed its publisher's connection",
                   lambda: any(t > cut_begin for t in h.dropped.get("C", [])), timeout=10)
        assert refuses_clients(c), "a paused node refuses new clients"
        eventually("a mirror on the majority side promoted", lambda: queue(a)["node"] in (a.name, b.name), timeout=15)
        events.append(("promoted", time.monotonic()))
        eventually("a publish through a sent after the cut confirmed", lambda: sent_after(h, "A", cut), timeout=15)
        resumed = min(k for s, k in h.confirmed_via("A").values() if s > cut)
        events.append(("confirms through a again", resumed))
        time.sleep(1.5)

        heal = time.monotonic()
        net.heal("c")
        events.append(("healed", heal))
        eventually("c resumes", lambda: not paused(c), timeout=30)
        events.append(("c resumed", time.monotonic()))
        eventually("c back as an in-sync mirror",
                   lambda: (q := queue(a))["node"] != c.name and c.name in q["synchronised_slave_nodes"]
                   and len(q["synchronised_slave_nodes"]) == 2, timeout=30)
        events.append(("c in sync", time.monotonic()))
        eventually("a publish through c sent after the heal confirmed", lambda: sent_after(h, "C", heal), timeout=15)
        time.sleep(1.0)
    finally:
        stop_pub.set()
    join_all(pubs, "publisher")
    drain(h)
    stop_con.set()
    join_all(cons, "consumer")

    # After the cut, nothing sent through c is confirmed until c is back with the majority; a
    # publish sent before `ip link set down` returned was in flight at the cut and may be.
    via_c = h.confirmed_via("C")
    during = sorted((s - cut, k - cut, b) for b, (s, k) in via_c.items() if cut < s < heal)
    assert not during, f"confirmed through the cut-off node c (sent, confirmed after the cut, s): {during[:10]}"
    in_flight = [k - cut for s, k in via_c.values() if s <= cut < k]
    summary = check_history(h, cut_begin, events)
    print(f"\npause_minority, 3 nodes, master c cut off: {summary}; c paused within {(paused_at - cut) * 1000:.0f} ms "
          f"of the cut; confirms through a resumed "
          f"{(resumed - cut) * 1000:.0f} ms after the cut; through c, {len(in_flight)} publish(es) in flight at the "
          f"cut confirmed after it (last {max(in_flight, default=0) * 1000:.0f} ms after), none sent during the cut")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("net", [("a", "b", "c")], indirect=True, ids=["three-nodes"])
def test_pause_minority_the_cut_off_master_pauses_and_the_majority_takes_over(net, tmp_path):
    run_in_netns(net.hub, scenario_pause_minority, net, tmp_path, timeout=140)


# ---------------------------------------------------------------- B: two nodes and a witness


def scenario_witness(net: Net, tmp: Path) -> None:
    a = net.start(tmp, "a", "a@pw", None)
    b = net.start(tmp, "b", "b@pw", "a")
    net.start(tmp, "w", "w@pw", "a", ("--witness",), protos=("mgmt", "cluster"))
    eventually("three voters", lambda: voters(a) == 3)
    set_ha_all(a)
    a.api("PUT", f"/api/queues/%2F/{QUEUE}", {"durable": True})
    eventually("the mirror in sync", lambda: len(queue(b)["synchronised_slave_nodes"]) == 1)
    assert queue(b)["node"] == a.name, "the queue is mastered where it was declared"

    h = History()
    stop_pub, stop_con = threading.Event(), threading.Event()
    pubs = start_threads((publisher, params(a), "A", QUEUE, stop_pub, h),
                         (publisher, params(b), "B", QUEUE, stop_pub, h))
    cons = start_threads((consumer, params(b), "CB", QUEUE, stop_con, h))
    probes: list[threading.Thread] = []
    healed = threading.Event()
    try:
        eventually("confirms through a and through b",
                   lambda: len(h.confirmed_via("A")) >= 50 and len(h.confirmed_via("B")) >= 50)
        cut_begin = time.monotonic()
        net.cut("a")
        cut = time.monotonic()
        events = [("cut", cut)]

        def probing():
            # A publish on a new connection through a every 250 ms: a keeps its clients (ignore),
            # so each waits for an answer until the heal.
            while len(probes) < 40 and not healed.is_set():
                probes.extend(start_threads((probe, a, len(probes), h)))
                healed.wait(0.25)
        prober = start_threads((probing,))
        eventually("the mirror on b promoted", lambda: queue(b)["node"] == b.name, timeout=15)
        events.append(("promoted", time.monotonic()))
        eventually("a publish through b sent after the cut confirmed", lambda: sent_after(h, "B", cut), timeout=15)
        resumed = min(k for s, k in h.confirmed_via("B").values() if s > cut)
        events.append(("confirms through b again", resumed))
        time.sleep(2.0)
        early = sorted((s - cut, k - cut, body) for body, (s, k) in h.confirmed.items()
                       if body[0] in "AX" and s > cut)
        assert not early, f"the cut-off master confirmed (sent, confirmed after the cut, s): {early[:10]}"

        heal = time.monotonic()
        net.heal("a")
        healed.set()
        events.append(("healed", heal))
        join_all(prober, "prober")
        eventually("a back as an in-sync mirror of b",
                   lambda: (q := queue(b))["node"] == b.name and a.name in q["synchronised_slave_nodes"], timeout=30)
        events.append(("a in sync", time.monotonic()))
        eventually("a publish through a sent after the heal confirmed", lambda: sent_after(h, "A", heal), timeout=15)
        time.sleep(1.0)
    finally:
        stop_pub.set()
        healed.set()
    join_all(pubs, "publisher")
    join_all(probes, "probe (a publish through a sent during the cut, with no answer since the heal)")
    drain(h)
    stop_con.set()
    join_all(cons, "consumer")

    # a confirmed nothing sent through it while it was cut off (checked before the heal above);
    # what it answered after the heal is counted (and, if confirmed, must have been consumed).
    cut_off = [(body, s, k) for body, (s, k) in h.confirmed.items() if body[0] in "AX" and cut < s < heal]
    assert all(k > heal for _, _, k in cut_off), f"confirmed by the cut-off master before the heal: {cut_off[:10]}"
    sent_during = sum(1 for body, s in h.sent.items() if body[0] in "AX" and cut < s < heal)
    summary = check_history(h, cut_begin, events)
    print(f"\ntwo nodes and a witness, master a cut off: {summary}; confirms through b resumed "
          f"{(resumed - cut) * 1000:.0f} ms after the cut; through a, {sent_during} publish(es) sent during the cut, "
          f"none confirmed before the heal, {len(cut_off)} confirmed after it")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("net", [("a", "b", "w")], indirect=True, ids=["two-nodes-and-a-witness"])
def test_two_nodes_and_a_witness_the_cut_off_master_cannot_confirm(net, tmp_path):
    run_in_netns(net.hub, scenario_witness, net, tmp_path, timeout=140)
