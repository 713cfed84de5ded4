"""The harness itself, without keyward: real clients against real brokers.

If these fail, the proxy tests' failures mean nothing.
"""

from __future__ import annotations

import os

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

from harness import LibrdkafkaClient, record, unique
from harness.errors import ERROR_CODES

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def sample_records(n: int, tag: str) -> list[dict]:
    recs = [
        record(
            f"key-{i}".encode(),
            f"{tag} value {i} ".encode() * 8,
            headers=[("trace", f"t-{i}".encode()), ("empty", b""), ("none", None)],
        )
        for i in range(n)
    ]
    recs.append(record(None, b"no key"))
    recs.append(record(b"tombstone", None))
    recs.append(record(b"empty-value", b"", headers=[]))
    return recs


def as_set(records) -> list[tuple]:
    return sorted(
        (r.get("key") or b"", r.get("key") is None, r.get("value") or b"", r.get("value") is None, tuple(r.get("headers") or ()))
        for r in records
    )


def test_metadata_lists_every_broker(client, eu, us):
    assert client.metadata(eu.bootstrap) == [(n.node_id, n.host, n.port) for n in eu.nodes]
    assert client.metadata(us.bootstrap) == [(1, "127.0.0.1", us.nodes[0].port)]


@pytest.mark.parametrize("codec", CODECS)
def test_idempotent_produce_reaches_the_cluster(client, eu, codec):
    topic = unique(f"smoke-{client.name}-{codec}")
    eu.create_topic(topic, partitions=3)
    recs = sample_records(12, f"{client.name}/{codec}")

    results = client.produce(
        eu.bootstrap, topic, recs, config={"acks": "all", "idempotence": True, "compression": codec, "linger_ms": 5}
    )

    assert [r["ok"] for r in results] == [True] * len(recs), results
    stored = eu.read_all(topic)
    assert as_set(stored) == as_set(recs)
    # Every delivery report points at the record the cluster holds.
    by_pos = {(r["partition"], r["offset"]): r for r in stored}
    for sent, res in zip(recs, results):
        got = by_pos[(res["partition"], res["offset"])]
        assert (got["key"], got["value"], got["headers"]) == (sent["key"], sent["value"], sent["headers"])


def test_same_key_same_partition_in_every_client(clients, eu):
    topic = unique("partitioner")
    eu.create_topic(topic, partitions=6)
    keys = [f"user-{i}".encode() for i in range(12)]
    placements = {}
    for c in clients:
        res = c.produce(eu.bootstrap, topic, [record(k, c.name.encode()) for k in keys])
        assert all(r["ok"] for r in res), res
        placements[c.name] = [r["partition"] for r in res]
    assert len({tuple(p) for p in placements.values()}) == 1, placements
    assert len(set(placements["java"])) > 1  # the keys really spread


def test_explicit_partitions_and_separate_sends(client, eu):
    topic = unique(f"flush-{client.name}")
    eu.create_topic(topic, partitions=3)
    recs = [record(f"k{i}".encode(), f"v{i}".encode(), partition=i % 3) for i in range(9)]

    results = client.produce(eu.bootstrap, topic, recs, flush_every=2)

    assert [(r["ok"], r["partition"]) for r in results] == [(True, i % 3) for i in range(9)], results
    for p in range(3):
        assert [r["offset"] for r in results if r["partition"] == p] == [0, 1, 2]
    assert [(r["partition"], r["value"]) for r in eu.read_all(topic)] == sorted(
        (i % 3, f"v{i}".encode()) for i in range(9)
    )


