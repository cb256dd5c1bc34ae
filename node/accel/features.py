"""What describes a generation task to the selector: the workload, the model and the hardware.

    workload  prompts per call, group size, rows, prompt length statistics, max new tokens,
              temperature, greedy or sampled
    model     parameters, layers, hidden size, heads (and key/value heads), vocabulary, dtype
    hardware  device type and name, cores, torch threads, memory, GPU capability, CPU flags,
              and a fingerprint: three fixed micro-benchmarks that take about a second
              (a matmul's GFLOP/s, a small op's latency, a copy's GB/s) at the current threads

`numeric(features)` flattens them into the fixed list of numbers the learner uses (`NUMERIC`);
names and strings stay in the record for people. Nothing here runs a model.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Sequence

import torch

_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "fma", "neon", "asimd")


def workload_features(prompt_lengths: Sequence[int], group_size: int, max_new_tokens: int, temperature: float,
                      greedy: bool = False, name: str = "", family: str = "") -> dict:
    n = max(1, len(prompt_lengths))
    lens = list(prompt_lengths) or [0]
    return {
        "name": name, "family": family,
        "prompts": len(prompt_lengths), "group_size": group_size, "rows": len(prompt_lengths) * group_size,
        "prompt_len_mean": sum(lens) / n, "prompt_len_max": max(lens), "prompt_len_min": min(lens),
        "prompt_len_std": statistics.pstdev(lens) if len(lens) > 1 else 0.0,
        "max_new_tokens": max_new_tokens, "temperature": 0.0 if greedy else temperature, "greedy": bool(greedy),
    }


def model_features(model: torch.nn.Module, name: str = "") -> dict:
    cfg = model.config
    p = next(model.parameters())
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    return {
        "name": name,
        "params": sum(x.numel() for x in model.parameters()),
        "layers": getattr(cfg, "num_hidden_layers", 0) or 0,
        "hidden": getattr(cfg, "hidden_size", 0) or 0,
        "heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", heads) or heads,
        "intermediate": getattr(cfg, "intermediate_size", 0) or 0,
        "vocab": getattr(cfg, "vocab_size", 0) or 0,
        "dtype": str(p.dtype).replace("torch.", ""),
        "attn": getattr(cfg, "_attn_implementation", "") or "",
    }


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in _CPU_FLAGS if x in have]
    except OSError:
        pass
    return []


def _mem_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: str = "cpu", seconds: float = 0.3) -> dict:
    """Three fixed micro-benchmarks, each the best of repeats for about `seconds`, at the current
    torch threads: matmul GFLOP/s (256x256 fp32), a small op's latency (µs), a 4 MB copy's GB/s."""
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def best(fn, min_reps: int = 3) -> float:
        fn()
        sync()
        times, end = [], time.perf_counter() + seconds
        while len(times) < min_reps or time.perf_counter() < end:
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
            if len(times) > 10_000:
                break
        return min(times)

    a = torch.randn(256, 256, device=dev)
    b = torch.randn(256, 256, device=dev)
    t_mm = best(lambda: a @ b)
    small = torch.randn(8, 64, device=dev)
    t_op = best(lambda: torch.nn.functional.silu(small) * small)
    big = torch.randn(1 << 20, device=dev)
    out = torch.empty_like(big)
    t_cp = best(lambda: out.copy_(big))
    return {"matmul_gflops": 2 * 256 ** 3 / t_mm / 1e9, "op_latency_us": t_op * 1e6,
            "copy_gbps": 2 * big.numel() * 4 / t_cp / 1e9}


def hardware_features(device: str = "cpu", with_fingerprint: bool = True) -> dict:
    d = {
        "device": device, "cpu": _cpu_name(), "cores": os.cpu_count() or 1, "threads": torch.get_num_threads(),
        "mem_gb": round(_mem_gb(), 1), "cpu_flags": _cpu_flags(), "gpu": "", "gpu_capability": 0.0,
        "gpu_mem_gb": 0.0,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        i = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(i)
        d.update(gpu=props.name, gpu_capability=float(f"{props.major}.{props.minor}"),
                 gpu_mem_gb=round(props.total_memory / 2**30, 1))
    if with_fingerprint:
        d.update(fingerprint(device))
    return d


#: The numbers the learner sees, in order. Sizes and rates enter as logs (they span decades).
NUMERIC: tuple[str, ...] = (
    "w.log_rows", "w.log_prompts", "w.log_group_size", "w.log_prompt_len", "w.prompt_len_spread",
    "w.log_max_new_tokens", "w.greedy", "w.log_new_tokens_total",
    "m.log_params", "m.layers", "m.log_hidden", "m.heads", "m.log_vocab", "m.half",
    "h.gpu", "h.log_threads", "h.log_cores", "h.avx512", "h.log_matmul_gflops", "h.log_op_latency_us",
    "h.log_copy_gbps", "h.gpu_capability",
    "x.log_flops_per_token", "x.log_work",
)


def numeric(features: dict) -> list[float]:
    """The learner's view of a record's features: `NUMERIC`, in order (missing values count as 0)."""
    w, m, h = features.get("workload", {}), features.get("model", {}), features.get("hardware", {})

    def lg(x) -> float:
        try:
            return math.log(max(float(x), 1e-9) + 1.0)
        except (TypeError, ValueError):
            return 0.0

    rows = w.get("rows", 0)
    flops_tok = 2.0 * float(m.get("params", 0) or 0)
    return [
        lg(rows), lg(w.get("prompts", 0)), lg(w.get("group_size", 0)), lg(w.get("prompt_len_mean", 0)),
        float(w.get("prompt_len_max", 0) - w.get("prompt_len_min", 0)) / max(1.0, float(w.get("prompt_len_mean", 1) or 1)),
        lg(w.get("max_new_tokens", 0)), float(bool(w.get("greedy", False))),
        lg(rows * float(w.get("max_new_tokens", 0) or 0)),
        lg(m.get("params", 0)), float(m.get("layers", 0) or 0), lg(m.get("hidden", 0)), float(m.get("heads", 0) or 0),
        lg(m.get("vocab", 0)), float(m.get("dtype", "float32") in ("bfloat16", "float16")),
        float(str(h.get("device", "cpu")).startswith("cuda")), lg(h.get("threads", 1)), lg(h.get("cores", 1)),
        float("avx512f" in (h.get("cpu_flags") or [])), lg(h.get("matmul_gflops", 0)), lg(h.get("op_latency_us", 0)),
        lg(h.get("copy_gbps", 0)), float(h.get("gpu_capability", 0) or 0),
        lg(flops_tok), lg(flops_tok * rows * float(w.get("max_new_tokens", 0) or 0)),
    ]
