"""The operator's side of keyward, with real Kafka and real clients: flipping ownership by
reloading the table (file change, SIGHUP, POST /reload) without dropping client connections,
invalid tables that never replace a valid one, exact metric counts, readiness, the admin API and
the logs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from confluent_kafka import Producer

from harness import KafkaCluster, LibrdkafkaClient, record, unique
from harness.keyward import Keyward, binary

from test_keyward import INVALID_RECORD, TABLE, keys_of

TAKEOVER = TABLE + "takeover: { us: eu }\n"


@pytest.fixture
def kw(tmp_path, eu, us):
    with Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE) as kw:
        yield kw


def wait_for(predicate, timeout_s: float = 5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class OneProducer:
    """One librdkafka producer kept open across reloads, so the test shows that a reload
    changes the next decision on a connection that stays open."""

    def __init__(self, bootstrap: str):
        self.p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0})

    def send(self, topic: str, key: str) -> int | None:
        """Produces one record; returns None on success or the error code."""
        result: list = []
        self.p.produce(topic, key=key.encode(), value=b"v", partition=0, on_delivery=lambda e, m: result.append(e))
        self.p.flush(30)
        assert result, "no delivery report"
        return None if result[0] is None else result[0].code()


def produce_expect(kw: Keyward, producer: OneProducer, topic: str, key: str, expected: int | None) -> None:
    got = producer.send(topic, key)
    assert got == expected, f"key {key}: expected {expected}, got {got}\n{kw.logs(20)}"


@pytest.mark.parametrize("how", ["rename", "in_place", "configmap"])
def test_editing_the_file_flips_ownership_without_dropping_connections(how, tmp_path, eu, us):
    """The file is watched: an editor's write-and-rename, an in-place write, and a Kubernetes
    ConfigMap `..data` symlink swap all take effect within a second."""
    kw = Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE)
    table = kw.table_path
    if how == "configmap":
        # Kubernetes layout: ownership.yaml -> ..data/ownership.yaml, ..data -> ..<timestamp>
        (kw.dir / "..v1").mkdir()
        (kw.dir / "..v1" / "ownership.yaml").write_text(TABLE)
        os.symlink("..v1", kw.dir / "..data")
        table.unlink()
        os.symlink("..data/ownership.yaml", table)
    with kw:
        topic = unique("orders.flip")
        eu.create_topic(topic, partitions=1)
        us_key = keys_of(kw, "us", 1, "flip")[0]
        producer = OneProducer(kw.bootstrap)
        produce_expect(kw, producer, topic, us_key, INVALID_RECORD)
        opened = kw.metric("keyward_client_connections_opened_total")
        version = kw.ownership()["version"]

        started = time.monotonic()
        if how == "rename":
            tmp = kw.dir / ".ownership.yaml.swp"
            tmp.write_text(TAKEOVER)
            os.rename(tmp, table)
        elif how == "in_place":
            with open(table, "w") as f:
                f.write(TAKEOVER)
        else:
            (kw.dir / "..v2").mkdir()
            (kw.dir / "..v2" / "ownership.yaml").write_text(TAKEOVER)
            os.symlink("..v2", kw.dir / "..data_tmp")
            os.rename(kw.dir / "..data_tmp", kw.dir / "..data")
        wait_for(lambda: kw.ownership()["version"] == version + 1, 1.0, "the new table within a second")
        assert time.monotonic() - started < 1.0

        produce_expect(kw, producer, topic, us_key, None)
        assert kw.metric("keyward_client_connections_opened_total") == opened, "a reload dropped connections"
        assert kw.metric("keyward_table_reloads_total", trigger="file", result="loaded") >= 1
        assert "ownership table loaded" in kw.logs(200) and "takeover: {} -> {us: eu}" in kw.logs(200)


def _outside_table(kw: Keyward, tmp_path) -> "os.PathLike":
    """Points ownership.yaml at a file in another directory, so editing that file is invisible to
    the watcher and only an explicit reload picks it up."""
    real = tmp_path / "elsewhere" / "table.yaml"
    real.parent.mkdir()
    real.write_text(TABLE)
    kw.table_path.unlink()
    os.symlink(real, kw.table_path)
    return real


def test_sighup_reloads(tmp_path, eu, us):
    kw = Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE)
    real = _outside_table(kw, tmp_path)
    with kw:
        topic = unique("orders.hup")
        eu.create_topic(topic, partitions=1)
        us_key = keys_of(kw, "us", 1, "hup")[0]
        producer = OneProducer(kw.bootstrap)
        produce_expect(kw, producer, topic, us_key, INVALID_RECORD)
        real.write_text(TAKEOVER)
        time.sleep(0.5)
        assert kw.ownership()["version"] == 1, "the watcher should not see a file outside its directory"
        kw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: kw.ownership()["version"] == 2, 1.0, "SIGHUP reload")
        produce_expect(kw, producer, topic, us_key, None)
        assert kw.metric("keyward_table_reloads_total", trigger="sighup", result="loaded") == 1


def test_post_reload_and_invalid_tables(tmp_path, eu, us):
    kw = Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE)
    real = _outside_table(kw, tmp_path)
    with kw:
        topic = unique("orders.api")
        eu.create_topic(topic, partitions=1)
        us_key = keys_of(kw, "us", 1, "api")[0]
        producer = OneProducer(kw.bootstrap)
        first = kw.ownership()

        # Nothing changed: answered, not swapped.
        status, body = kw.admin("/reload", "POST")
        assert status == 200 and json.loads(body)["result"] == "unchanged", body

        # An invalid table is refused and the old one keeps serving.
        real.write_text(TABLE.replace('us: ["8-15"]', 'us: ["7-15"]'))
        status, body = kw.admin("/reload", "POST")
        assert status == 422, body
        error = json.loads(body)["error"]
        assert error.endswith('rules[0].owners.us: slot 7 is also owned by eu'), error
        state = kw.ownership()
        assert (state["version"], state["hash"]) == (first["version"], first["hash"])
        assert state["last_reload_error"]["message"] == error
        assert kw.metric("keyward_table_reload_failing") == 1
        assert kw.metric("keyward_table_reloads_total", trigger="api", result="error") == 1
        produce_expect(kw, producer, topic, us_key, INVALID_RECORD)

        # A valid table clears the failure and decides the next produce.
        real.write_text(TAKEOVER)
        status, body = kw.admin("/reload", "POST")
        reply = json.loads(body)
        assert status == 200 and reply["result"] == "loaded" and reply["version"] == 2, body
        assert reply["hash"] != first["hash"]
        assert 0 < reply["load_ms"] < 5_000, body
        assert kw.metric("keyward_table_load_seconds") == pytest.approx(reply["load_ms"] / 1000, rel=1e-6)
        assert kw.ownership()["last_reload_error"] is None
        assert kw.metric("keyward_table_reload_failing") == 0
        assert kw.metric("keyward_table_version") == 2
        assert kw.metric("keyward_table_info", hash=reply["hash"]) == 1
        assert kw.metric("keyward_table_info", hash=first["hash"]) == 0
        produce_expect(kw, producer, topic, us_key, None)


def test_rejection_messages_carry_the_table_hash(kw, eu):
    topic = unique("orders.hash")
    eu.create_topic(topic, partitions=1)
    from harness import JavaClient

    r = JavaClient().produce(kw.bootstrap, topic, [record(keys_of(kw, "us", 1, "h")[0].encode(), b"v")])
    assert f"[ownership table {kw.ownership()['hash'][:12]}]" in r[0]["error_message"], r


def test_metrics_count_exactly_what_was_decided(kw, eu):
    topic, tenants = unique("orders.count"), unique("tenant.count")
    eu.create_topic(topic, partitions=1)
    eu.create_topic(tenants, partitions=1)
    eu_keys, us_keys = keys_of(kw, "eu", 3, "cnt"), keys_of(kw, "us", 2, "cnt")
    client = LibrdkafkaClient()
    recs = [record(k.encode(), b"v", partition=0) for k in eu_keys + us_keys] + [record(None, b"v", partition=0)]
    client.produce(kw.bootstrap, topic, recs, flush_every=1)
    client.produce(
        kw.bootstrap,
        tenants,
        [record(b"a", b"v", headers=[("tenant", b"initech")]), record(b"b", b"v", headers=[("tenant", b"acme")])],
        flush_every=1,
    )

    def count(**labels):
        return kw.metric("keyward_produce_records_total", **labels)

    assert count(rule="orders", owner="eu", decision="forwarded", reason="-") == 3
    assert count(rule="orders", owner="us", decision="rejected", reason="foreign_owner") == 2
    assert count(rule="orders", owner="-", decision="rejected", reason="null_key") == 1
    assert count(rule="tenants", owner="us", decision="rejected", reason="foreign_owner") == 1
    assert count(rule="tenants", owner="eu", decision="forwarded", reason="-") == 1
    assert kw.metric("keyward_produce_batches_total", rule="orders", decision="rejected") == 3
    assert kw.metric("keyward_requests_total", api="Produce") >= 8
    assert kw.metric("keyward_request_duration_seconds_count", api="Produce", part="broker") >= 4
    assert kw.metric("keyward_client_bytes_received_total") > 0
    assert kw.metric("keyward_client_bytes_sent_total") > 0
    assert kw.metric("keyward_upstream_connections_opened_total", cluster="eu") >= 1
    # Which build runs: the version and commit `keyward --version` prints.
    version = subprocess.run([str(binary()), "--version"], capture_output=True, text=True, check=True).stdout
    release, commit = re.fullmatch(r"keyward (\S+) \(commit (\w+)\)\n", version).groups()
    assert kw.metric("keyward_build_info", version=release, commit=commit) == 1
    # keyward's own log file sits next to the table: writing it, or reading the table, is no
    # reason to reload.
    assert kw.metric("keyward_table_reloads_total", trigger="file") == 0


def test_admin_owner_matches_the_command_line(kw):
    for query, args in (
        ("topic=orders&key=21", ("--key", "21")),
        ("topic=tenant.x&header=tenant:initech", ("--header", "tenant=initech")),
        ("topic=inventory.x&partition=3", ("--partition", "3")),
        ("topic=orders&null_key=true", ("--null-key",)),
    ):
        status, body = kw.admin(f"/ownership/owner?{query}")
        assert status == 200, body
        topic = query.split("&")[0].split("=")[1]
        assert body.strip() == kw.owner(topic, *args)
    assert kw.admin("/ownership/owner?key=x")[0] == 400


def test_readiness_follows_the_serving_cluster(tmp_path, us):
    # A cluster of the test's own plays region eu, so stopping it disturbs no other test.
    region = KafkaCluster("ready", 1, tmp_path)
    region.start()
    try:
        # Reads may only come from eu: with eu down there is nowhere to serve from.
        kw = Keyward(
            tmp_path,
            "eu",
            {"eu": region, "us": us},
            TABLE,
            extra_config="reads: { prefer: [eu], probe_interval_ms: 500 }\n",
        )
        with kw:
            assert kw.admin("/readyz") == (200, "ready\n")
            assert kw.admin("/healthz")[0] == 200
            region.stop(grace_s=2)
            status, body = wait_for(
                lambda: (r := kw.admin("/readyz"))[0] == 503 and r, 15, "readyz to turn 503"
            )
            assert "serving cluster (eu) does not answer" in body, body
            assert kw.metric("keyward_cluster_up", cluster="eu") == 0
            assert kw.metric("keyward_cluster_up", cluster="us") == 1
            assert kw.metric("keyward_ready") == 0
    finally:
        region.stop(grace_s=2)


def test_json_logs(tmp_path, eu, us):
    with Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE, args=("--log-format", "json")) as kw:
        LibrdkafkaClient().metadata(kw.bootstrap)
        lines = [line for line in kw.log_path.read_text().splitlines() if line.strip()]
        assert lines
        for line in lines:
            entry = json.loads(line)
            assert {"timestamp", "level", "fields"} <= set(entry), entry
