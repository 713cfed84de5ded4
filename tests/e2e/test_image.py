"""deploy/container/: keyward's container image, one static binary FROM scratch, run as uid 65532.

`deploy/container/build --context DIR --no-image` builds the static binary and assembles the
image's file system in DIR/rootfs, the directory the Containerfile copies whole into an empty
image. The tests run that file system:

* empty root file system (always): DIR/rootfs plus what a container runtime adds (/etc/hosts,
  /etc/resolv.conf) and the mounted config and table, nothing else, as root directory of a
  keyward that runs as uid/gid 65532 (`chroot --userspec`, as root or through `sudo -n`), in
  front of the session's real clusters. The eu cluster is named in the config by a host name from
  /etc/hosts, the us cluster (as root) by a host name only a DNS server knows (a small one in this
  process on 127.0.0.153:53, named in /etc/resolv.conf): broker host names resolve with glibc's
  resolver built into the static binary. /readyz answers 200, and records produced through it
  are consumed back through it with librdkafka. A dynamically linked binary would fail here: no
  loader, no libraries.
* the image's CA bundle: in the same file system, a SASL_SSL cluster whose `tls` names no `ca`
  is verified against /etc/ssl/certs/ca-certificates.crt (the test CA appended to it).
* the image (podman, as this user; dev/install-test-deps installs it): the documented command
  builds it, its config says uid 65532, entrypoint and ports, and its layers hold exactly the
  files of that rootfs, byte for byte. Running the image needs a machine where podman can start
  containers; the test tries and skips with podman's error where it cannot (the development
  machine is a gVisor sandbox where crun cannot set the container's rlimits).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import socketserver
import stat
import struct
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from harness import LibrdkafkaClient, record, unique
from harness.keyward import Keyward

from test_deploy import _key_owned_by
from test_keyward import INVALID_RECORD, TABLE

REPO = Path(__file__).resolve().parents[2]
CONTAINER = REPO / "deploy" / "container"
BUILD = CONTAINER / "build"
# The tests build the image's binary from cargo's dev profile: the same script, flags and static
# link as the release image, minutes less of compiling on a fresh machine. The release build
# itself is the documented command's default, run by hand (deploy/README.md).
PROFILE = "dev"
UID = GID = 65532
KEYWARD_IN_IMAGE = "/usr/local/bin/keyward"
CONFIG_IN_IMAGE = "/etc/keyward/keyward.yaml"

# Every file of the image, and every directory that holds one: the test fails on one more or less.
IMAGE_FILES = {
    "usr/local/bin/keyward",
    "etc/passwd",
    "etc/group",
    "etc/nsswitch.conf",
    "etc/ssl/certs/ca-certificates.crt",
}
IMAGE_DIRS = {"usr", "usr/local", "usr/local/bin", "etc", "etc/ssl", "etc/ssl/certs", "etc/keyward"}

DNS_ADDRESS = "127.0.0.153"  # any loopback address but 127.0.0.53 (systemd-resolved's)
HOSTS_NAME = "kafka-eu.keyward.test"  # known to /etc/hosts only
DNS_NAME = "kafka-us.keyward.test"  # known to the DNS server only (as root)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image_context(tmp_path_factory, summary) -> Path:
    """The build context of the documented command, without the image: DIR/Containerfile and
    DIR/rootfs. The first run on a machine builds the static binary (dev profile; minutes)."""
    context = tmp_path_factory.mktemp("image-context")
    started = time.monotonic()
    r = subprocess.run([str(BUILD), "--profile", PROFILE, "--context", str(context), "--no-image"], capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, f"deploy/container/build failed:\n{r.stdout}{r.stderr[-4000:]}"
    assert (context / "rootfs" / KEYWARD_IN_IMAGE.lstrip("/")).is_file(), r.stderr
    summary("container image", f"static binary and image file system built in {time.monotonic() - started:.0f}s")
    return context


def _tree(root: Path) -> tuple[set[str], set[str]]:
    """(files, directories) under root, as paths relative to it; anything else fails."""
    files, dirs = set(), set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            dirs.add(rel)
        elif stat.S_ISREG(mode):
            files.add(rel)
        else:
            raise AssertionError(f"{rel}: neither a file nor a directory ({stat.filemode(mode)})")
    return files, dirs


def _elf_interpreter(path: Path) -> str | None:
    """The PT_INTERP of an x86_64 ELF executable: the dynamic loader it needs, None when static."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path} is not a 64-bit ELF file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    return None


