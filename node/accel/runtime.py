"""The node's generation step with a chosen method: ask the selector, generate, measure, feed back.

`GenerationPicker.generate` is what the round loop calls instead of `Policy.generate`. With
`--gen-method auto` each call asks the `RoundSelector` for a method (the learner's prediction for
this workload, model and machine, refined by the node's own measured rounds), times the call,
and reports the tokens/s back. A method that raises is recorded as a failure, dropped for the
rest of the run, and the round is generated again with the safe default, so a round never fails
because of the selector. Measurements go to the history (explorations and failures always, the
chosen method at most once per `record_every_s`), so the next start learns from them.

It never touches the network, the store or the optimiser.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from rollshare.accel.features import hardware_features, model_features, workload_features
from rollshare.accel.history import History, HistoryError, make_record
from rollshare.accel.methods import (DEFAULT_METHOD, REGISTRY, MethodContext, MethodError, divergence_bound,
                                     feasible_methods, run_method)
from rollshare.accel.selector import GuardPolicy, RoundSelector
from rollshare.policies import Policy, Sample

_HARDWARE: dict[tuple, dict] = {}  # per (device, threads): the fingerprint is measured once a process


def cached_hardware(device: str) -> dict:
    key = (device, torch.get_num_threads())
    if key not in _HARDWARE:
        hw = hardware_features(device, with_fingerprint=False)
        from rollshare.accel.features import fingerprint

        hw.update(fingerprint(device, seconds=0.1))
        _HARDWARE[key] = hw
    return _HARDWARE[key]


class GenerationPicker:
    def __init__(self, policy: Policy, method: str = "auto", history: History | None = None,
                 guard: GuardPolicy | None = None, horizon_rounds: int = 0, seed: int = 0,
                 ctx: MethodContext | None = None, record_every_s: float = 60.0,
                 log: Callable[[str], None] | None = None, probe_prompts: Sequence[str] = ()):
        self.policy = policy
        self.log = log or (lambda m: None)
        self.history = history
        self.ctx = ctx or MethodContext(device=policy.device.type)
        self.guard = guard or GuardPolicy()
        self.record_every_s = record_every_s
        self._last_record = -float("inf")
        self.mode = method
        self.last_method = ""
        self.last_explore = False
        self.rounds = 0
        self.failures: dict[str, str] = {}
        self.sink: Callable[[list[dict]], None] | None = None  # where our records are also shared (the swarm)
        feasible = [m for m, why in feasible_methods(policy, self.ctx).items() if why is None]
        if method != "auto" and method not in feasible:
            raise MethodError(f"--gen-method {method} is not feasible here: "
                              f"{REGISTRY[method].why_infeasible(policy, self.ctx)}")
        records: list[dict] = []
        if method == "auto" and history is not None:
            read = history.read()
            records = read.records
            if read.skipped:
                self.log(f"generation history {history.path}: skipped {read.skipped} unreadable lines")
        divergence = {}
        if method == "auto" and self.guard.allow_lossy and probe_prompts:
            for m in feasible:
                if not REGISTRY[m].lossless:
                    divergence[m] = divergence_bound(m, policy, list(probe_prompts)[:4], ctx=self.ctx)
        self.selector = RoundSelector(records, feasible, self.guard, divergence=divergence,
                                      horizon_rounds=horizon_rounds, seed=seed,
                                      fixed=None if method == "auto" else method)
        self.model_feats = model_features(policy.model, name=policy.name)
        if method == "auto":
            fitted = "learned from %d settings" % len(self.selector.settings) if self.selector.model.fitted \
                else "no history yet: the default, exploring rarely"
            self.log(f"generation method: auto ({fitted}; candidates {', '.join(self.selector.candidates)})")

    def features(self, prompt_ids: Sequence[Sequence[int]], group_size: int, max_new_tokens: int,
                 temperature: float) -> dict:
        return {"workload": workload_features([len(p) for p in prompt_ids], group_size, max_new_tokens,
                                              temperature, name="node", family="node"),
                "model": self.model_feats, "hardware": cached_hardware(self.ctx.device)}

    def generate(self, prompts: Sequence[str], group_size: int, max_new_tokens: int,
                 temperature: float = 1.0) -> list[list[Sample]]:
        self.rounds += 1
        feats = self.features(self.policy.encode(prompts), group_size, max_new_tokens, temperature)
        method, exploring = self.selector.choose(feats)
        t = time.perf_counter()
        try:
            groups = run_method(method, self.policy, prompts, group_size, max_new_tokens, temperature, ctx=self.ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a failing method is recorded and replaced, never fatal
            if method == DEFAULT_METHOD:
                raise
            why = f"{type(e).__name__}: {e}"[:300]
            self.failures[method] = why
            self.log(f"generation method {method} failed ({why}); dropped for this run, using {DEFAULT_METHOD}")
            self.selector.observe(feats, method, None)
            self._record(method, "failed", feats, error=why)
            method, exploring = DEFAULT_METHOD, False
            t = time.perf_counter()
            groups = run_method(method, self.policy, prompts, group_size, max_new_tokens, temperature, ctx=self.ctx)
        dt = time.perf_counter() - t
        tokens = sum(len(s.completion_ids) for g in groups for s in g)
        tps = tokens / max(dt, 1e-9)
        self.selector.observe(feats, method, tps)
        # explorations always; the chosen method's rounds at most once a minute (the file stays small)
        if exploring or self.rounds == 1 or time.monotonic() - self._last_record >= self.record_every_s:
            self._last_record = time.monotonic()
            self._record(method, "ok", feats, tokens_per_s=tps, latency_s=dt, tokens=tokens, times=[round(dt, 6)],
                         explore=exploring)
        self.last_method, self.last_explore = method, exploring
        return groups

    def _record(self, method: str, status: str, feats: dict, **kw) -> None:
        if self.history is None:
            return
        try:
            rec = make_record(method, status, feats, source="node", lossless=REGISTRY[method].lossless, **kw)
            self.history.append(rec)
        except (OSError, HistoryError) as e:
            print(f"warning: cannot append to {self.history.path}: {e}", file=sys.stderr)
            return
        if self.sink is not None:
            self.sink([rec])

    def share_with(self, exchange, recent: int = 192) -> None:
        """Share our future records, and the most recent `recent` of this machine's, with the swarm."""
        self.sink = exchange.share
        if self.history is not None:
            own = [r for r in self.history.records() if r.get("source") in ("bench", "node")]
            exchange.share(own[-recent:])


def history_path(data_dir: Path, configured: str = "") -> Path:
    return Path(configured).expanduser() if configured else Path(data_dir).expanduser() / "accel" / "history.jsonl"
