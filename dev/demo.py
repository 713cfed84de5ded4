"""Runs the two-region demo; started by dev/demo (which installs Kafka and builds keyward)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/e2e"))

from harness import KafkaCluster  # noqa: E402
from harness import env  # noqa: E402

REGIONS = {
    # region: (Kafka port, keyward config)
    "eu": (19092, ROOT / "config/keyward.yaml"),
    "us": (29092, ROOT / "config/keyward-us.yaml"),
}
TOPICS = {"orders": 16, "tenant.billing": 3, "inventory": 12, "audit.login": 1, "metrics.cpu": 1}


def main() -> int:
    # SIGTERM stops the demo as Ctrl-C does, so everything it started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    workdir = Path(tempfile.mkdtemp(prefix="keyward-demo-"))
    clusters: dict[str, KafkaCluster] = {}
    proxies: list[subprocess.Popen] = []
    try:
        for region, (port, _) in REGIONS.items():
            cluster = KafkaCluster(region, 1, workdir)
            cluster.nodes[0].port = port  # the address config/keyward*.yaml points at
            clusters[region] = cluster
        for region, cluster in clusters.items():
            print(f"starting Kafka for region {region} on {cluster.bootstrap} ...", flush=True)
            cluster.start()
            for topic, partitions in TOPICS.items():
                cluster.create_topic(topic, partitions)
        keyward = ROOT / "target/release/keyward"
        for region, (_, config) in REGIONS.items():
            log = open(workdir / f"keyward-{region}.log", "ab")
            proxies.append(
                subprocess.Popen(
                    [*env.pdeathsig_prefix(), str(keyward), "run", "--config", str(config)], stdout=log, stderr=log
                )
            )
        time.sleep(1)
        for p in proxies:
            if p.poll() is not None:
                raise RuntimeError(f"keyward exited; see {workdir}/keyward-*.log")
        print_instructions(workdir)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping ...", flush=True)
        for p in proxies:
            p.terminate()
        for p in proxies:
            p.wait(timeout=10)
        for cluster in clusters.values():
            cluster.stop()
    return 0


def print_instructions(workdir: Path) -> None:
    libs = env.kafka_libs()
    tools = f'java -cp "{libs}/*"'
    print(
        f"""
keyward two-region demo is up.

  region eu: Kafka 127.0.0.1:19092, keyward bootstrap 127.0.0.1:9192, admin http://127.0.0.1:9190/metrics
  region us: Kafka 127.0.0.1:29092, keyward bootstrap 127.0.0.1:9492, admin http://127.0.0.1:9490/metrics
  ownership table: config/ownership.yaml (orders: slots 0-7 eu, 8-15 us); logs: {workdir}

Who owns a key?
  target/release/keyward owner --config config/keyward.yaml --topic orders --key cust-42

Produce through the eu proxy (type key:value lines; cust-42 is eu's, cust-1 is us's):
  {tools} org.apache.kafka.tools.ConsoleProducer --bootstrap-server 127.0.0.1:9192 \\
      --topic orders --reader-property parse.key=true --reader-property key.separator=:
  > cust-42:first order         (written to the eu cluster)
  > cust-1:second order         (refused: INVALID_RECORD, key "cust-1" is owned by region us ...)

Consume through the eu proxy:
  {tools} org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server 127.0.0.1:9192 \\
      --topic orders --from-beginning --formatter-property print.key=true

Watch the refusals:
  curl -s http://127.0.0.1:9190/metrics | grep 'decision="rejected"'

Ctrl-C stops the proxies and both clusters.
""",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