def test_broker_error_is_reported_and_the_producer_goes_on(client, eu):
    """A batch the broker rejects fails with the protocol's code; the same producer then
    keeps delivering (the shape of a keyward rejection between owned batches)."""
    topic = unique(f"too-large-{client.name}")
    eu.create_topic(topic, partitions=1, config={"max.message.bytes": "2048"})
    big = os.urandom(8192)  # incompressible, over max.message.bytes whatever the codec
    recs = [record(b"a", b"small 1"), record(b"b", big), record(b"c", b"small 2"), record(b"d", b"small 3")]

    results = client.produce(eu.bootstrap, topic, recs, config={"idempotence": True}, flush_every=1)

    assert [r["ok"] for r in results] == [True, False, True, True], results
    assert results[1]["error_code"] == ERROR_CODES["MESSAGE_TOO_LARGE"] == 10, results[1]
    assert results[1]["error_name"] == "MESSAGE_TOO_LARGE", results[1]
    assert [r["value"] for r in eu.read_all(topic)] == [b"small 1", b"small 2", b"small 3"]


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_consumer_group_reads_and_commits(client, eu, protocol):
    topic = unique(f"group-{client.name}")
    group = unique(f"g-{client.name}-{protocol}")
    eu.create_topic(topic, partitions=3)
    recs = sample_records(20, "group")
    assert all(r["ok"] for r in LibrdkafkaClient().produce(eu.bootstrap, topic, recs))

    got = client.consume(
        eu.bootstrap, [topic], group, expected_count=len(recs), config={"group_protocol": protocol}
    )

    assert as_set(got) == as_set(recs)
    admin = eu.admin()
    committed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result(timeout=15)
    ends = {p: 0 for p in range(3)}
    for r in got:
        ends[r["partition"]] = max(ends[r["partition"]], r["offset"] + 1)
    assert {tp.partition: tp.offset for tp in committed.topic_partitions if tp.offset >= 0} == {
        p: e for p, e in ends.items() if e > 0
    }
    # The client really spoke the group protocol it was asked for.
    described = admin.describe_consumer_groups([group])[group].result(timeout=15)
    assert described.type.name == protocol.upper(), described


def test_read_all_of_an_empty_topic(eu, us):
    for cluster in (eu, us):
        topic = unique("empty")
        cluster.create_topic(topic, partitions=2)
        assert cluster.read_all(topic) == []


def test_us_cluster_takes_writes(client, us):
    topic = unique(f"us-{client.name}")
    us.create_topic(topic)
    recs = sample_records(3, "us")
    assert all(r["ok"] for r in client.produce(us.bootstrap, topic, recs)), "us produce failed"
    assert as_set(us.read_all(topic)) == as_set(recs)


def test_not_enough_replicas_is_reported(clients, eu):
    """With a broker down, acks=all to a min.insync.replicas=3 topic fails with
    NOT_ENOUGH_REPLICAS (19) in every client. Also exercises stop_node/start_node."""
    topic = unique("min-isr")
    eu.create_topic(topic, partitions=1, replication=3, config={"min.insync.replicas": "3"})
    leader = eu.partitions(topic)[0]["leader"]
    victim = next(n.node_id for n in eu.nodes if n.node_id != leader)
    eu.stop_node(victim)
    try:
        eu.wait_isr_size(topic, 2)
        for c in clients:
            res = c.produce(eu.bootstrap, topic, [record(b"k", c.name.encode())], config={"idempotence": False, "retries": 0})
            assert (res[0]["ok"], res[0]["error_code"], res[0]["error_name"]) == (False, 19, "NOT_ENOUGH_REPLICAS"), (c, res)
    finally:
        eu.start_node(victim)
    assert eu.read_all(topic) == []


@pytest.mark.parametrize("acks", ["1", "0"])
def test_non_idempotent_acks(client, us, acks):
    topic = unique(f"acks{acks}-{client.name}")
    us.create_topic(topic)
    recs = sample_records(4, f"acks={acks}")

    results = client.produce(us.bootstrap, topic, recs, config={"acks": acks, "compression": "lz4"})

    assert all(r["ok"] for r in results), results
    if acks == "0":
        assert {r["offset"] for r in results} == {None}  # nobody knows the offset
    else:
        assert [r["offset"] for r in results] == list(range(len(recs)))
    assert as_set(us.read_until(topic, len(recs))) == as_set(recs)
