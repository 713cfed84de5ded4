"""`keyward move` against real keyward instances: what it refuses, how it aborts, and that a
moved table outlives a restart. The move under load, with three clients writing the moving
slots through two instances, is `test_faults.py::test_a_move_under_load`."""

from __future__ import annotations

import json
import uuid

import pytest

from harness.keyward import Keyward

from test_faults import _fleet, key_per_slot, keyward_move, table
from test_operator import wait_for

MOVE = ["--rule", "rflip", "--slots", "4-7", "--to", "us"]


@pytest.fixture
def fleet(tmp_path, eu, us):
    """One keyward for eu and one for us, both taking table changes with a bearer token."""
    token = "move-" + uuid.uuid4().hex
    (tmp_path / "admin-token").write_text(token + "\n")
    admin = f"reload_token_file: {tmp_path / 'admin-token'}"
    kws = [
        Keyward(tmp_path, region, {"eu": eu, "us": us}, table(), name=f"kw-{region}", admin_extra=admin).start()
        for region in ("eu", "us")
    ]
    try:
        yield _fleet(tmp_path, {"eu": kws[:1], "us": kws[1:]}, token), kws
    finally:
        for kw in kws:
            kw.stop()


def test_a_move_whose_replication_cannot_be_confirmed_aborts_back_to_the_old_owner(tmp_path, fleet):
    """No instance measures replication to us here: the move freezes, finds nothing to wait
    for, and puts the original table back in every instance; the journal says so."""
    path, kws = fleet
    original = kws[0].ownership()["hash"]
    journal = tmp_path / "move.json"
    run = keyward_move("run", "--fleet", str(path), *MOVE, "--journal", str(journal), "--replication-timeout", "3s")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1. freezing rule rflip slots 4-7" in run.stdout, run.stdout
    assert "aborting" in run.stdout, run.stdout
    assert {kw.ownership()["hash"] for kw in kws} == {original}
    assert json.loads(journal.read_text())["step"] == "aborted"
    # An ended journal is not run again.
    again = keyward_move("run", "--fleet", str(path), *MOVE, "--journal", str(journal), "--no-replication-gate")
    assert again.returncode == 1 and "ended (aborted)" in again.stderr, again.stderr


def test_a_move_is_refused_when_the_instances_disagree_or_the_token_is_wrong(tmp_path, fleet):
    path, kws = fleet
    # Another table in force in one instance: nothing is changed anywhere.
    kws[1].table_path.write_text(table().replace("on_foreign: reject\n  - name: flip", "on_foreign: audit\n  - name: flip"))
    status, body = kws[1].admin("/reload", "POST")
    assert status == 401, body  # a token is configured: POST /reload needs it too
    kws[1].stop()
    kws[1].start()
    hashes = [kw.ownership()["hash"] for kw in kws]
    assert hashes[0] != hashes[1]
    planned = keyward_move("plan", "--fleet", str(path), *MOVE)
    assert planned.returncode == 1 and "the instances serve different tables" in planned.stderr, planned.stderr
    run = keyward_move("run", "--fleet", str(path), *MOVE, "--journal", str(tmp_path / "j.json"), "--no-replication-gate")
    assert run.returncode == 1 and "different tables" in run.stderr, run.stderr
    assert [kw.ownership()["hash"] for kw in kws] == hashes

    # The same table again, and a wrong token: the freeze is refused, nothing is changed.
    kws[1].table_path.write_text(table())
    kws[1].stop()
    kws[1].start()
    (tmp_path / "admin-token").write_text("wrong\n")
    run = keyward_move("run", "--fleet", str(path), *MOVE, "--journal", str(tmp_path / "k.json"), "--no-replication-gate")
    assert run.returncode == 1 and "401" in run.stderr, run.stdout + run.stderr
    assert len({kw.ownership()["hash"] for kw in kws}) == 1


