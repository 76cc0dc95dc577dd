"""The failover demo (examples/celery/failover_demo.py) end to end: it starts warren-up (3 nodes,
ha-all, warren-lb in front with the ELB's resets) on free ports, a Celery worker consuming through
the front AMQP port, and a producer publishing through it while the queue's master is killed
(`warren-up kill`) and started again, once without publisher confirms and once with
confirm_publish.

With confirms: nothing lost, every confirmed task ran, at least one failover, each killed node back
in sync. Without: the counts add up (sent = executed + lost, from the worker's records); loss is
likely but not certain (it takes the producer's connection to be on the killed node), so it is
printed, not asserted. warren only: the demo starts warren processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TARGET, warren_binary

pytestmark = pytest.mark.skipif(TARGET != "warren", reason="the demo starts warren-up")

DEMO = REPO / "examples" / "celery" / "failover_demo.py"
N = 800
RATE = 200  # 4 s of publishing per run: room for a kill/start cycle or two
KILLS = 2


def executions(work: Path) -> dict[str, int]:
    """Runs of each task id, from the worker's records (tasks.py: `<task id> <time>` a line)."""
    out: dict[str, int] = {}
    for line in (work / "executions.log").read_text().splitlines():
        tid = line.split()[0]
        out[tid] = out.get(tid, 0) + 1
    return out


@pytest.mark.timeout(150)
def test_the_failover_demo_loses_no_confirmed_task_while_masters_die(tmp_path):
    bin_dir = warren_binary().parent
    for b in ("warren-up", "warren-broker", "warren-lb"):
        if not (bin_dir / b).is_file():
            pytest.fail(f"{bin_dir / b} is missing: build the binaries first (`cargo build --bins`)", pytrace=False)
    work, report, chart = tmp_path / "work", tmp_path / "report.json", tmp_path / "chart.html"
    cmd = [sys.executable, str(DEMO), "--bin-dir", str(bin_dir), "--n", str(N), "--rate", str(RATE),
           "--kills", str(KILLS), "--down", "1", "--failure-detection-ms", "1000", "--workdir", str(work),
           "--report", str(report), "--chart", str(chart)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo stops warren-up and the worker on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the demo did not finish within 120 s\nstdout:\n{stdout}\nstderr:\n{stderr}", pytrace=False)
    logs = "\n".join(f"--- {p}\n{p.read_text('utf-8', 'replace')[-2500:]}"
                     for p in sorted(work.rglob("*.log")) if p.name != "executions.log")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}\n{logs}"
    print(stdout)
    runs = {r["mode"]: r for r in json.loads(report.read_text())["runs"]}
    plain, confirm = runs["plain"], runs["confirm"]
    ran = executions(work)
    tag = json.loads(report.read_text())["config"]["queue"].rsplit("-", 1)[1]

    # With confirms: at least one master died and another took over; each killed node came back.
    assert confirm["kills"] >= 1 and confirm["failovers"] >= 1, confirm
    assert confirm["restart_failures"] == [], confirm["restart_failures"]
    assert confirm["restarted"] == confirm["kills"], confirm
    assert confirm["failed"] == 0, confirm["failures"]
    assert confirm["confirmed"] == N
    # ... and every confirmed task ran, by the worker's own records: none lost.
    confirmed_ids = [f"{tag}-confirm-{i:07d}" for i in range(N)]
    missing = [t for t in confirmed_ids if t not in ran]
    assert not missing, f"{len(missing)} confirmed tasks never ran: {missing[:10]}"
    assert confirm["lost"] == 0 and confirm["executed"] == N, confirm
    # Duplicates are allowed (at-least-once) and counted as the records show them.
    assert confirm["duplicated"] == sum(ran[t] - 1 for t in confirmed_ids)

    # Without confirms: the numbers add up, from the worker's records; loss is reported, not assumed.
    assert plain["kills"] >= 1, plain
    assert plain["failed"] == 0, plain["failures"]
    plain_ids = [f"{tag}-plain-{i:07d}" for i in range(N)]
    executed = sum(1 for t in plain_ids if t in ran)
    assert plain["sent"] == N and plain["executed"] == executed
    assert plain["sent"] == plain["executed"] + plain["lost"], plain
    assert plain["duplicated"] == sum(ran[t] - 1 for t in plain_ids if t in ran)
    # Nothing ran that was never sent.
    assert {t for t in ran if not t.endswith("-sentinel")} <= set(plain_ids) | set(confirmed_ids)

    # The table and the chart: a row per run, a panel per run with the kills marked.
    assert re.search(rf"^no confirms\s+{N}\s+-\s+{plain['executed']}\s+{plain['lost']}\s", stdout, re.M), stdout
    assert re.search(rf"^confirm_publish\s+{N}\s+{N}\s+{N}\s+0\s", stdout, re.M), stdout
    page = chart.read_text()
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(svgs) == 2 and "<script" not in page
    for svg, r in zip(svgs, (plain, confirm)):
        assert len(re.findall(r'<line class="mark" data-kind="kill"', svg)) == r["kills"], r["kills"]
        assert f'class="lost" data-lost="{r["lost"]}"' in svg
