"""Three independent, real Kafka client implementations behind one interface.

Owns the mapping from the harness's common knobs to each client's own config,
and the translation of each client's results into one shape, so a test can be
parametrized over `JavaClient` (official Java client, subprocess),
`LibrdkafkaClient` (confluent-kafka, in-process) and `FranzClient` (franz-go,
subprocess). It decides nothing about what a result should be: tests do.

Shapes (plain dicts, so tests compare them directly):

  record in   {"key": bytes|None, "value": bytes|None,
               "headers": [(str, bytes|None), ...], "partition": int|None}
              (every field but "value" may be left out)
  delivery    {"ok": bool, "partition": int|None, "offset": int|None,
               "error_code": int|None, "error_name": str|None, "error_message": str|None}
              one per input record, in input order.
  record out  {"topic", "partition", "offset", "timestamp", "key", "value", "headers"}
  security    {"protocol": "SSL" | "SASL_SSL" | "SASL_PLAINTEXT",
               "ca": path|None,         PEM bundle the server's certificate must chain to
                                        (None: the client's default trust store); the
                                        server's name (host or IP dialed) is always verified
               "cert": path|None, "key": path|None,   client certificate (PEM) and its
                                        unencrypted PKCS#8 key, for mTLS; both or neither
               "mechanism": "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512",  SASL_* only
               "username": str, "password": str}                          SASL_* only
              the `security` knob of producer and consumer config and the `security`
              argument of metadata(); None (the default) is PLAINTEXT. Paths may be str or
              Path; they are passed on absolute.

Error codes: broker errors carry the Kafka protocol's code and name
(INVALID_RECORD = 87, NOT_ENOUGH_REPLICAS = 19, ...; see errors.py) in every client. Errors
raised inside a client are reported the client's own way:
  java    Errors.forException: a client timeout is REQUEST_TIMED_OUT (7),
          anything unmapped UNKNOWN_SERVER_ERROR (-1);
  librdkafka  negative codes with a leading underscore, e.g. -192 _MSG_TIMED_OUT;
  franz   error_code None and error_name CLIENT_RECORD_TIMEOUT, CLIENT_ERROR, ...

The JSON spec the Java and Go CLIs read (one document, file or stdin):
  {"op": "produce", "bootstrap": str, "topic": str, "records": [wire record],
   "flush_every": int, "timeout_ms": int, "pause": {"after": int, "until_file": str},
   "config": {normalized config}}
  {"op": "consume", "bootstrap": str, "topics": [str], "group_id": str,
   "expected_count": int, "timeout_ms": int, "commit": bool, "stop_file": str | null,
   "config": {...}}
  {"op": "metadata", "bootstrap": str, "timeout_ms": int, "config": {...}}
  {"op": "describe_topics", "bootstrap": str, "topics": [str], "timeout_ms": int,
   "config": {...}}   (Java only)
with bytes as standard base64 and headers as [{"key": str, "value": b64|null}]; the
metadata op's config holds only {"security": ...}.
They answer {"results": [delivery]}, {"records": [wire record]} or
{"cluster_id", "controller_id", "brokers": [{"node_id", "host", "port"}]}.

A client that cannot authenticate or does not trust the server (or is refused by it) fails
within the call's timeout: produce reports an error for every record, metadata raises
ClientError, consume raises ClientError (java) or returns no records (librdkafka, franz).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from . import env
from .errors import error_name

log = logging.getLogger("harness.clients")

ACKS = ("all", "1", "0")
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
SECURITY_PROTOCOLS = ("SSL", "SASL_SSL", "SASL_PLAINTEXT")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# Common knobs, with None meaning "the client's own default".
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "idempotence": None,  # None: True for acks=all, else False (the same in every client)
    "compression": "none",
    "linger_ms": None,
    "delivery_timeout_ms": None,  # None: 2/3 of the call's timeout_s
    "request_timeout_ms": None,  # None: min(30 s, delivery timeout / 2)
    "retries": None,
    "batch_size": None,  # bytes per partition batch
    "max_in_flight": None,
    "client_id": None,
    "security": None,  # see "security" in the module docstring
    "native": {},  # raw properties of this one client (java, librdkafka only)
}
CONSUMER_DEFAULTS: dict[str, Any] = {
    "client_id": None,
    "group_protocol": None,  # "classic" | "consumer" (java, librdkafka)
    "auto_commit_ms": None,  # commit every N ms while consuming; None: only at the end
    "session_timeout_ms": None,  # classic groups only; None: the client's default (45 s)
    "security": None,
    "native": {},
}


class ClientError(RuntimeError):
    """The client tool itself failed (not a per-record delivery error)."""


def normalize_producer_config(config: dict | None, timeout_s: float) -> dict:
    cfg = dict(PRODUCER_DEFAULTS)
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown producer config keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(config or {})
    acks = str(cfg["acks"]).lower()
    cfg["acks"] = "all" if acks == "-1" else acks
    if cfg["acks"] not in ACKS:
        raise ValueError(f"acks must be one of {ACKS}")
    if cfg["idempotence"] is None:
        cfg["idempotence"] = cfg["acks"] == "all"
    if cfg["idempotence"] and cfg["acks"] != "all":
        raise ValueError("idempotence needs acks=all")
    if cfg["compression"] not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}")
    if cfg["delivery_timeout_ms"] is None:
        cfg["delivery_timeout_ms"] = int(timeout_s * 1000 * 2 / 3)
    if cfg["request_timeout_ms"] is None:
        cfg["request_timeout_ms"] = min(30_000, cfg["delivery_timeout_ms"] // 2)
    # Java refuses delivery.timeout.ms < linger.ms + request.timeout.ms.
    cfg["request_timeout_ms"] = min(cfg["request_timeout_ms"], cfg["delivery_timeout_ms"] - (cfg["linger_ms"] or 0))
    cfg["security"] = normalize_security(cfg["security"])
    return cfg


def normalize_consumer_config(config: dict | None) -> dict:
    cfg = dict(CONSUMER_DEFAULTS)
    unknown = set(config or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown consumer config keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(config or {})
    cfg["security"] = normalize_security(cfg["security"])
    return cfg


def normalize_security(security: dict | None) -> dict | None:
    """Check a `security` dict (module docstring) and return it with every key present,
    paths as absolute strings; None stays None."""
    if security is None:
        return None
    keys = ("protocol", "ca", "cert", "key", "mechanism", "username", "password")
    unknown = set(security) - set(keys)
    if unknown:
        raise ValueError(f"unknown security keys {sorted(unknown)}; known: {list(keys)}")
    sec = {k: security.get(k) for k in keys}
    protocol = sec["protocol"]
    if protocol not in SECURITY_PROTOCOLS:
        raise ValueError(f"security protocol must be one of {SECURITY_PROTOCOLS}, not {protocol!r}")
    for k in ("ca", "cert", "key"):
        if sec[k] is not None:
            if protocol == "SASL_PLAINTEXT":
                raise ValueError(f"security {k!r} needs a TLS protocol (SSL, SASL_SSL)")
            sec[k] = str(Path(sec[k]).resolve())
    if (sec["cert"] is None) != (sec["key"] is None):
        raise ValueError("security 'cert' and 'key' go together")
    sasl = ("mechanism", "username", "password")
    if protocol.startswith("SASL_"):
        if sec["mechanism"] not in SASL_MECHANISMS:
            raise ValueError(f"security mechanism must be one of {SASL_MECHANISMS}, not {sec['mechanism']!r}")
        if sec["username"] is None or sec["password"] is None:
            raise ValueError(f"{protocol} needs a username and a password")
    elif any(sec[k] is not None for k in sasl):
        raise ValueError(f"{protocol} takes no {'/'.join(sasl)}")
    return sec


def librdkafka_security(security: dict | None) -> dict[str, str]:
    """librdkafka properties for a `security` dict, hostname verification on."""
    sec = normalize_security(security)
    if sec is None:
        return {}
    conf = {"security.protocol": sec["protocol"]}
    if sec["protocol"] != "SASL_PLAINTEXT":
        conf["ssl.endpoint.identification.algorithm"] = "https"
        if sec["ca"] is not None:
            conf["ssl.ca.location"] = sec["ca"]
        if sec["cert"] is not None:
            conf["ssl.certificate.location"] = sec["cert"]
            conf["ssl.key.location"] = sec["key"]
    if sec["protocol"] != "SSL":
        conf["sasl.mechanisms"] = sec["mechanism"]
        conf["sasl.username"] = sec["username"]
        conf["sasl.password"] = sec["password"]
    return conf


def record(key: bytes | None, value: bytes | None, headers: Iterable = (), partition: int | None = None) -> dict:
    """Build a record in the harness's input shape."""
    return {"key": key, "value": value, "headers": list(headers), "partition": partition}