def test_put_ownership_is_conditional_and_a_moved_table_outlives_a_restart(tmp_path, fleet):
    """PUT /ownership needs the hash of the table it replaces (If-Match) and a valid table; the
    table it puts in force is the instance's file, so a restart serves it."""
    import urllib.request

    path, kws = fleet
    kw = kws[0]
    token = (tmp_path / "admin-token").read_text().strip()
    current = kw.ownership()["hash"]

    def put(body: str, if_match: str | None, auth: bool = True) -> tuple[int, dict | str]:
        req = urllib.request.Request(f"http://127.0.0.1:{kw.admin_port}/ownership", data=body.encode(), method="PUT")
        if if_match is not None:
            req.add_header("If-Match", if_match)
        if auth:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            try:
                return e.code, json.loads(text)
            except json.JSONDecodeError:
                return e.code, text

    flipped = table(flipped=True)
    assert put(flipped, current, auth=False)[0] == 401
    assert put(flipped, None)[0] == 428
    status, body = put(flipped, "0" * 64)
    assert (status, body["result"], body["hash"]) == (412, "changed", current), body
    status, body = put("rules: [", current)
    assert status == 422 and "ownership.yaml" in body["error"], body
    assert kw.ownership()["hash"] == current and kw.table_path.read_text() == table()

    moved = keyward_move("run", "--fleet", str(path), *MOVE, "--journal", str(tmp_path / "m.json"), "--no-replication-gate")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    after = kw.ownership()["hash"]
    assert after != current
    kw.stop()
    kw.start()
    assert kw.ownership()["hash"] == after
    assert kw.owner("rflip.x", "--key", key_per_slot(kw)[4]).startswith("region=us ")


def test_a_failover_reaches_the_instances_that_answer_and_the_rest_when_they_do(tmp_path, fleet):
    """eu's instance is down: `keyward move failover` hands slots 4-7 to us in the instances
    that answer, with no freeze, says what it could not reach, and reaches it when run again."""
    path, kws = fleet
    eu_kw, us_kw = kws
    original = us_kw.ownership()["hash"]
    eu_kw.stop()
    journal = tmp_path / "failover.json"
    first = keyward_move("failover", "--fleet", str(path), *MOVE, "--journal", str(journal))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "without a freeze and without waiting for replication" in first.stdout, first.stdout
    assert "may be lost" in first.stdout, first.stdout
    assert f"still serving the old table: eu http://127.0.0.1:{eu_kw.admin_port}" in first.stdout, first.stdout
    moved = json.loads(journal.read_text())
    assert moved["step"] == "failover"
    assert us_kw.ownership()["hash"] == moved["moved"]["hash"] != original
    assert us_kw.owner("rflip.x", "--key", key_per_slot(us_kw)[4]).startswith("region=us ")

    eu_kw.start()
    assert eu_kw.ownership()["hash"] == original
    again = keyward_move("failover", "--fleet", str(path), *MOVE, "--journal", str(journal))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "failed over: every instance serves" in again.stdout, again.stdout
    assert eu_kw.ownership()["hash"] == moved["moved"]["hash"]
    assert json.loads(journal.read_text())["step"] == "moved"


