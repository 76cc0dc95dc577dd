#!/usr/bin/env python3
"""The failover demo: Celery tasks published through warren-up's AMQP front while the master of
their queue is killed (kill -9) and started again, once with `confirm_publish` and once without.

  examples/celery/failover                          # starts warren-up itself, 2000 tasks per run
  examples/celery/failover --n 2000 --kills 3 --report r.json --chart r.html
  examples/celery/failover --data-dir DIR           # a warren-up you started: warren-up --data-dir DIR

By default it starts `warren-up` (3 nodes, ha-all, warren-lb in front with the ELB's periodic
resets) on free loopback ports and a temporary data dir, and stops it at the end; with --data-dir
it uses the warren-up running there (its state file, warren-up.json, says where the fronts are) and
leaves it running. A Celery worker consumes through the load balancer's AMQP port, as an
application would; the producer publishes --n tasks through the same port at --rate a second.
While it publishes, at evenly spaced task counts, the demo asks the management API (through the
front) which node is the queue's master (GET /api/queues/%2F/<queue>, `node`), runs
`warren-up kill <node>`, waits until another node is master (a failover), starts the node again
after --down seconds (`warren-up start <node>`) and waits until its mirror is in sync. Per run:

  sent        tasks handed to send_task
  confirmed   send_task returned after the broker's publisher confirm (confirm run only)
  executed    distinct task ids the worker ran (each task appends its id to a file)
  lost        send_task returned normally, yet the task never ran: silent loss
  duplicated  executions beyond the first of a task id (a republished or redelivered task)
  failed      send_task raised (retries exhausted): the application knows
  failovers   kills after which another node took over as the queue's master

Expected: with confirm_publish nothing is lost (duplicates allowed and counted: at-least-once).
Without confirms, tasks whose bytes were in flight to the killed node (or on their way to the dying
master) are lost when the kill lands while the producer publishes; how many depends on which node
the producer's connection happens to be on (the balancer picks round robin), so a run can also
lose none: the table says what happened. It prints the table and writes the experiment's HTML
chart (run_experiment.py's, with the kills, restarts and failovers marked; losses charged to the
kill or reset that followed their publish) and, with --report, JSON.

examples/celery/failover runs this in the experiment's virtualenv, after building warren-up,
warren-broker and warren-lb (release) unless --bin-dir is given.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_experiment import (MODES, LbEvents, Proc, Run, _interrupt, attribute_losses, cli, event_time, find_bin_dir,  # noqa: E402
                            finish, html_page, publish_tasks, read_executions, redact, run_counts, start_worker, table,
                            wait_for_worker)

COLUMNS = [("run", "mode"), ("sent", "sent"), ("confirmed", "confirmed"), ("executed", "executed"),
           ("lost", "lost"), ("duplicated", "duplicated"), ("failed", "failed"), ("kills", "kills"),
           ("failovers", "failovers"), ("restarted", "restarted"),
           ("resets", "resets"), ("retries", "publish_retries")]


# ---------------------------------------------------------------- warren-up


class Up:
    """A running warren-up, seen through its state file, its management front and its subcommands."""

    def __init__(self, binary: Path, data: Path, proc: Proc | None = None):
        self.binary, self.data, self.proc = binary, data, proc

    @property
    def state(self) -> dict:
        return json.loads((self.data / "warren-up.json").read_text())

    def ready(self) -> bool:
        try:
            return bool(self.state.get("ready"))
        except (OSError, ValueError):
            return False

    @property
    def queue_nodes(self) -> list[str]:
        """The nodes that hold queues (a witness holds none)."""
        return sorted(n for n in self.state["nodes"] if n != "witness")

    def ctl(self, verb: str, node: str) -> str:
        r = subprocess.run([str(self.binary), verb, node, "--data-dir", str(self.data)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"warren-up {verb} {node}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout.strip()

    def api(self, path: str, timeout: float = 5):
        req = urllib.request.Request(f"http://{self.state['lb']['mgmt']}{path}")
        req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def queue(self, name: str) -> dict | None:
        """GET /api/queues/%2F/<name> through the front; None while no node answers it (a node
        just killed that the balancer's health checks have not taken out yet)."""
        try:
            return self.api(f"/api/queues/%2F/{urllib.parse.quote(name, safe='')}")
        except (OSError, urllib.error.HTTPError, ValueError):
            return None

    def master(self, queue: str) -> str | None:
        q = self.queue(queue)
        return q["node"].split("@")[0] if q and q.get("node") else None

    def running(self) -> list[str]:
        """The queue nodes whose process runs (the state file keeps the pid of one that died)."""
        return [n for n in self.queue_nodes if alive(self.state["nodes"][n].get("pid"))]

    def in_sync(self, queue: str) -> bool:
        """The queue's master on a running node and an in-sync mirror on each other running one."""
        q = self.queue(queue)
        if not q or not q.get("node"):
            return False
        synced = {n.split("@")[0] for n in q.get("synchronised_slave_nodes") or []}
        return synced | {q["node"].split("@")[0]} >= set(self.running())

    def why_down(self, node: str) -> str:
        """The last line the node's process wrote that says why it stopped, if any."""
        log = self.data / f"{node}.log"
        lines = log.read_text("utf-8", "replace").splitlines() if log.exists() else []
        said = [ln for ln in lines if ln.startswith("warren-broker:")] or lines[-1:]
        return said[-1][:400] if said else f"see {log}"


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def start_up(binary: Path, workdir: Path, args) -> Up:
    data = workdir / "up"
    cmd = [str(binary), "--data-dir", str(data), "--nodes", str(args.nodes), "--amqp", "127.0.0.1:0",
           "--mgmt", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--chaos", args.chaos, "--status-interval", "1"]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    if args.failure_detection_ms:
        cmd += ["--failure-detection-ms", str(args.failure_detection_ms)]
    up = Up(binary, data, Proc("warren-up", cmd, workdir / "warren-up.log"))
    up.proc.wait_for("it wrote warren-up.json with ready: true", lambda _: up.ready(), 120)
    return up


def wait(what: str, pred, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting until {what}")


# ---------------------------------------------------------------- the kills


class Killer(threading.Thread):
    """Kills the queue's master at each of `at` (task counts of `run`) while the producer
    publishes, waits for the failover, starts the node again after `down` seconds and waits
    until its mirror is in sync. A kill comes no earlier than its task count, and never before the
    previous node is back in sync; counts the producer never reaches are not killed at."""

    def __init__(self, up: Up, queue: str, run: Run, at: list[int], down: float, done: threading.Event):
        super().__init__(daemon=True)
        self.up, self.queue, self.tasks, self.at, self.down, self.done = up, queue, run, at, down, done
        self.marks: list[dict] = []   # {"t" (unix), "label", "kind", "node"}
        self.failover_ms: list[float] = []
        self.kills = 0
        self.restarted = 0
        self.restart_failures: list[str] = []  # "<node>: why", when a started node exited again
        self.master: str | None = None
        self.error: str | None = None

    def sent(self) -> int:
        return len(self.tasks.accepted) + len(self.tasks.failed)

    def mark(self, kind: str, node: str, label: str) -> None:
        self.marks.append({"t": time.time(), "kind": kind, "node": node, "label": label})

    def run(self) -> None:  # noqa: D401 (threading.Thread's)
        try:
            for count in self.at:
                while self.sent() < count and not self.done.is_set():
                    time.sleep(0.01)
                if self.done.is_set() or self.restart_failures:
                    return  # a node stays down: another kill could take the cluster's majority
                self.cycle()
        except BaseException as exc:  # reported by the main thread
            self.error = f"{type(exc).__name__}: {exc}"

    def cycle(self) -> None:
        victim = wait("the management API names the queue's master", lambda: self.up.master(self.queue), 30)
        t_kill = time.monotonic()
        self.up.ctl("kill", victim)
        self.kills += 1
        self.mark("kill", victim, f"kill {victim}")
        new = wait(f"another node than {victim} is the master",
                   lambda: (m := self.up.master(self.queue)) and m != victim and m, 60, step=0.02)
        self.failover_ms.append(round((time.monotonic() - t_kill) * 1000))
        self.master = new
        self.mark("failover", new, f"{new} master")
        pause = t_kill + self.down - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        self.up.ctl("start", victim)
        self.mark("start", victim, f"start {victim}")

        def back():
            if victim not in self.up.running():
                return "exited"
            return self.up.in_sync(self.queue) and "in sync"
        time.sleep(0.5)  # a node that cannot start exits within this
        if wait(f"{victim} is back with an in-sync mirror", back, 120, step=0.1) == "exited":
            self.restart_failures.append(f"{victim}: {self.up.why_down(victim)}")
            self.mark("start-failed", victim, f"{victim} did not start")
        else:
            self.restarted += 1


# ---------------------------------------------------------------- one run


def kill_points(n: int, kills: int) -> list[int]:
    """Task counts to kill at: evenly spaced inside the run, never at its very start or end."""
    return [max(1, round(n * k / (kills + 1))) for k in range(1, kills + 1)]


def one_run(mode: str, args, up: Up, lb: LbEvents, queue: str, tag: str, executions: Path, worker: Proc) -> dict:
    down = sorted(set(up.queue_nodes) - set(up.running()))
    wait(f"the queue {queue} has an in-sync mirror on every running node", lambda: up.in_sync(queue), 120, step=0.2)
    at = kill_points(args.n, args.kills)
    if down:
        print(f"{mode}: {', '.join(down)} down: no kills this run (another could take the cluster's majority)",
              file=sys.stderr)
        at = []
    run = Run(mode=mode, n=args.n)
    done = threading.Event()
    killer = Killer(up, queue, run, at, args.down, done)
    killer.start()

    def status():
        return f"kills {killer.kills}  failovers {len(killer.failover_ms)}  master {killer.master or '?'}"

    try:
        publish_tasks(run, args.broker_url, queue, tag, args.rate, status)
    finally:
        done.set()
        killer.join(180)
    if killer.error:
        raise SystemExit(f"the {mode} run's kills went wrong: {killer.error}")
    wait_for_worker(args, queue, tag, mode, executions, worker)
    # Redelivered or republished copies may sit behind the sentinel: the queue empties, the count settles.
    last = [-1, time.monotonic()]

    def settled():
        q = up.queue(queue) or {}
        n = sum(len(v) for v in read_executions(executions).values())
        if n != last[0]:
            last[:] = [n, time.monotonic()]
        return (q.get("messages", 1) == 0 and q.get("messages_unacknowledged", 1) == 0
                and time.monotonic() - last[1] > 1.0)
    wait("the queue is empty and the worker idle", settled, args.drain_timeout, step=0.2)
    return summarize(run, killer, lb, read_executions(executions), tag)


def summarize(run: Run, killer: Killer, lb: LbEvents, executions: dict[str, list[float]], tag: str) -> dict:
    resets = [e for e in lb.resets() if run.started - 0.5 <= event_time(e) <= run.finished + 2]
    out, lost_at = run_counts(run, executions, tag, resets)
    kills = [m for m in killer.marks if m["kind"] == "kill"]
    marks = [{"t": round(m["t"] - run.started, 4), "label": m["label"], "kind": m["kind"], "node": m["node"]}
             for m in killer.marks]
    # Each lost task is charged to the first kill or reset at or after its send_task returned.
    causes = [{"t": m["t"], "rule": m["label"], "what": f"the kill of {m['node']}"} for m in marks
              if m["kind"] == "kill"] + \
             [{"t": e["t"], "rule": e["rule"], "what": f"the reset by {e['rule'] or '?'}"}
              for e in out["timeline"]["resets"]]
    what_at = {c["t"]: c["what"] for c in causes}
    charged = attribute_losses(lost_at, causes)
    for c in charged:
        c["what"] = what_at.get(c["t"])
    out.update({
        "kills": killer.kills,
        "restarted": killer.restarted,
        "restart_failures": killer.restart_failures,
        "failovers": len(killer.failover_ms),
        "failover_ms": killer.failover_ms,
        "killed": [m["node"] for m in kills],
    })
    out["timeline"].update({"marks": marks, "lost": charged})
    return out


def html_failover(report: dict) -> str:
    cfg = report["config"]
    intro = (f"{cfg['n']} Celery tasks per run through warren-up's AMQP front {cfg['amqp']} "
             f"({cfg['nodes']} nodes, ha-all, warren-lb with chaos <code>{cfg['chaos']}</code>), "
             f"{cfg['rate'] or 'unlimited'} publishes/s; the queue's master killed {cfg['kills']} times per run "
             f"(<code>warren-up kill</code>) and started again {cfg['down']} s later. Dashed lines: kills (dark red), "
             f"the new master seen by the management API (purple), restarts (green).")

    def heading(r):
        ms = ", ".join(f"{m} ms" for m in r["failover_ms"]) or "none"
        return f"{r['lost']} lost, {r['duplicated']} duplicated, {r['failovers']} failovers ({ms})"

    return html_page("failover demo", "Celery tasks while the queue's master is killed", intro, report, COLUMNS,
                     heading_of=heading, lost_legend="lost (cumulative; dot: the kill or reset after their publish)")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="tasks per run (default 2000)")
    p.add_argument("--rate", type=float, default=300, help="publishes per second, 0 = unlimited (default 300)")
    p.add_argument("--kills", type=int, default=3, help="kills of the queue's master per run (default 3)")
    p.add_argument("--down", type=float, default=2, help="seconds from a kill to the node's start (default 2)")
    p.add_argument("--modes", default="plain,confirm", help="runs, in order (default plain,confirm)")
    p.add_argument("--data-dir", help="use the warren-up running with this --data-dir (default: start one)")
    p.add_argument("--bin-dir", help="where warren-up (and warren-broker, warren-lb) are "
                                     "(default target/release, then target/debug)")
    p.add_argument("--nodes", type=int, default=3, help="nodes of the warren-up it starts (default 3)")
    p.add_argument("--chaos", default="elb", help="--chaos of the warren-up it starts: elb (default), none, FILE")
    p.add_argument("--seed", type=int, help="--seed of the warren-up it starts")
    p.add_argument("--failure-detection-ms", type=int, help="--failure-detection-ms of the warren-up it starts")
    p.add_argument("--report", help="write the results as JSON here")
    p.add_argument("--chart", default="failover-demo.html", help="HTML chart (default failover-demo.html)")
    p.add_argument("--workdir", help="keep logs here (default: a temporary directory, removed)")
    p.add_argument("--drain-timeout", type=float, default=120, help="seconds to wait for the worker to catch up")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM unwinds like Ctrl-C: warren-up and the worker stop
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    if args.kills < 1 or args.n < args.kills + 1:
        p.error("--kills must be at least 1 and below --n")

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="warren-failover-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bin_dir = find_bin_dir(args.bin_dir, ["warren-up"] if args.data_dir else ["warren-up", "warren-broker", "warren-lb"])
    tag = uuid.uuid4().hex[:8]
    queue = f"warren-failover-{tag}"
    executions = workdir / "executions.log"
    procs: list[Proc] = []
    try:
        if args.data_dir:
            up = Up(bin_dir / "warren-up", Path(args.data_dir).resolve())
            if not up.ready():
                raise SystemExit(f"no ready warren-up in {args.data_dir} (its warren-up.json): start one with "
                                 f"`warren-up --data-dir {args.data_dir}`")
        else:
            print("starting warren-up ...", file=sys.stderr)
            up = start_up(bin_dir / "warren-up", workdir, args)
            procs.append(up.proc)
        st = up.state
        args.broker_url = f"amqp://guest:guest@{st['lb']['amqp']}//"
        lb = LbEvents(st["lb"]["admin"])
        print(f"warren-up: {', '.join(up.queue_nodes)} behind {st['lb']['amqp']} (AMQP) and {st['lb']['mgmt']} "
              f"(management); data dir {up.data}; logs: {workdir}", file=sys.stderr)

        worker = start_worker(args.broker_url, queue, executions, f"failover-{tag}@localhost", workdir, procs)
        print(f"worker: consumes {queue} through {st['lb']['amqp']}", file=sys.stderr)

        runs = [one_run(mode, args, up, lb, queue, tag, executions, worker) for mode in modes]
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=30)

    report = {
        "started": started,
        "command": redact(" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))),
        "config": {"n": args.n, "rate": args.rate, "kills": args.kills, "down": args.down, "queue": queue,
                   "amqp": st["lb"]["amqp"], "nodes": len(up.queue_nodes),
                   "chaos": args.chaos if not args.data_dir else "as started",
                   "warren_up": "started by the demo" if not args.data_dir else str(up.data)},
        "runs": runs,
    }
    print()
    print(table(runs, COLUMNS))
    for r in runs:
        print(f"{r['mode']:>7}: killed {', '.join(r['killed']) or 'none'}; failover (kill -> new master seen) "
              f"{', '.join(f'{m} ms' for m in r['failover_ms']) or '-'}")
        for why in r["restart_failures"]:
            print(f"{r['mode']:>7}: did not start again: {why}")
    return finish(args, report, html_failover, workdir)


if __name__ == "__main__":
    cli(main, "warren-up and the worker")
