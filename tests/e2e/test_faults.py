"""Nothing lost under faults: real Kafka, real clients, acks=all idempotent producers writing
through keyward while something breaks.

Each test runs producers of different client implementations in background threads (one topic
each, one unique value per record, keys chosen so that every partition holds one slot of the
`by: key` rule and so one owner) while the main thread injects one family of faults, once, while
all of them write. A stream is a run of produce calls (each a new producer) that goes on until
the test stops it: the first call is long enough to span the fault, which the test checks, and
the test stops the streams as soon as the fault is over and each has written more after it, so
no test waits out a fixed amount of writing. The fault families:

  test_a_broker_restart             an eu broker leading a partition is SIGKILLed and restarted
  test_keyward_sigkill_and_sigterm  keyward is SIGKILLed and restarted on the same ports, then
                                    stopped with SIGTERM (a held Fetch is still answered, the
                                    exit is clean and within the grace period) and restarted
  test_ownership_flips_every_100ms  the table is rewritten (rename over) and reloaded every
                                    100 ms, flipping some slots between eu and us
  test_redirect_under_ownership_flips  the same with `on_foreign: redirect`
  test_keyward_sigkill_under_redirect_with_the_stream_journal  keyward, redirecting with the
                                    stream journal on, is SIGKILLed twice and restarted while
                                    every partition mixes local and redirected records
  test_two_instances_behind_haproxy_under_redirect  the same load through haproxy in front of two
                                    eu instances: one is SIGKILLed and comes back, then both
                                    are restarted in turn (SIGTERM)
  test_an_answer_waits_for_the_stream_journal  a raw idempotent producer redirecting while the
                                    stream journal refuses every save: nothing is acknowledged,
                                    and nothing is sent under a producer id no save holds
  test_slow_consumer_and_stalled_clients  a consumer reads through keyward with tiny fetches and
                                    pauses, and raw clients send half a frame and stall

Then the clusters are read DIRECTLY (never through keyward) and every stream is counted: sent,
acknowledged, rejected (INVALID_RECORD), failed otherwise, found in its owner's cluster,
duplicates, lost, misplaced (in a cluster that does not own it) and rejected-but-present. The
assertions are exact: every acknowledged record is in its owner's cluster exactly once, no
rejected record is anywhere, and every record's outcome is the one its owner dictates. Where
keyward ran throughout, its RSS and open file descriptors must come back to their idle level
once the clients are gone.

The figures are printed, appended to `fault-figures.txt` in the test's tmp dir and the session's
basetemp, and shown in the terminal summary ("fault suite figures"); docs/faults.md has a run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from harness import Client, FranzClient, JavaClient, KafkaCluster, LibrdkafkaClient, raw, record, unique
from harness.keyward import Keyward

from test_keyward import INVALID_RECORD
from test_limits import _closed, _fetch_v4
from test_operator import wait_for

SLOTS = 16  # slots of every rule here, and partitions of every topic: partition N holds slot N

STEADY = '{ eu: ["0-7"], us: ["8-15"] }'
SWAPPED = '{ eu: ["0-3", "12-15"], us: ["4-11"] }'


def table(flipped: bool = False) -> str:
    """`fixed` never changes. `flip` (refusing foreign writes) and `rflip` (redirecting them)
    are the rules the reload test flips: when flipped, slots 4-7 move from eu to us and slots
    12-15 from us to eu; slots 0-3 stay eu's and 8-11 us's throughout."""
    moving = SWAPPED if flipped else STEADY
    return f"""
rules:
  - name: fixed
    topics: ["fixed.*"]
    by: key
    slots: 16
    owners: {STEADY}
    on_foreign: reject
  - name: flip
    topics: ["flip.*"]
    by: key
    slots: 16
    owners: {moving}
    on_foreign: reject
  - name: rfixed
    topics: ["rfixed.*"]
    by: key
    slots: 16
    owners: {STEADY}
    on_foreign: redirect
  - name: rflip
    topics: ["rflip.*"]
    by: key
    slots: 16
    owners: {moving}
    on_foreign: redirect
default: allow
"""


def owner_of(rule: str, slot: int) -> str:
    """eu or us for a slot whose owner never changes, "flip" for one the reload test moves."""
    if rule in ("fixed", "rfixed"):
        return "eu" if slot < 8 else "us"
    return {0: "eu", 1: "flip", 2: "us", 3: "flip"}[slot // 4]


# acks=all, idempotent, and a delivery timeout far longer than any fault lasts: a record the
# client gives up on would be neither acknowledged nor refused, and the tests allow none.
PRODUCER = {
    "acks": "all",
    "idempotence": True,
    "linger_ms": 0,
    "delivery_timeout_ms": 90_000,
    "request_timeout_ms": 10_000,
}
PRODUCE_CALL_S = 150  # bound on one produce() call (the client's own timeouts come first)

# Records of a stream's first produce call, which must span the fault (checked), and of each
# later call. In the `reject` tests half the records are owned by eu, so acknowledged.
FIRST = 2400
BROKER_FIRST = 1600  # spans the kill (the restart takes longer: later calls write through it)
CHUNK = 200
# Table flips a flip test waits for while its streams write, before it stops them.
MIN_FLIPS = 50
FLIP_FIRST = 400  # the flip tests' streams write throughout the flips, in calls of 400
SLOW_FIRST = 1200

RSS_SLACK = 16 * 1024 * 1024
# A cluster probe may hold a socket for a moment (when idle is measured, say), and after
# redirects keyward keeps its own connections to the owner's cluster open for reuse (README,
# "Redirect"): two to the one-broker us cluster; and the stream journal's four to eu (a
# bootstrap connection and one to the topic's leader, for saves and for the reader each).
FD_SLACK = 7


# --------------------------------------------------------------------------- keys and streams

_slots: dict[str, int] = {}


def slot_of(kw: Keyward, key: str) -> int:
    """The key's slot as the running keyward computes it (murmur2, as the Java partitioner)."""
    if key not in _slots:
        status, body = kw.admin(f"/ownership/owner?topic=fixed.x&key={key}")
        assert status == 200, body
        _slots[key] = int(dict(f.split("=", 1) for f in body.split())["slot"])
    return _slots[key]


def key_per_slot(kw: Keyward) -> list[str]:
    """keys[s] is a key of slot s."""
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < SLOTS:
        key = f"k{i}"
        keys.setdefault(slot_of(kw, key), key)
        i += 1
    return [keys[s] for s in range(SLOTS)]


