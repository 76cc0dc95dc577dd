"""Celery app for the interop tests; the worker's is configured from the environment so the test can point
it at a broker. Tests build their own producer-side app with make_app().

  WARREN_CELERY_BROKER_URL  pyamqp://guest:guest@127.0.0.1:PORT//
  WARREN_CELERY_QUEUE       the queue tasks go to and the worker consumes (-Q)
  WARREN_CELERY_QUEUE_TYPE  classic (default) or quorum (x-queue-type for the task queues)
"""

import os

from celery import Celery


def make_app(broker_url, queue, queue_type="classic"):
    app = Celery("warren_interop")
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={"confirm_publish": True},
        # A broker that drops a connection must show up as a failure, not be retried around.
        broker_connection_retry_on_startup=False,
        broker_connection_retry=False,
        task_publish_retry=False,
        result_backend="rpc://",
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
    )
    if queue_type == "quorum":
        app.conf.update(task_default_queue_type="quorum", task_create_missing_queue_type="quorum")

    @app.task(name="celery_app.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="celery_app.fail", shared=False)
    def fail(msg):
        raise ValueError(msg)

    return app


app = make_app(
    os.environ.get("WARREN_CELERY_BROKER_URL", "pyamqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("WARREN_CELERY_QUEUE", "warren-interop"),
    os.environ.get("WARREN_CELERY_QUEUE_TYPE", "classic"),
)
