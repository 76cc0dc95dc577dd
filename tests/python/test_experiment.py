"""The confirm_publish experiment (examples/celery/run_experiment.py) end to end: a real Celery
worker, Celery producers publishing through warren-lb while it resets connections, once without
publisher confirms and once with `broker_transport_options={'confirm_publish': True}`.

Without confirms some tasks are lost, and the balancer's events show why (resets right after a
basic.publish that discarded bytes in flight); with confirms none are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, RABBITMQ_SERVER, TARGET, start_rabbitmq, stop_process, warren_binary

RUNNER = REPO / "examples" / "celery" / "run_experiment.py"
N = 300
NTH = 20  # a reset after every 20th publish of a connection: about fifteen per run
# Periodic resets, rarer than the cuts even on a slow machine: a connection that a periodic reset
# kills before its 20th publish is never cut.
EVERY = "2s"


def run_experiment(tmp: Path, *extra: str, timeout: float = 90) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    report = tmp / "report.json"
    chart = tmp / "chart.html"
    bin_dir = warren_binary().parent
    for b in ("warren-broker", "warren-lb"):
        if not (bin_dir / b).is_file():
            pytest.fail(f"{bin_dir / b} is missing: build the binaries first (`cargo build --bins`)", pytrace=False)
    cmd = [sys.executable, str(RUNNER), "--n", str(N), "--nth", str(NTH), "--reset-every", EVERY,
           "--rate", "600", "--bin-dir", str(bin_dir), "--workdir", str(tmp / "work"),
           "--report", str(report), "--chart", str(chart), *extra]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the runner stops its broker, balancer and worker on SIGTERM
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"the experiment did not finish within {timeout}s\nstdout:\n{stdout}\nstderr:\n{stderr}",
                    pytrace=False)
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    logs = "\n".join(f"--- {p.name}\n{p.read_text('utf-8', 'replace')[-3000:]}"
                     for p in sorted((tmp / "work").glob("*.log")) if p.name != "executions.log")
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}\n{logs}"
    print(out.stdout)
    (tmp / "stdout.txt").write_text(out.stdout)
    data = json.loads(report.read_text())
    text = chart.read_text()
    assert "<svg" in text and "<script" not in text, "a self-contained chart"
    return data


def by_mode(report: dict) -> dict[str, dict]:
    return {r["mode"]: r for r in report["runs"]}


def check_faults_fired(run: dict) -> list[dict]:
    """The balancer did reset connections right after a publish, as its events and metrics agree."""
    cuts = [e for e in run["timeline"]["resets"] if e["rule"] == "publish-window"]
    assert len(cuts) >= 3, f"too few publish-window resets: {run['resets_by_rule']}"
    assert run["faults_metric"].get("publish-window") == len(cuts), (run["faults_metric"], len(cuts))
    assert all(e["cause"] == "on_amqp basic.publish" for e in cuts), cuts
    return cuts


@pytest.mark.timeout(120)
def test_celery_tasks_are_lost_without_confirm_publish_and_not_with_it(tmp_path):
    if TARGET != "warren":
        pytest.skip(f"WARREN_TEST_TARGET={TARGET}: this run is about warren-broker "
                    f"(the RabbitMQ run is test_rabbitmq_behind_warren_lb_loses_nothing_with_confirm_publish)")
    runs = by_mode(run_experiment(tmp_path))
    plain, confirm = runs["plain"], runs["confirm"]

    # Without confirms: the balancer discarded publishes it had read, and Celery never knew.
    cuts = check_faults_fired(plain)
    assert sum(e["discarded_upstream"] for e in cuts) > 0, cuts
    assert plain["failed"] == 0, plain["retry_errors"]
    assert plain["accepted"] == N
    assert plain["lost"] > 0, plain
    # Each cut swallowed at least the publish it cut, whose send_task had returned.
    assert plain["lost"] >= len(cuts), (plain["lost"], len(cuts))
    assert plain["executed"] == N - plain["lost"]

    # With confirms: every send_task returned after the broker's ack, and every task ran.
    cuts = check_faults_fired(confirm)
    assert sum(e["discarded_upstream"] for e in cuts) > 0, cuts
    assert confirm["publish_retries"] >= len(cuts), "kombu republished after each cut"
    assert confirm["failed"] == 0, confirm["retry_errors"]
    assert confirm["confirmed"] == N
    assert confirm["lost"] == 0, confirm["lost_ids"]
    assert confirm["executed"] == N
    # Duplicates are allowed (at-least-once) and counted: never more than the republished tasks.
    assert confirm["duplicated"] <= confirm["publish_retries"]
    table = report_table(tmp_path)  # the printed summary has a row per run
    assert "no confirms" in table and "confirm_publish" in table, table


def report_table(tmp: Path) -> str:
    return (tmp / "stdout.txt").read_text()


@pytest.mark.timeout(150)
def test_rabbitmq_behind_warren_lb_loses_nothing_with_confirm_publish(tmp_path, tls_files):
    if not os.access(RABBITMQ_SERVER, os.X_OK):
        pytest.skip(f"{RABBITMQ_SERVER} is not installed (scripts/setup-test-env installs Debian's "
                    f"rabbitmq-server when run as root)")
    (tmp_path / "rabbitmq").mkdir()
    rabbit = start_rabbitmq(tmp_path / "rabbitmq", (tls_files.cert, tls_files.key, tls_files.ca))
    try:
        runs = by_mode(run_experiment(tmp_path / "run", "--url", rabbit.url))
    finally:
        stop_process(rabbit.proc, timeout=4)
    plain, confirm = runs["plain"], runs["confirm"]
    check_faults_fired(confirm)
    assert confirm["failed"] == 0, confirm["retry_errors"]
    assert confirm["confirmed"] == N
    assert confirm["lost"] == 0, confirm["lost_ids"]
    assert confirm["executed"] == N
    # The same faults cost tasks without confirms, against RabbitMQ too.
    check_faults_fired(plain)
    assert plain["lost"] > 0, plain
