"""The management web UI in a real headless Chromium (Debian's `chromium` package, driven by
playwright from PyPI through `executable_path`; no browser download).

The module starts its own broker with the management listener: warren with
`--mgmt 127.0.0.1:0` (address read from `listening proto=mgmt addr=...`), or, with
WARREN_TEST_TARGET=rabbitmq, Debian's RabbitMQ with the rabbitmq_management plugin on a free
port, serving warren's UI files through a small local server that forwards /api to it (so the
UI itself is checked against the API it copies). Messages and queues are made over AMQP with
pika, as a user's application would.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pika
import pytest

from conftest import (REPO, TARGET, Broker, _STARTED, _addr_port, _launch_rabbitmq,
                      _wait_for_listeners, free_port, register_log, stop_process, tail,
                      unregister_log, warren_binary)

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -r tests/python/requirements.txt)")

CHROMIUM = next((p for p in (os.environ.get("WARREN_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.access(p, os.X_OK)), None)
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (scripts/setup-test-env installs it when run as root; "
                "or set WARREN_CHROMIUM to a Chromium binary)", allow_module_level=True)

UI_DIR = REPO / "broker" / "ui"
WAIT_MS = 15_000  # RabbitMQ's stats reach its API up to 5 s late; warren's are immediate


class Mgmt:
    def __init__(self, broker: Broker, api: str, ui: str):
        self.broker, self.api, self.ui = broker, api, ui


def _http_ok(url: str) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start_warren_mgmt(tmp: Path) -> Mgmt:
    binary = warren_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"warren-broker binary not found at {binary} (cargo build -p warren-broker)", pytrace=False)
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    log_path = tmp / "broker.log"
    args = [str(binary), "--amqp", "127.0.0.1:0", "--mgmt", "127.0.0.1:0", "--data-dir", str(tmp / "data")]
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp, start_new_session=True)
    _STARTED.append(proc)
    found = _wait_for_listeners(proc, log_path, {"amqp", "mgmt"}, timeout=20)
    broker = Broker(target="warren", proc=proc, log_path=log_path, port=_addr_port(found["amqp"]),
                    listeners=found)
    base = f"http://{found['mgmt']}"
    return Mgmt(broker, base, base)


class _UiForwarder(http.server.ThreadingHTTPServer):
    """Serves broker/ui at / (as warren does) and forwards /api/... to RabbitMQ's API."""

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _UiHandler)


