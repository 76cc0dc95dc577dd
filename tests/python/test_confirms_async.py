"""Pipelined publisher confirms (pika SelectConnection): sequence numbers from 1, every number confirmed
exactly once, `multiple` never covering a nacked or unconfirmed number, basic.return before the ack."""

import pika


def run_pipelined(broker, queue, queue_args, bodies, mandatory_keys, timeout=20):
    """Publish bodies[i] with routing key from mandatory_keys(i) without waiting; record confirm events."""
    events = []  # ("ack"|"nack", tag, multiple) and ("return", body)
    state = {"error": None}
    n = len(bodies)

    def fail(conn, why):
        state["error"] = why
        if conn.is_open:
            conn.close()
        else:
            conn.ioloop.stop()

    def on_open(conn):
        conn.channel(on_open_callback=lambda ch: on_channel(conn, ch))

    def on_channel(conn, ch):
        ch.add_on_close_callback(lambda c, reason: fail(conn, f"channel closed: {reason!r}")
                                 if state["error"] is None and len(tracker.done) < n else None)
        ch.add_on_return_callback(lambda c, method, props, body: events.append(("return", body.decode())))
        ch.queue_declare(queue, exclusive=True, arguments=queue_args,
                         callback=lambda _: ch.confirm_delivery(lambda f: on_confirm(conn, f),
                                                                callback=lambda _: publish_all(ch)))

    def publish_all(ch):
        for i, body in enumerate(bodies):
            ch.basic_publish("", mandatory_keys(i) or queue, body.encode(), mandatory=True)

    tracker = Tracker()

    def on_confirm(conn, frame):
        m = frame.method
        e = ("ack" if isinstance(m, pika.spec.Basic.Ack) else "nack", m.delivery_tag, m.multiple)
        events.append(e)
        try:
            tracker.add(e, len(events) - 1)
        except AssertionError as err:
            return fail(conn, str(err))
        if len(tracker.done) >= n:
            conn.close()

    conn = pika.SelectConnection(
        broker.params(),
        on_open_callback=on_open,
        on_open_error_callback=lambda c, e: fail(c, f"open failed: {e!r}"),
        on_close_callback=lambda c, reason: c.ioloop.stop(),
    )
    conn.ioloop.call_later(timeout, lambda: fail(conn, f"timed out after {timeout}s"))
    conn.ioloop.start()
    return events, state["error"]


class Tracker:
    """Expands multiple=True into {tag: (kind, index of the confirming event)}; asserts no double confirm."""

    def __init__(self):
        self.done = {}
        self.low = 1  # every tag below this is confirmed

    def add(self, e, idx):
        kind, tag, multiple = e
        assert tag not in self.done, f"tag {tag} confirmed twice (event {e})"
        if multiple:
            covered = [t for t in range(self.low, tag + 1) if t not in self.done]
        else:
            covered = [tag]
        for t in covered:
            self.done[t] = (kind, idx)
        while self.low in self.done:
            self.low += 1


def confirmed(events):
    t = Tracker()
    for idx, e in enumerate(events):
        if e[0] != "return":
            t.add(e, idx)
    return t.done


def test_pipelined_confirms_ack_every_sequence_number_once(broker, qname):
    n = 3000
    events, error = run_pipelined(broker, qname, None, [str(i + 1) for i in range(n)], lambda i: None)
    assert error is None, error
    done = confirmed(events)
    assert sorted(done) == list(range(1, n + 1))
    assert all(kind == "ack" for kind, _ in done.values())


def test_pipelined_confirms_split_acks_and_nacks_at_overflow(broker, qname):
    # x-max-length 100 with reject-publish: numbers 1..100 are acked, 101..300 nacked; a `multiple`
    # ack or nack must never cover a number of the other kind.
    events, error = run_pipelined(broker, qname, {"x-max-length": 100, "x-overflow": "reject-publish"},
                                  [str(i + 1) for i in range(300)], lambda i: None)
    assert error is None, error
    done = confirmed(events)
    assert sorted(done) == list(range(1, 301))
    assert [t for t, (k, _) in sorted(done.items()) if k == "ack"] == list(range(1, 101))


def test_pipelined_mandatory_returns_precede_their_acks(broker, qname):
    # Every third message goes to a routing key with no queue: basic.return, then basic.ack.
    n = 600
    unroutable = {i + 1 for i in range(n) if i % 3 == 2}
    events, error = run_pipelined(broker, qname, None, [str(i + 1) for i in range(n)],
                                  lambda i: f"{qname}.nowhere" if (i + 1) in unroutable else None)
    assert error is None, error
    done = confirmed(events)
    assert sorted(done) == list(range(1, n + 1))
    assert all(kind == "ack" for kind, _ in done.values())  # unroutable is still acked, not nacked
    returns = {int(e[1]): idx for idx, e in enumerate(events) if e[0] == "return"}
    assert set(returns) == unroutable
    late = [t for t in unroutable if returns[t] > done[t][1]]
    assert not late, f"basic.ack before basic.return for {sorted(late)[:10]}"
