"""keyward as the tests run it: the real binary, in front of the harness's real clusters.

`Keyward(workdir, region, clusters, table)` writes a static config and an ownership table,
starts `$KEYWARD_BIN run` on free loopback ports and waits until the bootstrap port and the
admin API answer. `metric(name, **labels)` reads its Prometheus text, so tests assert on what
operators would see. For fault tests: `kill()` (SIGKILL), a second `start()` on the same ports,
and `rss_bytes()` / `open_fds()` read from /proc.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import env
from .kafka import KafkaCluster

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def binary() -> Path:
    path = Path(os.environ.get("KEYWARD_BIN", Path(__file__).resolve().parents[3] / "target/debug/keyward"))
    if not path.exists():
        raise FileNotFoundError(f"keyward binary {path} not found: run `cargo build` or set KEYWARD_BIN")
    return path


def _port_range_free(first: int, count: int) -> bool:
    for port in range(first, first + count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


PORTS_PER_CLUSTER = 100  # keyward's listen.ports_per_cluster default


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_block(clusters: int) -> int:
    """The first of `3 + clusters * 100` consecutive free ports, all below the kernel's
    ephemeral range: bootstrap, admin, then the virtual broker ports (keyward puts node N of the
    c-th cluster at base + c * 100 + N, with base = first + 2). Ports the OS picks for outgoing
    connections (clients, brokers, keyward's own) could otherwise take a virtual broker port
    before keyward binds it, or while it restarts."""
    size = 3 + clusters * PORTS_PER_CLUSTER
    high = _ephemeral_low() - size
    for _ in range(500):
        first = random.randrange(10_000, high)
        if _port_range_free(first, size):
            return first
    raise RuntimeError(f"no {size} free consecutive ports below the ephemeral range")


class Keyward:
    def __init__(
        self,
        workdir: Path,
        region: str,
        clusters: dict[str, KafkaCluster],
        table: str,
        *,
        name: str | None = None,
        extra_config: str = "",
        args: tuple[str, ...] = (),
        listen_extra: str = "",
        admin_extra: str = "",
        cluster_yaml: dict[str, str] | None = None,
        binary_path: Path | None = None,
        command: list[str] | None = None,
        bind_host: str = "127.0.0.1",
        share_ports_of: "Keyward | None" = None,
    ) -> None:
        """`listen_extra` and `admin_extra` are YAML lines added under `listen:` and `admin:`
        (e.g. `tls: {...}`); `cluster_yaml` replaces the flow mapping of the named clusters
        (e.g. to add `tls` and `sasl`, or to point at another listener); `binary_path` runs
        another build than `$KEYWARD_BIN` (dev/bench's baseline); `command` replaces the whole
        command line that starts it (test_image.py: keyward in another root file system, where
        the config is at another path). `bind_host` is the address its client listeners bind
        (the bootstrap and every virtual broker), while it still advertises 127.0.0.1; with
        `share_ports_of`, it listens on that instance's client ports (on its own `bind_host`),
        so both can stand behind one load balancer on 127.0.0.1 (test_faults.py)."""
        self.command = command
        self.args = tuple(args)
        self.binary_path = binary_path
        self.region = region
        self.clusters = clusters
        self.dir = Path(workdir) / (name or f"keyward-{region}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.table_path = self.dir / "ownership.yaml"
        self.config_path = self.dir / "keyward.yaml"
        self.log_path = self.dir / "keyward.log"
        self.table_path.write_text(table)
        first = port_block(len(clusters))
        self.bootstrap_port, self.admin_port, self.port_base = first, first + 1, first + 2
        self.bind_host = bind_host
        if share_ports_of is not None:
            self.bootstrap_port, self.port_base = share_ports_of.bootstrap_port, share_ports_of.port_base
        if bind_host != "127.0.0.1":
            listen_extra = f"broker_bind: {bind_host}\n{listen_extra}"

        overrides = cluster_yaml or {}
        cluster_lines = "\n".join(
            f"  {name}: "
            + overrides.get(name, f'{{ bootstrap: [{", ".join(repr(a) for a in c.addresses)}] }}')
            for name, c in clusters.items()
        )
        indent = lambda text: "".join(f"  {line}\n" for line in text.splitlines())  # noqa: E731
        self.config_path.write_text(
            f"""region: {region}
listen:
  bootstrap: {bind_host}:{self.bootstrap_port}
  advertised_host: 127.0.0.1
  broker_port_base: {self.port_base}
{indent(listen_extra)}admin:
  listen: 127.0.0.1:{self.admin_port}
{indent(admin_extra)}clusters:
{cluster_lines}
ownership_file: ownership.yaml
{extra_config}"""
        )
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.bootstrap_port}"

    def virtual_ports(self) -> set[int]:
        return {self.port_base + n.node_id for c in self.clusters.values() for n in c.nodes}

    def start(self, timeout_s: float = 20) -> "Keyward":
        log = open(self.log_path, "ab")
        command = self.command or [
            str(self.binary_path or binary()), "run", "--config", str(self.config_path), *self.args
        ]
        self.proc = subprocess.Popen(
            [*env.pdeathsig_prefix(), *command],
            stdout=log,
            stderr=log,
            env={**os.environ, "KEYWARD_LOG": os.environ.get("KEYWARD_LOG", "info,keyward=debug")},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keyward exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with socket.create_connection((self.bind_host, self.bootstrap_port), timeout=1):
                    pass
                self.metrics_text()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"keyward did not start within {timeout_s}s:\n{self.logs()}")

    def stop(self) -> None:
        env.terminate(self.proc)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as a crash or an OOM kill. start() brings it back on the
        same ports, appending to the same log."""
        assert self.proc is not None and self.proc.poll() is None, "keyward is not running"
        self.proc.kill()
        self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, "keyward is not running"
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident memory of the running process (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def open_fds(self) -> int:
        """File descriptors the running process holds (sockets, listeners, files, epoll...)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def __enter__(self) -> "Keyward":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, lines: int = 80) -> str:
        return env.tail(self.log_path, lines)

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        """One admin API call: (status, body), error statuses included."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ownership(self) -> dict:
        status, body = self.admin("/ownership")
        assert status == 200, body
        return json.loads(body)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            m = _SAMPLE.match(line)
            if not m or m.group(1) != name:
                continue
            have = dict(_LABEL.findall(m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def owner(self, topic: str, *args: str) -> str:
        """`keyward owner` for this instance's config: the one line it prints."""
        out = subprocess.run(
            [str(self.binary_path or binary()), "owner", "--config", str(self.config_path), "--topic", topic, *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
