"""Tasks of the confirm_publish experiment (run_experiment.py).

`record` appends one line per execution, `<task id> <unix time>`, to the file named by
WARREN_EXPERIMENT_LOG: a task published twice and executed twice shows up twice. The worker's
app is configured from the environment:

  WARREN_EXPERIMENT_BROKER  broker URL of the worker (default amqp://guest:guest@127.0.0.1:5672//)
  WARREN_EXPERIMENT_QUEUE   the queue tasks go to (default warren-experiment)
  WARREN_EXPERIMENT_LOG     the executions file (default executions.log in the working directory)

Run a worker by hand with:
  celery -A tasks worker --pool=solo -Q warren-experiment
"""

from __future__ import annotations

import os
import time

from celery import Celery

EXECUTIONS = os.environ.get("WARREN_EXPERIMENT_LOG", "executions.log")
_fd: int | None = None


def make_app(broker_url: str, queue: str, confirm_publish: bool = False, retry_errback=None) -> Celery:
    """A Celery app for `broker_url`; the producer and the worker differ only in these arguments."""
    app = Celery("warren_experiment")
    policy = {
        # Celery's defaults are 3 retries; a load balancer that resets every few dozen publishes
        # makes a run of bad luck likelier, and a publish that raises is not the story here.
        "max_retries": 10,
        "interval_start": 0,
        "interval_step": 0.1,
        "interval_max": 0.5,
    }
    if retry_errback is not None:
        policy["errback"] = retry_errback  # kombu's ensure() calls it once per retry
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={"confirm_publish": True} if confirm_publish else {},
        broker_connection_retry_on_startup=True,
        broker_heartbeat=0,
        task_publish_retry=True,  # Celery's default, spelled out: kombu republishes on errors
        task_publish_retry_policy=policy,
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_prefetch_multiplier=32,
        worker_hijack_root_logger=False,
        include=["tasks"],
    )
    return app


app = make_app(
    os.environ.get("WARREN_EXPERIMENT_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("WARREN_EXPERIMENT_QUEUE", "warren-experiment"),
)


@app.task(name="tasks.record", bind=True)
def record(self, seq: int) -> None:
    """Appends `<task id> <unix time>`; O_APPEND keeps each line whole across processes."""
    global _fd
    if _fd is None:
        _fd = os.open(EXECUTIONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{self.request.id} {time.time():.6f}\n".encode())
