"""Real Apache Kafka clusters (KRaft) for the end-to-end tests.

Owns the broker processes: config, storage format, start, readiness, stop,
plus admin helpers (create topics) and a verification reader that talks to the
cluster DIRECTLY, never through keyward. It knows nothing about keyward.

Layout: every node is a combined broker+controller (`process.roles=broker,controller`)
with a static voter set, so a 3-node cluster is 3 JVMs, a 1-node cluster is 1.
Node ids are 1..N. All ports are picked free on 127.0.0.1 when the cluster is
created and kept across node restarts.

Security (optional, `security=KafkaSecurity(...)`): the client listener (CLIENT) on
`node.port` then speaks SASL_SSL, where every user can log in with PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512; with `mtls=True` a second client listener (MTLS) on `node.mtls_port` speaks SSL
and requires a client certificate from the same CA. Inter-broker traffic (INTERNAL) and the
controller stay PLAINTEXT on loopback ports of their own, so only the client-facing listeners
are secure. With `acls=True` the brokers run KRaft's StandardAuthorizer: HARNESS_USER, the
users named in `super_users`, and ANONYMOUS (the PLAINTEXT inter-broker and controller
listeners) are super users, and everyone else may do only what `KafkaCluster.allow` grants;
without it there are no ACLs and any authenticated user may do anything. The harness's own
clients (readiness, admin, read_all) log in as HARNESS_USER with SCRAM-SHA-512.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from . import env
from .certs import Leaf, Pki
from .clients import SASL_MECHANISMS, librdkafka_security

log = logging.getLogger("harness.kafka")
_rdkafka_log = logging.getLogger("harness.librdkafka")


class KafkaStartError(RuntimeError):
    pass


# The user the harness's own clients authenticate as on a secure cluster.
HARNESS_USER = ("harness", "harness-secret")


@dataclass
class KafkaSecurity:
    """How a cluster secures its client listeners (see the module docstring).

    `users` maps user name to password; the broker certificate is issued by `pki`, which is
    also the CA clients must trust and the CA client certificates must come from. Names and
    passwords are plain tokens (letters, digits, '.', '_', '-'): they go unquoted into JAAS
    and into the storage tool's SCRAM syntax.
    """

    pki: Pki
    users: dict[str, str]
    mtls: bool = False
    acls: bool = False
    # Principals beyond HARNESS_USER and ANONYMOUS that may do anything, e.g. "User:keyward".
    super_users: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if HARNESS_USER[0] in self.users:
            raise ValueError(f"user name {HARNESS_USER[0]!r} is the harness's own")
        for name, password in self.users.items():
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or not re.fullmatch(r"[A-Za-z0-9._-]+", password):
                raise ValueError(f"user {name!r}: use letters, digits, '.', '_', '-' in names and passwords")

    @property
    def all_users(self) -> dict[str, str]:
        """`users` plus the harness's own user."""
        return {**self.users, HARNESS_USER[0]: HARNESS_USER[1]}