@dataclass
class Stream:
    """One client writing one topic in a background thread, until told to stop: produce calls one
    after another, each with a new producer, the first of `first` records and each later one of
    `chunk`. A test sizes `first` so that ONE producer is writing across the fault (and checks
    it: `first_running`), and stops the stream once the fault is over and writes went on after
    it; the stream ends with the call in progress. Records, owners and deliveries are those of
    the calls that finished, in order."""

    label: str
    client: Client
    topic: str
    keys: list[str] = field(repr=False)
    rule: str
    first: int
    chunk: int
    flush_every: int
    redirect: bool  # on_foreign: redirect (else reject)
    # Partitions a record of slot s goes to: s % partitions. With SLOTS // 2, every partition
    # carries an eu-owned slot and a us-owned one, alternately.
    partitions: int = SLOTS
    # The producers' settings, the bound on one produce call, and on the stream's writing.
    producer: dict = field(default_factory=lambda: dict(PRODUCER), repr=False)
    call_s: float = PRODUCE_CALL_S
    max_s: float = PRODUCE_CALL_S
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    records: list[dict] = field(default_factory=list, repr=False)
    owners: list[str] = field(default_factory=list, repr=False)  # per record: "eu", "us", or "flip"
    results: list[dict] = field(default_factory=list, repr=False)
    calls: int = 0  # produce calls finished
    error: BaseException | None = None
    seconds: float = 0.0
    thread: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def _more(self, count: int) -> tuple[list[dict], list[str]]:
        """The next `count` records, cycling through every slot, one unique value each."""
        records, owners = [], []
        for i in range(len(self.records), len(self.records) + count):
            slot = i % SLOTS
            records.append(
                record(self.keys[slot].encode(), f"{self.run}-{i}".encode(), partition=slot % self.partitions)
            )
            owners.append(owner_of(self.rule, slot))
        return records, owners

    def start(self, bootstrap: str) -> "Stream":
        def run() -> None:
            started = time.monotonic()
            try:
                size = self.first
                while True:
                    records, owners = self._more(size)
                    results = self.client.produce(
                        bootstrap, self.topic, records, self.producer, self.call_s, self.flush_every
                    )
                    assert len(results) == len(records), f"{len(results)} deliveries for {len(records)} records"
                    self.records += records
                    self.owners += owners
                    self.results += results
                    self.calls += 1
                    # Never past max_s of writing: a test that fails before stop() ends.
                    if self._stop.is_set() or time.monotonic() - started > self.max_s:
                        break
                    size = self.chunk
            except BaseException as e:  # noqa: BLE001 - reported by finish()
                self.error = e
            self.seconds = time.monotonic() - started

        self.thread = threading.Thread(target=run, name=self.label, daemon=True)
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def first_running(self) -> bool:
        """Whether the stream's first producer is still writing."""
        return self.running and self.calls == 0

    def stop(self) -> None:
        """Ends the stream with the produce call in progress."""
        self._stop.set()

    def finish(self) -> list[dict]:
        self.stop()
        assert self.thread is not None
        self.thread.join(self.call_s + 60)
        assert not self.thread.is_alive(), f"{self.label}: producer still running"
        if self.error is not None:
            raise AssertionError(f"{self.label}: the producer failed: {self.error}") from self.error
        assert self.calls >= 1 and len(self.results) == len(self.records) == len(self.owners)
        return self.results


def make_stream(
    label: str,
    client: Client,
    eu: KafkaCluster,
    us: KafkaCluster,
    keys: list[str],
    rule: str,
    first: int,
    chunk: int,
    flush_every: int,
    partitions: int = SLOTS,
) -> Stream:
    """A stream of records cycling through every slot, on a new topic of `rule` in both clusters
    (so a record in the cluster that does not own it would be found)."""
    topic = unique(f"{rule}.faults")
    for cluster in (eu, us):
        cluster.create_topic(topic, partitions=partitions)
    return Stream(
        label, client, topic, keys, rule, first, chunk, flush_every,
        redirect=rule in ("rflip", "rfixed"), partitions=partitions,
    )


# --------------------------------------------------------------------------- counting


@dataclass
class Tally:
    label: str
    sent: int
    acked: int
    rejected: int
    failed: int  # errors other than keyward's INVALID_RECORD: there must be none
    found: int  # acknowledged records found in their owner's cluster
    duplicates: int
    lost: int
    misplaced: int  # occurrences, outside refused records, in a cluster that never owned them
    out_of_order: int  # records found before an earlier-sent record of their key and partition
    rejected_present: int
    stray: int  # records in the topic that this stream did not write
    flipping: str  # how the records of flipping slots went
    failures: Counter
    seconds: float
    producers: int  # produce calls, each a new producer

    def line(self) -> str:
        text = (
            f"faults[{self.label}]: sent={self.sent} acked={self.acked} rejected={self.rejected} "
            f"failed={self.failed} found={self.found} duplicates={self.duplicates} lost={self.lost} "
            f"misplaced={self.misplaced} out_of_order={self.out_of_order} rejected_present={self.rejected_present}"
        )
        if self.stray:
            text += f" stray={self.stray}"
        if self.failures:
            text += f" failures={dict(self.failures)}"
        if self.flipping:
            text += f" flipping[{self.flipping}]"
        return text + f" producers={self.producers} seconds={self.seconds:.1f}"


def allowed(stream: Stream, owner: str) -> set[str]:
    """Where a record of this owner may be. keyward runs as region eu: with `reject` it writes
    only to eu (so a us-owned record nowhere); with `redirect` a record goes to the cluster of
    its owner at the time, so a flipping slot's record to either (but only one)."""
    if not stream.redirect:
        return {"eu"} if owner in ("eu", "flip") else set()
    return {"eu", "us"} if owner == "flip" else {owner}


def tally(stream: Stream, eu: KafkaCluster, us: KafkaCluster) -> Tally:
    """Counts one stream's outcome against both clusters, read directly."""
    results = stream.finish()
    values = [r["value"] for r in stream.records]
    read = {"eu": eu.read_all(stream.topic, timeout_s=60), "us": us.read_all(stream.topic, timeout_s=60)}
    found_in = {c: Counter(r["value"] for r in records) for c, records in read.items()}
    # Order per key: in each cluster and partition, in offset order, a key's records must come
    # in the order they were sent (the value's suffix). Kafka orders a partition only, and a
    # stream may write one key to several (the tenant streams of test_move.py do); read_all
    # sorts by (partition, offset).
    out_of_order = 0
    for c, records in read.items():
        last: dict[tuple[bytes, int], int] = {}
        for r in records:
            if not r["value"].startswith(f"{stream.run}-".encode()):
                continue
            i = int(r["value"].rsplit(b"-", 1)[1])
            where = (r["key"], r["partition"])
            out_of_order += i < last.get(where, -1)
            last[where] = i
    both = found_in["eu"] + found_in["us"]
    ours = set(values)
    acked = rejected = found = lost = misplaced = rejected_present = 0
    failures: Counter = Counter()
    flips: Counter = Counter()
    for value, owner, r in zip(values, stream.owners, results):
        ok = allowed(stream, owner)
        where = [c for c in ("eu", "us") if found_in[c][value]]
        if r["ok"]:
            acked += 1
            found += any(c in ok for c in where)
            lost += not any(c in ok for c in where)
        elif r["error_code"] == INVALID_RECORD:
            rejected += 1
            rejected_present += bool(where)
        else:
            failures[r["error_name"] or str(r["error_code"])] += 1
        if r["ok"] or r["error_code"] != INVALID_RECORD:
            misplaced += sum(found_in[c][value] for c in ("eu", "us") if c not in ok)
        if owner == "flip":
            flips["in_" + "+".join(where) if where else ("refused" if not r["ok"] else "acked_nowhere")] += 1
    return Tally(
        label=stream.label,
        sent=len(values),
        acked=acked,
        rejected=rejected,
        failed=sum(failures.values()),
        found=found,
        duplicates=sum(n - 1 for n in both.values() if n > 1),
        lost=lost,
        misplaced=misplaced,
        out_of_order=out_of_order,
        rejected_present=rejected_present,
        stray=sum(n for v, n in both.items() if v not in ours),
        flipping=" ".join(f"{k}={n}" for k, n in sorted(flips.items())),
        failures=failures,
        seconds=stream.seconds,
        producers=stream.calls,
    )


