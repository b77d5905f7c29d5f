"""LoRA adapters: where they live, how they are named, and a small real one to test with.

A character may name a LoRA adapter (``data.extensions.rapport.lora`` in its
card, docs/protocol.md addition 18). The in-process vLLM engine serves the
adapters it finds in its LoRA folder (``--lora-dir``, default
``$RAPPORT_CACHE_DIR/loras``): one `peft <https://huggingface.co/docs/peft>`_
folder per adapter (``adapter_config.json`` plus ``adapter_model.safetensors``),
the folder's name being the adapter's name.

``rapport prepare-lora`` builds one such adapter for the default model
(``server/model_prep.py``): LoRA of rank 8 on the top layers' projections,
trained for a few steps on the CPU on a dozen chat examples shipped with
the package (``server/data/lora_<name>.jsonl``, pirate speech for ``pirate``),
so that the adapter visibly changes the model's greedy replies. Like the model
itself it is built in a temporary sibling folder, marked complete last, and
renamed into place; a second run finds it and returns at once.

    python -m server.lora_prep --name pirate   # prints the adapter's folder
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from protocol.errors import RapportError
from server.model_prep import default_cache_dir, prepare_default_model

#: An adapter name, as characters give it (and as vLLM's server lists it).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The adapter ``rapport prepare-lora`` builds unless told otherwise.
DEFAULT_ADAPTER = "pirate"
#: Written last into an adapter built here; records how it was made.
MARKER_FILE = "rapport-lora.json"
#: The files vLLM (and peft) read from an adapter folder.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# Training recipe: small enough for a CPU in well under a minute, strong enough
# that greedy decoding follows the new style.
LORA_RANK = 8
LORA_ALPHA = 16
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINED_LAYERS = 4
TRAIN_STEPS = 12
LEARNING_RATE = 5e-3
SEED = 1234


class LoraPrepError(RapportError):
    """An adapter cannot be built (unknown dataset, missing package or model)."""

    code = "internal"


def default_lora_dir(cache_dir: Path | None = None) -> Path:
    """Where adapters live unless ``--lora-dir`` says otherwise."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "loras"


def is_valid_name(name: str) -> bool:
    return ADAPTER_NAME.fullmatch(name) is not None


def is_adapter(folder: Path) -> bool:
    """True if ``folder`` holds a peft LoRA adapter (config and weights)."""
    return (folder / ADAPTER_CONFIG).is_file() and any((folder / w).is_file() for w in ADAPTER_WEIGHTS)


def find_adapter(lora_dir: Path, name: str) -> Path | None:
    """The folder of adapter ``name`` in ``lora_dir``; None if there is none.

    Only valid names other than ``.`` and ``..`` are looked up (the pattern
    has no ``/``), so a name never reaches outside ``lora_dir``.
    """
    if not is_valid_name(name) or name in (".", ".."):
        return None
    folder = Path(lora_dir) / name
    return folder if is_adapter(folder) else None


def list_adapters(lora_dir: Path) -> list[str]:
    """The names of the adapters in ``lora_dir``, sorted (empty if the folder is missing)."""
    try:
        entries = list(Path(lora_dir).iterdir())
    except OSError:
        return []
    return sorted(e.name for e in entries if is_valid_name(e.name) and not e.name.startswith(".")
                  and e.is_dir() and is_adapter(e))