class _UiHandler(http.server.BaseHTTPRequestHandler):
    FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
             "/style.css": ("style.css", "text/css")}

    def log_message(self, *args):
        pass

    def _any(self):
        if self.path in self.FILES:
            name, ctype = self.FILES[self.path]
            self._reply(200, ctype, (UI_DIR / name).read_bytes())
            return
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        req = urllib.request.Request(self.server.upstream + self.path, data=body, method=self.command,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                self._reply(r.status, r.headers.get("Content-Type", "application/json"), r.read(),
                            r.headers.get("WWW-Authenticate"))
        except urllib.error.HTTPError as e:
            self._reply(e.code, e.headers.get("Content-Type", "application/json"), e.read(),
                        e.headers.get("WWW-Authenticate"))

    def _reply(self, code: int, ctype: str, body: bytes, challenge: str | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if challenge:  # passed on: the UI must cope with the browser seeing it
            self.send_header("WWW-Authenticate", challenge)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _any


def _start_rabbitmq_mgmt(tmp: Path) -> tuple[Mgmt, _UiForwarder]:
    port, mgmt_port, dist_port = free_port(), free_port(), free_port()
    conf = tmp / "rabbitmq.conf"
    conf.write_text(f"listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users.guest = true\n")
    plugins = tmp / "enabled_plugins"
    plugins.write_text("[rabbitmq_management].\n")
    env = dict(os.environ)
    env.update(
        HOME=str(tmp),
        RABBITMQ_NODENAME=f"warren-ui-{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost",
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_MNESIA_BASE=str(tmp / "mnesia"),
        RABBITMQ_LOG_BASE=str(tmp / "log"),
        RABBITMQ_LOGS="-",
        RABBITMQ_CONFIG_FILE=str(conf),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
            f'-rabbitmq_management tcp_config [{{port,{mgmt_port}}},{{ip,"127.0.0.1"}}]'),
    )
    broker = _launch_rabbitmq(tmp, env, port, port, 1)
    api = f"http://127.0.0.1:{mgmt_port}"
    deadline = time.monotonic() + 30
    while not _http_ok(api + "/api/overview"):
        if time.monotonic() > deadline or broker.proc.poll() is not None:
            stop_process(broker.proc, timeout=4)
            pytest.fail(f"RabbitMQ's management API did not answer on {api}; log:\n"
                        + tail(broker.log_path, max_lines=60), pytrace=False)
        time.sleep(0.2)
    fwd = _UiForwarder(api)
    threading.Thread(target=fwd.serve_forever, daemon=True).start()
    return Mgmt(broker, api, f"http://127.0.0.1:{fwd.server_address[1]}"), fwd


@pytest.fixture(scope="module")
def mgmt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui-broker")
    fwd = None
    if TARGET == "rabbitmq":
        m, fwd = _start_rabbitmq_mgmt(tmp)
    else:
        m = _start_warren_mgmt(tmp)
    name = f"{TARGET} broker log, UI tests ({m.broker.log_path})"
    register_log(name, m.broker.log_path)
    yield m
    unregister_log(name)
    if fwd is not None:
        fwd.shutdown()
    stop_process(m.broker.proc, timeout=4 if TARGET == "rabbitmq" else 10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, mgmt):
    ctx = browser.new_context()
    p = ctx.new_page()
    p.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("dialog", lambda d: d.accept())  # the confirm() before purge/delete
    yield p
    ctx.close()
    assert not errors, f"JavaScript errors in the UI: {errors}"



def wait_js(page, expr: str, timeout: float = 10.0) -> None:
    """Polls `expr` from here: playwright's wait_for_function evaluates a string with eval inside
    the page once the condition is not true at once, and the UI's Content-Security-Policy
    (rightly) refuses eval."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expr):
        assert time.monotonic() < deadline, f"never true in the page: {expr}"
        time.sleep(0.05)

def login(page, mgmt, password="guest"):
    page.goto(mgmt.ui + "/")
    page.wait_for_selector("#login-form", state="visible")
    page.fill("#login-user", "guest")
    page.fill("#login-pass", password)
    page.click("#login-form button[type=submit]")


@pytest.fixture
def amqp(mgmt):
    c = pika.BlockingConnection(mgmt.broker.params())
    yield c.channel()
    if c.is_open:
        c.close()


def _qname(request) -> str:
    return f"ui.{request.node.name[:40]}.{uuid.uuid4().hex[:8]}"


def test_overview_loads_after_login(page, mgmt):
    login(page, mgmt)
    page.wait_for_selector("#totals")
    assert page.url.endswith("#/overview")
    assert page.is_visible("#nav") and not page.is_visible("#login")
    # The default exchanges exist on every fresh node: the count comes from /api/overview.
    exchanges = int(page.text_content("#total-exchanges .value").replace(",", ""))
    assert exchanges >= 7, exchanges
    assert page.text_content("#whoami").strip() == "User: guest"
    # The rate chart draws one line per series once it has samples from the polling.
    wait_js(page, "document.querySelectorAll('svg.chart polyline.series').length == 4")
    assert page.locator("#rates li").count() == 4


def test_login_with_a_wrong_password_is_refused(page, mgmt):
    login(page, mgmt, password="not-the-password")
    wait_js(page, "document.getElementById('login-error').textContent.length > 0")
    assert page.is_visible("#login-form")
    assert not page.is_visible("#nav")
    assert page.evaluate("sessionStorage.getItem('warren.auth')") is None


def test_queue_created_over_amqp_appears_on_queues_page(page, mgmt, amqp, request):
    q = _qname(request)
    amqp.queue_declare(q, durable=True)
    amqp.basic_publish("", q, b"one")
    login(page, mgmt)
    page.wait_for_selector("#totals")
    page.click("#nav a[data-route=queues]")
    row = page.wait_for_selector(f'#queues tr[data-queue="{q}"]')
    assert row.query_selector("a.qname").text_content() == q
    # The queue link leads to its own page.
    row.query_selector("a.qname").click()
    page.wait_for_selector("#queue-name")
    assert page.text_content("#queue-name") == q


def test_get_from_queue_page_shows_the_body(page, mgmt, amqp, request):
    q = _qname(request)
    body = f"hello from pika {uuid.uuid4().hex}"
    amqp.queue_declare(q)
    amqp.basic_publish("", q, body.encode(), pika.BasicProperties(content_type="text/plain"))
    login(page, mgmt)
    page.wait_for_selector("#totals")
    page.goto(f"{mgmt.ui}/#/queues/%2F/{q}")
    page.wait_for_selector("#get-messages")
    page.click("#get-messages")
    payload = page.wait_for_selector("#messages pre.payload")
    assert payload.text_content() == body
    # The default ack mode requeues: the message is still there for an AMQP client.
    method, _props, got = amqp.basic_get(q, auto_ack=True)
    assert method is not None and got == body.encode()


def test_purge_and_delete_from_queue_page(page, mgmt, amqp, request):
    q = _qname(request)
    amqp.queue_declare(q)
    for i in range(3):
        amqp.basic_publish("", q, f"m{i}".encode())
    login(page, mgmt)
    page.wait_for_selector("#totals")
    page.goto(f"{mgmt.ui}/#/queues/%2F/{q}")
    page.click("text=Purge messages")
    page.wait_for_selector(".flash.ok")
    assert amqp.queue_declare(q, passive=True).method.message_count == 0
    page.click("text=Delete queue")
    wait_js(page, "location.hash === '#/queues'")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        amqp.queue_declare(q, passive=True)
    assert e.value.reply_code == 404