def check(stream: Stream, t: Tally) -> None:
    """The exact outcome: each record's fate is its owner's, and the clusters hold exactly the
    acknowledged records, once each."""
    results = stream.results
    assert results is not None
    by_owner: dict[str, Counter] = {o: Counter() for o in ("eu", "us", "flip")}
    for owner, r in zip(stream.owners, results):
        by_owner[owner]["acked" if r["ok"] else "refused"] += 1
    sent = Counter(stream.owners)
    summary = f"{t.line()}\nby owner: { {o: dict(c) for o, c in by_owner.items()} }"
    assert t.failed == 0, f"records failed other than by keyward's refusal\n{summary}"
    assert by_owner["eu"]["acked"] == sent["eu"], f"an eu-owned record was not acknowledged\n{summary}"
    if stream.redirect:
        assert t.acked == t.sent, f"a record was not redirected\n{summary}"
    else:
        assert by_owner["us"]["refused"] == sent["us"], f"a us-owned record was acknowledged\n{summary}"
    assert t.acked + t.rejected == t.sent, summary
    assert (t.found, t.lost, t.duplicates) == (t.acked, 0, 0), summary
    assert (t.misplaced, t.rejected_present, t.stray) == (0, 0, 0), summary
    assert t.out_of_order == 0, f"a key's records are out of the order they were sent in\n{summary}"


# --------------------------------------------------------------------------- keyward's resources


@dataclass
class Resources:
    rss_idle: int
    fds_idle: int
    rss_end: int = 0
    fds_end: int = 0

    @classmethod
    def idle(cls, kw: Keyward) -> "Resources":
        """Measured after start (listeners for every known broker are bound by then) and before
        any client connected."""
        return cls(kw.rss_bytes(), kw.open_fds())

    def back_to_idle(self, kw: Keyward) -> None:
        """Once every client is gone: fds back to the idle count, RSS within RSS_SLACK of idle."""
        wait_for(lambda: kw.metric("keyward_client_connections_open") == 0, 15, "client connections to close")
        try:
            wait_for(lambda: kw.open_fds() <= self.fds_idle + FD_SLACK, 10, "fds back to idle")
            wait_for(lambda: kw.rss_bytes() <= self.rss_idle + RSS_SLACK, 10, "RSS back to idle")
        finally:
            self.fds_end, self.rss_end = kw.open_fds(), kw.rss_bytes()

    def line(self, label: str) -> str:
        mib = 1024 * 1024
        return (
            f"faults[{label}/keyward]: rss_idle={self.rss_idle / mib:.1f}MiB rss_end={self.rss_end / mib:.1f}MiB "
            f"fds_idle={self.fds_idle} fds_end={self.fds_end}"
        )


@pytest.fixture
def report(tmp_path, tmp_path_factory, summary):
    """report(line): print it, keep it in the test's and the session's fault-figures.txt, and
    show it in the terminal summary (whether or not pytest captures output)."""
    files = [tmp_path / "fault-figures.txt", tmp_path_factory.getbasetemp() / "fault-figures.txt"]

    def add(line: str) -> None:
        print(line)
        for f in files:
            with open(f, "a") as out:
                out.write(line + "\n")
        summary("fault suite figures", line)

    return add


# --------------------------------------------------------------------------- helpers


def forwarded(kw: Keyward) -> int:
    """Records this keyward process forwarded, retries of the same record included."""
    return int(kw.metric("keyward_produce_records_total", decision="forwarded"))


class Progress:
    """How far each stream got: the records its topic holds in eu (high watermarks, read from
    the cluster directly), so a fault is injected only once every client is writing."""

    def __init__(self, cluster: KafkaCluster, streams: list[Stream]) -> None:
        self.cluster = cluster
        self.streams = streams
        self.admin = cluster.admin()

    def written(self) -> list[int] | None:
        out = []
        for s in self.streams:
            futures = self.admin.list_offsets(
                {TopicPartition(s.topic, p): OffsetSpec.latest() for p in range(s.partitions)}, request_timeout=5
            )
            try:
                offsets = [f.result().offset for f in futures.values()]
            except KafkaException:
                offsets = [-1]
            if min(offsets) < 0:
                # A leader is moving. An admin client kept across a broker's death may go on
                # asking the dead leader (answering -1): ask again with a new one.
                self.admin = self.cluster.admin()
                return None
            out.append(sum(offsets))
        return out

    def wait_each(self, more_than: list[int] | int, timeout_s: float = 60, first: bool = True) -> list[int]:
        """Waits until every stream has written more than `more_than` (one count for all, or
        one per stream); returns the counts, and checks that every stream is still writing and,
        with `first`, still with its first producer (the one that has been writing across the
        fault)."""
        floor = more_than if isinstance(more_than, list) else [more_than] * len(self.streams)
        def enough() -> list[int] | None:
            failed = [f"{s.label}: {s.error}" for s in self.streams if s.error is not None]
            assert not failed, f"a producer failed: {failed}"
            w = self.written()
            return w if w is not None and all(a > b for a, b in zip(w, floor)) else None

        got = wait_for(
            enough,
            timeout_s,
            f"every stream to write more than {floor}",
        )
        finished = [s.label for s in self.streams if not (s.first_running if first else s.running)]
        what = "their first producer finished" if first else "stopped writing"
        assert not finished, f"{finished}: {what} before the fault was over: nothing would be tested"
        return got


