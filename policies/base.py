"""The one policy interface the node uses, implemented over any transformers causal LM.

A `Policy` generates G sampled completions for each of a batch of prompts (batched, left
padding, top_k=0, temperature T), returning token ids and the per-token log-probs of the
sampling distribution softmax(logits / T); re-scores given completions under the current
weights (same distribution, so the two agree to ~1e-6); takes one optimiser step on a loss;
and saves/loads as a plain transformers checkpoint.

It must never know about tasks, rewards, the network or the round loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


class PolicyError(RuntimeError):
    """A policy that cannot be loaded or used as asked."""


@dataclass
class Sample:
    """One sampled completion: its tokens (EOS included if produced) and their log-probs."""

    prompt: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # log pi_behaviour(token), one per completion token
    text: str  # decoded completion, special tokens removed

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))


class Policy:
    """A causal LM plus its tokenizer and optimiser. Not thread-safe."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        device: str | torch.device = "cpu",
    ):
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise PolicyError(f"tokenizer of {name} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise PolicyError(f"tokenizer of {name} has no eos token; completions could never end")
        self.lr = lr
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )

    # ------------------------------------------------------------------ facts
    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id and i != self.pad_id], skip_special_tokens=True)

    # ------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
        generate_kwargs: dict | None = None,
    ) -> list[list[Sample]]:
        """G completions per prompt, batched. Returns one list of G samples per prompt."""
        if not prompts:
            return []
        if temperature <= 0 and not greedy:
            raise PolicyError("temperature must be > 0 for sampling (use greedy=True for argmax)")
        self.model.eval()
        prompt_ids = self.encode(prompts)
        rows = [ids for ids in prompt_ids for _ in range(group_size)]
        input_ids, attn = self._left_pad(rows)
        gen_kwargs = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        if greedy:
            gen_kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            # top_k=0 / top_p=1: sample from softmax(logits / T) exactly, so the behaviour
            # log-probs below are the ones the samples were really drawn from.
            gen_kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        gen_kwargs.update(generate_kwargs or {})
        out = self.model.generate(input_ids=input_ids, attention_mask=attn, **gen_kwargs)
        new = out.sequences[:, input_ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1).float()
        logp = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
        tok_logp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        lengths = self._completion_lengths(new)
        new_l, logp_l = new.tolist(), tok_logp.tolist()
        groups: list[list[Sample]] = []
        for p, prompt in enumerate(prompts):
            group = []
            for g in range(group_size):
                r = p * group_size + g
                ids = new_l[r][: lengths[r]]
                group.append(Sample(prompt, prompt_ids[p], ids, logp_l[r][: lengths[r]], self.decode(ids)))
            groups.append(group)
        return groups

    def _completion_lengths(self, new: torch.Tensor) -> list[int]:
        """Tokens up to and including the first EOS (all tokens when none was produced)."""
        is_eos = new == self.eos_id
        has = is_eos.any(dim=1)
        first = torch.where(has, is_eos.int().argmax(dim=1) + 1, torch.full_like(has, new.shape[1], dtype=torch.long))
        return first.tolist()

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                attn[i, width - len(r):] = 1
        return ids.to(self.device), attn.to(self.device)

    # -------------------------------------------------------------- re-scoring
    def token_logprobs(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        temperature: float = 1.0,
        grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of completions given prompts, under the current weights.

        Sequences are laid out [left pad][prompt][completion][right pad]; position ids are
        cumsum(mask) - 1 so padded rows see the same positions as unpadded ones. Returns
        (logp [B, Tc], mask [B, Tc]) with Tc the longest completion.
        """
        B = len(prompt_ids)
        P = max(1, max(len(p) for p in prompt_ids))
        Tc = max(1, max(len(c) for c in completion_ids))
        ids = torch.full((B, P + Tc), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + Tc), dtype=torch.long)
        cmask = torch.zeros((B, Tc), dtype=torch.float32)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            if p:
                ids[i, P - len(p):P] = torch.tensor(list(p))
                attn[i, P - len(p):P] = 1
            if c:
                ids[i, P:P + len(c)] = torch.tensor(list(c))
                attn[i, P:P + len(c)] = 1
                cmask[i, : len(c)] = 1.0
        ids, attn, cmask = ids.to(self.device), attn.to(self.device), cmask.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            if grad:
                self.model.train()
            else:
                self.model.eval()
            logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
            # logits at position t predict token t+1: completion token j sits at P+j, predicted at P+j-1
            logits = logits[:, P - 1 : P + Tc - 1, :].float() / temperature
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
        return logp * cmask, cmask

    def score_texts(self, prompts: Sequence[str], completions: Sequence[str], temperature: float = 1.0
                    ) -> list[list[float]]:
        """Re-tokenize completion texts (as shared over the network) and score them under this policy.

        EOS is appended so that "stopping here" is part of what is scored, as in generation.
        """
        p_ids = self.encode(prompts)
        c_ids = [ids + [self.eos_id] for ids in self.encode(completions)]
        logp, mask = self.token_logprobs(p_ids, c_ids, temperature)
        return [row[: int(m.sum())] for row, m in zip(logp.tolist(), mask)]

    # ----------------------------------------------------------- optimisation
    def optimizer_step(self, loss: torch.Tensor, max_grad_norm: float = 1.0) -> float:
        """Backward, clip the gradient norm, one AdamW step. Returns the pre-clip grad norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """A transformers checkpoint that plain AutoModelForCausalLM.from_pretrained opens."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load weights saved by `save` into this policy (same architecture)."""
        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise PolicyError(f"no *.safetensors weights in {path}")
        state = {}
        for f in files:
            state.update(load_file(str(f), device=str(self.device)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # tied embeddings are saved once; anything else missing is a real mismatch
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if set(missing) - tied or unexpected:
            raise PolicyError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
        if tied and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, name: str | None = None,
                        attn_implementation: str | None = None, **kw) -> "Policy":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise PolicyError(f"{path} is not a transformers model directory (no config.json); "
                              "pass --model with a directory written by save_pretrained")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, **extra)
        except Exception as e:
            raise PolicyError(f"cannot load model from {path}: {type(e).__name__}: {e}") from None
        return cls(model, tok, name or path.name, **kw)
