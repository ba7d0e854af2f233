"""Hugging Face model helpers shared by the trainer, the baselines, the evaluator and the benchmarks.

Loading a local checkpoint frozen, seeding every generator, running a block in eval mode, and the pad id.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def require_checkpoint(model_dir: str | Path) -> Path:
    """``model_dir`` as a path; raises ``FileNotFoundError`` (saying how to prepare the default model) when it
    has no ``config.json``."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: not a Hugging Face checkpoint directory (no config.json); "
                                "run scripts/setup.sh to prepare the default model")
    return path


class ModelLoadError(ValueError):
    """A model directory that transformers cannot load (missing or broken tokenizer, weights or config)."""


def load_model(model_dir: str | Path, dtype: str, device: str | torch.device, device_map: str | None = None):
    """``(tokenizer, model)`` from a local Hugging Face checkpoint directory; the model frozen
    (``requires_grad_(False)``) in ``dtype`` (a torch dtype name, e.g. ``"float32"``) on ``device``, or spread
    over the visible devices by accelerate when ``device_map`` is given (e.g. ``"auto"``; ``device`` unused).

    A causal LM loads with ``AutoModelForCausalLM``; a multimodal checkpoint that transformers does not map
    there (LLaVA, ...) with ``AutoModelForImageTextToText``: it takes text-only inputs the same way, and LoFiT
    steers its text decoder only (:func:`lofit.heads.o_proj_modules`).

    Raises ``FileNotFoundError`` when ``model_dir`` has no ``config.json`` and :class:`ModelLoadError` (with the
    first line of the loader's message) when its tokenizer, config or weights cannot be loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = require_checkpoint(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForImageTextToText
        if device_map is not None:
            model = auto.from_pretrained(path, config=config, dtype=getattr(torch, dtype), device_map=device_map)
        else:
            model = auto.from_pretrained(path, config=config, dtype=getattr(torch, dtype)).to(device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # transformers, tokenizers, safetensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--model {model_dir}: cannot load the checkpoint: {first}") from exc
    model.requires_grad_(False)
    return tokenizer, model


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the block with ``model.eval()``, then put the model back in the mode it was in (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pad_token_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