def refused(port: int) -> bool:
    """Whether nothing listens on the port any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def start_keyward(tmp_path: Path, eu, us, extra_config: str = "") -> Keyward:
    return Keyward(tmp_path, "eu", {"eu": eu, "us": us}, table(), extra_config=extra_config).start()


@contextmanager
def restored(cluster: KafkaCluster):
    """Whatever happens inside, every node of the (shared) cluster is up, ready and in sync
    afterwards."""
    try:
        yield
    finally:
        for node in cluster.nodes:
            if not node.running:
                cluster.start_node(node.node_id, timeout_s=90)
        cluster.wait_ready(60)
        cluster.wait_in_sync(60)


def finish_all(streams: list[Stream], eu, us, report) -> list[Tally]:
    for s in streams:
        s.stop()
    tallies = [tally(s, eu, us) for s in streams]
    for t in tallies:
        report(t.line())
    return tallies


# --------------------------------------------------------------------------- the faults


def test_a_broker_restart(tmp_path, eu, us, report):
    """An eu broker leading partitions is SIGKILLed while three clients write, the producers go
    on with the two others (acks=all, min ISR 2), and it is restarted and back in sync while
    they still write: every acknowledged record is in eu once, however the retries went. Each
    client's first producer writes across the kill (its requests in flight then are retried);
    the streams stop once the broker is back in sync and each has written 100 more records."""
    kw = start_keyward(tmp_path, eu, us)
    try:
        keys = key_per_slot(kw)
        idle = Resources.idle(kw)
        streams = [
            make_stream("broker-restart/java", JavaClient(), eu, us, keys, "fixed", BROKER_FIRST, CHUNK, 1),
            make_stream("broker-restart/librdkafka", LibrdkafkaClient(), eu, us, keys, "fixed", BROKER_FIRST, CHUNK, 1),
            make_stream("broker-restart/franz", FranzClient(), eu, us, keys, "fixed", BROKER_FIRST, CHUNK, 1),
        ]
        victim = eu.partitions(streams[0].topic)[0]["leader"]
        progress = Progress(eu, streams)
        with restored(eu):
            for s in streams:
                s.start(kw.bootstrap)
            at_kill = progress.wait_each(100)
            killed_at = time.monotonic()
            eu.stop_node(victim, kill=True)
            # Writes go on without it. The first producers were running at the kill (checked
            # above), so their records queued then went through it; once a new leader is
            # elected they may flush all of them at once and finish before 100 more are
            # counted, so this wait does not require them to be running still.
            after_kill = progress.wait_each([n + 100 for n in at_kill], first=False)
            restart_at = time.monotonic()
            eu.start_node(victim, timeout_s=90)  # waits until it serves and every ISR is full
            back_at = time.monotonic()
            # Back and in sync while writes go on: every stream writes 100 more after that.
            at_back = wait_for(progress.written, 30, "the stream counts")
            first_when_back = sum(s.first_running for s in streams)
            after_back = progress.wait_each([n + 100 for n in at_back], first=False)
            tallies = finish_all(streams, eu, us, report)
        idle.back_to_idle(kw)
        acked = sum(t.acked for t in tallies)
        report(
            f"faults[broker-restart/keyward]: killed=node{victim} written_at_kill={at_kill} "
            f"written_after_kill={after_kill} written_when_back={at_back} written_after_back={after_back} "
            f"down={restart_at - killed_at:.1f}s restart_to_in_sync={back_at - restart_at:.1f}s "
            f"first_producer_still_writing_when_back={first_when_back} forwarded={forwarded(kw)} acked={acked} "
            f"(forwarded again after the kill and deduplicated by the broker: {forwarded(kw) - acked})"
        )
        report(idle.line("broker-restart"))
        for s, t in zip(streams, tallies):
            check(s, t)
    finally:
        kw.stop()


def test_keyward_sigkill_and_sigterm(tmp_path, eu, us, report):
    """keyward is SIGKILLed under load and restarted on the same ports (the clients reconnect by
    themselves), then stopped with SIGTERM: it stops accepting, answers what is in flight (a
    Fetch the broker holds is still answered), exits 0 within its grace period, and is
    restarted. Idempotence makes the clients' retries of writes whose answers were lost
    harmless: no duplicate, nothing lost. Each client's first producer writes across both stops
    (at least 100 of its records are left when keyward exits after SIGTERM); the streams stop
    once each has written 100 more through the last process."""
    grace_s = 5
    kw = start_keyward(tmp_path, eu, us, extra_config=f"limits: {{ shutdown_grace_secs: {grace_s} }}\n")
    try:
        keys = key_per_slot(kw)
        streams = [
            make_stream("keyward-restarts/java", JavaClient(), eu, us, keys, "fixed", FIRST, CHUNK, 1),
            make_stream("keyward-restarts/librdkafka", LibrdkafkaClient(), eu, us, keys, "fixed", FIRST, CHUNK, 1),
            make_stream("keyward-restarts/franz", FranzClient(), eu, us, keys, "fixed", FIRST, CHUNK, 1),
        ]
        progress = Progress(eu, streams)
        for s in streams:
            s.start(kw.bootstrap)
        at_kill = progress.wait_each(100)
        kw.kill()
        kw.start()
        at_term = progress.wait_each([n + 100 for n in at_kill])  # written through the new process

        # A Fetch the broker holds for 2 s (its topic is empty) is in flight when SIGTERM comes.
        empty = unique("fixed.held")
        eu.create_topic(empty, partitions=1)
        leader = eu.partitions(empty)[0]["leader"]
        with socket.create_connection(("127.0.0.1", kw.port_base + leader), timeout=10) as held:
            held.sendall(_fetch_v4(77, empty, max_wait_ms=2000))
            # The producers send no Fetch: this one has reached keyward, which forwards at once.
            wait_for(lambda: kw.metric("keyward_requests_total", api="Fetch") >= 1, 5, "the Fetch to arrive")
            sent_term = time.monotonic()
            kw.proc.send_signal(signal.SIGTERM)
            # It stops accepting at once, on every listener. Each closes in its own task, so the
            # broker port may close a moment after the bootstrap one.
            wait_for(lambda: refused(kw.bootstrap_port), 1.5, "the bootstrap listener to close")
            wait_for(lambda: refused(kw.port_base + leader), 1.5, "the broker listener to close")
            # ...answers the held Fetch when the broker does, then closes and exits.
            assert struct.unpack(">i", raw.recv_frame(held)[:4])[0] == 77
            answered = time.monotonic() - sent_term
            assert _closed(held, 5)
        code = kw.proc.wait(grace_s + 10)
        took = time.monotonic() - sent_term
        assert code == 0, kw.logs(40)
        assert took < grace_s, f"exit took {took:.1f}s"
        logs = kw.log_path.read_text()
        assert "shutting down: no new connections; answering what is in flight" in logs
        assert "connections still open after the grace period" not in logs
        # keyward is down: what each stream has written now is final until the restart. Every
        # first producer must have at least 100 eu-owned records left, which it can only write
        # by reconnecting to the new process (all eu-owned records must be acknowledged).
        at_exit = wait_for(progress.written, 30, "the stream counts")
        left = [FIRST // 2 - n for n in at_exit]
        short = [s.label for s, n in zip(streams, left) if not s.first_running or n < 100]
        assert not short, f"{short}: the first producer was done or nearly so at SIGTERM ({left} left)"
        kw.start()
        after = progress.wait_each([n + 100 for n in at_exit], first=False)  # then the streams stop
        tallies = finish_all(streams, eu, us, report)
        report(
            f"faults[keyward-restarts/keyward]: written_at_sigkill={at_kill} written_at_sigterm={at_term} "
            f"written_at_exit={at_exit} written_after_restart={after} "
            f"sigterm: held_fetch_answered_after={answered:.2f}s exit={code} exit_after={took:.2f}s "
            f"grace={grace_s}s"
        )
        for s, t in zip(streams, tallies):
            check(s, t)
        assert "panicked" not in kw.log_path.read_text()
    finally:
        kw.stop()


def mixed_redirect_streams(label: str, eu, us, keys: list[str]) -> list[Stream]:
    """Java, librdkafka and franz-go streams of the redirect rule `rfixed` on topics of 8
    partitions: every partition carries an eu-owned slot and a us-owned one in turn."""
    clients = {"java": JavaClient(), "librdkafka": LibrdkafkaClient(), "franz": FranzClient()}
    return [
        make_stream(f"{label}/{name}", client, eu, us, keys, "rfixed", FIRST, CHUNK, 16, SLOTS // 2)
        for name, client in clients.items()
    ]


def test_keyward_sigkill_under_redirect_with_the_stream_journal(tmp_path, eu, us, report):
    """Redirect with the stream journal on (`redirect: { journal: true }`), through two
    SIGKILLs of keyward and its restarts on the same ports. Every partition of every stream
    carries an eu-owned slot and a us-owned one in turn, so each idempotent producer's
    partition is a stream whose batches alternate between the local cluster (renumbered around
    what went to us) and us's cluster (under keyward's producer id there). A new process knows
    nothing of them but what the journal on eu's cluster holds; the clients resend what was in
    flight at the kill, and go on. No error may reach a producer, and every record must be in
    its owner's cluster exactly once. Without the journal, the new process sends a resent
    redirected batch under a new producer id (a duplicate in us) and numbers the next local
    batch as the client did (refused as out of order)."""
    kw = start_keyward(tmp_path, eu, us, extra_config="redirect: { journal: true }\n")
    try:
        streams = mixed_redirect_streams("redirect-restarts", eu, us, key_per_slot(kw))
        progress = Progress(eu, streams)
        for s in streams:
            s.start(kw.bootstrap)
        written = [progress.wait_each(100)]
        for _ in range(2):
            kw.kill()
            kw.start()
            written.append(progress.wait_each([n + 100 for n in written[-1]], first=False))
        tallies = finish_all(streams, eu, us, report)
        redirected = kw.metric("keyward_produce_records_total", rule="rfixed", decision="redirected", owner="us")
        report(
            f"faults[redirect-restarts/keyward]: written_in_eu_at_each_kill_and_after={written} "
            f"redirected_by_the_last_process={redirected:.0f}"
        )
        for s, t in zip(streams, tallies):
            check(s, t)
        # The last process redirected, and carried streams on from the journal.
        assert redirected > 0
        assert "stream carried on from the journal" in kw.log_path.read_text()
        assert "panicked" not in kw.log_path.read_text()
    finally:
        kw.stop()


def start_haproxy(workdir: Path, ports: list[int], backends: list[str]) -> subprocess.Popen:
    """haproxy on 127.0.0.1, one TCP proxy per port, round robin over `backends` (addresses
    listening on the same ports), each health-checked every 300 ms; a connection to a backend
    that fails is sent to another (redispatch)."""
    cfg = workdir / "haproxy.cfg"
    sections = "".join(
        f"listen p{port}\n    bind 127.0.0.1:{port}\n    balance roundrobin\n"
        + "".join(f"    server s{i} {host}:{port} check inter 300 fall 1 rise 1\n" for i, host in enumerate(backends))
        for port in ports
    )
    cfg.write_text(
        "global\n    maxconn 4096\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10m\n    timeout server 10m\n"
        "    retries 3\n    option redispatch\n" + sections
    )
    log = open(workdir / "haproxy.log", "ab")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log)
    wait_for(lambda: not refused(ports[0]), 10, "haproxy to listen")
    return proc


def test_two_instances_behind_haproxy_under_redirect(tmp_path, eu, us, report):
    """Two keyward instances of region eu behind haproxy (round robin, health-checked), both
    redirecting with the stream journal on, as a region deploys them: the clients bootstrap
    through haproxy, and each of their connections lands on either instance. Under load (every
    partition alternating eu- and us-owned records, as in the test above), instance a is
    SIGKILLed, so its producers' connections come back through haproxy to b, which carries
    their streams on from the journal; a comes back; then a and b are restarted in turn with
    SIGTERM (a rolling restart). No error may reach a producer, and every record must be in its
    owner's cluster exactly once, each key's records in the order they were sent."""
    extra = "redirect: { journal: true }\nlimits: { shutdown_grace_secs: 5 }\n"
    clusters = {"eu": eu, "us": us}
    a = Keyward(tmp_path, "eu", clusters, table(), name="keyward-a", extra_config=extra, bind_host="127.0.0.2")
    b = Keyward(
        tmp_path, "eu", clusters, table(), name="keyward-b", extra_config=extra, bind_host="127.0.0.3", share_ports_of=a
    )
    lb = None
    try:
        a.start()
        b.start()
        lb = start_haproxy(tmp_path, [a.bootstrap_port, *sorted(a.virtual_ports())], ["127.0.0.2", "127.0.0.3"])
        streams = mixed_redirect_streams("two-instances", eu, us, key_per_slot(a))
        progress = Progress(eu, streams)
        for s in streams:
            s.start(a.bootstrap)  # haproxy's address: 127.0.0.1, the ports both instances use
        written = [progress.wait_each(100)]
        a.kill()
        written.append(progress.wait_each([n + 100 for n in written[-1]], first=False))
        took_over = b.log_path.read_text().count("stream carried on from the journal")
        a.start()
        written.append(progress.wait_each([n + 100 for n in written[-1]], first=False))
        for kw in (a, b):
            kw.stop()
            kw.start()
            written.append(progress.wait_each([n + 100 for n in written[-1]], first=False))
        tallies = finish_all(streams, eu, us, report)
        report(
            f"faults[two-instances/keyward]: written_in_eu_at_each_step={written} "
            f"(start, a killed, a back, a restarted, b restarted) "
            f"streams_b_carried_on_after_the_kill={took_over}"
        )
        for s, t in zip(streams, tallies):
            check(s, t)
        assert took_over > 0, "b carried no stream on from a: the kill tested nothing"
        for kw in (a, b):
            assert "panicked" not in kw.log_path.read_text()
    finally:
        for kw in (a, b):
            if kw.proc is not None and kw.proc.poll() is None:
                kw.stop()
        if lb is not None:
            lb.terminate()
            lb.wait(10)


def journal_refuses(cluster: KafkaCluster, topic: str, refuse: bool) -> None:
    """Makes every stream journal save to `topic` too large for the cluster (max.message.bytes
    of 64), or lifts that again, and waits until the cluster reports the setting."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    op = AlterConfigOpType.SET if refuse else AlterConfigOpType.DELETE
    entry = ConfigEntry("max.message.bytes", "64", incremental_operation=op)
    admin = cluster.admin()
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    for f in admin.incremental_alter_configs([resource]).values():
        f.result(timeout=30)

    def reported() -> bool:
        configs = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
        value = next(iter(configs.values())).result(timeout=10)["max.message.bytes"].value
        return (value == "64") == refuse

    wait_for(reported, 30, f"max.message.bytes of {topic} to be {'set' if refuse else 'lifted'}")
    time.sleep(1)  # every broker, not only the one that answered


