"""Session fixtures for the end-to-end tests: real Kafka clusters and real clients.

  eu       3-broker KRaft cluster (node ids 1..3)
  us       1-broker KRaft cluster (node id 1)
  pki      the session's test CA (harness.certs.Pki): `pki.issue(name)` for more certificates
  secure   1-broker cluster whose client listener is SASL_SSL (users alice/alice-secret,
           bob/bob-secret, keyward/keyward-secret; PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) plus
           an mTLS listener (mtls_bootstrap), with ACLs: keyward (and the certificate
           CN=keyward-client) is a super user, alice may do anything to every topic, group
           and transactional id, bob may only read and describe; its CA,
           `secure.security.pki`, is the session's `pki` (also where a module overrides `pki`)
  clients  [JavaClient, LibrdkafkaClient, FranzClient]
  client   the same three as a parametrized fixture: one run of the test per client
  summary  summary(section, line): a line for the terminal summary (the fault suite's figures)

Each cluster starts the first time a test asks for it and stops at the end of
the session. (Booting both side by side was measured slower and less steady on
2 cores than one after the other: 4 JVMs starting at once delay the Raft
elections.) Logs stay under pytest's basetemp:
/tmp/pytest-of-$USER/pytest-N/kafka0/{eu,us,secure}/node-*/server.log
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ALL_CLIENTS, KafkaCluster, KafkaSecurity, Pki  # noqa: E402

_boot_report: list[str] = []
_summary: dict[str, list[str]] = {}


@pytest.fixture(scope="session")
def kafka_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kafka")


def _cluster(name: str, brokers: int, workdir: Path, security: KafkaSecurity | None = None):
    cluster = KafkaCluster(name, brokers, workdir, security=security)
    cluster.start()
    _boot_report.append(f"{name}: {brokers} broker(s) ready in {cluster.boot_seconds:.1f}s ({cluster.bootstrap})")
    yield cluster
    # Nothing is reused after the session: a short grace, then SIGKILL. (A 3-node KRaft
    # quorum stopped all at once waits 5 s for a graceful Raft shutdown that cannot happen.)
    cluster.stop(grace_s=2)


@pytest.fixture(scope="session")
def eu(kafka_workdir):
    yield from _cluster("eu", 3, kafka_workdir)


@pytest.fixture(scope="session")
def us(kafka_workdir):
    yield from _cluster("us", 1, kafka_workdir)


@pytest.fixture(scope="session")
def _session_ca(tmp_path_factory) -> Pki:
    """The session's CA. `secure` asks for it by this name, so that a test module may
    override `pki` with a CA of its own without a scope mismatch."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def pki(_session_ca) -> Pki:
    return _session_ca


@pytest.fixture(scope="session")
def secure(kafka_workdir, _session_ca):
    users = {"alice": "alice-secret", "bob": "bob-secret", "keyward": "keyward-secret"}
    security = KafkaSecurity(
        _session_ca, users, mtls=True, acls=True, super_users=("User:keyward", "User:CN=keyward-client")
    )
    for cluster in _cluster("secure", 1, kafka_workdir, security):
        everything = [(kind, "*", "ALL") for kind in ("TOPIC", "GROUP", "TRANSACTIONAL_ID")]
        cluster.allow("User:alice", everything + [("BROKER", "kafka-cluster", "IDEMPOTENT_WRITE")])
        cluster.allow("User:bob", [("TOPIC", "*", "READ"), ("TOPIC", "*", "DESCRIBE"), ("GROUP", "*", "READ")])
        yield cluster


@pytest.fixture(scope="session")
def clients():
    return list(ALL_CLIENTS)


@pytest.fixture(params=ALL_CLIENTS, ids=lambda c: c.name)
def client(request):
    return request.param


@pytest.fixture(scope="session")
def summary():
    """summary(section, line) shows `line` under `section` in the terminal summary, so figures a
    test measured are visible whether or not pytest captures its output."""
    return lambda section, line: _summary.setdefault(section, []).append(line)


def pytest_terminal_summary(terminalreporter):
    if _boot_report:
        terminalreporter.write_sep("-", "kafka clusters")
        for line in _boot_report:
            terminalreporter.write_line(line)
    for section, lines in _summary.items():
        terminalreporter.write_sep("-", section)
        for line in lines:
            terminalreporter.write_line(line)
