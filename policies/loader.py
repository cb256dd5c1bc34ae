"""Pick the policy a node runs from its `--model` value."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .base import Policy
from .tiny import SIZES, embedded_policy


def load_policy(model: str, cache_dir: Path | None, mix: Mapping[str, float], warmup_steps: int = 300,
                lr: float = 2e-4, seed: int = 0, show_progress: bool = True) -> Policy:
    """An embedded size ("tiny-s", "tiny", "tiny-m"), "smollm2", or a transformers model directory."""
    if model in SIZES:
        return embedded_policy(cache_dir, mix, size=model, warmup_steps=warmup_steps, seed=seed, lr=lr,
                               show_progress=show_progress)
    if model == "smollm2":
        from .smollm2 import smollm2_policy

        return smollm2_policy(lr=lr)
    return Policy.from_pretrained(Path(model).expanduser(), lr=lr)
