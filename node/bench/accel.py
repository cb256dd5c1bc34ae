"""`rollshare bench accel`: measure every generation method over a grid of models, workloads and
thread settings, and append the measurements to the history the selector learns from.

For each model size x thread setting x workload shape, every method: a warm-up call on one
prompt of the workload (loads, compiles, allocates), then the full workload repeated, the calls
of all methods interleaved round robin so that load from other processes falls on all alike
(3 calls, more for fast methods until ~0.6 s is spent; a slow method stops after 1.5 s, one
call at least); median tokens/s over the calls, latency
(seconds per call) and peak resident memory above the start (a sampler thread; on a GPU the
allocator's peak). Completions are fixed-length (min_new_tokens = max_new_tokens), so every
method generates the same number of tokens; tokens/s counts the tokens really generated.
Methods that are infeasible here are recorded as such; methods that raise (out of memory
included) are recorded as failures with the error.

    rollshare bench accel                 full grid (3 sizes x 6 shapes x 2 thread settings)
    rollshare bench accel --quick         tiny-s, 2 shapes, 1 thread, no torch.compile (< 1 min)

Progress goes to stderr; with --json the last stdout line is one JSON summary object.
This module only measures: it never changes a method or the policy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rollshare.accel.features import hardware_features, model_features, workload_features
from rollshare.accel.history import History, make_record
from rollshare.accel.methods import REGISTRY, MethodContext, run_method
from rollshare.accel.runtime import history_path

MIX = {"chain_sum": 1.0}


@dataclass(frozen=True)
class Shape:
    name: str
    prompts: int
    group_size: int
    max_new_tokens: int
    greedy: bool = False
    style: str = "compact"
    temperature: float = 1.0


#: The workload grid. Each shape is its own workload family in the selector's cross-validation.
SHAPES: tuple[Shape, ...] = (
    Shape("round", 16, 8, 5),  # the node's default round
    Shape("wide", 32, 8, 5),  # many rows
    Shape("long", 4, 8, 32),  # long completions
    Shape("single", 1, 4, 24),  # one question, few rows
    Shape("eval", 64, 1, 8, greedy=True),  # greedy evaluation, no groups
    Shape("fullprompt", 8, 8, 8, style="full"),  # long prompts
)
SIZES = ("tiny-s", "tiny", "tiny-m")
THREADS = (1, 2)


def default_history_path(data_dir: str | os.PathLike | None = None) -> Path:
    """The history a node with this data directory (default: the user's) reads and writes."""
    from rollshare.config import default_data_dir

    return history_path(Path(data_dir or default_data_dir()))


class PeakMemory:
    """Peak resident memory (MB) above the level at entry, sampled every few ms by a thread this owns."""

    def __init__(self, device: str = "cpu", every_s: float = 0.003):
        self.device, self.every_s = device, every_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._rss()
        peak = [self._base]

        def sample():
            while not self._stop.wait(self.every_s):
                peak[0] = max(peak[0], self._rss())

        self._peak = peak
        self._thread = threading.Thread(target=sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._peak[0] = max(self._peak[0], self._rss())
        self.peak_mb = max(0.0, (self._peak[0] - self._base) / 2**20)


def workload_prompts(shape: Shape, seed: int = 0) -> list[str]:
    from rollshare.tasks import TaskDrawer

    return [t.prompt for t in TaskDrawer(MIX, seed=seed, style=shape.style).draw(shape.prompts)]


def measure_setting(methods: list[str], policy, ctx: MethodContext, prompts: list[str], shape: Shape,
                    repeats: int = 3, target_s: float = 0.6, slow_s: float = 1.5, max_repeats: int = 15,
                    seed: int = 0) -> dict[str, dict]:
    """All methods on one workload, their calls interleaved (round robin, order shuffled per pass) so
    that load from other processes falls on every method alike.

    Each method: a warm-up call on one prompt, then full calls until it has `repeats` of them and
    ~target_s spent (fast methods, at most max_repeats), or one call at least and slow_s spent (slow
    ones). Per method {status, tokens_per_s (median call), latency_s, peak_mem_mb, setup_s, times,
    tokens, error}."""
    import random

    fixed = {"min_new_tokens": shape.max_new_tokens}
    out: dict[str, dict] = {}

    def call(m, ps):
        return run_method(m, policy, ps, shape.group_size, shape.max_new_tokens, shape.temperature,
                          greedy=shape.greedy, ctx=ctx, generate_kwargs=fixed)

    def attempt(m, fn):
        try:
            return fn()
        except (MemoryError, torch.OutOfMemoryError) as e:
            out[m] = {"status": "failed", "error": f"out of memory: {e}"[:300]}
        except Exception as e:  # noqa: BLE001 - a failing method is a measurement too
            out[m] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
        return None

    state: dict[str, dict] = {}
    for m in methods:
        why = REGISTRY[m].why_infeasible(policy, ctx)
        if why:
            out[m] = {"status": "infeasible", "error": why}
            continue
        t = time.perf_counter()
        if attempt(m, lambda: call(m, prompts[:1])) is not None:
            state[m] = {"setup_s": time.perf_counter() - t, "times": [], "peak": 0.0, "tokens": 0}

    def wants_more(st) -> bool:
        n, spent = len(st["times"]), sum(st["times"])
        return not n or (n < max_repeats and spent < slow_s and (n < repeats or spent < target_s))

    rng = random.Random(seed)
    while True:
        active = [m for m, st in state.items() if m not in out and wants_more(st)]
        if not active:
            break
        rng.shuffle(active)
        for m in active:
            st = state[m]
            with PeakMemory(ctx.device) as mem:
                t = time.perf_counter()
                groups = attempt(m, lambda: call(m, prompts))
                dt = time.perf_counter() - t
            if groups is None:
                continue
            st["times"].append(dt)
            st["peak"] = max(st["peak"], mem.peak_mb)
            st["tokens"] = sum(len(s.completion_ids) for g in groups for s in g)
    for m, st in state.items():
        if m in out:
            continue
        lat = statistics.median(st["times"])
        out[m] = {"status": "ok", "tokens_per_s": st["tokens"] / lat, "latency_s": lat, "peak_mem_mb": st["peak"],
                  "setup_s": st["setup_s"], "times": [round(x, 6) for x in st["times"]], "tokens": st["tokens"]}
    return out


class Progress:
    def __init__(self, total: int, stream=sys.stderr, width: int = 24):
        self.total, self.stream, self.width = total, stream, width
        self.done = 0
        self.start = time.monotonic()
        self.live = stream.isatty()
        self._last = 0.0

    def step(self, label: str) -> None:
        self.done += 1
        el = time.monotonic() - self.start
        eta = el / self.done * (self.total - self.done)
        bar = "#" * int(self.width * self.done / self.total)
        line = (f"[{bar:<{self.width}}] {self.done}/{self.total} {el:5.0f}s eta {eta:4.0f}s  {label}")
        if self.live:
            self.stream.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                self.stream.write("\n")
        elif time.monotonic() - self._last > 10 or self.done == self.total:
            self._last = time.monotonic()
            self.stream.write(line + "\n")
        self.stream.flush()


def load_models(sizes, warmup_steps: int, cache_dir: Path | None) -> dict:
    from rollshare.policies.tiny import embedded_policy

    return {s: embedded_policy(cache_dir, MIX, size=s, warmup_steps=warmup_steps, show_progress=True)
            for s in sizes}


def run_grid(sizes, shapes, threads, methods, warmup_steps: int, history: History | None,
             cache_dir: Path | None, repeats: int = 3, log=lambda m: print(m, file=sys.stderr)) -> list[dict]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    policies = load_models(sizes, warmup_steps, cache_dir)
    by_params = sorted(policies.values(), key=lambda p: p.num_parameters)
    total = len(sizes) * len(threads) * len(shapes) * len(methods)
    prog = Progress(total)
    records = []
    before = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            hw = hardware_features("cpu")
            log(f"threads {n_threads}: matmul {hw['matmul_gflops']:.1f} GFLOP/s, op {hw['op_latency_us']:.1f} us, "
                f"copy {hw['copy_gbps']:.1f} GB/s")
            for size in sizes:
                policy = policies[size]
                smaller = [p for p in by_params if p.num_parameters < policy.num_parameters]
                ctx = MethodContext(device="cpu", draft=smaller[0] if smaller else None)
                mf = model_features(policy.model, name=size)
                for shape in shapes:
                    prompts = workload_prompts(shape)
                    wf = workload_features([len(x) for x in policy.encode(prompts)], shape.group_size,
                                           shape.max_new_tokens, shape.temperature, shape.greedy,
                                           name=shape.name, family=shape.name)
                    feats = {"workload": wf, "model": mf, "hardware": hw}
                    batch = []
                    results = measure_setting(methods, policy, ctx, prompts, shape, repeats)
                    for method in methods:
                        res = results[method]
                        rec = make_record(method, res.pop("status"), feats, source="bench",
                                          lossless=REGISTRY[method].lossless, **res)
                        batch.append(rec)
                        tag = (f"{rec['tokens_per_s']:.0f} tok/s" if rec["status"] == "ok" else rec["status"])
                        prog.step(f"{size} t{n_threads} {shape.name} {method}: {tag}")
                    if history is not None:
                        history.extend(batch)
                    records += batch
    finally:
        torch.set_num_threads(before)
    return records


def summarise(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    settings: dict[str, list[dict]] = {}
    for r in ok:
        settings.setdefault(r["setting"], []).append(r)
    wins: dict[str, int] = {}
    for rs in settings.values():
        best = max(rs, key=lambda r: r["tokens_per_s"])["method"]
        wins[best] = wins.get(best, 0) + 1
    by_method: dict[str, list[float]] = {}
    for r in ok:
        by_method.setdefault(r["method"], []).append(r["tokens_per_s"])
    return {
        "records": len(records), "ok": len(ok),
        "failed": sum(r["status"] == "failed" for r in records),
        "infeasible": sum(r["status"] == "infeasible" for r in records),
        "settings": len(settings), "wins": dict(sorted(wins.items(), key=lambda kv: -kv[1])),
        "median_tokens_per_s": {m: round(statistics.median(v), 1) for m, v in sorted(by_method.items())},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollshare bench accel", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--quick", action="store_true",
                   help="tiny-s, 2 shapes, 1 thread, no torch.compile, not written to the history (< 1 min)")
    p.add_argument("--sizes", help=f"model sizes, comma-separated (default {','.join(SIZES)})")
    p.add_argument("--shapes", help=f"workload shapes (default {','.join(s.name for s in SHAPES)})")
    p.add_argument("--threads", help=f"torch thread settings (default {','.join(map(str, THREADS))})")
    p.add_argument("--methods", help="methods to run (default all in the registry)")
    p.add_argument("--repeats", type=int, default=3, help="measured calls per cell after warm-up (default 3)")
    p.add_argument("--warmup-steps", type=int, default=20,
                   help="supervised warm-up of the models, cached: enough for answer-like text, which is what "
                        "speculative methods feed on (default 20; 0 with --quick)")
    p.add_argument("--data-dir", help="where models are cached and the history kept (default: the node's)")
    p.add_argument("--history", help="history file (default <data-dir>/accel/history.jsonl)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shapes_by = {s.name: s for s in SHAPES}
    sizes = args.sizes.split(",") if args.sizes else (["tiny-s"] if args.quick else list(SIZES))
    shape_names = args.shapes.split(",") if args.shapes else (["round", "single"] if args.quick else list(shapes_by))
    threads = [int(x) for x in args.threads.split(",")] if args.threads else ([1] if args.quick else list(THREADS))
    methods = args.methods.split(",") if args.methods else [
        m for m in REGISTRY if not (args.quick and m == "hf-static-compile")]
    for m in methods:
        if m not in REGISTRY:
            print(f"rollshare bench accel: unknown method {m!r}; choose from {', '.join(REGISTRY)}", file=sys.stderr)
            return 2
    for s in shape_names:
        if s not in shapes_by:
            print(f"rollshare bench accel: unknown shape {s!r}; choose from {', '.join(shapes_by)}", file=sys.stderr)
            return 2
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else None
    history = None
    if args.history or not args.quick:
        history = History(args.history or default_history_path(data_dir))
    cache_dir = default_history_path(data_dir).parent / "models"
    warm = 0 if args.quick and "--warmup-steps" not in (argv or sys.argv) else args.warmup_steps
    t0 = time.monotonic()
    records = run_grid(sizes, [shapes_by[s] for s in shape_names], threads, methods, warm, history,
                       cache_dir, repeats=args.repeats)
    result = {"bench": "accel", "quick": bool(args.quick), "sizes": sizes, "shapes": shape_names,
              "threads": threads, "methods": methods, "seconds": round(time.monotonic() - t0, 1),
              "history": str(history.path) if history else None, **summarise(records)}
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
