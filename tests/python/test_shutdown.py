"""SIGTERM: the broker closes client connections with 320 CONNECTION_FORCED, then exits 0."""

import os
import signal
import time

import pytest
from pika.exceptions import ConnectionClosedByBroker

from conftest import register_log, start_target, stop_process, unregister_log


@pytest.mark.timeout(60)
def test_sigterm_closes_connections_with_320_and_exits_0(tmp_path, tls_files):
    b = start_target(tmp_path, tls_files)
    register_log(f"{b.target} broker log (own instance, {b.log_path})", b.log_path)
    try:
        conn = b.connect()
        ch = conn.channel()
        ch.queue_declare("before-shutdown", exclusive=True)
        os.kill(b.proc.pid, signal.SIGTERM)
        with pytest.raises(ConnectionClosedByBroker) as exc:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                conn.process_data_events(time_limit=0.5)
        assert exc.value.reply_code == 320, repr(exc.value)
        assert exc.value.reply_text.startswith("CONNECTION_FORCED"), repr(exc.value)
        assert b.proc.wait(20) == 0, "broker did not exit 0 after SIGTERM"
    finally:
        stop_process(b.proc, timeout=5)
        unregister_log(f"{b.target} broker log (own instance, {b.log_path})")
