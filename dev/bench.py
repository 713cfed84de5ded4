"""The side-by-side benchmark; started by dev/bench (which installs and builds what it needs).

One 1-broker Kafka cluster with two listeners: PLAINTEXT (clients and keyward connect to it
directly) and RELAY, whose advertised address is haproxy's port, so a client bootstrapping at
haproxy is told to keep talking to haproxy. One haproxy (TCP mode) in front of RELAY, one keyward
(the release binary) in front of PLAINTEXT with an ownership table that has a `by: key` rule
(topics key.*), a `by: header` rule (topics hdr.*), and `default: allow` for everything else
(topics plain.*: the passthrough case). With --sockmap, a third listener, KRELAY, advertised at
the port of dev/sockmap-relay.c, a relay that forwards inside the kernel (BPF sockmap).

First come the full-load rounds: in each, for each load (record size x compression), every
path in a rotated order gets a full-load produce run, and (uncompressed loads) a consumer run
reading that data back through the same path; each run's topic is deleted before the next. Then
the half-load rounds: produce runs paced at half of the median direct full-load rate. The load
is dev/loadgen.c (librdkafka). Ratios to direct are taken within a round, then the median over
rounds is reported. See docs/performance.md.

With --baseline-bin, a second keyward (another build, e.g. the last release or the commit before a
change) runs beside the first with the same config and ownership table on its own ports, and each
of keyward's paths gets a twin through it (`key@<name>` beside `key`, ...) in the same rotated
rounds; the report adds a table of current ÷ baseline, taken round by round.

Two modes replace the benchmark. --wan (WanBench): redirect over an emulated WAN, a second
cluster behind toxiproxy, librdkafka straight to it beside the same load redirected by keyward
(target/bench/wan.md). --latency: one record at a time directly, through haproxy and through
keyward (target/bench/latency.md). --tables, --metadata and --connections: issue 18's sizes (a
100,000-tenant table, a 5,000-partition cluster, 10,000 client connections driven by
dev/scale_client.py); --scale runs the three.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/e2e"))

from harness import env  # noqa: E402
from harness.kafka import KafkaCluster  # noqa: E402
from harness.keyward import _LABEL, _SAMPLE, Keyward  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
TENANTS = 16


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ settings


@dataclass
class Settings:
    rounds: int
    seconds: float  # full-load produce run
    half_seconds: float  # paced produce run
    consume_seconds: float  # minimum consumer run
    sizes: list[int]
    compressions: list[str]  # besides none
    compressed_sizes: list[int]
    partitions: int
    idle_connections: int
    stall_seconds: float  # broker frozen this long in the stall run (0: skip it)
    out: Path
    quick: bool
    wan_rtts: list[int]  # --wan: the round trips (ms) the link is set to, one after the other
    wan_messages: int  # --wan: records of one full-load run
    wan_paced_seconds: float  # --wan: one paced run
    latency_messages: int  # --latency: records of one run, one at a time
    scale_connections: int  # --connections: client connections open at once (the large count)
    scale_small: int  # --connections: the small count the large one is compared with
    scale_rate: float  # --connections: Produce requests a second of each active connection
    scale_seconds: float  # --connections: one produce phase
    scale_reload_seconds: float  # --connections: the phase with a reload every second
    scale_rounds: int  # --connections: rounds with 2 worker threads (1 worker thread: one round)
    scale_concurrency: int  # --connections: connections opening at once
    scale_probes: int  # --connections: connections opened one at a time for the accept latency
    sockmap: Path | None = None  # dev/sockmap-relay.c's binary: run the kernel relay path too
    baseline: Path | None = None  # a second keyward binary, benchmarked beside the current one
    baseline_name: str | None = None  # what its paths are called: `key@<baseline_name>`

    @staticmethod
    def from_env(quick: bool) -> "Settings":
        def get(name: str, full: str, fast: str) -> str:
            return os.environ.get(f"KEYWARD_BENCH_{name}", fast if quick else full)

        def ints(text: str) -> list[int]:
            return [int(x) for x in text.split(",") if x.strip()]

        return Settings(
            rounds=int(get("ROUNDS", "5", "3")),
            seconds=float(get("SECONDS", "6", "1.5")),
            half_seconds=float(get("HALF_SECONDS", "4", "1")),
            consume_seconds=float(get("CONSUME_SECONDS", "5", "1")),
            sizes=ints(get("SIZES", "100,1024", "100,1024")),
            compressions=[c for c in get("COMPRESSIONS", "lz4,zstd", "lz4,zstd").split(",") if c],
            compressed_sizes=ints(get("COMPRESSED_SIZES", "100,1024", "1024")),
            partitions=int(get("PARTITIONS", "4", "4")),
            idle_connections=int(get("IDLE_CONNECTIONS", "1000", "1000")),
            stall_seconds=float(get("STALL_SECONDS", "5", "3")),
            out=Path(os.environ.get("KEYWARD_BENCH_OUT", ROOT / "target/bench")),
            quick=quick,
            wan_rtts=ints(get("WAN_RTTS", "20,50", "20,50")),
            wan_messages=int(get("WAN_MESSAGES", "100000", "50000")),
            wan_paced_seconds=float(get("WAN_PACED_SECONDS", "6", "3")),
            latency_messages=int(get("LATENCY_MESSAGES", "10000", "3000")),
            scale_connections=int(get("SCALE_CONNECTIONS", "10000", "10000")),
            scale_small=int(get("SCALE_SMALL", "100", "100")),
            scale_rate=float(get("SCALE_RATE", "2", "2")),
            scale_seconds=float(get("SCALE_SECONDS", "20", "10")),
            scale_reload_seconds=float(get("SCALE_RELOAD_SECONDS", "60", "20")),
            scale_rounds=int(get("SCALE_ROUNDS", "2", "1")),
            scale_concurrency=int(get("SCALE_CONCURRENCY", "50", "50")),
            scale_probes=int(get("SCALE_PROBES", "300", "100")),
        )


@dataclass(frozen=True)
class Load:
    size: int
    compression: str

    @property
    def name(self) -> str:
        size = f"{self.size // 1024} KiB" if self.size % 1024 == 0 else f"{self.size} B"
        return f"{size} {self.compression}"


# A path: how the load reaches the broker. `prefix` picks the ownership rule on keyward's paths.
PATHS = {
    "direct": ("direct", "plain"),
    "haproxy": ("haproxy (TCP)", "plain"),
    "sockmap": ("kernel relay (BPF sockmap)", "plain"),
    "passthrough": ("keyward, no rule", "plain"),
    "key": ("keyward, by: key", "key"),
    "header": ("keyward, by: header", "hdr"),
}


KEYWARD_PATHS = ("passthrough", "key", "header")


def add_baseline_paths(name: str) -> None:
    """A `<path>@<name>` path beside each of keyward's: the same load and rule, through the
    baseline keyward."""
    for path in KEYWARD_PATHS:
        label, prefix = PATHS[path]
        PATHS[f"{path}@{name}"] = (label.replace("keyward", f"keyward@{name}", 1), prefix)


def base_path(path: str) -> str:
    """`key@6b551cf` -> `key`: the path a baseline path mirrors."""
    return path.split("@", 1)[0]


def rotated(paths: list[str], k: int) -> list[str]:
    k %= len(paths)
    return paths[k:] + paths[:k]


def paths_for(load: Load, sockmap: bool, baseline: str | None = None, rnd: int = 0) -> list[str]:
    """The paths of `load`; with a baseline, each baseline path next to its current twin: just
    after it in even rounds, just before it in odd ones, so neither always runs first."""
    if load.compression == "none":
        paths = ["direct", "haproxy", *(["sockmap"] if sockmap else []), "passthrough", "key", "header"]
    else:
        paths = ["direct", "key"]
    if baseline:
        twins = lambda p: [f"{p}@{baseline}", p] if rnd % 2 else [p, f"{p}@{baseline}"]  # noqa: E731
        paths = [q for p in paths for q in (twins(p) if p in KEYWARD_PATHS else [p])]
    return paths


# ------------------------------------------------------------------ processes


class BenchCluster(KafkaCluster):
    """The harness's 1-node cluster plus listeners advertised at the relays' ports, and
    the JIT's full (C2) tiers: the harness limits brokers to C1 to start fast, a benchmark wants
    the broker as fast as it gets.

    `relays` maps a listener name to (the port the broker listens on, the port it advertises:
    the relay's, in front of it). The PLAINTEXT listener (inter-broker traffic, the harness's
    admin client) and the controller's stay direct."""

    def __init__(self, workdir: Path, relays: dict[str, tuple[int, int]], name: str = "bench") -> None:
        super().__init__(name, 1, workdir, heap="1g")
        self.relays = relays

    def server_properties(self, node):
        p = super().server_properties(node)
        for listener, (port, advertised) in self.relays.items():
            p["listeners"] += f",{listener}://127.0.0.1:{port}"
            p["advertised.listeners"] += f",{listener}://127.0.0.1:{advertised}"
            p["listener.security.protocol.map"] += f",{listener}:PLAINTEXT"
        # A deleted topic's files go at once, not a minute later (see Bench.delete_topic), and
        # from the start: the broker runs its first deletion 30 s after it starts by default,
        # which held the first run's topic (and the benchmark) up that long.
        p["log.segment.delete.delay.ms"] = "0"
        p["log.initial.task.delay.ms"] = "0"
        return p

    def topic_dirs(self, topic: str) -> list[Path]:
        """The partition directories of `topic` still on disk (renamed `*-delete` included)."""
        data = self.nodes[0].dir / "data"
        return [d for d in data.iterdir() if d.name.startswith(f"{topic}-")] if data.is_dir() else []

    def _jvm(self, node, heap):
        # What `kafka-server-start.sh` runs a broker with (KAFKA_HEAP_OPTS and
        # KAFKA_JVM_PERFORMANCE_OPTS of kafka-run-class.sh), in place of the harness's
        # start-fast flags (serial GC, a 64 MiB initial heap, C1 only): the broker users run.
        flags = [a for a in super()._jvm(node, heap)
                 if a not in ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC") and not a.startswith("-Xms")]
        return [flags[0], f"-Xms{heap}", "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
                "-XX:MaxInlineLevel=15", *flags[1:]]


def start_haproxy(workdir: Path, port: int, relay_port: int) -> subprocess.Popen:
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        f"""global
    maxconn 8192
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend kafka
    bind 127.0.0.1:{port}
    default_backend broker
backend broker
    server broker 127.0.0.1:{relay_port}
"""
    )
    return start_relay(workdir, "haproxy", ["haproxy", "-db", "-f", str(cfg)], port)


def start_sockmap_relay(workdir: Path, binary: Path, port: int, upstream_port: int) -> subprocess.Popen:
    return start_relay(workdir, "sockmap-relay", [str(binary), str(port), str(upstream_port)], port)