def test_an_answer_waits_for_the_stream_journal(tmp_path, eu, us, report):
    """A redirected batch is acknowledged only once the stream journal has the save that goes
    with it (README, "Instances and restarts"). A raw idempotent producer writes us-owned
    records through eu's keyward, which redirects them; then the journal topic is made to refuse
    every save (its max.message.bytes set to 64 bytes):
    - the stream's next batch goes to us while its save is refused, and its client gets no
      answer: the connection closes. Sent again on a new connection once the journal takes
      saves, the batch is numbered as it was first sent (keyward carries the stream on from its
      last save), so us's broker recognises it: it is in us once;
    - a new producer's first batch needs a new producer id of keyward's on us, which no later
      instance could give it again: it is not sent at all before its save lands, and is in
      neither cluster.
    Were the answer not held for the save, the first would be acknowledged with the journal
    refusing; were the save not first for a new producer id, the second would be in us."""
    journal = unique("_keyward_refusal")
    kw = start_keyward(tmp_path, eu, us, extra_config=f"redirect: {{ journal: true, journal_topic: {journal} }}\n")
    try:
        keys = key_per_slot(kw)
        us_keys = [keys[8].encode(), keys[9].encode()]  # slots owned by us
        topic = unique("rfixed.journal")
        for cluster in (eu, us):
            cluster.create_topic(topic, partitions=1)
        host, port = kw.bootstrap.rsplit(":", 1)
        ids = iter(range(1, 1000))

        def connect() -> socket.socket:
            return socket.create_connection((host, int(port)), timeout=30)

        def new_producer(sock: socket.socket) -> tuple[int, int]:
            for _ in range(100):
                sock.sendall(raw.init_producer_id(next(ids)))
                frame = raw.recv_frame(sock)
                # COORDINATOR_LOAD_IN_PROGRESS while a fresh cluster sets its producer ids up.
                if struct.unpack_from(">h", frame, 8)[0] != 14:
                    return raw.producer_id(frame)
                time.sleep(0.2)
            raise AssertionError("no producer id")

        def send(sock: socket.socket, producer: tuple[int, int], seq: int, tag: str) -> dict:
            batch = raw.record_batch(
                [(k, f"{tag}-{i}".encode()) for i, k in enumerate(us_keys)], producer=producer, base_sequence=seq
            )
            sock.sendall(raw.produce(next(ids), topic, {0: batch}, version=7))
            return raw.produce_errors(raw.recv_frame(sock))

        def values(cluster: KafkaCluster) -> list[bytes]:
            return [r["value"] for r in cluster.read_all(topic, timeout_s=30)]

        first = connect()
        producer = new_producer(first)
        # Retried as a producer retries: a cluster that has just started may not give keyward a
        # producer id at once (a batch of a journalled stream is never sent without one).
        for tries in range(50):
            if send(first, producer, 0, "a") == {(topic, 0): 0}:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the first batch was never acknowledged")
        wait_for(lambda: kw.metric("keyward_produce_records_total", rule="rfixed", decision="redirected") >= 2, 10, "the redirect")

        journal_refuses(eu, journal, True)
        closed_before = kw.metric("keyward_client_connections_closed_total", cause="journal_unavailable")
        with pytest.raises(ConnectionError):
            send(first, producer, 2, "b")
        first.close()
        # Sent meanwhile, not acknowledged.
        deadline = time.monotonic() + 15
        while b"b-0" not in values(us):
            assert time.monotonic() < deadline, "the unacknowledged batch never landed in us"
            time.sleep(0.5)

        second = connect()
        other = new_producer(second)
        with pytest.raises(ConnectionError):
            send(second, other, 0, "c")
        second.close()
        closed = kw.metric("keyward_client_connections_closed_total", cause="journal_unavailable") - closed_before

        journal_refuses(eu, journal, False)
        third = connect()
        assert send(third, producer, 2, "b") == {(topic, 0): 0}, "the batch sent again"
        assert send(third, producer, 4, "d") == {(topic, 0): 0}
        assert send(third, other, 0, "c") == {(topic, 0): 0}, "the new producer, once the journal takes saves"
        third.close()

        in_us, in_eu = values(us), values(eu)
        report(
            f"faults[journal-refusal]: closed_unanswered={closed:.0f} in_us={[v.decode() for v in in_us]} "
            f"in_eu={len(in_eu)}"
        )
        assert closed == 2
        assert in_eu == []
        # Saved first: a, and c twice (refused, then saved). With the sending: b refused, b
        # again, d, and any try at a that had no producer id on us yet.
        assert kw.metric("keyward_journal_requests_total", save="before_sending") == 3
        assert kw.metric("keyward_journal_requests_total", save="with_sending") == 3 + tries
        saves, batches = kw.metric("keyward_journal_saves_total"), kw.metric("keyward_journal_batches_total")
        assert saves == 6 + tries and 1 <= batches <= saves
        assert kw.metric("keyward_journal_save_seconds_count") == saves
        # Every batch once, in the order sent; "c" only from its last attempt, after "d".
        assert in_us == [b"a-0", b"a-1", b"b-0", b"b-1", b"d-0", b"d-1", b"c-0", b"c-1"]
        assert "the stream journal refused a save" in kw.log_path.read_text()
        assert "panicked" not in kw.log_path.read_text()
    finally:
        kw.stop()


