"""`rollshare bench train`: one GRPO step of our trainer against TRL's `GRPOTrainer`, side by side.

Both trainers get a copy of the same tiny model (built with `tiny_model`/`char_tokenizer` and
warmed up once, so that some sampled answers are right and GRPO has signal), the same prompts
(chain_sum compact prompts from a `TaskDrawer`, in the same order), the same G, completion length,
temperature, learning rate, clip range (ε_low 0.2, ε_high 0.28), β = 0, the same verifier as reward,
and TRL's "dapo" loss, which like ours divides the summed token losses by the number of completion
tokens in the batch. Everything runs in one process on the CPU, interleaved: TRL's training loop
drives the steps, and a callback runs one step of ours right before or right after each TRL step
(alternating, so neither side always runs first). The first steps of each are warm-up and not
counted; each side's time is the median of the rest, since shared machines are noisy.

  our step  = Policy.generate + scoring + building the TrainBatch + grpo_step
  TRL step  = on_step_begin .. on_step_end of the Trainer loop: generation, scoring, advantages,
              loss forward, backward, grad clipping, AdamW, LR scheduler (logging and saving off)

Separately, `fixed_batch_losses` checks that the two losses are the same function: one fixed
batch (prompt ids, completion ids, mask, advantages, old log-probs) goes through our `grpo_loss`
and through TRL's own `compute_loss`, with the inputs dict laid out as TRL's
`_generate_and_score_completions` builds it.

This module only measures: it must never change how either trainer computes or steps.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from rollshare.grpo import GRPOConfig, TrainBatch, TrainItem, add_group, grpo_loss, grpo_step
from rollshare.policies import Policy
from rollshare.policies.tiny import SIZES, char_tokenizer, tiny_model, warmup
from rollshare.tasks import Task, TaskDrawer, score_group, verify

MIX = {"chain_sum": 1.0}


@dataclass(frozen=True)
class BenchSettings:
    """Everything both trainers share, plus how long to measure."""

    model_size: str = "tiny"
    model_warmup_steps: int = 300  # supervised warm-up of the shared model (as `rollshare run` does)
    steps: int = 20  # measured steps per side
    warmup: int = 3  # steps per side run first and not counted
    prompts: int = 16  # questions per step
    group_size: int = 8  # G
    max_new_tokens: int = 5
    temperature: float = 1.0
    lr: float = 2e-4
    eps_low: float = 0.2
    eps_high: float = 0.28
    max_grad_norm: float = 1.0
    seed: int = 0

    @property
    def grpo(self) -> GRPOConfig:
        return GRPOConfig(eps_low=self.eps_low, eps_high=self.eps_high, beta=0.0,
                          max_grad_norm=self.max_grad_norm, temperature=self.temperature)


# --------------------------------------------------------------------------- quiet TRL

def quiet_libraries() -> None:
    """Silence the warnings and progress bars TRL/transformers/datasets print on every run."""
    import transformers
    import datasets

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    for name in ("trl", "accelerate", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


@contextlib.contextmanager
def _stdout_to_stderr():
    """TRL prints some notices on stdout; keep stdout for the JSON line."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# --------------------------------------------------------------------------- the shared model

def build_model(size: str, seed: int, warmup_steps: int, progress: Callable[[str], None] | None = None):
    """The one model both sides copy: tiny Llama + char tokenizer, warmed up on chain_sum."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose from {', '.join(SIZES)}")
    tok = char_tokenizer()
    model = tiny_model(size, len(tok), tok, seed)
    if warmup_steps:
        policy = Policy(model, tok, size)
        torch.manual_seed(seed)
        drawer = TaskDrawer(MIX, seed=10_000 + seed)  # never the bench's own prompt stream

        def show(step: int, total: int, loss: float) -> None:
            if progress and (step % 50 == 0 or step == total):
                progress(f"model warm-up {step}/{total} loss {loss:.3f}")

        warmup(policy, drawer.draw, warmup_steps, progress=show)
        model = policy.model
    model.eval()
    return model


def our_policy(model, s: BenchSettings) -> Policy:
    return Policy(copy.deepcopy(model), char_tokenizer(), f"ours-{s.model_size}", lr=s.lr, weight_decay=0.0)


# --------------------------------------------------------------------------- TRL side

def _no_activation_checkpointing(config_cls) -> dict[str, bool]:
    """Turn off TRL's default activation (gradient) checkpointing under the name this version uses."""
    if "activation_checkpointing" in config_cls.__dataclass_fields__:  # transformers >= 5.x
        return {"activation_checkpointing": False}
    return {"gradient_checkpointing": False}


