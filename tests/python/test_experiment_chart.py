"""The confirm_publish experiment's chart (examples/celery/run_experiment.py --chart): someone who
only looks at the picture sees "lost without confirms, none with". Pure: a report made here, no
broker. The full run (test_experiment.py) checks the chart it writes the same way."""

from __future__ import annotations

import re
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "examples" / "celery"))
import run_experiment as rx  # noqa: E402


def run(mode: str, n: int, lost_at: list[float], resets: list[tuple[float, str]], duration: float) -> dict:
    publishes = [duration * (i + 1) / n for i in range(n)]
    lost = rx.attribute_losses(lost_at, [{"t": t, "rule": rule} for t, rule in resets])
    return {
        "mode": mode, "sent": n, "confirmed": n if mode == "confirm" else 0, "accepted": n,
        "executed": n - len(lost_at), "lost": len(lost_at), "duplicated": 0, "failed": 0,
        "publish_retries": len(resets), "retry_errors": {}, "failures": [], "duration_s": duration,
        "resets": len(resets), "resets_by_rule": {}, "faults_metric": {},
        "discarded_upstream_bytes": 0, "discarded_downstream_bytes": 0, "lost_ids": [],
        "timeline": {
            "publishes": publishes,
            "confirms": publishes if mode == "confirm" else [],
            "executions": publishes[: n - len(lost_at)],
            "resets": [{"t": t, "rule": rule, "cause": "on_amqp basic.publish" if rule == rx.PUBLISH_RULE else "every",
                        "discarded_upstream": 100, "discarded_downstream": 0} for t, rule in resets],
            "lost": lost,
        },
    }


def report(plain: dict, confirm: dict) -> dict:
    return {"started": "2026-01-01T00:00:00+00:00", "command": "run_experiment.py",
            "config": {"n": plain["sent"], "broker": "test", "nth": 20, "reset_every": "1s", "rate": 400, "seed": 1,
                       "queue": "q"},
            "runs": [plain, confirm]}


def test_each_loss_goes_to_the_first_reset_after_its_publish():
    resets = [{"t": 1.0, "rule": rx.PUBLISH_RULE}, {"t": 2.0, "rule": rx.PERIODIC_RULE}, {"t": 3.0, "rule": rx.PUBLISH_RULE}]
    got = rx.attribute_losses([0.99, 0.5, 1.2, 2.5, 2.9, 2.95], resets)
    assert got == [
        {"t": 1.0, "rule": rx.PUBLISH_RULE, "lost": 2, "total": 2},
        {"t": 2.0, "rule": rx.PERIODIC_RULE, "lost": 1, "total": 3},
        {"t": 3.0, "rule": rx.PUBLISH_RULE, "lost": 3, "total": 6},
    ]
    # A loss after the last reset (clocks a little apart) goes to the last reset; none: none.
    assert rx.attribute_losses([3.5], resets) == [{"t": 3.0, "rule": rx.PUBLISH_RULE, "lost": 1, "total": 1}]
    assert rx.attribute_losses([], resets) == []


def test_the_chart_shows_the_lost_series_on_one_scale_full_width():
    resets = [(0.5 * k, rx.PUBLISH_RULE if k % 2 else rx.PERIODIC_RULE) for k in range(1, 20)]
    plain = run("plain", 400, [0.49, 0.5, 1.49, 4.4], resets, duration=10.0)
    confirm = run("confirm", 400, [], resets, duration=8.0)
    page = rx.html_report(report(plain, confirm))
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(svgs) == 2, "one panel per run"
    plain_svg, confirm_svg = svgs

    # The lost series: a cumulative step line per run, a dot at each reset that lost tasks.
    assert 'class="lost" data-lost="4"' in plain_svg
    assert 'class="lost" data-lost="0"' in confirm_svg
    dots = re.findall(r'<circle class="lost-at-reset"[^>]*><title>([^<]*)</title>', plain_svg)
    assert len(dots) == 3, dots  # the resets at 0.5 s (2 lost), 1.5 s and 4.5 s
    assert "lost 2 tasks (2 so far)" in dots[0], dots
    assert "lost 1 task (4 so far)" in dots[2], dots
    assert "lost-at-reset" not in confirm_svg
    assert ">4 lost</text>" in plain_svg and ">none lost</text>" in confirm_svg

    # Resets are light ticks, not lines across the plot.
    ticks = re.findall(r'<line class="reset" x1="[^"]*" y1="([\d.]+)" x2="[^"]*" y2="([\d.]+)"[^>]*stroke-opacity="([\d.]+)"',
                       plain_svg)
    assert len(ticks) == len(resets)
    assert all(float(y2) - float(y1) <= 15 and float(op) <= 0.5 for y1, y2, op in ticks), ticks

    # One scale: the same time axis (the longer run's) and task axis in both panels.
    labels = [re.findall(r'text-anchor="middle">([\d.]+s)</text>', svg) for svg in svgs]
    assert labels[0] == labels[1] and labels[0][-1] == "10.0s", labels
    # Full width: the SVG scales with the page.
    assert all('width="100%"' in svg and "viewBox=" in svg for svg in svgs)
    # With confirms, published and confirmed are one line, said so in the legend.
    assert "published = confirmed" in confirm_svg
    assert "<script" not in page
