"""`rollshare bench gossip` on a tiny swarm: three node processes, a small burst, a short paced phase.

Checks the contract of the benchmark (last stdout line is one JSON object with every field),
and that the swarm delivers every group to every peer. Timing values are only checked for
sanity: this machine's speed is not under test here.
"""

from __future__ import annotations

import json

from rollshare.bench import gossip

FIELDS = ("delivery_ratio", "groups_per_s", "p50_ms", "p99_ms", "wire_bytes_per_group", "payload_bytes_per_group",
          "max_rss_mb", "raw_grpc_groups_per_s", "ratio", "rss_start_mb", "rss_end_mb",
          "nodes", "groups", "group_bytes", "paced_s", "quick")


def test_bench_gossip_prints_one_json_line_with_every_field_and_complete_delivery(capsys):
    rc = gossip.main(["--nodes", "3", "--burst", "48", "--paced-s", "1.5", "--settle-s", "15",
                      "--raw-repeats", "1", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    result = json.loads(out[-1])
    missing = [f for f in FIELDS if f not in result]
    assert not missing, f"fields missing from the JSON line: {missing}"
    assert result["delivery_ratio"] == 1.0
    assert result["burst"]["expected_pairs"] == 48 * 2
    assert result["paced"]["groups"] > 0 and result["p50_ms"] is not None and 0 <= result["p50_ms"] <= result["p99_ms"]
    assert result["groups_per_s"] > 0 and result["raw_grpc_groups_per_s"] > 0
    assert abs(result["ratio"] - result["groups_per_s"] / result["raw_grpc_groups_per_s"]) < 0.002
    assert 9000 < result["payload_bytes_per_group"] < 11000
    assert result["wire_bytes_per_group"] >= result["payload_bytes_per_group"]  # headers and gossip come on top
    assert len(result["rss_start_mb"]) == len(result["rss_end_mb"]) == 3 and result["max_rss_mb"] > 0
