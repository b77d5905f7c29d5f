"""server/lora_prep.py: adapter names and folders, the shipped examples, and the built adapter."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from protocol.errors import RapportError
from server.lora_prep import (
    MARKER_FILE,
    LoraPrepError,
    adapter_rank,
    find_adapter,
    is_valid_name,
    list_adapters,
    load_examples,
    prepare_lora,
)


def fake_adapter(folder: Path, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}), encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_names_are_the_characters_pattern() -> None:
    assert is_valid_name("pirate") and is_valid_name("a.b_c-9") and is_valid_name("x" * 64)
    for bad in ("", "x" * 65, "a/b", "a b", "é", "a\\b"):
        assert not is_valid_name(bad), bad


def test_adapters_are_found_by_name_and_never_outside_the_folder(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    fake_adapter(loras / "pirate", rank=8)
    fake_adapter(loras / "big", rank=64)
    (loras / "empty").mkdir()  # no config, no weights: not an adapter
    fake_adapter(tmp_path / "outside")
    assert list_adapters(loras) == ["big", "pirate"]
    assert find_adapter(loras, "pirate") == loras / "pirate"
    assert find_adapter(loras, "empty") is None
    assert find_adapter(loras, "missing") is None
    assert find_adapter(loras / "pirate", "..") is None
    assert find_adapter(loras, "../outside") is None
    assert adapter_rank(loras / "big") == 64
    assert list_adapters(tmp_path / "nowhere") == []


def test_the_pirate_examples_are_shipped() -> None:
    examples = load_examples("pirate")
    assert len(examples) >= 12
    for messages in examples:
        assert messages[-1]["role"] == "assistant" and messages[0]["role"] == "user"
        assert "arr" in messages[-1]["content"].lower()
    with pytest.raises(LoraPrepError, match="no training data"):
        load_examples("no-such-style")
    with pytest.raises(LoraPrepError, match="invalid adapter name"):
        load_examples("../pirate")


@pytest.mark.timeout(600)
def test_the_built_adapter_exists_and_loads_onto_the_model() -> None:
    pytest.importorskip("peft", reason="peft is not installed; run scripts/install-vllm.sh VENV_DIR")
    pytest.importorskip("transformers", reason="transformers is not installed")
    from server.model_prep import prepare_default_model

    try:
        model_dir = prepare_default_model()
        folder = prepare_lora("pirate")  # built once (about a minute), then found
    except RapportError as exc:
        pytest.skip(f"the default model or adapter cannot be prepared: {exc.message}")
    marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["name"] == "pirate" and marker["last_loss"] < marker["first_loss"]
    assert find_adapter(folder.parent, "pirate") == folder
    assert adapter_rank(folder) == 8

    # Idempotent: a second call finds the adapter and leaves it as it is.
    stamp = (folder / MARKER_FILE).stat().st_mtime
    t0 = time.monotonic()
    assert prepare_lora("pirate") == folder
    assert time.monotonic() - t0 < 5
    assert (folder / MARKER_FILE).stat().st_mtime == stamp

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b, "the adapter has no LoRA weights"
    # Trained: LoRA's B matrices start at zero, so a trained adapter has non-zero ones.
    assert any(float(p.abs().sum()) > 0 for p in lora_b)
