#!/usr/bin/env python3
"""The confirm_publish experiment: Celery tasks published through a load balancer that resets
connections, once without publisher confirms and once with, counting what the worker executed.

By default it starts everything itself on free loopback ports: a warren-broker, a warren-lb in
front of it (a new one per run, same seed, so both runs face the same fault schedule), and a
Celery worker. The producer publishes through the load balancer; the worker consumes straight
from the broker, so that what is measured is producer-side loss only (a consumer behind a
resetting balancer has problems of its own: unacked deliveries come back, prefetched tasks are
dropped by the worker). With --url, the broker is yours (RabbitMQ, say) and the balancer still
goes in front of it for the producer.

The load balancer resets connections two ways, both discarding the bytes it holds
(in_flight = "drop"): right after every connection's Kth basic.publish (--nth), and all live
connections every --reset-every. Per run it reports:

  sent        tasks handed to send_task
  confirmed   send_task returned after the broker's publisher confirm (confirm run only)
  executed    distinct task ids the worker ran
  lost        send_task returned normally, yet the task never ran: silent loss
  duplicated  executions beyond the first of a task id (kombu republishes a task whose confirm
              did not arrive, although the broker may have it: at-least-once)
  failed      send_task raised (retries exhausted): the application knows

Progress is printed once a second; the summary is a table, plus a self-contained HTML chart (per
run, on one shared scale: publishes, executions, resets as ticks, and the lost tasks as a cumulative
series marked at the reset that lost them) and, with --report, JSON.

examples/celery/experiment runs this in a virtualenv of its own, after building the binaries.

  python examples/celery/run_experiment.py                       # warren-broker behind warren-lb
  python examples/celery/run_experiment.py --n 2000 --report r.json --chart r.html
  python examples/celery/run_experiment.py --url amqp://guest:guest@127.0.0.1:5672//   # your broker
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

LISTENING_RE = re.compile(r"listening (proto|listener)=(\S+) addr=(\S+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
PUBLISH_RULE = "publish-window"
PERIODIC_RULE = "elb-periodic"
MODES = ("plain", "confirm")


# ---------------------------------------------------------------- processes


class Proc:
    """A child process in its own session, its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.name, self.args, self.log = name, args, log
        with open(log, "wb") as f:
            self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                          env=env, cwd=cwd, start_new_session=True)

    def text(self) -> str:
        return ANSI_RE.sub("", self.log.read_text("utf-8", "replace")) if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_for(self, what: str, pred, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred(self.text())
            if got:
                return got
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        state = f"exited with {self.popen.returncode}" if self.popen.poll() is not None else "timed out"
        raise SystemExit(f"{self.name} {state} before {what}; command: {' '.join(self.args)}\n{self.tail()}")

    def listening(self, want: set[str], timeout: float = 20) -> dict[str, str]:
        def found(text):
            got = {name: addr for _, name, addr in LISTENING_RE.findall(text)}
            return got if want <= got.keys() else None

        return self.wait_for(f"logging `listening ... addr=` for {sorted(want)}", found, timeout)

    def stop(self, timeout: float = 10) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            if self.popen.poll() is not None:
                return
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue


def find_bin_dir(explicit: str | None, need: list[str]) -> Path:
    candidates = [Path(explicit)] if explicit else [REPO / "target" / "release", REPO / "target" / "debug"]
    for d in candidates:
        if all((d / b).is_file() and os.access(d / b, os.X_OK) for b in need):
            return d
    raise SystemExit(f"{' and '.join(need)} not found in {' or '.join(map(str, candidates))}: "
                     f"build them (`cargo build --release`) or pass --bin-dir")


# ---------------------------------------------------------------- load balancer


LB_TOML = """\
# warren-lb for one run of the confirm_publish experiment (written by run_experiment.py).
[admin]
listen = "127.0.0.1:0"

[chaos]
seed = {seed}

[[listener]]
name = "amqp"
bind = "127.0.0.1:0"
backends = ["{backend}"]
drain_timeout = "1s"

[[listener.fault]]
name = "{publish_rule}"
kind = "reset"
on_amqp = "basic.publish"          # right after a publish's method frame reaches the broker
nth = {nth}                        # ... the Kth one of every connection
direction = "upstream"
style = "rst"
in_flight = "drop"                 # its content frames, already read by the proxy, are discarded

[[listener.fault]]
name = "{periodic_rule}"
kind = "reset"
every = "{every}"                  # every live connection, ELB style
style = "rst"
in_flight = "drop"
"""


class LbEvents:
    """A running warren-lb seen through its admin API (`admin`, host:port): every event it reports
    from the moment this is made (GET /events?follow=1, in a thread), and its metrics."""

    def __init__(self, admin: str):
        self.admin = admin
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._follower = threading.Thread(target=self._follow, daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        """Collects every event from GET /events?follow=1 until the balancer exits."""
        host, port = self.admin.rsplit(":", 1)
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=None)
            c.request("GET", "/events?follow=1")
            r = c.getresponse()
            while True:
                line = r.readline()
                if not line:
                    return
                line = line.strip()
                if line:
                    with self._lock:
                        self.events.append(json.loads(line))
        except (OSError, http.client.HTTPException, ValueError):
            return

    def resets(self) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e.get("event") == "reset"]

    def get(self, path: str) -> str:
        host, port = self.admin.rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request("GET", path)
        body = c.getresponse().read().decode()
        c.close()
        return body

    def faults_metric(self) -> dict[str, float]:
        """warren_lb_faults_total per rule, from /metrics."""
        out: dict[str, float] = {}
        for line in self.get("/metrics").splitlines():
            if line.startswith("warren_lb_faults_total{"):
                m = re.search(r'rule="([^"]*)"', line)
                if m:
                    out[m.group(1)] = out.get(m.group(1), 0) + float(line.rsplit(" ", 1)[1])
        return out



