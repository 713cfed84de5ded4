"""Session fixtures for the end-to-end tests: real Kafka clusters and real clients.

  eu       3-broker KRaft cluster (node ids 1..3), started once per session
  us       1-broker KRaft cluster (node id 1), started once per session
  clients  [JavaClient, LibrdkafkaClient, FranzClient]
  client   the same three, as a parametrized fixture (one test run per client)

Both clusters boot side by side the first time either is asked for, and stop at
the end of the session. Their logs stay under pytest's basetemp
(/tmp/pytest-of-$USER/pytest-N/kafka0/{eu,us}/node-*/server.log).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ALL_CLIENTS, KafkaCluster, start_all, stop_all  # noqa: E402

_boot_report: list[str] = []


@pytest.fixture(scope="session")
def kafka_clusters(tmp_path_factory) -> dict[str, KafkaCluster]:
    workdir = tmp_path_factory.mktemp("kafka")
    clusters = {"eu": KafkaCluster("eu", 3, workdir), "us": KafkaCluster("us", 1, workdir)}
    start_all(clusters.values())
    for c in clusters.values():
        _boot_report.append(f"{c.name}: {c.size} broker(s) ready {c.boot_seconds:.1f}s after start ({c.bootstrap})")
    yield clusters
    stop_all(clusters.values(), grace_s=8)


@pytest.fixture(scope="session")
def eu(kafka_clusters) -> KafkaCluster:
    return kafka_clusters["eu"]


@pytest.fixture(scope="session")
def us(kafka_clusters) -> KafkaCluster:
    return kafka_clusters["us"]


@pytest.fixture(scope="session")
def clients():
    return list(ALL_CLIENTS)


@pytest.fixture(params=ALL_CLIENTS, ids=lambda c: c.name)
def client(request):
    return request.param


def pytest_terminal_summary(terminalreporter):
    if _boot_report:
        terminalreporter.write_sep("-", "kafka clusters")
        for line in _boot_report:
            terminalreporter.write_line(line)
