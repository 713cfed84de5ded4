"""End-to-end test harness: real Kafka clusters and real clients.

- kafka.py: KafkaCluster (KRaft brokers from the jars in the cache), read_all.
- clients.py: JavaClient, LibrdkafkaClient, FranzClient behind one interface.
- errors.py: Kafka protocol error codes and names.
- env.py: where dev/install-test-deps put things; process helpers.
- keyward.py: the proxy under test, run as a binary in front of the clusters.
"""

from .clients import ALL_CLIENTS, Client, ClientError, FranzClient, JavaClient, LibrdkafkaClient, record, unique
from .errors import ERROR_CODES, ERROR_NAMES, error_name
from .kafka import KafkaCluster, KafkaStartError, stop_all

__all__ = [
    "ALL_CLIENTS",
    "ERROR_CODES",
    "ERROR_NAMES",
    "Client",
    "ClientError",
    "FranzClient",
    "JavaClient",
    "KafkaCluster",
    "KafkaStartError",
    "LibrdkafkaClient",
    "error_name",
    "record",
    "stop_all",
    "unique",
]
