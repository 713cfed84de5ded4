"""Many Kafka client connections from one process, for `dev/bench --scale` (issue 18, items 5-6).

Speaks the Kafka protocol raw over asyncio, so that 10,000 connections cost one process and a
few tens of MB, not 10,000 clients. Driven by dev/bench.py through JSON lines: one command per
line on stdin, one JSON answer per line on stdout (stderr for errors).

  {"cmd": "grow", "to": N, "concurrency": C}
      opens connections until N are open, at most C connecting at once. Each sends ApiVersions
      v0 and reads the answer; its accept latency is connect() to that answer.
  {"cmd": "probe", "count": N}
      opens N more connections one after the other, each closed once ApiVersions is answered:
      the accept latency of one client at a time, beside those already open.
  {"cmd": "shrink", "to": N}
      closes the newest connections until N are open.
  {"cmd": "produce", "seconds": S, "rate": R}
      every open connection whose index is a multiple of 10 (10 % of them) sends one Produce v9
      (acks=all, one 100 B record) R times a second, one at a time, for S seconds; the answer
      has every latency (send to response), the failures by cause, the event loop's lag (how
      late a 10 ms timer fires: the client's own delay, part of every latency), and this
      process's CPU.
  {"cmd": "quit"}

Records: an 11-byte key, a `tenant` header (`--tenant`), a 100 B value, topic `--topic`,
partition = connection index mod `--partitions`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import struct
import sys
import threading
import time
from pathlib import Path

# The end-to-end harness's raw encoders: the batch checksum and record varints.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests/e2e"))
from harness.raw import crc32c, varint  # noqa: E402

ACTIVE_EVERY = 10  # one connection in ten produces
REQUEST_TIMEOUT_S = 30


# ------------------------------------------------------------------ encoding


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def record_batch(key: bytes, value: bytes, header: tuple[bytes, bytes], timestamp_ms: int) -> bytes:
    """A v2 record batch of one record, no compression, no producer id."""
    hk, hv = header
    body = (b"\x00" + varint(0) + varint(0) + varint(len(key)) + key + varint(len(value)) + value
            + varint(1) + varint(len(hk)) + hk + varint(len(hv)) + hv)
    record = varint(len(body)) + body
    after_crc = struct.pack(">hiqqqhii", 0, 0, timestamp_ms, timestamp_ms, -1, -1, -1, 1) + record
    after_length = struct.pack(">ibI", -1, 2, crc32c(after_crc)) + after_crc
    return struct.pack(">qi", 0, len(after_length)) + after_length


def produce_v9(correlation_id: int, topic: bytes, partition: int, batch: bytes) -> bytes:
    """A Produce v9 request (flexible: compact strings and arrays, tagged fields), acks=all."""
    header = struct.pack(">hhih", 0, 9, correlation_id, -1) + b"\x00"
    body = (b"\x00" + struct.pack(">hi", -1, REQUEST_TIMEOUT_S * 1000)
            + uvarint(2) + uvarint(len(topic) + 1) + topic
            + uvarint(2) + struct.pack(">i", partition) + uvarint(len(batch) + 1) + batch + b"\x00"
            + b"\x00" + b"\x00")
    frame = header + body
    return struct.pack(">i", len(frame)) + frame


def read_uvarint(buf: bytes, at: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[at]
        at += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, at
        shift += 7


def produce_v9_error(frame: bytes, correlation_id: int) -> int:
    """The first partition's error code of a Produce v9 response (header v1)."""
    (got,) = struct.unpack_from(">i", frame, 0)
    if got != correlation_id:
        raise ValueError(f"correlation id {got}, expected {correlation_id}")
    _, at = read_uvarint(frame, 4)  # header tagged fields (none)
    _, at = read_uvarint(frame, at)  # topics
    name, at = read_uvarint(frame, at)
    at += name - 1
    _, at = read_uvarint(frame, at)  # partitions
    (error,) = struct.unpack_from(">h", frame, at + 4)
    return error


API_VERSIONS_V0 = struct.pack(">ihhih", 10, 18, 0, 1, -1)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(length)


# ------------------------------------------------------------------ connections


class Conn:
    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index, self.reader, self.writer = index, reader, writer
        self.correlation = 1

    def close(self) -> None:
        self.writer.close()


