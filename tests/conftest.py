"""Shared fixtures: the real 260K-parameter TinyStories Llama from ../shared/models/stories260K."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.fail(f"test model missing: {STORIES} (the shared folder must sit beside the repository)")
    return STORIES


@pytest.fixture(scope="session")
def stories_tokenizer(stories_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture()
def stories_model(stories_dir: Path):
    """A fresh, frozen, float32 copy per test (tests may edit weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    return model


@pytest.fixture(scope="session")
def stories_identity(stories_dir: Path):
    from lofit.heads import identity_from_checkpoint

    return identity_from_checkpoint(stories_dir, name="stories260K")
