"""Generation methods, measurement history, the selector and its use in the node (rollshare.accel)."""

import json
import math
import multiprocessing
import random

import pytest
import torch

from rollshare.accel import methods as M
from rollshare.accel.features import NUMERIC, numeric, workload_features
from rollshare.accel.history import SCHEMA, History, HistoryError, make_record
from rollshare.accel.selector import (GradientBoosting, GuardPolicy, OnlineSelector, ThroughputModel, allowed_methods,
                                      choose_offline, settings_from_records)

FAST_LOSSLESS = ["policy", "policy-noshare", "policy-chunk4", "hf-default", "hf-eager", "hf-rows32", "hf-static",
                 "prompt-lookup", "assisted"]  # hf-static-compile: same path + a ~35 s compile, not run here


@pytest.fixture(scope="module")
def policies():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollshare.policies import Policy
    from rollshare.policies.tiny import char_tokenizer, embedded_policy

    pol = embedded_policy(None, {"chain_sum": 1.0}, size="tiny-s", warmup_steps=0, show_progress=False)
    tok = char_tokenizer()
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, attn_implementation="eager")
    draft = Policy(LlamaForCausalLM(cfg), tok, "draft")
    return pol, draft


PROMPTS = ["12+7=", "3-9=", "40+2=", "5+5="]


def test_lossless_methods_give_the_default_greedy_output(policies):
    pol, draft = policies
    ctx = M.MethodContext(draft=draft)
    want = M.run_method(M.TRANSFORMERS_DEFAULT, pol, PROMPTS, 2, 6, greedy=True, ctx=ctx)
    want_ids = [s.completion_ids for g in want for s in g]
    for name in FAST_LOSSLESS:
        got = M.run_method(name, pol, PROMPTS, 2, 6, greedy=True, ctx=ctx)
        assert [s.completion_ids for g in got for s in g] == want_ids, name
        assert [len(g) for g in got] == [2] * len(PROMPTS)


def test_sampled_logprobs_are_the_policys_for_every_method(policies):
    pol, draft = policies
    ctx = M.MethodContext(draft=draft)
    for name in FAST_LOSSLESS + ["int8-dynamic"]:
        torch.manual_seed(0)
        groups = M.run_method(name, pol, PROMPTS[:2], 3, 5, temperature=1.0, ctx=ctx)
        for g in groups:
            for s in g:
                assert len(s.logprobs) == len(s.completion_ids) > 0
                ref, _ = pol.token_logprobs([s.prompt_ids], [s.completion_ids])
                assert max(abs(a - b) for a, b in zip(ref[0].tolist(), s.logprobs)) < 1e-4, name


def test_infeasible_methods_say_why_and_refuse_to_run(policies):
    pol, _ = policies
    why = M.feasible_methods(pol, M.MethodContext())
    assert why["policy"] is None and why["int8-dynamic"] is None
    assert "GPU" in why["bf16-gpu"] and "draft" in why["assisted"]
    with pytest.raises(M.MethodError, match="not feasible"):
        M.run_method("fp16-gpu", pol, PROMPTS, 2, 3)
    with pytest.raises(M.MethodError, match="unknown generation method"):
        M.get_method("warp-drive")


def test_lossy_method_has_a_measured_small_divergence(policies):
    pol, _ = policies
    assert M.divergence_bound("policy", pol, PROMPTS) == 0.0
    kl = M.divergence_bound("int8-dynamic", pol, PROMPTS, max_new_tokens=4)
    assert 0.0 < kl < 0.05


def test_failing_method_is_recorded_as_a_failure_not_skipped(policies, monkeypatch):
    from rollshare.bench.accel import Shape, measure_setting

    pol, _ = policies

    def boom(*a, **k):
        raise torch.OutOfMemoryError("pretend the GPU is full")

    monkeypatch.setattr(M.REGISTRY["hf-eager"], "generate", boom)
    res = measure_setting(["policy", "hf-eager", "bf16-gpu"], pol, M.MethodContext(), PROMPTS, Shape("t", 4, 2, 3),
                          repeats=1, target_s=0.0)
    assert res["policy"]["status"] == "ok" and res["policy"]["tokens_per_s"] > 0
    assert res["hf-eager"]["status"] == "failed" and "out of memory" in res["hf-eager"]["error"]
    assert res["bf16-gpu"]["status"] == "infeasible"


# ------------------------------------------------------------------ history

