"""Discovery by DNS, as in a Kubernetes StatefulSet behind a headless Service (deploy/k8s/,
docs/deploy.md), made with network namespaces and hosts files: each broker node is a "pod", a
namespace of its own (`ip netns exec`) with one address on a bridge in a hub namespace
(10.198.0.0/24), listening on 0.0.0.0 on the same ports as the others (5672, 15672, 25672) and
named `warren@warren-N.warren-headless`. `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over
/etc/hosts for the processes it runs; that file plays the cluster DNS: each pod's stable name
`warren-N.warren-headless`, and the headless name `warren-headless` resolving to every pod's
address. It is rewritten in place (the bind mount follows the file, not its name) when a pod
"appears in DNS" or gets a new address.

- Every pod started with `--join warren-headless`, in any order, every name resolving from the
  start (publishNotReadyAddresses): one cluster of three, bootstrapped by warren-0 (the lowest
  name), which the others joined. A pod killed, given a new address and started again (same data
  dir, same arguments) is back in it, restarted from its data dir, not joined anew.
- Pods that appear in DNS one by one, with the manifests' `--join
  warren-0.warren-headless,warren-headless`: warren-2 and warren-1 wait while warren-0's name
  does not resolve (neither bootstraps a cluster of its own), warren-0 bootstraps once it runs,
  the others join it.
- The first pod alone (an OrderedReady StatefulSet's first start): `--join warren-headless`
  resolving to itself only: it bootstraps; the next pods join it as they appear. Then every pod
  is killed and started again on a new address: they find each other by name (their names, not
  their old addresses, are what the cluster keeps).

Needs root and `ip netns` (skipped otherwise); every namespace, hosts file and process it makes
is removed at the end, and those of an earlier run whose pytest is gone are removed first.
warren only: it clusters warren-broker processes."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import _STARTED, TARGET, register_log, stop_process, unregister_log, warren_binary
from netns_support import clean_leftovers, ip, remove_netns, run_in_netns

pytestmark = pytest.mark.skipif(TARGET != "warren", reason="clusters warren-broker processes")

PREFIX = "warren-dns"
HEADLESS = "warren-headless"
PODS = 3


def pod_name(i: int) -> str:
    return f"warren-{i}.{HEADLESS}"


def node_name(i: int) -> str:
    return f"warren@{pod_name(i)}"


# ---------------------------------------------------------------- namespaces


def _get_json(path: str):
    req = urllib.request.Request(f"http://127.0.0.1:15672{path}")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


class Pod:
    """A broker process in its namespace, with its data dir and log under the test's tmp dir."""

    def __init__(self, net: "Net", i: int, join: str):
        self.net, self.i, self.join = net, i, join
        self.ns = net.ns[i]
        self.data = net.tmp / f"warren-{i}"
        self.log = net.tmp / f"warren-{i}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def log_name(self) -> str:
        return f"{node_name(self.i)} log ({self.log})"

    def start(self) -> "Pod":
        args = ["ip", "netns", "exec", self.ns, str(warren_binary()),
                "--node-name", node_name(self.i), "--data-dir", str(self.data),
                "--amqp", "0.0.0.0:5672", "--mgmt", "0.0.0.0:15672", "--cluster-listen", "0.0.0.0:25672",
                "--cluster-secret-file", str(self.net.secret), "--cluster-failure-detection-ms", "1000",
                "--join", self.join]
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, RUST_LOG=os.environ.get("WARREN_TEST_LOG", "info")),
                                         start_new_session=True)
        _STARTED.append(self.proc)
        register_log(self.log_name, self.log)
        # The AMQP and management listeners come up before the node has found its cluster.
        deadline = time.monotonic() + 20
        while "listening proto=mgmt" not in self.text(start):
            assert self.proc.poll() is None, f"{node_name(self.i)} exited:\n{self.text(start)[-3000:]}"
            assert time.monotonic() < deadline, f"{node_name(self.i)} did not listen:\n{self.text(start)[-3000:]}"
            time.sleep(0.05)
        return self

    def text(self, start: int = 0) -> str:
        with open(self.log, "rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", "replace")

    def kill(self) -> None:
        """SIGKILL (the whole process group), and reap it."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
        unregister_log(self.log_name)

    def running_members(self) -> set[str]:
        """The nodes this one reports running (GET /api/nodes); empty while it cannot answer."""
        try:
            nodes = run_in_netns(self.ns, _get_json, "/api/nodes")
        except (OSError, ValueError):
            return set()
        return {n["name"] for n in nodes if n.get("running")}


class Net:
    """The hub namespace with bridge br0 and one namespace per pod (eth0 on br0). Pod i's address
    is 10.198.0.<addr[i]>; `publish(i)` puts its records in every pod's hosts file."""

    def __init__(self, tmp: Path):
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.hub = f"{self.tag}-hub"
        self.ns = [f"{self.tag}-{i}" for i in range(PODS)]
        self.addr = [i + 1 for i in range(PODS)]
        self.published: set[int] = set()
        self.made: list[str] = []
        self.pods: list[Pod] = []
        self.tmp = tmp
        self.secret = tmp / "secret"
        self.secret.write_text(f"dns-{self.tag}")

    def create(self) -> None:
        ip("netns", "add", self.hub)
        self.made.append(self.hub)
        hub = ("-n", self.hub)
        ip(*hub, "link", "set", "lo", "up")
        ip(*hub, "link", "add", "br0", "type", "bridge")
        ip(*hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.ns):
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            self.made.append(ns)
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip(*hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip(*hub, "link", "set", f"h{i}", "master", "br0")
            ip(*hub, "link", "set", f"h{i}", "up")
            ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        self.write_hosts()

    def ip(self, i: int) -> str:
        return f"10.198.0.{self.addr[i]}"

    def write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost"]
        lines += [f"{self.ip(i)} {pod_name(i)}" for i in sorted(self.published)]
        lines += [f"{self.ip(i)} {HEADLESS}" for i in sorted(self.published)]
        text = "\n".join(lines) + "\n"
        for ns in self.ns:
            # In place: `ip netns exec` bind-mounted this very file over the pods' /etc/hosts.
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write(text)

    def publish(self, *pods: int) -> None:
        self.published.update(pods)
        self.write_hosts()

    def readdress(self, i: int, new: int) -> None:
        """Pod i gets address 10.198.0.<new> (a pod started again gets a new IP), in DNS too."""
        ip("-n", self.ns[i], "addr", "del", f"{self.ip(i)}/24", "dev", "eth0")
        self.addr[i] = new
        ip("-n", self.ns[i], "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
        self.write_hosts()

    def pod(self, i: int, join: str) -> Pod:
        p = Pod(self, i, join)
        self.pods.append(p)
        return p

    def destroy(self) -> None:
        for p in reversed(self.pods):
            p.stop()
        for ns in reversed(self.made):
            remove_netns(ns)
        self.made.clear()


@pytest.fixture
def net(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces (ip netns) and /etc/netns hosts files")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` (ip netns)")
    if ip("netns", "list", check=False).returncode != 0:
        pytest.skip("`ip netns` is not available here")
    binary = warren_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} is missing: build the binaries first (`cargo build --bins`)", pytrace=False)
    clean_leftovers(PREFIX)
    n = Net(tmp_path)
    try:
        n.create()
        run_in_netns(n.hub, lambda: None)
    except (RuntimeError, OSError) as e:
        n.destroy()
        pytest.skip(f"cannot build the namespaces, bridge and veth pairs here: {e}")
    yield n
    n.destroy()
    listed = ip("netns", "list", check=False).stdout.split()
    left = [ns for ns in n.made if ns in listed] + [ns for ns in (n.hub, *n.ns) if os.path.exists(f"/etc/netns/{ns}")]
    assert not left, f"left behind: {left}"


def eventually(what: str, f, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def one_cluster(pods: list[Pod], timeout: float = 30) -> None:
    """Every pod reports every pod running: one cluster (two clusters never list each other)."""
    want = {node_name(p.i) for p in pods}
    for p in pods:
        eventually(f"{node_name(p.i)} reports {sorted(want)} running (it reports {sorted(p.running_members())})",
                   lambda p=p: p.running_members() == want, timeout)


BOOTSTRAP = re.compile(r"bootstrapping|bootstrapped a new cluster")


# ---------------------------------------------------------------- scenarios


@pytest.mark.timeout(150)
@pytest.mark.parametrize("order", [(2, 1, 0), (0, 2, 1)], ids=lambda o: "start-" + "".join(map(str, o)))
def test_every_pod_joins_the_headless_name_in_any_order_and_a_restarted_pod_rejoins(net, order):
    net.publish(*range(PODS))
    pods = {i: net.pod(i, HEADLESS) for i in range(PODS)}
    for i in order:
        pods[i].start()
        time.sleep(0.5)
    one_cluster(list(pods.values()))
    assert BOOTSTRAP.search(pods[0].text()), "warren-0, the lowest name, bootstraps"
    for i in (1, 2):
        assert "joined the cluster" in pods[i].text() and not BOOTSTRAP.search(pods[i].text()), (
            f"{node_name(i)} joins warren-0's cluster")

    # The bootstrapper (the Raft leader too, most likely) dies; its pod comes back elsewhere.
    victim = pods[0]
    victim.kill()
    eventually("the others see warren-0 down",
               lambda: node_name(0) not in pods[1].running_members(), timeout=20)
    net.readdress(0, 11)
    mark = victim.log.stat().st_size
    victim.start()
    one_cluster(list(pods.values()))
    after = victim.text(mark)
    assert "cluster node restarted from its data dir" in after, after[-2000:]
    assert "joined the cluster" not in after and not BOOTSTRAP.search(after), after[-2000:]


@pytest.mark.timeout(120)
def test_pods_appearing_in_dns_one_by_one_form_one_cluster_around_the_first(net):
    join = f"{pod_name(0)},{HEADLESS}"
    pods = [net.pod(i, join) for i in range(PODS)]
    net.publish(2)
    pods[2].start()
    net.publish(1)
    pods[1].start()
    time.sleep(3)
    for p in (pods[1], pods[2]):
        text = p.text()
        assert not BOOTSTRAP.search(text) and "joined the cluster" not in text, (
            f"{node_name(p.i)} waits while {pod_name(0)} does not resolve:\n{text[-2000:]}")
        assert p.proc.poll() is None
    net.publish(0)
    pods[0].start()
    one_cluster(pods)
    assert BOOTSTRAP.search(pods[0].text())
    for p in (pods[1], pods[2]):
        assert "joined the cluster" in p.text() and not BOOTSTRAP.search(p.text())


@pytest.mark.timeout(150)
def test_a_first_pod_alone_bootstraps_and_a_full_restart_on_new_addresses_finds_itself_by_name(net):
    pods = [net.pod(i, HEADLESS) for i in range(PODS)]
    net.publish(0)
    pods[0].start()
    eventually("warren-0, alone behind the headless name, bootstraps",
               lambda: "the seeds name this node only: bootstrapping" in pods[0].text(), timeout=20)
    for i in (1, 2):
        net.publish(i)
        pods[i].start()
        one_cluster(pods[: i + 1])
        assert "joined the cluster" in pods[i].text()

    marks = [p.log.stat().st_size for p in pods]
    for p in pods:
        p.kill()
    for i in range(PODS):
        net.readdress(i, 21 + i)
    for i in (2, 1, 0):
        pods[i].start()
    one_cluster(pods, timeout=45)
    for p, mark in zip(pods, marks):
        after = p.text(mark)
        assert "cluster node restarted from its data dir" in after, after[-2000:]
        assert not BOOTSTRAP.search(after) and "joined the cluster" not in after, after[-2000:]
