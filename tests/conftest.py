"""Shared fixtures: tiny models built once per session, nothing downloaded."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A warmed-up test-sized model (hidden 64, 2 layers, 300 warm-up steps) saved once, as a model directory."""
    from rollshare.policies.tiny import embedded_policy

    cache = tmp_path_factory.mktemp("models")
    pol = embedded_policy(cache, {"chain_sum": 1.0}, size="tiny-s", warmup_steps=300, seed=0, show_progress=False)
    return cache / pol.name
