"""The compatibility matrix: clients and brokers of other Kafka versions through keyward.

Clients (against the session's 4.3.1 eu/us clusters): kafka-clients 4.4.0, <kafka.version>
(4.3.1) and 3.9.1 (the same Java CLI built against each), librdkafka (confluent-kafka) and
franz-go, each producing owned and foreign keys and consuming with a group.

kafka-clients 4.4.0 and franz-go ask for ApiVersions v5, above what keyward decodes: keyward
answers UNSUPPORTED_VERSION itself with the range it handles (KIP-511) and the client asks again
at v4. `test_kafka_clients_4_4_negotiates_down_and_works` proves it end to end, with the metric
and the once-per-client log line.

Brokers (tests/kafka/matrix.properties, besides the full suite's 4.3.1): for each, a 1-broker
eu and a 1-broker us cluster of that version with a keyward in front of eu, and a smoke subset
with the Java client of the same version: bootstrap, owned / refused / redirected records, a
consumer group, and the conformance walk (examples/conformance.rs) against the broker's own
ApiVersions list; librdkafka and franz-go produce and consume there too.
"""

from __future__ import annotations

import time

import pytest

from harness import FranzClient, JavaClient, KafkaCluster, LibrdkafkaClient, record, unique
from harness import env
from harness.keyward import Keyward
from test_conformance import conformance_bin, run_conformance  # noqa: F401  (fixture)
from test_keyward import INVALID_RECORD, keys_of

TABLE = """
rules:
  - name: orders
    topics: ["orders.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
  - name: moved
    topics: ["moved.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    on_foreign: redirect
default: allow
"""

MATRIX = env.matrix()

CLIENTS = [
    *(JavaClient(v) for v in MATRIX["clients"]),
    JavaClient(),
    LibrdkafkaClient(),
    FranzClient(),
]


# The clients of CLIENTS that open connections with an ApiVersions version above keyward's (v5).
ASK_ABOVE_CEILING = {"java-4.4.0", "franz"}


def java_for(version: str) -> JavaClient:
    """The Java client of the broker's own version when the matrix has it."""
    if version == env.kafka_version():
        return JavaClient()
    if version in MATRIX["clients"]:
        return JavaClient(version)
    return JavaClient()


@pytest.fixture(scope="module")
def kw(tmp_path_factory, eu, us):
    with Keyward(tmp_path_factory.mktemp("kw"), "eu", {"eu": eu, "us": us}, TABLE) as kw:
        yield kw


def owned_and_foreign(client, kw: Keyward, eu: KafkaCluster, prefix: str, config: dict | None = None) -> str:
    """Produces 4 eu-owned and 2 us-owned keys through the eu proxy and checks the outcome:
    the owned ones acknowledged and stored in eu, the foreign ones refused with INVALID_RECORD
    (and keyward's message, for the Java client). Returns the topic."""
    topic = unique(f"orders.{prefix}")
    eu.create_topic(topic, partitions=16)
    eu_keys, us_keys = keys_of(kw, "eu", 4, prefix), keys_of(kw, "us", 2, prefix)
    recs = [record(k.encode(), k.encode()) for k in eu_keys + us_keys]

    results = client.produce(kw.bootstrap, topic, recs, config)

    assert [r["ok"] for r in results] == [True] * 4 + [False] * 2, results
    for key, r in zip(us_keys, results[4:]):
        assert r["error_code"] == INVALID_RECORD, r
        if isinstance(client, JavaClient):
            assert f'key "{key}" is owned by region us' in r["error_message"], r
            assert "this proxy writes for eu" in r["error_message"], r
    assert sorted(r["key"] for r in eu.read_all(topic)) == sorted(k.encode() for k in eu_keys)
    return topic


# --------------------------------------------------------------------------- the proof


def test_kafka_clients_4_4_negotiates_down_and_works(eu, kw):
    """kafka-clients 4.4.0 opens every connection with ApiVersions v5. keyward answers it
    itself (counted, logged once per client and version) and the client goes on at v4: owned
    keys land, a foreign key is refused with keyward's message, a group consumes."""
    java = JavaClient("4.4.0")
    before = kw.metric("keyward_unsupported_versions_total", api="ApiVersions", version="5")
    producer_id, consumer_id = unique("kc44-producer"), unique("kc44-consumer")

    topic = owned_and_foreign(java, kw, eu, "kc44", {"client_id": producer_id})
    got = java.consume(kw.bootstrap, [topic], unique("group"), expected_count=4, timeout_s=45, config={"client_id": consumer_id})

    assert len(got) == 4, got
    asked = kw.metric("keyward_unsupported_versions_total", api="ApiVersions", version="5") - before
    # Each client opened at least two connections (bootstrap, then a broker), each asking v5.
    assert asked >= 4, asked
    lines = [line for line in kw.logs(100_000).splitlines() if "asked for ApiVersions v5" in line]
    for client_id in (producer_id, consumer_id):
        assert sum(client_id in line for line in lines) == 1, (client_id, lines)
    log = kw.logs(100_000)
    assert "cannot decode ApiVersions" not in log
    assert kw.metric("keyward_protocol_errors_total") == 0


