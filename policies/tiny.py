"""The embedded default policy: a small Llama-style model built on the spot, nothing downloaded.

A character-level tokenizer (WordLevel over printable ASCII, left padding) and a Llama config
are built from code; the model is warmed up by a short supervised phase on the task mix
(prompt -> answer<eos>, loss on the answer only) so that sampling finds some correct answers
and GRPO has signal. The warmed-up model is cached in the node's data directory, keyed by
everything that determines it, so the second start is instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .base import Policy

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARS = [chr(c) for c in range(32, 127)]

#: Model sizes by name: (hidden, layers, heads, intermediate).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny-s": (64, 2, 4, 256),  # ~140k params: tests
    "tiny": (128, 4, 4, 512),  # ~1M params: the default
    "tiny-m": (256, 4, 8, 1024),  # ~4M params
}
WARMUP_VERSION = 2


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    return fast


def tiny_model(size: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose from {', '.join(SIZES)}")
    hidden, layers, heads, inter = SIZES[size]
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # eager attention: re-scored log-probs of left-padded batches then match generation to
        # ~1e-6 (sdpa's masked kernel drifts to ~1e-5); at this size it is as fast.
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def warmup(policy: Policy, draw: Callable[[int], list], steps: int, batch: int = 64, lr: float = 3e-3,
           progress: Callable[[int, int, float], None] | None = None) -> float:
    """Supervised warm-up: maximise log p(answer<eos> | prompt) on drawn training items.

    One-cycle schedule (10% linear ramp, cosine decay): at 300 steps it roughly triples greedy
    accuracy over a constant rate on chain_sum (12% vs 4%, measured).
    """
    opt = torch.optim.AdamW(policy.model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    loss_v = float("nan")
    for step in range(steps):
        tasks = draw(batch)
        p_ids = policy.encode([t.prompt for t in tasks])
        c_ids = [ids + [policy.eos_id] for ids in policy.encode([t.answer for t in tasks])]
        logp, mask = policy.token_logprobs(p_ids, c_ids, grad=True)
        loss = -(logp.sum() / mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if progress:
            progress(step + 1, steps, loss_v)
    return loss_v


def _stderr_progress(label: str) -> Callable[[int, int, float], None]:
    start = time.monotonic()

    def show(step: int, total: int, loss: float) -> None:
        if step % 10 and step != total:
            return
        width = 24
        done = int(width * step / total)
        sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {step}/{total} "
                         f"loss {loss:.3f} {time.monotonic() - start:.0f}s")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def embedded_policy(
    cache_dir: str | os.PathLike | None,
    mix: Mapping[str, float],
    size: str = "tiny",
    warmup_steps: int = 300,
    seed: int = 0,
    lr: float = 2e-4,
    show_progress: bool = True,
) -> Policy:
    """Build (or load from cache) the warmed-up embedded policy."""
    from rollshare.tasks import TaskDrawer  # the policy itself never depends on tasks

    key = hashlib.sha256(json.dumps(
        {"v": WARMUP_VERSION, "size": size, "mix": sorted(mix.items()), "steps": warmup_steps, "seed": seed},
        sort_keys=True).encode()).hexdigest()[:12]
    name = f"{size}-{key}"
    if cache_dir is not None:
        target = Path(cache_dir) / name
        if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
            try:
                return Policy.from_pretrained(target, name=name, lr=lr, attn_implementation="eager")
            except Exception as e:  # a broken cache is rebuilt, never trusted
                print(f"warning: cached model {target} unusable ({e}); rebuilding", file=sys.stderr)
    tok = char_tokenizer()
    model = tiny_model(size, len(tok), tok, seed)
    policy = Policy(model, tok, name, lr=lr)
    if warmup_steps:
        # warm-up items come from a seed of their own, never the node's training stream
        drawer = TaskDrawer(mix, seed=10_000 + seed)
        torch.manual_seed(seed)
        warmup(policy, drawer.draw, warmup_steps,
               progress=_stderr_progress(f"warming up {size} model") if show_progress else None)
    if cache_dir is not None:
        target = Path(cache_dir) / name
        tmp = Path(cache_dir) / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return policy
