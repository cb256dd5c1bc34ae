"""A real swarm: `rollshare run` processes on 127.0.0.1, started and watched by rollshare.swarm.

`rollshare swarm --rounds N --json` runs end to end; its table reports a node that ended
before it answered (from its log) and shows a failed node's exit code and log tail. Then one
swarm of three nodes (tiny-s, two prompts of four completions per round, one thread each) is
shared by the scenario tests, in file order: a fourth node joins late and catches up on the
window; every node holds every other node's groups; a node killed with SIGKILL stalls nobody;
restarted, it keeps its peer id, its store and its round; garbage gossiped at a node is
counted as rejected and harms nothing.

What a node holds is read from its rollouts.db (a plain SQLite reader next to the running
node: WAL mode allows it). Every wait polls a condition up to a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollshare.checkpoint import CheckpointManager
from rollshare.swarm import LocalSwarm, SwarmNode, table_lines

WAIT_S = 120.0  # bound on one wait; on a quiet machine each takes seconds (a node starts in ~6 s)
RUN_FLAGS = ["--prompts-per-round", "2", "--group-size", "4", "--checkpoint-every", "5",
             "--reconcile-interval", "1"]


def wait_until(cond, what: str, swarm: LocalSwarm | None = None, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "" if swarm is None else "\n".join(
                f"--- {n.name} ({n.state}):\n" + "\n".join(n.log_tail(8)) for n in swarm.nodes)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{logs}")
        time.sleep(0.2)


def _query(node: SwarmNode, sql: str, *params) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{node.data_dir / 'rollouts.db'}?mode=ro", uri=True,
                                            timeout=10)) as c:
        return c.execute(sql, params).fetchall()


def held(node: SwarmNode) -> set[bytes]:
    return {cid for (cid,) in _query(node, "SELECT cid FROM groups")}


def own(node: SwarmNode, peer_id: str) -> set[bytes]:
    return {cid for (cid,) in _query(node, "SELECT cid FROM groups WHERE origin=?", peer_id)}


def rows(node: SwarmNode) -> int:
    return _query(node, "SELECT COUNT(*) FROM groups")[0][0]


def polled(swarm: LocalSwarm, pred):
    """A condition for wait_until: refresh every node's Status, then evaluate `pred`."""
    def check() -> bool:
        swarm.poll()
        return pred()
    return check


def rounds(nodes) -> dict[str, int]:
    return {n.name: n.status["round"] for n in nodes}


# ------------------------------------------------------------------ the command, end to end


def test_swarm_command_runs_three_nodes_for_n_rounds_and_reports_each_as_json(tmp_path, tiny_policy_dir):
    p = subprocess.run([sys.executable, "-m", "rollshare.cli", "swarm", "--nodes", "3", "--rounds", "12",
                        "--model", str(tiny_policy_dir), "--base-dir", str(tmp_path / "swarm"), "--json",
                        "--", *RUN_FLAGS], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    nodes = summary["nodes"]
    assert [n["node"] for n in nodes] == ["node0", "node1", "node2"]
    assert len({n["peer_id"] for n in nodes}) == 3 and all(n["peer_id"].startswith("12D3KooW") for n in nodes)
    for n in nodes:
        assert (n["state"], n["exit_code"], n["round"], n["groups_out"]) == ("done", 0, 12, 24), n
        assert Path(n["log"]).is_file() and (Path(n["data_dir"]) / "identity.key").is_file()
    assert "node0" in p.stderr and "done" in p.stderr  # the table went to stderr: stdout is the JSON


def test_swarm_command_refuses_run_flags_it_sets_itself(tmp_path, capsys):
    from rollshare.cli import main

    assert main(["swarm", "--nodes", "2", "--base-dir", str(tmp_path), "--", "--grpc-port", "5000"]) == 2
    assert "--grpc-port after --" in capsys.readouterr().err
    assert not (tmp_path / "node0").exists()


def test_the_table_reports_a_node_from_its_log_and_shows_a_failed_nodes_exit_code_and_log_tail(tmp_path):
    quick = SwarmNode("node0", tmp_path / "node0")  # ended before any Status poll: its log tells
    quick.start([sys.executable, "-c", "print('swarm: peer id 12D3KooWquick, gRPC 127.0.0.1:1; ...')\n"
                 "print('left the swarm: groups out 24, in 7, rejected 0')\n"
                 "print('stopped at round 12; checkpoint in ...')"], dict(os.environ))
    broken = SwarmNode("node1", tmp_path / "node1")
    broken.start([sys.executable, "-c", "import sys; sys.exit('rollshare: error: something to fix')"],
                 dict(os.environ))
    for n in (quick, broken):
        assert n.wait(30) is not None
        n.absorb_log()
    s = quick.summary()
    assert (s["state"], s["peer_id"], s["round"], s["groups_out"], s["groups_in"]) == ("done", "12D3KooWquick", 12,
                                                                                       24, 7)
    assert s["reward_ma"] is None and "log_tail" not in s  # never heard of: shown as unknown, not as 0
    b = broken.summary()
    assert (b["state"], b["exit_code"]) == ("exited 1", 1) and broken.failed
    assert b["log_tail"][-1] == "rollshare: error: something to fix"
    lines = table_lines([quick, broken])
    assert lines[1].split()[:3] == ["node0", "done", "12"] and lines[2].split()[:3] == ["node1", "exited", "1"]
    assert "node1 exited with code 1; end of" in lines[3] and lines[-1].strip() == "rollshare: error: something to fix"


# ------------------------------------------------------------------ one swarm, several scenarios


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, tiny_policy_dir):
    s = LocalSwarm(tmp_path_factory.mktemp("swarm"), str(tiny_policy_dir), shared_groups=2, run_flags=RUN_FLAGS)
    s.start(3)
    try:
        wait_until(polled(s, lambda: all(n.status and n.status["peers"] >= 1 and n.status["round"] >= 2
                                         for n in s.nodes)), "3 nodes to join and train", s)
        yield s
    finally:
        s.stop(timeout=30)
    assert not any(n.running for n in s.nodes)


