"""`on_foreign: redirect`: a batch owned by another region is produced to that region's cluster,
under a producer id keyward obtains there, while the client's own idempotent numbering stays
whole on the local cluster. Checked in both clusters, read directly, with all three clients.
"""

from __future__ import annotations

import socket
import time

import pytest

from harness import LibrdkafkaClient, raw, record, unique
from harness.keyward import Keyward

from test_keyward import keys_of

TABLE = """
rules:
  - name: orders
    topics: ["orders.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    on_foreign: redirect
default: allow
"""


@pytest.fixture(scope="module")
def kw(tmp_path_factory, eu, us):
    with Keyward(tmp_path_factory.mktemp("kw"), "eu", {"eu": eu, "us": us}, TABLE) as kw:
        yield kw


def make_topic(eu, us, prefix: str, partitions: int = 1) -> str:
    topic = unique(prefix)
    eu.create_topic(topic, partitions=partitions)
    us.create_topic(topic, partitions=partitions)
    return topic


def test_interleaved_writes_land_in_their_owners_clusters_in_order(client, eu, us, kw):
    """One idempotent producer, one partition, keys of both regions in turn: every write is
    acknowledged, each lands once in its owner's cluster, in the order it was sent. The local
    cluster never sees a gap in the producer's sequence numbers (it would refuse the write)."""
    topic = make_topic(eu, us, "orders.redirect")
    eu_keys, us_keys = keys_of(kw, "eu", 5, "rd"), keys_of(kw, "us", 5, "rd")
    order = [k for pair in zip(eu_keys, us_keys) for k in pair]
    before = kw.metric("keyward_produce_records_total", rule="orders", decision="redirected", owner="us")

    results = client.produce(
        kw.bootstrap,
        topic,
        [record(k.encode(), f"v{i}".encode(), partition=0) for i, k in enumerate(order)],
        {"acks": "all", "idempotence": True},
        flush_every=1,
    )

    assert all(r["ok"] for r in results), results
    assert [r["key"] for r in eu.read_all(topic)] == [k.encode() for k in eu_keys]
    assert [r["key"] for r in us.read_all(topic)] == [k.encode() for k in us_keys]
    # The client was told the owner cluster's offsets.
    us_offsets = [r["offset"] for k, r in zip(order, results) if k in us_keys]
    assert us_offsets == [r["offset"] for r in us.read_all(topic)]
    after = kw.metric("keyward_produce_records_total", rule="orders", decision="redirected", owner="us")
    assert after - before == 5


def test_a_whole_batch_of_foreign_keys_is_redirected(eu, us, kw):
    topic = make_topic(eu, us, "orders.batch", partitions=2)
    us_keys = keys_of(kw, "us", 20, "rb")
    results = LibrdkafkaClient().produce(
        kw.bootstrap,
        topic,
        [record(k.encode(), b"x" * 200, partition=1) for k in us_keys],
        {"linger_ms": 100, "compression": "zstd"},
    )
    assert all(r["ok"] for r in results), results
    assert sorted(r["key"] for r in us.read_all(topic)) == sorted(k.encode() for k in us_keys)
    assert eu.read_all(topic) == []


def test_non_idempotent_producers_are_redirected_too(eu, us, kw):
    topic = make_topic(eu, us, "orders.plain")
    us_key, eu_key = keys_of(kw, "us", 1, "np")[0], keys_of(kw, "eu", 1, "np")[0]
    results = LibrdkafkaClient().produce(
        kw.bootstrap,
        topic,
        [record(us_key.encode(), b"a", partition=0), record(eu_key.encode(), b"b", partition=0)],
        {"acks": "1", "idempotence": False},
        flush_every=1,
    )
    assert all(r["ok"] for r in results), results
    # acks=1 is answered before followers copy the record: wait until it is readable.
    assert [r["value"] for r in us.read_until(topic, 1)] == [b"a"]
    assert [r["value"] for r in eu.read_until(topic, 1)] == [b"b"]


def check_split(eu, us, topic: str, sent: list[tuple[str, bytes]], owners: dict[str, str], results) -> None:
    """Every acknowledged record is exactly once in its owner's cluster and nowhere else, and
    each key's records are in the order they were sent."""
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:3]
    landed = {"eu": eu.read_until(topic, sum(1 for k, _ in sent if owners[k] == "eu")),
              "us": us.read_until(topic, sum(1 for k, _ in sent if owners[k] == "us"))}
    for region, records in landed.items():
        keys = [r["key"].decode() for r in records]
        assert all(owners[k] == region for k in keys), f"a record in {region} it does not own"
        got = sorted((r["key"], r["value"]) for r in records)
        want = sorted((k.encode(), v) for k, v in sent if owners[k] == region)
        assert got == want, f"{region}: {len(got)} records, {len(want)} sent to it"
        by_key: dict[str, list[bytes]] = {}
        for r in records:  # per partition, in offset order; a key has one partition
            by_key.setdefault(r["key"].decode(), []).append(r["value"])
        for k, vs in by_key.items():
            assert vs == [v for kk, v in sent if kk == k], f"key {k} out of order in {region}"


