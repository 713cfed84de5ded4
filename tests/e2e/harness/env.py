"""Where dev/install-test-deps put things, and small process helpers.

Owns the paths into the cache (${KEYWARD_CACHE:-~/.cache/keyward}); installs
nothing itself: a missing piece raises and names the script to run.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def cache_dir() -> Path:
    return Path(os.environ.get("KEYWARD_CACHE") or Path.home() / ".cache" / "keyward")


def kafka_version() -> str:
    """The one Kafka version of broker and Java client: <kafka.version> in tests/kafka/pom.xml."""
    pom = (REPO / "tests" / "kafka" / "pom.xml").read_text()
    m = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    if not m:
        raise RuntimeError("no <kafka.version> in tests/kafka/pom.xml")
    return m.group(1).strip()


def matrix() -> dict[str, list[str]]:
    """The other Kafka versions of the compatibility matrix (tests/kafka/matrix.properties):
    {"brokers": [...], "clients": [...]}."""
    out: dict[str, list[str]] = {"brokers": [], "clients": []}
    for line in (REPO / "tests" / "kafka" / "matrix.properties").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#") and key.strip() in out:
            out[key.strip()] = value.split()
    return out


def _installed(path: Path) -> Path:
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run dev/install-test-deps")
    return path


def kafka_libs(version: str | None = None) -> Path:
    """The jars of Kafka `version` (default: the full suite's, with MirrorMaker 2)."""
    return _installed(cache_dir() / f"kafka-{version or kafka_version()}" / "libs")


def java_client_libs(kafka_clients: str | None = None) -> Path:
    """The Java client CLI built against kafka-clients `kafka_clients` (default: <kafka.version>)."""
    if kafka_clients is None or kafka_clients == kafka_version():
        return _installed(cache_dir() / "java-client" / "libs")
    return _installed(cache_dir() / f"java-client-{kafka_clients}" / "libs")


def franz_client_bin() -> Path:
    return _installed(cache_dir() / "bin" / "franz-client")


def helm_bin() -> Path:
    """Helm, built by dev/install-test-deps at the version it pins."""
    return _installed(cache_dir() / "bin" / "helm")


def java_bin() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise RuntimeError("no java on PATH and no JAVA_HOME")
    return java


# JVM flags for short-lived tools (formatting storage, the Java client CLI):
# start fast and stay small on a 2-core machine.
TOOL_JVM_OPTS = [
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Xshare:auto",
    "-Djava.awt.headless=true",
]


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pdeathsig_prefix() -> list[str]:
    """Prefix that makes a child die with this process (no orphaned JVMs after a crash).

    The kernel sends the signal when the THREAD that forked exits, so this is
    only used from the main thread; elsewhere the child is on its own.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv and _setpriv_has_pdeathsig(setpriv):
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return []


_pdeathsig_ok: dict[str, bool] = {}


def _setpriv_has_pdeathsig(setpriv: str) -> bool:
    if setpriv not in _pdeathsig_ok:
        r = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", "true"], capture_output=True)
        _pdeathsig_ok[setpriv] = r.returncode == 0
    return _pdeathsig_ok[setpriv]


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text[-lines:])


def terminate(proc: "subprocess.Popen | None", timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; nothing if not running."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
