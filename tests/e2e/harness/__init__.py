"""End-to-end test harness: real Kafka clusters and real clients, no keyward.

- kafka.py: KafkaCluster (KRaft brokers from the jars in the cache), read_all.
- clients.py: JavaClient, LibrdkafkaClient, FranzClient behind one interface.
- env.py: where dev/install-test-deps put things.
"""

from .clients import ALL_CLIENTS, Client, ClientError, FranzClient, JavaClient, LibrdkafkaClient, record, unique
from .kafka import KafkaCluster, KafkaStartError, stop_all

__all__ = [
    "ALL_CLIENTS",
    "Client",
    "ClientError",
    "FranzClient",
    "JavaClient",
    "KafkaCluster",
    "KafkaStartError",
    "LibrdkafkaClient",
    "record",
    "stop_all",
    "unique",
]
