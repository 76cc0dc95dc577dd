"""The management UI's login link and overview chart in a real headless Chromium (Debian's
`chromium`, driven by playwright; see test_ui.py, whose broker setup this reuses):

- `/#/login/USER/PASS` logs in, as RabbitMQ's UI allows, and the password leaves the address bar;
- the overview's rate chart opens with the last minutes of samples (`/api/overview?msg_rates_age=`)
  instead of starting empty;
- its four series differ in line style, not only in colour, so equal rates do not hide each other.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import urllib.parse
import urllib.request
import uuid

import pika
import pytest

from conftest import TARGET

CHROMIUM = next((p for p in (os.environ.get("WARREN_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.access(p, os.X_OK)), None)
if CHROMIUM is None:
    pytest.skip("SKIPPED, not run: no headless Chromium on this machine, so the UI login link and the overview "
                "chart are untested. Install Debian's `chromium` (scripts/setup-test-env does as root: "
                "apt-get install chromium) or set WARREN_CHROMIUM to a Chromium binary.", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -r tests/python/requirements.txt)")

from test_ui import WAIT_MS, _start_rabbitmq_mgmt, _start_warren_mgmt  # noqa: E402
from conftest import register_log, stop_process, unregister_log  # noqa: E402


@pytest.fixture(scope="module")
def mgmt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui-overview-broker")
    fwd = None
    if TARGET == "rabbitmq":
        m, fwd = _start_rabbitmq_mgmt(tmp)
    else:
        m = _start_warren_mgmt(tmp)
    name = f"{TARGET} broker log, UI overview tests ({m.broker.log_path})"
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
    yield p
    ctx.close()
    assert not errors, f"JavaScript errors in the UI: {errors}"


def api(mgmt, method: str, path: str, body: dict | None = None, user: str = "guest", password: str = "guest"):
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(mgmt.api + "/api" + path, data=data, method=method,
                                 headers={"Authorization": "Basic " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read()
        return json.loads(text) if text else None


def test_a_login_link_logs_in_and_drops_the_password_from_the_address(page, mgmt):
    # A user whose password needs URL encoding, as a link would carry it.
    user, password = f"ui-link-{uuid.uuid4().hex[:6]}", "p@ss/w rd:1"
    api(mgmt, "PUT", f"/users/{user}", {"password": password, "tags": "monitoring"})
    try:
        link = f"{mgmt.ui}/#/login/{urllib.parse.quote(user, safe='')}/{urllib.parse.quote(password, safe='')}"
        page.goto(mgmt.ui + "/")
        page.wait_for_selector("#login-form", state="visible")
        before = page.evaluate("history.length")
        page.goto(link)
        page.wait_for_selector("#totals")
        assert page.is_visible("#nav") and not page.is_visible("#login")
        assert page.text_content("#whoami").strip() == f"User: {user}"
        assert page.url.endswith("#/overview"), page.url
        assert "p%40ss" not in page.url and "/login/" not in page.url
        # The link's history entry became #/overview: one entry more, none with the password.
        assert page.evaluate("history.length") == before + 1
        page.go_back()
        assert "/login/" not in page.url, page.url
        page.go_forward()
        page.wait_for_selector("#totals")
        stored = base64.b64decode(page.evaluate("sessionStorage.getItem('warren.auth')")).decode()
        assert stored == f"{user}:{password}"

        # A link with a wrong password shows the login form, as a typed one does.
        page.goto(f"{mgmt.ui}/#/login/{urllib.parse.quote(user, safe='')}/wrong")
        page.wait_for_selector("#login-error:not(:empty)")
        assert page.is_visible("#login-form") and not page.is_visible("#nav")
        assert "/login/" not in page.url
    finally:
        api(mgmt, "DELETE", f"/users/{user}")


def publish_history_ready(mgmt, want_samples: int) -> dict:
    """Publishes until the node's sample history (as the UI asks for it) holds `want_samples`
    samples and a publish between two of them; returns the publish details."""
    conn = pika.BlockingConnection(mgmt.broker.params())
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    deadline = time.monotonic() + 60
    try:
        while True:
            for _ in range(20):
                ch.basic_publish("", q, b"x")
            ov = api(mgmt, "GET", "/overview?msg_rates_age=300&msg_rates_incr=5")
            d = (ov.get("message_stats") or {}).get("publish_details") or {}
            samples = d.get("samples") or []
            if len(samples) >= want_samples and samples[0]["sample"] > samples[-1]["sample"]:
                return d
            assert time.monotonic() < deadline, f"no sample history after 60 s: {d}"
            conn.sleep(0.5)  # keeps pika's connection serviced while the node samples
    finally:
        conn.close()


def test_the_overview_chart_opens_with_the_last_minutes_and_distinct_line_styles(page, mgmt):
    details = publish_history_ready(mgmt, want_samples=4)
    stamps = [s["timestamp"] for s in details["samples"]]
    assert stamps == sorted(stamps, reverse=True), "newest first, as RabbitMQ"

    page.goto(f"{mgmt.ui}/#/login/guest/guest")
    page.wait_for_selector("svg.chart polyline[data-series=publish]")
    # At the first render (one poll: polling alone would have drawn a single point by now).
    points = page.evaluate(
        "document.querySelector('svg.chart polyline[data-series=publish]').getAttribute('points')")
    ys = [float(p.split(",")[1]) for p in points.split()]
    assert len(ys) >= 3, f"the chart starts with the node's history: {points}"
    assert min(ys) < max(ys), f"the history shows the publishes: {points}"

    # Four series, four different strokes (width and dash pattern as the browser draws them).
    styles = page.evaluate("""[...document.querySelectorAll('svg.chart polyline.series')].map((p) => {
        const s = getComputedStyle(p); return [p.dataset.series, s.strokeWidth, s.strokeDasharray]; })""")
    assert sorted(s[0] for s in styles) == ["ack", "confirm", "deliver", "publish"], styles
    assert len({(w, d) for _, w, d in styles}) == 4, f"series drawn alike: {styles}"
    # The legend shows each line's style too.
    assert page.locator("#rates li svg line").count() == 4
