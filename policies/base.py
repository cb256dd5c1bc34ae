"""The one policy interface the node uses, implemented over any transformers causal LM.

A `Policy` generates G sampled completions for each of a batch of prompts (batched, left
padding, top_k=0, temperature T), returning token ids and the per-token log-probs of the
sampling distribution softmax(logits / T); re-scores given completions under the current
weights (same distribution, so the two agree to ~1e-6); takes one optimiser step on a loss;
and saves/loads as a plain transformers checkpoint.

The G completions of a prompt share it, so both generation and re-scoring run each distinct
prompt through the model once and hand its keys/values (KV cache) to the G rows
(`share_prompt_prefill`, on by default; off gives the plain one-row-per-sequence path, which
agrees to float noise, ~1e-7).

It must never know about tasks, rewards, the network or the round loop.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

#: generate() settings under which a prompt's cache can be prepared outside generate: anything
#: that brings its own cache or inputs, or turns one row into several (beams, extra return
#: sequences, assistant drafts), takes the plain path.
_OWN_CACHE_OR_ROWS_KWARGS = frozenset({
    "cache", "past_key_values", "inputs_embeds", "cache_implementation", "custom_generate",
    "assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "dola_layers", "use_mtp",
    "constraints", "force_words_ids", "penalty_alpha",
})


POLICY_META = "rollshare_policy.json"  # what transformers does not keep (attention implementation)


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


def _distinct_rows(rows: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """For each row the index of its distinct value, and the first row holding each distinct value."""
    index: dict[tuple[int, ...], int] = {}
    owner, firsts = [], []
    for i, row in enumerate(rows):
        key = tuple(row)
        if key not in index:
            index[key] = len(firsts)
            firsts.append(i)
        owner.append(index[key])
    return owner, firsts


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
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            # one fused kernel for the whole update instead of a chain of foreach ops
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # no fused kernel for this device or dtype
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        # transformers 5 calls the KV cache argument `cache`, earlier versions `past_key_values`
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        # the prompt prefill needs no logits beyond the last position (where the model allows)
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}

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
        return self.decode_many([ids])[0]

    def decode_many(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """`decode` of many rows in one tokenizer call."""
        drop = {self.eos_id, self.pad_id}
        return self.tokenizer.batch_decode([[i for i in ids if i not in drop] for ids in rows], skip_special_tokens=True)

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
        share_prompt_prefill: bool = True,
    ) -> list[list[Sample]]:
        """G completions per prompt, batched. Returns one list of G samples per prompt.

        With `share_prompt_prefill` (and G > 1, and decoding that keeps one row per sequence),
        each distinct prompt is run through the model once and its cache repeated G times;
        `generate` then only processes the last prompt token and the new ones.
        """
        if not prompts:
            return []
        if temperature <= 0 and not greedy:
            raise PolicyError("temperature must be > 0 for sampling (use greedy=True for argmax)")
        self.model.eval()
        prompt_ids = self.encode(prompts)
        rows = [ids for ids in prompt_ids for _ in range(group_size)]
        input_ids, attn = self._left_pad(rows)
        gen_kwargs = self.sampling_kwargs(max_new_tokens, temperature, greedy)
        gen_kwargs.update(return_dict_in_generate=True, output_logits=True)
        gen_kwargs.update(generate_kwargs or {})
        if share_prompt_prefill and group_size > 1 and input_ids.shape[1] > 1 and self._one_row_per_sequence(gen_kwargs):
            # rows are G copies of each prompt: cache all but its last token once, repeat it G times
            cache = self._prompt_cache(input_ids[::group_size, :-1], attn[::group_size, :-1])
            cache.batch_repeat_interleave(group_size)
            gen_kwargs[self._cache_arg] = cache
        out = self.model.generate(input_ids=input_ids, attention_mask=attn, **gen_kwargs)
        new = out.sequences[:, input_ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1).float()
        logp = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
        tok_logp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        lengths = self._completion_lengths(new)
        new_l = [row[:n] for row, n in zip(new.tolist(), lengths)]
        logp_l = [row[:n] for row, n in zip(tok_logp.tolist(), lengths)]
        texts = self.decode_many(new_l)
        groups: list[list[Sample]] = []
        for p, prompt in enumerate(prompts):
            members = range(p * group_size, (p + 1) * group_size)
            groups.append([Sample(prompt, prompt_ids[p], new_l[r], logp_l[r], texts[r]) for r in members])
        return groups

    def sampling_kwargs(self, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False) -> dict:
        """`model.generate` arguments that decode exactly as this policy scores: argmax, or
        top_k=0 / top_p=1 sampling from softmax(logits / T), so the behaviour log-probs computed
        afterwards are the ones the samples were really drawn from."""
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        if greedy:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        return kw

    def _one_row_per_sequence(self, gen_kwargs: dict) -> bool:
        """Whether generate would decode each input row as one sequence through a plain dynamic
        cache (greedy or sampling), so that a cache prepared here fits it."""
        cfg = gen_kwargs.get("generation_config") or self.model.generation_config

        def setting(key: str):
            return gen_kwargs[key] if key in gen_kwargs else getattr(cfg, key, None)

        return (all(setting(k) is None or setting(k) is False for k in _OWN_CACHE_OR_ROWS_KWARGS)
                and setting("use_cache") is not False
                and setting("num_beams") in (None, 1)
                and setting("num_return_sequences") in (None, 1))

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
        share_prompt_prefill: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of completions given prompts, under the current weights.

        Sequences are laid out [left pad][prompt][completion][right pad]; position ids are
        cumsum(mask) - 1 so padded rows see the same positions as unpadded ones. Returns
        (logp [B, Tc], mask [B, Tc]) with Tc the longest completion.

        Rows that repeat a prompt (a GRPO group: G completions of one question) share its
        forward pass when `share_prompt_prefill` is on; gradients flow through the shared part.
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
        owner, firsts = _distinct_rows(prompt_ids)
        share = (share_prompt_prefill and len(firsts) < B and P > 1 and all(len(p) for p in prompt_ids)
                 # activation checkpointing drops caches in training forwards
                 and not any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()))
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            if grad:
                self.model.train()
            else:
                self.model.eval()
            # logits at position t predict token t+1: completion token j sits at P+j, predicted at P+j-1
            if share:
                # each distinct prompt but its last token once, its cache indexed out to every row;
                # then [last prompt token, completion[:-1]] on top, the mask covering cache + new
                cache = self._prompt_cache(ids[firsts, : P - 1], attn[firsts, : P - 1])
                cache.batch_select_indices(torch.tensor(owner, device=self.device))
                logits = self.model(input_ids=ids[:, P - 1 : -1], attention_mask=attn[:, :-1],
                                    position_ids=pos[:, P - 1 : -1], **{self._cache_arg: cache}).logits
            else:
                logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
                logits = logits[:, P - 1 : P + Tc - 1, :]
            logits = logits.float() / temperature
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
        return logp * cmask, cmask

    def _prompt_cache(self, ids: torch.Tensor, mask: torch.Tensor) -> DynamicCache:
        """Run left-padded prompt columns once and keep their keys/values (logits are not needed).

        Positions are cumsum(mask) - 1, as generate and token_logprobs compute them, so the cache
        is the one a full forward over the longer rows would have built.
        """
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   use_cache=True, **{self._cache_arg: cache}, **self._last_logits_only)
        if cache.get_seq_length() != ids.shape[1]:
            raise PolicyError(f"{self.name} did not fill the KV cache it was given; "
                              "pass share_prompt_prefill=False to run every row in full")
        return cache

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
        # transformers does not save the attention implementation; tiny models need eager to keep
        # re-scored log-probs within 1e-5 of generation, so remember it beside the weights
        (path / POLICY_META).write_text(json.dumps({"attn_implementation": self.model.config._attn_implementation}))

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
        if attn_implementation is None and (path / POLICY_META).is_file():
            try:
                attn_implementation = json.loads((path / POLICY_META).read_text()).get("attn_implementation")
            except (ValueError, AttributeError):
                attn_implementation = None
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, **extra)
        except Exception as e:
            raise PolicyError(f"cannot load model from {path}: {type(e).__name__}: {e}") from None
        return cls(model, tok, name or path.name, **kw)
