"""Fixtures for the Python interop tests: start a broker, hand its address to the tests.

Targets (env WARREN_TEST_TARGET):
  warren    (default) the built warren-broker binary: $WARREN_BROKER_BIN, else
            $CARGO_TARGET_DIR/debug/warren-broker, else target/debug/warren-broker.
            Started with `--amqp 127.0.0.1:0 --data-dir <tmp>`; the bound address is read
            from its stderr (`listening proto=amqp addr=...`, docs/CONTRACTS.md).
  rabbitmq  Debian's RabbitMQ, started in the foreground on free loopback ports with its
            own node name, Mnesia and log directories. Used to check that the tests
            themselves are right.

A failing test's report carries the broker's log (and any registered worker log) written
while the test ran. WARREN_TEST_TRACE=1 also relays the plain AMQP listener through
amqp_trace.py and adds the decoded frames of the test to that report.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pika
import pytest

REPO = Path(__file__).resolve().parents[2]
TARGET = os.environ.get("WARREN_TEST_TARGET", "warren").strip().lower() or "warren"
LISTENING_RE = re.compile(r"listening (?:proto|listener)=(\S+) addr=(\S+)")
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"

# Every process a fixture starts; killed at exit even if a teardown never runs.
_STARTED: list[subprocess.Popen] = []
# name -> log file, shown (from the offset at test start) in the report of a failing test.
_LOG_SOURCES: dict[str, Path] = {}


def _kill_started() -> None:
    for proc in _STARTED:
        stop_process(proc, timeout=5)


atexit.register(_kill_started)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM the process group the fixture created, then SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, start: int = 0, max_lines: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    lines = data.decode("utf-8", "replace").splitlines()
    if len(lines) > max_lines:
        lines = [f"... ({len(lines) - max_lines} earlier lines cut)"] + lines[-max_lines:]
    return "\n".join(lines)


def register_log(name: str, path: Path) -> None:
    _LOG_SOURCES[name] = path


def unregister_log(name: str) -> None:
    _LOG_SOURCES.pop(name, None)


@dataclass
class Broker:
    target: str
    proc: subprocess.Popen
    log_path: Path
    host: str = "127.0.0.1"
    port: int = 0
    tls_port: int | None = None
    ca_file: Path | None = None
    listeners: dict[str, str] = field(default_factory=dict)
    # Starts the same broker again on the same data (after this one has stopped); returns the new one.
    restart: Callable[[], "Broker"] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}//"

    def params(self, **kw) -> pika.ConnectionParameters:
        kw.setdefault("credentials", pika.PlainCredentials("guest", "guest"))
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 5)
        kw.setdefault("stack_timeout", 10)
        kw.setdefault("blocked_connection_timeout", 10)
        return pika.ConnectionParameters(host=self.host, port=self.port, **kw)

    def connect(self, **kw) -> pika.BlockingConnection:
        self.assert_alive()
        return pika.BlockingConnection(self.params(**kw))

    def assert_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            pytest.fail(
                f"{self.target} broker process exited with code {code}; its log:\n"
                + tail(self.log_path, max_lines=80),
                pytrace=False,
            )


def _wait_for_listeners(proc, log_path: Path, want: set[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    while time.monotonic() < deadline:
        text = log_path.read_text("utf-8", "replace") if log_path.exists() else ""
        for proto, addr in LISTENING_RE.findall(text):
            found.setdefault(proto, addr)
        if want <= found.keys():
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc)
    state = f"exited with code {proc.returncode}" if proc.poll() is not None else f"still silent after {timeout}s"
    pytest.fail(
        f"warren-broker {state} before logging `listening proto=...` for {sorted(want - found.keys())} "
        f"(docs/CONTRACTS.md). Command: {' '.join(proc.args)}\nLog:\n{tail(log_path, max_lines=80)}",
        pytrace=False,
    )


def _addr_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def warren_binary() -> Path:
    if os.environ.get("WARREN_BROKER_BIN"):
        return Path(os.environ["WARREN_BROKER_BIN"])
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target_dir.is_absolute():
        target_dir = REPO / target_dir
    return target_dir / "debug" / "warren-broker"


def _log_name(tmp: Path, gen: int) -> Path:
    return tmp / ("broker.log" if gen == 1 else f"broker-{gen}.log")


def start_warren(tmp: Path, tls: tuple[Path, Path] | None = None, gen: int = 1) -> Broker:
    binary = warren_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"warren-broker binary not found at {binary}. Build it first "
            f"(`cargo build -p warren-broker`; scripts/test does), or point WARREN_BROKER_BIN at it, "
            f"or run against RabbitMQ with WARREN_TEST_TARGET=rabbitmq.",
            pytrace=False,
        )
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    args = [str(binary), "--amqp", "127.0.0.1:0", "--data-dir", str(data)]
    want = {"amqp"}
    if tls is not None:
        args += ["--amqps", "127.0.0.1:0", "--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        want.add("amqps")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("RUST_BACKTRACE", "1")
    log_path = _log_name(tmp, gen)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=tmp, start_new_session=True,
        )
    _STARTED.append(proc)
    found = _wait_for_listeners(proc, log_path, want, timeout=20)
    return Broker(
        target="warren", proc=proc, log_path=log_path, port=_addr_port(found["amqp"]),
        tls_port=_addr_port(found["amqps"]) if "amqps" in found else None, listeners=found,
        restart=lambda: start_warren(tmp, tls, gen + 1),
    )


def start_rabbitmq(tmp: Path, tls: tuple[Path, Path, Path]) -> Broker:
    if not os.access(RABBITMQ_SERVER, os.X_OK):
        pytest.fail(f"WARREN_TEST_TARGET=rabbitmq but {RABBITMQ_SERVER} is missing "
                    f"(scripts/setup-test-env installs Debian's rabbitmq-server)", pytrace=False)
    port, tls_port, dist_port = free_port(), free_port(), free_port()
    cert, key, ca = tls
    conf = tmp / "rabbitmq.conf"
    conf.write_text(
        f"listeners.tcp.1 = 127.0.0.1:{port}\n"
        f"listeners.ssl.1 = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {ca}\n"
        f"ssl_options.certfile = {cert}\n"
        f"ssl_options.keyfile = {key}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
        "loopback_users.guest = true\n"
    )
    plugins = tmp / "enabled_plugins"
    plugins.write_text("[].\n")
    node = f"warren-interop-{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost"
    env = dict(os.environ)
    env.update(
        HOME=str(tmp),  # the Erlang cookie goes here, not into the real home
        RABBITMQ_NODENAME=node,
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_MNESIA_BASE=str(tmp / "mnesia"),
        RABBITMQ_LOG_BASE=str(tmp / "log"),
        RABBITMQ_LOGS="-",
        RABBITMQ_CONFIG_FILE=str(conf),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
    )
    return _launch_rabbitmq(tmp, env, port, tls_port, 1)


def _launch_rabbitmq(tmp: Path, env: dict, port: int, tls_port: int, gen: int) -> Broker:
    log_path = _log_name(tmp, gen)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [RABBITMQ_SERVER], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=tmp, start_new_session=True,
        )
    _STARTED.append(proc)
    broker = Broker(target="rabbitmq", proc=proc, log_path=log_path, port=port, tls_port=tls_port,
                    listeners={"amqp": f"127.0.0.1:{port}", "amqps": f"127.0.0.1:{tls_port}"},
                    restart=lambda: _launch_rabbitmq(tmp, env, port, tls_port, gen + 1))
    deadline = time.monotonic() + 90
    last_err: Exception | None = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            pika.BlockingConnection(broker.params()).close()
            return broker
        except Exception as e:  # not up yet
            last_err = e
            time.sleep(0.5)
    stop_process(proc)
    pytest.fail(f"RabbitMQ did not accept AMQP on 127.0.0.1:{port} (last error {last_err!r}); log:\n"
                + tail(log_path, max_lines=80), pytrace=False)


# ---------------------------------------------------------------- certificates


@dataclass
class TlsFiles:
    ca: Path
    cert: Path  # server certificate chain
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    import trustme

    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    files = TlsFiles(ca=d / "ca.pem", cert=d / "server-chain.pem", key=d / "server-key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    server.private_key_pem.write_to_path(str(files.key))
    with open(files.cert, "wb") as f:
        for blob in server.cert_chain_pems:
            f.write(blob.bytes())
    return files


# ---------------------------------------------------------------- brokers


def _session_broker(tmp_path_factory, tls_files: TlsFiles, with_tls: bool):
    return start_target(tmp_path_factory.mktemp(f"{TARGET}-broker"), tls_files, with_tls)


def start_target(tmp: Path, tls_files: TlsFiles, with_tls: bool = False) -> Broker:
    """A new broker of the selected target, in `tmp`. The caller stops it (stop_process)."""
    if TARGET == "rabbitmq":
        b = start_rabbitmq(tmp, (tls_files.cert, tls_files.key, tls_files.ca))
    elif TARGET == "warren":
        b = start_warren(tmp, (tls_files.cert, tls_files.key) if with_tls else None)
    else:
        pytest.fail(f"unknown WARREN_TEST_TARGET={TARGET!r} (warren or rabbitmq)", pytrace=False)
    b.ca_file = tls_files.ca
    return b


@pytest.fixture(scope="session")
def _broker_session(tmp_path_factory, tls_files):
    b = _session_broker(tmp_path_factory, tls_files, with_tls=False)
    register_log(f"{b.target} broker log ({b.log_path})", b.log_path)
    proxy = None
    if os.environ.get("WARREN_TEST_TRACE", "") not in ("", "0"):
        from amqp_trace import TraceProxy

        trace_path = b.log_path.with_name("amqp-trace.log")
        proxy = TraceProxy((b.host, b.port), trace_path)
        b.port = proxy.port  # every client of the plain listener goes through the tracing relay
        register_log(f"AMQP frames ({trace_path})", trace_path)
    yield b
    if proxy is not None:
        proxy.close()
    # RabbitMQ's own shutdown can hang on open connections; it is only the reference target.
    stop_process(b.proc, timeout=4 if b.target == "rabbitmq" else 10)


@pytest.fixture(scope="session")
def _tls_broker_session(tmp_path_factory, tls_files, _broker_session):
    if TARGET == "rabbitmq":
        # The one RabbitMQ node already has an SSL listener with the same certificate.
        yield _broker_session
        return
    b = _session_broker(tmp_path_factory, tls_files, with_tls=True)
    register_log(f"warren TLS broker log ({b.log_path})", b.log_path)
    yield b
    stop_process(b.proc)


@pytest.fixture
def broker(_broker_session) -> Broker:
    """The session's broker (plain AMQP listener), checked to be still running."""
    _broker_session.assert_alive()
    return _broker_session


