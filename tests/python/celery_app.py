"""Celery app for the interop tests; configured from the environment so the test can point it at a broker.

  WARREN_CELERY_BROKER_URL  pyamqp://guest:guest@127.0.0.1:PORT//
  WARREN_CELERY_QUEUE       the queue tasks go to and the worker consumes (-Q)
"""

import os

from celery import Celery

app = Celery("warren_interop")
app.conf.update(
    broker_url=os.environ.get("WARREN_CELERY_BROKER_URL", "pyamqp://guest:guest@127.0.0.1:5672//"),
    broker_transport_options={"confirm_publish": True},
    # A broker that drops a connection must show up as a failure, not be retried around.
    broker_connection_retry_on_startup=False,
    broker_connection_retry=False,
    task_publish_retry=False,
    result_backend="rpc://",
    task_default_queue=os.environ.get("WARREN_CELERY_QUEUE", "warren-interop"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
)


@app.task
def add(x, y):
    return x + y


@app.task
def fail(msg):
    raise ValueError(msg)