class Flipper:
    """Rewrites the table (a new file renamed over the old) and reloads it (POST /reload) every
    100 ms, alternating table(flipped=True) and table(), until stopped."""

    def __init__(self, kw: Keyward) -> None:
        self.kw = kw
        self.flips = 0
        self.answers: Counter = Counter()
        self.version0 = kw.ownership()["version"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flipper", daemon=True)

    def _run(self) -> None:
        tmp = self.kw.dir / ".ownership.yaml.new"
        while not self._stop.is_set():
            started = time.monotonic()
            tmp.write_text(table(flipped=self.flips % 2 == 0))
            tmp.rename(self.kw.table_path)
            self.flips += 1
            status, body = self.kw.admin("/reload", "POST")
            self.answers[f"{status} {json.loads(body).get('result')}"] += 1
            self._stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

    def __enter__(self) -> "Flipper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def check(self, report, label: str) -> None:
        """Every rewrite was a change and was loaded exactly once: by the API call, or by the
        file watcher first (the API then finds it unchanged)."""
        wait_for(
            lambda: self.kw.ownership()["version"] == self.version0 + self.flips, 5, "the last flip to be in force"
        )
        report(
            f"faults[{label}/keyward]: flips={self.flips} table_version={self.kw.ownership()['version']} "
            f"reload_answers={dict(self.answers)}"
        )
        assert set(self.answers) <= {"200 loaded", "200 unchanged"}, self.answers
        assert self.flips >= MIN_FLIPS, f"only {self.flips} flips"


def _write_while_flipping(kw, streams, eu, us, report, label: str, idle: "Resources") -> list:
    """Runs `streams` while the table flips every 100 ms, until MIN_FLIPS flips are done with
    every stream still writing, and each stream to the end of its produce call in progress; then checks every stream's outcome exactly, the flips, and keyward's resources
    back at idle."""
    with Flipper(kw) as flipper:
        for s in streams:
            s.start(kw.bootstrap)
        wait_for(lambda: flipper.flips >= MIN_FLIPS, 60, f"{MIN_FLIPS} flips")
        early = [f"{s.label}: {s.error}" for s in streams if not s.running]
        assert not early, f"a stream stopped within {flipper.flips} flips: {early}"
        for s in streams:
            s.stop()
        for s in streams:
            s.finish()
    tallies = finish_all(streams, eu, us, report)
    flipper.check(report, label)
    idle.back_to_idle(kw)
    report(idle.line(label))
    for s, t in zip(streams, tallies):
        check(s, t)
    return tallies


def test_ownership_flips_every_100ms(tmp_path, eu, us, report):
    """The table flips slots 4-7 and 12-15 between eu and us every 100 ms while three clients
    write the flipping rule (`on_foreign: reject`) and one writes a rule that never changes.
    Each request is decided against one table: a flipping record is either acknowledged and in
    eu once, or refused and nowhere; slots that keep their owner are unaffected."""
    kw = start_keyward(tmp_path, eu, us)
    try:
        keys = key_per_slot(kw)
        idle = Resources.idle(kw)
        streams = [
            make_stream("reload-flips/java", JavaClient(), eu, us, keys, "flip", FLIP_FIRST, FLIP_FIRST, 8),
            make_stream("reload-flips/librdkafka", LibrdkafkaClient(), eu, us, keys, "flip", FLIP_FIRST, FLIP_FIRST, 4),
            make_stream("reload-flips/franz", FranzClient(), eu, us, keys, "flip", FLIP_FIRST, FLIP_FIRST, 8),
            make_stream("reload-flips/fixed-librdkafka", LibrdkafkaClient(), eu, us, keys, "fixed", FLIP_FIRST, FLIP_FIRST, 4),
        ]
        _write_while_flipping(kw, streams, eu, us, report, "reload-flips", idle)
        for s in streams[:3]:
            flipping = [r["ok"] for o, r in zip(s.owners, s.results) if o == "flip"]
            assert any(flipping) and not all(flipping), f"{s.label}: the flips decided nothing"
    finally:
        kw.stop()


def test_redirect_under_ownership_flips(tmp_path, eu, us, report):
    """The same flips with `on_foreign: redirect`: every record is acknowledged and lands once,
    in the cluster that owned it when keyward decided (slots 0-3 in eu, 8-11 in us, the
    flipping ones in one of the two). keyward renumbers the clients' local batches around the
    redirected ones, and the partitions switch between local and redirected every 100 ms."""
    kw = start_keyward(tmp_path, eu, us)
    try:
        keys = key_per_slot(kw)
        idle = Resources.idle(kw)
        streams = [
            make_stream("redirect-flips/java", JavaClient(), eu, us, keys, "rflip", FLIP_FIRST, FLIP_FIRST, 8),
            make_stream("redirect-flips/librdkafka", LibrdkafkaClient(), eu, us, keys, "rflip", FLIP_FIRST, FLIP_FIRST, 4),
            make_stream("redirect-flips/franz", FranzClient(), eu, us, keys, "rflip", FLIP_FIRST, FLIP_FIRST, 8),
        ]
        tallies = _write_while_flipping(kw, streams, eu, us, report, "redirect-flips", idle)
        for s, t in zip(streams, tallies):
            assert "in_eu=" in t.flipping and "in_us=" in t.flipping, f"{s.label}: the flips decided nothing"
    finally:
        kw.stop()


def _fleet(tmp_path: Path, instances: dict[str, list[Keyward]], token: str) -> Path:
    (tmp_path / "admin-token").write_text(token + "\n")
    regions = "\n".join(
        f"  {region}: [{', '.join(repr(f'http://127.0.0.1:{k.admin_port}') for k in kws)}]"
        for region, kws in instances.items()
    )
    path = tmp_path / "fleet.yaml"
    path.write_text(f"regions:\n{regions}\ntoken_file: admin-token\n")
    return path


def keyward_move(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    from harness.keyward import binary

    return subprocess.run(
        [str(binary()), "move", *args], capture_output=True, text=True, timeout=timeout_s
    )


def test_a_move_under_load(tmp_path, eu, us, report):
    """`keyward move run` moves slots 4-7 of the redirecting rule from eu to us across a fleet
    of three instances (two for eu, one for us) while three clients write through the two eu
    instances. The command confirms that every instance serves the frozen table before it
    flips; the moving slots' writes are held (retriable) meanwhile; every record is acknowledged and lands
    once, in eu before the flip and in us after it, and no key of a moving slot has a record in
    eu written after one of its records in us. The instances keep the moved table as their file."""
    token = "move-" + uuid.uuid4().hex
    admin = f"reload_token_file: {tmp_path / 'admin-token'}"
    (tmp_path / "admin-token").write_text(token + "\n")
    kws = [
        Keyward(tmp_path, region, {"eu": eu, "us": us}, table(), name=name, admin_extra=admin).start()
        for region, name in (("eu", "kw-eu-1"), ("eu", "kw-eu-2"), ("us", "kw-us"))
    ]
    try:
        fleet = _fleet(tmp_path, {"eu": kws[:2], "us": kws[2:]}, token)
        move = ["--fleet", str(fleet), "--rule", "rflip", "--slots", "4-7", "--to", "us"]
        planned = keyward_move("plan", *move)
        assert planned.returncode == 0, planned.stderr
        assert "move: rule rflip, slots 4-7, from eu to us" in planned.stdout, planned.stdout
        assert "1. freeze:" in planned.stdout and "3. flip:" in planned.stdout, planned.stdout

        keys = key_per_slot(kws[0])
        streams = [
            make_stream("move/java", JavaClient(), eu, us, keys, "rflip", FLIP_FIRST, FLIP_FIRST, 8),
            make_stream("move/librdkafka", LibrdkafkaClient(), eu, us, keys, "rflip", FLIP_FIRST, FLIP_FIRST, 4),
            make_stream("move/franz", FranzClient(), eu, us, keys, "rflip", FLIP_FIRST, FLIP_FIRST, 8),
        ]
        for s, kw in zip(streams, (kws[0], kws[1], kws[0])):
            s.start(kw.bootstrap)
        progress = Progress(eu, streams)
        # Every stream writing (with whichever of its producers) when the move starts.
        progress.wait_each(50, first=False)
        journal = tmp_path / "move.json"
        started = time.monotonic()
        moved = keyward_move("run", *move, "--journal", str(journal), "--no-replication-gate")
        took = time.monotonic() - started
        assert moved.returncode == 0, moved.stdout + moved.stderr
        frozen_everywhere = moved.stdout.index("every instance serves ")
        assert frozen_everywhere < moved.stdout.index("3. flipping"), moved.stdout
        # Writes go on after the move, through the moved table.
        at_move = wait_for(progress.written, 30, "the stream counts")
        progress.wait_each([n + 50 for n in at_move], first=False)
        tallies = finish_all(streams, eu, us, report)

        steps = json.loads(journal.read_text())
        assert steps["step"] == "moved", steps
        hashes = {kw.ownership()["hash"] for kw in kws}
        assert hashes == {steps["moved"]["hash"]}, hashes
        for kw in kws:
            assert kw.table_path.read_text() == steps["moved"]["text"], f"{kw.dir}: the move is not in its file"
        held = sum(kw.metric("keyward_produce_records_total", decision="held", reason="frozen") for kw in kws)
        report(
            f"faults[move/keyward]: instances=3 moved_in={took:.1f}s held_records={int(held)} "
            f"hashes={steps['original']['hash'][:12]}->{steps['frozen']['hash'][:12]}->{steps['moved']['hash'][:12]}"
        )
        for s, t in zip(streams, tallies):
            check(s, t)
            # Per key of a moving slot: every record in eu was written before every one in us.
            in_eu = {r["value"] for r in eu.read_all(s.topic, timeout_s=60)}
            for slot in range(4, 8):
                where = [
                    ("eu" if rec["value"] in in_eu else "us")
                    for i, rec in enumerate(s.records)
                    if i % SLOTS == slot
                ]
                assert "eu" in where and "us" in where, f"{s.label}: slot {slot} was not written on both sides: {where}"
                first_us = where.index("us")
                assert "eu" not in where[first_us:], f"{s.label}: slot {slot} written in eu after us: {where}"
    finally:
        for kw in kws:
            kw.stop()


def test_slow_consumer_and_stalled_clients(tmp_path, eu, us, report):
    """While two clients write: a consumer reads one of their topics through keyward with tiny
    fetches and pauses, and raw clients each send half of a 1 MiB frame and stall. The stalled
    connections are closed by the idle timeout (so are the real clients' idle ones, which they
    reopen), the writers' outcomes are exact, the consumer reads exactly the acknowledged
    records, and keyward's memory and descriptors come back to idle."""
    idle_timeout_s = 3
    kw = start_keyward(tmp_path, eu, us, extra_config=f"limits: {{ idle_timeout_secs: {idle_timeout_s} }}\n")
    try:
        keys = key_per_slot(kw)
        idle = Resources.idle(kw)
        streams = [
            make_stream("slow-and-stalled/franz", FranzClient(), eu, us, keys, "fixed", SLOW_FIRST, CHUNK, 1),
            make_stream("slow-and-stalled/librdkafka", LibrdkafkaClient(), eu, us, keys, "fixed", SLOW_FIRST, CHUNK, 1),
        ]
        read_topic = streams[0].topic
        consumed: dict[tuple[int, int], bytes] = {}
        consumer_seconds: list[float] = []
        consumer_done = threading.Event()
        want: list[int] = []  # set once the producers are done: how many records to read

        def slow_consumer() -> None:
            c = Consumer(
                {
                    "bootstrap.servers": kw.bootstrap,
                    "group.id": unique("slow"),
                    "enable.auto.commit": False,
                    # One small fetch after another, and hardly anything buffered ahead.
                    "fetch.max.bytes": 1000,
                    "message.max.bytes": 1000,
                    "max.partition.fetch.bytes": 100,
                    "queued.max.messages.kbytes": 1,
                    "fetch.wait.max.ms": 100,
                }
            )
            started = time.monotonic()
            try:
                c.assign([TopicPartition(read_topic, p, OFFSET_BEGINNING) for p in range(SLOTS)])
                deadline = time.monotonic() + PRODUCE_CALL_S
                polls = 0
                while time.monotonic() < deadline and not (want and len(consumed) >= want[0]):
                    msg = c.poll(0.2)
                    if msg is None or msg.error():
                        continue
                    consumed[(msg.partition(), msg.offset())] = msg.value()
                    polls += 1
                    if polls % 200 == 0:
                        time.sleep(1)  # a pause, shorter than the idle timeout
            finally:
                c.close()
                consumer_seconds.append(time.monotonic() - started)
                consumer_done.set()

        reader = threading.Thread(target=slow_consumer, name="slow-consumer", daemon=True)
        for s in streams:
            s.start(kw.bootstrap)
        reader.start()
        progress = Progress(eu, streams)
        progress.wait_each(100)

        # Half of a 1 MiB produce frame, on the bootstrap and on a virtual broker port.
        idle_before = kw.metric("keyward_client_connections_closed_total", cause="idle")
        body = 1 << 20
        half = struct.pack(">i", body) + struct.pack(">hhi", 0, 9, 1) + b"\x00" * (body // 2)
        stalled = []
        for port in (kw.bootstrap_port, kw.port_base + eu.nodes[0].node_id, kw.bootstrap_port):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(half)
            stalled.append(conn)
        sent_at = time.monotonic()
        for conn in stalled:
            assert _closed(conn, idle_timeout_s + 5), "a stalled connection stayed open"
        closed_after = time.monotonic() - sent_at
        for conn in stalled:
            conn.close()
        assert idle_timeout_s - 0.5 <= closed_after < idle_timeout_s + 3, closed_after
        wait_for(
            lambda: kw.metric("keyward_client_connections_closed_total", cause="idle") >= idle_before + 3,
            5,
            "the stalled connections to be counted as idle",
        )
        # The writes went on: 100 more each, then the streams stop.
        progress.wait_each([n + 100 for n in wait_for(progress.written, 30, "the stream counts")], first=False)
        tallies = finish_all(streams, eu, us, report)
        acked_values = {r["value"] for r, d in zip(streams[0].records, streams[0].results) if d["ok"]}
        want.append(len(acked_values))
        assert consumer_done.wait(PRODUCE_CALL_S), "the slow consumer never finished"
        reader.join(10)
        idle.back_to_idle(kw)
        report(
            f"faults[slow-and-stalled/consumer]: read={len(consumed)} distinct={len(set(consumed.values()))} "
            f"seconds={consumer_seconds[0]:.1f} fetches={kw.metric('keyward_requests_total', api='Fetch'):.0f} "
            f"stalled_closed_after={closed_after:.1f}s idle_timeout={idle_timeout_s}s"
        )
        report(idle.line("slow-and-stalled"))
        for s, t in zip(streams, tallies):
            check(s, t)
        assert sorted(consumed.values()) == sorted(acked_values), "the slow consumer read other than the acked records"
        assert kw.metric("keyward_protocol_errors_total") == 0
        assert kw.metric("keyward_panics_total") == 0
    finally:
        kw.stop()
