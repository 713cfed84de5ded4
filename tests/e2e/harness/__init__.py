"""End-to-end test harness: real Kafka clusters and real clients.

- kafka.py: KafkaCluster (KRaft brokers from the jars in the cache), read_all;
  KafkaSecurity for SASL_SSL and mTLS client listeners.
- certs.py: Pki, a throwaway CA that issues certificates (openssl CLI).
- clients.py: JavaClient, LibrdkafkaClient, FranzClient behind one interface.
- errors.py: Kafka protocol error codes and names.
- env.py: where dev/install-test-deps put things; process helpers.
- keyward.py: the proxy under test, run as a binary in front of the clusters.
"""

from .certs import Leaf, Pki
from .clients import ALL_CLIENTS, Client, ClientError, FranzClient, JavaClient, LibrdkafkaClient, record, unique
from .errors import ERROR_CODES, ERROR_NAMES, error_name
from .kafka import HARNESS_USER, KafkaCluster, KafkaSecurity, KafkaStartError, stop_all

__all__ = [
    "ALL_CLIENTS",
    "ERROR_CODES",
    "ERROR_NAMES",
    "Client",
    "ClientError",
    "FranzClient",
    "HARNESS_USER",
    "JavaClient",
    "KafkaCluster",
    "KafkaSecurity",
    "KafkaStartError",
    "Leaf",
    "LibrdkafkaClient",
    "Pki",
    "error_name",
    "record",
    "stop_all",
    "unique",
]