def start_relay(workdir: Path, name: str, argv: list[str], port: int) -> subprocess.Popen:
    """Starts a relay process, its output in `<workdir>/<name>.log`, and waits until it accepts."""
    log_file = workdir / f"{name}.log"
    out = open(log_file, "ab")
    proc = subprocess.Popen([*env.pdeathsig_prefix(), *argv], stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log_file.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not start")


OWNERSHIP = f"""\
rules:
  - name: bench-key
    topics: ["key.*"]
    by: key
    slots: 16
    owners: {{ eu: ["0-15"] }}
    null_key: reject
  - name: bench-header
    topics: ["hdr.*"]
    by: header
    header: tenant
    owners: {{ eu: [{", ".join(f"t{i:02d}" for i in range(TENANTS))}] }}
    unmatched: reject
default: allow
"""


# ------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time this machine's processes kept all CPUs busy: user, nice, system, irq, softirq
    (the kernel charges irq and softirq ticks to the running task too, without
    CONFIG_IRQ_TIME_ACCOUNTING); not idle, iowait or steal (the hypervisor's)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / CLK_TCK


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int) -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as e:
        log(f"cannot reset peak RSS of {pid}: {e}")


# ------------------------------------------------------------------ runs


class Bench:
    def __init__(self, settings: Settings, workdir: Path, loadgen: Path) -> None:
        self.s = settings
        self.workdir = workdir
        self.loadgen = loadgen
        self.runs: list[dict] = []
        self.warmups: list[dict] = []
        self.topic_seq = 0

    # -- setup / teardown
    def start(self) -> None:
        relay_port, self.haproxy_port = env.free_port(), env.free_port()
        krelay_port, self.sockmap_port = env.free_port(), env.free_port()
        self.cluster = BenchCluster(self.workdir, {"RELAY": (relay_port, self.haproxy_port),
                                                   "KRELAY": (krelay_port, self.sockmap_port)})
        log("starting Kafka (1 broker, KRaft)")
        self.cluster.start()
        log(f"broker {self.cluster.bootstrap}, relay listeners 127.0.0.1:{relay_port} and :{krelay_port}")
        self.haproxy = start_haproxy(self.workdir, self.haproxy_port, relay_port)
        log(f"haproxy 127.0.0.1:{self.haproxy_port} (pid {self.haproxy.pid})")
        if self.s.sockmap:
            self.sockmap = start_sockmap_relay(self.workdir, self.s.sockmap, self.sockmap_port, krelay_port)
            log(f"sockmap-relay 127.0.0.1:{self.sockmap_port} (pid {self.sockmap.pid})")
        self.keyward = Keyward(self.workdir, "eu", {"eu": self.cluster}, OWNERSHIP, name="keyward")
        self.keyward.start()
        log(f"keyward {self.keyward.bootstrap} (pid {self.keyward.proc.pid}, {os.environ['KEYWARD_BIN']})")
        self.baseline = None
        if self.s.baseline:
            self.baseline = Keyward(self.workdir, "eu", {"eu": self.cluster}, OWNERSHIP, name="keyward-baseline",
                                    binary_path=self.s.baseline)
            self.baseline.start()
            log(f"keyward@{self.s.baseline_name} {self.baseline.bootstrap} (pid {self.baseline.proc.pid}, "
                f"{self.s.baseline})")

    def stop(self) -> None:
        for k in (getattr(self, "keyward", None), getattr(self, "baseline", None)):
            if k:
                k.stop()
        for relay in (getattr(self, "haproxy", None), getattr(self, "sockmap", None)):
            if relay and relay.poll() is None:
                relay.terminate()
                relay.wait(timeout=10)
        c = getattr(self, "cluster", None)
        if c:
            c.stop()

    def bootstrap(self, path: str) -> str:
        if path == "direct":
            return self.cluster.bootstrap
        if path == "haproxy":
            return f"127.0.0.1:{self.haproxy_port}"
        if path == "sockmap":
            return f"127.0.0.1:{self.sockmap_port}"
        return self.keyward_of(path).bootstrap

    def keyward_of(self, path: str) -> Keyward:
        """The keyward process behind one of keyward's paths: the baseline's for `<path>@<name>`."""
        return self.baseline if "@" in path else self.keyward

    def relay_pid(self, path: str) -> int | None:
        # The kernel relay's forwarding runs in softirq and kworker context, charged to no
        # process of its own: the machine's CPU per GB (`machine_cpu_s`) is what compares.
        if path in ("direct", "sockmap"):
            return None
        if path == "haproxy":
            return self.haproxy.pid
        return self.keyward_of(path).proc.pid

    def new_topic(self, path: str, load: Load, rnd: int) -> str:
        self.topic_seq += 1
        # Topic names allow [a-zA-Z0-9._-]: `key@HEAD~1` becomes `key-HEAD-1`.
        safe = re.sub(r"[^a-zA-Z0-9._-]", "-", path)
        name = f"{PATHS[path][1]}.r{rnd}.{load.size}.{load.compression}.{safe}.{self.topic_seq}"
        self.cluster.create_topic(name, self.s.partitions, replication=1)
        return name

    def delete_topic(self, name: str, cluster: BenchCluster | None = None) -> None:
        """Deletes a run's topic (from `cluster`, by default the one cluster) and waits until its
        files are gone, so that every run starts with the same page cache. On this kind of VM,
        once the broker's page cache had grown by ~9 GiB of earlier runs' data, copying produced
        bytes into it cost the broker three times the CPU per byte (docs/performance.md, "Third
        run"), so a run's position in a round decided its throughput more than its path did."""
        cluster = cluster or self.cluster
        try:
            cluster.delete_topic(name)
        except Exception as e:  # a leftover topic only costs disk
            log(f"delete {name}: {e}")
            return
        deadline = time.monotonic() + 30
        while cluster.topic_dirs(name) and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- one loadgen run, with the relay's CPU and peak RSS around it
    def loadgen_run(self, args: list[str], path: str) -> dict:
        relay = self.relay_pid(path)
        broker = self.cluster.nodes[0].proc.pid
        if relay:
            reset_peak_rss(relay)
            relay_cpu0 = cpu_seconds(relay)
        broker_cpu0 = cpu_seconds(broker)
        busy0 = machine_busy_seconds()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*env.pdeathsig_prefix(), str(self.loadgen), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = proc.communicate(timeout=300)
        wall = time.monotonic() - t0
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        result: dict = {
            "ok": proc.returncode == 0,
            "wall_s": wall,
            # only the load generator is reaped meanwhile, so this is its CPU
            "client_cpu_s": (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime),
        }
        try:
            result.update(json.loads(out.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            result["ok"] = False
        if not result["ok"]:
            result["stderr"] = err.decode(errors="replace")[-2000:]
            log(f"  FAILED: {' '.join(args)}\n{result.get('stderr', '')}")
        result["broker_cpu_s"] = cpu_seconds(broker) - broker_cpu0
        ours = result["broker_cpu_s"] + result["client_cpu_s"]
        if relay:
            result["relay_cpu_s"] = cpu_seconds(relay) - relay_cpu0
            result["relay_peak_rss_kib"] = status_kib(relay, "VmHWM")
            result["relay_rss_kib"] = status_kib(relay, "VmRSS")
            ours += result["relay_cpu_s"]
        # What the rest of the machine (other people's builds and tests, and the kernel relay's
        # kworkers) took meanwhile, in cores.
        result["machine_cpu_s"] = machine_busy_seconds() - busy0
        result["others_cores"] = max(0.0, result["machine_cpu_s"] - ours) / wall
        return result

    def produce(self, path: str, load: Load, topic: str, seconds: float, rate: float = 0) -> dict:
        args = ["produce", "--bootstrap", self.bootstrap(path), "--topic", topic, "--size", str(load.size),
                "--compression", load.compression, "--seconds", str(seconds), "--tenants", str(TENANTS)]
        if rate:
            args += ["--rate", f"{rate:.0f}"]
        return self.loadgen_run(args, path)

    def consume(self, path: str, topic: str) -> dict:
        args = ["consume", "--bootstrap", self.bootstrap(path), "--topic", topic,
                "--min-seconds", str(self.s.consume_seconds)]
        return self.loadgen_run(args, path)

    def keyward_records(self, path: str) -> float:
        return self.keyward_of(path).metric("keyward_produce_records_total", rule=f"bench-{base_path(path)}",
                                            decision="forwarded")

    def record(self, rnd: int, load: Load, path: str, kind: str, result: dict) -> None:
        result.update(round=rnd, size=load.size, compression=load.compression, path=path, kind=kind)
        self.runs.append(result)
        if kind == "consume":
            summary = f"{result.get('mb_per_s', 0):8.1f} MB/s consumed"
        else:
            summary = (
                f"{result.get('msgs_per_s', 0):10.0f} msg/s {result.get('mb_per_s', 0):7.1f} MB/s "
                f"p50 {result.get('p50_ms', 0):7.2f} ms p99 {result.get('p99_ms', 0):7.2f} ms"
            )
            if "relay_cpu_s" in result and result.get("bytes"):
                summary += f" relay {result['relay_cpu_s'] / (result['bytes'] / 1e9):5.2f} CPU-s/GB"
        log(f"  r{rnd} {load.name:>10} {kind:7} {PATHS[path][0]:28} {summary}")

    # -- the rounds
    def loads(self) -> list[Load]:
        loads = [Load(size, "none") for size in self.s.sizes]
        loads += [Load(size, c) for c in self.s.compressions for size in self.s.compressed_sizes]
        return loads

    def full_round(self, rnd: int) -> None:
        """For every load, every path in a rotated order (so no path always runs first or
        last): a full-load produce run, a consumer run reading that data back (uncompressed
        loads), and the topic deleted before the next path starts."""
        for load in self.loads():
            for path in rotated(paths_for(load, self.s.sockmap is not None, self.s.baseline_name, rnd), rnd):
                topic = self.new_topic(path, load, rnd)
                before = self.keyward_records(path) if base_path(path) in ("key", "header") else None
                r = self.produce(path, load, topic, self.s.seconds)
                if before is not None:
                    r["inspected_records"] = self.keyward_records(path) - before
                self.record(rnd, load, path, "full", r)
                if load.compression == "none":
                    self.record(rnd, load, path, "consume", self.consume(path, topic))
                self.delete_topic(topic)

    def warm_up(self, settle: float = 0.10, most: int = 6) -> None:
        """Runs until the broker is warm, not counted in the results. A fresh broker JVM spends
        several times the CPU per byte on its first runs (the JIT compiling its produce path),
        which made the first runs of round 1 the slowest of the whole benchmark whatever path
        they measured. So: every load once on the broker directly and through keyward
        (produce and, uncompressed, consume), then the first load directly again until the
        broker's CPU per GB of two runs in a row differs by less than `settle`. A baseline
        keyward gets the same runs as the current one, so neither meets the load cold."""
        def broker_cpu_per_gb(path: str, load: Load) -> float:
            topic = self.new_topic(path, load, -1)
            r = self.produce(path, load, topic, self.s.seconds)
            r.update(round=-1, size=load.size, compression=load.compression, path=path, kind="warmup")
            self.warmups.append(r)
            if load.compression == "none":
                self.consume(path, topic)
            self.delete_topic(topic)
            per_gb = r["broker_cpu_s"] / (r["bytes"] / 1e9) if r.get("bytes") else float("inf")
            log(f"  warm-up {load.name:>10} {PATHS[path][0]:28} {r.get('msgs_per_s', 0):10.0f} msg/s, "
                f"broker {per_gb:5.2f} CPU-s/GB")
            return per_gb

        log("warm-up (not counted)")
        for load in self.loads():
            for path in ("direct", "key", *([f"key@{self.s.baseline_name}"] if self.baseline else [])):
                broker_cpu_per_gb(path, load)
        first = self.loads()[0]
        last = broker_cpu_per_gb("direct", first)
        for _ in range(most):
            now = broker_cpu_per_gb("direct", first)
            if abs(now - last) <= settle * last:
                break
            last = now

    def half_round(self, rnd: int) -> None:
        """Produce runs paced at half of the direct maximum: half the median of every round's
        direct full-load rate, so one lucky (or unlucky) direct run does not set the pace."""
        for load in self.loads():
            direct = [
                r["msgs_per_s"] for r in self.runs
                if r.get("ok") and r["kind"] == "full" and r["path"] == "direct"
                and (r["size"], r["compression"]) == (load.size, load.compression)
            ]
            if not direct:
                continue
            rate = statistics.median(direct) / 2
            for path in rotated(paths_for(load, self.s.sockmap is not None, self.s.baseline_name, rnd), rnd):
                topic = self.new_topic(path, load, rnd)
                before = self.proxy_time(path) if base_path(path) in KEYWARD_PATHS else None
                r = self.produce(path, load, topic, self.s.half_seconds, rate=rate)
                if before is not None:
                    r.update(proxy_time_summary(before, self.proxy_time(path)))
                self.record(rnd, load, path, "half", r)
                self.delete_topic(topic)

    def proxy_time(self, path: str) -> dict[str, float]:
        """keyward's `keyward_request_duration_seconds{api="Produce",part="proxy"}` histogram
        (cumulative bucket counts by `le`, plus `sum` and `count`): the time each Produce request
        spent in keyward itself, from its last byte read to its last byte written to the broker,
        plus the response's from arriving to written to the client."""
        out: dict[str, float] = {}
        for line in self.keyward_of(path).metrics_text().splitlines():
            m = _SAMPLE.match(line)
            if not m or not m.group(1).startswith("keyward_request_duration_seconds"):
                continue
            labels = dict(_LABEL.findall(m.group(2) or ""))
            if labels.get("api") != "Produce" or labels.get("part") != "proxy":
                continue
            suffix = m.group(1).removeprefix("keyward_request_duration_seconds")
            if suffix == "_bucket":
                out[labels["le"]] = float(m.group(3))
            elif suffix in ("_sum", "_count"):
                out[suffix[1:]] = float(m.group(3))
        return out

    def stall(self, path: str, load: Load, seconds: float, stall_s: float) -> dict:
        """A full-load produce run through `path` during which the broker is frozen (SIGSTOP)
        for `stall_s`: the relay's memory before, during and after the stall shows whether it
        buffers what it cannot forward (unbounded) or pushes back on the client (bounded)."""
        pid = self.relay_pid(path)
        broker = self.cluster.nodes[0].proc
        topic = self.new_topic(path, load, -2)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(self.produce(path, load, topic, seconds)))
        runner.start()
        time.sleep(seconds / 4)
        rss_loaded = status_kib(pid, "VmRSS")
        samples = []
        broker.send_signal(signal.SIGSTOP)
        try:
            end = time.monotonic() + stall_s
            while time.monotonic() < end:
                samples.append(status_kib(pid, "VmRSS"))
                time.sleep(0.1)
        finally:
            broker.send_signal(signal.SIGCONT)
        runner.join()
        self.delete_topic(topic)
        return {
            "path": path,
            "load": load.name,
            "stall_s": stall_s,
            "rss_loaded_kib": rss_loaded,
            "rss_stalled_max_kib": max(samples),
            "rss_stalled_last_kib": samples[-1],
            "rss_after_kib": status_kib(pid, "VmRSS"),
            "delivered": result.get("delivered", 0),
            "failed": result.get("failed", 0),
            "ok": result.get("ok", False),
        }

    def idle_connections(self, path: str, count: int) -> dict:
        """Opens `count` client connections through `path`, each one having asked ApiVersions
        (what every client does first) and then idle; returns the relay's RSS then."""
        pid = self.relay_pid(path)
        port = int(self.bootstrap(path).rsplit(":", 1)[1])
        rss_before = status_kib(pid, "VmRSS")
        # ApiVersions v0: length, api key 18, version 0, correlation id, null client id.
        request = struct.pack(">ihhih", 10, 18, 0, 1, -1)
        socks = []
        try:
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(request)
                socks.append(s)
            for s in socks:
                (length,) = struct.unpack(">i", _read_exact(s, 4))
                _read_exact(s, length)
            time.sleep(1)
            rss = status_kib(pid, "VmRSS")
        finally:
            for s in socks:
                s.close()
        return {"path": path, "connections": count, "rss_before_kib": rss_before, "rss_kib": rss}


def proxy_time_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """keyward's own time per Produce request over one run, from two scrapes of its histogram:
    the mean, and p50/p99 as the upper bound of the bucket they fall in (Prometheus buckets
    give no finer answer)."""
    count = after.get("count", 0) - before.get("count", 0)
    if count <= 0:
        return {}
    bounds = sorted((float(le), after[le] - before.get(le, 0)) for le in after if le not in ("sum", "count"))

    def quantile(q: float) -> float:
        for bound, cumulative in bounds:
            if cumulative >= q * count:
                return bound * 1e3
        return float("inf")

    return {
        "proxy_requests": count,
        "proxy_mean_ms": (after["sum"] - before.get("sum", 0)) / count * 1e3,
        "proxy_p50_le_ms": quantile(0.5),
        "proxy_p99_le_ms": quantile(0.99),
    }


def _read_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


# ------------------------------------------------------------------ report


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def summarize(runs: list[dict], loads: list[Load], rounds: int, sockmap: bool, baseline: str | None = None) -> list[dict]:
    """One row per (load, path): medians over rounds, ratios to direct taken round by round. With
    a baseline, each current keyward row also has `vs_baseline`: its ratios to its baseline twin,
    taken round by round in the same way."""
    def get(rnd, load, path, kind):
        for r in runs:
            if (r["round"], r["size"], r["compression"], r["path"], r["kind"]) == (
                rnd, load.size, load.compression, path, kind,
            ) and r.get("ok"):
                return r
        return None

    rows = []
    for load in loads:
        for path in paths_for(load, sockmap, baseline):
            per = {k: [get(i, load, path, k) for i in range(rounds)] for k in ("full", "half", "consume")}
            direct = {k: [get(i, load, "direct", k) for i in range(rounds)] for k in ("full", "half", "consume")}
            twin = {k: [get(i, load, f"{path}@{baseline}", k) for i in range(rounds)]
                    for k in ("full", "half", "consume")} if baseline and path in KEYWARD_PATHS else None

            def med(kind, field):
                return median([r[field] for r in per[kind] if r and field in r])

            def ratios(kind, field, against=direct):
                return [p[field] / d[field] for p, d in zip(per[kind], against[kind]) if p and d and d.get(field)]

            def ratio(kind, field, against=direct):
                return median(ratios(kind, field, against))

            def addeds(kind, field, against=direct):
                return [p[field] - d[field] for p, d in zip(per[kind], against[kind]) if p and d]

            def added(kind, field, against=direct):
                return median(addeds(kind, field, against))

            def relay_cpu_per_gb(r):
                return r["relay_cpu_s"] / (r["bytes"] / 1e9) if r and "relay_cpu_s" in r and r.get("bytes") else None

            cpu_per_gb = median([relay_cpu_per_gb(r) for r in per["full"]])
            vs_baseline = twin and {
                "ratio": ratio("full", "msgs_per_s", twin),
                "ratios": ratios("full", "msgs_per_s", twin),
                "consume_ratio": ratio("consume", "mb_per_s", twin),
                "added_p99_half": added("half", "p99_ms", twin),
                "cpu_ratio": median([a / b for a, b in zip(map(relay_cpu_per_gb, per["full"]),
                                                            map(relay_cpu_per_gb, twin["full"])) if a and b]),
                "peak_rss_mib": median([r["relay_peak_rss_kib"] / 1024 for r in twin["full"] if r and "relay_peak_rss_kib" in r]),
            }
            inspected = [r.get("inspected_records") for r in per["full"] if r and "inspected_records" in r]
            delivered = [r.get("delivered") for r in per["full"] if r and "inspected_records" in r]
            rows.append({
                "load": load.name, "size": load.size, "compression": load.compression, "path": path,
                "rounds_ok": sum(1 for r in per["full"] if r),
                "msgs_per_s": med("full", "msgs_per_s"), "mb_per_s": med("full", "mb_per_s"),
                "ratio": ratio("full", "msgs_per_s"),
                "ratios": ratios("full", "msgs_per_s"),
                "p50_full": med("full", "p50_ms"), "p99_full": med("full", "p99_ms"),
                "p50_half": med("half", "p50_ms"), "p99_half": med("half", "p99_ms"),
                "added_p99_half": added("half", "p99_ms"),
                "added_p99s_half": addeds("half", "p99_ms"),
                "proxy_mean_ms": med("half", "proxy_mean_ms"),
                "proxy_p50_le_ms": med("half", "proxy_p50_le_ms"),
                # A bucket bound: the worst round's, not a median that could fall between bounds.
                "proxy_p99_le_ms": max([r["proxy_p99_le_ms"] for r in per["half"] if r and "proxy_p99_le_ms" in r],
                                       default=None),
                "proxy_p99s_le_ms": [r["proxy_p99_le_ms"] for r in per["half"] if r and "proxy_p99_le_ms" in r],
                "cpu_s_per_gb": cpu_per_gb,
                "peak_rss_mib": median([r["relay_peak_rss_kib"] / 1024 for r in per["full"] if r and "relay_peak_rss_kib" in r]),
                "broker_cpu_s_per_gb": median([r["broker_cpu_s"] / (r["bytes"] / 1e9) for r in per["full"] if r and r["bytes"]]),
                "machine_cpu_s_per_gb": median([r["machine_cpu_s"] / (r["bytes"] / 1e9) for r in per["full"]
                                                if r and r["bytes"] and "machine_cpu_s" in r]),
                "consume_mb_per_s": med("consume", "mb_per_s"),
                "consume_ratio": ratio("consume", "mb_per_s"),
                "consume_ratios": ratios("consume", "mb_per_s"),
                # More than delivered is fine: a batch the broker refused with a retriable error
                # (a fresh topic's leader not ready yet) is inspected again when it is retried.
                "all_inspected": all(i >= d for i, d in zip(inspected, delivered)) if inspected else None,
                "reinspected": sum(i - d for i, d in zip(inspected, delivered)) if inspected else 0,
                "vs_baseline": vs_baseline,
            })
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| load | path | msg/s | MB/s | × direct | p50 / p99 full (ms) | p50 / p99 half (ms) | "
        "p99 half − direct (ms) | relay CPU-s/GB | relay peak RSS (MiB) | consumer MB/s | consumer × direct |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    lines = []
    for r in rows:
        direct = r["path"] == "direct"
        lines.append(
            f"| {r['load']} | {PATHS[r['path']][0]} | {fmt(r['msgs_per_s'], ',.0f')} | {fmt(r['mb_per_s'], '.1f')} "
            f"| {'1' if direct else fmt(r['ratio'], '.3f')} "
            f"| {fmt(r['p50_full'], '.1f')} / {fmt(r['p99_full'], '.1f')} "
            f"| {fmt(r['p50_half'], '.2f')} / {fmt(r['p99_half'], '.2f')} "
            f"| {'' if direct else fmt(r['added_p99_half'], '+.2f')} "
            f"| {'' if direct else fmt(r['cpu_s_per_gb'], '.2f')} "
            f"| {'' if direct else fmt(r['peak_rss_mib'], '.1f')} "
            f"| {fmt(r['consume_mb_per_s'], '.1f')} "
            f"| {'' if direct or r['consume_mb_per_s'] is None else fmt(r['consume_ratio'], '.3f')} |"
        )
    return head + "\n".join(lines) + "\n"


def versus_baseline(rows: list[dict], name: str) -> str:
    """Current keyward against the baseline, path by path: what the issue's "no load worse by
    more than noise" is read from (the rounds' spread is the noise)."""
    head = (
        f"| load | path | msg/s now ÷ @{name} | each round | consumer MB/s now ÷ @{name} "
        f"| p99 half now − @{name} (ms) | relay CPU-s/GB now ÷ @{name} | peak RSS now / @{name} (MiB) |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|\n"
    )
    lines = []
    for r in rows:
        b = r.get("vs_baseline")
        if not b:
            continue
        lines.append(
            f"| {r['load']} | {PATHS[r['path']][0]} | {fmt(b['ratio'], '.3f')} "
            f"| {', '.join(format(x, '.3f') for x in b['ratios'])} "
            f"| {'' if r['consume_mb_per_s'] is None else fmt(b['consume_ratio'], '.3f')} "
            f"| {fmt(b['added_p99_half'], '+.2f')} | {fmt(b['cpu_ratio'], '.3f')} "
            f"| {fmt(r['peak_rss_mib'], '.1f')} / {fmt(b['peak_rss_mib'], '.1f')} |"
        )
    return head + "\n".join(lines) + "\n"


def targets(rows: list[dict], idle: list[dict], stalls: list[dict]) -> str:
    """The issue's targets, each checked against this run."""
    out = []

    def check(label, value, ok, shown, rounds=()):
        mark = "n/a" if value is None else ("met" if ok(value) else "MISSED")
        each = ", ".join(shown(v) for v in rounds)
        out.append(f"| {label} | {shown(value) if value is not None else '-'} | {each} | {mark} |")

    def rows_of(path, compressions):
        return [r for r in rows if r["path"] == path and r["compression"] in compressions]

    for r in rows_of("passthrough", ("none",)) + rows_of("key", ("none",)):
        check(f"throughput {PATHS[r['path']][0]}, {r['load']} ≥ 0.95 × direct", r["ratio"], lambda v: v >= 0.95, lambda v: f"{v:.3f}", r["ratios"])
    for r in [r for r in rows if r["path"] == "key" and r["compression"] != "none"]:
        check(f"throughput {PATHS[r['path']][0]}, {r['load']} ≥ 0.90 × direct", r["ratio"], lambda v: v >= 0.90, lambda v: f"{v:.3f}", r["ratios"])
    for r in rows_of("passthrough", ("none",)):
        check(f"consumer throughput via keyward, {r['load']} ≥ 0.95 × direct", r["consume_ratio"], lambda v: v >= 0.95, lambda v: f"{v:.3f}", r["consume_ratios"])
    for r in rows_of("passthrough", ("none",)):
        check(f"CPU passthrough, {r['load']} ≤ 1 CPU-s/GB", r["cpu_s_per_gb"], lambda v: v <= 1, lambda v: f"{v:.2f}")
    for r in rows_of("key", ("none",)):
        check(f"CPU by: key, {r['load']} ≤ 2 CPU-s/GB", r["cpu_s_per_gb"], lambda v: v <= 2, lambda v: f"{v:.2f}")
    for r in rows_of("key", ("zstd",)):
        check(f"CPU by: key, {r['load']} ≤ 4 CPU-s/GB", r["cpu_s_per_gb"], lambda v: v <= 4, lambda v: f"{v:.2f}")
    for r in [r for r in rows if r["path"] in ("passthrough", "key", "header")]:
        check(f"added p99 at half load, {PATHS[r['path']][0]}, {r['load']} ≤ 1 ms", r["added_p99_half"], lambda v: v <= 1, lambda v: f"{v:+.2f} ms", r["added_p99s_half"])
    for r in [r for r in rows if r["path"] in KEYWARD_PATHS and r.get("proxy_p99_le_ms") is not None]:
        check(f"keyward's own time per Produce request at half load, {PATHS[r['path']][0]}, {r['load']}: p99 ≤ 1 ms "
              f"(worst round; mean {r['proxy_mean_ms'] * 1e3:.0f} µs)", r["proxy_p99_le_ms"], lambda v: v <= 1,
              lambda v: f"≤ {v:g} ms", r["proxy_p99s_le_ms"])
    full_1k = [r["peak_rss_mib"] for r in rows if r["path"] in ("passthrough", "key", "header") and r["size"] >= 1024 and r["peak_rss_mib"]]
    check("peak RSS under full 1 KiB load ≤ 64 MiB (worst keyward case)", max(full_1k) if full_1k else None, lambda v: v <= 64, lambda v: f"{v:.1f} MiB")
    for i in idle:
        if i["path"] == "passthrough":
            check(f"RSS with {i['connections']} idle client connections ≤ 64 MiB", i["rss_kib"] / 1024, lambda v: v <= 64, lambda v: f"{v:.1f} MiB")
    for st in stalls:
        # Bounded: stalling adds no more than the buffers of the connections involved.
        check(
            f"memory bounded when the broker stalls under full {st['load']} load (RSS while stalled ≤ 64 MiB)",
            st["rss_stalled_max_kib"] / 1024,
            lambda v: v <= 64,
            lambda v: f"{v:.1f} MiB",
        )
    if not stalls:
        out.append("| memory bounded when the broker stalls under full load | not measured (KEYWARD_BENCH_STALL_SECONDS=0) | | n/a |")
    return "| target | measured (median) | each round | |\n|---|--:|--:|---|\n" + "\n".join(out) + "\n"


def header_targets(runs: list[dict]) -> str:
    """Issue 18, item 2: `by: header` against haproxy's throughput and against `by: key`'s CPU,
    taken round by round (the same round and load), then the median. CPU per GB is compared at
    full load, and at half load too, where every path carries the same rate: at full load a path's
    batches grow with its throughput, and CPU per GB with them."""
    by = {(r["kind"], r["size"], r["round"], r["path"]): r for r in runs
          if r.get("ok") and r["compression"] == "none" and r.get("bytes")}
    out = []

    def row(label, values, ok):
        if not values:
            out.append(f"| {label} | - | | n/a |")
            return
        m = statistics.median(values)
        each = ", ".join(f"{v:.2f}" for v in values)
        out.append(f"| {label} | {m:.3f} | {each} | {'met' if ok(m) else 'MISSED'} |")

    def per_gb(r):
        return r["relay_cpu_s"] / (r["bytes"] / 1e9) if r.get("relay_cpu_s") else None

    for size in sorted({k[1] for k in by}):
        rounds = sorted({k[2] for k in by if k[1] == size})
        name = Load(size, "none").name
        pairs = [(by.get(("full", size, n, "header")), by.get(("full", size, n, "haproxy"))) for n in rounds]
        row(f"by: header throughput ÷ haproxy's, {name}, full load (≥ 1)",
            [h["msgs_per_s"] / p["msgs_per_s"] for h, p in pairs if h and p and p["msgs_per_s"]], lambda v: v >= 1)
        for kind, how in (("full", "full load"), ("half", "half load, the same rate on every path")):
            pairs = [(by.get((kind, size, n, "header")), by.get((kind, size, n, "key"))) for n in rounds]
            cpu = [per_gb(h) / per_gb(k) for h, k in pairs if h and k and per_gb(h) and per_gb(k)]
            row(f"by: header relay CPU-s/GB ÷ by: key's, {name}, {how} (≤ 1.2)", cpu, lambda v: v <= 1.2)
    return "| target | median | each round | |\n|---|--:|--:|---|\n" + "\n".join(out) + "\n"


def report(settings: Settings, bench: Bench, idle: list[dict], stalls: list[dict], started: float) -> str:
    rows = summarize(bench.runs, bench.loads(), settings.rounds, settings.sockmap is not None, settings.baseline_name)
    failed = [r for r in bench.runs if not r.get("ok")]
    lines = [
        f"# dev/bench results ({'quick' if settings.quick else 'full'} run)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {time.monotonic() - started:.0f} s, {os.cpu_count()} CPUs, "
        f"load average at the end {os.getloadavg()[0]:.2f}. {settings.rounds} rounds; full-load runs "
        f"{settings.seconds:g} s, half-load runs {settings.half_seconds:g} s, consumer runs ≥ {settings.consume_seconds:g} s; "
        f"{settings.partitions} partitions, 1 broker; librdkafka {librdkafka_version()} producer "
        "(linger.ms 5, acks=all); keyward = target/release/keyward"
        + (f"; keyward@{settings.baseline_name} = {settings.baseline}, the same config on its own ports, its paths "
           "in the same rounds." if settings.baseline else "."),
        "",
        "Medians over rounds; \"× direct\" and \"p99 half − direct\" are computed round by round (same round, "
        "same load), then the median is taken. MB/s are record value bytes. CPU-s/GB = the relay's (haproxy's "
        "or keyward's) utime+stime during the full-load run / value GB delivered. Peak RSS = VmHWM during that run.",
        "",
        table(rows),
    ]
    if settings.baseline:
        lines += [f"### Current keyward ÷ keyward@{settings.baseline_name}", "",
                  "Ratios and differences taken round by round (same round, same load), then the median.", "",
                  versus_baseline(rows, settings.baseline_name)]
    others = sorted(r["others_cores"] for r in bench.runs
                    if "others_cores" in r and r["kind"] != "consume" and r["path"] != "sockmap")
    if others:
        lines.append(
            f"CPU taken by other processes on the machine during the produce runs (cores of 2): median "
            f"{statistics.median(others):.2f}, 90th percentile {others[int(0.9 * (len(others) - 1))]:.2f}, "
            f"max {others[-1]:.2f}. Client (librdkafka) CPU in the full-load runs: median "
            f"{statistics.median([r['client_cpu_s'] / r['wall_s'] for r in bench.runs if r['kind'] == 'full']):.2f} cores.\n"
        )
    if settings.sockmap:
        lines.append("Whole machine CPU-s per GB in the full-load produce runs (client, broker, relay, kernel): " + "; ".join(
            f"{r['load']}: " + ", ".join(f"{PATHS[x['path']][0]} {fmt(x['machine_cpu_s_per_gb'], '.2f')}"
                                          for x in rows if x["load"] == r["load"])
            for r in rows if r["path"] == "direct" and r["compression"] == "none") + ". The kernel relay's own "
            "CPU is only visible here: it forwards in softirq and kworker context.\n")
    if any(r["all_inspected"] is False for r in rows):
        lines.append("**Warning:** keyward's `keyward_produce_records_total` did not count every delivered record "
                     "on a by: key / by: header run.\n")
    elif any(r["all_inspected"] for r in rows):
        again = sum(r["reinspected"] for r in rows)
        lines.append("keyward's `keyward_produce_records_total{decision=\"forwarded\"}` counted every delivered record "
                     "on every by: key / by: header run (every record's key or header was inspected)"
                     + (f"; {again:,} records more in all, batches the client sent again after a retriable broker "
                        "error" if again else ", exactly") + ".\n")
    if idle:
        lines.append("Idle connections (each sent ApiVersions, then idle): " + "; ".join(
            f"{PATHS[i['path']][0]}: {i['connections']} connections, RSS {i['rss_before_kib'] / 1024:.1f} → "
            f"{i['rss_kib'] / 1024:.1f} MiB" for i in idle) + "\n")
    for st in stalls:
        lines.append(
            f"Broker stalled (SIGSTOP) for {st['stall_s']:g} s during a full-load {st['load']} run through "
            f"{PATHS[st['path']][0]}: keyward RSS {st['rss_loaded_kib'] / 1024:.1f} MiB under load before, at most "
            f"{st['rss_stalled_max_kib'] / 1024:.1f} MiB while stalled ({st['rss_stalled_last_kib'] / 1024:.1f} MiB at "
            f"its end), {st['rss_after_kib'] / 1024:.1f} MiB after; {st['delivered']:,} records delivered, "
            f"{st['failed']:,} failed "
            f"({'run ok' if st['ok'] else 'run FAILED'}).\n"
        )
    if failed:
        lines.append(f"**{len(failed)} run(s) failed** (left out of the medians): " + ", ".join(
            f"r{r['round']} {r['size']} {r['compression']} {r['path']} {r['kind']}" for r in failed) + "\n")
    lines += ["## Targets (issue 5)", "", targets(rows, idle, stalls)]
    lines += ["## Targets (issue 18, item 2)", "", header_targets(bench.runs)]
    return "\n".join(lines)


def librdkafka_version() -> str:
    try:
        out = subprocess.run(["pkg-config", "--modversion", "rdkafka"], capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


# ------------------------------------------------------------------ perf


def profile(bench: Bench, settings: Settings, case: str) -> int:
    """One full-load run of `case` with `perf record` (DWARF call graphs) attached to keyward."""
    path, size, codec = case.split("/")
    if path not in ("passthrough", "key", "header"):
        raise SystemExit(f"--perf profiles keyward: path must be passthrough, key or header, not {path}")
    load = Load(int(size), codec)
    seconds = float(os.environ.get("KEYWARD_BENCH_PERF_SECONDS", "10"))
    warm = bench.new_topic(path, load, -1)
    bench.produce(path, load, warm, 3)
    topic = bench.new_topic(path, load, 0)
    name = f"perf-{path}-{size}-{codec}"
    data = settings.out / f"{name}.data"
    perf = subprocess.Popen(
        ["perf", "record", "-F", "997", "--call-graph", "dwarf,16384", "-o", str(data),
         "-p", str(bench.keyward.proc.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(1)
    result = bench.produce(path, load, topic, seconds)
    perf.send_signal(signal.SIGINT)
    perf.wait(timeout=60)
    log(f"{case}: {result.get('msgs_per_s', 0):.0f} msg/s, relay CPU {result.get('relay_cpu_s', 0):.2f} s")
    reports = []
    views = (
        ("self time by symbol", ["--no-children", "--sort", "symbol"], None),
        ("self time by shared object", ["--no-children", "--sort", "dso"], None),
        ("inclusive time of keyward's own functions", ["--children", "--sort", "symbol"], "keyward::"),
    )
    for title, flags, only in views:
        out = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "-g", "none", "--percent-limit", "0.5", *flags],
            capture_output=True, text=True,
        )
        lines = [l[:160].rstrip(" -") for l in out.stdout.splitlines() if l.strip() and not l.startswith("#")]
        lines = [l for l in lines if only is None or only in l]
        reports.append(f"## {title}\n\n" + "\n".join(lines[:40]))
    text = (f"# perf profile of keyward: {case}, {seconds:g} s full load\n\n"
            f"loadgen: {json.dumps(result)}\n\n" + "\n\n".join(reports) + "\n")
    (settings.out / f"{name}.txt").write_text(text)
    print(text)
    return 0


# ------------------------------------------------------------------ --wan: redirect over a WAN


# Every record of the load is owned by us, so eu's keyward redirects all of it over the link.
WAN_OWNERSHIP = """\
rules:
  - name: bench-redirect
    topics: ["wan.*"]
    by: key
    slots: 16
    owners: { us: ["0-15"] }
    on_foreign: redirect
    null_key: reject
default: allow
"""

WAN_LOAD = Load(1024, "none")
WAN_PATHS = ("direct-wan", "keyward-redirect")
PATHS["direct-wan"] = ("librdkafka straight to us", "wan")
PATHS["keyward-redirect"] = ("eu's keyward, redirected to us", "wan")


class Toxiproxy:
    """toxiproxy with one proxy, from `listen_port` to `upstream_port`, and a latency toxic on
    each direction: half the round trip client → broker (upstream), half broker → client
    (downstream), no jitter. toxiproxy holds each chunk it reads until the latency has passed
    since it was read, and reads on meanwhile: the link adds delay, not a rate limit."""

    PROXY = "wan"

    def __init__(self, workdir: Path, binary: Path, listen_port: int, upstream_port: int) -> None:
        self.workdir = workdir
        self.binary = binary
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.api_port = env.free_port()
        self.proc = start_relay(self.workdir, "toxiproxy",
                                [str(self.binary), "-host", "127.0.0.1", "-port", str(self.api_port)], self.api_port)
        self.api("POST", "/proxies", {"name": self.PROXY, "listen": f"127.0.0.1:{self.listen_port}",
                                      "upstream": f"127.0.0.1:{self.upstream_port}", "enabled": True})
        for stream in ("upstream", "downstream"):
            self.api("POST", f"/proxies/{self.PROXY}/toxics",
                     {"name": f"latency-{stream}", "type": "latency", "stream": stream, "toxicity": 1.0,
                      "attributes": {"latency": 0, "jitter": 0}})

    def set_rtt(self, rtt_ms: int) -> None:
        """toxiproxy takes whole milliseconds: an odd round trip's extra one goes upstream."""
        for stream, ms in (("upstream", (rtt_ms + 1) // 2), ("downstream", rtt_ms // 2)):
            self.api("POST", f"/proxies/{self.PROXY}/toxics/latency-{stream}",
                     {"attributes": {"latency": ms, "jitter": 0}})

    def api(self, method: str, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=json.dumps(body).encode(),
                                     method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"toxiproxy {method} {path}: {e.code} {e.read().decode(errors='replace')}") from None

    def stop(self) -> None:
        env.terminate(self.proc)


def round_trip_ms(port: int, samples: int = 20) -> dict:
    """The round trip a client sees on 127.0.0.1:`port`: ApiVersions v0 requests, one at a time
    on one connection (after one untimed), each timed from sent to its whole answer read.
    Includes the broker's own time to answer (well under a millisecond)."""
    request = struct.pack(">ihhih", 10, 18, 0, 1, -1)
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(samples + 1):
            t0 = time.perf_counter()
            s.sendall(request)
            (length,) = struct.unpack(">i", _read_exact(s, 4))
            _read_exact(s, length)
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"rtt_median_ms": statistics.median(times), "rtt_min_ms": times[0], "rtt_max_ms": times[-1]}


class WanBench(Bench):
    """--wan: two 1-broker clusters, eu (keyward's local region) and us. us's broker has a
    listener of its own for clients, WAN, advertised at toxiproxy's port, so a client that
    bootstraps at toxiproxy keeps talking through it; its PLAINTEXT listener (the harness's admin
    client) and its controller listener stay direct. eu's keyward knows us by toxiproxy's address,
    so its redirected writes take the same link. Every run has a fresh topic, created in both
    clusters with the same partitions (keyward redirects partition p to partition p)."""

    def __init__(self, settings: Settings, workdir: Path, loadgen: Path) -> None:
        super().__init__(settings, workdir, loadgen)
        self.links: list[dict] = []  # per round trip: as set and measured, and the paced rate

    def start(self) -> None:
        wan_port, self.toxi_port = env.free_port(), env.free_port()
        self.us = BenchCluster(self.workdir, {"WAN": (wan_port, self.toxi_port)}, name="us")
        self.eu = BenchCluster(self.workdir, {}, name="eu")
        self.cluster = self.us  # where the load lands: loadgen_run's broker CPU is us's broker's
        self.baseline = None
        log("starting Kafka: us, then eu (1 broker each, KRaft)")
        self.us.start()
        self.eu.start()
        self.toxiproxy = Toxiproxy(self.workdir, Path(os.environ["KEYWARD_TOXIPROXY_BIN"]), self.toxi_port, wan_port)
        self.toxiproxy.start()
        log(f"us broker {self.us.bootstrap}, its WAN listener 127.0.0.1:{wan_port} behind toxiproxy "
            f"127.0.0.1:{self.toxi_port} (pid {self.toxiproxy.proc.pid}); eu broker {self.eu.bootstrap}")
        # The stream journal (on unless KEYWARD_BENCH_WAN_JOURNAL=false): every redirecting
        # request waits for one save to eu's cluster.
        journal = os.environ.get("KEYWARD_BENCH_WAN_JOURNAL", "true")
        self.keyward = Keyward(self.workdir, "eu", {"eu": self.eu, "us": self.us}, WAN_OWNERSHIP, name="keyward",
                               cluster_yaml={"us": f"{{ bootstrap: ['127.0.0.1:{self.toxi_port}'] }}"},
                               extra_config=f"redirect: {{ journal: {journal} }}\n")
        self.keyward.start()
        log(f"eu's keyward {self.keyward.bootstrap} (pid {self.keyward.proc.pid}, {os.environ['KEYWARD_BIN']}, "
            f"stream journal {journal})")

    def stop(self) -> None:
        if getattr(self, "keyward", None):
            self.keyward.stop()
        if getattr(self, "toxiproxy", None):
            self.toxiproxy.stop()
        for c in (getattr(self, "us", None), getattr(self, "eu", None)):
            if c:
                c.stop()

    def bootstrap(self, path: str) -> str:
        return f"127.0.0.1:{self.toxi_port}" if path == "direct-wan" else self.keyward.bootstrap

    def relay_pid(self, path: str) -> int | None:
        return self.keyward.proc.pid if path == "keyward-redirect" else None

    def wan_topic(self, path: str, rtt: int, rnd: int) -> str:
        self.topic_seq += 1
        name = f"wan.{rtt}ms.r{rnd}.{path}.{self.topic_seq}"
        for c in (self.us, self.eu):
            c.create_topic(name, self.s.partitions, replication=1)
        return name

    def drop_topic(self, name: str) -> None:
        for c in (self.us, self.eu):
            self.delete_topic(name, c)

    def redirected(self) -> float:
        return self.keyward.metric("keyward_produce_records_total", rule="bench-redirect", decision="redirected")

    def journal_figures(self) -> dict[str, float]:
        """keyward's stream journal counters: saves asked for (and how many of them before the
        request's batches were sent), batches written, and the seconds the saves waited."""
        m = self.keyward.metric
        return {"saves": m("keyward_journal_saves_total"), "batches": m("keyward_journal_batches_total"),
                "first": m("keyward_journal_requests_total", save="before_sending"),
                "seconds": m("keyward_journal_save_seconds_sum"),
                "write_seconds": m("keyward_journal_write_seconds_sum"),
                "held": m("keyward_journal_answer_wait_seconds_count"),
                "held_seconds": m("keyward_journal_answer_wait_seconds_sum")}

    def wan_produce(self, path: str, rtt: int, rnd: int, *, messages: int = 0, seconds: float = 0,
                    rate: float = 0) -> dict:
        """One loadgen run on a fresh topic: librdkafka's idempotent producer, acks=all, 1 KiB
        records, `messages` of them as fast as it can, or `seconds` paced at `rate`. Before the
        clock starts, one record per partition, delivered and not counted: connections, producer
        ids and keyward's redirect pipelines are set up (several round trips) outside the run."""
        topic = self.wan_topic(path, rtt, rnd)
        args = ["produce", "--bootstrap", self.bootstrap(path), "--topic", topic, "--size", str(WAN_LOAD.size),
                "--acks", "all", "--idempotence", "true", "--warm-up", "true", "--tenants", str(TENANTS)]
        args += ["--messages", str(messages)] if messages else ["--seconds", str(seconds)]
        if rate:
            args += ["--rate", f"{rate:.0f}"]
        before = self.redirected() if path == "keyward-redirect" else None
        journal = self.journal_figures() if before is not None else None
        r = self.loadgen_run(args, path)
        if before is not None:
            r["redirected_records"] = self.redirected() - before
        if journal is not None:
            after = self.journal_figures()
            j = r["journal"] = {k: after[k] - journal[k] for k in after}
            if j["saves"]:
                log(f"    journal: {j['saves']:.0f} saves ({j['first']:.0f} before sending) in {j['batches']:.0f} "
                    f"batches ({1000 * j['write_seconds'] / max(j['batches'], 1):.2f} ms mean write), "
                    f"{1000 * j['seconds'] / max(j['saves'], 1):.2f} ms mean wait; answers held "
                    f"{1000 * j['held_seconds'] / max(j['held'], 1):.2f} ms on average after their parts landed")
        r["rtt_ms"] = rtt
        self.drop_topic(topic)
        return r

    def warm_up(self) -> None:
        """One full-load run of each path, not counted: the brokers' JIT, keyward's first
        redirect pipeline and connections."""
        log("warm-up (not counted)")
        self.toxiproxy.set_rtt(self.s.wan_rtts[0])
        for path in WAN_PATHS:
            r = self.wan_produce(path, self.s.wan_rtts[0], -1, messages=self.s.wan_messages)
            r.update(round=-1, path=path, kind="warmup")
            self.warmups.append(r)
            log(f"  warm-up {PATHS[path][0]:32} {r.get('msgs_per_s', 0):10.0f} msg/s {r.get('mb_per_s', 0):7.1f} MB/s")

    def at_rtt(self, rtt: int) -> None:
        """The link set to `rtt` and measured (into `links`, so an interrupted run still reports
        its rounds); then the full-load rounds, both paths in alternating order; then the paced
        rounds, both paths at one rate: half the median full-load rate of the slower path, so
        neither is saturated and their latencies compare."""
        self.toxiproxy.set_rtt(rtt)
        link = {"rtt_ms": rtt, **round_trip_ms(self.toxi_port),
                "direct_rtt_ms": round_trip_ms(self.us.nodes[0].port)["rtt_median_ms"]}
        self.links.append(link)
        log(f"link set to {rtt} ms round trip: measured {link['rtt_median_ms']:.2f} ms median "
            f"({link['rtt_min_ms']:.2f}-{link['rtt_max_ms']:.2f}; {link['direct_rtt_ms']:.2f} ms without the link)")
        for rnd in range(self.s.rounds):
            log(f"{rtt} ms: full-load round {rnd + 1}/{self.s.rounds}")
            for path in rotated(list(WAN_PATHS), rnd):
                self.record(rnd, WAN_LOAD, path, "full", self.wan_produce(path, rtt, rnd, messages=self.s.wan_messages))
        medians = [median([r["msgs_per_s"] for r in self.runs
                           if r.get("ok") and r["rtt_ms"] == rtt and r["kind"] == "full" and r["path"] == p])
                   for p in WAN_PATHS]
        if any(m is None for m in medians):
            log(f"{rtt} ms: no paced rounds, a path has no successful full-load run")
            return
        link["paced_rate"] = min(medians) / 2
        for rnd in range(self.s.rounds):
            log(f"{rtt} ms: paced round {rnd + 1}/{self.s.rounds} ({link['paced_rate']:.0f} msg/s)")
            for path in rotated(list(WAN_PATHS), rnd):
                self.record(rnd, WAN_LOAD, path, "paced",
                            self.wan_produce(path, rtt, rnd, seconds=self.s.wan_paced_seconds, rate=link["paced_rate"]))


def wan_summary(runs: list[dict], links: list[dict], rounds: int) -> list[dict]:
    """One row per (round trip, path): medians over rounds; keyward-redirect ÷ direct-wan and
    keyward-redirect's p99 − direct-wan's taken round by round, then the median."""
    def get(rtt, rnd, path, kind):
        return next((r for r in runs if (r["rtt_ms"], r["round"], r["path"], r["kind"]) == (rtt, rnd, path, kind)
                     and r.get("ok")), None)

    rows = []
    for link in links:
        rtt = link["rtt_ms"]
        for path in WAN_PATHS:
            per = {k: [get(rtt, i, path, k) for i in range(rounds)] for k in ("full", "paced")}
            direct = {k: [get(rtt, i, "direct-wan", k) for i in range(rounds)] for k in ("full", "paced")}

            def med(kind, field):
                return median([r[field] for r in per[kind] if r and field in r])

            ratios = [p["msgs_per_s"] / d["msgs_per_s"] for p, d in zip(per["full"], direct["full"]) if p and d]
            added = [p["p99_ms"] - d["p99_ms"] for p, d in zip(per["paced"], direct["paced"]) if p and d]
            redirected = [(r.get("redirected_records", 0), r["delivered"]) for k in ("full", "paced") for r in per[k]
                          if r and path == "keyward-redirect"]
            rows.append({
                **link, "path": path,
                "rounds_ok": sum(1 for r in per["full"] if r),
                "msgs_per_s": med("full", "msgs_per_s"), "mb_per_s": med("full", "mb_per_s"),
                "ratio": median(ratios), "ratios": ratios,
                "p50_full": med("full", "p50_ms"), "p99_full": med("full", "p99_ms"),
                "p50_paced": med("paced", "p50_ms"), "p99_paced": med("paced", "p99_ms"),
                "p999_paced": med("paced", "p999_ms"),
                "added_p99_paced": median(added), "added_p99s_paced": added,
                "cpu_s_per_gb": median([r["relay_cpu_s"] / (r["bytes"] / 1e9) for r in per["full"]
                                        if r and "relay_cpu_s" in r and r.get("bytes")]),
                "all_redirected": all(n >= d for n, d in redirected) if redirected else None,
            })
    return rows


def wan_report(settings: Settings, bench: WanBench, links: list[dict], started: float) -> str:
    rows = wan_summary(bench.runs, links, settings.rounds)
    failed = [r for r in bench.runs if not r.get("ok")]
    head = (
        "| round trip set (measured) | path | msg/s | MB/s | × direct-wan | each round | p50 / p99 full (ms) "
        "| paced at msg/s | p50 / p99 / p99.9 paced (ms) | p99 paced − direct-wan (ms) | each round | keyward CPU-s/GB |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    lines = []
    for r in rows:
        direct = r["path"] == "direct-wan"
        lines.append(
            f"| {r['rtt_ms']} ms ({r['rtt_median_ms']:.1f}) | {PATHS[r['path']][0]} | {fmt(r['msgs_per_s'], ',.0f')} "
            f"| {fmt(r['mb_per_s'], '.1f')} | {'1' if direct else fmt(r['ratio'], '.3f')} "
            f"| {'' if direct else ', '.join(format(x, '.3f') for x in r['ratios'])} "
            f"| {fmt(r['p50_full'], '.0f')} / {fmt(r['p99_full'], '.0f')} | {fmt(r.get('paced_rate'), ',.0f')} "
            f"| {fmt(r['p50_paced'], '.1f')} / {fmt(r['p99_paced'], '.1f')} / {fmt(r['p999_paced'], '.1f')} "
            f"| {'' if direct else fmt(r['added_p99_paced'], '+.1f')} "
            f"| {'' if direct else ', '.join(format(x, '+.1f') for x in r['added_p99s_paced'])} "
            f"| {'' if direct else fmt(r['cpu_s_per_gb'], '.2f')} |"
        )
    targets = []
    for r in rows:
        if r["path"] != "keyward-redirect":
            continue
        mark = "n/a" if r["ratio"] is None else ("met" if r["ratio"] >= 0.8 else "MISSED")
        targets.append(f"| redirected throughput at {r['rtt_ms']} ms ≥ 0.8 × direct-wan | {fmt(r['ratio'], '.3f')} "
                       f"| {', '.join(format(x, '.3f') for x in r['ratios'])} | {mark} |")
        targets.append(f"| p99 added latency of a redirected write at {r['rtt_ms']} ms (paced, same load) "
                       f"| {fmt(r['added_p99_paced'], '+.1f')} ms "
                       f"| {', '.join(format(x, '+.1f') for x in r['added_p99s_paced'])} | reported |")
    out = [
        f"# dev/bench --wan results ({'quick' if settings.quick else 'full'} run)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {time.monotonic() - started:.0f} s, {os.cpu_count()} CPUs, "
        f"load average at the end {os.getloadavg()[0]:.2f}. keyward = {os.environ['KEYWARD_BIN']}; "
        f"librdkafka {librdkafka_version()}; toxiproxy {Path(os.environ['KEYWARD_TOXIPROXY_BIN']).name}.",
        "",
        f"Two 1-broker clusters on this machine, eu and us; us's client listener behind toxiproxy, half the round "
        f"trip on each direction. direct-wan: librdkafka straight to us through toxiproxy. keyward-redirect: "
        f"librdkafka to eu's keyward, a `by: key` rule with `on_foreign: redirect` and every slot owned by us, so "
        f"keyward redirects every record to us through the same toxiproxy. Both: idempotent producer, acks=all, "
        f"linger.ms 5, 1 KiB records, {settings.partitions} partitions, a fresh topic per run, one record per "
        f"partition delivered before the clock starts (not counted). {settings.rounds} "
        f"rounds per round trip, the paths in alternating order. Full load: {settings.wan_messages:,} records as "
        f"fast as the client goes, timed from the first produce to the last delivery report. Paced: "
        f"{settings.wan_paced_seconds:g} s at half the slower path's median full-load rate, the same rate on "
        f"both paths; latency is librdkafka's, produce() to delivery report. Round trip measured: median of 20 "
        f"ApiVersions round trips through toxiproxy.",
        "",
        head + "\n".join(lines) + "\n",
        "## Targets (issue 13)",
        "",
        "| target | measured (median) | each round | |\n|---|--:|--:|---|\n" + "\n".join(targets) + "\n",
    ]
    redirected = [r["all_redirected"] for r in rows if r["all_redirected"] is not None]
    if redirected:
        out.append("keyward's `keyward_produce_records_total{decision=\"redirected\"}` counted every delivered record "
                   "of every keyward-redirect run.\n" if all(redirected) else
                   "**Warning:** keyward's `decision=\"redirected\"` count fell short of the delivered records on a "
                   "keyward-redirect run: not everything went over the link.\n")
    if failed:
        out.append(f"**{len(failed)} run(s) failed** (left out of the medians): " + ", ".join(
            f"{r['rtt_ms']} ms r{r['round']} {r['path']} {r['kind']}" for r in failed) + "\n")
    return "\n".join(out)


def run_wan(settings: Settings, loadgen: Path, started: float) -> int:
    if not os.environ.get("KEYWARD_TOXIPROXY_BIN"):
        raise SystemExit("--wan needs KEYWARD_TOXIPROXY_BIN, the toxiproxy server binary (dev/bench --wan installs it)")
    workdir = Path(tempfile.mkdtemp(prefix="keyward-bench-wan-"))
    bench = WanBench(settings, workdir, loadgen)
    try:
        bench.start()
        bench.warm_up()
        for rtt in settings.wan_rtts:
            bench.at_rtt(rtt)
    except KeyboardInterrupt:
        log("interrupted; reporting what ran")
    finally:
        bench.stop()
    text = wan_report(settings, bench, bench.links, started)
    (settings.out / "wan.md").write_text(text)
    (settings.out / "wan.json").write_text(json.dumps({"settings": {**settings.__dict__, "out": str(settings.out)},
                                                        "links": bench.links, "runs": bench.runs,
                                                        "warmups": bench.warmups}, indent=1, default=str))
    print(text)
    log(f"wrote {settings.out / 'wan.md'} and wan.json (work dir {workdir})")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if bench.runs and all(r.get("ok") for r in bench.runs) else 1


# ------------------------------------------------------------------ --latency: unloaded latency


LATENCY_LOAD = Load(100, "none")
LATENCY_PATHS = ("direct", "haproxy", "key")


def latency_round(bench: Bench, rnd: int) -> None:
    """Every path once, in an order rotated by round, on a fresh topic each: one 100 B record at
    a time (acks=all, linger.ms 0; the next record is produced when the last one's delivery
    report is in), after one record per partition delivered and not counted (connections
    made). Round -1 is a warm-up, kept apart from the results."""
    for path in rotated(list(LATENCY_PATHS), max(rnd, 0)):
        topic = bench.new_topic(path, LATENCY_LOAD, rnd)
        args = ["produce", "--bootstrap", bench.bootstrap(path), "--topic", topic,
                "--size", str(LATENCY_LOAD.size), "--acks", "all", "--linger-ms", "0", "--one-at-a-time", "true",
                "--warm-up", "true", "--messages", str(bench.s.latency_messages), "--tenants", str(TENANTS)]
        r = bench.loadgen_run(args, path)
        if rnd < 0:
            r.update(round=rnd, path=path, kind="warmup")
            bench.warmups.append(r)
            log(f"  warm-up {PATHS[path][0]:28} p50 {r.get('p50_ms', 0) * 1e3:6.0f} µs "
                f"p99 {r.get('p99_ms', 0) * 1e3:6.0f} µs")
        else:
            bench.record(rnd, LATENCY_LOAD, path, "latency", r)
        bench.delete_topic(topic)


def latency_report(settings: Settings, bench: Bench, started: float) -> str:
    """Per path: p50, p99, p99.9 in µs (medians over rounds); for haproxy and keyward, what they
    add to direct's, taken round by round, then the median."""
    def get(rnd, path):
        return next((r for r in bench.runs if (r["round"], r["path"]) == (rnd, path) and r.get("ok")), None)

    quantiles = (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms"))
    rows = []
    for path in LATENCY_PATHS:
        per = [get(i, path) for i in range(settings.rounds)]
        direct = [get(i, "direct") for i in range(settings.rounds)]
        row = {"path": path, "samples": sum(r["delivered"] for r in per if r)}
        for q, field in quantiles:
            row[q] = median([r[field] * 1e3 for r in per if r])
            row[f"added_{q}s"] = [(p[field] - d[field]) * 1e3 for p, d in zip(per, direct) if p and d]
            row[f"added_{q}"] = median(row[f"added_{q}s"])
        rows.append(row)

    head = ("| path | samples | p50 (µs) | p99 (µs) | p99.9 (µs) | p50 − direct | p99 − direct | p99.9 − direct "
            "| p50 − direct, each round | p99 − direct, each round |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
    lines = []
    for r in rows:
        direct = r["path"] == "direct"
        lines.append(
            f"| {PATHS[r['path']][0]} | {r['samples']:,} | {fmt(r['p50'], '.0f')} | {fmt(r['p99'], '.0f')} "
            f"| {fmt(r['p99.9'], '.0f')} | "
            + " | ".join("" if direct else fmt(r[f"added_{q}"], "+.0f") for q, _ in quantiles)
            + " | " + " | ".join("" if direct else ", ".join(format(x, "+.0f") for x in r[f"added_{q}s"])
                                  for q in ("p50", "p99")) + " |"
        )
    key = next(r for r in rows if r["path"] == "key")
    targets = []
    for q, limit in (("p50", 40), ("p99", 200)):
        v = key[f"added_{q}"]
        mark = "n/a" if v is None else ("met" if v <= limit else "MISSED")
        targets.append(f"| keyward (by: key) adds ≤ {limit} µs at {q} over direct | {fmt(v, '+.0f')} µs "
                       f"| {', '.join(format(x, '+.0f') for x in key[f'added_{q}s'])} | {mark} |")
    failed = [r for r in bench.runs if not r.get("ok")]
    out = [
        f"# dev/bench --latency results ({'quick' if settings.quick else 'full'} run)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {time.monotonic() - started:.0f} s, {os.cpu_count()} CPUs, "
        f"load average at the end {os.getloadavg()[0]:.2f}. keyward = {os.environ['KEYWARD_BIN']}; "
        f"librdkafka {librdkafka_version()}.",
        "",
        f"Unloaded latency: one 100 B record at a time, acks=all, linger.ms 0, the next produced when the last "
        f"one's delivery report is in; {settings.latency_messages:,} records per run, {settings.rounds} rounds "
        f"(after one warm-up round, not counted), the paths in a rotated order, {settings.partitions} partitions, "
        f"1 broker. Latency is librdkafka's, produce() to delivery report. Quantiles are medians over rounds; "
        f"\"− direct\" is taken round by round (same round), then the median.",
        "",
        head + "\n".join(lines) + "\n",
        "## Targets (issue 18)",
        "",
        "| target | measured (median) | each round | |\n|---|--:|--:|---|\n" + "\n".join(targets) + "\n",
    ]
    if failed:
        out.append(f"**{len(failed)} run(s) failed** (left out of the medians): " + ", ".join(
            f"r{r['round']} {r['path']}" for r in failed) + "\n")
    return "\n".join(out)


def run_latency(settings: Settings, loadgen: Path, started: float) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="keyward-bench-latency-"))
    bench = Bench(settings, workdir, loadgen)
    try:
        bench.start()
        log("warm-up round (not counted)")
        latency_round(bench, -1)
        for rnd in range(settings.rounds):
            log(f"latency round {rnd + 1}/{settings.rounds}")
            latency_round(bench, rnd)
    except KeyboardInterrupt:
        log("interrupted; reporting what ran")
    finally:
        bench.stop()
    text = latency_report(settings, bench, started)
    (settings.out / "latency.md").write_text(text)
    (settings.out / "latency.json").write_text(json.dumps({"settings": {**settings.__dict__, "out": str(settings.out)},
                                                            "runs": bench.runs, "warmups": bench.warmups},
                                                           indent=1, default=str))
    print(text)
    log(f"wrote {settings.out / 'latency.md'} and latency.json (work dir {workdir})")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if bench.runs and all(r.get("ok") for r in bench.runs) else 1



# ------------------------------------------------------------------ --tables: large ownership tables


class NoCluster:
    """A cluster entry for keyward's config that nothing listens at: the table measurements
    need keyward's admin listener, not a broker."""

    addresses = ["127.0.0.1:9"]
    nodes: list = []


def big_table(tenants: int, slots: int, run: int = 64) -> str:
    """A `by: key` rule of `slots` slots, owned by eu and us in alternating ranges of `run`
    slots, and a `by: header` rule of `tenants` tenant values, every other one eu's."""
    ranges = {"eu": [], "us": []}
    for first in range(0, slots, run):
        region = "eu" if (first // run) % 2 == 0 else "us"
        ranges[region].append(f'"{first}-{min(first + run, slots) - 1}"')
    values = {"eu": [], "us": []}
    for i in range(tenants):
        values["eu" if i % 2 == 0 else "us"].append(f"t{i:06d}")
    return "\n".join([
        "rules:",
        "  - name: orders",
        '    topics: ["orders.*"]',
        "    by: key",
        f"    slots: {slots}",
        f"    owners: {{ eu: [{', '.join(ranges['eu'])}], us: [{', '.join(ranges['us'])}] }}",
        "  - name: tenants",
        '    topics: ["tenants.*"]',
        "    by: header",
        "    header: tenant",
        "    owners:",
        f"      eu: [{', '.join(values['eu'])}]",
        f"      us: [{', '.join(values['us'])}]",
        "    unmatched: reject",
        "default: allow",
        "",
    ])


TABLES = {"small": (16, 16), "large": (100_000, 65_536)}


def table_round(workdir: Path, rounds: int) -> dict:
    """keyward started with each table (RSS after start), then the table file swapped and
    `POST /reload` timed, `rounds` times each way: small to large and back."""
    texts = {name: big_table(*size) for name, size in TABLES.items()}
    out: dict = {"file_bytes": {name: len(t.encode()) for name, t in texts.items()}, "rss_kib": {}, "reload_ms": {}}
    for name, text in texts.items():
        kw = Keyward(workdir, "eu", {"eu": NoCluster(), "us": NoCluster()}, text, name=f"keyward-{name}")
        kw.start(timeout_s=60)
        try:
            time.sleep(1)
            out["rss_kib"][name] = status_kib(kw.pid, "VmRSS")
        finally:
            kw.stop()
    kw = Keyward(workdir, "eu", {"eu": NoCluster(), "us": NoCluster()}, texts["small"], name="keyward-reload")
    kw.start(timeout_s=60)
    try:
        reset_peak_rss(kw.pid)
        rss_before = status_kib(kw.pid, "VmRSS")
        for rnd in range(rounds):
            for name in ("large", "small"):
                staged = kw.table_path.with_suffix(".next")
                staged.write_text(texts[name])
                staged.replace(kw.table_path)
                started = time.perf_counter()
                status, body = kw.admin("/reload", method="POST")
                took = (time.perf_counter() - started) * 1000
                if status == 200 and json.loads(body)["result"] == "unchanged":
                    # keyward's file watch, woken by the same write, loaded it first (its
                    # debounce is 200 ms; a busy machine can take longer to send the POST): no
                    # time to take from this one.
                    out["raced_file_watch"] = out.get("raced_file_watch", 0) + 1
                    log(f"tables: the file watch loaded the {name} table before POST /reload; sample skipped")
                    continue
                if status != 200 or json.loads(body)["result"] != "loaded":
                    raise RuntimeError(f"POST /reload answered {status}: {body}")
                _, ownership = kw.admin("/ownership")
                rules = json.loads(ownership)["table"]["rules"]
                if len(rules) != 2:
                    raise RuntimeError(f"the reloaded table has {len(rules)} rules")
                out["reload_ms"].setdefault(f"to {name}", []).append(took)
                out.setdefault("serving_ms", {}).setdefault(f"to {name}", []).append(json.loads(body)["load_ms"])
                if name == "large":
                    out.setdefault("rss_after_large_kib", []).append(status_kib(kw.pid, "VmRSS"))
            log(f"tables round {rnd + 1}/{rounds}: " + ", ".join(
                f"{k} serving after {out['serving_ms'][k][-1]:.0f} ms, answered after {v[-1]:.0f} ms"
                for k, v in out["reload_ms"].items()))
        out["reload_process_rss_kib"] = {"start": rss_before, "end": status_kib(kw.pid, "VmRSS"),
                                          "peak": status_kib(kw.pid, "VmHWM")}
    finally:
        kw.stop()
    return out


def tables_report(settings: Settings, result: dict, started: float) -> str:
    size = lambda name: f"{TABLES[name][0]:,} tenants, {TABLES[name][1]:,} slots"  # noqa: E731
    out = [
        f"# dev/bench --tables results ({'quick' if settings.quick else 'full'} run)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.monotonic() - started:.0f} s, keyward "
        f"{os.environ['KEYWARD_BIN']}. Tables: a `by: key` rule (slots in alternating ranges of 64 for eu and "
        "us) and a `by: header` rule (every other tenant eu's). Reload: the table file replaced, then "
        "`POST /reload` timed until its answer (the new table is in force when it answers; the file watch's "
        "debounce is not included); each reload is checked through `GET /ownership`. *Serving after*: the "
        "answer's `load_ms`, keyward's own clock from reading the file to the swap (parse, validation, hash). "
        "*Answered after*: the whole `POST /reload` round trip, which also builds the summary of changes for "
        "the log and frees the old table.",
        "",
        "| table | file | keyward RSS after start | reloads to it | serving after: p50 / max (ms) "
        "| answered after: p50 / max (ms) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name in TABLES:
        times = result["reload_ms"].get(f"to {name}", [])
        serving = result["serving_ms"].get(f"to {name}", [])
        out.append(f"| {name} ({size(name)}) | {result['file_bytes'][name] / 1024:,.0f} KiB | "
                   f"{result['rss_kib'][name] / 1024:.1f} MiB | {len(times)} | "
                   f"{statistics.median(serving):.0f} / {max(serving):.0f} | "
                   f"{statistics.median(times):.0f} / {max(times):.0f} |")
    rss = result["reload_process_rss_kib"]
    table_mib = (result["rss_kib"]["large"] - result["rss_kib"]["small"]) / 1024
    out += [
        "",
        f"The large table costs {table_mib:.1f} MiB of RSS more than the small one at start. One process "
        f"reloading between them: RSS {rss['start'] / 1024:.1f} MiB before, {rss['end'] / 1024:.1f} MiB after, "
        f"peak {rss['peak'] / 1024:.1f} MiB (VmHWM). Samples skipped because keyward's file watch loaded the "
        f"table before `POST /reload` did: {result.get('raced_file_watch', 0)}.",
        "",
        "Target (issue 18): reload within 200 ms: "
        + ("met" if max(result["serving_ms"]["to large"]) <= 200 else "**MISSED**")
        + " (the slowest reload to the large table, until it serves).",
        "",
    ]
    return "\n".join(out)


def run_tables(settings: Settings, started: float) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="keyward-bench-tables-"))
    try:
        result = table_round(workdir, settings.rounds * 2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(settings, "tables", tables_report(settings, result, started), result)
    return 0


def write_report(settings: Settings, name: str, text: str, data: dict) -> None:
    """Prints a mode's report and writes it to <out>/<name>.md, its figures to <name>.json."""
    (settings.out / f"{name}.md").write_text(text)
    (settings.out / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(text)
    log(f"wrote {settings.out / (name + '.md')} and {name}.json")


# ------------------------------------------------------------------ --metadata: a large cluster's metadata

META_TOPICS, META_PARTITIONS = 50, 100


def bootstrap_seconds(bootstrap: str) -> float:
    """A new librdkafka client's time from its creation to the metadata of every topic:
    connecting, ApiVersions, and a Metadata request for all topics (what `list_topics` asks)."""
    from confluent_kafka import Producer

    started = time.perf_counter()
    producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
    metadata = producer.list_topics(timeout=60)
    took = time.perf_counter() - started
    big = [t for name, t in metadata.topics.items() if name.startswith("big.")]
    partitions = sum(len(t.partitions) for t in big)
    if len(big) != META_TOPICS or partitions != META_TOPICS * META_PARTITIONS:
        raise RuntimeError(f"{bootstrap}: {len(big)} topics, {partitions} partitions")
    return took


def run_metadata(settings: Settings, started: float) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="keyward-bench-metadata-"))
    replication = int(os.environ.get("KEYWARD_BENCH_METADATA_REPLICATION", "3"))
    cluster = KafkaCluster("big", 3, workdir, heap="1g")
    kw = None
    result: dict = {"topics": META_TOPICS, "partitions": META_TOPICS * META_PARTITIONS, "replication": replication,
                    "seconds": {"direct": [], "keyward": []}}
    try:
        log("starting Kafka (3 brokers, KRaft)")
        cluster.start()
        created = time.monotonic()
        for i in range(META_TOPICS):
            cluster.create_topic(f"big.{i:02d}", partitions=META_PARTITIONS, replication=replication, timeout_s=300)
        log(f"{META_TOPICS} topics of {META_PARTITIONS} partitions (replication {replication}) in "
            f"{time.monotonic() - created:.0f} s")
        kw = Keyward(workdir, "eu", {"eu": cluster}, "rules: []\ndefault: allow\n", name="keyward")
        kw.start()
        paths = {"direct": cluster.bootstrap, "keyward": kw.bootstrap}
        # create_topic waits for leaders, yet on a busy machine a broker has answered Metadata
        # without the last topic for a moment after that.
        deadline = time.monotonic() + 60
        while True:
            try:
                bootstrap_seconds(cluster.bootstrap)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        for name, bootstrap in paths.items():  # warm-up: keyward learns the brokers and opens their ports
            bootstrap_seconds(bootstrap)
        rss_before = status_kib(kw.pid, "VmRSS")
        reset_peak_rss(kw.pid)
        rounds = settings.rounds * 4
        for rnd in range(rounds):
            order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
            for name in order:
                result["seconds"][name].append(bootstrap_seconds(paths[name]))
            log(f"metadata round {rnd + 1}/{rounds}: " + ", ".join(
                f"{n} {result['seconds'][n][-1] * 1000:.1f} ms" for n in paths))
        result["keyward_rss_kib"] = {"before": rss_before, "peak": status_kib(kw.pid, "VmHWM")}
    finally:
        if kw:
            kw.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(settings, "metadata", metadata_report(settings, result, started), result)
    return 0


def metadata_report(settings: Settings, result: dict, started: float) -> str:
    ms = {name: statistics.median(v) * 1000 for name, v in result["seconds"].items()}
    added = [(k - d) / d * 100 for d, k in zip(result["seconds"]["direct"], result["seconds"]["keyward"])]
    rss = result["keyward_rss_kib"]
    out = [
        f"# dev/bench --metadata results ({'quick' if settings.quick else 'full'} run)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.monotonic() - started:.0f} s, keyward "
        f"{os.environ['KEYWARD_BIN']}. A 3-broker cluster with {result['topics']} topics of "
        f"{result['partitions'] // result['topics']} partitions (replication {result['replication']}); a new "
        "librdkafka client each time, from its creation to the metadata of every topic (`list_topics`), "
        f"directly and through keyward, alternating, {len(added)} times each after a warm-up.",
        "",
        "| path | bootstrap p50 (ms) | min / max (ms) |",
        "|---|--:|--:|",
    ]
    for name, values in result["seconds"].items():
        out.append(f"| {name} | {ms[name]:.1f} | {min(values) * 1000:.1f} / {max(values) * 1000:.1f} |")
    out += [
        "",
        f"Added by keyward: median of the rounds {statistics.median(added):+.1f} % "
        f"(each round: {', '.join(f'{a:+.0f}' for a in added)}). keyward's RSS {rss['before'] / 1024:.1f} MiB "
        f"before the rounds, peak {rss['peak'] / 1024:.1f} MiB during them.",
        "",
        "Target (issue 18): added bootstrap time at most 10 %: "
        + ("met" if statistics.median(added) <= 10 else "**MISSED**") + " (median of the rounds).",
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------ --connections: many connections, reloads under load

SCALE_TOPIC, SCALE_PARTITIONS = "tenants.scale", 4
# keyward's descriptors beyond two per connection kept free when choosing how many connections
# to open (admin connections, table files read on reload, the metrics scrape): reaching the limit
# would fail an accept or an upstream connect, which is the failure this case must not cause.
FD_HEADROOM = 64


def percentile(xs: list[float], q: float) -> float | None:
    """The q-quantile (0-1) of xs, nearest rank."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))]


def open_file_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a running process (/proc/PID/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise KeyError("Max open files")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def worker_threads(pid: int) -> int:
    """tokio's runtime workers (threads named "tokio-rt-worker")."""
    return sum(1 for t in Path(f"/proc/{pid}/task").iterdir()
               if (t / "comm").read_text().strip() == "tokio-rt-worker")


class ScaleClient:
    """dev/scale_client.py in its own process (its CPU is its own, not the benchmark's), one
    JSON command and answer at a time."""

    def __init__(self, bootstrap: str, log_path: Path) -> None:
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [*env.pdeathsig_prefix(), sys.executable, str(ROOT / "dev/scale_client.py"), "--bootstrap", bootstrap,
             "--topic", SCALE_TOPIC, "--partitions", str(SCALE_PARTITIONS), "--tenant", "t000000"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            raise RuntimeError(f"dev/scale_client.py exited with {self.proc.wait()}:\n{env.tail(Path(self.log.name), 30)}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"dev/scale_client.py: {answer['error']}")
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


def reload_tables() -> list[str]:
    """Two 100,000-tenant tables (item 4's large table) that differ in one tenant nobody writes,
    so every reload swaps in a real change."""
    return [big_table(100_000, 65_536), big_table(100_001, 65_536)]


def reload_every_second(kw: Keyward, tables: list[str], stop: threading.Event, out: list[dict]) -> None:
    """`POST /reload` once a second, alternating the tables, until `stop`; every answer in `out`."""
    due = time.monotonic()
    for i in itertools.count(1):
        if stop.is_set():
            return
        staged = kw.table_path.with_suffix(".next")
        staged.write_text(tables[i % 2])
        staged.replace(kw.table_path)
        started = time.perf_counter()
        try:
            status, body = kw.admin("/reload", method="POST")
        except OSError as e:
            status, body = 0, str(e)
        took = (time.perf_counter() - started) * 1000
        answer = json.loads(body) if status == 200 else {}
        # "unchanged": the file watch, woken by the same write, loaded this table first.
        ok = answer.get("result") in ("loaded", "unchanged")
        out.append({"ok": ok, "result": answer.get("result"), "answered_ms": took, "load_ms": answer.get("load_ms"),
                    **({} if ok else {"status": status, "body": body[:300]})})
        due += 1
        stop.wait(max(0.0, due - time.monotonic()))


def scale_phase(kw: Keyward, client: ScaleClient, broker: int, seconds: float, rate: float,
                reload_tables_: list[str] | None = None) -> dict:
    """One produce phase of the open connections' active tenth, with keyward's, the broker's and the
    machine's CPU around it; with `reload_tables_`, `POST /reload` every second meanwhile."""
    kw_cpu0, broker_cpu0, busy0 = cpu_seconds(kw.pid), cpu_seconds(broker), machine_busy_seconds()
    # Every table write also wakes keyward's file watch, which reads and parses the file again
    # after its 200 ms debounce (and finds it loaded, mostly): counted, as it costs CPU too.
    watched0 = kw.metric("keyward_table_reloads_total", trigger="file")
    reloads: list[dict] = []
    stop = threading.Event()
    reloader = None
    if reload_tables_:
        reloader = threading.Thread(target=reload_every_second, args=(kw, reload_tables_, stop, reloads))
        reloader.start()
    try:
        r = client.ask(cmd="produce", seconds=seconds, rate=rate)
    finally:
        stop.set()
        if reloader:
            reloader.join()
    lat = r["latency_ms"]
    lags = r.pop("loop_lag_ms")
    r.update(
        requests=len(lat), p50_ms=percentile(lat, 0.5), p99_ms=percentile(lat, 0.99), p999_ms=percentile(lat, 0.999),
        max_ms=max(lat, default=None), loop_lag_p99_ms=percentile(lags, 0.99),
        keyward_cpu_s=cpu_seconds(kw.pid) - kw_cpu0, broker_cpu_s=cpu_seconds(broker) - broker_cpu0,
        rss_kib=status_kib(kw.pid, "VmRSS"), fds=open_fds(kw.pid), reloads=reloads,
        file_watch_reloads=kw.metric("keyward_table_reloads_total", trigger="file") - watched0,
    )
    ours = r["keyward_cpu_s"] + r["broker_cpu_s"] + r["client_cpu_s"]
    r["others_cores"] = max(0.0, machine_busy_seconds() - busy0 - ours) / r["wall_s"]
    return r


def probe(client: ScaleClient, count: int) -> dict:
    """Accept latency one connection at a time: `count` connections opened, asked ApiVersions
    and closed one after the other, beside those already open."""
    r = client.ask(cmd="probe", count=count)
    lat = r.pop("accept_ms")
    return {**r, "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99), "max_ms": max(lat, default=None)}


def wait_for_open_connections(kw: Keyward, count: int, timeout_s: float = 60) -> None:
    """Until keyward counts `count` client connections open (closing is asynchronous, and a
    connection still counted would take a place under limits.max_connections)."""
    deadline = time.monotonic() + timeout_s
    while (now := kw.metric("keyward_client_connections_open")) != count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"keyward still counts {now:.0f} open client connections, expected {count}")
        time.sleep(0.2)


def connections_case(settings: Settings, workdir: Path, cluster: BenchCluster, workers: int, rounds: int,
                     reloads: bool) -> dict:
    """keyward with `workers` runtime threads and the large table: per round, the small count of
    connections producing, then the large count (accept latency, RSS, fds) producing, (with
    `reloads`) with a reload every second, producing again, and the small count again: each
    comparison is of phases on both sides of the other (small, many, reload, many, small)."""
    tables = reload_tables()
    os.environ["TOKIO_WORKER_THREADS"] = str(workers)
    try:
        kw = Keyward(workdir, "eu", {"eu": cluster, "us": NoCluster()}, tables[0], name=f"keyward-w{workers}")
        kw.start(timeout_s=60)
    finally:
        del os.environ["TOKIO_WORKER_THREADS"]
    out: dict = {"workers": workers, "worker_threads_seen": worker_threads(kw.pid), "rounds": []}
    client = None
    try:
        broker = cluster.nodes[0].proc.pid
        limit, base_fds = open_file_limit(kw.pid), open_fds(kw.pid)
        # Two descriptors per client connection: the client's socket and keyward's to the broker.
        fits = (limit - base_fds - FD_HEADROOM) // 2
        many = min(settings.scale_connections, fits)
        out.update(open_file_limit=limit, base_fds=base_fds, fits=fits, connections=many,
                   rss_start_kib=status_kib(kw.pid, "VmRSS"))
        if many < settings.scale_connections:
            log(f"keyward's open-file limit is {limit} and it holds {base_fds} descriptors idle: "
                f"{settings.scale_connections:,} connections need {2 * settings.scale_connections + base_fds:,}; "
                f"opening {many:,}")
        client = ScaleClient(kw.bootstrap, workdir / f"scale-client-w{workers}.log")
        small, rate, seconds = settings.scale_small, settings.scale_rate, settings.scale_seconds
        # Warm-up, not counted: all connections open and producing once, then back to the small
        # count. The first time a fresh broker met 10,000 connections it took most of both cores
        # for some 20 s (the JIT, the heap growing), which made the first measured phase the
        # slowest whatever it measured.
        client.ask(cmd="grow", to=many, concurrency=settings.scale_concurrency)
        warm = scale_phase(kw, client, broker, settings.scale_seconds, rate)
        out["fresh_peak_rss_kib"] = status_kib(kw.pid, "VmHWM")  # a process that never had them open before
        client.ask(cmd="shrink", to=small)
        wait_for_open_connections(kw, small)
        out["warm_up"] = warm
        log(f"scale warm-up (w{workers}): {warm['requests']:,} requests, p99 {warm['p99_ms']:.1f} ms, "
            f"broker {warm['broker_cpu_s'] / warm['wall_s']:.2f} cores, failures {warm['failures']}")
        for rnd in range(rounds):
            reset_peak_rss(kw.pid)
            result: dict = {"round": rnd, "phases": {}}
            phases = result["phases"]
            phases["small"] = scale_phase(kw, client, broker, seconds, rate)
            result["probe_small"] = probe(client, settings.scale_probes)
            grown = client.ask(cmd="grow", to=many, concurrency=settings.scale_concurrency)
            accept = grown.pop("accept_ms")
            time.sleep(1)
            result["grow"] = {**grown, "accept_p50_ms": percentile(accept, 0.5),
                              "accept_p99_ms": percentile(accept, 0.99), "accept_max_ms": max(accept, default=None),
                              "rss_kib": status_kib(kw.pid, "VmRSS"), "fds": open_fds(kw.pid),
                              "keyward_open": kw.metric("keyward_client_connections_open")}
            result["probe_many"] = probe(client, settings.scale_probes)
            # Each new connection's first Produce, not judged: the comparison is of steady states.
            phases["many_first"] = scale_phase(kw, client, broker, 3, rate)
            phases["many"] = scale_phase(kw, client, broker, seconds, rate)
            # The peak with the connections opening and producing; then, apart, with reloads.
            result["peak_rss_kib"] = status_kib(kw.pid, "VmHWM")
            if reloads:
                reset_peak_rss(kw.pid)
                phases["many_reload"] = scale_phase(kw, client, broker, settings.scale_reload_seconds, rate, tables)
                result["peak_rss_reload_kib"] = status_kib(kw.pid, "VmHWM")
            phases["many_after"] = scale_phase(kw, client, broker, seconds, rate)
            client.ask(cmd="shrink", to=small)
            wait_for_open_connections(kw, small)
            phases["small_after"] = scale_phase(kw, client, broker, seconds, rate)
            out["rounds"].append(result)
            g = result["grow"]
            log(f"scale w{workers} round {rnd + 1}/{rounds}: {g['open']:,} open in {g['seconds']:.1f} s "
                f"(accept p50 {g['accept_p50_ms']:.1f} p99 {g['accept_p99_ms']:.1f} ms, failures {g['failures']}), "
                f"RSS {g['rss_kib'] / 1024:.0f} MiB, {g['fds']:,} fds; produce p99 " + ", ".join(
                    f"{name} {p['p99_ms']:.1f} ms ({p['requests']:,} requests, failures {p['failures']})"
                    for name, p in phases.items()))
    finally:
        if client:
            client.stop()
        kw.stop()
    return out


def run_connections(settings: Settings, started: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="keyward-bench-connections-"))
    cluster = BenchCluster(workdir, {}, name="scale")
    result: dict = {"settings": {k: getattr(settings, k) for k in (
        "scale_connections", "scale_small", "scale_rate", "scale_seconds", "scale_reload_seconds", "scale_rounds",
        "scale_concurrency", "scale_probes")}, "cases": []}
    try:
        log("starting Kafka (1 broker, KRaft)")
        cluster.start()
        cluster.create_topic(SCALE_TOPIC, SCALE_PARTITIONS, replication=1)
        result["cases"].append(connections_case(settings, workdir, cluster, 2, settings.scale_rounds, reloads=True))
        # Item 7: the same load with one runtime worker, no reloads, one round.
        result["cases"].append(connections_case(settings, workdir, cluster, 1, 1, reloads=False))
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = time.monotonic() - started
    write_report(settings, "connections", connections_report(settings, result), result)
    return result


def pooled_p99(rnd: dict, *phases: str) -> float:
    """The p99 of the latencies of `phases` of one round, taken together."""
    return percentile([x for p in phases for x in rnd["phases"][p]["latency_ms"]], 0.99)


def connections_report(settings: Settings, result: dict) -> str:
    def ms(x: float | None) -> str:
        return fmt(x, ".1f")

    s = result["settings"]
    out = [
        f"# dev/bench --connections results ({'quick' if settings.quick else 'full'} run)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {result['seconds']:.0f} s, {os.cpu_count()} CPUs, "
        f"load average at the end {os.getloadavg()[0]:.2f}. keyward {os.environ['KEYWARD_BIN']}, with the "
        "100,000-tenant, 65,536-slot table of `--tables`; one broker. Clients: dev/scale_client.py (one asyncio "
        f"process, raw Kafka protocol). Each connection sends ApiVersions when it opens ({s['scale_concurrency']} "
        "opening at once; *accept* is connect() to its answer); one in ten then sends one Produce v9 (acks=all, "
        f"one 100 B record, header `tenant`, inspected by the `by: header` rule) {s['scale_rate']:g} times a "
        f"second, one at a time. Phases of {s['scale_seconds']:g} s, reloads for {s['scale_reload_seconds']:g} s "
        "(`POST /reload` every second, alternating two 100,000-tenant tables). *others*: cores the rest of the "
        "machine took (busy time less keyward's, the broker's and the client's).",
        "",
    ]
    targets = []
    for case in result["cases"]:
        w = case["workers"]
        out += [
            f"## {w} worker thread{'s' if w > 1 else ''} (TOKIO_WORKER_THREADS={w}; {case['worker_threads_seen']} seen)",
            "",
            f"keyward's open-file limit {case['open_file_limit']:,}, {case['base_fds']} descriptors held before any "
            f"client: room for {case['fits']:,} connections at two each ({FD_HEADROOM} kept free); "
            f"{case['connections']:,} opened. RSS at start {case['rss_start_kib'] / 1024:.1f} MiB; peak "
            f"{case['fresh_peak_rss_kib'] / 1024:.1f} MiB the first time they were all open (the warm-up, not "
            f"counted: {case['warm_up']['requests']:,} requests, p99 {ms(case['warm_up']['p99_ms'])} ms, "
            f"{sum(case['warm_up']['failures'].values())} failed).",
            "",
            f"| round | open | opened in (s) | accept while opening, {s['scale_concurrency']} at once: p50 / p99 / max "
            f"(ms) | open failures | accept one at a time beside {s['scale_small']} open: p50 / p99 / max (ms) "
            "| the same beside all open | RSS open (MiB) | peak RSS, opening and producing (MiB) | peak RSS "
            "during reloads (MiB) | fds open |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in case["rounds"]:
            g, p0, p1 = r["grow"], r["probe_small"], r["probe_many"]
            out.append(f"| {r['round'] + 1} | {g['open']:,} | {g['seconds']:.1f} | {ms(g['accept_p50_ms'])} / "
                       f"{ms(g['accept_p99_ms'])} / {ms(g['accept_max_ms'])} | "
                       f"{sum(g['failures'].values()) + sum(p0['failures'].values()) + sum(p1['failures'].values())} | "
                       f"{ms(p0['p50_ms'])} / {ms(p0['p99_ms'])} / {ms(p0['max_ms'])} | "
                       f"{ms(p1['p50_ms'])} / {ms(p1['p99_ms'])} / {ms(p1['max_ms'])} | "
                       f"{g['rss_kib'] / 1024:.1f} | {r['peak_rss_kib'] / 1024:.1f} | "
                       f"{fmt(r.get('peak_rss_reload_kib', 0) / 1024 or None, '.1f')} | {g['fds']:,} |")
        out += [
            "",
            "| round | phase | active | requests | failed | p50 (ms) | p99 (ms) | p99.9 (ms) | max (ms) | keyward CPU "
            "(µs/request) | broker CPU (cores) | client CPU (cores) | client loop lag p99 (ms) | others (cores) "
            "| keyward RSS at the end (MiB) | reloads ok / all, serving after p50 / max (ms) |",
            "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in case["rounds"]:
            for name, p in r["phases"].items():
                rl = p["reloads"]
                served = [x["load_ms"] for x in rl if x["ok"] and x["load_ms"] is not None]
                reload_cell = (f"{sum(x['ok'] for x in rl)} / {len(rl)} ({len(served)} loaded, the rest found "
                               f"loaded by the file watch; it also re-read the file {p['file_watch_reloads']:.0f} "
                               f"times), {ms(percentile(served, 0.5))} / {ms(max(served, default=None))}"
                               if rl else "")
                out.append(
                    f"| {r['round'] + 1} | {name} | {p['active']:,} | {p['requests']:,} | {sum(p['failures'].values())} "
                    f"| {ms(p['p50_ms'])} | {ms(p['p99_ms'])} | {ms(p['p999_ms'])} | {ms(p['max_ms'])} | "
                    f"{p['keyward_cpu_s'] / max(1, p['requests']) * 1e6:.0f} | {p['broker_cpu_s'] / p['wall_s']:.2f} | "
                    f"{p['client_cpu_s'] / p['wall_s']:.2f} | "
                    f"{ms(p['loop_lag_p99_ms'])} | {p['others_cores']:.2f} | {p['rss_kib'] / 1024:.1f} | {reload_cell} |")
        out.append("")
        if w != 2:
            continue
        rounds = case["rounds"]
        peak = max(r["peak_rss_kib"] for r in rounds) / 1024
        reload_peak = max(r["peak_rss_reload_kib"] for r in rounds) / 1024
        ratios = [pooled_p99(r, "many", "many_after") / pooled_p99(r, "small", "small_after") for r in rounds]
        reload_ratios = [r["phases"]["many_reload"]["p99_ms"] / pooled_p99(r, "many", "many_after") for r in rounds]
        failed = sum(sum(p["failures"].values()) for r in rounds for p in r["phases"].values())
        failed += sum(sum(r[k]["failures"].values()) for r in rounds for k in ("grow", "probe_small", "probe_many"))
        reload_failed = sum(1 for r in rounds for p in r["phases"].values() for x in p["reloads"] if not x["ok"])
        reached = min(r["grow"]["open"] for r in rounds)
        mark = lambda ok: "met" if ok else "**MISSED**"  # noqa: E731
        short = (f" (keyward's open-file limit {case['open_file_limit']:,} holds {case['fits']:,})"
                 if reached < settings.scale_connections else "")
        targets += [
            f"| {settings.scale_connections:,} concurrent connections | {reached:,} | "
            f"{mark(reached >= settings.scale_connections)}{short} |",
            f"| RSS ≤ 256 MiB with them open, the first time | {case['fresh_peak_rss_kib'] / 1024:.1f} MiB peak | "
            f"{mark(case['fresh_peak_rss_kib'] / 1024 <= 256)} |",
            f"| RSS ≤ 256 MiB with them open, after they closed and opened again | {peak:.1f} MiB peak (during "
            f"reloads: {reload_peak:.1f}) | {mark(peak <= 256)} |",
            f"| p99 produce at {reached:,} ≤ 2 × at {settings.scale_small} | {statistics.median(ratios):.2f} × "
            f"(each round: {', '.join(f'{x:.2f}' for x in ratios)}) | {mark(statistics.median(ratios) <= 2)} |",
            f"| no failed request (produce, connect, reload) | {failed} produce/connect, {reload_failed} reload | "
            f"{mark(failed == 0 and reload_failed == 0)} |",
            f"| p99 with reloads ≤ 2 × without | {statistics.median(reload_ratios):.2f} × (each round: "
            f"{', '.join(f'{x:.2f}' for x in reload_ratios)}) | {mark(statistics.median(reload_ratios) <= 2)} |",
        ]
    out += ["## Targets (issue 18, items 5 and 6; 2 worker threads)", "", "| target | measured | |", "|---|--:|---|",
            *targets, ""]
    return "\n".join(out)


def run_scale(settings: Settings, started: float) -> int:
    """Issue 18's cases 3-6 one after the other: --metadata, --tables, --connections; scale.md
    has the three reports and how long each took."""
    took, failed = {}, []
    for name, run in (("metadata", run_metadata), ("tables", run_tables), ("connections", run_connections)):
        began = time.monotonic()
        try:
            run(settings, began)
        except Exception as e:  # the other cases still run; the report and the exit status say so
            log(f"--{name} failed: {e!r}")
            failed.append(name)
            (settings.out / f"{name}.md").write_text(f"# dev/bench --{name}: FAILED\n\n{e!r}\n")
        took[name] = time.monotonic() - began
    total = time.monotonic() - started
    text = "\n".join([
        f"# dev/bench --scale results ({'quick' if settings.quick else 'full'} run)", "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {total:.0f} s in all ("
        + ", ".join(f"--{n} {t:.0f} s" for n, t in took.items()) + f"), load average at the end "
        f"{os.getloadavg()[0]:.2f}.", "",
        *((settings.out / f"{n}.md").read_text().replace("\n# ", "\n## ").replace("# dev/bench", "## dev/bench", 1)
          for n in took),
    ])
    (settings.out / "scale.md").write_text(text)
    log(f"--scale: {total:.0f} s; wrote {settings.out / 'scale.md'}"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def raise_file_limit(wanted: int = 65536) -> None:
    """Everything the benchmark starts inherits this limit: keyward holds two sockets per client
    connection (10,000 connections: 20,000, and its own), the client one per connection, the broker
    one per keyward connection. Raising the hard limit needs CAP_SYS_RESOURCE, which root in a
    container may lack; then the hard limit stays, and --connections opens what fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return
        except (ValueError, OSError) as e:
            log(f"cannot raise the hard open-file limit from {hard} to {wanted} ({e}; raising it needs "
                f"CAP_SYS_RESOURCE); keeping {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(hard, wanted), hard))


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (~4 minutes in all), for trying it out")
    ap.add_argument("--loadgen", required=True, type=Path)
    ap.add_argument(
        "--sockmap",
        action="store_true",
        help="also run every uncompressed load through dev/sockmap-relay.c, a relay that forwards inside "
        "the kernel (needs root: CAP_BPF and CAP_NET_ADMIN)",
    )
    ap.add_argument("--baseline-bin", type=Path, help="a second keyward binary to benchmark beside KEYWARD_BIN")
    ap.add_argument("--baseline-name", default="baseline", help="what to call it (dev/bench: the git revision)")
    ap.add_argument(
        "--perf",
        metavar="PATH/SIZE/CODEC",
        help="instead of the benchmark: one full-load run (e.g. key/100/none) with `perf record` on "
        "keyward; writes target/bench/perf-*.txt",
    )
    ap.add_argument(
        "--wan",
        action="store_true",
        help="instead of the benchmark: redirect over an emulated WAN (toxiproxy), beside librdkafka straight "
        "to the remote cluster; writes target/bench/wan.md",
    )
    ap.add_argument(
        "--latency",
        action="store_true",
        help="instead of the benchmark: unloaded latency, one 100 B record at a time, directly, through "
        "haproxy and through keyward (by: key); writes target/bench/latency.md",
    )
    ap.add_argument(
        "--tables",
        action="store_true",
        help="instead of the benchmark: ownership tables of 100,000 tenants and 65,536 slots, keyward's memory "
        "and reload time with them (no Kafka needed); writes target/bench/tables.md",
    )
    ap.add_argument(
        "--metadata",
        action="store_true",
        help="instead of the benchmark: a 3-broker cluster of 5,000 partitions, a new client's bootstrap time "
        "directly and through keyward; writes target/bench/metadata.md",
    )
    ap.add_argument(
        "--connections",
        action="store_true",
        help="instead of the benchmark: 10,000 client connections, a tenth of them producing, with and without "
        "a reload of the 100,000-tenant table every second; writes target/bench/connections.md",
    )
    ap.add_argument(
        "--scale",
        action="store_true",
        help="instead of the benchmark: --metadata, --tables and --connections one after the other "
        "(issue 18, cases 3-6); writes target/bench/scale.md",
    )
    args = ap.parse_args()
    settings = Settings.from_env(args.quick)
    if args.sockmap:
        settings.sockmap = args.loadgen.parent / "sockmap-relay"
    if args.baseline_bin:
        settings.baseline, settings.baseline_name = args.baseline_bin.resolve(), args.baseline_name
        add_baseline_paths(args.baseline_name)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    raise_file_limit()
    os.environ.setdefault("KEYWARD_LOG", "info")
    os.environ.setdefault("KEYWARD_BIN", str(ROOT / "target/release/keyward"))
    settings.out.mkdir(parents=True, exist_ok=True)
    if args.wan:
        return run_wan(settings, args.loadgen, started)
    if args.latency:
        return run_latency(settings, args.loadgen, started)
    if args.tables:
        return run_tables(settings, started)
    if args.metadata:
        return run_metadata(settings, started)
    if args.connections:
        run_connections(settings, started)
        return 0
    if args.scale:
        return run_scale(settings, started)
    workdir = Path(tempfile.mkdtemp(prefix="keyward-bench-"))
    bench = Bench(settings, workdir, args.loadgen)
    idle: list[dict] = []
    stalls: list[dict] = []
    if args.perf:
        try:
            bench.start()
            return profile(bench, settings, args.perf)
        finally:
            bench.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        bench.start()
        bench.warm_up()
        for rnd in range(settings.rounds):
            log(f"full-load round {rnd + 1}/{settings.rounds}")
            bench.full_round(rnd)
        for rnd in range(settings.rounds):
            log(f"half-load round {rnd + 1}/{settings.rounds}")
            bench.half_round(rnd)
        # The stall before the idle connections: RSS stays at its high-water mark afterwards.
        if settings.stall_seconds:
            stalls.append(bench.stall("key", Load(1024, "none"), settings.stall_seconds * 2.5, settings.stall_seconds))
            log(f"stall: {stalls[-1]}")
        if settings.idle_connections:
            for path in ("passthrough", "haproxy", *([f"passthrough@{settings.baseline_name}"] if settings.baseline else [])):
                idle.append(bench.idle_connections(path, settings.idle_connections))
                log(f"idle: {idle[-1]}")
    except KeyboardInterrupt:
        log("interrupted; reporting what ran")
    finally:
        bench.stop()
    text = report(settings, bench, idle, stalls, started)
    (settings.out / "results.md").write_text(text)
    (settings.out / "results.json").write_text(json.dumps({"settings": {**settings.__dict__, "out": str(settings.out),
                                                                        "sockmap": settings.sockmap and str(settings.sockmap),
                                                                        "baseline": settings.baseline and str(settings.baseline)},
                                                           "runs": bench.runs, "warmups": bench.warmups,
                                                           "idle": idle,
                                                           "stalls": stalls}, indent=1))
    print(text)
    log(f"wrote {settings.out / 'results.md'} and results.json (work dir {workdir})")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if bench.runs and all(r.get("ok") for r in bench.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