def test_the_image_is_its_rootfs_on_scratch_as_uid_65532(image_context):
    """The Containerfile starts from nothing, copies rootfs/ and nothing else, and runs keyward as
    65532:65532; rootfs/ holds the static binary and four small files."""
    lines = [
        line.split(None, 1)
        for line in (CONTAINER / "Containerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instructions = [(k.upper(), v.strip()) for k, v in lines]
    assert [v for k, v in instructions if k == "FROM"] == ["scratch"], "FROM scratch, one stage: no registry"
    assert [v for k, v in instructions if k in ("COPY", "ADD", "RUN")] == ["rootfs/ /"], instructions
    assert ("USER", f"{UID}:{GID}") in instructions, instructions
    assert ("ENTRYPOINT", json.dumps([KEYWARD_IN_IMAGE])) in instructions, instructions
    assert ("CMD", json.dumps(["run", "--config", CONFIG_IN_IMAGE])) in instructions, instructions

    rootfs = image_context / "rootfs"
    assert _tree(rootfs) == (IMAGE_FILES, IMAGE_DIRS)
    binary = rootfs / KEYWARD_IN_IMAGE.lstrip("/")
    assert _elf_interpreter(binary) is None, f"the image's keyward is dynamically linked ({_elf_interpreter(binary)})"
    passwd = (rootfs / "etc/passwd").read_text().splitlines()
    assert f"keyward:x:{UID}:{GID}:keyward:/nonexistent:/sbin/nologin" in passwd, passwd
    assert "hosts: files dns" in (rootfs / "etc/nsswitch.conf").read_text().splitlines()


# --------------------------------------------------------------------------- a DNS server


class _Dns(socketserver.ThreadingUDPServer):
    """Answers A queries for the names it knows (NXDOMAIN for the others, no AAAA records), and
    counts the queries per name."""

    daemon_threads = True

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.queries: dict[str, int] = {}
        super().__init__((DNS_ADDRESS, 53), _DnsHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _DnsHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        labels, at = [], 12
        while data[at]:
            labels.append(data[at + 1:at + 1 + data[at]].decode("ascii", "replace"))
            at += 1 + data[at]
        qtype, = struct.unpack_from(">H", data, at + 1)
        question = data[12:at + 5]
        name = ".".join(labels).lower()
        self.server.queries[name] = self.server.queries.get(name, 0) + 1
        address = self.server.names.get(name)
        answers = b""
        if address and qtype == 1:  # A
            answers = struct.pack(">HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(address)
        rcode = 0 if address else 3  # NOERROR (no AAAA is no answer) or NXDOMAIN
        header = struct.pack(">HHHHHH", struct.unpack_from(">H", data)[0], 0x8180 | rcode, 1, 1 if answers else 0, 0, 0)
        sock.sendto(header + question + answers, self.client_address)


# --------------------------------------------------------------------------- the empty root file system


def _as_root() -> list[str]:
    """How this test becomes root for chroot: it is root, or `sudo -n` works."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    pytest.fail("running keyward in an empty root file system needs chroot: run the tests as root or with "
                "passwordless sudo")


def _keyward_under(pid: int) -> int:
    """keyward's pid when `sudo` started it: a child of sudo, or of sudo's monitor process."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        parents, seen = {pid}, True
        while seen:
            seen = False
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) in parents:
                    continue
                try:
                    status = _status(int(entry.name))
                except OSError:
                    continue
                if int(status.get("PPid", "0")) in parents:
                    if status.get("Name") == "keyward":
                        return int(entry.name)
                    parents.add(int(entry.name))
                    seen = True
        time.sleep(0.1)
    raise AssertionError(f"no keyward process under {pid}")


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def _wait_for(what: str, check, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _named(cluster, host: str) -> str:
    """The cluster's bootstrap list with its host replaced by a name."""
    return "{ bootstrap: [%s] }" % ", ".join(repr(f"{host}:{a.rsplit(':', 1)[1]}") for a in cluster.addresses)


def _serves(kw: Keyward, eu) -> None:
    """keyward is ready, reaches both clusters, forwards an owned record, refuses a foreign one
    and serves a consumer."""
    _wait_for("/readyz 200", lambda: kw.admin("/readyz")[0] == 200)
    _wait_for("the us cluster's first answer", lambda: kw.metric("keyward_cluster_up", cluster="us") == 1)
    assert kw.metric("keyward_cluster_up", cluster="eu") == 1
    client = LibrdkafkaClient()
    topic = unique("orders.image")
    eu.create_topic(topic, partitions=16)
    owned, foreign = _key_owned_by(kw, topic, "eu"), _key_owned_by(kw, topic, "us")
    r = client.produce(kw.bootstrap, topic, [record(owned.encode(), b"mine"), record(foreign.encode(), b"theirs")])
    assert r[0]["ok"] and r[1]["error_code"] == INVALID_RECORD, r
    got = client.consume(kw.bootstrap, [topic], unique("image"), expected_count=1)
    assert [(m["key"], m["value"]) for m in got] == [(owned.encode(), b"mine")], got


def _image_root(tmp_path: Path, image_context: Path, hosts: str) -> Path:
    """A copy of the image's file system plus what a container runtime adds to every container:
    /etc/hosts and /etc/resolv.conf (naming the test's DNS server)."""
    root = tmp_path / "root"
    shutil.copytree(image_context / "rootfs", root, symlinks=True)
    (root / "etc/hosts").write_text(hosts)
    (root / "etc/resolv.conf").write_text(f"nameserver {DNS_ADDRESS}\noptions timeout:1 attempts:1\n")
    return root


def _in_root(sudo: list[str], root: Path) -> list[str]:
    """The image's ENTRYPOINT and CMD, run in root as the image's USER."""
    return [*sudo, "chroot", f"--userspec={UID}:{GID}", f"--groups={GID}", str(root),
            KEYWARD_IN_IMAGE, "run", "--config", CONFIG_IN_IMAGE]


def test_the_image_file_system_serves_as_uid_65532_with_nothing_else(tmp_path, image_context, eu, us, summary):
    sudo = _as_root()
    root = _image_root(tmp_path, image_context, f"127.0.0.1 localhost\n127.0.0.1 {HOSTS_NAME}\n")
    dns = None
    if not sudo:
        # As root: the us cluster's name is known to this DNS server only.
        dns = _Dns({DNS_NAME: "127.0.0.1"})
        us_host = DNS_NAME
    else:
        # Binding port 53 needs root: through sudo, the us cluster is reached by an /etc/hosts name too.
        us_host = HOSTS_NAME
    # The mount: Keyward writes the config and the table into /etc/keyward, mode 0644, owned by
    # this user, not by keyward's uid.
    kw = Keyward(root / "etc", "eu", {"eu": eu, "us": us}, TABLE, name="keyward",
                 cluster_yaml={"eu": _named(eu, HOSTS_NAME), "us": _named(us, us_host)}, command=_in_root(sudo, root))
    assert kw.config_path == root / CONFIG_IN_IMAGE.lstrip("/")
    # keyward's own log goes to the test's directory, not into the root file system.
    kw.log_path = tmp_path / "keyward.log"
    assert _tree(root) == (IMAGE_FILES | {"etc/hosts", "etc/resolv.conf", "etc/keyward/keyward.yaml",
                                          "etc/keyward/ownership.yaml"}, IMAGE_DIRS)
    try:
        kw.start()
        pid = _keyward_under(kw.pid) if sudo else kw.pid
        status = _status(pid)
        assert status["Uid"].split() == [str(UID)] * 4 and status["Gid"].split() == [str(GID)] * 4, status
        assert status["Groups"].split() == [str(GID)], status
        assert int(status["CapEff"], 16) == 0, status
        # Another uid's root directory is readable by root only.
        r = subprocess.run([*sudo, "readlink", f"/proc/{pid}/root"], capture_output=True, text=True)
        assert r.stdout.strip() == str(root), r.stdout + r.stderr
        _serves(kw, eu)
        if dns:
            assert dns.queries.get(DNS_NAME, 0) > 0, dns.queries
        summary("container image", f"empty root file system: keyward served as uid {UID}; "
                + ("us reached by a DNS name" if dns else "DNS untested (sudo cannot bind port 53 for this test)"))
    finally:
        kw.stop()
        if dns:
            dns.close()


def test_the_image_ca_bundle_is_the_system_roots_for_cluster_tls(tmp_path, image_context, eu, secure):
    """A cluster whose `tls` names no `ca` is verified against the image's
    /etc/ssl/certs/ca-certificates.crt: with the test CA appended there, keyward, in the image's
    file system, logs in over SASL_SSL to the secure cluster, named `localhost` as its certificate
    says, and its probes succeed."""
    sudo = _as_root()
    root = _image_root(tmp_path, image_context, "127.0.0.1 localhost\n")
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    bundle.write_text(bundle.read_text() + secure.security.pki.ca.read_text())
    (root / "etc/keyward/us-password").write_text("keyward-secret\n")
    sasl = "sasl: { mechanism: SCRAM-SHA-512, username: keyward, password_file: us-password }"
    us_yaml = _named(secure, "localhost").replace(" }", f", tls: {{}}, {sasl} }}")
    kw = Keyward(root / "etc", "eu", {"eu": eu, "us": secure}, TABLE, name="keyward",
                 cluster_yaml={"us": us_yaml}, command=_in_root(sudo, root))
    kw.log_path = tmp_path / "keyward.log"
    try:
        kw.start()
        _wait_for("the TLS cluster's first answer", lambda: kw.metric("keyward_cluster_up", cluster="us") == 1)
    finally:
        kw.stop()


# --------------------------------------------------------------------------- the image itself


def _podman() -> str:
    path = shutil.which("podman")
    if not path:
        pytest.fail("podman is not installed: dev/install-test-deps installs it (Debian package podman)")
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory, image_context, summary):
    """The image, built by the documented command as this user (the static binary is already
    built, so only podman's part takes time). Skips only when podman does not work at all for
    this user (`podman info` fails, e.g. rootless without subordinate uids); a failing build fails."""
    podman = _podman()
    info = subprocess.run([podman, "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"podman does not work for this user, the image is not built: {info.stderr.strip()[-300:]}")
    name = f"localhost/keyward-test-{os.getpid()}"
    context = tmp_path_factory.mktemp("image-build")
    started = time.monotonic()
    r = subprocess.run([str(BUILD), "--profile", PROFILE, "--tag", name, "--context", str(context)], capture_output=True, text=True,
                       timeout=3600, env={**os.environ, "KEYWARD_CONTAINER_TOOL": "podman"})
    assert r.returncode == 0, f"deploy/container/build failed:\n{r.stdout}{r.stderr[-4000:]}"
    summary("container image", f"image built with podman in {time.monotonic() - started:.0f}s")
    yield f"{name}:latest"
    # By tag, not by id: the same files make the same image as the user's own keyward:latest,
    # which must stay.
    version = subprocess.run([str(image_context / "rootfs" / KEYWARD_IN_IMAGE.lstrip("/")), "--version"],
                             capture_output=True, text=True).stdout.split()[1]
    subprocess.run([podman, "rmi", f"{name}:latest", f"{name}:{version}"], capture_output=True)


def _layer_files(archive: Path) -> dict[str, tuple[int, str]]:
    """path -> (mode, sha256) of every file of a docker-archive's layers, directories left out."""
    out: dict[str, tuple[int, str]] = {}
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))
        assert len(manifest) == 1, manifest
        for layer in manifest[0]["Layers"]:
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(layer).read())) as inner:
                for m in inner.getmembers():
                    if m.isfile():
                        out[m.name.lstrip("./")] = (m.mode & 0o7777, hashlib.sha256(inner.extractfile(m).read()).hexdigest())
                    elif not m.isdir():
                        raise AssertionError(f"{m.name}: neither a file nor a directory")
    return out


def test_the_documented_command_builds_the_image(tmp_path, image, image_context):
    podman = _podman()
    r = subprocess.run([podman, "image", "inspect", image], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{GID}", config
    assert config["Entrypoint"] == [KEYWARD_IN_IMAGE] and config["Cmd"] == ["run", "--config", CONFIG_IN_IMAGE], config
    assert set(config["ExposedPorts"]) == {"9092/tcp", "9190/tcp"}, config
    binary = image_context / "rootfs" / KEYWARD_IN_IMAGE.lstrip("/")
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    assert config["Labels"]["org.opencontainers.image.version"] == version, config["Labels"]

    archive = tmp_path / "image.tar"
    r = subprocess.run([podman, "save", "--format", "docker-archive", "-o", str(archive), image],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rootfs = image_context / "rootfs"
    expected = {
        f: (rootfs.joinpath(f).stat().st_mode & 0o7777, hashlib.sha256(rootfs.joinpath(f).read_bytes()).hexdigest())
        for f in IMAGE_FILES
    }
    assert _layer_files(archive) == expected, "the image holds other files than the rootfs the other test runs"


def test_the_image_runs_against_the_clusters(tmp_path, image, eu, us):
    """Where podman can start containers: the image itself, host network, config and table mounted
    read-only at /etc/keyward, the clusters named by host names podman writes into /etc/hosts."""
    podman = [_podman()]
    probe = subprocess.run([*podman, "run", "--rm", "--network", "host", image, "--version"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers on this machine: {probe.stderr.strip()[-300:]}")
    assert probe.stdout.startswith("keyward "), probe.stdout

    mount = tmp_path / "etc-keyward"
    name = f"keyward-test-{os.getpid()}"
    command = [*podman, "run", "--rm", "--name", name, "--network", "host", "--add-host", f"{HOSTS_NAME}:127.0.0.1",
               "--add-host", f"{DNS_NAME}:127.0.0.1", "-v", f"{mount}:/etc/keyward:ro", image]
    kw = Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE, name="etc-keyward",
                 cluster_yaml={"eu": _named(eu, HOSTS_NAME), "us": _named(us, DNS_NAME)}, command=command)
    assert kw.dir == mount
    kw.log_path = tmp_path / "keyward.log"
    try:
        kw.start(timeout_s=60)
        r = subprocess.run([*podman, "inspect", "--format", "{{.Config.User}}", name], capture_output=True, text=True)
        assert r.stdout.strip() == f"{UID}:{GID}", r.stdout + r.stderr
        _serves(kw, eu)
    finally:
        kw.stop()
        subprocess.run([*podman, "rm", "--force", name], capture_output=True)
