"""The registry of generation methods: named ways to turn prompts into G sampled completions each.

Every method takes a `Policy` and returns what `Policy.generate` returns (per prompt a list of G
`Sample`s with per-token behaviour log-probs), so the round loop can use any of them. A method
states where it is feasible (device, a draft model at hand) and whether it keeps the sampling
distribution unchanged (`lossless`). Methods whose generate call gives no usable scores (batch-1
speculative decoding, int8 copies) re-score their completions under the policy with one batched
forward pass; that pass is part of the method and of its measured time.

    policy            Policy.generate: prompt prefill shared across the G rows, dynamic cache
    policy-noshare    Policy.generate, every row prefilled on its own
    policy-chunk4     Policy.generate over chunks of 4 prompts (batching strategy)
    hf-default        transformers' model.generate as shipped: sdpa attention, dynamic cache
    hf-eager          model.generate with eager attention
    hf-rows32         hf-default over chunks of 32 rows (batching strategy)
    hf-static         model.generate with a static (preallocated) KV cache
    hf-static-compile static cache + torch.compile of the forward (compiled once per shape)
    prompt-lookup     prompt-lookup decoding (n-gram drafts from the prompt); batch 1, row by row
    assisted          assisted decoding with a smaller draft policy; batch 1, row by row
    int8-dynamic      dynamic int8 quantization of the Linear layers (CPU); lossy
    bf16-gpu/fp16-gpu half precision copies on a GPU; lossy

A method that raises (out of memory included) is a failure for the caller to record, never
silently skipped. This module never decides which method to use: that is the selector's job.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rollshare.policies import Policy, Sample

DEFAULT_METHOD = "policy"  # the safe default: our own generate
TRANSFORMERS_DEFAULT = "hf-default"


class MethodError(RuntimeError):
    """A method asked for where it cannot run, or an unknown method name."""


@dataclass
class MethodContext:
    """What a method may need besides the policy: the device and, for assisted decoding, a draft."""

    device: str = "cpu"
    draft: Policy | None = None


@dataclass
class Method:
    name: str
    lossless: bool
    description: str
    generate: Callable[..., list[list[Sample]]]  # (policy, ctx, prompts, G, max_new, T, greedy, extra) -> groups
    feasible: Callable[[Policy, MethodContext], str | None] = lambda p, c: None  # None = feasible, else why not
    one_off_setup: bool = False  # pays a large cost on first use (compilation): only worth it in long runs
    row_by_row: bool = False  # batch 1: decodes each row alone (slow to try on large batches)
    # state a method keeps per policy (a compiled forward, a quantized copy), made on first use
    _state: dict = field(default_factory=dict, repr=False)

    def why_infeasible(self, policy: Policy, ctx: MethodContext) -> str | None:
        return self.feasible(policy, ctx)


# ------------------------------------------------------------------ helpers

class _attention:
    """Use attention implementation `impl` for the duration of a call, then restore the model's own."""

    def __init__(self, policy: Policy, impl: str | None):
        self.model, self.impl = policy.model, impl
        self.before = policy.model.config._attn_implementation

    def __enter__(self):
        if self.impl and self.impl != self.before:
            self.model.set_attn_implementation(self.impl)

    def __exit__(self, *exc):
        if self.impl and self.impl != self.before:
            self.model.set_attn_implementation(self.before)


def _groups_from_rows(policy: Policy, prompts: Sequence[str], prompt_ids: list[list[int]], group_size: int,
                      completions: list[list[int]], temperature: float, greedy: bool) -> list[list[Sample]]:
    """Samples from raw completion ids: cut at the first EOS, re-scored under the policy (one batched pass)."""
    cut = []
    for c in completions:
        if policy.eos_id in c:
            c = c[: c.index(policy.eos_id) + 1]
        cut.append(c)
    rows_p = [ids for ids in prompt_ids for _ in range(group_size)]
    logp, mask = policy.token_logprobs(rows_p, [c if c else [policy.pad_id] for c in cut],
                                       1.0 if greedy else temperature)
    logp_l = [row[: len(c)] for row, c in zip(logp.tolist(), cut)]
    texts = policy.decode_many(cut)
    out = []
    for p, prompt in enumerate(prompts):
        out.append([Sample(prompt, prompt_ids[p], cut[r], logp_l[r], texts[r])
                    for r in range(p * group_size, (p + 1) * group_size)])
    return out


# ------------------------------------------------------------------ methods

def _policy(share: bool = True, chunk_prompts: int = 0):
    def gen(policy, ctx, prompts, G, max_new, T, greedy, extra):
        step = chunk_prompts or len(prompts)
        out = []
        for i in range(0, len(prompts), max(1, step)):
            out += policy.generate(prompts[i:i + step], G, max_new, T, greedy=greedy, generate_kwargs=extra,
                                   share_prompt_prefill=share)
        return out
    return gen