class Client(ABC):
    """One real Kafka client implementation."""

    name: str

    @abstractmethod
    def produce(
        self,
        bootstrap: str,
        topic: str,
        records: list[dict],
        config: dict | None = None,
        timeout_s: float = 30,
        flush_every: int = 0,
        pause: tuple[int, str] | None = None,
    ) -> list[dict]:
        """Produce `records` with ONE producer; returns one delivery dict per record, in order.

        flush_every=N sends N records, waits for all of them (flush), then goes on with the
        next N on the same producer; 0 sends everything, then flushes once.
        pause=(N, path): after the first N records are sent and flushed, the same producer waits
        until `path` exists before it sends the rest (a producer kept across a switch).
        """

    @abstractmethod
    def consume(
        self,
        bootstrap: str,
        topics: list[str],
        group_id: str,
        expected_count: int,
        timeout_s: float = 30,
        commit: bool = True,
        config: dict | None = None,
        stop_file: str | None = None,
    ) -> list[dict]:
        """Join `group_id`, subscribe to `topics` (from the earliest offset when the group has
        none) and poll until at least expected_count records came, timeout_s passed or
        `stop_file` exists; then commit synchronously (commit=True) and leave. Returns what was
        consumed; each record has `received_ms`, when the client handed it over (Unix ms)."""

    @abstractmethod
    def metadata(
        self, bootstrap: str, timeout_s: float = 15, security: dict | None = None
    ) -> list[tuple[int, str, int]]:
        """Brokers as this client sees them: sorted [(node_id, host, port)]. `security` as in
        the module docstring."""

    def __repr__(self) -> str:
        return self.name


