"""Protocol conformance through keyward: every API key at every version keyward advertises,
sent to real brokers through keyward, answers with the right correlation id and decodes; and
every API key and version the broker offers that keyward does not gets a broker's answer
(UNSUPPORTED_VERSION for ApiVersions, a closed connection for anything else).

The checks live in examples/conformance.rs (kafka-protocol encodes the requests and decodes the
responses); this test builds it, runs it against a keyward in front of the eu cluster and
asserts on its report. When something fails, the same run straight against an eu broker is
printed too, to tell keyward's faults from the broker's own behaviour.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import unique
from harness.keyward import Keyward
from test_keyward import TABLE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def conformance_bin() -> Path:
    subprocess.run(
        ["cargo", "build", "--quiet", "--example", "conformance"],
        cwd=ROOT,
        check=True,
        timeout=900,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    path = target / "debug" / "examples" / "conformance"
    assert path.exists(), f"no conformance binary at {path}"
    return path


def run_conformance(binary: Path, bootstrap: str, topic: str, broker: str | None = None) -> subprocess.CompletedProcess:
    """Runs the walk; with `broker` (a broker of the cluster behind `bootstrap`) it also checks
    every API key and version that broker offers and `bootstrap` does not."""
    args = [str(binary), bootstrap, topic] + (["--broker", broker] if broker else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_every_advertised_api_and_version_answers_and_decodes(tmp_path, eu, us, conformance_bin):
    # No rule matches this topic, so the table's `default: allow` lets the writes through.
    topic = unique("conformance")
    eu.create_topic(topic, partitions=1)
    with Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE) as kw:
        result = run_conformance(conformance_bin, kw.bootstrap, topic, broker=eu.nodes[0].address)
        print(result.stdout)
        print(result.stderr)
        lines = result.stdout.splitlines()
        failed = [line for line in lines if "FAILED" in line]
        if failed or result.returncode != 0:
            direct = run_conformance(conformance_bin, eu.bootstrap, topic)
            print("--- the same, straight to the eu cluster (no keyward) ---")
            print(direct.stdout)
            print("--- keyward log ---")
            print(kw.logs(200))
        assert not failed, "\n".join(failed)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert lines and lines[-1].endswith(" passed, 0 failed"), lines[-1:]
        assert int(lines[-1].split()[0]) > 0
        # Versions keyward does not offer got a broker's answer: ApiVersions v5 and Produce v13
        # above keyward's ceilings, the withheld DescribeQuorum at every version.
        assert any(line.startswith("ApiVersions v5 (not offered): ok (UNSUPPORTED_VERSION") for line in lines)
        assert any(line.startswith("Produce v13 (not offered): ok (connection closed") for line in lines)
        assert any(line.startswith("DescribeQuorum v0 (not offered): ok (connection closed") for line in lines)
        assert kw.metric("keyward_unsupported_versions_total", api="ApiVersions", version="5") >= 1
        assert kw.metric("keyward_unsupported_versions_total", api="Produce", version="13") >= 1
        assert kw.metric("keyward_client_connections_closed_total", cause="unsupported_version") >= 1
