"""AMQP over TLS (amqps) with pika, using a certificate generated for the test run."""

import ssl

import pika
import pytest
from pika.exceptions import AMQPConnectionError

from conftest import tls_context


def tls_params(broker, ctx, server_hostname="localhost"):
    return pika.ConnectionParameters(
        host=broker.host,
        port=broker.tls_port,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=5,
        stack_timeout=10,
        ssl_options=pika.SSLOptions(ctx, server_hostname),
    )


def test_amqps_publish_confirm_and_get_over_verified_tls(tls_broker, qname):
    ctx = tls_context(tls_broker.ca_file)
    conn = pika.BlockingConnection(tls_params(tls_broker, ctx))
    try:
        sock = conn._impl._transport._sock
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        peer = sock.getpeercert()
        assert ("DNS", "localhost") in peer["subjectAltName"]
        ch = conn.channel()
        ch.queue_declare(qname, exclusive=True)
        ch.confirm_delivery()
        body = bytes(range(256)) * 512  # 128 KiB: several frames, several TLS records
        ch.basic_publish("", qname, body)
        method, _, got = ch.basic_get(qname, auto_ack=True)
        assert got == body
    finally:
        if conn.is_open:
            conn.close()


def test_amqps_rejected_by_client_without_the_test_ca(tls_broker):
    # The broker presents the generated certificate: a client trusting only the system CAs must refuse it.
    ctx = tls_context(None)
    with pytest.raises((AMQPConnectionError, ssl.SSLError)) as exc:
        pika.BlockingConnection(tls_params(tls_broker, ctx))
    assert "CERTIFICATE_VERIFY_FAILED" in repr(exc.value), repr(exc.value)
    tls_broker.assert_alive()


def test_amqps_port_does_not_speak_plain_amqp(tls_broker):
    # A plain AMQP client on the TLS port must not get an AMQP session.
    params = pika.ConnectionParameters(
        host=tls_broker.host, port=tls_broker.tls_port, connection_attempts=1,
        socket_timeout=5, stack_timeout=10,
    )
    with pytest.raises(AMQPConnectionError):
        pika.BlockingConnection(params)
    tls_broker.assert_alive()


def test_kombu_py_amqp_over_tls(tls_broker, qname):
    # py-amqp does its own TLS setup (sslopts), unlike pika: check it against the same listener.
    from kombu import Connection

    ssl_opts = {"ca_certs": str(tls_broker.ca_file), "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost"}
    with Connection(f"pyamqp://guest:guest@{tls_broker.host}:{tls_broker.tls_port}//", ssl=ssl_opts,
                    connect_timeout=5, transport_options={"confirm_publish": True}) as c:
        q = c.SimpleQueue(qname, queue_opts={"exclusive": True, "auto_delete": True})
        q.put({"over": "tls"}, serializer="json")
        m = q.get(block=True, timeout=5)
        assert m.payload == {"over": "tls"}
        m.ack()
        q.close()
