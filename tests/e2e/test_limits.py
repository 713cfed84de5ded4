"""Limits and shutdown: a connection limit that is real and counted, idle connections closed,
and SIGTERM that stops accepting, answers what is in flight, and exits within its grace period.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
from types import SimpleNamespace

from harness import LibrdkafkaClient, raw, unique
from harness.keyward import Keyward

from test_keyward import TABLE, keys_of
from test_operator import wait_for


def _fetch_v4(correlation_id: int, topic: str, max_wait_ms: int) -> bytes:
    """A Fetch that the broker holds for max_wait_ms when there is nothing to read."""
    client_id = b"raw-test"
    t = topic.encode()
    header = struct.pack(">hhih", 1, 4, correlation_id, len(client_id)) + client_id
    body = struct.pack(">iiiib", -1, max_wait_ms, 1, 1 << 20, 0)
    body += struct.pack(">ih", 1, len(t)) + t + struct.pack(">iiqi", 1, 0, 0, 1 << 20)
    msg = header + body
    return struct.pack(">i", len(msg)) + msg


def _closed(sock: socket.socket, timeout_s: float = 5) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_connection_limit_is_real_and_counted(tmp_path, eu, us):
    with Keyward(
        tmp_path, "eu", {"eu": eu, "us": us}, TABLE, extra_config="limits: { max_connections: 3 }\n"
    ) as kw:
        held = [socket.create_connection(("127.0.0.1", kw.bootstrap_port), timeout=5) for _ in range(3)]
        wait_for(lambda: kw.metric("keyward_client_connections_open") == 3, 5, "three open connections")
        extra = socket.create_connection(("127.0.0.1", kw.bootstrap_port), timeout=5)
        assert _closed(extra), "a fourth connection must be closed"
        assert kw.metric("keyward_client_connections_refused_total") == 1
        # The held ones still work, and a freed place is taken again.
        held[0].sendall(raw.api_versions(5))
        assert struct.unpack(">i", raw.recv_frame(held[0])[:4])[0] == 5
        held.pop().close()
        wait_for(lambda: kw.metric("keyward_client_connections_open") == 2, 5, "a place to free up")
        again = socket.create_connection(("127.0.0.1", kw.bootstrap_port), timeout=5)
        again.sendall(raw.api_versions(6))
        assert struct.unpack(">i", raw.recv_frame(again)[:4])[0] == 6
        for s in [*held, again, extra]:
            s.close()


def test_idle_connections_are_closed(tmp_path, eu, us):
    with Keyward(
        tmp_path, "eu", {"eu": eu, "us": us}, TABLE, extra_config="limits: { idle_timeout_secs: 1 }\n"
    ) as kw:
        with socket.create_connection(("127.0.0.1", kw.bootstrap_port), timeout=5) as s:
            started = time.monotonic()
            assert _closed(s, 5)
            assert 0.8 <= time.monotonic() - started < 4
        wait_for(lambda: kw.metric("keyward_client_connections_closed_total", cause="idle") == 1, 5, "idle count")


def test_a_connection_waiting_on_the_broker_is_not_idle(tmp_path, eu, us):
    """Idle means nothing asked and nothing owed: a Fetch the broker holds longer than the idle
    timeout is answered, and only then does the idle clock run."""
    topic = unique("orders.longpoll")
    eu.create_topic(topic, partitions=1)
    with Keyward(
        tmp_path, "eu", {"eu": eu, "us": us}, TABLE, extra_config="limits: { idle_timeout_secs: 1 }\n"
    ) as kw:
        leader = eu.admin().list_topics(topic, timeout=10).topics[topic].partitions[0].leader
        with socket.create_connection(("127.0.0.1", kw.port_base + leader), timeout=10) as s:
            started = time.monotonic()
            s.sendall(_fetch_v4(31, topic, max_wait_ms=3000))
            frame = raw.recv_frame(s)
            assert struct.unpack(">i", frame[:4])[0] == 31
            assert time.monotonic() - started >= 2.5, "the broker held the fetch"
            answered = time.monotonic()
            assert _closed(s, 5)
            assert 0.8 <= time.monotonic() - answered < 4


def test_sigterm_answers_in_flight_requests_then_exits(tmp_path, eu, us):
    topic = unique("orders.drain")
    eu.create_topic(topic, partitions=1)
    kw = Keyward(
        tmp_path, "eu", {"eu": eu, "us": us}, TABLE, extra_config="limits: { shutdown_grace_secs: 8 }\n"
    ).start()
    try:
        leader = eu.admin().list_topics(topic, timeout=10).topics[topic].partitions[0].leader
        with socket.create_connection(("127.0.0.1", kw.port_base + leader), timeout=10) as s:
            s.sendall(_fetch_v4(21, topic, max_wait_ms=2000))
            time.sleep(0.3)  # the Fetch is now waiting in the broker
            sent_term = time.monotonic()
            kw.proc.send_signal(signal.SIGTERM)
            # The held Fetch is still answered...
            frame = raw.recv_frame(s)
            assert struct.unpack(">i", frame[:4])[0] == 21
            # ...and then the connection closes and the process exits, well within the grace.
            assert _closed(s, 5)
        assert kw.proc.wait(timeout=10) == 0
        assert time.monotonic() - sent_term < 8
        # Nothing listens any more.
        try:
            socket.create_connection(("127.0.0.1", kw.bootstrap_port), timeout=2).close()
            listening = True
        except OSError:
            listening = False
        assert not listening
        assert "shutting down" in kw.logs(50)
    finally:
        kw.stop()
    # The cluster is untouched by the proxy's exit.
    assert LibrdkafkaClient().metadata(eu.bootstrap)


def _dead_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_broker_lines_are_rate_limited_with_a_count(tmp_path):
    """Hundreds of clients reconnecting to a cluster that is down log five lines per 10 s, not
    one each; the next line says how many were left out, and the metrics count every one."""
    dead = {name: SimpleNamespace(addresses=[f"127.0.0.1:{_dead_port()}"]) for name in ("eu", "us")}
    with Keyward(tmp_path, "eu", dead, TABLE, extra_config="reads: { prefer: [eu] }\n") as kw:
        line = "cannot reach the broker; closing the client connection"
        started = time.monotonic()
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", kw.bootstrap_port), timeout=5) as s:
                assert _closed(s)
        assert time.monotonic() - started < 10, "all in one 10 s window"
        # (The harness's own check that the bootstrap port answers is one more.)
        closed = wait_for(
            lambda: kw.metric("keyward_client_connections_closed_total", cause="upstream_unreachable") >= 200,
            5,
            "every connection counted",
        ) and int(kw.metric("keyward_client_connections_closed_total", cause="upstream_unreachable"))
        logged = [l for l in kw.logs(2000).splitlines() if line in l]
        assert len(logged) == 5, logged
        assert all("suppressed=0" in l for l in logged), logged
        # The next window's first line says how many were left out.
        time.sleep(max(0.0, started + 10.5 - time.monotonic()))
        with socket.create_connection(("127.0.0.1", kw.bootstrap_port), timeout=5) as s:
            assert _closed(s)
        wait_for(lambda: len([l for l in kw.logs(2000).splitlines() if line in l]) == 6, 5, "a sixth line")
        last = [l for l in kw.logs(2000).splitlines() if line in l][-1]
        assert f"suppressed={closed - 5}" in last, last


def _status_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _big_gzip_produce(correlation_id: int, topic: str, key: bytes, records: int, value_len: int) -> bytes:
    """Produce v3, acks=-1, one gzip batch of `records` records (key, value of zeros): a few KB
    on the wire, `records * value_len` bytes once inflated."""
    batch = raw.record_batch([(key, bytes(value_len))] * records, compress=True)
    return raw.produce(correlation_id, topic, {0: batch}, acks=-1, timeout_ms=30000, version=3)


def _produce_v3_error(frame: bytes) -> int:
    """The error code of the single partition of a Produce v3 response (after its length)."""
    (code,) = raw.produce_errors(frame, version=3).values()
    return code


def test_many_large_compressed_batches_stay_within_the_memory_budget(tmp_path, eu, us):
    """40 connections each send one gzip batch that inflates to 6 MiB (a few KB on the wire).
    Each connection's buffer is freed after its batch and all of them together draw on
    limits.max_decompressed_bytes_total (32 MiB here), so keyward's peak RSS grows by less than
    that budget plus 16 MiB, where keeping every connection's high-water mark costs 40 x 8 MiB.
    Every answer is a success or the retriable NOT_ENOUGH_REPLICAS (19), and exactly the
    acknowledged batches are in the topic."""
    connections, records, value_len = 40, 96, 64 * 1024  # 6 MiB inflated per batch
    budget_mib, slack_mib = 32, 16
    topic = unique("orders.memory")
    eu.create_topic(topic, partitions=1)
    with Keyward(
        tmp_path,
        "eu",
        {"eu": eu, "us": us},
        TABLE,
        extra_config=(
            f"limits: {{ max_decompressed_bytes: {8 << 20}, max_decompressed_bytes_total: {budget_mib << 20} }}\n"
        ),
    ) as kw:
        key = keys_of(kw, "eu", 1, "mem")[0].encode()
        leader = eu.admin().list_topics(topic, timeout=10).topics[topic].partitions[0].leader
        requests = [_big_gzip_produce(i + 1, topic, key, records, value_len) for i in range(connections)]
        assert max(len(r) for r in requests) < 64 * 1024, "small on the wire"
        socks = [socket.create_connection(("127.0.0.1", kw.port_base + leader), timeout=30) for _ in range(connections)]
        time.sleep(0.5)  # idle: connections open, nothing inflated yet
        base = _status_kib(kw.pid, "VmRSS")
        started = time.monotonic()
        for s, r in zip(socks, requests):
            s.sendall(r)
        codes = [_produce_v3_error(raw.recv_frame(s)) for s in socks]
        elapsed = time.monotonic() - started
        peak = _status_kib(kw.pid, "VmHWM")
        for s in socks:
            s.close()
        grown_mib = (peak - base) / 1024
        print(f"peak RSS {peak / 1024:.1f} MiB, {grown_mib:.1f} MiB over idle, answers {sorted(set(codes))}, {elapsed:.1f}s")
        assert set(codes) <= {0, 19}, codes
        assert codes.count(0) >= 1
        assert grown_mib < budget_mib + slack_mib, f"peak RSS grew {grown_mib:.1f} MiB"
        # What the connections hold afterwards is sampled once per probe round (2 s): below
        # what one connection may keep, since the large buffers were given back.
        wait_for(lambda: "keyward_decompression_bytes " in kw.metrics_text(), 5, "the gauge")
        time.sleep(2.5)
        assert kw.metric("keyward_decompression_bytes") <= 1 << 20
        landed = len(eu.read_all(topic))
        assert landed == codes.count(0) * records, (landed, codes)


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


def test_keyward_raises_its_open_file_limit_and_warns_when_it_is_too_low(tmp_path, eu, us):
    """Every client connection takes two descriptors. Started with a soft limit of 256, keyward
    raises it to the hard limit and logs it; with a hard limit below what
    limits.max_connections needs (2 per connection and 256 more), it says so at start."""
    from harness.keyward import binary

    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    kw = Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE, name="raised",
                 extra_config="limits: { max_connections: 100 }\n")
    kw.command = ["prlimit", f"--nofile=256:{hard}", str(binary()), "run", "--config", str(kw.config_path)]
    with kw:
        assert _open_files_limit(kw.pid) == (hard, hard)
        assert "open-file limit" in kw.logs(200)
        assert "below what limits.max_connections needs" not in kw.logs(200)

    low = Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE, name="low",
                  extra_config="limits: { max_connections: 1000 }\n")
    low.command = ["prlimit", "--nofile=512:512", str(binary()), "run", "--config", str(low.config_path)]
    with low:
        assert _open_files_limit(low.pid) == (512, 512)
        assert "below what limits.max_connections needs" in low.logs(200), low.logs(40)
