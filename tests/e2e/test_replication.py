"""MirrorMaker 2's lag as keyward measures it (`replication` in keyward.yaml): `GET /replication` and
the `keyward_replication_*` metrics agree with the end offsets read directly from both clusters,
in both directions; with MirrorMaker 2 stopped the lag is exactly the records written since, with
a positive age; once it runs again the lag returns to 0; a covered topic MirrorMaker 2 does not
replicate is reported as missing, not as lag 0.

One MirrorMaker 2 (eu <-> us, default replication policy) for the module, on the session's
clusters, replicating only this module's topics.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest
from confluent_kafka import Consumer, TopicPartition

from harness import LibrdkafkaClient, record, unique
from harness.keyward import Keyward
from harness.mirror import MirrorMaker

from test_keyward import TABLE
from test_operator import wait_for


def end_offsets(cluster, topic: str, partitions: int) -> dict[int, int]:
    """High watermarks read directly from the cluster: what MirrorMaker 2 can read and wrote."""
    c = Consumer({**cluster._client_conf(), "group.id": unique("lag-direct"), "enable.auto.commit": False})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        c.close()


def report(kw: Keyward) -> dict:
    status, body = kw.admin("/replication")
    assert status == 200, body
    return json.loads(body)


def topic_of(rep: dict, source: str, target: str, topic: str) -> dict | None:
    for pair in rep["pairs"]:
        if (pair["source"], pair["target"]) == (source, target):
            return next((t for t in pair["topics"] if t["topic"] == topic), None)
    return None


def measured_after(kw: Keyward, t0: float, source: str, target: str, topic: str, ok, timeout_s: float, what: str):
    """The first report measured after `t0` (epoch seconds) whose entry for `topic` satisfies `ok`."""

    def check():
        rep = report(kw)
        if rep["measured_at"] is None:
            return None
        at = datetime.fromisoformat(rep["measured_at"].replace("Z", "+00:00")).timestamp()
        t = topic_of(rep, source, target, topic)
        return t if at >= t0 and t is not None and ok(t) else None

    return wait_for(check, timeout_s, what)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, eu, us):
    tmp = tmp_path_factory.mktemp("replication")
    prefix = unique("lag")
    topics = {"eu": f"{prefix}.orders", "us": f"{prefix}.orders"}
    eu.create_topic(topics["eu"], partitions=2)
    us.create_topic(topics["us"], partitions=1)
    unmirrored = f"{prefix}.unmirrored"
    eu.create_topic(unmirrored, partitions=1)
    table = f"""
rules:
  - name: lag
    topics: ["{prefix}.*"]
    by: topic
    owner: eu