def _hf(attn: str | None, cache: str | None = None, compile_: bool = False, chunk_rows: int = 0):
    """model.generate on rows = prompts x G (no shared prefill), logits -> behaviour log-probs as Policy does."""

    def gen(policy, ctx, prompts, G, max_new, T, greedy, extra):
        kw = dict(extra or {})
        if cache:
            kw["cache_implementation"] = cache
        if compile_:
            from transformers import CompileConfig

            # transformers compiles the forward only on accelerators unless told otherwise
            cc = CompileConfig(fullgraph=False, dynamic=True, mode="default")  # one compile for all shapes
            cc._compile_all_devices = True
            kw["compile_config"] = cc
        else:
            kw.setdefault("disable_compile", True)
        with _attention(policy, attn):
            if not chunk_rows or len(prompts) * G <= chunk_rows:
                return policy.generate(prompts, G, max_new, T, greedy=greedy, generate_kwargs=kw,
                                       share_prompt_prefill=False)
            per = max(1, chunk_rows // G)
            out = []
            for i in range(0, len(prompts), per):
                out += policy.generate(prompts[i:i + per], G, max_new, T, greedy=greedy, generate_kwargs=kw,
                                       share_prompt_prefill=False)
            return out
    return gen


def _one_by_one(kind: str):
    """Speculative decoding (prompt lookup or a draft model) is batch 1 in transformers: row by row."""

    def gen(policy, ctx, prompts, G, max_new, T, greedy, extra):
        kw = policy.sampling_kwargs(max_new, T, greedy)
        kw.update(extra or {})
        kw["disable_compile"] = True
        if kind == "prompt-lookup":
            kw["prompt_lookup_num_tokens"] = 3
        else:
            kw["assistant_model"] = ctx.draft.model
        prompt_ids = policy.encode(prompts)
        completions = []
        policy.model.eval()
        with torch.no_grad():
            for ids in prompt_ids:
                x = torch.tensor([ids or [policy.pad_id]], dtype=torch.long, device=policy.device)
                for _ in range(G):
                    out = policy.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
                    completions.append(out[0, x.shape[1]:].tolist())
        return _groups_from_rows(policy, prompts, prompt_ids, G, completions, T, greedy)
    return gen


def _needs_draft(policy: Policy, ctx: MethodContext) -> str | None:
    if ctx.draft is None:
        return "no draft policy at hand (assisted decoding needs a smaller model with the same tokenizer)"
    if ctx.draft.num_parameters >= policy.num_parameters:
        return "the draft is not smaller than the policy"
    if ctx.draft.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        return "the draft has another tokenizer"
    return None


def _copy_generate(method_state: dict, make: Callable[[Policy], torch.nn.Module]):
    """Generate with a transformed copy of the model (int8, half precision), re-scored under the policy.

    The copy is made once per policy object and remade when the policy's weights change (the copy
    keeps the version of the parameters it was made from)."""

    def gen(policy, ctx, prompts, G, max_new, T, greedy, extra):
        version = sum(int(p._version) for p in policy.model.parameters())
        key = id(policy)
        held = method_state.get(key)
        if held is None or held[0] != version:
            method_state.clear()
            held = (version, Policy.__new__(Policy))
            shadow = held[1]
            shadow.__dict__.update(policy.__dict__)
            shadow.model = make(policy)
            method_state[key] = held
        shadow = held[1]
        groups = shadow.generate(prompts, G, max_new, T, greedy=greedy, generate_kwargs=extra)
        prompt_ids = [g[0].prompt_ids for g in groups]
        completions = [s.completion_ids for g in groups for s in g]
        # behaviour log-probs for training must be the policy's own: re-score in full precision
        return _groups_from_rows(policy, prompts, prompt_ids, G, completions, T, greedy)
    return gen


def _int8(policy: Policy) -> torch.nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(policy.model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


def _half(dtype: torch.dtype):
    def make(policy: Policy) -> torch.nn.Module:
        return copy.deepcopy(policy.model).to(dtype).eval()
    return make


def _cpu_only(policy: Policy, ctx: MethodContext) -> str | None:
    return None if policy.device.type == "cpu" else "dynamic int8 quantization runs on the CPU only"


def _gpu_only(policy: Policy, ctx: MethodContext) -> str | None:
    return None if policy.device.type == "cuda" else "half precision is only worth it on a GPU"


def _cuda_ok(policy: Policy, ctx: MethodContext) -> str | None:
    return None


def build_registry() -> dict[str, Method]:
    ms = [
        Method("policy", True, "Policy.generate, prompt prefill shared across the group", _policy()),
        Method("policy-noshare", True, "Policy.generate, each row prefilled on its own", _policy(share=False)),
        Method("policy-chunk4", True, "Policy.generate over chunks of 4 prompts", _policy(chunk_prompts=4)),
        Method("hf-default", True, "model.generate: sdpa attention, dynamic cache", _hf("sdpa")),
        Method("hf-eager", True, "model.generate: eager attention, dynamic cache", _hf("eager")),
        Method("hf-rows32", True, "model.generate (sdpa) over chunks of 32 rows", _hf("sdpa", chunk_rows=32)),
        Method("hf-static", True, "model.generate with a static KV cache", _hf("sdpa", cache="static")),
        Method("hf-static-compile", True, "static KV cache + torch.compile of the forward",
               _hf("sdpa", cache="static", compile_=True), one_off_setup=True),
        Method("prompt-lookup", True, "prompt-lookup decoding (3-token n-gram drafts), row by row",
               _one_by_one("prompt-lookup"), row_by_row=True),
        Method("assisted", True, "assisted decoding with a smaller draft policy, row by row",
               _one_by_one("assisted"), feasible=_needs_draft, row_by_row=True),
    ]
    int8 = Method("int8-dynamic", False, "dynamic int8 quantization of Linear layers (CPU), re-scored",
                  None, feasible=_cpu_only)  # type: ignore[arg-type]
    int8.generate = _copy_generate(int8._state, _int8)
    ms.append(int8)
    for name, dt in (("bf16-gpu", torch.bfloat16), ("fp16-gpu", torch.float16)):
        m = Method(name, False, f"{name.split('-')[0]} copy of the model on the GPU, re-scored in fp32",
                   None, feasible=_gpu_only)  # type: ignore[arg-type]
        m.generate = _copy_generate(m._state, _half(dt))
        ms.append(m)
    return {m.name: m for m in ms}


REGISTRY: dict[str, Method] = build_registry()
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown generation method {name!r}; choose from {', '.join(REGISTRY)} or 'auto'") from None


def run_method(name: str, policy: Policy, prompts: Sequence[str], group_size: int, max_new_tokens: int,
               temperature: float = 1.0, greedy: bool = False, ctx: MethodContext | None = None,
               generate_kwargs: dict | None = None) -> list[list[Sample]]:
    """Generate with the named method. Raises MethodError where it is infeasible; anything it raises
    while running (torch.OutOfMemoryError included) goes to the caller, who records the failure."""
    m = get_method(name)
    ctx = ctx or MethodContext(device=policy.device.type)
    why = m.why_infeasible(policy, ctx)
    if why:
        raise MethodError(f"method {name} is not feasible here: {why}")
    if not prompts:
        return []
    return m.generate(policy, ctx, list(prompts), group_size, max_new_tokens, temperature, greedy,
                      dict(generate_kwargs or {}))


def feasible_methods(policy: Policy, ctx: MethodContext) -> dict[str, str | None]:
    """Every method with None (feasible) or the reason it is not."""
    return {n: m.why_infeasible(policy, ctx) for n, m in REGISTRY.items()}


def is_lossless(name: str) -> bool:
    return get_method(name).lossless


@torch.no_grad()
def divergence_bound(name: str, policy: Policy, prompts: Sequence[str], max_new_tokens: int = 8,
                     ctx: MethodContext | None = None) -> float:
    """For a lossy method: the largest per-token KL(policy || method's model) over greedy continuations
    of `prompts` (0 for lossless methods). This is the measured bound the quality guard asks for."""
    m = get_method(name)
    if m.lossless:
        return 0.0
    ctx = ctx or MethodContext(device=policy.device.type)
    why = m.why_infeasible(policy, ctx)
    if why:
        raise MethodError(f"method {name} is not feasible here: {why}")
    groups = policy.generate(list(prompts), 1, max_new_tokens, greedy=True)
    p_ids = [g[0].prompt_ids for g in groups]
    c_ids = [g[0].completion_ids or [policy.eos_id] for g in groups]
    run_method(name, policy, prompts[:1], 1, 1, greedy=True, ctx=ctx)  # makes the copy
    shadow = next(iter(m._state.values()))[1]
    kl_max = 0.0
    for pi, ci in zip(p_ids, c_ids):
        seq = torch.tensor([pi + ci], device=policy.device)
        a = torch.log_softmax(policy.model(input_ids=seq).logits.float(), -1)[0, len(pi) - 1:-1]
        b = torch.log_softmax(shadow.model(input_ids=seq.to(shadow.device)).logits.float(), -1)[0, len(pi) - 1:-1]
        kl = (a.exp() * (a - b.to(a.device))).sum(-1)
        kl_max = max(kl_max, float(kl.max()))
    return kl_max