# --------------------------------------------------------------------------- clients


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_client_matrix(client, eu, kw):
    """Every client of the matrix through keyward: owned keys land, foreign ones are refused,
    a group consumes what landed."""
    t0 = time.monotonic()
    before = kw.metric("keyward_unsupported_versions_total", api="ApiVersions")
    topic = owned_and_foreign(client, kw, eu, client.name.replace(".", "_"))
    got = client.consume(kw.bootstrap, [topic], unique("group"), expected_count=4, timeout_s=45)
    assert len(got) == 4, got
    asked = kw.metric("keyward_unsupported_versions_total", api="ApiVersions") - before
    print(f"{client.name}: {time.monotonic() - t0:.1f}s, {asked:.0f} ApiVersions requests above keyward's ceiling")
    # kafka-clients 4.4.0 and franz-go 1.22 ask for v5 on every connection and were answered by
    # keyward; the others ask at a version keyward decodes and were forwarded.
    assert (asked > 0) == (client.name in ASK_ABOVE_CEILING), asked


def test_clients_asking_above_keywards_ceiling_are_downgraded_not_closed(kw):
    """Whatever the clients above asked, no connection was closed for a version question:
    the only versions keyward did not offer them were ApiVersions ones, answered."""
    text = kw.metrics_text()
    refused = [
        line
        for line in text.splitlines()
        if line.startswith("keyward_unsupported_versions_total") and 'api="ApiVersions"' not in line
    ]
    assert refused == [], refused
    assert kw.metric("keyward_client_connections_closed_total", cause="unsupported_version") == 0


# --------------------------------------------------------------------------- brokers


@pytest.fixture(scope="module", params=MATRIX["brokers"], ids=lambda v: f"kafka-{v}")
def matrix_broker(request, tmp_path_factory):
    """A 1-broker eu and a 1-broker us cluster of one matrix version, a keyward in front of eu."""
    version = request.param
    workdir = tmp_path_factory.mktemp(f"kafka-{version}")
    clusters = {}
    t0 = time.monotonic()
    try:
        for name in ("eu", "us"):
            clusters[name] = KafkaCluster(f"{name}-{version}", 1, workdir, version=version)
            clusters[name].start()
        boot = time.monotonic() - t0
        with Keyward(workdir / "kw", "eu", clusters, TABLE) as kw:
            yield version, clusters["eu"], clusters["us"], kw, boot
    finally:
        for cluster in clusters.values():
            cluster.stop(grace_s=2)


def test_broker_smoke_bootstrap(matrix_broker):
    version, eu, us, kw, boot = matrix_broker
    print(f"kafka {version}: eu and us ready in {boot:.1f}s")
    brokers = java_for(version).metadata(kw.bootstrap)
    assert [(node_id, host) for node_id, host, _ in brokers] == [(1, "127.0.0.1")]
    assert brokers[0][2] in kw.virtual_ports()


def test_broker_smoke_owned_refused_and_redirected(matrix_broker):
    version, eu, us, kw, _ = matrix_broker
    client = java_for(version)
    owned_and_foreign(client, kw, eu, "smoke")

    topic = unique("moved.smoke")
    eu.create_topic(topic, partitions=1)
    us.create_topic(topic, partitions=1)
    eu_keys, us_keys = keys_of(kw, "eu", 2, "mv"), keys_of(kw, "us", 2, "mv")
    results = client.produce(kw.bootstrap, topic, [record(k.encode(), b"v", partition=0) for k in eu_keys + us_keys], flush_every=1)
    assert all(r["ok"] for r in results), results
    assert [r["key"] for r in eu.read_all(topic)] == [k.encode() for k in eu_keys]
    assert [r["key"] for r in us.read_all(topic)] == [k.encode() for k in us_keys]


def test_broker_smoke_group_consumes(matrix_broker):
    version, eu, _, kw, _ = matrix_broker
    client = java_for(version)
    topic = unique("orders.group")
    eu.create_topic(topic, partitions=4)
    keys = keys_of(kw, "eu", 8, "g")
    assert all(r["ok"] for r in client.produce(kw.bootstrap, topic, [record(k.encode(), k.encode()) for k in keys]))
    got = client.consume(kw.bootstrap, [topic], unique("group"), expected_count=8, timeout_s=45)
    assert sorted(r["value"] for r in got) == sorted(k.encode() for k in keys)


@pytest.mark.parametrize("client", [LibrdkafkaClient(), FranzClient()], ids=lambda c: c.name)
def test_broker_smoke_other_clients(matrix_broker, client):
    """librdkafka and franz-go on this broker version too: owned keys land, foreign ones are
    refused, a group consumes."""
    _, eu, _, kw, _ = matrix_broker
    topic = owned_and_foreign(client, kw, eu, f"smoke_{client.name}")
    got = client.consume(kw.bootstrap, [topic], unique("group"), expected_count=4, timeout_s=45)
    assert len(got) == 4, got


def test_broker_smoke_conformance(matrix_broker, conformance_bin):
    """Every API and version keyward offers in front of this broker answers and decodes;
    every one the broker offers and keyward does not gets a broker's answer."""
    version, eu, _, kw, _ = matrix_broker
    topic = unique("conformance")
    eu.create_topic(topic, partitions=1)
    result = run_conformance(conformance_bin, kw.bootstrap, topic, broker=eu.nodes[0].address)
    print(result.stdout)
    lines = result.stdout.splitlines()
    failed = [line for line in lines if "FAILED" in line]
    if failed:
        print(kw.logs(200))
    assert not failed, "\n".join(failed)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert lines[-1].endswith(" passed, 0 failed"), lines[-1:]
    assert any("(not offered): ok" in line for line in lines)