default: allow
"""
    kw = Keyward(tmp, "eu", {"eu": eu, "us": us}, table, extra_config="replication: { interval_ms: 300 }\n").start()
    # MirrorMaker 2 replicates `<prefix>.orders` both ways, and not `<prefix>.unmirrored`.
    mm2 = MirrorMaker(tmp, {"eu": eu, "us": us}, topics=topics["eu"].replace(".", "\\.")).start()
    try:
        yield kw, mm2, topics, unmirrored
    finally:
        mm2.stop()
        kw.stop()


def test_replication_lag_matches_the_offsets_and_follows_mirrormaker(setup, eu, us):
    kw, mm2, topics, unmirrored = setup
    client = LibrdkafkaClient()
    topic = topics["eu"]
    n = 10
    r = client.produce(eu.bootstrap, topic, [record(b"k", f"a{i}".encode(), partition=i % 2) for i in range(n)])
    assert all(x["ok"] for x in r), r
    r = client.produce(us.bootstrap, topics["us"], [record(b"k", f"u{i}".encode(), partition=0) for i in range(3)])
    assert all(x["ok"] for x in r), r

    # 1. MirrorMaker 2 catches up: lag 0 both ways, and every offset keyward reports is the one
    #    read directly from each cluster.
    caught_up = lambda t: t["error"] is None and t["lag_records"] == 0 and sum(  # noqa: E731
        p["source_end"] for p in t["partitions"]
    ) == sum(p["mirror_end"] for p in t["partitions"])
    t0 = time.time()
    measured_after(kw, t0, "eu", "us", topic, caught_up, 120, f"eu.{topic} to catch up:\n{mm2.logs(30)}")
    measured_after(kw, t0, "us", "eu", topics["us"], caught_up, 60, f"us.{topic} to catch up")
    rep = report(kw)
    eu_to_us = topic_of(rep, "eu", "us", topic)
    assert eu_to_us["mirror"] == f"eu.{topic}"
    direct_source = end_offsets(eu, topic, 2)
    direct_mirror = end_offsets(us, f"eu.{topic}", 2)
    assert sum(direct_source.values()) == n
    assert {p["partition"]: p["source_end"] for p in eu_to_us["partitions"]} == direct_source
    assert {p["partition"]: p["mirror_end"] for p in eu_to_us["partitions"]} == direct_mirror
    assert all(p["lag_records"] == 0 and p["lag_seconds"] == 0 for p in eu_to_us["partitions"])
    us_to_eu = topic_of(rep, "us", "eu", topics["us"])
    assert us_to_eu["mirror"] == f"us.{topic}"
    assert [p["source_end"] for p in us_to_eu["partitions"]] == [end_offsets(us, topics["us"], 1)[0]] == [3]
    assert [p["mirror_end"] for p in us_to_eu["partitions"]] == [end_offsets(eu, f"us.{topic}", 1)[0]]
    for p in range(2):
        labels = {"source": "eu", "target": "us", "topic": topic, "partition": str(p)}
        assert kw.metric("keyward_replication_lag_records", **labels) == 0
        assert kw.metric("keyward_replication_lag_seconds", **labels) == 0

    # 2. A covered topic MirrorMaker 2 does not replicate: missing, never lag 0.
    missing = topic_of(rep, "eu", "us", unmirrored)
    assert missing["partitions"] == [] and "does not exist in us" in missing["error"], missing
    pairs = {(p["source"], p["target"]): p for p in rep["pairs"]}
    assert pairs[("us", "eu")]["caught_up"] is True, "us's one topic is level"
    assert pairs[("eu", "us")]["caught_up"] is False and rep["caught_up"] is False, "a mirror is missing"
    assert f'topic="{unmirrored}"' not in kw.metrics_text()
    assert kw.metric("keyward_replication_unmeasured_topics", source="eu", target="us") == 1
    assert kw.metric("keyward_replication_unmeasured_topics", source="us", target="eu") == 0
    assert kw.metric("keyward_replication_last_check_timestamp_seconds", source="eu", target="us") > t0

    # 3. MirrorMaker 2 stopped: the lag is exactly the records written since, per partition as
    #    read directly, and their age is above 0 (and no more than they have waited).
    mm2.stop()
    m = 7
    written_at = time.time()
    r = client.produce(eu.bootstrap, topic, [record(b"k", f"b{i}".encode(), partition=i % 2) for i in range(m)])
    assert all(x["ok"] for x in r), r
    time.sleep(1)
    lagging = measured_after(
        kw, time.time(), "eu", "us", topic, lambda t: t["lag_records"] == m, 10, f"a lag of {m} records"
    )
    direct_source, direct_mirror = end_offsets(eu, topic, 2), end_offsets(us, f"eu.{topic}", 2)
    assert sum(direct_source.values()) - sum(direct_mirror.values()) == m
    for p in lagging["partitions"]:
        i = p["partition"]
        assert (p["source_end"], p["mirror_end"]) == (direct_source[i], direct_mirror[i]), p
        assert p["lag_records"] == direct_source[i] - direct_mirror[i] == (4 if i == 0 else 3)
        assert 0.5 < p["lag_seconds"] <= time.time() - written_at + 1, p
        labels = {"source": "eu", "target": "us", "topic": topic, "partition": str(i)}
        assert kw.metric("keyward_replication_lag_records", **labels) == p["lag_records"]
        assert kw.metric("keyward_replication_lag_seconds", **labels) > 0.5

    # 4. MirrorMaker 2 runs again and catches up: the lag returns to 0.
    mm2.start()
    done = measured_after(kw, time.time(), "eu", "us", topic, caught_up, 120, f"catching up again:\n{mm2.logs(30)}")
    assert {p["partition"]: p["mirror_end"] for p in done["partitions"]} == end_offsets(us, f"eu.{topic}", 2)
    assert {p["partition"]: p["source_end"] for p in done["partitions"]} == end_offsets(eu, topic, 2)
    assert all(p["lag_records"] == 0 and p["lag_seconds"] == 0 for p in done["partitions"])
    assert kw.metric("keyward_replication_lag_records", source="eu", target="us", topic=topic) == 0


def test_replication_is_not_measured_unless_configured(tmp_path, eu, us):
    with Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE) as kw:
        status, body = kw.admin("/replication")
        assert status == 404 and "not measured" in body, (status, body)
        assert "keyward_replication_" not in kw.metrics_text()


def test_lag_without_mirrormaker_missing_partitions_vanished_mirrors_and_a_silent_region(tmp_path, eu, us):
    """Copies written by hand, no MirrorMaker 2: the lag is the difference of the end offsets
    exactly; a mirror with fewer partitions than its source names the partition it lacks; a
    mirror that disappears is reported missing and its series become NaN, not 0; a region that
    does not answer is the pair's error, counted, with no series."""
    from test_deploy import _Unreachable

    prefix = unique("lag-hand")
    topic, short = f"{prefix}.orders", f"{prefix}.short"
    eu.create_topic(topic, partitions=1)
    us.create_topic(f"eu.{topic}", partitions=1)
    eu.create_topic(short, partitions=2)
    us.create_topic(f"eu.{short}", partitions=1)
    table = f'rules:\n  - name: hand\n    topics: ["{prefix}.*"]\n    by: topic\n    owner: eu\ndefault: allow\n'
    client = LibrdkafkaClient()
    for cluster, name, count in ((eu, topic, 5), (us, f"eu.{topic}", 3)):
        r = client.produce(cluster.bootstrap, name, [record(b"k", b"v", partition=0) for _ in range(count)])
        assert all(x["ok"] for x in r), r

    kw = Keyward(tmp_path, "eu", {"eu": eu, "us": us}, table, extra_config="replication: { interval_ms: 200 }\n")
    with kw:
        t = measured_after(kw, time.time(), "eu", "us", topic, lambda t: t["error"] is None, 10, "a measurement")
        assert [(p["source_end"], p["mirror_end"], p["lag_records"]) for p in t["partitions"]] == [(5, 3, 2)]
        assert t["partitions"][0]["lag_seconds"] > 0
        labels = {"source": "eu", "target": "us", "topic": topic, "partition": "0"}
        assert kw.metric("keyward_replication_lag_records", **labels) == 2

        s = topic_of(report(kw), "eu", "us", short)
        assert [p["partition"] for p in s["partitions"]] == [0, 1]
        assert s["partitions"][0]["lag_records"] == 0 and s["partitions"][1]["lag_records"] is None
        assert s["error"] == f"partition 1: the mirror eu.{short} has no partition 1", s

        us.delete_topic(f"eu.{topic}")
        gone = measured_after(
            kw, time.time(), "eu", "us", topic, lambda t: t["error"] is not None, 20, "the mirror to be missing"
        )
        assert "does not exist in us" in gone["error"] and gone["partitions"] == [], gone
        lag = kw.metric("keyward_replication_lag_records", **labels)
        assert lag != lag, f"NaN expected, got {lag}"

    kw_silent = Keyward(
        tmp_path,
        "eu",
        {"eu": eu, "us": _Unreachable()},
        table,
        name="keyward-silent-us",
        extra_config="replication: { interval_ms: 200 }\n",
    )
    with kw_silent:

        def pair_error():
            rep = report(kw_silent)
            return rep["measured_at"] and [p for p in rep["pairs"] if p["source"] == "eu"][0]

        pair = wait_for(pair_error, 10, "a measurement")
        assert pair["error"].startswith("cannot read us's topics: ") and pair["topics"] == [], pair
        assert pair["caught_up"] is False
        assert kw_silent.metric("keyward_replication_check_errors_total", source="eu", target="us") >= 1
        assert kw_silent.metric("keyward_replication_last_check_timestamp_seconds", source="eu", target="us") == 0
        assert "keyward_replication_lag_records{" not in kw_silent.metrics_text()
        assert report(kw_silent)["caught_up"] is False