def _feats(rows=8, params=1000, threads=1, name="w"):
    return {"workload": workload_features([5] * (rows // 2), 2, 5, 1.0, name=name, family=name),
            "model": {"name": f"m{params}", "params": params, "layers": 2, "hidden": 64, "heads": 4, "vocab": 99},
            "hardware": {"device": "cpu", "threads": threads, "cores": 2}}


def test_history_appends_reads_and_skips_what_does_not_fit(tmp_path):
    h = History(tmp_path / "h.jsonl")
    h.append(make_record("policy", "ok", _feats(), tokens_per_s=100.0, latency_s=0.1))
    h.append(make_record("hf-default", "failed", _feats(), error="boom"))
    with open(h.path, "a") as f:
        f.write(json.dumps({"schema": SCHEMA + 1, "method": "x"}) + "\n")  # a future schema
        f.write("not json\n")
        f.write('{"schema": 1, "method": "policy", "stat')  # a crash mid-line
    h.append(make_record("hf-eager", "infeasible", _feats(), error="why"))  # starts on a fresh line
    r = h.read()
    assert [x["method"] for x in r.records] == ["policy", "hf-default", "hf-eager"]
    assert r.skipped == 3
    assert r.records[0]["schema"] == SCHEMA and r.records[0]["setting"] == r.records[1]["setting"]
    with pytest.raises(HistoryError, match="tokens_per_s"):
        make_record("policy", "ok", _feats(), tokens_per_s=float("nan"))
    with pytest.raises(HistoryError, match="status"):
        make_record("policy", "great", _feats())


def _append_many(path, tag, n):
    h = History(path)
    for i in range(n):
        h.append(make_record("policy", "ok", _feats(), tokens_per_s=1.0 + i, source=tag, pad="x" * 3000))


def test_history_appends_from_two_processes_never_interleave(tmp_path):
    path = tmp_path / "h.jsonl"
    ctx = multiprocessing.get_context("fork")
    ps = [ctx.Process(target=_append_many, args=(path, f"p{k}", 60)) for k in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    r = History(path).read()
    assert r.skipped == 0 and len(r.records) == 120


# ------------------------------------------------------------------ learner + online layer

TRUTH_METHODS = ["policy", "hf-default", "hf-static", "policy-chunk4"]


def _true_tps(f, m):
    """A synthetic world: batch-friendly methods win on many rows, overhead-light ones on few."""
    rows, params, threads = f["workload"]["rows"], f["model"]["params"], f["hardware"]["threads"]
    base = 1e6 / params * threads ** 0.5
    gain = {"policy": 0.0, "hf-default": -0.2 + 0.25 * math.log(rows / 16),
            "hf-static": 0.3 - 0.3 * math.log(rows / 4), "policy-chunk4": -0.5}[m]
    return base * rows / (rows + 8) * math.exp(gain)


def _synthetic_records(rng, n_settings):
    out = []
    for _ in range(n_settings):
        f = _feats(rows=rng.choice([2, 4, 8, 16, 32, 64, 128, 256]), params=rng.choice([1e5, 1e6, 4e6]),
                   threads=rng.choice([1, 2, 4]), name=f"w{rng.random():.6f}")
        for m in TRUTH_METHODS:
            out.append(make_record(m, "ok", f, tokens_per_s=_true_tps(f, m) * math.exp(rng.gauss(0, 0.03))))
    return out


def test_gradient_boosting_fits_a_step_and_a_slope():
    rng = random.Random(0)
    X = [[rng.random(), rng.random()] for _ in range(200)]
    y = [(3.0 if a > 0.5 else 0.0) + 2 * b for a, b in X]
    gb = GradientBoosting(n_trees=100, depth=3).fit(X, y)
    err = [abs(p - t) for p, t in zip(gb.predict(X), y)]
    assert sum(err) / len(err) < 0.15


def test_selector_learns_on_synthetic_data_and_beats_random():
    rng = random.Random(1)
    train = settings_from_records(_synthetic_records(rng, 40))
    test = settings_from_records(_synthetic_records(rng, 30))
    model = ThroughputModel(n_trees=80).fit(train)
    sel_regret, rnd_regret = [], []
    for s in test:
        pick = choose_offline(model, s.features, TRUTH_METHODS)
        best = max(s.tps.values())
        sel_regret.append(best / s.tps[pick] - 1)
        rnd_regret.append(sum(best / v - 1 for v in s.tps.values()) / len(s.tps))
    assert sum(sel_regret) / len(sel_regret) < 0.5 * sum(rnd_regret) / len(rnd_regret)
    assert sorted(sel_regret)[len(sel_regret) // 2] < 0.05


def test_online_layer_converges_to_the_best_method_and_explores_rarely():
    f = _feats(rows=256, params=1e6)
    truth = {m: _true_tps(f, m) for m in TRUTH_METHODS}
    rng = random.Random(2)
    sel = OnlineSelector(None, f, TRUTH_METHODS, rng=rng, explore_rate=0.5)  # no learner: unsure priors
    explored = 0
    for _ in range(400):
        m, exploring = sel.choose()
        explored += exploring
        sel.observe(m, truth[m] * math.exp(rng.gauss(0, 0.05)))
    assert sel.best() == max(truth, key=truth.get) == "hf-default"
    assert explored < 40  # a rate decaying as 1/sqrt(round)
    # a method that fails is dropped; the default never is
    sel.observe("hf-default", None)
    assert sel.best() == "policy"


def test_quality_guard_keeps_lossy_methods_out_of_training_rollouts():
    feasible = ["policy", "hf-default", "int8-dynamic"]
    assert allowed_methods(feasible, GuardPolicy(), training=True, divergence={"int8-dynamic": 1e-6}) == \
        ["policy", "hf-default"]
    allow = GuardPolicy(allow_lossy=True, max_divergence=1e-3)
    assert "int8-dynamic" not in allowed_methods(feasible, allow, divergence={})  # no measured bound
    assert "int8-dynamic" not in allowed_methods(feasible, allow, divergence={"int8-dynamic": 0.5})
    assert "int8-dynamic" in allowed_methods(feasible, allow, divergence={"int8-dynamic": 1e-5})


def test_features_are_a_fixed_numeric_vector():
    v = numeric(_feats())
    assert len(v) == len(NUMERIC) and all(math.isfinite(x) for x in v)


def test_bench_selector_reports_every_field_on_a_history(tmp_path, capsys):
    from rollshare.bench import selector as bench

    rng = random.Random(3)
    h = History(tmp_path / "h.jsonl")
    recs = []
    for params in (1e5, 1e6, 4e6):
        for threads in (1, 2):
            for rows in (4, 16, 64, 256):
                f = _feats(rows=rows, params=params, threads=threads, name=f"r{rows}")
                for m in TRUTH_METHODS:
                    recs.append(make_record(m, "ok", f, tokens_per_s=_true_tps(f, m) * math.exp(rng.gauss(0, 0.02)),
                                            tokens=100, times=[0.01, 0.011]))
    h.extend(recs)
    assert bench.main(["--history", str(h.path), "--json", "--quick", "--rounds", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("median_regret", "mean_regret", "gap_closed", "top1", "cold_start_regret", "end_to_end_speedup"):
        assert k in out
    assert set(out["baselines"]) == {"random", "single_best", "transformers_default", "nearest_neighbour"}
    assert set(out["cold_start_regret"]) == {"0", "3", "10"}
    assert set(out["splits"]) == {"model", "workload", "threads"}
    assert out["mean_regret"] < out["baselines"]["random"]["mean_regret"]


# ------------------------------------------------------------------ in the node

def test_node_uses_the_selector_and_reports_the_method(tmp_path, policies, monkeypatch):
    import copy

    from rollshare.config import NodeConfig
    from rollshare.node import Node
    from rollshare.status import format_status

    pol, _ = policies
    base = dict(model="tiny-s", prompts_per_round=4, group_size=2, max_new_tokens=3, network=False, status="off",
                checkpoint_every=1000)
    with Node(NodeConfig(data_dir=tmp_path / "a", gen_method="hf-eager", **base), policy=copy.deepcopy(pol)) as n:
        m = n.run_round()
        assert m["method"] == "hf-eager" and "gen hf-eager" in format_status(m)
    with Node(NodeConfig(data_dir=tmp_path / "b", **base), policy=copy.deepcopy(pol)) as n:  # auto
        seen = {n.run_round()["method"] for _ in range(3)}
        assert seen <= set(n.generation.selector.candidates) and "policy" in seen
        # a method that raises is recorded as a failure, dropped, and the round still completes
        monkeypatch.setattr(n.generation.selector, "choose", lambda feats: ("hf-default", True))

        def boom(*a, **k):
            raise RuntimeError("kernel exploded")

        monkeypatch.setattr(M.REGISTRY["hf-default"], "generate", boom)
        m = n.run_round()
        assert m["method"] == "policy" and "hf-default" in n.generation.failures
        failed = [r for r in History(tmp_path / "b" / "accel" / "history.jsonl").records() if r["status"] == "failed"]
        assert failed and failed[-1]["method"] == "hf-default" and failed[-1]["source"] == "node"


def test_bad_gen_method_is_a_config_error(tmp_path):
    from rollshare.config import ConfigError, NodeConfig

    with pytest.raises(ConfigError, match="--gen-method"):
        NodeConfig(data_dir=tmp_path, gen_method="warp-drive").validate()


def test_round_selector_tries_only_cheap_methods_without_history_and_compiles_only_in_long_runs():
    from rollshare.accel.selector import RoundSelector

    feasible = list(M.REGISTRY)
    fresh = RoundSelector([], feasible, GuardPolicy())
    assert fresh.candidates[0] == "policy" and not fresh.model.fitted
    assert not {"hf-static-compile", "prompt-lookup", "assisted", "int8-dynamic"} & set(fresh.candidates)
    rng = random.Random(4)
    recs = _synthetic_records(rng, 6)
    recs += [make_record("hf-static-compile", "ok", r["features"], tokens_per_s=r["tokens_per_s"])
             for r in recs if r["method"] == "policy"]
    short = RoundSelector(recs, feasible, GuardPolicy(), horizon_rounds=12)
    long_ = RoundSelector(recs, feasible, GuardPolicy(), horizon_rounds=0)
    assert short.model.fitted and "hf-static-compile" not in short.candidates
    assert "hf-static-compile" in long_.candidates and "prompt-lookup" in long_.candidates
    assert RoundSelector(recs, feasible, GuardPolicy(), fixed="hf-eager").choose(recs[0]["features"]) == \
        ("hf-eager", False)
