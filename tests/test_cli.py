"""The command line as a person meets it: real subprocesses."""

import json
import subprocess
import sys

import pytest


def rollshare(*args, timeout=180, env=None):
    return subprocess.run([sys.executable, "-m", "rollshare.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args, expect", [
    (["run", "--tasks", "bogus"], "--tasks: unknown task family 'bogus'"),
    (["run", "--model", "/nonexistent/model"], "--model '/nonexistent/model' is neither"),
    (["run", "--group-size", "1"], "--group-size must be >= 2"),
    (["run", "--rounds", "-3"], "--rounds must be >= 0"),
])
def test_bad_input_gets_one_line_that_says_what_to_fix(tmp_path, args, expect):
    p = rollshare(*args, "--data-dir", str(tmp_path / "d"), timeout=60)
    assert p.returncode == 2
    lines = [l for l in p.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("rollshare: error:") and expect in lines[0], p.stderr


def test_unknown_flag_is_refused(tmp_path):
    p = rollshare("run", "--no-such-flag", timeout=60)
    assert p.returncode == 2 and "unrecognized arguments: --no-such-flag" in p.stderr


def test_run_writes_json_log_checkpoints_and_resumes(tmp_path, tiny_policy_dir):
    log = tmp_path / "rounds.jsonl"
    common = ["--data-dir", str(tmp_path / "d"), "--model", str(tiny_policy_dir), "--no-network",
              "--prompts-per-round", "4", "--threads", "1", "--json-log", str(log), "--status", "line"]
    p = rollshare("run", "--rounds", "3", *common)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert {"reward", "reward_ma", "tokens_per_s", "step_s", "loss"} <= set(rows[0])
    assert "stopped at round 3" in p.stderr
    p = rollshare("run", "--rounds", "2", *common)
    assert p.returncode == 0, p.stderr
    assert "starting at round 3" in p.stderr
    assert [json.loads(l)["round"] for l in log.read_text().splitlines()][-2:] == [4, 5]
    p = rollshare("eval", "--data-dir", str(tmp_path / "d"), "--model", str(tiny_policy_dir), "-n", "20", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["round"] == 5 and 0.0 <= out["accuracy"]["chain_sum"] <= 1.0