@pytest.fixture
def tls_broker(_tls_broker_session) -> Broker:
    """A broker with an AMQPS listener using the session's test certificate."""
    _tls_broker_session.assert_alive()
    assert _tls_broker_session.tls_port, "broker has no amqps listener"
    return _tls_broker_session


@pytest.fixture
def conn(broker):
    c = broker.connect()
    yield c
    if c.is_open:
        try:
            c.close()
        except Exception:
            pass


@pytest.fixture
def ch(conn):
    return conn.channel()


@pytest.fixture
def qname(request) -> str:
    """A queue/exchange name unique to this test."""
    return f"interop.{request.node.name[:60]}.{uuid.uuid4().hex[:8]}"


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# ---------------------------------------------------------------- failure reports


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.stash[_offsets_key] = {name: (p.stat().st_size if p.exists() else 0)
                                for name, p in _LOG_SOURCES.items()}
    yield


_offsets_key = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        offsets = item.stash.get(_offsets_key, {})
        for name, path in list(_LOG_SOURCES.items()):
            report.sections.append((f"{name}, during this test", tail(path, offsets.get(name, 0))))


def pytest_report_header(config):
    if TARGET == "warren":
        return f"interop target: warren-broker ({warren_binary()})"
    return f"interop target: {TARGET}"