class LoadBalancer(LbEvents):
    """A warren-lb of the experiment's own, with its fault rules."""

    def __init__(self, bin_dir: Path, workdir: Path, tag: str, backend: str, nth: int, every: str, seed: int):
        self.config = workdir / f"lb-{tag}.toml"
        self.config.write_text(LB_TOML.format(seed=seed, backend=backend, nth=nth, every=every,
                                              publish_rule=PUBLISH_RULE, periodic_rule=PERIODIC_RULE))
        self.proc = Proc(f"warren-lb ({tag})", [str(bin_dir / "warren-lb"), "--config", str(self.config)],
                         workdir / f"lb-{tag}.log")
        found = self.proc.listening({"amqp", "admin"})
        self.addr = found["amqp"]
        super().__init__(found["admin"])

    def stop(self) -> None:
        self.proc.stop()
        self._follower.join(5)


# ---------------------------------------------------------------- the experiment


def start_worker(broker_url: str, queue: str, executions: Path, hostname: str, workdir: Path,
                 procs: list[Proc]) -> Proc:
    """A Celery worker (tasks.py, solo pool) consuming `queue` from `broker_url`, recording into
    `executions`, its log workdir/worker.log; added to `procs` (to be stopped) and ready."""
    env = dict(os.environ, WARREN_EXPERIMENT_BROKER=broker_url, WARREN_EXPERIMENT_QUEUE=queue,
               WARREN_EXPERIMENT_LOG=str(executions), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = Proc("celery worker", [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=solo",
                                    "-Q", queue, "-n", hostname, "--loglevel=INFO", "--without-gossip",
                                    "--without-mingle", "--without-heartbeat"],
                  workdir / "worker.log", env=env, cwd=HERE)
    procs.append(worker)
    worker.wait_for("the worker became ready", lambda t: f"{hostname} ready." in t, 60)
    return worker



def with_hostport(url: str, hostport: str) -> str:
    u = urllib.parse.urlsplit(url)
    creds = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
    return urllib.parse.urlunsplit((u.scheme, creds + hostport, u.path, u.query, u.fragment))


def backend_of(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("amqp", "pyamqp"):
        raise SystemExit(f"--url {url}: only plain amqp:// URLs (the balancer proxies TCP; TLS would need backend_tls)")
    return f"{u.hostname or '127.0.0.1'}:{u.port or 5672}"


def redact(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def read_executions(path: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.setdefault(parts[0], []).append(float(parts[1]))
    return out


class Progress:
    """One line per second on stderr (a rewritten line on a terminal)."""

    def __init__(self, label: str):
        self.label, self.t0, self.next = label, time.monotonic(), time.monotonic() + 1
        self.tty = sys.stderr.isatty()

    def maybe(self, text_fn, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next:
            return
        self.next = now + 1
        line = f"[{self.label:7}] {now - self.t0:5.1f}s  {text_fn()}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line + ("\n" if force else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


@dataclass
class Run:
    mode: str
    n: int
    started: float = 0.0
    finished: float = 0.0
    publishes: list[float] = field(default_factory=list)  # when send_task returned
    accepted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the first few, with their messages


def publish_run(mode: str, args, lb: LoadBalancer, queue: str, tag: str) -> Run:
    def resets():
        r = lb.resets()
        return f"resets {len(r)} ({sum(1 for e in r if e.get('rule') == PUBLISH_RULE)} after a publish)"

    return publish_tasks(Run(mode=mode, n=args.n), with_hostport(args.broker_url, lb.addr), queue, tag,
                         args.rate, resets)


def publish_tasks(run: Run, producer_url: str, queue: str, tag: str, rate: float, more_status) -> Run:
    """Publishes run.n `tasks.record` tasks through `producer_url` at `rate` a second (0: as fast
    as it goes), with confirm_publish when run.mode is "confirm", task ids `<tag>-<mode>-<i>`;
    records in `run` when each send_task returned or that it raised. A progress line a second ends
    with more_status()."""
    from tasks import make_app

    mode = run.mode

    def on_retry(exc, interval):
        run.retries += 1
        name = type(exc).__name__
        run.errors[name] = run.errors.get(name, 0) + 1

    app = make_app(producer_url, queue, confirm_publish=(mode == "confirm"), retry_errback=on_retry)
    progress = Progress(mode)

    def status():
        conf = len(run.accepted) if mode == "confirm" else 0
        return (f"sent {len(run.accepted) + len(run.failed)}/{run.n}  confirmed {conf}  failed {len(run.failed)}  "
                f"retries {run.retries}  {more_status()}")

    interval = 1.0 / rate if rate > 0 else 0.0
    run.started = time.time()
    t0 = time.monotonic()
    for i in range(run.n):
        if interval:
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        task_id = f"{tag}-{mode}-{i:07d}"
        try:
            app.send_task("tasks.record", args=(i,), task_id=task_id, queue=queue)
            run.accepted.append(task_id)
            run.publishes.append(time.time())
        except Exception as exc:  # retries exhausted, or an error not worth retrying: the caller is told
            run.failed.append(task_id)
            name = type(exc).__name__
            run.errors[name] = run.errors.get(name, 0) + 1
            if len(run.failures) < 10:
                run.failures.append(f"{task_id}: {name}: {exc}")
        progress.maybe(status)
    run.finished = time.time()
    progress.maybe(status, force=True)
    app.close()  # closes the producer pool's connection cleanly (connection.close through the balancer)
    return run


def wait_for_worker(args, queue: str, tag: str, mode: str, executions: Path, worker: Proc) -> None:
    """Publishes a sentinel task straight to the broker, with a confirm, and waits until the
    worker ran it. The queue is FIFO and the solo worker runs tasks in delivery order, so by then
    every task the broker stored before it has run."""
    from tasks import make_app

    time.sleep(0.2)  # bytes a reset connection already handed over reach the broker's queue first
    sentinel = f"{tag}-{mode}-sentinel"
    app = make_app(args.broker_url, queue, confirm_publish=True)
    app.send_task("tasks.record", args=(-1,), task_id=sentinel, queue=queue)
    app.close()
    progress = Progress(mode)
    deadline = time.monotonic() + args.drain_timeout
    while time.monotonic() < deadline:
        done = read_executions(executions)
        if sentinel in done:
            return
        if worker.popen.poll() is not None:
            raise SystemExit(f"the celery worker exited with {worker.popen.returncode}:\n{worker.tail()}")
        progress.maybe(lambda: f"waiting for the worker: executed {sum(1 for k in done if k.startswith(f'{tag}-{mode}-'))}")
        time.sleep(0.1)
    raise SystemExit(f"the worker did not run the {mode} sentinel within {args.drain_timeout}s:\n{worker.tail()}")


def summarize(run: Run, lb: LoadBalancer, metric: dict[str, float], executions: dict[str, list[float]],
              tag: str) -> dict:
    resets = lb.resets()
    out, lost_at = run_counts(run, executions, tag, resets)
    by_rule: dict[str, int] = {}
    for e in resets:
        by_rule[e.get("rule") or "admin"] = by_rule.get(e.get("rule") or "admin", 0) + 1
    out.update({
        "resets_by_rule": by_rule,
        "faults_metric": metric,
        "discarded_upstream_bytes": sum(e.get("discarded_upstream", 0) for e in resets),
        "discarded_downstream_bytes": sum(e.get("discarded_downstream", 0) for e in resets),
    })
    out["timeline"]["lost"] = attribute_losses(lost_at, out["timeline"]["resets"])
    return out


def event_time(e: dict) -> float:
    """A balancer event's time (its `ts`), as a unix time."""
    return dt.datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()


def run_counts(run: Run, executions: dict[str, list[float]], tag: str, resets: list[dict]) -> tuple[dict, list[float]]:
    """What a run's report says whatever the faults were: the counts (sent, confirmed, executed
    from the worker's records, lost, duplicated, failed, ...) and the timeline (publishes,
    confirms, first executions and the balancer's `resets`, in seconds since the run started).
    Also returns when each lost task's send_task returned (same clock), to charge it to a fault."""
    prefix = f"{tag}-{run.mode}-"
    ran = {k: v for k, v in executions.items() if k.startswith(prefix) and not k.endswith("-sentinel")}
    lost = [t for t in run.accepted if t not in ran]
    published_at = dict(zip(run.accepted, run.publishes))

    def rel(t: float) -> float:
        return round(t - run.started, 4)

    return {
        "mode": run.mode,
        "confirm_publish": run.mode == "confirm",
        "sent": run.n,
        "confirmed": len(run.accepted) if run.mode == "confirm" else 0,
        "accepted": len(run.accepted),
        "executed": len(ran),
        "lost": len(lost),
        "duplicated": sum(len(v) - 1 for v in ran.values()),
        "failed": len(run.failed),
        "publish_retries": run.retries,
        "retry_errors": run.errors,
        "failures": run.failures,
        "duration_s": round(run.finished - run.started, 3),
        "resets": len(resets),
        "lost_ids": lost[:50],
        "timeline": {
            "publishes": [rel(t) for t in run.publishes],
            "confirms": [rel(t) for t in run.publishes] if run.mode == "confirm" else [],
            "executions": sorted(rel(v[0]) for v in ran.values()),
            "resets": [{"t": rel(event_time(e)), "rule": e.get("rule"), "cause": e.get("cause"),
                        "discarded_upstream": e.get("discarded_upstream", 0),
                        "discarded_downstream": e.get("discarded_downstream", 0)} for e in resets],
        },
    }, [rel(published_at[t]) for t in lost]


def attribute_losses(lost_times: list[float], resets: list[dict], slack: float = 0.05) -> list[dict]:
    """Which reset lost which task: each lost task goes to the first reset at or after the moment
    its send_task returned (its bytes were still in flight when the connection died), or, when no
    reset follows, to the last one before it. `slack` allows for the two clocks (the balancer's
    event time and the producer's) reading a few milliseconds apart. Returns one entry per reset
    that lost tasks, in time order: its time, rule, tasks lost and the running total."""
    times = sorted(r["t"] for r in resets)
    by_reset: dict[int, int] = {}
    for t in lost_times:
        i = next((k for k, rt in enumerate(times) if rt >= t - slack), len(times) - 1)
        if i >= 0:
            by_reset[i] = by_reset.get(i, 0) + 1
    rule_at = {r["t"]: r.get("rule") for r in resets}
    out, total = [], 0
    for i in sorted(by_reset):
        total += by_reset[i]
        out.append({"t": times[i], "rule": rule_at.get(times[i]), "lost": by_reset[i], "total": total})
    if not times and lost_times:  # no reset seen at all: the losses still show, at their publish times
        for k, t in enumerate(sorted(lost_times), 1):
            out.append({"t": t, "rule": None, "lost": 1, "total": k})
    return out


# ---------------------------------------------------------------- reports

COLUMNS = [("run", "mode"), ("sent", "sent"), ("confirmed", "confirmed"), ("executed", "executed"),
           ("lost", "lost"), ("duplicated", "duplicated"), ("failed", "failed"),
           ("resets", "resets"), ("publish cuts", "cuts"), ("retries", "publish_retries")]


def table_rows(runs: list[dict], columns: list[tuple[str, str]] = COLUMNS) -> list[list[str]]:
    rows = []
    for r in runs:
        cells = []
        for _, key in columns:
            if key == "mode":
                v = "confirm_publish" if r["mode"] == "confirm" else "no confirms"
            elif key == "confirmed" and r["mode"] != "confirm":
                v = "-"
            elif key == "cuts":
                v = r["resets_by_rule"].get(PUBLISH_RULE, 0)
            else:
                v = r[key]
            cells.append(str(v))
        rows.append(cells)
    return rows


def table(runs: list[dict], columns: list[tuple[str, str]] = COLUMNS) -> str:
    head = [c for c, _ in columns]
    rows = table_rows(runs, columns)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


CHART_W, CHART_LEFT, CHART_RIGHT = 1000, 64, 16


def chart_scale(runs: list[dict]) -> dict:
    """One scale for every run's panel: the same seconds across, the same task counts up, the same
    lost-task counts, so that the runs compare at a glance."""
    tmax = 0.001
    for r in runs:
        tl = r["timeline"]
        tmax = max([tmax, r["duration_s"]] + tl["publishes"][-1:] + tl["executions"][-1:]
                   + [x["t"] for x in tl["resets"]] + [x["t"] for x in tl.get("lost", [])])
    return {"tmax": tmax, "tasks": max([1] + [r["sent"] for r in runs]),
            "lost": max([1] + [r["lost"] for r in runs])}


def svg_panel(r: dict, scale: dict, lost_legend: str = "lost (cumulative; dot: the reset that lost them)") -> str:
    """One run: tasks published and executed over time (top), resets as light ticks under it, and
    the cumulative lost tasks (bottom), stepping up at the reset that lost them, with a dot there
    (its tooltip: the entry's `what`, default "the reset by <rule>"). Marks in timeline["marks"]
    ({"t", "label", "kind"}: a node killed, say) are dashed lines across the task plot, labelled.
    Full width: the SVG scales with the page (viewBox, width 100%)."""
    tl = r["timeline"]
    mode = r["mode"]
    w, left, right = CHART_W, CHART_LEFT, CHART_RIGHT
    top, tasks_h, ticks_h, gap, lost_h, bottom = 14, 170, 14, 26, 90, 34
    height = top + tasks_h + ticks_h + gap + lost_h + bottom
    pw = w - left - right
    tmax, ymax, lmax = scale["tmax"], scale["tasks"], scale["lost"]
    ticks_y = top + tasks_h
    lost_top = ticks_y + ticks_h + gap
    x = lambda t: left + pw * min(max(t, 0), tmax) / tmax  # noqa: E731
    y = lambda n: top + tasks_h - tasks_h * n / ymax  # noqa: E731
    ly = lambda n: lost_top + lost_h - lost_h * n / lmax  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="run" data-mode="{mode}" width="100%" '
           f'viewBox="0 0 {w} {height}" preserveAspectRatio="xMidYMid meet" font-family="sans-serif" '
           f'font-size="12">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{tasks_h}" fill="#fafafa" stroke="#ccc"/>',
           f'<rect x="{left}" y="{lost_top}" width="{pw}" height="{lost_h}" fill="#fff5f5" stroke="#e0b4b4"/>']
    for i in range(6):
        t = tmax * i / 5
        out.append(f'<line x1="{x(t):.1f}" y1="{lost_top + lost_h}" x2="{x(t):.1f}" y2="{lost_top + lost_h + 4}" '
                   f'stroke="#666"/><text x="{x(t):.1f}" y="{lost_top + lost_h + 17}" text-anchor="middle">'
                   f'{t:.1f}s</text>')
        n = ymax * i / 5
        out.append(f'<line x1="{left - 4}" y1="{y(n):.1f}" x2="{left + pw}" y2="{y(n):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{y(n) + 4:.1f}" text-anchor="end">{n:.0f}</text>')
    for n in sorted({0, lmax // 2, lmax}):
        out.append(f'<line x1="{left - 4}" y1="{ly(n):.1f}" x2="{left + pw}" y2="{ly(n):.1f}" stroke="#f3dede"/>'
                   f'<text x="{left - 6}" y="{ly(n) + 4:.1f}" text-anchor="end">{n}</text>')
    out.append(f'<text x="{left - 48}" y="{top + tasks_h / 2:.0f}" transform="rotate(-90 {left - 48} '
               f'{top + tasks_h / 2:.0f})" text-anchor="middle">tasks</text>'
               f'<text x="{left - 48}" y="{lost_top + lost_h / 2:.0f}" transform="rotate(-90 {left - 48} '
               f'{lost_top + lost_h / 2:.0f})" text-anchor="middle" fill="#b00">lost</text>')

    # Resets: a light tick each, under the task plot (after a publish: red, periodic: orange).
    colors = {PUBLISH_RULE: "#d62728", PERIODIC_RULE: "#ff7f0e"}
    for e in tl["resets"]:
        c = colors.get(e["rule"], "#9467bd")
        title = html.escape(f'{e["t"]:.3f}s {e["rule"]} ({e["cause"]}): discarded {e["discarded_upstream"]} B up, '
                            f'{e["discarded_downstream"]} B down')
        out.append(f'<line class="reset" x1="{x(e["t"]):.1f}" y1="{ticks_y + 2}" x2="{x(e["t"]):.1f}" '
                   f'y2="{ticks_y + ticks_h - 2}" stroke="{c}" stroke-opacity="0.4" stroke-width="1.5">'
                   f'<title>{title}</title></line>')

    # Marks: a dashed line across the task plot each, its label at the top, one row per kind.
    mark_style = {"kill": ("#8b0000", 1), "failover": ("#6a3d9a", 2), "start": ("#2a7a2a", 3),
                  "start-failed": ("#000", 3)}
    for m in tl.get("marks", []):
        c, row = mark_style.get(m.get("kind"), ("#555", 1))
        mx, label, kind = x(m["t"]), html.escape(m["label"]), html.escape(m.get("kind", ""))
        out.append(f'<line class="mark" data-kind="{kind}" x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{ticks_y}" '
                   f'stroke="{c}" stroke-width="1.5" stroke-dasharray="4 3"><title>{m["t"]:.3f}s {label}</title></line>'
                   f'<text x="{mx + 3:.1f}" y="{top + 12 * row}" fill="{c}" font-size="11">{label}</text>')

    def curve(times: list[float], color: str, dash: str = "", width: float = 2, cls: str = "") -> str:
        if not times:
            return ""
        step = max(1, len(times) // 400)  # at most ~400 points per curve
        pts = [f"{x(0):.1f},{y(0):.1f}"]
        for i in range(0, len(times), step):
            pts.append(f"{x(times[i]):.1f},{y(i + 1):.1f}")
        pts.append(f"{x(times[-1]):.1f},{y(len(times)):.1f}")
        d = f' stroke-dasharray="{dash}"' if dash else ""
        c = f' class="{cls}"' if cls else ""
        return f'<polyline{c} fill="none" stroke="{color}" stroke-width="{width}"{d} points="{" ".join(pts)}"/>'

    # With confirm_publish, send_task returns after the confirm: published and confirmed are one line.
    published = "published = confirmed (send_task returned after the ack)" if mode == "confirm" \
        else "published (send_task returned; no confirm)"
    out.append(curve(tl["publishes"], "#1f77b4", width=3, cls="published"))
    out.append(curve(tl["executions"], "#2ca02c", "7 4", cls="executed"))

    # The lost series: cumulative lost tasks, a step at each reset that lost some, dotted there.
    lost = tl.get("lost", [])
    pts, total = [f"{x(0):.1f},{ly(0):.1f}"], 0
    for e in lost:
        pts.append(f"{x(e['t']):.1f},{ly(total):.1f}")
        total = e["total"]
        pts.append(f"{x(e['t']):.1f},{ly(total):.1f}")
    pts.append(f"{x(tmax):.1f},{ly(total):.1f}")
    out.append(f'<polyline class="lost" data-lost="{r["lost"]}" fill="none" stroke="#b00" stroke-width="3" '
               f'points="{" ".join(pts)}"/>')
    for e in lost:
        what = e.get("what") or f'the reset by {e["rule"] or "?"}'
        title = html.escape(f'{e["t"]:.3f}s: {what} lost {e["lost"]} '
                            f'task{"s" if e["lost"] != 1 else ""} ({e["total"]} so far)')
        out.append(f'<circle class="lost-at-reset" cx="{x(e["t"]):.1f}" cy="{ly(e["total"]):.1f}" r="4" '
                   f'fill="#b00"><title>{title}</title></circle>'
                   f'<line x1="{x(e["t"]):.1f}" y1="{ticks_y + ticks_h}" x2="{x(e["t"]):.1f}" '
                   f'y2="{ly(e["total"]):.1f}" stroke="#b00" stroke-opacity="0.25"/>')
    verdict = f'{r["lost"]} lost' if r["lost"] else "none lost"
    out.append(f'<text class="verdict" x="{left + pw - 8}" y="{lost_top + 22}" text-anchor="end" '
               f'font-size="18" font-weight="bold" fill="{"#b00" if r["lost"] else "#2a7a2a"}">{verdict}</text>')

    legend = [("#1f77b4", published, "", 3), ("#2ca02c", "executed (first run of each task)", "7 4", 2),
              ("#b00", lost_legend, "", 3)]
    lx = left + 10
    for i, (c, label, dash, sw) in enumerate(legend):
        ly_ = top + 16 + 15 * i
        d = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{lx}" y1="{ly_ - 4}" x2="{lx + 22}" y2="{ly_ - 4}" stroke="{c}" stroke-width="{sw}"{d}/>'
                   f'<text x="{lx + 28}" y="{ly_}">{html.escape(label)}</text>')
    ly_ = top + 16 + 15 * len(legend)
    out.append(f'<line x1="{lx + 4}" y1="{ly_ - 9}" x2="{lx + 4}" y2="{ly_ + 1}" stroke="#d62728" stroke-opacity="0.5"/>'
               f'<line x1="{lx + 12}" y1="{ly_ - 9}" x2="{lx + 12}" y2="{ly_ + 1}" stroke="#ff7f0e" stroke-opacity="0.5"/>'
               f'<text x="{lx + 28}" y="{ly_}">resets (ticks below: red after a basic.publish, orange periodic)</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">seconds since the run\'s first '
               f'publish (same scale for both runs)</text>')
    out.append("</svg>")
    return "\n".join(out)


def html_report(report: dict) -> str:
    cfg = report["config"]
    intro = (f"{cfg['n']} tasks per run to {html.escape(cfg['broker'])} through warren-lb: reset right after each\n"
             f"connection's {cfg['nth']}th <code>basic.publish</code> and every {html.escape(cfg['reset_every'])}\n"
             f"(<code>in_flight = \"drop\"</code>), seed {cfg['seed']}, "
             f"{html.escape(str(cfg['rate'] or 'unlimited'))} publishes/s.")
    return html_page("confirm_publish experiment", "Celery tasks through a resetting load balancer", intro, report)


def html_page(title: str, heading: str, intro: str, report: dict, columns: list[tuple[str, str]] = COLUMNS,
              heading_of=lambda r: f"{r['lost']} lost, {r['duplicated']} duplicated", **panel) -> str:
    """The self-contained page: a heading, `intro` (HTML), the table of report["runs"] in
    `columns`, and a panel per run (svg_panel with `panel`'s keywords), all on one scale."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in table_rows(report["runs"], columns))
    panels = []
    scale = chart_scale(report["runs"])
    for r in report["runs"]:
        name = "with confirm_publish" if r["mode"] == "confirm" else "without publisher confirms"
        panels.append(f"<h2>{name}: {html.escape(heading_of(r))}</h2>\n{svg_panel(r, scale, **panel)}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}
svg.run{{display:block;width:100%;height:auto}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child{{text-align:left}}
code{{background:#f3f3f3;padding:1px 4px}}</style></head><body>
<h1>{html.escape(heading)}</h1>
<p>{intro}
Started {html.escape(report['started'])}. Command: <code>{html.escape(report['command'])}</code></p>
<table><tr>{head}</tr>{rows}</table>
{''.join(panels)}
</body></html>
"""


# ---------------------------------------------------------------- main


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="tasks per run (default 1000)")
    p.add_argument("--url", help="broker URL (amqp://user:pass@host:port/vhost); default: start a warren-broker")
    p.add_argument("--bin-dir", help="where warren-broker and warren-lb are (default target/release, then target/debug)")
    p.add_argument("--nth", type=int, default=40, help="reset each connection right after its Nth basic.publish (default 40)")
    p.add_argument("--reset-every", default="1s", help="reset every live connection this often (default 1s)")
    p.add_argument("--rate", type=float, default=400, help="publishes per second, 0 = unlimited (default 400)")
    p.add_argument("--seed", type=int, default=1, help="the balancer's chaos seed (default 1)")
    p.add_argument("--modes", default="plain,confirm", help="runs, in order (default plain,confirm)")
    p.add_argument("--report", help="write the results as JSON here")
    p.add_argument("--chart", default="confirm-experiment.html", help="HTML chart (default confirm-experiment.html)")
    p.add_argument("--workdir", help="keep logs and configs here (default: a temporary directory, removed)")
    p.add_argument("--drain-timeout", type=float, default=120, help="seconds to wait for the worker to catch up")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the finally blocks stop the broker, balancer and worker.
    signal.signal(signal.SIGTERM, _interrupt)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="warren-experiment-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bin_dir = find_bin_dir(args.bin_dir, ["warren-lb"] if args.url else ["warren-broker", "warren-lb"])
    tag = uuid.uuid4().hex[:8]
    queue = f"warren-experiment-{tag}"
    executions = workdir / "executions.log"
    procs: list[Proc] = []
    try:
        if args.url:
            args.broker_url = args.url
            broker_label = redact(args.url)
        else:
            data = workdir / "broker-data"
            data.mkdir(exist_ok=True)
            broker = Proc("warren-broker", [str(bin_dir / "warren-broker"), "--amqp", "127.0.0.1:0",
                                            "--data-dir", str(data)], workdir / "broker.log")
            procs.append(broker)
            addr = broker.listening({"amqp"})["amqp"]
            args.broker_url = f"amqp://guest:guest@{addr}//"
            broker_label = f"warren-broker ({bin_dir / 'warren-broker'}) on {addr}"
        backend = backend_of(args.broker_url)
        print(f"broker: {broker_label}; binaries: {bin_dir}; logs: {workdir}", file=sys.stderr)

        worker = start_worker(args.broker_url, queue, executions, f"experiment-{tag}@localhost", workdir, procs)
        print(f"worker: consumes {queue} straight from the broker", file=sys.stderr)

        runs = []
        for mode in modes:
            lb = LoadBalancer(bin_dir, workdir, mode, backend, args.nth, args.reset_every, args.seed)
            try:
                run = publish_run(mode, args, lb, queue, tag)
                wait_for_worker(args, queue, tag, mode, executions, worker)
                time.sleep(0.2)  # the last events reach the follower
                metric = lb.faults_metric()
                runs.append(summarize(run, lb, metric, read_executions(executions), tag))
            finally:
                lb.stop()
    finally:
        for proc in reversed(procs):
            proc.stop()

    report = {
        "started": started,
        "command": redact(" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))),
        "config": {"n": args.n, "broker": broker_label, "nth": args.nth, "reset_every": args.reset_every,
                   "rate": args.rate, "seed": args.seed, "queue": queue},
        "runs": runs,
    }
    print()
    print(table(runs))
    return finish(args, report, html_report, workdir)


def finish(args, report: dict, page, workdir: Path) -> int:
    """The summary's last lines: the chart (page(report), HTML) at --chart, the JSON at --report;
    the work dir removed unless --workdir named it."""
    print("\nlost: the task's send_task returned, yet it never ran. duplicated: extra runs of a task id.")
    if args.chart:
        Path(args.chart).write_text(page(report))
        print(f"chart: {args.chart}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
        print(f"report: {args.report}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def cli(main, stopped: str) -> None:
    """Runs main() as the program: its exit status, or 130 after Ctrl-C (or SIGTERM, see
    _interrupt) once its finally blocks stopped `stopped`."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"interrupted: {stopped} stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli(main, "broker, balancer and worker")