def test_librdkafkas_default_partitioner_has_its_mixed_batches_split(eu, us, kw):
    """librdkafka's own default partitioner (consistent_random, CRC32) spreads keys over
    partitions unlike the rule's murmur2 slots, so almost every batch mixes both regions'
    keys: keyward splits each one, and every record lands once, in its owner's cluster, in
    order per key."""
    topic = make_topic(eu, us, "orders.crc", partitions=6)
    keys = keys_of(kw, "eu", 30, "crc") + keys_of(kw, "us", 30, "crc")
    owners = {k: "eu" for k in keys[:30]} | {k: "us" for k in keys[30:]}
    sent = [(keys[(i * 7) % 60], f"{i:04d}".encode()) for i in range(600)]
    before = kw.metric("keyward_produce_records_total", rule="orders", decision="redirected", owner="us", reason="split")
    results = LibrdkafkaClient().produce(
        kw.bootstrap,
        topic,
        [record(k.encode(), v) for k, v in sent],
        {"linger_ms": 50, "native": {"partitioner": "consistent_random"}},
        timeout_s=60,
    )
    check_split(eu, us, topic, sent, owners, results)
    split = kw.metric("keyward_produce_records_total", rule="orders", decision="redirected", owner="us", reason="split")
    assert split - before > 0, "no batch was split: the test proves nothing"


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_split_parts_keep_the_clients_codec(eu, us, kw, codec):
    """Batches of one partition mixing both regions, compressed: each part is re-compressed
    with the client's codec and both clusters take it."""
    topic = make_topic(eu, us, f"orders.codec-{codec}")
    keys = keys_of(kw, "eu", 4, "cd") + keys_of(kw, "us", 4, "cd")
    owners = {k: "eu" for k in keys[:4]} | {k: "us" for k in keys[4:]}
    sent = [(keys[i % 8], f"{codec}-{i:03d}".encode() * 20) for i in range(80)]
    results = LibrdkafkaClient().produce(
        kw.bootstrap,
        topic,
        [record(k.encode(), v, partition=0) for k, v in sent],
        {"linger_ms": 50, "compression": codec},
    )
    check_split(eu, us, topic, sent, owners, results)


def test_every_client_has_its_mixed_batches_split(client, eu, us, kw):
    """One partition chosen by the application (Java, franz-go's manual partitioner,
    librdkafka), keys of both regions in each batch: split, and the client is told one
    success per record."""
    topic = make_topic(eu, us, "orders.mixed")
    keys = keys_of(kw, "eu", 5, "mx") + keys_of(kw, "us", 5, "mx")
    owners = {k: "eu" for k in keys[:5]} | {k: "us" for k in keys[5:]}
    sent = [(keys[(i * 3) % 10], f"m{i:03d}".encode()) for i in range(100)]
    results = client.produce(
        kw.bootstrap,
        topic,
        [record(k.encode(), v, partition=0) for k, v in sent],
        {"linger_ms": 50, "idempotence": True},
    )
    check_split(eu, us, topic, sent, owners, results)


def stored_bytes(cluster, topic: str, partition: int) -> int:
    """Bytes of the record batches the leader of a partition stores: the size of its log
    segments on disk. Kafka appends each batch as it was produced (compression.type=producer,
    the default), so this is the sum of the sizes of the batches written to it."""
    leader = cluster.partitions(topic)[partition]["leader"]
    return sum(f.stat().st_size for f in (cluster.node(leader).dir / "data" / f"{topic}-{partition}").glob("*.log"))


def redirected(kw) -> tuple[float, float]:
    """(records, bytes) keyward counted as landed in us's cluster for eu's clients."""
    pair = {"from": "eu", "to": "us"}
    return kw.metric("keyward_redirected_records_total", **pair), kw.metric("keyward_redirected_bytes_total", **pair)