def trl_trainer(model, s: BenchSettings, out_dir: str, tasks: Sequence[Task], max_steps: int,
                callbacks: Sequence = ()):
    """A GRPOTrainer set up to match our step: same batch, G, lengths, sampler, clip, optimiser."""
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    def chain_sum_verifier(completions, task_index, **kwargs) -> list[float]:
        # TRL's reward signature; the dataset's task_index column picks the regenerated task
        return [verify(tasks[i], c) for c, i in zip(completions, task_index)]

    args = TRLConfig(
        output_dir=out_dir,
        # one step = `prompts` questions × G completions, generated once and trained on once
        per_device_train_batch_size=s.prompts * s.group_size,
        gradient_accumulation_steps=1,
        num_generations=s.group_size,
        num_iterations=1,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        top_k=0,
        top_p=1.0,
        # the loss: clipped surrogate, token sum / tokens in the batch, no KL
        loss_type="dapo",
        epsilon=s.eps_low,
        epsilon_high=s.eps_high,
        beta=0.0,
        scale_rewards="group",
        # the optimiser of Policy: AdamW, no weight decay, constant lr, grad-norm clip
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=s.max_grad_norm,
        max_steps=max_steps,
        # same precision and memory trade-offs as ours (GRPOConfig defaults to bf16 + checkpointing)
        bf16=False,
        fp16=False,
        use_cpu=True,
        use_vllm=False,
        # prompts in dataset order, so step k of both sides sees the same questions
        shuffle_dataset=False,
        seed=s.seed,
        # no logging, saving or progress bars
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        **_no_activation_checkpointing(TRLConfig),
    )
    dataset = Dataset.from_list([{"prompt": t.prompt, "task_index": i} for i, t in enumerate(tasks)])
    with _stdout_to_stderr():
        trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[chain_sum_verifier], args=args,
                              train_dataset=dataset, processing_class=char_tokenizer(), callbacks=list(callbacks))
    return trainer


def trl_inputs(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
               advantages: Sequence[float], pad_id: int,
               old_logprobs: Sequence[Sequence[float]] | None = None) -> dict[str, torch.Tensor]:
    """The dict `_generate_and_score_completions` returns (text-only, no vLLM, β = 0).

    Prompts left-padded, completions right-padded with the pad id, masks of 1 over real tokens,
    `num_items_in_batch` = completion tokens in the generation batch. `old_per_token_logps` is
    present only when TRL would compute it (num_iterations > 1); without it TRL uses the current
    log-probs, ratio = 1.
    """
    from trl.trainer.utils import pad

    p = [torch.tensor(list(x), dtype=torch.long) for x in prompt_ids]
    c = [torch.tensor(list(x), dtype=torch.long) for x in completion_ids]
    completion_mask = pad([torch.ones_like(x) for x in c], padding_value=0, padding_side="right")
    out = {
        "prompt_ids": pad(p, padding_value=pad_id, padding_side="left"),
        "prompt_mask": pad([torch.ones_like(x) for x in p], padding_value=0, padding_side="left"),
        "completion_ids": pad(c, padding_value=pad_id, padding_side="right"),
        "completion_mask": completion_mask,
        "advantages": torch.tensor(list(advantages), dtype=torch.float32),
        "num_items_in_batch": completion_mask.sum(),
    }
    if old_logprobs is not None:
        out["old_per_token_logps"] = pad([torch.tensor(list(x), dtype=torch.float32) for x in old_logprobs],
                                         padding_value=0.0, padding_side="right")
    return out


