"""Clients that misbehave or go away: abrupt disconnects, torn frames, wrong protocol headers, slow
consumers behind big backlogs, connection churn. The broker must keep serving everyone else."""

import socket
import struct
import time

import pika
from pika.exceptions import AMQPConnectionError

from test_pika import message_count

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def abort(conn):
    """Drop the TCP connection under pika without any AMQP close (RST via SO_LINGER 0)."""
    sock = conn._impl._transport._sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_all(sock, timeout=5.0):
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data, "eof"
            data += chunk
    except socket.timeout:
        return data, "timeout"
    except ConnectionResetError:
        return data, "reset"


def test_abrupt_disconnect_requeues_unacked_and_drops_exclusive_queue(broker, qname):
    watcher = broker.connect()
    victim = broker.connect()
    try:
        vch = victim.channel()
        vch.queue_declare(qname)
        vch.queue_declare(qname + ".excl", exclusive=True)
        vch.confirm_delivery()
        for i in range(5):
            vch.basic_publish("", qname, str(i).encode())
        held = []
        vch.basic_qos(prefetch_count=10)
        vch.basic_consume(qname, lambda c, m, p, b: held.append(b))
        deadline = time.monotonic() + 5
        while len(held) < 5 and time.monotonic() < deadline:
            victim.process_data_events(time_limit=0.1)
        assert len(held) == 5
        assert message_count(watcher, qname) == 0
        abort(victim)

        wch = watcher.channel()
        deadline = time.monotonic() + 5
        while message_count(watcher, qname) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        got = [wch.basic_get(qname, auto_ack=True) for _ in range(5)]
        assert [b for _, _, b in got] == [str(i).encode() for i in range(5)]
        assert all(m.redelivered for m, _, _ in got)
        ch = watcher.channel()
        try:
            ch.queue_declare(qname + ".excl", passive=True)
            raise AssertionError("exclusive queue outlived its aborted connection")
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404
        watcher.channel().queue_delete(qname)
    finally:
        if watcher.is_open:
            watcher.close()


def _raw_connect(broker):
    s = socket.create_connection((broker.host, broker.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_unsupported_protocol_header_gets_amqp_0_9_1_header_back(broker):
    for hello in (b"AMQP\x01\x01\x00\x0a", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        s = _raw_connect(broker)
        try:
            s.sendall(hello)
            data, how = recv_all(s)
        finally:
            s.close()
        assert data == AMQP_HEADER, (hello, data)
        assert how in ("eof", "reset"), f"connection left open after bad header {hello!r}"
    broker.assert_alive()
    broker.connect().close()


def test_client_vanishing_mid_frame_and_mid_message(broker, qname):
    # A pika client publishes the method frame and half of a body, then drops the connection:
    # the partial message must not be enqueued, and the broker must carry on.
    setup = broker.connect()
    try:
        setup.channel().queue_declare(qname)
        for cut in ("mid-frame", "mid-message"):
            victim = broker.connect()
            ch = victim.channel()
            impl = victim._impl
            # Frames for one publish: method, header, body (body larger than one frame).
            body = b"x" * 300_000
            frames = []
            orig = impl._output_marshaled_frames
            impl._output_marshaled_frames = lambda marshaled: frames.extend(marshaled)
            ch.basic_publish("", qname, body)
            impl._output_marshaled_frames = orig
            wire = b"".join(frames)
            assert len(frames) >= 4
            if cut == "mid-frame":
                partial = wire[: len(frames[0]) // 2]  # half of the method frame
            else:
                partial = b"".join(frames[:3])  # method, header, first body frame; rest never sent
            sock = victim._impl._transport._sock
            sock.setblocking(True)
            sock.sendall(partial)
            abort(victim)
        time.sleep(0.5)
        assert message_count(setup, qname) == 0
        setup.channel().queue_delete(qname)
    finally:
        setup.close()
    broker.assert_alive()


def test_slow_consumer_behind_a_large_backlog_gets_everything(broker, qname):
    # 400 x 64 KiB delivered with no-ack to a consumer that does not read for a while: the broker's
    # output towards it backs up, then drains, without loss, reordering or a stuck queue.
    n, size = 400, 64 * 1024
    pub = broker.connect()
    sub = broker.connect()
    try:
        pch = pub.channel()
        pch.queue_declare(qname, exclusive=False, auto_delete=False)
        sch = sub.channel()
        got = []
        sch.basic_consume(qname, lambda c, m, p, b: got.append(b), auto_ack=True)
        pch.confirm_delivery()
        for i in range(n):
            pch.basic_publish("", qname, i.to_bytes(4, "big") * (size // 4))
        time.sleep(1.0)  # the consumer's connection is not read meanwhile
        # The publisher's connection still works while the other one is backed up.
        pch.queue_declare(qname, passive=True)
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            sub.process_data_events(time_limit=0.2)
        assert len(got) == n, f"{len(got)} of {n}"
        assert [int.from_bytes(b[:4], "big") for b in got] == list(range(n))
        assert all(len(b) == size for b in got)
        pch.queue_delete(qname)
    finally:
        for c in (pub, sub):
            if c.is_open:
                c.close()


def test_connection_churn_leaves_broker_healthy(broker, qname):
    for i in range(60):
        c = broker.connect()
        ch = c.channel()
        ch.queue_declare(f"{qname}.{i}", exclusive=True)
        if i % 3 == 0:
            abort(c)
        elif i % 3 == 1:
            c.close()
        else:
            c._impl._transport._sock.close()  # FIN without connection.close
    time.sleep(0.5)
    c = broker.connect()
    ch = c.channel()
    missing = 0
    for i in range(60):
        try:
            ch.queue_declare(f"{qname}.{i}", passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            missing += 1
            ch = c.channel()
    assert missing == 60, f"{60 - missing} exclusive queues outlived their connections"
    c.close()


def test_oversized_frame_closes_connection_with_501(broker):
    # Announce a frame far beyond the negotiated frame_max: the connection is closed with FRAME_ERROR.
    conn = broker.connect(frame_max=4096)
    try:
        sock = conn._impl._transport._sock
        sock.setblocking(True)
        payload = b"\x00" * 10_000
        sock.sendall(struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce")
        try:
            for _ in range(50):
                conn.process_data_events(time_limit=0.1)
            raise AssertionError("connection still open after an oversized frame")
        except AMQPConnectionError as e:
            assert "501" in str(e) or "FRAME_ERROR" in str(e), repr(e)
    finally:
        if conn.is_open:
            conn.close()
    broker.assert_alive()