def adapter_rank(folder: Path) -> int | None:
    """The LoRA rank ``r`` an adapter's config declares, if readable."""
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        return int(cfg["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_examples(name: str) -> list[list[dict[str, str]]]:
    """The chat examples shipped for adapter ``name`` (``server/data/lora_<name>.jsonl``)."""
    if not is_valid_name(name):
        raise LoraPrepError(f"invalid adapter name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    resource = resources.files("server").joinpath("data", f"lora_{name}.jsonl")
    try:
        text = resource.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        raise LoraPrepError(f"no training data shipped for adapter {name!r} (server/data/lora_{name}.jsonl)") from None
    examples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            raise LoraPrepError(f"lora_{name}.jsonl line {n}: expected {{\"messages\": [...]}}") from None
        examples.append([{"role": str(m["role"]), "content": str(m["content"])} for m in messages])
    if not examples:
        raise LoraPrepError(f"lora_{name}.jsonl holds no examples")
    return examples


def _train(model_dir: Path, examples: list[list[dict[str, str]]], dest: Path) -> dict[str, Any]:
    """Train a LoRA adapter on ``examples`` and save it (peft format) to ``dest``.

    Only the last :data:`TRAINED_LAYERS` decoder layers get LoRA weights. The
    frozen layers below them compute the same hidden states at every step, so
    they run once (without gradients) and the steps run the top layers alone,
    with the loss on the reply's tokens only: on a 2-core CPU a full
    backward pass through the model takes tens of seconds per step.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise LoraPrepError(
            f"building an adapter needs torch, transformers and peft: {exc}; "
            "run scripts/install-vllm.sh VENV_DIR to install them"
        ) from exc

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    layers = base.model.layers
    first_trained = len(layers) - TRAINED_LAYERS
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                        target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM",
                        layers_to_transform=list(range(first_trained, len(layers))))
    model: Any = get_peft_model(base, config)

    # Right-padded batch; the label of position i is the token at i + 1, and
    # only the reply's tokens (not the prompt, not the padding) count.
    rows = []
    for messages in examples:
        prompt_ids = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
        full_ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        rows.append((full_ids, len(prompt_ids)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    where = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (ids, prompt_len) in enumerate(rows):
        where[row, prompt_len - 1:len(ids) - 1] = True
    targets = input_ids[:, 1:][where[:, :-1]]

    inner = base.model
    with torch.no_grad():
        hidden = inner(input_ids=input_ids, attention_mask=attention,
                       output_hidden_states=True, use_cache=False).hidden_states[first_trained]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    losses: list[float] = []
    inner.layers = torch.nn.ModuleList(list(layers)[first_trained:])
    try:
        for _ in range(TRAIN_STEPS):
            top = inner(inputs_embeds=hidden, attention_mask=attention, use_cache=False).last_hidden_state
            logits = base.lm_head(top[where])
            loss = torch.nn.functional.cross_entropy(logits, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        inner.layers = layers
    model.save_pretrained(str(dest), safe_serialization=True)
    return {"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}


def _ids(value: Any) -> list[int]:
    """Token ids from apply_chat_template, whichever shape this transformers returns."""
    if isinstance(value, dict) or hasattr(value, "keys"):
        value = value["input_ids"]
    return [int(i) for i in value]


def prepare_lora(name: str = DEFAULT_ADAPTER, lora_dir: Path | None = None,
                 model_dir: Path | None = None) -> Path:
    """Return adapter ``name``'s folder in ``lora_dir``, training it first if needed."""
    examples = load_examples(name)
    target = (Path(lora_dir) if lora_dir is not None else default_lora_dir()) / name
    if (target / MARKER_FILE).is_file() and is_adapter(target):
        return target
    model = Path(model_dir) if model_dir is not None else prepare_default_model()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        t0 = time.monotonic()
        stats = _train(model, examples, tmp)
        (tmp / MARKER_FILE).write_text(json.dumps({
            "name": name,
            "base_model": model.name,
            "examples": len(examples),
            "steps": TRAIN_STEPS,
            "rank": LORA_RANK,
            "train_seconds": round(time.monotonic() - t0, 1),
            **stats,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if target.exists():
            if (target / MARKER_FILE).is_file() and is_adapter(target):  # another process finished first
                return target
            shutil.rmtree(target)  # an incomplete leftover
        os.rename(tmp, target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.lora_prep",
                                     description="Build a small LoRA adapter for the default model, once.")
    add_prepare_lora_arguments(parser)
    return prepare_lora_command(parser.parse_args(argv))


def add_prepare_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_ADAPTER,
                        help="the adapter to build, from the examples in server/data/lora_NAME.jsonl "
                             f"(default {DEFAULT_ADAPTER})")
    parser.add_argument("--lora-dir", type=Path, default=None,
                        help="where adapters live (default: $RAPPORT_CACHE_DIR/loras)")


def prepare_lora_command(args: argparse.Namespace) -> int:
    try:
        folder = prepare_lora(args.name, args.lora_dir)
    except RapportError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