# --------------------------------------------------------------------------- the fixed-batch check

def fixed_batch_losses(model_size: str = "tiny-s", seed: int = 0, temperature: float = 1.0,
                       perturb: float = 0.0, prompts: int = 4, group_size: int = 8, max_new_tokens: int = 5,
                       model=None, trl_temperature: float | None = None) -> dict[str, float]:
    """Loss (and gradient) of ours and of TRL's `compute_loss` on one fixed batch.

    The batch: `prompts` chain_sum prompts of different lengths (left padding), G sampled
    completions each, cut to different lengths and ended with EOS (right padding), random
    advantages normalised per group. `perturb` = 0: old log-probs = current ones (ratio 1, TRL's
    default path without `old_per_token_logps`); `perturb` > 0: Gaussian noise of that scale on
    the old log-probs, passed to both, so that some ratios leave [1-ε_low, 1+ε_high] and clip.
    Both sides divide logits by `temperature` (`trl_temperature` gives TRL another one; only
    for showing that the check notices).

    At ratio 1 the loss *value* is −Σ Â·mask / tokens whatever the log-probs are, so the
    gradients are compared too: they are what tells two log-prob computations apart.
    """
    s = BenchSettings(model_size=model_size, seed=seed, temperature=temperature,
                      prompts=prompts, group_size=group_size, max_new_tokens=max_new_tokens)
    if model is None:
        tok = char_tokenizer()
        model = tiny_model(model_size, len(tok), tok, seed)
    ours = our_policy(model, s)
    gen = torch.Generator().manual_seed(seed)

    # -- the batch: ids, lengths, advantages, old log-probs (built once, used by both)
    tasks = TaskDrawer(MIX, seed=seed).draw(prompts)
    torch.manual_seed(seed)
    groups = ours.generate([t.prompt for t in tasks], group_size, max_new_tokens, temperature)
    prompt_ids, completion_ids, advantages = [], [], []
    for group in groups:
        rewards = torch.randn(group_size, generator=gen, dtype=torch.float64)
        adv = ((rewards - rewards.mean()) / (rewards.std() + 1e-8)).tolist()
        for j, smp in enumerate(group):
            n = 1 + int(torch.randint(0, max_new_tokens, (1,), generator=gen))
            ids = list(smp.completion_ids[:n])
            if j % 2 == 0:  # half end with EOS, half run to their cut
                ids[-1] = ours.eos_id
            prompt_ids.append(list(smp.prompt_ids))
            completion_ids.append(ids)
        advantages.extend(adv)
    with torch.no_grad():
        cur, mask = ours.token_logprobs(prompt_ids, completion_ids, temperature=temperature)
    noise = perturb * torch.randn(cur.shape, generator=gen) if perturb > 0 else torch.zeros_like(cur)
    old = [((cur[i] + noise[i])[: len(c)]).tolist() for i, c in enumerate(completion_ids)]

    # -- ours
    batch = TrainBatch(items=[TrainItem(p, c, o, a) for p, c, o, a in zip(prompt_ids, completion_ids, old, advantages)])
    ours.model.zero_grad(set_to_none=True)
    loss_ours, stats = grpo_loss(ours, batch, s.grpo)
    loss_ours.backward()

    # -- TRL, through its own compute_loss
    with tempfile.TemporaryDirectory(prefix="rollshare-bench-") as out_dir:
        trl_s = s if trl_temperature is None else replace(s, temperature=trl_temperature)
        trainer = trl_trainer(model, trl_s, out_dir, tasks, max_steps=1)
        inputs = trl_inputs(prompt_ids, completion_ids, advantages, ours.pad_id,
                            old_logprobs=old if perturb > 0 else None)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # what the Trainer loop sets for accumulation 1
        trainer.model.zero_grad(set_to_none=True)
        loss_trl = trainer.compute_loss(trainer.model, inputs)
        loss_trl.backward()
        grads_trl = dict(trainer.model.named_parameters())
        grad_diff = max(
            float((p.grad - grads_trl[n].grad).abs().max())
            for n, p in ours.model.named_parameters() if p.grad is not None
        )
    return {
        "ours": float(loss_ours.detach()),
        "trl": float(loss_trl.detach()),
        "abs_diff": abs(float(loss_ours.detach()) - float(loss_trl.detach())),
        "grad_max_abs_diff": grad_diff,
        "clip_frac": stats["clip_frac"],
        "tokens": stats["tokens"],
        "temperature": temperature,
        "perturb": perturb,
    }