@pytest.fixture(scope="module")
def peer_ids(swarm) -> dict[str, str]:
    """Each node's peer id, as it first reported it."""
    return {n.name: n.status["peer_id"] for n in swarm.nodes}


@pytest.fixture(scope="module")
def late(swarm, peer_ids):
    """node3 starts once the first three have published; returns what they had published before."""
    before = {n.name: own(n, peer_ids[n.name]) for n in swarm.nodes[:3]}
    assert all(len(ids) >= 4 for ids in before.values())
    node = swarm.start_node()
    wait_until(polled(swarm, lambda: node.status is not None), "node3 to answer", swarm)
    peer_ids[node.name] = node.status["peer_id"]
    return node, before


def test_late_joiner_catches_up_on_what_was_published_before_it_joined(swarm, late):
    node, before = late
    wanted = set().union(*before.values())
    wait_until(lambda: wanted <= held(node), "node3 to hold every group published before it started", swarm)


def test_every_node_holds_every_other_nodes_groups(swarm, late, peer_ids):
    nodes = [n for n in swarm.nodes if n.running]
    assert len(nodes) == 4
    published = {n.name: own(n, peer_ids[n.name]) for n in nodes}

    def missing() -> dict[str, int]:
        return {n.name: len(set().union(*(ids for name, ids in published.items() if name != n.name)) - held(n))
                for n in nodes}

    wait_until(lambda: not any(missing().values()), "every node to hold the others' groups", swarm)
    swarm.poll()
    for n in nodes:  # the counters agree: what came in is others' work, at least what we waited for
        others = sum(len(ids) for name, ids in published.items() if name != n.name)
        assert n.status["groups_in"] >= others, (n.name, n.status)
    table = "\n".join(table_lines(nodes))
    assert all(n.name in table for n in nodes) and "running" in table


def test_a_node_killed_with_sigkill_stalls_nobody(swarm, late):
    victim = swarm.node("node1")
    victim.signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    survivors = [n for n in swarm.nodes if n.running]
    assert len(survivors) == 3
    swarm.poll()
    start_round, start_in = rounds(survivors), {n.name: n.status["groups_in"] for n in survivors}
    wait_until(polled(swarm, lambda: all(n.status["round"] >= start_round[n.name] + 5
                                         and n.status["groups_in"] > start_in[n.name] for n in survivors)),
               "every survivor to train 5 more rounds and keep receiving groups", swarm)
    assert victim.state == "exited -9" and victim.failed  # shown as a failure in the table
    assert any("node1 exited with code -9" in ln for ln in table_lines(swarm.nodes))


def test_a_restarted_node_keeps_its_peer_id_store_and_round(swarm, late, peer_ids):
    node = swarm.node("node1")
    if node.running:  # run alone: kill it here
        node.signal(signal.SIGKILL)
        node.wait(10)
    stored_before = rows(node)
    ckpt = CheckpointManager(node.data_dir / "checkpoints").latest()
    assert ckpt is not None, "node1 wrote no checkpoint before it was killed"
    ckpt_round = ckpt.round
    assert stored_before > 0 and ckpt_round >= 5

    swarm.start_node(node)  # same data dir, same ports
    wait_until(polled(swarm, lambda: node.status is not None), "node1 to answer again", swarm)
    assert node.status["peer_id"] == peer_ids["node1"]
    assert node.status["round"] >= ckpt_round
    assert node.status["groups_stored"] >= stored_before
    assert f"resumed from {ckpt.path.name}" in node.log_text()
    wait_until(polled(swarm, lambda: node.status["round"] > ckpt_round + 2 and node.status["peers"] >= 1),
               "node1 to train on and rejoin", swarm)


def test_garbage_gossip_is_counted_as_rejected_and_harms_no_node(swarm, late, tmp_path):
    from rollshare.net.identity import load_or_create_identity
    from rollshare.net.service import ANNOUNCE_TOPIC, NetworkConfig, NetworkService
    from rollshare.store import RolloutStore

    target = swarm.node("node0")
    swarm.poll()
    round_before = target.status["round"]
    malformed_before = target.status["rejected"].get("malformed", 0)
    # an attacker joins through node0 and gossips bytes that are no Announcement
    svc = NetworkService(RolloutStore(tmp_path / "rollouts.db"), load_or_create_identity(tmp_path / "identity.key"),
                         NetworkConfig(bootstrap=(target.grpc_endpoint,), bootstrap_timeout_s=10.0))
    svc.start(timeout=30)
    try:
        def sent_and_counted() -> bool:
            svc.gossip_raw(ANNOUNCE_TOPIC, b"\x0a\xff\xff\xff\xff\x0f garbage")
            swarm.poll()
            return target.status["rejected"].get("malformed", 0) > malformed_before
        wait_until(sent_and_counted, "node0 to count the garbage as malformed", swarm, timeout=30)
    finally:
        svc.stop()
        svc.store.close()
    wait_until(polled(swarm, lambda: target.status["round"] > round_before + 2), "node0 to keep training", swarm)
    assert all(n.running for n in swarm.nodes)