@dataclass
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    dir: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)
    # Secure clusters only: the PLAINTEXT inter-broker listener, and the mTLS client listener.
    internal_port: int | None = None
    mtls_port: int | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mtls_address(self) -> str:
        if self.mtls_port is None:
            raise ValueError(f"node {self.node_id} has no mTLS listener")
        return f"127.0.0.1:{self.mtls_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self, lines: int = 40) -> str:
        """What to show when this node failed: its last ERROR lines, then the tails of its logs."""
        try:
            text = (self.dir / "server.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            text = []
        errors = [l for l in text if " ERROR " in l or " FATAL " in l][-10:]
        return (
            f"--- node {self.node_id} server.log ERROR lines ---\n" + "\n".join(errors) + "\n"
            f"--- node {self.node_id} server.log (tail) ---\n{env.tail(self.dir / 'server.log', lines)}\n"
            f"--- node {self.node_id} stdout.log (tail) ---\n{env.tail(self.dir / 'stdout.log', lines)}"
        )


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all sockets stay open until every port is known."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_id() -> str:
    """A Kafka Uuid in its base64 form. Like Kafka's own Uuid.randomUuid, never one that
    starts with '-': the storage tool would take it for an option."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class KafkaCluster:
    """A KRaft cluster of `brokers` combined broker+controller nodes.

    `properties` are extra/overriding server properties for every node; `security` makes
    the client listeners SASL_SSL (and mTLS): see KafkaSecurity.
    """

    def __init__(
        self,
        name: str,
        brokers: int,
        workdir: os.PathLike | str,
        *,
        heap: str = "448m",
        properties: dict[str, str | int | bool] | None = None,
        security: KafkaSecurity | None = None,
        version: str | None = None,
    ) -> None:
        if brokers < 1:
            raise ValueError("a cluster needs at least one broker")
        self.name = name
        # Kafka version of the brokers: the full suite's by default, or one of the matrix's
        # (tests/kafka/matrix.properties), from the jars dev/install-test-deps put in the cache.
        self.version = version or env.kafka_version()
        self.size = brokers
        self.dir = Path(workdir) / name
        self.heap = heap
        self.extra_properties = dict(properties or {})
        self.security = security
        # One certificate (SANs localhost, 127.0.0.1) for every node's secure listeners.
        self.broker_cert: Leaf | None = security.pki.issue(f"{name}-broker") if security else None
        self.cluster_id = _cluster_id()
        self.nodes = [KafkaNode(i + 1, 0, 0, self.dir / f"node-{i + 1}") for i in range(brokers)]
        self._assign_ports()
        self._formatted = False
        self.boot_seconds: float | None = None

    # ------------------------------------------------------------ addresses

    @property
    def bootstrap(self) -> str:
        """'127.0.0.1:p1,127.0.0.1:p2,...' for clients that talk to the cluster directly."""
        return ",".join(n.address for n in self.nodes)

    @property
    def addresses(self) -> list[str]:
        """Per-node 'host:port', in node-id order."""
        return [n.address for n in self.nodes]

    @property
    def mtls_bootstrap(self) -> str:
        """Like bootstrap, for the mTLS listener (security with mtls=True only)."""
        return ",".join(self.mtls_addresses)

    @property
    def mtls_addresses(self) -> list[str]:
        """Per-node 'host:port' of the mTLS listener, in node-id order."""
        return [n.mtls_address for n in self.nodes]

    def client_security(self, mechanism: str = "SCRAM-SHA-512", user: str | None = None) -> dict:
        """The clients' `security` dict for the SASL_SSL listener (see clients.py): trust
        the cluster's CA, log in as `user` (default: the first of security.users) with
        `mechanism`."""
        if self.security is None:
            raise ValueError(f"{self.name} is a plaintext cluster")
        if mechanism not in SASL_MECHANISMS:
            raise ValueError(f"mechanism must be one of {SASL_MECHANISMS}")
        users = self.security.all_users
        user = user if user is not None else next(iter(users))
        return {
            "protocol": "SASL_SSL",
            "ca": str(self.security.pki.ca),
            "mechanism": mechanism,
            "username": user,
            "password": users[user],
        }

    def client_conf(self) -> dict[str, str]:
        """librdkafka properties (beyond bootstrap.servers) of the harness's own clients:
        none for a plaintext cluster, SASL_SSL with SCRAM-SHA-512 as HARNESS_USER otherwise."""
        if self.security is None:
            return {}
        return librdkafka_security(self.client_security("SCRAM-SHA-512", HARNESS_USER[0]))

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def __repr__(self) -> str:
        return f"KafkaCluster({self.name!r}, brokers={self.size}, bootstrap={self.bootstrap!r})"

    # ------------------------------------------------------------ lifecycle

    def server_properties(self, node: KafkaNode) -> dict[str, str]:
        rf = min(3, self.size)
        min_isr = min(2, self.size)
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        props: dict[str, str | int | bool] = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            **self._listener_properties(node),
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(node.dir / "data"),
            # Tests create their topics explicitly.
            "auto.create.topics.enable": False,
            "num.partitions": 1,
            "default.replication.factor": rf,
            "offsets.topic.replication.factor": rf,
            # 50 partitions (the default) cost seconds on the first group; 5 are plenty here.
            "offsets.topic.num.partitions": 5,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": 5,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": 0,
            # A restarted node cannot register until the controller drops its old session
            # (DUPLICATE_BROKER_REGISTRATION): 4 s instead of 9 s, with frequent heartbeats.
            "broker.heartbeat.interval.ms": 500,
            "broker.session.timeout.ms": 4000,
            # Few threads: several JVMs share 2 cores.
            "num.network.threads": 2,
            "num.io.threads": 2,
            "num.replica.fetchers": 1,
            "background.threads": 2,
            "num.recovery.threads.per.data.dir": 1,
            "log.cleaner.threads": 1,
            "log.cleaner.dedupe.buffer.size": 8 * 1024 * 1024,
        }
        props.update(self.extra_properties)
        return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in props.items()}

    def _listener_properties(self, node: KafkaNode) -> dict[str, str]:
        controller = f"CONTROLLER://127.0.0.1:{node.controller_port}"
        if self.security is None:
            return {
                "listeners": f"PLAINTEXT://127.0.0.1:{node.port},{controller}",
                "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
                "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name": "PLAINTEXT",
            }
        # name -> (security protocol, port)
        listeners = {"CLIENT": ("SASL_SSL", node.port), "INTERNAL": ("PLAINTEXT", node.internal_port)}
        if self.security.mtls:
            listeners["MTLS"] = ("SSL", node.mtls_port)
        advertised = ",".join(f"{name}://127.0.0.1:{port}" for name, (_, port) in listeners.items())
        users = " ".join(f'user_{u}="{p}"' for u, p in self.security.all_users.items())
        plain = f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        props = {
            "listeners": f"{advertised},{controller}",
            "advertised.listeners": advertised,
            "listener.security.protocol.map": ",".join(
                [f"{name}:{protocol}" for name, (protocol, _) in listeners.items()] + ["CONTROLLER:PLAINTEXT"]
            ),
            "inter.broker.listener.name": "INTERNAL",
            "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            "listener.name.client.plain.sasl.jaas.config": plain,
            "listener.name.client.scram-sha-256.sasl.jaas.config": scram,
            "listener.name.client.scram-sha-512.sasl.jaas.config": scram,
            # PEM inline: Kafka reads an unencrypted key only this way, not from a file.
            "ssl.keystore.type": "PEM",
            "ssl.keystore.certificate.chain": self.broker_cert.chain.read_text(),
            "ssl.keystore.key": self.broker_cert.key.read_text(),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.security.pki.ca),
        }
        if self.security.mtls:
            props["listener.name.mtls.ssl.client.auth"] = "required"
        if self.security.acls:
            props["authorizer.class.name"] = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
            supers = (f"User:{HARNESS_USER[0]}", "User:ANONYMOUS", *self.security.super_users)
            props["super.users"] = ";".join(supers)
        return props

    def _jvm(self, node: KafkaNode, heap: str) -> list[str]:
        return [
            env.java_bin(),
            f"-Xmx{heap}",
            "-Xms64m",
            "-XX:+UseSerialGC",
            # C1 only: far less JIT work at start, plenty fast for test traffic.
            "-XX:TieredStopAtLevel=1",
            "-XX:-UsePerfData",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={node.dir}",
            "-cp",
            str(env.kafka_libs(self.version) / "*"),
        ]

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "log4j2.properties").write_text(LOG4J2)
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            text = "".join(f"{k}={_escape(v)}\n" for k, v in self.server_properties(node).items())
            (node.dir / "server.properties").write_text(text)

    def format(self) -> None:
        """Write configs and format every node's storage (all nodes at once)."""
        if self._formatted:
            return
        self._write_config()
        procs = []
        for node in self.nodes:
            cmd = self._jvm(node, "256m") + [
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                self.cluster_id,
                "--config",
                str(node.dir / "server.properties"),
                "--ignore-formatted",
            ]
            for user, password in (self.security.all_users if self.security else {}).items():
                for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                    cmd += ["--add-scram", f"{mechanism}=[name={user},password={password}]"]
            out = open(node.dir / "format.log", "wb")
            procs.append((node, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), out))
        failed = []
        for node, p, out in procs:
            rc = p.wait(timeout=120)
            out.close()
            if rc != 0:
                failed.append(f"node {node.node_id} (exit {rc}):\n{env.tail(node.dir / 'format.log')}")
        if failed:
            raise KafkaStartError(f"{self.name}: storage format failed\n" + "\n".join(failed))
        self._formatted = True

    def launch(self) -> None:
        """Format if needed and spawn every node that is not running; does not wait."""
        self.format()
        for node in self.nodes:
            if not node.running:
                self._spawn(node)

    def _spawn(self, node: KafkaNode) -> None:
        cmd = env.pdeathsig_prefix() + self._jvm(node, self.heap) + [
            "kafka.Kafka",
            str(node.dir / "server.properties"),
        ]
        out = open(node.dir / "stdout.log", "ab")
        node.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        log.info("%s: node %d pid %d on %s", self.name, node.node_id, node.proc.pid, node.address)

    def start(self, timeout_s: float = 120) -> "KafkaCluster":
        """Start every node and wait until the cluster serves: see wait_ready.

        Ports are picked when the cluster is made and bound only seconds later; if another
        process took one meanwhile, the cluster is rebuilt once on fresh ports.
        """
        t0 = time.monotonic()
        for attempt in (1, 2):
            try:
                self.launch()
                self.wait_ready(timeout_s)
                break
            except BaseException as e:
                self.stop(grace_s=2)
                if attempt == 2 or not isinstance(e, KafkaStartError) or not self._port_was_taken():
                    raise
                log.warning("%s: a port was taken before the brokers bound it; retrying on fresh ports", self.name)
                self._reset()
        self.boot_seconds = time.monotonic() - t0
        log.info("%s: %d broker(s) ready in %.1fs", self.name, self.size, self.boot_seconds)
        return self

    def _port_was_taken(self) -> bool:
        for node in self.nodes:
            for name in ("server.log", "stdout.log"):
                try:
                    if "Address already in use" in (node.dir / name).read_text(errors="replace"):
                        return True
                except FileNotFoundError:
                    pass
        return False

    def _reset(self) -> None:
        """Forget storage and ports: the next launch formats a new cluster on new ports."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.cluster_id = _cluster_id()
        self._assign_ports()
        for node in self.nodes:
            node.proc = None
        self._formatted = False

    def _assign_ports(self) -> None:
        """Fresh free ports for every listener of every node."""
        secure = self.security is not None
        mtls = secure and self.security.mtls
        ports = iter(_free_ports(self.size * (2 + secure + mtls)))
        for node in self.nodes:
            node.port, node.controller_port = next(ports), next(ports)
            node.internal_port = next(ports) if secure else None
            node.mtls_port = next(ports) if mtls else None

    def wait_ready(self, timeout_s: float = 120, nodes: Iterable[KafkaNode] | None = None) -> None:
        """Wait until each given node (default: all) answers metadata that lists every
        running node as a registered, unfenced broker."""
        deadline = time.monotonic() + timeout_s
        waiting = list(nodes if nodes is not None else self.nodes)
        expected = {n.node_id for n in self.nodes if n.running}
        last_error = "no attempt yet"
        while waiting:
            for node in list(waiting):
                if not node.running:
                    code = node.proc.returncode if node.proc else None
                    raise KafkaStartError(f"{self.name}: node {node.node_id} exited with {code}\n{node.logs()}")
                if not _port_open(node.port):
                    last_error = f"node {node.node_id}: port {node.port} not open"
                    continue
                try:
                    seen = {b for b in self._metadata(node.address, timeout_s=3).brokers}
                except KafkaException as e:
                    last_error = f"node {node.node_id}: {e}"
                    continue
                if seen >= expected:
                    waiting.remove(node)
                else:
                    last_error = f"node {node.node_id} sees brokers {sorted(seen)}, want {sorted(expected)}"
            if not waiting:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(n.logs() for n in self.nodes)
                raise KafkaStartError(f"{self.name}: not ready after {timeout_s}s ({last_error})\n{logs}")
            time.sleep(0.25)

    def stop(self, grace_s: float = 15) -> None:
        """SIGTERM every node, then SIGKILL whatever is still up after grace_s."""
        self._stop_nodes(self.nodes, grace_s)

    def stop_node(self, node_id: int, grace_s: float = 15, kill: bool = False) -> None:
        """Stop one node (SIGKILL at once when kill=True); the others keep running."""
        self._stop_nodes([self.node(node_id)], 0 if kill else grace_s)

    def start_node(self, node_id: int, timeout_s: float = 60) -> None:
        """Restart a stopped node on its old ports and data; wait until it serves and every
        partition has its full ISR again."""
        node = self.node(node_id)
        if not node.running:
            self._spawn(node)
        deadline = time.monotonic() + timeout_s
        self.wait_ready(timeout_s, nodes=self.nodes)
        self.wait_in_sync(max(1.0, deadline - time.monotonic()))

    def wait_in_sync(self, timeout_s: float = 60) -> None:
        """Wait until no partition of any topic is under-replicated."""
        deadline = time.monotonic() + timeout_s
        lagging: list[str] = []
        while True:
            try:
                md = self._metadata(self.bootstrap, 5)
                lagging = [
                    f"{t.topic}-{p.id}"
                    for t in md.topics.values()
                    for p in t.partitions.values()
                    if len(p.isrs) < len(p.replicas)
                ]
                if not lagging:
                    return
            except KafkaException as e:
                lagging = [str(e)]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: still under-replicated after {timeout_s}s: {lagging[:10]}")
            time.sleep(0.2)

    def _stop_nodes(self, nodes: list[KafkaNode], grace_s: float) -> None:
        _terminate([(self.name, n) for n in nodes], grace_s)

    def __enter__(self) -> "KafkaCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ admin

    def _client_conf(self, bootstrap: str | None = None) -> dict:
        return {"bootstrap.servers": bootstrap or self.bootstrap, "logger": _rdkafka_log, **self.client_conf()}

    def allow(self, principal: str, grants: Iterable[tuple[str, str, str]], timeout_s: float = 30) -> None:
        """Grant `principal` (e.g. "User:alice") each (resource type, name, operation) of
        `grants`, e.g. ("TOPIC", "*", "WRITE"); "*" is the wildcard name. Needs `acls=True`."""
        from confluent_kafka.admin import (
            AclBinding,
            AclOperation,
            AclPermissionType,
            ResourcePatternType,
            ResourceType,
        )

        bindings = [
            AclBinding(
                ResourceType[kind],
                name,
                ResourcePatternType.LITERAL,
                principal,
                "*",
                AclOperation[operation],
                AclPermissionType.ALLOW,
            )
            for kind, name, operation in grants
        ]
        admin = self.admin()  # keep it alive until the futures resolve
        for future in admin.create_acls(bindings, request_timeout=timeout_s).values():
            future.result(timeout=timeout_s)

    def admin(self, bootstrap: str | None = None) -> AdminClient:
        """An AdminClient talking to this cluster directly."""
        return AdminClient(self._client_conf(bootstrap))

    def _metadata(self, bootstrap: str, timeout_s: float, topic: str | None = None):
        return self.admin(bootstrap).list_topics(topic=topic, timeout=timeout_s)

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        replication: int | None = None,
        config: dict[str, str] | None = None,
        timeout_s: float = 30,
    ) -> None:
        """Create a topic and wait until every running node knows a leader for every partition."""
        rf = replication if replication is not None else min(3, self.size)
        admin = self.admin()  # keep it alive until the future resolves
        futures = admin.create_topics(
            [NewTopic(name, partitions, rf, config=dict(config or {}))], operation_timeout=timeout_s
        )
        futures[name].result(timeout=timeout_s)
        self.wait_for_leaders(name, partitions, timeout_s)

    def wait_for_leaders(self, topic: str, partitions: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            if not node.running:
                continue
            while True:
                try:
                    md = self._metadata(node.address, 5, topic).topics.get(topic)
                    if (
                        md is not None
                        and md.error is None
                        and len(md.partitions) == partitions
                        and all(p.leader >= 0 for p in md.partitions.values())
                    ):
                        break
                except KafkaException:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: topic {topic}: no leaders on node {node.node_id} after {timeout_s}s")
                time.sleep(0.1)

    def partitions(self, topic: str) -> dict[int, dict]:
        """{partition: {"leader": id, "replicas": [ids], "isr": [ids]}} as the cluster reports it now."""
        md = self._metadata(self.bootstrap, 10, topic).topics[topic]
        if md.error is not None:
            raise KafkaException(md.error)
        return {
            p.id: {"leader": p.leader, "replicas": list(p.replicas), "isr": sorted(p.isrs)}
            for p in md.partitions.values()
        }

    def wait_isr_size(self, topic: str, size: int, timeout_s: float = 30) -> None:
        """Wait until every partition of `topic` has exactly `size` in-sync replicas."""
        deadline = time.monotonic() + timeout_s
        while True:
            parts = self.partitions(topic)
            if all(len(p["isr"]) == size for p in parts.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {topic}: ISR never reached size {size}: {parts}")
            time.sleep(0.1)

    def delete_topic(self, name: str, timeout_s: float = 30) -> None:
        admin = self.admin()
        admin.delete_topics([name], operation_timeout=timeout_s)[name].result(timeout=timeout_s)

    def read_until(self, topic: str, count: int, timeout_s: float = 30) -> list[dict]:
        """read_all, repeated until the topic holds at least `count` records (for writes nobody
        acknowledged: acks=0, replication by another process). Returns the last read."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = self.read_all(topic, timeout_s=max(1.0, deadline - time.monotonic()))
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.2)

    def read_all(self, topic: str, timeout_s: float = 30, isolation: str = "read_uncommitted") -> list[dict]:
        """Every record of `topic`, read directly from the cluster (no group, no commit).

        Returns dicts {topic, partition, offset, timestamp, key, value, headers} sorted by
        (partition, offset); headers is a list of (str, bytes | None).
        Use isolation="read_committed" to leave out aborted transactional records.
        """
        deadline = time.monotonic() + timeout_s
        c = Consumer(
            {
                **self._client_conf(),
                "group.id": f"harness-read-all-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": isolation,
            }
        )
        try:
            md = c.list_topics(topic, timeout=timeout_s).topics.get(topic)
            if md is None or md.error is not None:
                raise KafkaException(md.error if md is not None else f"no topic {topic}")
            ends: dict[int, int] = {}
            assignment = []
            for p in sorted(md.partitions):
                lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s, cached=False)
                if hi > lo:
                    ends[p] = hi
                    assignment.append(TopicPartition(topic, p, lo))
            records: list[dict] = []
            if not assignment:
                return records
            c.assign(assignment)
            while ends:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"read_all({topic}): partitions {sorted(ends)} not read to the end")
                msg = c.poll(0.2)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        ends.pop(msg.partition(), None)
                        continue
                    raise KafkaException(msg.error())
                records.append(
                    {
                        "topic": msg.topic(),
                        "partition": msg.partition(),
                        "offset": msg.offset(),
                        "timestamp": msg.timestamp()[1],
                        "key": msg.key(),
                        "value": msg.value(),
                        "headers": list(msg.headers() or []),
                    }
                )
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
            records.sort(key=lambda r: (r["partition"], r["offset"]))
            return records
        finally:
            c.close()


def _escape(value: str) -> str:
    """A value for a Java properties file: backslashes and line breaks (PEM) escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_all(clusters: Iterable[KafkaCluster], grace_s: float = 10) -> None:
    """Stop several clusters side by side: SIGTERM every node, one shared grace period."""
    _terminate([(c.name, n) for c in clusters for n in c.nodes], grace_s)


def _terminate(nodes: list[tuple[str, KafkaNode]], grace_s: float) -> None:
    """SIGTERM (SIGKILL when grace_s is 0) the running nodes; SIGKILL those still up after grace_s."""
    live = [(name, n) for name, n in nodes if n.running]
    for _, n in live:
        n.proc.send_signal(signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    for name, n in live:
        try:
            n.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s: node %d still up %.0fs after SIGTERM; killing", name, n.node_id, grace_s)
            n.proc.kill()
            n.proc.wait()