# --------------------------------------------------------------------------- our step

class OurTrainer:
    """One step of our trainer, timed by phase (generate, score + batch, loss, backward + AdamW).

    Our trainer drops groups whose rewards are all equal (Â = 0: no gradient) before the loss;
    TRL keeps them, so it runs forward and backward over every completion. With
    `keep_zero_groups` the bench also keeps them (Â = 0, tokens counted in the token mean, as in
    TRL), which times our code on exactly TRL's rows: a diagnostic, not how the node trains.
    """

    def __init__(self, policy: Policy, s: BenchSettings, keep_zero_groups: bool = False):
        self.policy, self.s, self.cfg = policy, s, s.grpo
        self.keep_zero_groups = keep_zero_groups
        self._opt_s = 0.0
        step_fn = policy.optimizer_step

        def timed_optimizer_step(loss, max_grad_norm=1.0):  # grpo_step calls this; timed, unchanged
            t = time.perf_counter()
            try:
                return step_fn(loss, max_grad_norm)
            finally:
                self._opt_s += time.perf_counter() - t

        policy.optimizer_step = timed_optimizer_step

    def step(self, tasks: Sequence[Task]) -> dict[str, float]:
        s, policy = self.s, self.policy
        self._opt_s = 0.0
        t0 = time.perf_counter()
        groups = policy.generate([t.prompt for t in tasks], s.group_size, s.max_new_tokens, s.temperature)
        t1 = time.perf_counter()
        batch = TrainBatch()
        rewards_all = []
        for task, group in zip(tasks, groups):
            rewards = score_group(task, [smp.text for smp in group])
            rewards_all.extend(rewards)
            used = add_group(batch, group[0].prompt_ids, [smp.completion_ids for smp in group],
                             [smp.logprobs for smp in group], rewards, self.cfg)
            if not used and self.keep_zero_groups:
                batch.items.extend(TrainItem(smp.prompt_ids, smp.completion_ids, smp.logprobs, 0.0) for smp in group)
        t2 = time.perf_counter()
        stats = grpo_step(policy, batch, self.cfg)
        t3 = time.perf_counter()
        return {
            "step_s": t3 - t0,
            "generate_s": t1 - t0,
            "score_batch_s": t2 - t1,
            "loss_s": t3 - t2 - self._opt_s,
            "backward_opt_s": self._opt_s,
            "groups_used": batch.groups_used,
            "reward_mean": sum(rewards_all) / max(1, len(rewards_all)),
            "loss": stats["loss"],
        }


# --------------------------------------------------------------------------- side by side