class Client:
    def __init__(self, host: str, port: int, topic: str, partitions: int, tenant: str) -> None:
        self.host, self.port = host, port
        self.topic, self.partitions = topic.encode(), partitions
        now_ms = int(time.time() * 1000)
        value = (b"{\"event\": \"scale\", \"n\": 1234567890, \"tags\": [\"a\", \"b\"], \"pad\": \"" + b"x" * 100)[:100]
        # One batch per partition, built once: the CRC is computed in Python, and the broker takes
        # the same batch again as a new write (no producer id, so no duplicate detection).
        self.batch = record_batch(b"k0000000001", value, (b"tenant", tenant.encode()), now_ms)
        self.conns: list[Conn] = []

    async def open_one(self, index: int) -> tuple[Conn | None, float | None, str | None]:
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 30)
            writer.write(API_VERSIONS_V0)
            frame = await asyncio.wait_for(read_frame(reader), 30)
            (error,) = struct.unpack_from(">h", frame, 4)
            if error:
                writer.close()
                return None, None, f"ApiVersions error {error}"
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            return None, None, type(e).__name__
        return Conn(index, reader, writer), (time.perf_counter() - started) * 1000, None

    async def grow(self, to: int, concurrency: int) -> dict:
        started = time.perf_counter()
        latencies, failures = [], {}
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            async with gate:
                conn, ms, error = await self.open_one(index)
            if conn:
                self.conns.append(conn)
                latencies.append(ms)
            else:
                failures[error] = failures.get(error, 0) + 1

        first = len(self.conns)
        await asyncio.gather(*(one(i) for i in range(first, to)))
        self.conns.sort(key=lambda c: c.index)
        return {"open": len(self.conns), "opened": len(latencies), "failures": failures,
                "accept_ms": latencies, "seconds": time.perf_counter() - started}

    async def probe(self, count: int) -> dict:
        latencies, failures = [], {}
        for _ in range(count):
            conn, ms, error = await self.open_one(-1)
            if conn:
                conn.close()
                try:
                    await conn.writer.wait_closed()
                except OSError:
                    pass
                latencies.append(ms)
            else:
                failures[error] = failures.get(error, 0) + 1
        return {"accept_ms": latencies, "failures": failures}

    async def shrink(self, to: int) -> dict:
        while len(self.conns) > to:
            self.conns.pop().close()
        await asyncio.sleep(0.5)
        return {"open": len(self.conns)}

    async def produce(self, seconds: float, rate: float) -> dict:
        active = [c for c in self.conns if c.index % ACTIVE_EVERY == 0]
        latencies: list[float] = []
        failures: dict[str, int] = {}
        lags: list[float] = []
        cpu0, started = time.process_time(), time.perf_counter()
        end = started + seconds

        async def loop_lag() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append((time.perf_counter() - t - 0.01) * 1000)

        async def producer(conn: Conn) -> None:
            due = started + random.uniform(0, 1 / rate)
            partition = conn.index % self.partitions
            while True:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if time.perf_counter() >= end:
                    return
                conn.correlation += 1
                request = produce_v9(conn.correlation, self.topic, partition, self.batch)
                sent = time.perf_counter()
                try:
                    conn.writer.write(request)
                    frame = await asyncio.wait_for(read_frame(conn.reader), REQUEST_TIMEOUT_S)
                    error = produce_v9_error(frame, conn.correlation)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                    failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
                    return  # this connection is done for
                if error:
                    failures[f"error {error}"] = failures.get(f"error {error}", 0) + 1
                else:
                    latencies.append((time.perf_counter() - sent) * 1000)
                due += 1 / rate

        await asyncio.gather(loop_lag(), *(producer(c) for c in active))
        wall = time.perf_counter() - started
        return {"active": len(active), "open": len(self.conns), "latency_ms": latencies, "failures": failures,
                "loop_lag_ms": lags, "client_cpu_s": time.process_time() - cpu0, "wall_s": wall}


async def serve(client: Client) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, {"cmd": "quit"})

    threading.Thread(target=read_stdin, daemon=True).start()
    while True:
        command = await commands.get()
        cmd = command["cmd"]
        if cmd == "quit":
            await client.shrink(0)
            return
        if cmd == "grow":
            answer = await client.grow(command["to"], command.get("concurrency", 50))
        elif cmd == "probe":
            answer = await client.probe(command["count"])
        elif cmd == "shrink":
            answer = await client.shrink(command["to"])
        elif cmd == "produce":
            answer = await client.produce(command["seconds"], command["rate"])
        else:
            answer = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(answer), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True, help="host:port")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--tenant", default="t000000")
    args = ap.parse_args()
    # The cyclic collector would walk every connection's objects now and then, a pause of tens of
    # ms with 10,000 of them, charged to whichever requests were in flight; what this process
    # allocates is freed by reference counting, so it runs without it.
    gc.disable()
    host, port = args.bootstrap.rsplit(":", 1)
    asyncio.run(serve(Client(host, int(port), args.topic, args.partitions, args.tenant)))


if __name__ == "__main__":
    main()
