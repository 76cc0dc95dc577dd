"""warren-lb driven by the real Toxiproxy client (toxiproxy-python, PyPI): its admin port serves
Toxiproxy's HTTP API. Proxies are made in front of an echo server of this test, traffic goes
through them, toxics act on it (latency measured, reset_peer seen as a reset), proxies are
disabled, re-enabled, reset and destroyed, and the client's exceptions come from Toxiproxy's
status codes. The raw /populate and error bodies are checked with requests (the client has no
call for them).

warren-lb is the built binary (`warren-lb` next to the broker binary), started with one listener
in front of the echo server and its admin API on 127.0.0.1:0; the bound addresses come from its
log (`listening listener=<name> addr=<ip:port>`, docs/CONTRACTS.md)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time

import pytest
import requests
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from conftest import _STARTED, register_log, stop_process, unregister_log, warren_binary

_LISTENING = re.compile(r"listening listener=(\S+) addr=(\S+)")


class EchoServer:
    """Echoes every connection until EOF, one thread per connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = "%s:%d" % self.sock.getsockname()
        self.served = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c):
        first = True
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if first:
                    self.served += 1
                    first = False
                try:
                    c.sendall(data)
                except OSError:
                    return

    def close(self):
        self._stop = True
        self.sock.close()


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.close()


@pytest.fixture
def lb(echo, tmp_path):
    """warren-lb (listener `seed` in front of the echo server, admin API on loopback); the
    toxiproxy client pointed at its admin port. Yields the admin address."""
    binary = warren_binary().parent / "warren-lb"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} is missing: build it first (`cargo build -p warren-lb`)", pytrace=False)
    conf = tmp_path / "warren-lb.toml"
    conf.write_text(
        '[admin]\nlisten = "127.0.0.1:0"\n\n'
        f'[[listener]]\nname = "seed"\nbind = "127.0.0.1:0"\nbackends = ["{echo.addr}"]\n'
    )
    log = tmp_path / "warren-lb.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(binary), "--config", str(conf)], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"),
                                start_new_session=True)
    _STARTED.append(proc)
    log_name = f"warren-lb log ({log})"
    register_log(log_name, log)
    deadline = time.monotonic() + 20
    while True:
        found = dict(_LISTENING.findall(log.read_text("utf-8", "replace")))
        if "admin" in found and "seed" in found:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"warren-lb did not listen:\n{log.read_text()}", pytrace=False)
        time.sleep(0.05)
    host, port = found["admin"].rsplit(":", 1)
    APIConsumer.host, APIConsumer.port = host, int(port)
    yield found["admin"]
    stop_process(proc)
    unregister_log(log_name)