class _Timed:
    """Wraps a bound method of the TRL trainer and adds up the time spent in it."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.total += time.perf_counter() - t


def run_bench(s: BenchSettings, progress: Callable[[str], None] = lambda m: None) -> dict:
    from transformers import PrinterCallback, TrainerCallback
    import transformers
    import trl

    total = s.warmup + s.steps
    progress(f"building {s.model_size} model ({s.model_warmup_steps} warm-up steps)")
    model = build_model(s.model_size, s.seed, s.model_warmup_steps, progress)
    n_params = sum(p.numel() for p in model.parameters())

    progress("loss check on a fixed batch")
    checks = [fixed_batch_losses(s.model_size, s.seed, s.temperature, perturb, model=model) for perturb in (0.0, 0.3)]

    tasks = TaskDrawer(MIX, seed=s.seed).draw(s.prompts * total)
    ours = OurTrainer(our_policy(model, s), s)
    ours_all = OurTrainer(our_policy(model, s), s, keep_zero_groups=True)
    records: list[dict] = []
    seen_by_trl: list[list[int]] = []

    class SideBySide(TrainerCallback):
        """Runs our step k next to TRL's step k: ours, ours (all groups), TRL on even k; the reverse on odd k."""

        def __init__(self):
            self.t0 = 0.0
            self.ours: dict = {}

        def _ours(self, k: int) -> dict:
            batch = tasks[k * s.prompts:(k + 1) * s.prompts]
            runners = [("ours_", ours), ("ours_all_", ours_all)]
            out = {}
            for prefix, runner in (runners if k % 2 == 0 else runners[::-1]):
                out.update({prefix + n: v for n, v in runner.step(batch).items()})
            return out

        def on_step_begin(self, args, state, control, **kw):
            k = state.global_step
            if k % 2 == 0:
                self.ours = self._ours(k)
            gen_timer.total = loss_timer.total = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            trl_s = time.perf_counter() - self.t0
            k = state.global_step - 1
            trl_gen, trl_loss = gen_timer.total, loss_timer.total
            if k % 2 == 1:
                self.ours = self._ours(k)
            rec = {"k": k, "trl_step_s": trl_s, "trl_generate_score_s": trl_gen, "trl_loss_s": trl_loss,
                   "trl_backward_opt_s": trl_s - trl_gen - trl_loss, **self.ours}
            records.append(rec)
            tag = "warm-up" if k < s.warmup else "measured"
            progress(f"step {k + 1}/{total} ({tag})  ours {rec['ours_step_s']:.3f}s  "
                     f"ours-all-groups {rec['ours_all_step_s']:.3f}s  trl {trl_s:.3f}s  "
                     f"(groups with signal {rec['ours_groups_used']}/{s.prompts})")

    with tempfile.TemporaryDirectory(prefix="rollshare-bench-") as out_dir:
        progress("setting up TRL GRPOTrainer")
        trainer = trl_trainer(model, s, out_dir, tasks, max_steps=total, callbacks=[SideBySide()])
        trainer.remove_callback(PrinterCallback)  # prints the end-of-training metrics dict; we report our own
        gen_timer = _Timed(trainer._generate_and_score_completions)
        loss_timer = _Timed(trainer.compute_loss)
        trainer._generate_and_score_completions = gen_timer
        trainer.compute_loss = loss_timer
        reward_fn = trainer.reward_funcs[0]

        def recording_reward(completions, task_index, **kw):
            seen_by_trl.append(sorted(set(task_index)))
            return reward_fn(completions=completions, task_index=task_index, **kw)

        recording_reward.__name__ = reward_fn.__name__
        trainer.reward_funcs[0] = recording_reward
        with _stdout_to_stderr():
            trainer.train()

    same_prompts = seen_by_trl == [list(range(k * s.prompts, (k + 1) * s.prompts)) for k in range(total)]
    measured = [r for r in records if r["k"] >= s.warmup]
    med = lambda key: statistics.median(r[key] for r in measured)  # noqa: E731
    ours_s, trl_s = med("ours_step_s"), med("trl_step_s")
    return {
        "bench": "train",
        "ours_step_s": round(ours_s, 4),
        "trl_step_s": round(trl_s, 4),
        "ratio": round(ours_s / trl_s, 3),
        "ratio_paired_median": round(statistics.median(r["ours_step_s"] / r["trl_step_s"] for r in measured), 3),
        "loss_abs_diff": max(c["abs_diff"] for c in checks),
        "grad_max_abs_diff": max(c["grad_max_abs_diff"] for c in checks),
        "loss_check": checks,
        "ours_phases_s": {n: round(med(f"ours_{n}"), 4) for n in ("generate_s", "score_batch_s", "loss_s",
                                                                  "backward_opt_s")},
        "trl_phases_s": {n: round(med(f"trl_{n}"), 4) for n in ("generate_score_s", "loss_s", "backward_opt_s")},
        "ours_all_groups_step_s": round(med("ours_all_step_s"), 4),
        "ratio_all_groups": round(med("ours_all_step_s") / trl_s, 3),
        "ours_all_groups_phases_s": {n: round(med(f"ours_all_{n}"), 4) for n in ("generate_s", "score_batch_s",
                                                                                "loss_s", "backward_opt_s")},
        "ours_groups_used_frac": round(sum(r["ours_groups_used"] for r in measured) / (s.prompts * len(measured)), 3),
        "ours_reward_mean": round(statistics.mean(r["ours_reward_mean"] for r in measured), 4),
        "same_prompts": same_prompts,
        "steps": s.steps,
        "warmup_steps_excluded": s.warmup,
        "prompts": s.prompts,
        "group_size": s.group_size,
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "lr": s.lr,
        "model_size": s.model_size,
        "model_params": n_params,
        "model_warmup_steps": s.model_warmup_steps,
        "torch_threads": torch.get_num_threads(),
        "seed": s.seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rollshare bench train",
        description="Time one GRPO step (generation + update) of rollshare's trainer against TRL's GRPOTrainer "
                    "on the same tiny model and prompts, and check that both compute the same loss.")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--quick", action="store_true", help="a short run (under a minute): fewer steps, shorter warm-up")
    p.add_argument("--steps", type=int, help="measured steps per side (default 20; 8 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of model, prompts and sampling (default 0)")
    p.add_argument("--model-size", default="tiny", choices=sorted(SIZES), help="embedded tiny model (default tiny)")
    p.add_argument("--model-warmup-steps", type=int,
                   help="supervised warm-up of the shared model so GRPO has signal (default 300; 100 with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine more threads make timings erratic)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.model_warmup_steps is not None and args.model_warmup_steps < 0:
        parser.error(f"--model-warmup-steps must be >= 0, got {args.model_warmup_steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        import trl  # noqa: F401
    except ImportError:
        print("rollshare bench train: error: TRL is not installed; install it with "
              "`pip install 'rollshare[bench]'`", file=sys.stderr)
        return 2
    quiet_libraries()
    torch.set_num_threads(args.threads)
    s = BenchSettings(
        model_size=args.model_size,
        model_warmup_steps=args.model_warmup_steps if args.model_warmup_steps is not None
        else (100 if args.quick else 300),
        steps=args.steps or (8 if args.quick else 20),
        warmup=2 if args.quick else 3,
        seed=args.seed,
    )
    start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[bench train {time.monotonic() - start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    result = run_bench(s, progress)
    result["wall_s"] = round(time.monotonic() - start, 1)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"one GRPO step, {s.prompts} prompts x G={s.group_size}, {s.max_new_tokens} new tokens, "
              f"{result['model_size']} ({result['model_params']:,} params), {result['torch_threads']} thread(s)")
        print(f"  ours  {result['ours_step_s']:.3f} s   {result['ours_phases_s']}")
        print(f"  ours, zero-signal groups kept (TRL's rows)  {result['ours_all_groups_step_s']:.3f} s   "
              f"{result['ours_all_groups_phases_s']}")
        print(f"  TRL   {result['trl_step_s']:.3f} s   {result['trl_phases_s']}")
        print(f"  ratio ours/TRL {result['ratio']:.2f}   fixed-batch |loss diff| {result['loss_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
