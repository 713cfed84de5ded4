"""MirrorMaker 2 between the harness's clusters, as a dedicated-mode process from the Kafka jars.

With the default replication policy, topic T of cluster eu appears in cluster us as `eu.T`, so
two regions can replicate each other's data both ways without loops.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import env
from .kafka import KafkaCluster


class MirrorMaker:
    def __init__(self, workdir: Path, clusters: dict[str, KafkaCluster], topics: str) -> None:
        self.dir = Path(workdir) / "mm2"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clusters = clusters
        self.topics = topics
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
            "refresh.groups.enabled = false",
            "sync.topic.acls.enabled = false",
            "emit.checkpoints.enabled = false",
            "sync.group.offsets.enabled = false",
            "offset.flush.interval.ms = 1000",
            # Read from the start of a topic MirrorMaker discovers after records were written.
            "consumer.auto.offset.reset = earliest",
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> "MirrorMaker":
        config = self.dir / "mm2.properties"
        config.write_text(self.properties())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                *env.pdeathsig_prefix(),
                env.java_bin(),
                "-Xmx384m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
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
