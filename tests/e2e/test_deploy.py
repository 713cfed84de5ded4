"""deploy/: the Grafana dashboard, the Prometheus alert rules and the systemd unit operators install.

The files must parse, and every metric their PromQL queries must be one keyward really exports:
a renamed or misspelt metric would leave a dashboard panel empty or an alert that can never fire,
silently. The exported names come from a real keyward in front of the real clusters, after
traffic that makes it record its metrics (the Prometheus exporter lists a metric only once it
has a sample).

The alert rules are also checked and unit-tested by promtool (Debian's prometheus package), each
alert's runbook_url must lead to a section of docs/runbook.md, and the systemd unit must pass
`systemd-analyze verify`. These need no cluster.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness import LibrdkafkaClient, env, record, unique
from harness.keyward import Keyward

from test_keyward import INVALID_RECORD, TABLE

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "keyward-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "keyward-alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "keyward-alerts.test.yaml"
RUNBOOK = DEPLOY.parent / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/keyward/keyward/blob/main/docs/runbook.md"
UNIT = DEPLOY / "systemd" / "keyward.service"

# A metric name in a PromQL expression (not part of a longer identifier such as a recording
# rule `x:keyward_y`). `up` and functions never match: only keyward's own metrics are checked.
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])keyward_[a-z0-9_]+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)\s*$", re.M)

REQUIRED_ALERTS = {
    "KeywardWritesRejected",
    "KeywardRejectionsAboveBaseline",
    "KeywardTableReloadFailing",
    "KeywardTableMismatch",
    "KeywardClusterUnreachable",
    "KeywardNotReady",
    "KeywardDown",
    "KeywardWritesHeld",
    "KeywardWritesHeldNotFrozen",
    "KeywardRedirectFailing",
    "KeywardPanicked",
    "KeywardReplicationLagging",
    "KeywardReplicationUnmeasured",
}


def _yaml():
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed: add it to tests/e2e/requirements.txt (dev/install-test-deps installs it)")
    return yaml


# --------------------------------------------------------------------------- extraction


def metric_names(expr: str) -> set[str]:
    """keyward metric names an expression reads, histogram series folded into their metric."""
    names = set()
    for name in _METRIC.findall(expr):
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL string of a dashboard: panel targets, annotations and template variables."""
    out: list[str] = []

    def walk(node, in_templating=False):
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str):
                    if key == "expr" or (in_templating and key in ("query", "definition")):
                        out.append(value)
                else:
                    walk(value, in_templating or key == "templating")
        elif isinstance(node, list):
            for value in node:
                walk(value, in_templating)

    walk(dashboard)
    return out


def alert_queries(rules: dict) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_alerts() -> dict:
    return _yaml().safe_load(ALERTS.read_text())


def referenced_metrics() -> dict[str, set[str]]:
    """metric name -> the files that query it."""
    refs: dict[str, set[str]] = {}
    for path, queries in ((DASHBOARD, dashboard_queries(load_dashboard())), (ALERTS, alert_queries(load_alerts()))):
        for q in queries:
            for name in metric_names(q):
                refs.setdefault(name, set()).add(path.relative_to(DEPLOY.parent).as_posix())
    return refs


def bucket_metrics() -> set[str]:
    """Metrics queried through their `_bucket` series: they must be exported as histograms."""
    queries = dashboard_queries(load_dashboard()) + alert_queries(load_alerts())
    return {m[: -len("_bucket")] for q in queries for m in _METRIC.findall(q) if m.endswith("_bucket")}


def exported_types(metrics_text: str) -> dict[str, str]:
    return dict(_TYPE.findall(metrics_text))


def test_metric_names_are_read_from_promql():
    expr = (
        'histogram_quantile(0.99, sum by (le, api) (rate(keyward_request_duration_seconds_bucket{part="proxy"}[5m])))'
        ' / on() group_left sum(rate(keyward_produce_records_total{decision="rejected"}[1h] offset 1d))'
        ' and up{job="keyward"} == 0 and x:keyward_recorded:rate5m > 0'
    )
    assert metric_names(expr) == {"keyward_request_duration_seconds", "keyward_produce_records_total"}
    assert metric_names("keyward_request_duration_seconds_sum / keyward_request_duration_seconds_count") == {
        "keyward_request_duration_seconds"
    }
    text = "# HELP keyward_ready 1 when serving\n# TYPE keyward_ready gauge\nkeyward_ready 1\n"
    text += "# TYPE keyward_x_total counter\n"
    assert exported_types(text) == {"keyward_ready": "gauge", "keyward_x_total": "counter"}


# --------------------------------------------------------------------------- the files parse


