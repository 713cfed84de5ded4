"""Reads from the nearest healthy cluster: when the local cluster stops, keyward serves reads from
the next one in preference order, under node ids no client can confuse with the local cluster's,
holds this region's own writes instead of sending them elsewhere, and moves back once the local
cluster has been healthy for the hold-down.
"""

from __future__ import annotations

import time

from harness import KafkaCluster, LibrdkafkaClient, record, unique
from harness.keyward import Keyward

from test_keyward import INVALID_RECORD, TABLE, keys_of
from test_operator import OneProducer, wait_for


def test_reads_fail_over_to_the_next_healthy_cluster_and_come_back(tmp_path, us):
    eu = KafkaCluster("reads-eu", 1, tmp_path)
    eu.start()
    client = LibrdkafkaClient()
    try:
        topic = unique("orders.reads")
        for cluster, origin in ((eu, b"from-eu"), (us, b"from-us")):
            cluster.create_topic(topic, partitions=1)
            assert client.produce(cluster.bootstrap, topic, [record(b"k", origin)])[0]["ok"]

        hold_down_s = 4
        kw = Keyward(
            tmp_path,
            "eu",
            {"eu": eu, "us": us},
            TABLE,
            extra_config=(
                "reads: { prefer: [eu, us], probe_interval_ms: 300, probe_timeout_ms: 1000,"
                f" hold_down_ms: {hold_down_s * 1000} }}\n"
            ),
        )
        with kw:
            assert kw.metric("keyward_serving_cluster", cluster="eu") == 1
            assert client.metadata(kw.bootstrap) == [(1, "127.0.0.1", kw.port_base + 1)]
            got = client.consume(kw.bootstrap, [topic], unique("g"), expected_count=1, timeout_s=20)
            assert [r["value"] for r in got] == [b"from-eu"]
            # A producer that stays connected across the switch.
            producer = OneProducer(kw.bootstrap)
            eu_key = keys_of(kw, "eu", 1, "fo")[0]
            us_key = keys_of(kw, "us", 1, "fo")[0]
            assert producer.send(topic, eu_key) is None

            eu.stop(grace_s=2)
            wait_for(lambda: kw.metric("keyward_serving_cluster", cluster="us") == 1, 10, "reads to move to us")
            assert kw.admin("/readyz")[0] == 200, "reads are served: still ready"
            wait_for(
                lambda: kw.metric("keyward_client_connections_closed_total", cause="serving_cluster_changed") >= 1,
                5,
                "open connections to be closed by the switch",
            )

            # us's broker under a virtual node id that cannot be confused with eu's node 1.
            assert client.metadata(kw.bootstrap) == [(101, "127.0.0.1", kw.port_base + 101)]
            got = client.consume(kw.bootstrap, [topic], unique("g"), expected_count=1, timeout_s=20)
            assert [r["value"] for r in got] == [b"from-us"]

            # eu's own writes are held (retriable), never written to us; foreign keys are still refused.
            r = client.produce(
                kw.bootstrap,
                topic,
                [record(eu_key.encode(), b"must-not-land-in-us", partition=0)],
                {"delivery_timeout_ms": 3000, "request_timeout_ms": 1000},
            )
            assert not r[0]["ok"] and r[0]["error_code"] != INVALID_RECORD, r
            assert kw.metric("keyward_produce_records_total", decision="held", reason="local_cluster_down") >= 1
            r = client.produce(kw.bootstrap, topic, [record(us_key.encode(), b"x", partition=0)])
            assert r[0]["error_code"] == INVALID_RECORD, r
            assert [x["value"] for x in us.read_all(topic)] == [b"from-us"]

            # eu returns: reads move back only after the hold-down.
            eu.start_node(1)
            back_at = time.monotonic()
            wait_for(
                lambda: kw.metric("keyward_serving_cluster", cluster="eu") == 1,
                hold_down_s + 15,
                "reads to move back to eu",
            )
            assert time.monotonic() - back_at >= hold_down_s * 0.8
            assert kw.metric("keyward_serving_cluster_switches_total") == 2
            assert client.metadata(kw.bootstrap) == [(1, "127.0.0.1", kw.port_base + 1)]
            assert producer.send(topic, eu_key) is None, "the long-lived producer writes again"
            assert [x["key"] for x in eu.read_all(topic)][-1] == eu_key.encode()
    finally:
        eu.stop(grace_s=2)
