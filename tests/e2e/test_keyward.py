"""keyward in front of real Kafka, driven by real clients.

Every test writes through keyward with an unmodified client (the Java client, librdkafka,
franz-go) and checks the outcome where it matters: in the cluster itself, read directly, and in
what the client was told.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from functools import lru_cache

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions  # noqa: F401  (documents the API used below)

from harness import FranzClient, JavaClient, LibrdkafkaClient, raw, record, unique
from harness.keyward import Keyward

INVALID_RECORD = 87

TABLE = """
rules:
  - name: orders
    topics: ["orders.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    null_key: reject
  - name: lenient
    topics: ["lenient.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    null_key: local
  - name: watched
    topics: ["watched.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    on_foreign: audit
  - name: tenants
    topics: ["tenant.*"]
    by: header
    header: tenant
    owners: { eu: [acme, globex], us: [initech] }
  - name: accounts
    topics: ["accounts.*"]
    by: key_part
    delimiter: "|"
    index: 0
    owners: { eu: [tenant-1, tenant-42], us: [tenant-7] }
  - name: inventory
    topics: ["inventory.*"]
    by: partition
    owners: { eu: ["0-1"], us: ["2-3"] }
  - name: audit-log
    topics: ["audit.*"]
    by: topic
    owner: eu
  - name: us-only
    topics: ["usonly.*"]
    by: topic
    owner: us
  - name: telemetry
    topics: ["metrics.*"]
    owner: any
default: allow
"""


@pytest.fixture(scope="module")
def kw_eu(tmp_path_factory, eu, us):
    """The eu proxy, in front of the 3-broker eu cluster."""
    with Keyward(tmp_path_factory.mktemp("kw"), "eu", {"eu": eu, "us": us}, TABLE) as kw:
        yield kw


@pytest.fixture(scope="module")
def kw_us(tmp_path_factory, eu, us):
    """The us proxy, in front of the 1-broker us cluster (one broker: every partition of a
    request goes in one Produce request, so mixed requests are certain)."""
    with Keyward(tmp_path_factory.mktemp("kw"), "us", {"eu": eu, "us": us}, TABLE) as kw:
        yield kw


@pytest.fixture
def keyward_with(tmp_path, eu, us):
    """Starts a proxy with a table of the test's own; stopped when the test ends."""
    started = []

    def start(region: str, table: str) -> Keyward:
        kw = Keyward(tmp_path, region, {"eu": eu, "us": us}, table, name=f"kw-{len(started)}").start()
        started.append(kw)
        return kw

    yield start
    for kw in started:
        kw.stop()


@lru_cache(maxsize=None)
def _slot_of(config_path: str, key: str) -> tuple[str, int]:
    import subprocess

    from harness.keyward import binary

    line = subprocess.run(
        [str(binary()), "owner", "--config", config_path, "--topic", "orders.x", "--key", key],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    fields = dict(f.split("=", 1) for f in line)
    return fields["region"], int(fields["slot"])


def keys_of(kw: Keyward, region: str, n: int, prefix: str = "cust") -> list[str]:
    """n keys owned by `region` under the `orders` rule, as `keyward owner` answers."""
    out = []
    i = 0
    while len(out) < n:
        key = f"{prefix}-{i}"
        if _slot_of(str(kw.config_path), key)[0] == region:
            out.append(key)
        i += 1
    return out


def values(records) -> list[bytes]:
    return [r["value"] for r in records]


# --------------------------------------------------------------------------- ownership by key


def test_owned_keys_land_and_foreign_keys_are_rejected(client, eu, kw_eu):
    topic = unique("orders.basic")
    eu.create_topic(topic, partitions=16)
    eu_keys, us_keys = keys_of(kw_eu, "eu", 4), keys_of(kw_eu, "us", 4)
    recs = [record(k.encode(), f"v-{k}".encode()) for k in eu_keys + us_keys]
    before = kw_eu.metric("keyward_produce_records_total", rule="orders", decision="rejected", reason="foreign_owner")

    results = client.produce(kw_eu.bootstrap, topic, recs, {"linger_ms": 5})

    assert [r["ok"] for r in results] == [True] * 4 + [False] * 4, results
    for key, r in zip(us_keys, results[4:]):
        assert r["error_code"] == INVALID_RECORD, r
        if isinstance(client, JavaClient):
            # The Java client surfaces keyward's per-record message (KIP-467).
            _, slot = _slot_of(str(kw_eu.config_path), key)
            assert f'key "{key}" is owned by region us (rule orders, slot {slot}); this proxy writes for eu' in r[
                "error_message"
            ], r
    stored = eu.read_all(topic)
    assert sorted(r["key"] for r in stored) == sorted(k.encode() for k in eu_keys)
    after = kw_eu.metric("keyward_produce_records_total", rule="orders", decision="rejected", reason="foreign_owner")
    assert after - before == 4


def test_java_partitioner_lines_up_with_slots(eu, kw_eu):
    """With slots equal to the partition count, the Java client's default partitioner puts
    each key in the partition numbered like its slot."""
    topic = unique("orders.aligned")
    eu.create_topic(topic, partitions=16)
    keys = keys_of(kw_eu, "eu", 12, prefix="align")
    results = JavaClient().produce(kw_eu.bootstrap, topic, [record(k.encode(), b"v") for k in keys])
    assert all(r["ok"] for r in results), results
    for key, r in zip(keys, results):
        assert r["partition"] == _slot_of(str(kw_eu.config_path), key)[1]


def test_idempotent_producer_keeps_writing_after_rejected_batches(client, eu, kw_eu):
    """Rejected batches never reach the broker, so the producer's sequence numbers for the
    partition have a gap; the client must recover by itself and keep writing owned keys to the
    same partition, without OUT_OF_ORDER_SEQUENCE_NUMBER or a fatal error."""
    topic = unique("orders.idem")
    eu.create_topic(topic, partitions=1)
    eu_keys, us_keys = keys_of(kw_eu, "eu", 6, "idem"), keys_of(kw_eu, "us", 5, "idem")
    order = [eu_keys[0]]
    for a, b in zip(us_keys, eu_keys[1:]):
        order += [a, b]
    recs = [record(k.encode(), f"{i}".encode(), partition=0) for i, k in enumerate(order)]

    results = client.produce(kw_eu.bootstrap, topic, recs, {"acks": "all", "idempotence": True}, flush_every=1)

    for k, r in zip(order, results):
        if k in eu_keys:
            assert r["ok"], (k, r, results)
        else:
            assert r["error_code"] == INVALID_RECORD, (k, r)
    stored = eu.read_all(topic)
    assert [r["key"] for r in stored] == [k.encode() for k in order if k in eu_keys]


def test_a_mixed_request_lands_its_owned_partitions_and_rejects_the_rest(us, kw_us):
    topic = unique("orders.mixed")
    us.create_topic(topic, partitions=4)
    us_keys, eu_keys = keys_of(kw_us, "us", 2, "mix"), keys_of(kw_us, "eu", 2, "mix")
    recs = [
        record(us_keys[0].encode(), b"a", partition=0),
        record(eu_keys[0].encode(), b"b", partition=1),
        record(us_keys[1].encode(), b"c", partition=2),
        record(eu_keys[1].encode(), b"d", partition=3),
    ]
    before = kw_us.metric("keyward_produce_requests_total", path="partial")

    # A long linger puts all four partitions in one Produce request to the one broker (the
    # Java client drains every ready partition of a broker into one request; librdkafka sends
    # one request per partition, so it never mixes).
    results = JavaClient().produce(kw_us.bootstrap, topic, recs, {"linger_ms": 300})

    assert [r["ok"] for r in results] == [True, False, True, False], results
    assert [r["error_code"] for r in results[1::2]] == [INVALID_RECORD] * 2
    assert kw_us.metric("keyward_produce_requests_total", path="partial") > before
    stored = us.read_all(topic)
    assert [(r["partition"], r["value"]) for r in stored] == [(0, b"a"), (2, b"c")]


def test_mixed_batches_are_refused_whole(eu, kw_eu):
    """One batch holding keys of two owners is never split: all of it is refused."""
    topic = unique("orders.batch")
    eu.create_topic(topic, partitions=1)
    keys = keys_of(kw_eu, "eu", 3, "mb") + keys_of(kw_eu, "us", 1, "mb")
    before = kw_eu.metric("keyward_produce_batches_total", reason="mixed_batch")
    results = JavaClient().produce(
        kw_eu.bootstrap, topic, [record(k.encode(), b"v", partition=0) for k in keys], {"linger_ms": 200}
    )
    assert not any(r["ok"] for r in results), results
    assert kw_eu.metric("keyward_produce_batches_total", reason="mixed_batch") > before
    # The foreign record carries keyward's reason; its batch mates the client's generic one.
    assert "is owned by region us" in results[3]["error_message"], results[3]
    assert eu.read_all(topic) == []


def _wait_for_log(kw: Keyward, *needles: str, timeout_s: float = 20) -> str:
    """The first line of keyward's log holding every one of `needles`, waiting for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in kw.log_path.read_text(errors="replace").splitlines():
            if all(n in line for n in needles):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {needles} within {timeout_s}s:\n{kw.logs()}")
        time.sleep(0.1)


def test_a_mixed_batch_under_reject_names_the_remedy_and_misaligned_topics_are_warned_about(keyward_with, eu, us):
    """librdkafka's default partitioner (consistent_random, CRC32) puts keys of both regions in
    every batch, which keyward refuses whole. The client's error and keyward's log say what to
    change (the murmur2 partitioner, a partition count that is a multiple of the slots); the log
    names the client.id and the topic. Topics with 6 partitions under a 4-slot rule are warned
    about at start (one created before keyward) and when a client's Metadata passes through (one
    created after), counted in keyward_misaligned_topics, and listed by `keyward check
    --clusters`."""
    import subprocess

    from harness.keyward import binary

    prefix = unique("explain")
    table = f"""
rules:
  - name: explained
    topics: ["{prefix}.*"]
    by: key
    slots: 4
    owners: {{ eu: ["0-1"], us: ["2-3"] }}
    on_foreign: reject
default: allow
"""
    early, late = f"{prefix}.early", f"{prefix}.late"
    eu.create_topic(early, partitions=6)
    kw = keyward_with("eu", table)
    remedy = "multiple of 4 partitions"
    line = _wait_for_log(kw, "WARN", f'topic "{early}" has 6 partitions', remedy)
    assert "not a multiple of the 4 slots of rule explained" in line, line

    eu.create_topic(late, partitions=6)
    recs = [record(f"key-{i % 40}".encode(), b"v") for i in range(200)]
    results = LibrdkafkaClient().produce(
        kw.bootstrap,
        late,
        recs,
        {"client_id": "explain-me", "linger_ms": 50, "native": {"partitioner": "consistent_random"}},
    )
    refused = [r for r in results if not r["ok"]]
    assert refused, results
    # librdkafka reports the codes only (INVALID_RECORD for the listed records,
    # _INVALID_DIFFERENT_RECORD for their batch mates): keyward's log is what names the client.
    assert {r["error_code"] for r in refused} <= {INVALID_RECORD, -138}, refused
    line = _wait_for_log(kw, "batch mixes regions", "explain-me", late)
    assert 'reason="mixed_batch"' in line and 'rule="explained"' in line and 'partition=' in line, line
    assert "murmur2 partitioner" in line and "multiple of 4 (the slots of rule explained)" in line, line

    # Even the murmur2 partitioner mixes regions on 6 partitions under 4 slots; the Java
    # client shows keyward's message, remedy included, on the first refused record of a batch.
    results = JavaClient().produce(kw.bootstrap, late, recs, {"linger_ms": 50})
    refused = [r for r in results if not r["ok"]]
    # (The batch mates of listed records get the client's own error, code -1.)
    assert refused and {r["error_code"] for r in refused} <= {INVALID_RECORD, -1}, results
    assert any(
        "murmur2 partitioner" in (r["error_message"] or "")
        and "multiple of 4 (the slots of rule explained)" in r["error_message"]
        for r in refused
    ), refused
    # The topic created after start: seen in the Metadata librdkafka asked for.
    _wait_for_log(kw, "WARN", f'topic "{late}" has 6 partitions', remedy)
    assert kw.metric("keyward_misaligned_topics") == 2
    assert kw.metric("keyward_produce_batches_total", rule="explained", reason="mixed_batch") > 0

    check = subprocess.run(
        [str(binary()), "check", "--config", str(kw.config_path), "--clusters"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Warnings, not failures: the config is valid.
    assert check.returncode == 0, check
    for topic in (early, late):
        assert f'warning: cluster eu: topic "{topic}" has 6 partitions, not a multiple of the 4 slots' in check.stdout, check.stdout
    assert "cluster us:" in check.stdout, check.stdout


def test_null_keys_follow_the_rule(client, eu, kw_eu):
    strict, lenient = unique("orders.null"), unique("lenient.null")
    eu.create_topic(strict, partitions=2)
    eu.create_topic(lenient, partitions=2)
    r = client.produce(kw_eu.bootstrap, strict, [record(None, b"no key")])
    assert r[0]["error_code"] == INVALID_RECORD, r
    r = client.produce(kw_eu.bootstrap, lenient, [record(None, b"no key")])
    assert r[0]["ok"], r
    assert values(eu.read_all(lenient)) == [b"no key"]
    assert eu.read_all(strict) == []


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_batches_are_inspected(client, codec, eu, kw_eu):
    topic = unique(f"orders.{codec}")
    eu.create_topic(topic, partitions=1)
    owned = keys_of(kw_eu, "eu", 5, "z")
    foreign = keys_of(kw_eu, "us", 5, "z")
    cfg = {"compression": codec, "linger_ms": 50}
    # Values that compress well, so the batch really is compressed.
    ok = client.produce(kw_eu.bootstrap, topic, [record(k.encode(), b"x" * 500, partition=0) for k in owned], cfg)
    bad = client.produce(kw_eu.bootstrap, topic, [record(k.encode(), b"y" * 500, partition=0) for k in foreign], cfg)
    assert all(r["ok"] for r in ok), ok
    assert all(r["error_code"] == INVALID_RECORD for r in bad), bad
    assert sorted(r["key"] for r in eu.read_all(topic)) == sorted(k.encode() for k in owned)


# --------------------------------------------------------------------------- other rule kinds


def test_header_rule(client, eu, kw_eu):
    topic = unique("tenant.billing")
    eu.create_topic(topic, partitions=2)
    recs = [
        record(b"k1", b"acme", headers=[("tenant", b"acme")]),
        record(b"k2", b"initech", headers=[("tenant", b"initech")]),
        record(b"k3", b"none", headers=[("other", b"acme")]),
        record(b"k4", b"globex", headers=[("trace", b"1"), ("tenant", b"globex")]),
    ]
    results = client.produce(kw_eu.bootstrap, topic, recs, {"linger_ms": 0}, flush_every=1)
    assert [r["ok"] for r in results] == [True, False, False, True], results
    assert {r["error_code"] for r in results[1:3]} == {INVALID_RECORD}
    assert sorted(values(eu.read_all(topic))) == [b"acme", b"globex"]


def test_key_part_rule(eu, kw_eu):
    """The owner is named by the part of the key before `|`: owned parts land, a part owned by
    us is refused with keyward's message, an unlisted part is refused as unmatched."""
    topic = unique("accounts.orders")
    eu.create_topic(topic, partitions=2)
    keys = ["tenant-42|order-1", "tenant-1|order-2", "tenant-7|order-3", "tenant-9|order-4"]
    unmatched_before = kw_eu.metric(
        "keyward_produce_records_total", rule="accounts", decision="rejected", reason="unmatched_key_part"
    )
    results = JavaClient().produce(
        kw_eu.bootstrap, topic, [record(k.encode(), k.encode()) for k in keys], {"linger_ms": 0}, flush_every=1
    )
    assert [r["ok"] for r in results] == [True, True, False, False], results
    assert {r["error_code"] for r in results[2:]} == {INVALID_RECORD}, results
    # The Java client surfaces keyward's per-record message (KIP-467).
    assert (
        'key part "tenant-7" of key "tenant-7|order-3" is owned by region us (rule accounts); '
        "this proxy writes for eu" in results[2]["error_message"]
    ), results[2]
    assert (
        'key part "tenant-9" of key "tenant-9|order-4" has no owner in rule accounts (unmatched: reject)'
        in results[3]["error_message"]
    ), results[3]
    assert sorted(r["key"] for r in eu.read_all(topic)) == [b"tenant-1|order-2", b"tenant-42|order-1"]
    unmatched_after = kw_eu.metric(
        "keyward_produce_records_total", rule="accounts", decision="rejected", reason="unmatched_key_part"
    )
    assert unmatched_after - unmatched_before == 1
    # The command line and the admin API answer the same for a key under this rule.
    assert kw_eu.owner(topic, "--key", "tenant-7|order-3") == "region=us rule=accounts slot=-"
    status, body = kw_eu.admin(f"/ownership/owner?topic={topic}&key=tenant-7%7Corder-3")
    assert (status, body.strip()) == (200, "region=us rule=accounts slot=-")


def test_partition_topic_any_and_default_rules(eu, kw_eu):
    client = LibrdkafkaClient()
    inventory, audit, usonly, metrics, other = (
        unique("inventory.stock"),
        unique("audit.login"),
        unique("usonly.ledger"),
        unique("metrics.cpu"),
        unique("unruled"),
    )
    eu.create_topic(inventory, partitions=4)
    for t in (audit, usonly, metrics, other):
        eu.create_topic(t, partitions=1)

    r = client.produce(kw_eu.bootstrap, inventory, [record(b"a", b"p0", partition=0), record(b"b", b"p2", partition=2)])
    assert [x["ok"] for x in r] == [True, False] and r[1]["error_code"] == INVALID_RECORD, r
    assert values(eu.read_all(inventory)) == [b"p0"]

    for topic, expect_ok in ((audit, True), (usonly, False), (metrics, True), (other, True)):
        r = client.produce(kw_eu.bootstrap, topic, [record(None, b"v")])
        assert r[0]["ok"] == expect_ok, (topic, r)
        assert len(eu.read_all(topic)) == (1 if expect_ok else 0)


def test_default_reject(keyward_with, eu):
    kw = keyward_with("eu", TABLE.replace("default: allow", "default: reject"))
    topic = unique("unruled")
    eu.create_topic(topic, partitions=1)
    before = kw.metric("keyward_produce_records_total", reason="default_reject")
    r = JavaClient().produce(kw.bootstrap, topic, [record(b"k", b"v")])
    assert r[0]["error_code"] == INVALID_RECORD, r
    assert "matches no ownership rule and the table's default is reject" in r[0]["error_message"]
    assert kw.metric("keyward_produce_records_total", reason="default_reject") > before
    assert eu.read_all(topic) == []


def test_audit_forwards_foreign_writes_and_counts_them(eu, kw_eu):
    topic = unique("watched.orders")
    eu.create_topic(topic, partitions=1)
    foreign = keys_of(kw_eu, "us", 2, "aud")
    before = kw_eu.metric("keyward_produce_records_total", rule="watched", decision="audited")
    r = FranzClient().produce(kw_eu.bootstrap, topic, [record(k.encode(), b"v", partition=0) for k in foreign])
    assert all(x["ok"] for x in r), r
    assert len(eu.read_all(topic)) == 2
    assert kw_eu.metric("keyward_produce_records_total", rule="watched", decision="audited") - before >= 2


# The audit log line's message, and its limit (src/proxy/mod.rs: AUDIT_LOG_BURST per 10 s).
AUDITED = "records owned by another region written to the local cluster"
AUDIT_LOG_BURST, AUDIT_LOG_INTERVAL_S = 10, 10


def _audit_lines(kw: Keyward) -> list[str]:
    """Every audit line keyward logged since it started (the whole log: a tail could cut one)."""
    return [l for l in kw.log_path.read_text(errors="replace").splitlines() if AUDITED in l]


def test_audited_writes_are_logged_with_who_and_what_rate_limited(eu, kw_eu):
    """Each audited batch is a log line naming the rule, the region owning the records, the
    client's client.id, the topic, the partition and the records audited, at most 10 lines per
    10 s; the first line of the next window says how many were left out, so every audited
    batch is either a line or counted in one."""
    topic = unique("watched.burst")
    eu.create_topic(topic, partitions=1)
    foreign, owned = keys_of(kw_eu, "us", 2, "aub"), keys_of(kw_eu, "eu", 1, "aub")[0]
    leader = eu.admin().list_topics(topic, timeout=10).topics[topic].partitions[0].leader
    batches = 3 * AUDIT_LOG_BURST
    lines_before = len(_audit_lines(kw_eu))

    def burst(s: socket.socket, n: int, first_id: int) -> None:
        batch = raw.record_batch([(owned.encode(), b"o"), (foreign[0].encode(), b"a"), (foreign[1].encode(), b"b")])
        for i in range(n):  # pipelined: one burst, well inside one 10 s window
            s.sendall(raw.produce(first_id + i, topic, {0: batch}, version=7))
        for _ in range(n):
            assert raw.produce_errors(raw.recv_frame(s)) == {(topic, 0): 0}

    with socket.create_connection(("127.0.0.1", kw_eu.port_base + leader), timeout=10) as s:
        started = time.monotonic()
        burst(s, batches, 1)
        assert time.monotonic() - started < AUDIT_LOG_INTERVAL_S / 2, "not one burst"
        assert len(eu.read_all(topic)) == 3 * batches, "audited records are written"
        new = _audit_lines(kw_eu)[lines_before:]
        assert 1 <= len(new) <= AUDIT_LOG_BURST < batches, new
        mine = [l for l in new if f'topic="{topic}"' in l]
        assert mine, new
        for field in ('rule="watched"', 'owner="us"', 'client_id="raw-client"', "partition=0", "records=2"):
            assert field in mine[0], (field, mine[0])
        # The next window: its first line counts the lines left out since the last one.
        time.sleep(AUDIT_LOG_INTERVAL_S + 0.5)
        burst(s, 1, 1000)
    deadline = time.monotonic() + 5
    while len(lines := _audit_lines(kw_eu)) <= lines_before + len(new) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "suppressed=" in lines[-1] and f'topic="{topic}"' in lines[-1], lines[-1]
    reported = sum(int(re.search(r"suppressed=(\d+)", l).group(1)) for l in lines)
    assert reported >= batches - AUDIT_LOG_BURST, lines[-1]
    # Nothing audited since the last line: every audited batch is a line or counted in one.
    assert len(lines) + reported == kw_eu.metric("keyward_produce_batches_total", decision="audited")


# --------------------------------------------------------------------------- frozen


def test_frozen_writes_are_retried_until_the_delivery_timeout(client, keyward_with, eu):
    """A frozen owner's writes get a retriable error: the client keeps retrying and fails only
    when its own delivery timeout runs out; nothing is written meanwhile."""
    kw = keyward_with("eu", TABLE + "frozen: [eu]\n")
    topic = unique("orders.frozen")
    eu.create_topic(topic, partitions=1)
    key = keys_of(kw, "eu", 1, "frz")[0]
    # franz-go retries a retriable produce error after a metadata refresh, and refreshes at
    # most every 5 s (its MetadataMinAge), so it needs a longer window to show a retry.
    timeout_ms = 16_000 if isinstance(client, FranzClient) else 4000
    start = time.monotonic()
    r = client.produce(
        kw.bootstrap,
        topic,
        [record(key.encode(), b"held", partition=0)],
        {"delivery_timeout_ms": timeout_ms, "request_timeout_ms": 1000},
        timeout_s=30,
    )
    elapsed = time.monotonic() - start
    assert not r[0]["ok"], r
    assert r[0]["error_code"] != INVALID_RECORD, r
    assert elapsed >= timeout_ms / 1000 * 0.8, (elapsed, r)
    held = kw.metric("keyward_produce_records_total", decision="held", reason="frozen")
    assert held >= 2, f"the client retried only {held} times"
    assert eu.read_all(topic) == []


def test_part_of_a_rule_frozen_or_taken_over_moves_only_that_part(keyward_with, eu):
    """Slots 0-3 of the orders rule frozen and slots 4-5 taken over by us, through a reload:
    writes to slots 0-3 are held with a retriable error, slots 4-5 are now us's (eu's proxy
    refuses them), and eu's slots 6-7 are written as before. The metrics, `/ownership` and
    `keyward owner` say so; reloading the table without the states lets slots 0-5 through."""
    kw = keyward_with("eu", TABLE)
    topic = unique("orders.parts")
    eu.create_topic(topic, partitions=1)
    by_slot: dict[int, str] = {}
    i = 0
    while len(by_slot) < 8:
        key = f"part-{i}"
        region, slot = _slot_of(str(kw.config_path), key)
        if region == "eu":
            by_slot.setdefault(slot, key)
        i += 1
    states = '    null_key: reject\n    frozen: ["0-3"]\n    takeover: { us: ["4-5"] }\n'
    kw.table_path.write_text(TABLE.replace("    null_key: reject\n", states, 1))
    status, body = kw.admin("/reload", method="POST")
    assert status == 200 and "loaded" in body, body

    def write(slot: int) -> dict:
        return LibrdkafkaClient().produce(
            kw.bootstrap,
            topic,
            [record(by_slot[slot].encode(), f"s{slot}".encode(), partition=0)],
            {"delivery_timeout_ms": 3000, "request_timeout_ms": 1000},
            timeout_s=20,
        )[0]

    held, moved, kept = write(2), write(4), write(6)
    assert not held["ok"] and held["error_code"] != INVALID_RECORD, held
    assert not moved["ok"] and moved["error_code"] == INVALID_RECORD, moved
    assert kept["ok"], kept
    assert values(eu.read_all(topic)) == [b"s6"]
    assert kw.metric("keyward_rule_parts", rule="orders", state="frozen") == 4
    assert kw.metric("keyward_rule_parts", rule="orders", state="taken_over") == 2
    assert kw.metric("keyward_rule_parts", rule="tenants", state="frozen") == 0
    orders = kw.ownership()["table"]["rules"][0]
    assert (orders["frozen"], orders["takeover"]) == (["0-3"], {"us": ["4-5"]}), orders
    assert kw.owner("orders.x", "--key", by_slot[2]).endswith("frozen=true")
    assert "region=us" in kw.owner("orders.x", "--key", by_slot[4])
    assert kw.owner("orders.x", "--key", by_slot[4]).endswith("takeover_from=eu")

    kw.table_path.write_text(TABLE)
    status, body = kw.admin("/reload", method="POST")
    assert status == 200 and "loaded" in body, body
    assert write(2)["ok"] and write(4)["ok"]
    assert sorted(values(eu.read_all(topic))) == [b"s2", b"s4", b"s6"]
    assert kw.metric("keyward_rule_parts", rule="orders", state="frozen") == 0


# --------------------------------------------------------------------------- acks=0


def _produce_v3(correlation_id: int, topic: str, key: bytes, acks: int) -> bytes:
    batch = raw.record_batch([(key, b"raw")])
    return raw.produce(correlation_id, topic, {0: batch}, acks=acks, timeout_ms=5000, version=3)


def test_acks0_rejection_closes_the_connection(eu, kw_eu):
    """acks=0 is owed no response, so refusing it closes the connection, as a broker does when
    an acks=0 produce fails; an accepted acks=0 produce keeps the connection open."""
    topic = unique("orders.acks0")
    eu.create_topic(topic, partitions=1)
    owned, foreign = keys_of(kw_eu, "eu", 1, "a0")[0], keys_of(kw_eu, "us", 1, "a0")[0]
    leader = eu.admin().list_topics(topic, timeout=10).topics[topic].partitions[0].leader
    before = kw_eu.metric("keyward_acks0_rejections_total")

    with socket.create_connection(("127.0.0.1", kw_eu.port_base + leader), timeout=10) as s:
        s.sendall(_produce_v3(1, topic, owned.encode(), acks=0))
        s.sendall(raw.api_versions(2))
        assert struct.unpack(">i", raw.recv_frame(s)[:4])[0] == 2  # still open, answers in order
        s.sendall(_produce_v3(3, topic, foreign.encode(), acks=0))
        with pytest.raises(ConnectionError):
            raw.recv_frame(s)

    # acks=0 returns before replication; wait until the record is readable (high watermark).
    deadline = time.monotonic() + 15
    while not (stored := eu.read_all(topic)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [r["key"] for r in stored] == [owned.encode()]
    assert kw_eu.metric("keyward_acks0_rejections_total") == before + 1


def test_malformed_frame_closes_only_that_connection(kw_eu, eu):
    with socket.create_connection(("127.0.0.1", kw_eu.bootstrap_port), timeout=10) as bad:
        bad.sendall(struct.pack(">i", 12) + b"\x00\x00\x00\x03garbage!")  # produce v3, truncated body
        with pytest.raises(ConnectionError):
            raw.recv_frame(bad)
    # Everyone else is unaffected.
    assert LibrdkafkaClient().metadata(kw_eu.bootstrap)


# --------------------------------------------------------------------------- reads and groups


def test_consumer_groups_work_through_keyward(client, eu, kw_eu):
    topic = unique("orders.consume")
    eu.create_topic(topic, partitions=4)
    keys = keys_of(kw_eu, "eu", 20, "c")
    produced = client.produce(kw_eu.bootstrap, topic, [record(k.encode(), k.encode()) for k in keys])
    assert all(r["ok"] for r in produced)
    group = unique("group")

    got = client.consume(kw_eu.bootstrap, [topic], group, expected_count=20, timeout_s=45)
    assert sorted(values(got)) == sorted(k.encode() for k in keys)

    # The group's commit holds: a second member of the same group finds nothing new.
    more = client.consume(kw_eu.bootstrap, [topic], group, expected_count=1, timeout_s=8)
    assert more == []


def test_a_group_rebalances_between_two_members(client, eu, kw_eu):
    topic = unique("orders.rebalance")
    eu.create_topic(topic, partitions=4)
    keys = keys_of(kw_eu, "eu", 40, "rb")
    assert all(r["ok"] for r in client.produce(kw_eu.bootstrap, topic, [record(k.encode(), k.encode()) for k in keys]))
    group = unique("group")
    results: list[list[dict]] = [[], []]

    def member(i: int, delay: float) -> None:
        time.sleep(delay)
        results[i] = client.consume(kw_eu.bootstrap, [topic], group, expected_count=40, timeout_s=20)

    threads = [threading.Thread(target=member, args=(0, 0)), threading.Thread(target=member, args=(1, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = {r["value"] for r in results[0] + results[1]}
    assert seen == {k.encode() for k in keys}


def test_clients_never_learn_a_real_broker_address(client, eu, kw_eu):
    real = {(n.host, n.port) for n in eu.nodes}
    brokers = client.metadata(kw_eu.bootstrap)
    assert [b[0] for b in brokers] == [n.node_id for n in eu.nodes]
    for node_id, host, port in brokers:
        assert (host, port) not in real
        assert (host, port) == ("127.0.0.1", kw_eu.port_base + node_id)


def test_describe_cluster_and_find_coordinator_are_rewritten(eu, kw_eu):
    """The admin APIs that carry addresses: DescribeCluster and FindCoordinator."""
    topic = unique("orders.coord")
    eu.create_topic(topic, partitions=1)
    group = unique("coord-group")
    LibrdkafkaClient().consume(kw_eu.bootstrap, [topic], group, expected_count=1, timeout_s=5)
    admin = eu.admin(kw_eu.bootstrap)
    virtual = kw_eu.virtual_ports()

    cluster = admin.describe_cluster(request_timeout=10).result(timeout=15)
    assert {(n.host, n.port) for n in cluster.nodes} <= {("127.0.0.1", p) for p in virtual}
    assert (cluster.controller.host, cluster.controller.port) in {("127.0.0.1", p) for p in virtual}

    desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
    assert (desc.coordinator.host, desc.coordinator.port) in {("127.0.0.1", p) for p in virtual}


def _api_versions_v3(correlation_id: int) -> bytes:
    client_id = b"raw-test"
    header = struct.pack(">hhih", 18, 3, correlation_id, len(client_id)) + client_id + b"\x00"
    body = b"\x05keyw" + b"\x020" + b"\x00"  # compact strings "keyw" and "0", no tagged fields
    msg = header + body
    return struct.pack(">i", len(msg)) + msg


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _offered_versions(addr: tuple[str, int]) -> dict[int, tuple[int, int]]:
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(_api_versions_v3(9))
        frame = raw.recv_frame(s)
    (corr, error) = struct.unpack(">ih", frame[:6])
    assert (corr, error) == (9, 0)
    count, pos = _uvarint(frame, 6)
    out = {}
    for _ in range(count - 1):
        key, lo, hi = struct.unpack(">hhh", frame[pos : pos + 6])
        pos += 6
        tags, pos = _uvarint(frame, pos)
        assert tags == 0
        out[key] = (lo, hi)
    return out


def test_api_versions_are_intersected_with_what_keyward_handles(eu, kw_eu):
    broker = _offered_versions(("127.0.0.1", eu.nodes[0].port))
    proxy = _offered_versions(("127.0.0.1", kw_eu.bootstrap_port))
    PRODUCE, FETCH, METADATA, DESCRIBE_QUORUM, SHARE_FETCH = 0, 1, 3, 55, 78
    assert proxy[PRODUCE] == (max(3, broker[PRODUCE][0]), min(12, broker[PRODUCE][1]))
    assert proxy[METADATA][1] <= 13 and proxy[FETCH][1] <= 18
    assert DESCRIBE_QUORUM in broker and DESCRIBE_QUORUM not in proxy
    assert SHARE_FETCH not in proxy
    # Everything keyward relays untouched keeps the broker's own range.
    for key in (8, 9, 11, 12, 14):  # OffsetCommit, OffsetFetch, JoinGroup, Heartbeat, SyncGroup
        assert proxy[key] == broker[key]
