"""deploy/helm/keyward: the Helm chart, rendered with `helm template` and checked against the
keyward.yaml it renders, and that keyward.yaml checked by keyward itself.

The chart derives the Service ports, the probes, the mounts and the ServiceMonitor from its
values, and writes keyward.yaml from the same values. These tests read keyward.yaml back out of
the rendered ConfigMap and check every derived object against it, so a port or a path that
drifts between the two fails here rather than in a cluster. No Kubernetes cluster is involved:
this only renders and lints (helm from dev/install-test-deps).
"""

from __future__ import annotations

import posixpath
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

from harness import env
from harness.certs import Pki
from harness.keyward import binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "keyward"
EXAMPLES = CHART / "examples"
ALERTS = REPO / "deploy" / "prometheus" / "keyward-alerts.yaml"
TABLE = REPO / "config" / "ownership.yaml"
DEPLOY_README = REPO / "deploy" / "README.md"

# Values that move every port away from the defaults, so a port the chart hard-codes shows.
ODD_PORTS = [
    "--set", "listen.bootstrapPort=19092",
    "--set", "listen.brokerPortBase=30000",
    "--set", "listen.portsPerCluster=10",
    "--set", "admin.port=8081",
]
# The eu example with every optional file: a client CA and client certificates for the clusters.
ALL_FILES = [
    "-f", str(EXAMPLES / "values-eu.yaml"),
    "--set", "listen.tls.clientCa=true",
    "--set", "clusters.eu.tls.clientCert=true",
    "--set", "clusters.us.tls.clientCert=true",
]
VARIANTS = {
    "default": [],
    "odd-ports": ODD_PORTS,
    "eu": ["-f", str(EXAMPLES / "values-eu.yaml")],
    "us": ["-f", str(EXAMPLES / "values-us.yaml")],
    "all-files": ALL_FILES,
}


def _yaml():
    import yaml

    return yaml


def helm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(env.helm_bin()), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