def test_what_redirect_writes_to_the_owners_cluster_is_counted_to_the_byte(eu, us, kw):
    """Three batches of us's keys of known size (written by hand, so their bytes are known)
    and one batch mixing both regions (split: its us part built by keyward): keyward counts
    every record that landed in us's cluster, and exactly the bytes us's broker stored, which
    for the whole batches are the bytes the client sent."""
    topic = make_topic(eu, us, "orders.cost")
    us_keys, eu_keys = keys_of(kw, "us", 14, "cost"), keys_of(kw, "eu", 2, "cost")
    whole = [raw.record_batch([(k.encode(), b"x" * 100) for k in us_keys[i * 4 : i * 4 + 4]]) for i in range(3)]
    mixed = raw.record_batch(
        [(eu_keys[0].encode(), b"e"), (us_keys[12].encode(), b"u" * 50), (eu_keys[1].encode(), b"e"), (us_keys[13].encode(), b"u")],
        compress=True,
    )
    records_before, bytes_before = redirected(kw)
    assert stored_bytes(us, topic, 0) == 0

    # The leader's port: the mixed batch's eu part goes on this connection.
    leader = eu.partitions(topic)[0]["leader"]
    with socket.create_connection(("127.0.0.1", kw.port_base + leader), timeout=10) as s:
        for i, batch in enumerate(whole):
            s.sendall(raw.produce(i, topic, {0: batch}, version=7))
            assert raw.produce_errors(raw.recv_frame(s)) == {(topic, 0): 0}
        landed_whole = stored_bytes(us, topic, 0)
        assert landed_whole == sum(len(b) for b in whole), "us's broker stores the batches as sent"
        assert redirected(kw) == (records_before + 12, bytes_before + landed_whole)

        s.sendall(raw.produce(9, topic, {0: mixed}, version=7))
        assert raw.produce_errors(raw.recv_frame(s)) == {(topic, 0): 0}

    assert [r["key"] for r in us.read_all(topic)] == [k.encode() for k in us_keys]
    records, bytes_ = redirected(kw)
    assert records - records_before == 14
    assert bytes_ - bytes_before == stored_bytes(us, topic, 0), "the split part: the bytes us stored"
    assert stored_bytes(us, topic, 0) > landed_whole
    # Nothing is redirected to the local cluster: no such series.
    assert "keyward_redirected_bytes_total{from=\"eu\",to=\"eu\"}" not in kw.metrics_text()


def test_bytes_served_to_clients_are_counted_per_cluster(eu, us, kw):
    """Consuming through keyward: the bytes served by eu's cluster (the serving cluster) grow
    by at least the payload read, and us's, which serves nothing, not at all."""
    topic = make_topic(eu, us, "orders.served")
    payload = [f"{i:03d}".encode() * 1000 for i in range(20)]  # 3000 bytes each
    results = LibrdkafkaClient().produce(eu.bootstrap, topic, [record(None, v, partition=0) for v in payload])
    assert all(r["ok"] for r in results), results
    eu_before, us_before = (kw.metric("keyward_served_bytes_total", cluster=c) for c in ("eu", "us"))
    got = LibrdkafkaClient().consume(kw.bootstrap, [topic], unique("served"), len(payload))
    assert sorted(r["value"] for r in got) == sorted(payload)
    served = kw.metric("keyward_served_bytes_total", cluster="eu") - eu_before
    assert served >= sum(len(v) for v in payload), served
    assert kw.metric("keyward_served_bytes_total", cluster="us") == us_before
    # Served bytes are part of the bytes sent to clients.
    assert kw.metric("keyward_client_bytes_sent_total") >= kw.metric("keyward_served_bytes_total")


def test_a_topic_missing_in_the_owners_cluster_is_an_error_not_a_drop(eu, us, kw):
    topic = unique("orders.only-eu")
    eu.create_topic(topic, partitions=1)
    us_key = keys_of(kw, "us", 1, "miss")[0]
    failures = kw.metric("keyward_redirect_failures_total", cluster="us")
    not_landed = redirected(kw)
    results = LibrdkafkaClient().produce(
        kw.bootstrap,
        topic,
        [record(us_key.encode(), b"v", partition=0)],
        {"delivery_timeout_ms": 4000, "request_timeout_ms": 2000},
    )
    assert not results[0]["ok"], results
    assert eu.read_all(topic) == []
    # Counted for the alert KeywardRedirectFailing (the client may give up before keyward answers).
    deadline = time.monotonic() + 10
    while kw.metric("keyward_redirect_failures_total", cluster="us") == failures and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kw.metric("keyward_redirect_failures_total", cluster="us") > failures
    assert kw.metric("keyward_redirect_failures_total", cluster="eu") == 0
    # Attempts that did not land are not counted as redirected.
    assert redirected(kw) == not_landed
