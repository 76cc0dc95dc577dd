"""Operations on objects that are gone, and on the default and reserved exchanges: what RabbitMQ
3.10 answers, which clients (RPC helpers unbinding an auto-deleted reply queue, tools declaring
exchanges passively) rely on. Every test passes against Debian's RabbitMQ too
(WARREN_TEST_TARGET=rabbitmq)."""

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from test_pika_semantics import assert_channel_error

DEFAULT_REFUSED = "ACCESS_REFUSED - operation not permitted on the default exchange"


def still_open(ch):
    """The channel still answers (a soft error would have closed it)."""
    assert ch.is_open
    ch.queue_declare("", exclusive=True)


def test_unbinding_a_vanished_queue_or_exchange_is_unbind_ok(conn, qname):
    ch = conn.channel()
    # The RPC case: a reply queue bound to an exchange, auto-deleted when its consumer went.
    ch.exchange_declare(qname + ".x", "direct", auto_delete=False)
    ch.queue_declare(qname, auto_delete=True)
    ch.queue_bind(qname, qname + ".x", "reply")
    tag = ch.basic_consume(qname, lambda *a: None)
    ch.basic_cancel(tag)
    with pytest.raises(ChannelClosedByBroker):
        conn.channel().queue_declare(qname, passive=True)  # gone with its consumer
    assert isinstance(ch.queue_unbind(qname, qname + ".x", "reply").method, pika.spec.Queue.UnbindOk)
    # The exchange gone too, or both never existed.
    ch.exchange_delete(qname + ".x")
    assert isinstance(ch.queue_unbind(qname, qname + ".x", "reply").method, pika.spec.Queue.UnbindOk)
    ch.queue_declare(qname + ".q", exclusive=True)
    assert isinstance(ch.queue_unbind(qname + ".q", qname + ".nope", "k").method,
                      pika.spec.Queue.UnbindOk)
    # A binding that was never made, between objects that exist.
    assert isinstance(ch.queue_unbind(qname + ".q", "amq.direct", "never").method,
                      pika.spec.Queue.UnbindOk)
    still_open(ch)


def test_exchange_unbind_with_a_vanished_end_is_unbind_ok(conn, qname):
    ch = conn.channel()
    ch.exchange_declare(qname + ".d", "fanout", auto_delete=False)
    for dest, src in [(qname + ".d", qname + ".nope"), (qname + ".nope", "amq.direct"),
                      (qname + ".nope", qname + ".nope2")]:
        assert isinstance(ch.exchange_unbind(dest, src, "k").method, pika.spec.Exchange.UnbindOk)
    still_open(ch)
    ch.exchange_delete(qname + ".d")
    # Binding (not unbinding) to a missing end is still a 404.
    ch = conn.channel()
    ch.exchange_declare(qname + ".d", "fanout", auto_delete=True)
    assert_channel_error(lambda: ch.exchange_bind(qname + ".d", qname + ".nope", "k"), 404,
                         f"NOT_FOUND - no exchange '{qname}.nope' in vhost '/'")


def test_deleting_or_cancelling_what_is_gone_is_ok(conn, qname):
    ch = conn.channel()
    ok = ch.queue_delete(qname + ".nope").method
    assert isinstance(ok, pika.spec.Queue.DeleteOk) and ok.message_count == 0
    ok = ch.queue_delete(qname + ".nope", if_unused=True, if_empty=True).method
    assert isinstance(ok, pika.spec.Queue.DeleteOk)
    assert isinstance(ch.exchange_delete(qname + ".nope").method, pika.spec.Exchange.DeleteOk)
    assert isinstance(ch.exchange_delete(qname + ".nope", if_unused=True).method,
                      pika.spec.Exchange.DeleteOk)
    ch.basic_cancel("never-consumed")
    still_open(ch)
    # Purging a missing queue is a 404, as in RabbitMQ.
    assert_channel_error(lambda: ch.queue_purge(qname + ".nope"), 404,
                         f"NOT_FOUND - no queue '{qname}.nope' in vhost '/'")


def test_the_default_exchange_refuses_every_declare_bind_and_delete(conn, qname):
    def refused(fn):
        assert_channel_error(lambda: fn(conn.channel()), 403, DEFAULT_REFUSED)

    refused(lambda ch: ch.exchange_declare("", passive=True))
    refused(lambda ch: ch.exchange_declare("", "direct"))
    refused(lambda ch: ch.exchange_delete(""))
    refused(lambda ch: (ch.queue_declare(qname, exclusive=True), ch.queue_bind(qname, "", qname)))
    refused(lambda ch: ch.queue_unbind(qname + ".nope", "", "k"))
    refused(lambda ch: (ch.exchange_declare(qname + ".e", "fanout", auto_delete=True),
                        ch.exchange_bind(qname + ".e", "", "k")))
    refused(lambda ch: ch.exchange_unbind("", "amq.fanout", "k"))


def test_reserved_amq_names(conn, qname):
    ch = conn.channel()
    # The predeclared ones can be declared passively, and again with the same type.
    for name in ["amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match",
                 "amq.rabbitmq.trace"]:
        ch.exchange_declare(name, passive=True)
    ch.exchange_declare("amq.direct", "direct", durable=True)
    assert_channel_error(lambda: ch.exchange_declare("amq.direct", "fanout", durable=True), 406,
                         "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'amq.direct'")
    ch = conn.channel()
    assert_channel_error(lambda: ch.exchange_declare("amq.nope", passive=True), 404,
                         "NOT_FOUND - no exchange 'amq.nope' in vhost '/'")
    ch = conn.channel()
    assert_channel_error(lambda: ch.exchange_declare("amq.nope", "direct"), 403,
                         "ACCESS_REFUSED - exchange name 'amq.nope' contains reserved prefix 'amq.*'")
    for name in ["amq.direct", "amq.nope"]:
        ch = conn.channel()
        assert_channel_error(lambda: ch.exchange_delete(name), 403,
                             f"ACCESS_REFUSED - deletion of system exchange '{name}' in vhost '/' not allowed")
    ch = conn.channel()
    assert_channel_error(lambda: ch.queue_declare("amq.q"), 403,
                         "ACCESS_REFUSED - queue name 'amq.q' contains reserved prefix 'amq.*'")
