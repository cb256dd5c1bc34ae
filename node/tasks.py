"""Verifiable tasks: a task is named by a spec from which anyone can regenerate it.

A `TaskSpec` (family, generator parameters, seed, index) deterministically regenerates the
question and its ground truth through a reasoning-gym generator. A node that receives a
rollout from a peer therefore never trusts the peer's answer or reward: it regenerates the
item from the spec and scores the completions itself.

Each family also has a *compact* prompt variant for tiny character-level models ("57+8=")
beside the generator's full question. The reward is strict: 1.0 if reasoning-gym scores the
answer exactly 1.0, else 0.0. A custom reward function with TRL's signature
`f(completions, **kwargs) -> list[float]` can replace the verifier.

Held-out items (for `rollshare eval` and benchmarks) are chosen by a hash of the question
text, so they are disjoint from training items by content, not just by index.

This module must never touch the network or torch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import reasoning_gym

#: Fraction of items (by question hash) reserved for evaluation; never drawn for training.
HELDOUT_MOD = 10
_DATASET_SIZE = 2**31 - 1  # reasoning-gym items are computed from (seed, index) on demand


class TaskError(ValueError):
    """A task spec or task configuration that cannot be used."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to regenerate one task item, and nothing else."""

    family: str
    params: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs, hashable
    seed: int
    index: int
    style: str = "compact"  # "compact" (tiny models) or "full" (the generator's question)

    @property
    def params_json(self) -> str:
        return json.dumps(dict(self.params), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def make(family: str, params: Mapping[str, Any], seed: int, index: int, style: str = "compact") -> "TaskSpec":
        return TaskSpec(family, _freeze(params), int(seed), int(index), style)

    @staticmethod
    def from_json(family: str, params_json: str, seed: int, index: int, style: str) -> "TaskSpec":
        try:
            params = json.loads(params_json) if params_json else {}
        except json.JSONDecodeError as e:
            raise TaskError(f"task params are not valid JSON: {e}") from None
        if not isinstance(params, dict):
            raise TaskError("task params must be a JSON object")
        return TaskSpec.make(family, params, seed, index, style)


def _freeze(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    def fz(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(fz(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, fz(x)) for k, x in v.items()))
        return v

    return tuple(sorted((str(k), fz(v)) for k, v in params.items()))


@dataclass(frozen=True)
class Task:
    """A regenerated task item: the prompt a policy sees and the ground truth."""

    spec: TaskSpec
    prompt: str
    answer: str
    entry: Mapping[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Family:
    """A task family: a reasoning-gym generator, its parameters for tiny models, a compact prompt."""

    name: str
    generator: str
    default_params: Mapping[str, Any]
    compact_prompt: Callable[[Mapping[str, Any]], str]
    #: generator parameters a spec may carry (anything else is refused: specs are hostile input)
    allowed_params: frozenset[str]


def _expr_prompt(entry: Mapping[str, Any]) -> str:
    return entry["metadata"]["expression"].replace(" ", "") + "="


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "chain_sum",
            "chain_sum",
            {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
            _expr_prompt,
            frozenset({"min_terms", "max_terms", "min_digits", "max_digits", "allow_negation"}),
        ),
        Family(
            "basic_arithmetic",
            "basic_arithmetic",
            {
                "min_terms": 2,
                "max_terms": 2,
                "min_digits": 1,
                "max_digits": 1,
                "operators": ["+", "-", "*"],
                "allow_parentheses": False,
                "allow_negation": False,
            },
            _expr_prompt,
            frozenset(
                {"min_terms", "max_terms", "min_digits", "max_digits", "operators", "allow_parentheses", "allow_negation"}
            ),
        ),
        Family(
            "spell_backward",
            "spell_backward",
            {"min_word_len": 3, "max_word_len": 4},
            lambda e: "rev " + e["metadata"]["word"] + "=",
            frozenset({"min_word_len", "max_word_len"}),
        ),
        Family(
            "base_conversion",
            "base_conversion",
            {"min_base": 2, "max_base": 10, "min_value": 0, "max_value": 64},
            lambda e: "{}b{}>b{}=".format(
                e["metadata"]["source_repr"], e["metadata"]["source_base"], e["metadata"]["target_base"]
            ),
            frozenset({"min_base", "max_base", "min_value", "max_value"}),
        ),
    ]
}

#: The default mix for `rollshare run`: what the embedded tiny model can learn in minutes.
DEFAULT_MIX: dict[str, float] = {"chain_sum": 1.0}


def parse_mix(text: str) -> dict[str, float]:
    """Parse "chain_sum:2,spell_backward:1" (weights optional) into normalised weights."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, w = part.partition(":")
        name = name.strip()
        if name not in FAMILIES:
            raise TaskError(f"unknown task family {name!r}; choose from {', '.join(sorted(FAMILIES))}")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise TaskError(f"weight of {name!r} must be a number, got {w!r}") from None
        if not weight > 0:
            raise TaskError(f"weight of {name!r} must be > 0, got {w}")
        mix[name] = mix.get(name, 0.0) + weight
    if not mix:
        raise TaskError("the task mix is empty; give at least one family, e.g. --tasks chain_sum")
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


@functools.lru_cache(maxsize=256)
def _dataset(generator: str, params_json: str, seed: int):
    return reasoning_gym.create_dataset(generator, size=_DATASET_SIZE, seed=seed, **json.loads(params_json))


def regenerate(spec: TaskSpec) -> Task:
    """Regenerate question and ground truth from a spec. Raises TaskError on any bad spec."""
    fam = FAMILIES.get(spec.family)
    if fam is None:
        raise TaskError(f"unknown task family {spec.family!r}")
    params = dict(spec.params)
    extra = set(params) - fam.allowed_params
    if extra:
        raise TaskError(f"task family {spec.family!r} does not take parameters {sorted(extra)}")
    if not (0 <= spec.index < _DATASET_SIZE) or not (0 <= spec.seed < 2**63):
        raise TaskError("task seed/index out of range")
    if spec.style not in ("compact", "full"):
        raise TaskError(f"unknown prompt style {spec.style!r}")
    merged = {**fam.default_params, **params}
    try:
        ds = _dataset(fam.generator, json.dumps(merged, sort_keys=True), spec.seed)
        entry = ds[spec.index]
    except Exception as e:  # reasoning-gym validates its own config with asserts
        raise TaskError(f"cannot regenerate {spec.family} item: {type(e).__name__}: {e}") from None
    prompt = fam.compact_prompt(entry) if spec.style == "compact" else entry["question"]
    return Task(spec=spec, prompt=prompt, answer=str(entry["answer"]), entry=entry)


def extract_answer(completion: str) -> str:
    """The answer part of a completion: text inside <answer> tags if present, else the first line."""
    text = completion
    if "<answer>" in text:
        text = text.split("<answer>", 1)[1].split("</answer>", 1)[0]
    return text.strip().split("\n", 1)[0].strip() if text.strip() else ""


def verify(task: Task, completion: str) -> float:
    """Strict 0/1 reward: 1.0 only if reasoning-gym scores the extracted answer exactly 1.0."""
    fam = FAMILIES[task.spec.family]
    ds = _dataset(fam.generator, json.dumps({**fam.default_params, **dict(task.spec.params)}, sort_keys=True), task.spec.seed)
    try:
        score = ds.score_answer(extract_answer(completion), task.entry)
    except Exception:
        return 0.0
    return 1.0 if score == 1.0 else 0.0


def is_heldout(task: Task) -> bool:
    digest = hashlib.sha256(f"{task.spec.family}\x00{task.prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELDOUT_MOD == 0


RewardFn = Callable[..., list]


def load_reward_fn(ref: str) -> RewardFn:
    """Load a TRL-style reward function from "package.module:function"."""
    mod_name, _, fn_name = ref.partition(":")
    if not mod_name or not fn_name:
        raise TaskError(f"reward function must look like 'package.module:function', got {ref!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise TaskError(f"cannot load reward function {ref!r}: {e}") from None
    if not callable(fn):
        raise TaskError(f"reward function {ref!r} is not callable")
    return fn


def score_group(task: Task, completions: Sequence[str], reward_fn: RewardFn | None = None) -> list[float]:
    """Rewards for one group, from the regenerated ground truth (never from a sender's claim)."""
    if reward_fn is None:
        return [verify(task, c) for c in completions]
    out = reward_fn(
        completions=list(completions),
        prompts=[task.prompt] * len(completions),
        answer=[task.answer] * len(completions),
        family=[task.spec.family] * len(completions),
        metadata=[task.entry.get("metadata", {})] * len(completions),
    )
    if len(out) != len(completions):
        raise TaskError(f"reward function returned {len(out)} rewards for {len(completions)} completions")
    return [float(r) for r in out]


class TaskDrawer:
    """Draws training task specs from a weighted family mix, skipping held-out items."""

    def __init__(self, mix: Mapping[str, float], seed: int, style: str = "compact",
                 params: Mapping[str, Mapping[str, Any]] | None = None):
        self.mix = dict(mix)
        self.style = style
        self.params = {k: dict((params or {}).get(k, {})) for k in self.mix}
        self.seed = seed
        self.rng = random.Random(seed)

    def draw(self, n: int) -> list[Task]:
        names, weights = zip(*self.mix.items())
        out: list[Task] = []
        while len(out) < n:
            fam = self.rng.choices(names, weights)[0]
            spec = TaskSpec.make(fam, self.params[fam], self.seed, self.rng.randrange(_DATASET_SIZE), self.style)
            task = regenerate(spec)
            if not is_heldout(task):
                out.append(task)
        return out

    def getstate(self):
        return self.rng.getstate()

    def setstate(self, state) -> None:
        self.rng.setstate(state)


def heldout_tasks(family: str, n: int, seed: int = 12345, style: str = "compact",
                  params: Mapping[str, Any] | None = None) -> list[Task]:
    """The first n held-out items of a family (deterministic; disjoint from training by content)."""
    out, seen, i = [], set(), 0
    while len(out) < n and i < 200 * n + 1000:
        task = regenerate(TaskSpec.make(family, params or {}, seed, i, style))
        i += 1
        if is_heldout(task) and task.prompt not in seen:
            seen.add(task.prompt)
            out.append(task)
    return out
