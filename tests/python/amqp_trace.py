"""A loopback TCP relay that decodes the AMQP 0-9-1 frames passing through it and writes them to a file.

With WARREN_TEST_TRACE=1 the fixtures put one in front of the broker's plain AMQP listener, so a
failing test's report shows the frames exchanged during the test (who sent what, on which channel).
Standalone: `python amqp_trace.py UPSTREAM_PORT [TRACE_FILE]` prints the port it listens on.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

from pika import frame as pika_frame


def _short(value, limit=120):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...({len(value) if hasattr(value, '__len__') else '?'})"


def describe(f) -> str:
    if isinstance(f, pika_frame.ProtocolHeader):
        return f"ProtocolHeader {f.major}-{f.minor}-{f.revision}"
    if isinstance(f, pika_frame.Heartbeat):
        return "Heartbeat"
    if isinstance(f, pika_frame.Method):
        m = f.method
        fields = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        if "server_properties" in fields or "client_properties" in fields:
            for key in ("server_properties", "client_properties"):
                if key in fields:
                    fields[key] = {k: v for k, v in fields[key].items() if k in ("product", "capabilities")}
        if "response" in fields:
            fields["response"] = "<credentials>"
        return f"ch{f.channel_number} {m.NAME}({', '.join(f'{k}={_short(v, 200)}' for k, v in fields.items())})"
    if isinstance(f, pika_frame.Header):
        props = {k: v for k, v in vars(f.properties).items() if v is not None and not k.startswith("_")}
        return f"ch{f.channel_number} ContentHeader(body_size={f.body_size}, {_short(props, 200)})"
    if isinstance(f, pika_frame.Body):
        return f"ch{f.channel_number} Body({len(f.fragment)} bytes {_short(f.fragment[:60])})"
    return repr(f)


class _Decoder:
    def __init__(self, write, tag):
        self.buf = b""
        self.write = write
        self.tag = tag
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self.buf += data
        while self.buf:
            try:
                used, f = pika_frame.decode_frame(self.buf)
            except Exception as e:  # not AMQP any more (or a framing error): say so once, stop decoding
                self.write(f"{self.tag} UNDECODABLE {type(e).__name__}: {e}; next bytes {self.buf[:64]!r}")
                self.broken = True
                return
            if not used:
                return
            self.buf = self.buf[used:]
            self.write(f"{self.tag} {describe(f)}")


class TraceProxy:
    def __init__(self, upstream: tuple[str, int], trace_path):
        self.upstream = upstream
        self.trace_path = trace_path
        self._lock = threading.Lock()
        self._out = open(trace_path, "a", buffering=1, encoding="utf-8")
        self._t0 = time.monotonic()
        self._n = 0
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="amqp-trace-accept", daemon=True).start()

    def _write(self, line: str) -> None:
        with self._lock:
            if not self._out.closed:
                self._out.write(f"{time.monotonic() - self._t0:9.3f} {line}\n")

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, addr = self._listener.accept()
            except OSError:
                return
            self._n += 1
            n = self._n
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError as e:
                self._write(f"conn#{n} {addr[1]} upstream connect failed: {e}")
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._write(f"conn#{n} opened from client port {addr[1]}")
            self._relay(n, client, server)

    def _relay(self, n: int, client: socket.socket, server: socket.socket) -> None:
        def both_done():
            client.close()
            server.close()
            self._write(f"conn#{n} closed")

        done = threading.Barrier(2, action=both_done)
        for src, dst, tag in ((client, server, f"conn#{n} C->S"), (server, client, f"conn#{n} S->C")):
            threading.Thread(target=self._pump, args=(src, dst, _Decoder(self._write, tag), done),
                             name=f"amqp-trace-{n}", daemon=True).start()

    def _pump(self, src, dst, decoder: _Decoder, done: threading.Barrier) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    decoder.write(f"{decoder.tag} EOF")
                    break
                dst.sendall(data)
                decoder.feed(data)
        except OSError as e:
            decoder.write(f"{decoder.tag} socket error: {e}")
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                done.wait(timeout=30)
            except threading.BrokenBarrierError:
                src.close()
                dst.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            self._out.close()


if __name__ == "__main__":
    upstream_port = int(sys.argv[1])
    path = sys.argv[2] if len(sys.argv) > 2 else "/dev/stdout"
    proxy = TraceProxy(("127.0.0.1", upstream_port), path)
    print(f"listening on 127.0.0.1:{proxy.port}, relaying to 127.0.0.1:{upstream_port}", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.close()
