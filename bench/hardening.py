#!/usr/bin/env python3
"""Abuse and outage measurements of a keygate binary: the figures behind the README's
"Hardening" section. Not a test: it prints numbers, it asserts nothing.

    python3 bench/hardening.py flood   --binary target/release/keygate
    python3 bench/hardening.py resets  --binary target/release/keygate
    python3 bench/hardening.py buffers --binary target/release/keygate [--message-bytes N]
    python3 bench/hardening.py outage  --binary target/release/keygate [--hung] \
        --postgres postgres://postgres@127.0.0.1:5432/postgres

flood   one HTTP/2 connection opens 100 000 Check streams as fast as it can write them;
        prints resident memory before, at its peak, and 5 s after the connection closed.
buffers N connections (--connections, 6) each open 128 Check streams whose message declares
        --message-bytes (default 128 KiB - 64) and send all of it but the last byte, as fast as
        flow control lets them; prints resident memory before and at its peak within 15 s.
resets  one connection makes keygate reset streams (WINDOW_UPDATE of 0 on an open stream,
        a protocol error) until it is closed; prints how many resets it took.
outage  keygate on PostgreSQL through a TCP proxy, cache TTL 2 s, stale window 60 s; a key is
        cached, the proxy is cut (or, with --hung, made to accept and never forward), and
        after the TTL 20 Checks of the cached key are timed with a 1 s deadline each.

Needs the `h2` package (pip install h2); `outage` also a PostgreSQL server.
"""

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

TOKEN = "bench-admin-token-0123456789abcdef"


# ---- protobuf, by hand: only strings, bools and varints are needed ----

def varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number, text):
    data = text.encode() if isinstance(text, str) else text
    return varint(number << 3 | 2) + varint(len(data)) + data


