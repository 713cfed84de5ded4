"""MirrorMaker 2 between the harness's clusters, as a dedicated-mode process from the Kafka jars.

With the default replication policy, topic T of cluster eu appears in cluster us as `eu.T`, so
two regions can replicate each other's data both ways without loops.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import env
from .kafka import KafkaCluster


# MirrorMaker's own lines (what it replicates, checkpoints and syncs) into mm2.log; the Connect
# runtime and clients only when they warn.
LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.mirror.name = org.apache.kafka.connect.mirror
logger.mirror.level = INFO
"""


class MirrorMaker:
    def __init__(
        self, workdir: Path, clusters: dict[str, KafkaCluster], topics: str, checkpoints: bool = False
    ) -> None:
        """`checkpoints`: MirrorMaker translates consumer groups' committed offsets into the
        other clusters every second (checkpoints, and group offsets written to the target's
        `__consumer_offsets` for groups with no member there); off, it copies records only."""
        self.dir = Path(workdir) / "mm2"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clusters = clusters
        self.topics = topics
        self.checkpoints = checkpoints
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "mm2.log"

    def properties(self) -> str:
        names = list(self.clusters)
        lines = [f"clusters = {', '.join(names)}"]
        for name, cluster in self.clusters.items():
            lines.append(f"{name}.bootstrap.servers = {cluster.bootstrap}")
        for a in names:
            for b in names:
                if a != b:
                    lines += [f"{a}->{b}.enabled = true", f"{a}->{b}.topics = {self.topics}"]
        lines += [
            # One broker per cluster in the tests; fast topic discovery and small internals.
            "replication.factor = 1",
            "offset-syncs.topic.replication.factor = 1",
            "checkpoints.topic.replication.factor = 1",
            "heartbeats.topic.replication.factor = 1",
            "config.storage.replication.factor = 1",
            "offset.storage.replication.factor = 1",
            "status.storage.replication.factor = 1",
            "refresh.topics.interval.seconds = 1",
            "sync.topic.acls.enabled = false",
            "offset.flush.interval.ms = 1000",
            # Read from the start of a topic MirrorMaker discovers after records were written.
            "consumer.auto.offset.reset = earliest",
        ]
        if self.checkpoints:
            lines += [
                "refresh.groups.enabled = true",
                "refresh.groups.interval.seconds = 1",
                "emit.checkpoints.enabled = true",
                "emit.checkpoints.interval.seconds = 1",
                "sync.group.offsets.enabled = true",
                "sync.group.offsets.interval.seconds = 1",
                # An offset sync for every record copied, so a committed offset translates exactly.
                "offset.lag.max = 0",
            ]
        else:
            lines += [
                "refresh.groups.enabled = false",
                "emit.checkpoints.enabled = false",
                "sync.group.offsets.enabled = false",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> "MirrorMaker":
        config = self.dir / "mm2.properties"
        config.write_text(self.properties())
        log4j = self.dir / "log4j2.properties"
        log4j.write_text(LOG4J2)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                *env.pdeathsig_prefix(),
                env.java_bin(),
                "-Xmx384m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={log4j}",
                "-cp",
                f"{env.kafka_libs()}/*",
                "org.apache.kafka.connect.mirror.MirrorMaker",
                str(config),
            ],
            stdout=log,
            stderr=log,
        )
        return self

    def stop(self) -> None:
        env.terminate(self.proc, 15)

    def logs(self, lines: int = 60) -> str:
        return env.tail(self.log_path, lines)
