"""Shared fixtures: the real 260K-parameter TinyStories Llama from ../shared/models/stories260K, and the one gate
for tests that need the default model (SmolLM2-135M, prepared by scripts/setup.sh).

Every test that needs the default model asks for :func:`prepared_model_dir` (directly or through another
fixture) and is marked ``slow`` by that alone, so ``pytest -m "not slow"`` is the fast inner loop. Without the
prepared model those tests skip, except when ``LOFIT_REQUIRE_MODEL=1`` (``scripts/test.sh`` and so CI set it):
then they fail, so a suite that should run everything can never pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"


REQUIRE_MODEL_ENV = "LOFIT_REQUIRE_MODEL"
SLOW_FIXTURE = "prepared_model_dir"


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def prepared_model_dir() -> Path:
    """The default model's checkpoint folder; skips (or fails under ``LOFIT_REQUIRE_MODEL=1``) when unprepared."""
    from lofit.default_model import default_model_dir, is_prepared

    path = default_model_dir()
    if not is_prepared(path):
        message = f"the default model is not prepared at {path} (run scripts/setup.sh)"
        if os.environ.get(REQUIRE_MODEL_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


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
