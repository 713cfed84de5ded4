"""The harness itself, without keyward: real clients against real brokers.

If these fail, the proxy tests' failures mean nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from typing import Iterator

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

from harness import ClientError, Leaf, LibrdkafkaClient, Pki, record, unique
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


# ---------------------------------------------------------------- TLS and SASL, against `secure`

# (produce mechanism, consume mechanism) per client: every client does a SCRAM, and every
# mechanism is used by two clients.
SASL_BY_CLIENT = {
    "java": ("PLAIN", "SCRAM-SHA-512"),
    "librdkafka": ("SCRAM-SHA-256", "PLAIN"),
    "franz": ("SCRAM-SHA-512", "SCRAM-SHA-256"),
}


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Pki:
    """A CA nobody trusts."""
    return Pki(tmp_path_factory.mktemp("other-pki"), "other-ca")


def test_secure_produce_and_consume_over_sasl_ssl(client, secure):
    produce_with, consume_with = SASL_BY_CLIENT[client.name]
    topic = unique(f"secure-{client.name}")
    secure.create_topic(topic, partitions=2)
    recs = sample_records(5, f"{client.name}/{produce_with}")

    results = client.produce(
        secure.bootstrap, topic, recs, config={"security": secure.client_security(produce_with, "alice")}
    )
    got = client.consume(
        secure.bootstrap,
        [topic],
        unique(f"g-secure-{client.name}"),
        expected_count=len(recs),
        config={"security": secure.client_security(consume_with, "keyward")},
    )

    assert all(r["ok"] for r in results), results
    assert as_set(secure.read_all(topic)) == as_set(recs)
    assert as_set(got) == as_set(recs)


def test_secure_metadata_over_mtls_with_a_client_certificate(client, secure):
    ca = secure.security.pki
    leaf = ca.issue(f"client-{client.name}")
    security = {"protocol": "SSL", "ca": ca.ca, "cert": leaf.cert, "key": leaf.key}

    assert client.metadata(secure.mtls_bootstrap, security=security) == [(1, "127.0.0.1", secure.nodes[0].mtls_port)]


def test_secure_wrong_password_fails(client, secure):
    security = {**secure.client_security("SCRAM-SHA-256", "alice"), "password": "not-alice-secret"}
    topic = unique(f"secure-wrong-password-{client.name}")
    secure.create_topic(topic)

    with pytest.raises(ClientError):
        client.metadata(secure.bootstrap, timeout_s=5, security=security)
    results = client.produce(secure.bootstrap, topic, [record(b"k", b"v")], config={"security": security}, timeout_s=4)

    assert [r["ok"] for r in results] == [False], results
    assert secure.read_all(topic) == []


def test_secure_untrusted_server_certificate_fails(client, secure, other_pki):
    security = {**secure.client_security("SCRAM-SHA-512", "alice"), "ca": other_pki.ca}

    with pytest.raises(ClientError):
        client.metadata(secure.bootstrap, timeout_s=5, security=security)


def test_secure_server_name_is_verified(client, pki):
    """A certificate from the trusted CA that does not name 127.0.0.1 is refused: hostname
    verification is on in every client."""
    with tls_server(pki.issue("not-this-host", sans=("elsewhere.invalid",))) as server:
        with pytest.raises(ClientError):
            client.metadata(f"127.0.0.1:{server['port']}", timeout_s=5, security={"protocol": "SSL", "ca": pki.ca})

    assert server["refused"] > 0 and server["completed"] == 0, server


@pytest.mark.parametrize("cert", ["none", "other-ca"])
def test_secure_mtls_listener_refuses_without_a_trusted_client_certificate(client, secure, other_pki, cert):
    security = {"protocol": "SSL", "ca": secure.security.pki.ca}
    if cert == "other-ca":
        leaf = other_pki.issue(f"client-{client.name}")
        security.update(cert=leaf.cert, key=leaf.key)

    # librdkafka retries a refused handshake until the timeout: keep it short.
    with pytest.raises(ClientError):
        client.metadata(secure.mtls_bootstrap, timeout_s=3, security=security)


@contextlib.contextmanager
def tls_server(leaf: Leaf) -> Iterator[dict[str, int]]:
    """A TLS server on 127.0.0.1 presenting `leaf`; it hangs up after each handshake. Yields
    {"port": int, "completed": n, "refused": n}, the handshake counts kept up to date. It
    speaks TLS 1.3 only, where a server completes a handshake only after the client has
    accepted its certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(leaf.chain, leaf.key)
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(0.2)
        stats = {"port": sock.getsockname()[1], "completed": 0, "refused": 0}

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except socket.timeout:
                    continue
                conn.settimeout(5)
                try:
                    with ctx.wrap_socket(conn, server_side=True):
                        stats["completed"] += 1
                except OSError:  # ssl.SSLError included
                    stats["refused"] += 1

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield stats
        finally:
            stop.set()
            thread.join(5)