# ---------------------------------------------------------------- JSON wire helpers


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


def _to_wire(r: dict) -> dict:
    return {
        "key": _b64(r.get("key")),
        "value": _b64(r.get("value")),
        "headers": [{"key": k, "value": _b64(v)} for k, v in r.get("headers") or []],
        "partition": r.get("partition"),
    }


def _from_wire(r: dict) -> dict:
    return {
        "topic": r["topic"],
        "partition": r["partition"],
        "offset": r["offset"],
        "timestamp": r.get("timestamp"),
        "received_ms": r.get("received_ms"),
        "key": _unb64(r.get("key")),
        "value": _unb64(r.get("value")),
        "headers": [(h["key"], _unb64(h.get("value"))) for h in r.get("headers") or []],
    }


class _CliClient(Client):
    """A client that runs a CLI: JSON spec on stdin, one JSON document on stdout."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _run(self, spec: dict, timeout_s: float) -> dict:
        cmd = self._command() + ["-"]
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                cmd,
                input=json.dumps(spec).encode(),
                capture_output=True,
                # The tool bounds itself by spec["timeout_ms"]; this is the backstop (JVM start, close).
                timeout=timeout_s + 30,
            )
        except subprocess.TimeoutExpired as e:
            raise ClientError(f"{self.name}: {spec['op']} hung past {timeout_s + 30}s\n{_tail(e.stderr)}") from None
        log.debug("%s %s took %.2fs", self.name, spec["op"], time.monotonic() - t0)
        if p.stderr:
            log.info("%s %s stderr:\n%s", self.name, spec["op"], _tail(p.stderr, 80))
        if p.returncode != 0:
            raise ClientError(f"{self.name}: {spec['op']} exited {p.returncode}\n{_tail(p.stderr)}")
        try:
            return json.loads(p.stdout)
        except ValueError:
            raise ClientError(f"{self.name}: not JSON on stdout: {p.stdout[:500]!r}\n{_tail(p.stderr)}") from None

    def produce(self, bootstrap, topic, records, config=None, timeout_s=30, flush_every=0, pause=None):
        cfg = normalize_producer_config(config, timeout_s)
        spec = {
            "op": "produce",
            "bootstrap": bootstrap,
            "topic": topic,
            "records": [_to_wire(r) for r in records],
            "flush_every": flush_every,
            "timeout_ms": int(timeout_s * 1000),
            "config": cfg,
        }
        if pause is not None:
            spec["pause"] = {"after": pause[0], "until_file": str(pause[1])}
        return self._run(spec, timeout_s)["results"]

    def consume(self, bootstrap, topics, group_id, expected_count, timeout_s=30, commit=True, config=None,
                stop_file=None):
        spec = {
            "op": "consume",
            "bootstrap": bootstrap,
            "topics": list(topics),
            "group_id": group_id,
            "expected_count": expected_count,
            "timeout_ms": int(timeout_s * 1000),
            "commit": commit,
            "config": normalize_consumer_config(config),
            "stop_file": None if stop_file is None else str(stop_file),
        }
        return [_from_wire(r) for r in self._run(spec, timeout_s)["records"]]

    def metadata(self, bootstrap, timeout_s=15, security=None):
        spec = {
            "op": "metadata",
            "bootstrap": bootstrap,
            "timeout_ms": int(timeout_s * 1000),
            "config": {"security": normalize_security(security)},
        }
        out = self._run(spec, timeout_s)
        return sorted((b["node_id"], b["host"], b["port"]) for b in out["brokers"])


def _tail(b: bytes | None, lines: int = 40) -> str:
    if not b:
        return "(no stderr)"
    return "\n".join(b.decode(errors="replace").splitlines()[-lines:])


class JavaClient(_CliClient):
    """The official Java client: kafka-clients <kafka.version> (the brokers' version) by default,
    or another version of the compatibility matrix (`JavaClient("4.4.0")`, named java-4.4.0)."""

    name = "java"

    def __init__(self, kafka_clients: str | None = None) -> None:
        self.kafka_clients = kafka_clients
        if kafka_clients is not None:
            self.name = f"java-{kafka_clients}"

    def _command(self) -> list[str]:
        level = os.environ.get("KEYWARD_CLIENT_LOG", "warn")
        return [
            env.java_bin(),
            *env.TOOL_JVM_OPTS,
            f"-Dorg.slf4j.simpleLogger.defaultLogLevel={level}",
            "-Dorg.slf4j.simpleLogger.logFile=System.err",
            "-cp",
            str(env.java_client_libs(self.kafka_clients) / "*"),
            "dev.keyward.testclient.Main",
        ]


    def describe_topics(self, bootstrap: str, topics: list[str], timeout_s: float = 15) -> list[dict]:
        """The admin client's description of `topics` (Java only): [{name, topic_id, partitions:
        [{partition, leader, isr}]}], topic_id as Kafka prints it."""
        spec = {"op": "describe_topics", "bootstrap": bootstrap, "topics": list(topics),
                "timeout_ms": int(timeout_s * 1000), "config": {"security": None}}
        return self._run(spec, timeout_s)["topics"]


class FranzClient(_CliClient):
    """franz-go (kgo/kadm/kerr), a pure-Go client."""

    name = "franz"

    def _command(self) -> list[str]:
        return [str(env.franz_client_bin())]

    def produce(self, bootstrap, topic, records, config=None, timeout_s=30, flush_every=0, pause=None):
        if (config or {}).get("native"):
            raise ValueError("franz-go takes no raw properties")
        return super().produce(bootstrap, topic, records, config, timeout_s, flush_every, pause)


class LibrdkafkaClient(Client):
    """librdkafka through confluent-kafka, in this process."""

    name = "librdkafka"

    def __init__(self) -> None:
        self._log = logging.getLogger("harness.librdkafka")

    def produce(self, bootstrap, topic, records, config=None, timeout_s=30, flush_every=0, pause=None):
        cfg = normalize_producer_config(config, timeout_s)
        conf = {
            "bootstrap.servers": bootstrap,
            "acks": cfg["acks"],
            "enable.idempotence": cfg["idempotence"],
            "compression.type": cfg["compression"],
            "message.timeout.ms": cfg["delivery_timeout_ms"],
            "request.timeout.ms": cfg["request_timeout_ms"],
            # The Java and franz-go default: the same key lands on the same partition in all three.
            "partitioner": "murmur2_random",
            "logger": self._log,
        }
        optional = {
            "linger_ms": "linger.ms",
            "retries": "retries",
            "batch_size": "batch.size",
            "max_in_flight": "max.in.flight.requests.per.connection",
            "client_id": "client.id",
        }
        for knob, prop in optional.items():
            if cfg[knob] is not None:
                conf[prop] = cfg[knob]
        conf.update(librdkafka_security(cfg["security"]))
        conf.update(cfg["native"])

        results: list[dict | None] = [None] * len(records)

        def on_delivery(idx: int):
            def cb(err: KafkaError | None, msg) -> None:
                results[idx] = _rd_delivery(err, msg)

            return cb

        deadline = time.monotonic() + timeout_s
        try:
            producer = Producer(conf)
        except KafkaException as e:
            raise ClientError(f"librdkafka: producer config refused: {e}") from None
        for i, r in enumerate(records):
            kwargs: dict[str, Any] = {
                "value": r.get("value"),
                "key": r.get("key"),
                "headers": list(r.get("headers") or []),
                "on_delivery": on_delivery(i),
            }
            if r.get("partition") is not None:
                kwargs["partition"] = r["partition"]
            while True:
                try:
                    producer.produce(topic, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.1)  # local queue full: serve delivery reports, then retry
                except KafkaException as e:
                    results[i] = _rd_delivery(e.args[0], None)
                    break
            producer.poll(0)
            if flush_every > 0 and (i + 1) % flush_every == 0:
                producer.flush(max(0.0, deadline - time.monotonic()))
            if pause is not None and i + 1 == pause[0]:
                producer.flush(max(0.0, deadline - time.monotonic()))
                while not os.path.exists(pause[1]) and time.monotonic() < deadline:
                    producer.poll(0.1)
        if producer.flush(max(0.0, deadline - time.monotonic())) > 0:
            # Out of time: fail what is left (_PURGE_QUEUE / _PURGE_INFLIGHT reports) rather
            # than leave librdkafka holding messages while the handle is destroyed.
            producer.purge()
            producer.flush(5)
        for i, r in enumerate(results):
            if r is None:
                results[i] = {
                    "ok": False,
                    "partition": None,
                    "offset": None,
                    "error_code": None,
                    "error_name": "HARNESS_TIMEOUT",
                    "error_message": f"no delivery report within {timeout_s}s",
                }
        return results

    def consume(self, bootstrap, topics, group_id, expected_count, timeout_s=30, commit=True, config=None,
                stop_file=None):
        cfg = normalize_consumer_config(config)
        conf = {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": cfg["auto_commit_ms"] is not None,
            "logger": self._log,
        }
        if cfg["auto_commit_ms"] is not None:
            conf["auto.commit.interval.ms"] = cfg["auto_commit_ms"]
        if cfg["session_timeout_ms"] is not None:
            conf["session.timeout.ms"] = cfg["session_timeout_ms"]
        if cfg["client_id"] is not None:
            conf["client.id"] = cfg["client_id"]
        if cfg["group_protocol"] is not None:
            conf["group.protocol"] = cfg["group_protocol"]
        conf.update(librdkafka_security(cfg["security"]))
        conf.update(cfg["native"])
        try:
            c = Consumer(conf)
        except KafkaException as e:
            raise ClientError(f"librdkafka: consumer config refused: {e}") from None
        out: list[dict] = []
        deadline = time.monotonic() + timeout_s
        try:
            c.subscribe(list(topics))
            while (len(out) < expected_count and time.monotonic() < deadline
                   and not (stop_file is not None and os.path.exists(stop_file))):
                msg = c.poll(0.2)
                if msg is None:
                    continue
                if msg.error():
                    self._log.warning("consume: %s", msg.error())
                    continue
                out.append(
                    {
                        "topic": msg.topic(),
                        "partition": msg.partition(),
                        "offset": msg.offset(),
                        "timestamp": msg.timestamp()[1],
                        "received_ms": int(time.time() * 1000),
                        "key": msg.key(),
                        "value": msg.value(),
                        "headers": list(msg.headers() or []),
                    }
                )
            if commit and out:
                try:
                    c.commit(asynchronous=False)
                except KafkaException as e:
                    # Auto-commit (auto_commit_ms) may have committed everything already.
                    if e.args[0].code() != KafkaError._NO_OFFSET:
                        raise
        finally:
            c.close()
        return out

    def metadata(self, bootstrap, timeout_s=15, security=None):
        """See Client.metadata; failures raise ClientError with librdkafka's last error.
        librdkafka retries a failed SASL login or server-certificate check until the timeout;
        this gives up at the first one, like the Java and Go clients. A handshake the server
        refuses (no client certificate) is a plain transport error and takes the timeout."""
        errors: list[KafkaError] = []
        conf = {"bootstrap.servers": bootstrap, "logger": self._log, "error_cb": errors.append}
        admin = AdminClient({**conf, **librdkafka_security(security)})
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                md = admin.list_topics(timeout=max(0.01, min(0.5, deadline - time.monotonic())))
                return sorted((b.id, b.host, b.port) for b in md.brokers.values())
            except KafkaException as e:
                admin.poll(0)  # serve error_cb
                fatal = [x for x in errors if x.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL)]
                if fatal or time.monotonic() >= deadline:
                    last = (fatal or errors or [e.args[0]])[-1]
                    raise ClientError(f"librdkafka: metadata failed: {last.name()}: {last.str()}") from None


def _rd_delivery(err: KafkaError | None, msg) -> dict:
    if err is None:
        off = msg.offset()
        return {
            "ok": True,
            "partition": msg.partition(),
            "offset": off if off is not None and off >= 0 else None,
            "error_code": None,
            "error_name": None,
            "error_message": None,
        }
    part = msg.partition() if msg is not None else None
    # Broker errors: librdkafka's code is the protocol's, but some names differ
    # (MSG_SIZE_TOO_LARGE for MESSAGE_TOO_LARGE): report the protocol's name.
    # librdkafka's own errors (codes <= -100) keep their _UNDERSCORED names.
    code = err.code()
    return {
        "ok": False,
        "partition": part if part is not None and part >= 0 else None,
        "offset": None,
        "error_code": code,
        "error_name": error_name(code) or err.name(),
        "error_message": f"{err.name()}: {err.str()}",
    }


ALL_CLIENTS: list[Client] = [JavaClient(), LibrdkafkaClient(), FranzClient()]


def unique(prefix: str) -> str:
    """A fresh topic/group name, so tests never see each other's data."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