def test_the_flip_waits_for_replication_and_a_move_resumes_after_its_own_crash(tmp_path, eu, us):
    """MirrorMaker 2 stopped with eu's latest records of a rule's topic not yet in us: `move run`
    freezes, then waits, saying what is behind. Killed there, it leaves its journal at the
    freeze with the end offsets to wait for (eu's, read after the freeze was in force). Run again
    once MirrorMaker 2 is back, it resumes, sees us's mirror reach them, and flips."""
    import subprocess

    from harness import LibrdkafkaClient, record, unique
    from harness.keyward import binary
    from harness.mirror import MirrorMaker

    from test_replication import end_offsets

    prefix = unique("gate")
    topic = f"{prefix}.orders"
    eu.create_topic(topic, partitions=4)
    gate_table = f"""
rules:
  - name: gate
    topics: ["{prefix}.*"]
    by: key
    slots: 16
    owners: {{ eu: ["0-7"], us: ["8-15"] }}
default: allow
"""
    token = "move-" + uuid.uuid4().hex
    (tmp_path / "admin-token").write_text(token + "\n")
    admin = f"reload_token_file: {tmp_path / 'admin-token'}"
    kws = [
        Keyward(tmp_path, region, {"eu": eu, "us": us}, gate_table, name=f"kw-{region}", admin_extra=admin,
                extra_config="replication: { interval_ms: 300 }\n").start()
        for region in ("eu", "us")
    ]
    mm2 = MirrorMaker(tmp_path, {"eu": eu, "us": us}, topics=topic.replace(".", "\\.")).start()
    move = ["--fleet", str(_fleet(tmp_path, {"eu": kws[:1], "us": kws[1:]}, token)),
            "--rule", "gate", "--slots", "4-7", "--to", "us", "--journal", str(tmp_path / "gate.json")]
    try:
        client = LibrdkafkaClient()
        assert all(r["ok"] for r in client.produce(eu.bootstrap, topic, [record(b"a", b"1", partition=p) for p in range(4)]))
        def mirrored(n: int) -> bool:
            try:
                return sum(end_offsets(us, f"eu.{topic}", 4).values()) == n
            except Exception:  # noqa: BLE001 - the mirror topic does not exist yet
                return False

        wait_for(lambda: mirrored(4), 120, "MirrorMaker 2 to copy the first records")
        mm2.stop()
        assert all(r["ok"] for r in client.produce(eu.bootstrap, topic, [record(b"b", b"2", partition=p) for p in range(4)]))

        waiting = subprocess.Popen([str(binary()), "move", "run", *move, "--replication-timeout", "120s"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        try:
            for line in waiting.stdout:
                seen.append(line)
                if line.strip().startswith("waiting:"):
                    break
        finally:
            waiting.kill()
            waiting.wait()
        assert seen and seen[-1].strip().startswith("waiting:"), "".join(seen)
        assert f"eu {topic}[0] 1 behind" in seen[-1], seen[-1]
        journal = json.loads((tmp_path / "gate.json").read_text())
        assert journal["step"] == "frozen", journal["step"]
        assert {(s, t, p): end for s, t, p, end in journal["gate"]} == {
            ("eu", topic, p): 2 for p in range(4)
        }, journal["gate"]
        assert {kw.ownership()["hash"] for kw in kws} == {journal["frozen"]["hash"]}

        mm2.start()
        resumed = keyward_move("run", *move, "--replication-timeout", "120s", timeout_s=180)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resuming from step frozen" in resumed.stdout, resumed.stdout
        assert "  replicated" in resumed.stdout, resumed.stdout
        assert all(end >= 2 for end in end_offsets(us, f"eu.{topic}", 4).values())
        journal = json.loads((tmp_path / "gate.json").read_text())
        assert journal["step"] == "moved"
        assert {kw.ownership()["hash"] for kw in kws} == {journal["moved"]["hash"]}
    finally:
        mm2.stop()
        for kw in kws:
            kw.stop()


def test_abort_by_hand_puts_the_original_table_back_while_a_move_waits_for_replication(tmp_path, eu, us):
    """Instances that measure replication, and a rule's topic MirrorMaker 2 does not copy: the
    move freezes and waits (the mirror is missing, never taken as caught up). Killed there,
    `keyward move abort` puts the original table back in every instance."""
    import subprocess

    from harness import unique
    from harness.keyward import binary

    prefix = unique("abort")
    eu.create_topic(f"{prefix}.orders", partitions=2)
    abort_table = f"""
rules:
  - name: gate
    topics: ["{prefix}.*"]
    by: key
    slots: 16
    owners: {{ eu: ["0-7"], us: ["8-15"] }}
default: allow
"""
    token = "move-" + uuid.uuid4().hex
    (tmp_path / "admin-token").write_text(token + "\n")
    admin = f"reload_token_file: {tmp_path / 'admin-token'}"
    kws = [
        Keyward(tmp_path, region, {"eu": eu, "us": us}, abort_table, name=f"kw-{region}", admin_extra=admin,
                extra_config="replication: { interval_ms: 300 }\n").start()
        for region in ("eu", "us")
    ]
    fleet = _fleet(tmp_path, {"eu": kws[:1], "us": kws[1:]}, token)
    journal = tmp_path / "abort.json"
    try:
        original = kws[0].ownership()["hash"]
        waiting = subprocess.Popen(
            [str(binary()), "move", "run", "--fleet", str(fleet), "--rule", "gate", "--slots", "4-7",
             "--to", "us", "--journal", str(journal), "--replication-timeout", "120s"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        seen = []
        try:
            for line in waiting.stdout:
                seen.append(line)
                if line.strip().startswith("waiting:"):
                    break
        finally:
            waiting.kill()
            waiting.wait()
        assert seen and "not measured" in seen[-1], "".join(seen)
        frozen = json.loads(journal.read_text())["frozen"]["hash"]
        assert {kw.ownership()["hash"] for kw in kws} == {frozen}

        aborted = keyward_move("abort", "--fleet", str(fleet), "--journal", str(journal))
        assert aborted.returncode == 0, aborted.stdout + aborted.stderr
        assert {kw.ownership()["hash"] for kw in kws} == {original}
        assert json.loads(journal.read_text())["step"] == "aborted"
    finally:
        for kw in kws:
            kw.stop()