def test_dashboard_parses_and_uses_its_variables():
    d = load_dashboard()
    assert d["schemaVersion"] >= 36, d["schemaVersion"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "region"):
        assert variables[name]["type"] == "query", variables[name]
        assert "keyward_table_version" in variables[name]["definition"], variables[name]

    panels = [p for p in d["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for p in panels:
        where = f"panel {p['title']!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["targets"], where
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", where
            assert metric_names(t["expr"]), f"{where}: no keyward metric in {t['expr']!r}"
            assert '$instance' in t["expr"] and '$region' in t["expr"], f"{where}: {t['expr']!r} ignores the variables"
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, where


def test_the_dashboard_shows_what_redirect_and_read_failover_cost():
    """Redirected bytes/s per region pair and bytes/s served per cluster, each in a panel."""
    queries = [t["expr"] for p in load_dashboard()["panels"] if p["type"] != "row" for t in p["targets"]]
    for metric, by in (
        ("keyward_redirected_bytes_total", "by (from, to)"),
        ("keyward_redirected_records_total", "by (from, to)"),
        ("keyward_served_bytes_total", "by (cluster)"),
    ):
        assert any(metric in q and by in q and "rate(" in q for q in queries), f"no panel shows {metric} {by}"
    # Failback: how consumer groups' positions were carried home, by outcome.
    assert any("keyward_failback_offsets_total" in q and "by (outcome)" in q for q in queries)
    for metric in ("keyward_failback_validations_held_total", "keyward_failback_members_fenced_total",
                   "keyward_failback_commits_refused_total"):
        assert any(metric in q for q in queries), f"no panel shows {metric}"
    # The switch into the view: the positions groups found, were carried, or had none.
    assert any("keyward_view_offsets_total" in q and "by (reads, outcome)" in q for q in queries)


def test_alert_rules_parse():
    rules = load_alerts()
    assert [g["name"] for g in rules["groups"]] == ["keyward"]
    alerts = rules["groups"][0]["rules"]
    names = [r["alert"] for r in alerts]
    assert len(names) == len(set(names)), names
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)
    for r in alerts:
        assert r["expr"].strip(), r["alert"]
        assert re.fullmatch(r"\d+[smhdwy]", r["for"]), r
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r
        assert r["annotations"]["summary"].strip() and r["annotations"]["description"].strip(), r["alert"]
    by_name = {r["alert"]: r for r in alerts}
    assert by_name["KeywardDown"]["expr"].strip() == 'up{job="keyward"} == 0'


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: dev/install-test-deps installs it (Debian package, see there)")
    return path


def _run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_alert_rules():
    r = _run(_tool("promtool"), "check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_queries(load_alerts()))} rules found" in r.stdout, r.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    alerts = {r["alert"] for r in load_alerts()["groups"][0]["rules"]}
    cases = [c for t in _yaml().safe_load(ALERT_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert not alerts - fires, f"no case where these fire: {sorted(alerts - fires)}"
    assert not alerts - quiet, f"no case where these stay quiet: {sorted(alerts - quiet)}"
    assert not (fires | quiet) - alerts, f"cases for alerts that do not exist: {sorted((fires | quiet) - alerts)}"


def test_alert_rules_pass_their_unit_tests(tmp_path):
    """`promtool test rules` compares annotations too; the cases are about when an alert fires and
    with which labels, so they run against a copy of the rules without annotations (wording and
    runbook links are checked by the other tests)."""
    rules = load_alerts()
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / ALERTS.name).write_text(_yaml().safe_dump(rules, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    r = _run(_tool("promtool"), "test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-"))
    return anchors


def test_every_alert_links_to_its_runbook_section():
    anchors = _github_anchors(RUNBOOK.read_text())
    for rule in load_alerts()["groups"][0]["rules"]:
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"{RUNBOOK_URL}#{rule['alert'].lower()}", f"{rule['alert']}: runbook_url {url!r}"
        assert rule["alert"].lower() in anchors, f"docs/runbook.md has no section {rule['alert']!r}"


def test_systemd_unit_verifies(tmp_path):
    """`systemd-analyze verify` on the unit as shipped, except that ExecStart names the built binary
    (verify requires the executable to exist). It exits 0 on unknown or misspelt settings, only
    warning: any output fails the test."""
    from harness.keyward import binary

    text = UNIT.read_text()
    assert "\nExecStart=/usr/local/bin/keyward run --config /etc/keyward/keyward.yaml\n" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("ExecStart=/usr/local/bin/keyward ", f"ExecStart={binary()} "))
    r = _run(_tool("systemd-analyze"), "verify", str(unit))
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_systemd_unit_is_hardened(tmp_path):
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "ConfigurationDirectory": "keyward",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], f"{key}: {settings.get(key)}"
    assert "@system-service" in settings["SystemCallFilter"], settings["SystemCallFilter"]
    assert int(settings["LimitNOFILE"][0]) >= 2 * 10000 + 1000, "two descriptors per client connection"

    # systemd's own score of the sandbox: 0 (locked down) to 10; "OK" is below 4.5.
    r = _run(_tool("systemd-analyze"), "security", "--offline=yes", str(UNIT))
    assert r.returncode == 0, r.stdout + r.stderr
    score = float(re.search(r"Overall exposure level for keyward.service: ([0-9.]+)", r.stdout).group(1))
    assert score <= 1.5, r.stdout


# --------------------------------------------------------------------------- against a real keyward


class _Unreachable:
    """A cluster nobody listens for: keyward starts in front of it and fails every upstream connect."""

    size = 1
    nodes = ()

    def __init__(self) -> None:
        self.addresses = [f"127.0.0.1:{env.free_port()}"]


def _key_owned_by(kw: Keyward, topic: str, region: str) -> str:
    for i in range(1000):
        key = f"deploy-{i}"
        if kw.owner(topic, "--key", key).startswith(f"region={region} "):
            return key
    raise AssertionError(f"no key owned by {region} among 1000")


def _until_closed(port: int, payload: bytes = b"") -> None:
    """Connect, send payload, and wait until keyward closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if payload:
            s.sendall(payload)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, socket.timeout):
            pass


def test_every_metric_in_deploy_files_is_exported(tmp_path, eu, us, pki):
    referenced = referenced_metrics()
    assert len(referenced) >= 10, referenced

    # With replication measured; the mirror of this test's topic, created below, gives it lag series.
    kw = Keyward(
        tmp_path, "eu", {"eu": eu, "us": us}, TABLE, extra_config="replication: { interval_ms: 200 }\n"
    ).start()
    kw_dead = Keyward(tmp_path, "eu", {"eu": _Unreachable(), "us": us}, TABLE, name="keyward-unreachable").start()
    # An instance with TLS on its listeners exports the certificate metrics.
    cert = pki.issue("deploy-proxy")
    kw_tls = Keyward(
        tmp_path,
        "eu",
        {"eu": eu, "us": us},
        TABLE,
        name="keyward-tls",
        listen_extra=f"tls: {{ cert: {cert.cert}, key: {cert.key} }}",
    ).start()
    try:
        client = LibrdkafkaClient()
        topic = unique("orders.deploy")
        eu.create_topic(topic, partitions=16)
        us.create_topic(f"eu.{topic}", partitions=16)
        owned, foreign = _key_owned_by(kw, topic, "eu"), _key_owned_by(kw, topic, "us")

        # Forwarded and rejected records, then a consume: Produce, Fetch, Metadata, groups, ...
        r = client.produce(kw.bootstrap, topic, [record(owned.encode(), b"mine"), record(foreign.encode(), b"theirs")])
        assert r[0]["ok"] and r[1]["error_code"] == INVALID_RECORD, r
        got = client.consume(kw.bootstrap, [topic], unique("deploy"), expected_count=1)
        assert [m["key"] for m in got] == [owned.encode()], got
        # acks=0 and refused: keyward closes the connection.
        client.produce(kw.bootstrap, topic, [record(foreign.encode(), b"theirs")], {"acks": "0"})
        # A frame larger than limits.max_frame_bytes: a protocol error.
        _until_closed(kw.bootstrap_port, b"\x7f\xff\xff\xff")
        # A client of the instance whose cluster cannot be reached: an upstream connect error.
        _until_closed(kw_dead.bootstrap_port)

        # Counters of closing connections land a moment later.
        deadline = time.monotonic() + 10
        while True:
            exported = {
                **exported_types(kw_tls.metrics_text()),
                **exported_types(kw_dead.metrics_text()),
                **exported_types(kw.metrics_text()),
            }
            missing = sorted(set(referenced) - set(exported))
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    finally:
        kw.stop()
        kw_dead.stop()
        kw_tls.stop()

    problems = [
        f"{name} (queried in {', '.join(sorted(referenced[name]))}) is not exported by keyward" for name in missing
    ]
    problems += [
        f"{name} is queried through {name}_bucket but exported as a {exported[name]}, not a histogram"
        for name in sorted(bucket_metrics())
        if name in exported and exported[name] != "histogram"
    ]
    assert not problems, (
        f"deploy/ does not match the running keyward ({len(missing)} of {len(referenced)} queried metrics missing):\n  "
        + "\n  ".join(problems)
        + f"\nexported: {sorted(exported)}"
    )
