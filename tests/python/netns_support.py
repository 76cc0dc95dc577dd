"""Network namespaces for the tests that run nodes inside them (test_cluster_partition.py,
test_dns_join.py): `ip`, removal of a namespace (with what runs in it and its /etc/netns
directory), cleanup of an earlier run's leftovers, and running a function on a thread inside one."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading

CLONE_NEWNET = 0x40000000


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_netns(ns: str) -> None:
    """Kills what still runs in `ns` (only the test's nodes run there), deletes it and its
    /etc/netns directory (the hosts file `ip netns exec` mounts, if the test wrote one)."""
    for pid in ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    ip("netns", "del", ns, check=False)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def clean_leftovers(prefix: str) -> None:
    """Namespaces (and /etc/netns directories) of an earlier run that could not clean up: named
    PREFIX-<pid of its pytest>-..., that pytest gone."""
    listed = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.split()]
    etc = os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []
    for ns in set(listed) | set(etc):
        parts = ns[len(prefix) + 1:].split("-") if ns.startswith(prefix + "-") else []
        if parts and parts[0].isdigit() and int(parts[0]) != os.getpid() and not pid_alive(int(parts[0])):
            remove_netns(ns)


def enter_netns(ns: str) -> None:
    """Moves the calling thread (only it, and the threads it starts later) into `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(ns: str, f, *args, timeout: float = 15):
    """Runs f(*args) on a thread in `ns` and returns what it returns (or raises what it raised)."""
    out: dict = {}

    def body():
        try:
            enter_netns(ns)
            out["value"] = f(*args)
        except BaseException as e:  # handed to the caller's thread, pytest's outcomes included
            out["error"] = e

    t = threading.Thread(target=body, name=f"in {ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"no answer within {timeout} s in {ns}")
    if "error" in out:
        raise out["error"]
    return out.get("value")