def split(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def connect(addr: str) -> socket.socket:
    s = socket.create_connection(split(addr), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def roundtrip(s: socket.socket, msg: bytes) -> float:
    """Sends `msg`, reads its echo; returns the seconds it took."""
    t0 = time.monotonic()
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = s.recv(65536)
        assert chunk, f"closed after {got!r}"
        got += chunk
    assert got == msg
    return time.monotonic() - t0


def refused(addr: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(split(addr), timeout=2).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


def test_the_toxiproxy_client_drives_warren_lb(lb, echo):
    server = Toxiproxy()
    assert server.running()
    assert server.version().startswith(b'{"version":"warren-lb ')

    proxy = server.create(upstream=echo.addr, name="echo")
    assert proxy.name == "echo" and proxy.upstream == echo.addr and proxy.enabled is True
    host, port = split(proxy.listen)
    assert host == "127.0.0.1" and port != 0, "the answer carries the bound port"
    proxies = server.proxies()
    assert set(proxies) == {"echo", "seed"}
    assert proxies["echo"].listen == proxy.listen

    s = connect(proxy.listen)
    base = roundtrip(s, b"hello")
    assert base < 0.25, base

    # latency: 400 ms on the way back, at once on the live connection and on a new one.
    proxy.add_toxic(type="latency", attributes={"latency": 400, "jitter": 0})
    toxics = proxy.toxics()
    assert list(toxics) == ["latency_downstream"]
    t = toxics["latency_downstream"]
    assert (t.type, t.stream, t.toxicity, t.attributes) == ("latency", "downstream", 1.0,
                                                             {"latency": 400, "jitter": 0})
    assert roundtrip(s, b"slow") >= 0.4
    fresh = connect(proxy.listen)
    assert roundtrip(fresh, b"slow too") >= 0.4
    fresh.close()
    assert proxy.destroy_toxic("latency_downstream")
    assert roundtrip(s, b"fast again") < 0.3
    assert proxy.toxics() == {}

    # reset_peer upstream: the first bytes sent reset the connection.
    proxy.add_toxic(name="cut", type="reset_peer", stream="upstream", attributes={"timeout": 0})
    doomed = connect(proxy.listen)
    doomed.sendall(b"x")
    with pytest.raises(ConnectionResetError):
        doomed.recv(16)
    doomed.close()
    assert proxy.get_toxic("cut").attributes == {"timeout": 0}
    proxy.destroy_toxic("cut")

    # down(): disabled inside (live connection closed, listener gone), back on the same port.
    with proxy.down():
        assert s.recv(16) == b"", "a disabled proxy closes its connections"
        assert refused(proxy.listen)
        assert server.get_proxy("echo").enabled is False
    assert server.get_proxy("echo").enabled is True
    s.close()
    s = connect(proxy.listen)
    roundtrip(s, b"back")
    s.close()

    # reset(): every proxy enabled, every toxic removed (POST /reset without a body).
    proxy.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
    proxy.disable()
    assert refused(proxy.listen)
    assert server.reset() is True
    again = server.get_proxy("echo")
    assert again.enabled is True and again.toxics() == {}
    s = connect(proxy.listen)
    roundtrip(s, b"after reset")
    s.close()

    # Toxiproxy's status codes become the client's exceptions.
    with pytest.raises(ProxyExists):
        server.create(upstream=echo.addr, name="echo")
    with pytest.raises(ProxyExists):
        APIConsumer.post("/proxies", json={"name": "echo", "upstream": echo.addr})
    with pytest.raises(NotFound):
        APIConsumer.get("/proxies/missing")
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="noop")
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="latency", stream="sideways")

    assert proxy.destroy()
    assert server.get_proxy("echo") is None
    assert refused(proxy.listen)


def test_the_client_populates_and_destroys_all(lb, echo):
    server = Toxiproxy()
    made = server.populate([
        {"name": "one", "upstream": echo.addr, "listen": "127.0.0.1:0"},
        {"name": "two", "upstream": echo.addr, "listen": "127.0.0.1:0"},
    ])
    assert sorted(p.name for p in made) == ["one", "two"]
    for p in made:
        s = connect(p.listen)
        roundtrip(s, p.name.encode())
        s.close()
    server.destroy_all()
    assert server.proxies() == {}, "the configured listener is a proxy too"


def test_populate_and_error_bodies_have_toxiproxys_shape(lb, echo):
    base = f"http://{lb}"
    r = requests.post(f"{base}/populate", json=[
        {"name": "a", "listen": "127.0.0.1:0", "upstream": echo.addr},
        {"name": "b", "listen": "127.0.0.1:0", "upstream": echo.addr, "enabled": False},
    ], timeout=10)
    assert r.status_code == 201, r.text
    proxies = r.json()["proxies"]
    assert [(p["name"], p["enabled"]) for p in proxies] == [("a", True), ("b", False)]
    s = connect(proxies[0]["listen"])
    roundtrip(s, b"populated")
    s.close()

    r = requests.post(f"{base}/populate", json=[{"name": "c"}], timeout=10)
    assert (r.status_code, r.json()) == (400, {"error": "missing required field: upstream at proxy 1",
                                               "status": 400})
    r = requests.get(f"{base}/proxies/nope", timeout=10)
    assert (r.status_code, r.json()) == (404, {"error": "proxy not found", "status": 404})
    r = requests.post(f"{base}/proxies", json={"name": "a", "upstream": echo.addr}, timeout=10)
    assert (r.status_code, r.json()) == (409, {"error": "proxy already exists", "status": 409})
    r = requests.post(f"{base}/proxies/a/toxics", json={"type": "latency"}, timeout=10)
    assert r.status_code == 200, r.text
    r = requests.post(f"{base}/proxies/a/toxics", json={"type": "latency"}, timeout=10)
    assert (r.status_code, r.json()) == (409, {"error": "toxic already exists", "status": 409})
    r = requests.delete(f"{base}/proxies/a/toxics/nope", timeout=10)
    assert (r.status_code, r.json()) == (404, {"error": "toxic not found", "status": 404})
    r = requests.post(f"{base}/proxies/a/toxics", data="{", headers={"Content-Type": "application/json"},
                      timeout=10)
    assert r.status_code == 400 and r.json()["error"].startswith("bad request body: "), r.text
    # The admin API's guard still applies: bodies must say they are JSON...
    body = '{"name": "j", "listen": "127.0.0.1:0", "upstream": "%s"}' % echo.addr
    r = requests.post(f"{base}/proxies", data=body, headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415
    # ...except JSON typed as a form by a client that is not a browser: what Toxiproxy's Java
    # client (Testcontainers) sends through HttpURLConnection.
    java = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Java/17.0.9"}
    r = requests.post(f"{base}/proxies", data=body, headers=java, timeout=10)
    assert r.status_code == 201, r.text
    browser = dict(java, **{"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128.0"})
    r = requests.post(f"{base}/proxies/j/toxics", data='{"type": "latency"}', headers=browser, timeout=10)
    assert r.status_code == 415