class Rendered:
    """The objects of one `helm template`, by kind and name, and the keyward.yaml inside."""

    def __init__(self, text: str, values: dict) -> None:
        self.docs = [d for d in _yaml().safe_load_all(text) if d]
        self.values = values
        self.by_kind: dict[str, list[dict]] = {}
        for d in self.docs:
            self.by_kind.setdefault(d["kind"], []).append(d)
        (self.config_map,) = [c for c in self.by_kind["ConfigMap"] if "keyward.yaml" in c["data"]]
        self.config_text = self.config_map["data"]["keyward.yaml"]
        self.config = _yaml().safe_load(self.config_text)
        (self.deployment,) = self.by_kind["Deployment"]
        self.pod = self.deployment["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]

    def one(self, kind: str, **labels: str) -> dict:
        found = [d for d in self.by_kind.get(kind, []) if labels.items() <= d["metadata"].get("labels", {}).items()]
        assert len(found) == 1, f"{kind} {labels}: {[d['metadata']['name'] for d in found]}"
        return found[0]

    def container_port(self, port) -> int:
        """A port of the container, by name or number."""
        if isinstance(port, int):
            return port
        (p,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == port]
        return p

    def volume(self, name: str) -> dict:
        (v,) = [v for v in self.pod["volumes"] if v["name"] == name]
        return v

    def mounted(self, path: str) -> tuple[dict, dict]:
        """The mount and the volume that put file `path` in the container: the mount of its
        directory, and the volume's item with its name."""
        mounts = [m for m in self.container["volumeMounts"] if m["mountPath"] == posixpath.dirname(path)]
        assert len(mounts) == 1, f"{path}: mounts of its directory: {mounts}"
        volume = self.volume(mounts[0]["name"])
        return mounts[0], volume


def render(*args: str, table: Path | None = TABLE) -> Rendered:
    extra = ["--set-file", f"ownership={table}"] if table else []
    r = helm("template", "keyward-test", str(CHART), "--namespace", "kafka", *extra, *args)
    assert r.returncode == 0, r.stderr
    values = _yaml().safe_load((CHART / "values.yaml").read_text())
    for i, a in enumerate(args):
        if a == "-f":
            _merge(values, _yaml().safe_load(Path(args[i + 1]).read_text()))
        elif a == "--set":
            key, _, value = args[i + 1].partition("=")
            node = values
            *path, last = key.split(".")
            for k in path:
                node = node.setdefault(k, {})
            node[last] = _yaml().safe_load(value)
    return Rendered(r.stdout, values)


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request) -> Rendered:
    return render(*VARIANTS[request.param])


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("values", [None, "values-eu.yaml", "values-us.yaml"])
def test_helm_lint_strict_passes(values):
    args = ["lint", "--strict", str(CHART)]
    if values:
        args += ["-f", str(EXAMPLES / values), "--set-file", f"ownership={TABLE}"]
    r = helm(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in r.stdout, r.stdout
    assert not re.search(r"^\[(WARNING|ERROR)\]", r.stdout, re.M), r.stdout


def test_helm_is_the_pinned_version():
    pinned = re.search(r"^HELM_VERSION=(\S+)$", (REPO / "dev" / "install-test-deps").read_text(), re.M).group(1)
    r = subprocess.run(["go", "version", "-m", str(env.helm_bin())], capture_output=True, text=True, timeout=60)
    assert re.search(rf"^\s+mod\s+helm\.sh/helm/v3\s+{re.escape(pinned)}\s", r.stdout, re.M), r.stdout


# --------------------------------------------------------------------------- against keyward.yaml


def test_service_ports_are_the_bootstrap_and_one_per_broker(rendered):
    """The client Service: the bootstrap port and, for every broker node id the values list, the
    port keyward serves it at: clusters numbered this region's first, then the others by name
    (src/proxy/brokers.rs), node N of cluster c at broker_port_base + c * ports_per_cluster + N."""
    cfg = rendered.config["listen"]
    region = rendered.config["region"]
    order = [region] + sorted(c for c in rendered.config["clusters"] if c != region)
    expected = {_port(cfg["bootstrap"])}
    for c, name in enumerate(order):
        for node in rendered.values["clusters"][name].get("brokers", []):
            expected.add(cfg["broker_port_base"] + c * cfg["ports_per_cluster"] + node)
    assert len(expected) > 1 + len(order), "the values list brokers"

    service = rendered.one("Service", **{"app.kubernetes.io/component": "proxy"})
    ports = service["spec"]["ports"]
    assert {p["port"] for p in ports} == expected
    for p in ports:  # what the Service forwards to is the same port of the container
        assert rendered.container_port(p["targetPort"]) == p["port"], p
    assert service["spec"]["selector"].items() <= rendered.deployment["spec"]["template"]["metadata"]["labels"].items()
    # The admin port is not on the client Service (it may be a LoadBalancer).
    assert _port(rendered.config["admin"]["listen"]) not in {p["port"] for p in ports}


def test_probes_point_at_the_admin_port(rendered):
    admin = _port(rendered.config["admin"]["listen"])
    assert rendered.config["admin"]["listen"].startswith("0.0.0.0:"), "the kubelet probes the pod's address"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = rendered.container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert rendered.container_port(get["port"]) == admin, probe


def test_the_table_is_a_configmap_directory_at_ownership_file(rendered):
    """Mounted as a whole directory (a subPath mount never sees the kubelet's `..data` swap), at
    the directory of `ownership_file`, from a ConfigMap whose key is its file name."""
    table = rendered.config["ownership_file"]
    mount, volume = rendered.mounted(table)
    assert "subPath" not in mount and "subPathExpr" not in mount
    items = {i["key"]: i["path"] for i in volume["configMap"].get("items", [])}
    assert items.get(posixpath.basename(table)) == posixpath.basename(table), volume
    (cm,) = [c for c in rendered.by_kind["ConfigMap"] if c["metadata"]["name"] == volume["configMap"]["name"]]
    assert cm["data"][posixpath.basename(table)] == TABLE.read_text()
    assert not any("subPath" in m for m in rendered.container["volumeMounts"])
    # keyward.yaml itself: where the container's command reads it.
    args = rendered.container["args"]
    config_path = args[args.index("--config") + 1]
    _, volume = rendered.mounted(config_path)
    assert volume["configMap"]["name"] == rendered.config_map["metadata"]["name"]


def _secret_files(config: dict) -> list[str]:
    files = [config["admin"]["reload_token_file"]]
    files += list((config["listen"].get("tls") or {}).get(k) for k in ("cert", "key", "client_ca"))
    for cluster in config["clusters"].values():
        files += list((cluster.get("tls") or {}).get(k) for k in ("ca", "cert", "key"))
        files.append((cluster.get("sasl") or {}).get("password_file"))
    return [f for f in files if f]


def test_secrets_are_mounted_where_keyward_yaml_reads_them(rendered):
    files = _secret_files(rendered.config)
    for path in files:
        mount, volume = rendered.mounted(path)
        assert "secret" in volume, f"{path}: {volume}"
        assert "subPath" not in mount
        assert posixpath.basename(path) in {i["path"] for i in volume["secret"]["items"]}, (path, volume)
    names = {v["secret"]["secretName"] for v in rendered.pod["volumes"] if "secret" in v}
    if rendered.values["listen"]["tls"]["secretName"]:
        assert rendered.values["listen"]["tls"]["secretName"] in names
        assert len(files) >= 1 + 2 + 2 * 2, files  # token, listener cert+key, each cluster's ca+password


def test_replicas_and_disruption_budget(rendered):
    assert rendered.deployment["spec"]["replicas"] >= 2
    (pdb,) = rendered.by_kind["PodDisruptionBudget"]
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["spec"]["maxUnavailable"] < rendered.deployment["spec"]["replicas"]


def test_service_monitor_scrapes_the_admin_metrics(rendered):
    (sm,) = rendered.by_kind["ServiceMonitor"]
    selected = [
        s for s in rendered.by_kind["Service"]
        if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert len(selected) == 1, selected
    (service,) = selected
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert rendered.container_port(port["targetPort"]) == _port(rendered.config["admin"]["listen"])
    # The alert KeywardDown matches up{job="keyward"}: the job comes from the Service's label.
    assert service["metadata"]["labels"][sm["spec"]["jobLabel"]] == "keyward"
    assert {"action": "replace", "targetLabel": "region", "replacement": rendered.config["region"]} in endpoint[
        "relabelings"
    ]


def test_a_changed_table_is_a_reload_and_a_changed_config_a_rollout(tmp_path):
    """Only keyward.yaml's checksum is on the pod template: a new table leaves the Deployment as
    it is (the ConfigMap volume swaps it and keyward reloads), a new keyward.yaml rolls it."""
    other = tmp_path / "ownership.yaml"
    other.write_text(TABLE.read_text().replace('owners: { eu: ["0-7"], us: ["8-15"] }', 'owners: { eu: ["0-3"], us: ["4-15"] }'))
    assert other.read_text() != TABLE.read_text()
    base, new_table = render(), render(table=other)
    assert new_table.deployment == base.deployment
    assert new_table.by_kind["ConfigMap"] != base.by_kind["ConfigMap"]
    new_config = render("--set", "limits.idle_timeout_secs=60")
    assert new_config.config["limits"] == {"idle_timeout_secs": 60}
    key = "checksum/config"
    assert new_config.deployment["spec"]["template"]["metadata"]["annotations"][key] != (
        base.deployment["spec"]["template"]["metadata"]["annotations"][key]
    )


# --------------------------------------------------------------------------- keyward checks it


def _materialise(rendered: Rendered, root: Path, pki: Pki) -> Path:
    """The files the pod would see, under `root`: keyward.yaml (its /etc/keyward paths moved under
    root, nothing else changed), the table, and for every Secret path a file of its kind."""
    leaf = pki.issue("keyward-helm", sans=("localhost",))
    content = {
        "tls.crt": leaf.cert.read_text(),
        "tls.key": leaf.key.read_text(),
        "ca.crt": pki.ca.read_text(),
        "ca.pem": pki.ca.read_text(),
    }
    for path in _secret_files(rendered.config):
        f = root / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(content.get(posixpath.basename(path), "secret\n"))
    table = root / rendered.config["ownership_file"].lstrip("/")
    table.parent.mkdir(parents=True, exist_ok=True)
    (cm,) = [c for c in rendered.by_kind["ConfigMap"] if "ownership.yaml" in c["data"]]
    table.write_text(cm["data"]["ownership.yaml"])
    args = rendered.container["args"]
    config = root / args[args.index("--config") + 1].lstrip("/")
    config.parent.mkdir(parents=True, exist_ok=True)
    assert rendered.config_text.count("/etc/keyward/") >= 2  # the table and the admin token, at least
    config.write_text(rendered.config_text.replace("/etc/keyward/", f"{root}/etc/keyward/"))
    return config


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_keyward_checks_the_rendered_config_and_table(variant, tmp_path):
    rendered = render(*VARIANTS[variant])
    config = _materialise(rendered, tmp_path / "root", Pki(tmp_path / "pki"))
    r = subprocess.run([str(binary()), "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"region {rendered.values['region']}, bootstrap 0.0.0.0:{rendered.values['listen']['bootstrapPort']}" in r.stdout
    assert "ownership table" in r.stdout and "is valid" in r.stdout, r.stdout


# --------------------------------------------------------------------------- the alert rules


def test_the_prometheus_rule_is_the_alert_file():
    """The chart reads deploy/prometheus/keyward-alerts.yaml through a link, not a copy: the
    rendered groups are the file's, and so are the packaged chart's."""
    link = CHART / "alerts" / "keyward-alerts.yaml"
    assert link.is_symlink() and link.resolve() == ALERTS.resolve()
    groups = _yaml().safe_load(ALERTS.read_text())["groups"]
    (rule,) = render().by_kind["PrometheusRule"]
    assert rule["spec"]["groups"] == groups
    assert sum(len(g["rules"]) for g in groups) >= 10


def test_the_packaged_chart_holds_the_alert_file(tmp_path):
    r = helm("package", str(CHART), "--destination", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    (tgz,) = tmp_path.glob("keyward-*.tgz")
    with tarfile.open(tgz) as tar:
        member = tar.getmember("keyward/alerts/keyward-alerts.yaml")
        assert member.isfile(), "packaged as the file, not as a link"
        assert tar.extractfile(member).read() == ALERTS.read_bytes()
    r = helm("template", "kw", str(tgz), "--set-file", f"ownership={TABLE}")
    assert r.returncode == 0, r.stderr
    (rule,) = [d for d in _yaml().safe_load_all(r.stdout) if d and d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == _yaml().safe_load(ALERTS.read_text())["groups"]


# --------------------------------------------------------------------------- the documented install


def test_the_documented_two_region_install_renders():
    """Every `helm install` / `helm upgrade` line of deploy/README.md's Helm section, run as
    `helm template` from the repository root: one release per region, both with the same table."""
    section = DEPLOY_README.read_text().split("## 6. Install keyward with Helm", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line) for line in re.findall(r"^(helm (?:install|upgrade) .+)$", section, re.M)]
    regions = set()
    for cmd in commands:
        args = cmd[2:]
        if cmd[1] == "upgrade":
            args = [a for a in args if a != "--install"]
        r = helm("template", *args)
        assert r.returncode == 0, f"{shlex.join(cmd)}: {r.stderr}"
        docs = [d for d in _yaml().safe_load_all(r.stdout) if d]
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "keyward.yaml" in d["data"]]
        regions.add(_yaml().safe_load(cm["data"]["keyward.yaml"])["region"])
        (table,) = [d for d in docs if d["kind"] == "ConfigMap" and "ownership.yaml" in d["data"]]
        assert table["data"]["ownership.yaml"] == TABLE.read_text(), shlex.join(cmd)
    assert regions == {"eu", "us"}, commands