def fields(message):
    """Yields (number, wire type, value) of a protobuf message."""
    position = 0
    while position < len(message):
        key, position = read_varint(message, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = read_varint(message, position)
        elif wire == 2:
            length, position = read_varint(message, position)
            value, position = message[position:position + length], position + length
        elif wire == 5:
            value, position = message[position:position + 4], position + 4
        else:
            value, position = message[position:position + 8], position + 8
        yield number, wire, value


def read_varint(data, position):
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def grpc_frame(message):
    return b"\x00" + struct.pack(">I", len(message)) + message


class FrameCounter(threading.Thread):
    """Reads and discards what the server sends, counting RST_STREAM and GOAWAY frames."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock, self.resets, self.goaway, self.closed = sock, 0, 0, False
        # The connection's flow-control window for what the client sends (RFC 9113 6.9).
        self.window = 65535
        self.window_changed = threading.Condition()

    def take_window(self, size):
        """Waits until `size` bytes of DATA may be sent; False once the connection is gone."""
        with self.window_changed:
            while self.window < size and not self.closed:
                self.window_changed.wait(1)
            self.window -= size
            return not self.closed

    def run(self):
        buffer = b""
        self.sock.settimeout(None)
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                with self.window_changed:
                    self.closed = True
                    self.window_changed.notify_all()
                return
            buffer += data
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, stream = buffer[3], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                self.resets += kind == 3
                self.goaway += kind == 7
                if kind == 8 and stream == 0:
                    with self.window_changed:
                        self.window += int.from_bytes(buffer[9:13], "big") & 0x7FFFFFFF
                        self.window_changed.notify_all()
                buffer = buffer[9 + length:]


# ---- a minimal gRPC client over h2 ----

class Client:
    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def call(self, path, message, token=None, deadline=None):
        """Returns (grpc-status, response message bytes, seconds)."""
        started = time.monotonic()
        stream = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "keygate"),
                   ("content-type", "application/grpc"), ("te", "trailers")]
        if token:
            headers.append(("authorization", "Bearer " + token))
        if deadline:
            headers.append(("grpc-timeout", "%dm" % int(deadline * 1000)))
        self.conn.send_headers(stream, headers)
        self.conn.send_data(stream, grpc_frame(message), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        body, status = b"", None
        self.sock.settimeout(deadline or 10)
        while status is None:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return "DEADLINE", b"", time.monotonic() - started
            if not data:
                return "CLOSED", b"", time.monotonic() - started
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) \
                        and event.stream_id == stream:
                    for name, value in event.headers:
                        if name == b"grpc-status":
                            status = int(value)
            self.sock.sendall(self.conn.data_to_send())
        return status, body[5:], time.monotonic() - started


# ---- keygate ----

def rss_mib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(binary, database_url, extra=()):
    port = free_port()
    env = dict(os.environ, KEYGATE_LISTEN="127.0.0.1:%d" % port, KEYGATE_DATABASE_URL=database_url,
               KEYGATE_ADMIN_TOKENS="bench=" + TOKEN, KEYGATE_METRICS_LISTEN="off", RUST_LOG="warn")
    process = subprocess.Popen([binary, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            status, body, _ = Client(port).call("/grpc.health.v1.Health/Check", b"")
            if status == 0 and dict((n, v) for n, _, v in fields(body)).get(1) == 1:
                return process, port
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    sys.exit("keygate did not become SERVING")


def key_of(port):
    client = Client(port)
    status, _, _ = client.call("/keygate.v1.KeyAdmin/PutTenant", field(1, "acme"), TOKEN)
    assert status == 0, status
    request = field(1, "acme") + field(2, "bench") + field(3, "events:read")
    status, body, _ = client.call("/keygate.v1.KeyAdmin/CreateKey", request, TOKEN)
    assert status == 0, status
    return next(value for number, _, value in fields(body) if number == 2).decode()


def check(client, key, deadline=1.0):
    status, body, seconds = client.call("/keygate.v1.Authorize/Check", field(1, key) + field(2, "events:read"),
                                        deadline=deadline)
    allowed = status == 0 and dict((n, v) for n, _, v in fields(body)).get(1) == 1
    return status, allowed, seconds


# ---- measurements ----

def flood(args):
    directory = tempfile.mkdtemp()
    process, port = start(args.binary, "sqlite://%s/keygate.db?mode=rwc" % directory)
    try:
        key = key_of(port)
        before = rss_mib(process.pid)
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(process.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        sock = socket.create_connection(("127.0.0.1", port))
        message = grpc_frame(field(1, key) + field(2, "events:read"))
        # Frames by hand, the header block encoded once (HPACK literals without indexing): the
        # client ignores SETTINGS_MAX_CONCURRENT_STREAMS, as an attacker would, and keeps only
        # to connection flow control, writing as fast as the server lets it.
        block = b"".join(b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value for name, value in [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/keygate.v1.Authorize/Check"),
            (b":authority", b"keygate"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])

        def frame(kind, flags, stream, payload):
            return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

        counter = FrameCounter(sock)
        sent, started = 0, time.monotonic()
        try:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
            counter.start()
            batch = []
            for index in range(args.streams):
                stream = 1 + 2 * index
                batch.append(frame(1, 0x4, stream, block) + frame(0, 0x1, stream, message))
                if len(batch) == 100 or index == args.streams - 1:
                    if not counter.take_window(len(batch) * len(message)):
                        raise OSError("the server closed the connection")
                    sock.sendall(b"".join(batch))
                    batch.clear()
                sent += 1
        except OSError as error:
            print("the connection was closed after %d streams: %s" % (sent, error))
        seconds = time.monotonic() - started
        time.sleep(2)
        resets, goaway = counter.resets, counter.goaway
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        time.sleep(5)
        stop.set()
        sampler.join()
        after = rss_mib(process.pid)
        print("streams written: %d in %.2f s; refused (RST_STREAM) seen: %d; GOAWAY: %d" % (sent, seconds, resets, goaway))
        print("resident memory: %.1f MiB before, %.1f MiB peak, %.1f MiB 5 s after the connection closed"
              % (before, peak[0], after))
        status, allowed, _ = check(Client(port), key)
        print("a well-behaved client afterwards: status %s, allowed %s" % (status, allowed))
    finally:
        process.kill()


def resets(args):
    directory = tempfile.mkdtemp()
    process, port = start(args.binary, "sqlite://%s/keygate.db?mode=rwc" % directory)
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        counter = FrameCounter(sock)
        block = b"".join(b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value for name, value in [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/keygate.v1.Authorize/Check"),
            (b":authority", b"keygate"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])

        def frame(kind, flags, stream, payload):
            return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
        counter.start()
        sent = 0
        try:
            for index in range(args.streams):
                stream = 1 + 2 * index
                # An open stream, then a WINDOW_UPDATE that overflows its window: a stream error
                # the server must answer with RST_STREAM (the "MadeYouReset" pattern).
                sock.sendall(frame(1, 0x4, stream, block) + frame(8, 0, stream, struct.pack(">I", 0x7FFFFFFF)))
                sent += 1
                if counter.closed:
                    break
                if index % 200 == 199:
                    time.sleep(0.01)
        except OSError:
            pass
        time.sleep(2)
        print("streams opened: %d; streams keygate reset: %d; GOAWAY: %d; connection closed: %s"
              % (sent, counter.resets, counter.goaway, counter.closed))
        status, allowed, _ = check(Client(port), key_of(port))
        print("a well-behaved client afterwards: status %s, allowed %s" % (status, allowed))
    finally:
        process.kill()


class Proxy:
    """Forwards TCP to a target; cut() refuses and drops everything, hang() accepts and stalls."""

    def __init__(self, target):
        self.target = target
        self.mode = "forward"
        self.writers = []

    async def handle(self, reader, writer):
        if self.mode == "cut":
            writer.close()
            return
        self.writers.append(writer)
        if self.mode == "hang":
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.writers.append(upstream_writer)

        async def pipe(source, sink):
            try:
                while True:
                    data = await source.read(65536)
                    while self.mode == "hang":
                        await asyncio.sleep(0.05)
                    if not data or self.mode == "cut":
                        break
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self):
        self.mode = "cut"
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


def outage(args):
    url = args.postgres
    host_port = url.split("@")[-1].split("/")[0]
    host, port = host_port.split(":")
    name = "keygate_bench_%d" % os.getpid()
    subprocess.run(["psql", url, "-qc", "CREATE DATABASE %s" % name], check=True)
    loop = asyncio.new_event_loop()
    proxy = Proxy((host, int(port)))
    server = loop.run_until_complete(asyncio.start_server(proxy.handle, "127.0.0.1", 0))
    proxy_port = server.sockets[0].getsockname()[1]
    threading.Thread(target=loop.run_forever, daemon=True).start()
    database = url.rsplit("/", 1)[0].replace(host_port, "127.0.0.1:%d" % proxy_port) + "/" + name
    process, keygate = start(args.binary, database,
                             ["--cache-ttl-seconds", "2", "--stale-window-seconds", "60"])
    try:
        key = key_of(keygate)
        client = Client(keygate)
        print("before the outage: %s" % (check(client, key)[:2],))
        if args.hung:
            loop.call_soon_threadsafe(setattr, proxy, "mode", "hang")
        else:
            loop.call_soon_threadsafe(proxy.cut)
        time.sleep(2.5)
        timings, failures = [], 0
        for _ in range(20):
            status, allowed, seconds = check(Client(keygate), key)
            timings.append(seconds * 1000)
            failures += not allowed
            time.sleep(0.2)
        timings.sort()
        print("%s database, cached key past its TTL, 20 Checks with a 1 s deadline: %d failed; "
              "latency p50 %.1f ms, max %.1f ms" % ("hung" if args.hung else "cut", failures,
                                                    timings[len(timings) // 2], timings[-1]))
    finally:
        process.kill()
        loop.call_soon_threadsafe(setattr, proxy, "mode", "forward")
        subprocess.run(["psql", url, "-qc", "DROP DATABASE IF EXISTS %s WITH (FORCE)" % name])


def buffers(args):
    directory = tempfile.mkdtemp()
    process, port = start(args.binary, "sqlite://%s/keygate.db?mode=rwc" % directory)
    try:
        before = rss_mib(process.pid)
        peak = before
        connections = []
        for _ in range(args.connections):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            connection.initiate_connection()
            streams = {}
            for _ in range(128):
                stream = connection.get_next_available_stream_id()
                connection.send_headers(stream, [(":method", "POST"), (":scheme", "http"),
                                                 (":path", "/keygate.v1.Authorize/Check"),
                                                 (":authority", "keygate"), ("content-type", "application/grpc"),
                                                 ("te", "trailers")])
                streams[stream] = b"\x00" + struct.pack(">I", args.message_bytes) + b"\x07" * (args.message_bytes - 1)
            connections.append((sock, connection, streams))
        sent = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for sock, connection, streams in connections:
                for stream, rest in list(streams.items()):
                    window = min(connection.local_flow_control_window(stream), connection.max_outbound_frame_size)
                    if window > 0 and rest:
                        chunk = rest[:window]
                        try:
                            connection.send_data(stream, chunk)
                        except h2.exceptions.StreamClosedError:
                            del streams[stream]
                            continue
                        streams[stream] = rest[len(chunk):]
                        sent += len(chunk)
                try:
                    data = connection.data_to_send()
                    if data:
                        sock.sendall(data)
                    incoming = sock.recv(1 << 20)
                    if incoming:
                        connection.receive_data(incoming)
                except BlockingIOError:
                    pass
                except (OSError, h2.exceptions.ProtocolError):
                    pass
            peak = max(peak, rss_mib(process.pid))
            time.sleep(0.005)
        print("%d connections x 128 streams, messages of %d bytes: %.1f MB sent; resident memory %.1f MiB before, "
              "%.1f MiB peak" % (args.connections, args.message_bytes, sent / 1e6, before, peak))
        for sock, _, _ in connections:
            sock.close()
    finally:
        process.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measurement", choices=["flood", "buffers", "resets", "outage"])
    parser.add_argument("--binary", default="target/release/keygate")
    parser.add_argument("--streams", type=int, default=100_000)
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--hung", action="store_true")
    parser.add_argument("--connections", type=int, default=6)
    parser.add_argument("--message-bytes", type=int, default=128 * 1024 - 64)
    args = parser.parse_args()
    {"flood": flood, "buffers": buffers, "resets": resets, "outage": outage}[args.measurement](args)


if __name__ == "__main__":
    main()
