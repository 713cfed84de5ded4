"""A Kafka client written by hand on a socket, for what no client library will do: send a
Produce without authenticating, or in the middle of a SASL exchange.

Only what the tests need: ApiVersions v0, SaslHandshake v1, SaslAuthenticate v1 and Produce
v3-v7 with one record batch (magic 2, CRC-32C, uncompressed or gzip) per partition. Encoding
follows the Kafka protocol guide; nothing here is shared with keyward's own code.
"""

from __future__ import annotations

import gzip
import socket
import struct
import time

# ------------------------------------------------------------------ CRC-32C (Castagnoli)

_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------ primitives


def varint(n: int) -> bytes:
    """Zigzag varint, as record fields use."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = z & 0x7F
        z >>= 7
        if z:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _string(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def _bytes(b: bytes | None) -> bytes:
    if b is None:
        return struct.pack(">i", -1)
    return struct.pack(">i", len(b)) + b


def _frame(api_key: int, version: int, correlation_id: int, body: bytes, client_id: str = "raw-client") -> bytes:
    msg = struct.pack(">hhi", api_key, version, correlation_id) + _string(client_id) + body
    return struct.pack(">i", len(msg)) + msg


def record_batch(
    records: list[tuple[bytes | None, bytes | None]],
    compress: bool = False,
    producer: tuple[int, int] = (-1, -1),
    base_sequence: int = -1,
) -> bytes:
    """One magic-2 batch; gzip-compressed with `compress`. Without `producer` (id, epoch) it has
    no producer id (not idempotent); with one, its records are numbered from `base_sequence`."""
    now = int(time.time() * 1000)
    body = b""
    for i, (key, value) in enumerate(records):
        rec = bytes([0]) + varint(0) + varint(i)
        rec += varint(-1) if key is None else varint(len(key)) + key
        rec += varint(-1) if value is None else varint(len(value)) + value
        rec += varint(0)
        body += varint(len(rec)) + rec
    attributes = 1 if compress else 0
    if compress:
        body = gzip.compress(body, 6)
    after_crc = (
        struct.pack(">hiqqqhii", attributes, len(records) - 1, now, now, *producer, base_sequence, len(records))
        + body
    )
    after_length = struct.pack(">ib", -1, 2) + struct.pack(">I", crc32c(after_crc)) + after_crc
    return struct.pack(">qi", 0, len(after_length)) + after_length


# ------------------------------------------------------------------ requests


def api_versions(correlation_id: int) -> bytes:
    return _frame(18, 0, correlation_id, b"")


def sasl_handshake(correlation_id: int, mechanism: str) -> bytes:
    return _frame(17, 1, correlation_id, _string(mechanism))


def sasl_authenticate(correlation_id: int, auth_bytes: bytes) -> bytes:
    return _frame(36, 1, correlation_id, _bytes(auth_bytes))


def init_producer_id(correlation_id: int) -> bytes:
    """InitProducerId v1 for an idempotent producer (no transactional id)."""
    return _frame(22, 1, correlation_id, _string(None) + struct.pack(">i", 60_000))


def create_topics(correlation_id: int, topic: str, partitions: int = 1) -> bytes:
    """CreateTopics v2: one topic, replication factor 1, no assignments or configs."""
    body = (
        struct.pack(">i", 1)
        + _string(topic)
        + struct.pack(">ihii", partitions, 1, 0, 0)
        + struct.pack(">i?", 10_000, False)
    )
    return _frame(19, 2, correlation_id, body)


def produce(
    correlation_id: int,
    topic: str,
    partitions: dict[int, bytes],
    acks: int = -1,
    timeout_ms: int = 10000,
    version: int = 7,
) -> bytes:
    """Produce v3-v7 (one layout): `partitions` maps partition index to its records (a record
    batch)."""
    assert 3 <= version <= 7, "v8+ responses and v9+ requests have other layouts"
    body = _string(None) + struct.pack(">hi", acks, timeout_ms)
    body += struct.pack(">i", 1) + _string(topic) + struct.pack(">i", len(partitions))
    for index, batch in partitions.items():
        body += struct.pack(">i", index) + _bytes(batch)
    return _frame(0, version, correlation_id, body)


# ------------------------------------------------------------------ responses


def recv_frame(sock: socket.socket) -> bytes:
    """The next response (without its length prefix); ConnectionError when the peer closed."""

    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the connection was closed")
            out += chunk
        return out

    (n,) = struct.unpack(">i", exact(4))
    return exact(n)


def produce_errors(frame: bytes, version: int = 7) -> dict[tuple[str, int], int]:
    """{(topic, partition): error code} of a Produce v3-v7 response (header v0)."""
    pos = 4  # correlation id
    (topics,) = struct.unpack_from(">i", frame, pos)
    pos += 4
    out = {}
    for _ in range(topics):
        (n,) = struct.unpack_from(">h", frame, pos)
        name = frame[pos + 2 : pos + 2 + n].decode()
        pos += 2 + n
        (parts,) = struct.unpack_from(">i", frame, pos)
        pos += 4
        for _ in range(parts):
            index, code = struct.unpack_from(">ih", frame, pos)
            # base offset, log append time, and from v5 the log start offset
            pos += 4 + 2 + 8 + 8 + (8 if version >= 5 else 0)
            out[(name, index)] = code
    return out


def producer_id(frame: bytes) -> tuple[int, int]:
    """(producer id, epoch) of an InitProducerId v1 response; AssertionError on an error code."""
    _, _, error, producer, epoch = struct.unpack_from(">iihqh", frame, 0)
    assert error == 0, f"InitProducerId failed: error {error}"
    return producer, epoch


def sasl_authenticate_error(frame: bytes) -> int:
    """The error code of a SaslAuthenticate v1 response (header v0)."""
    return struct.unpack_from(">h", frame, 4)[0]
