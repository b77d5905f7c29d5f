"""Chat template rendering and token counting, with a small real tokenizer built here.

The tokenizer is a word-level ``tokenizers`` model wrapped in transformers'
``PreTrainedTokenizerFast``: a real Hugging Face tokenizer (chat template,
special tokens, ``save_pretrained``) that needs no model download.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from server.engines.chat_template import (
    ChatTemplate,
    load_local_chat_template,
    openai_messages,
    template_text,
)
from sessions.messages import ChatMessage

WORDS = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant",
         "hello", "there", "how", "are", "you", "<think>"]
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
# Like Qwen3's: the switch is a template variable.
THINKING_TEMPLATE = PLAIN_TEMPLATE + "{% if enable_thinking is defined and enable_thinking %}<think> {% endif %}"
CHAT = (ChatMessage("system", "hello"), ChatMessage("user", "how are you"))


def word_tokenizer(chat_template: str | None) -> Any:
    """A tokenizer that adds a BOS token unless told not to, as Llama-style ones do."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def test_openai_messages_are_role_and_content():
    assert openai_messages(CHAT) == [{"role": "system", "content": "hello"},
                                     {"role": "user", "content": "how are you"}]


def test_count_is_the_rendered_prompt_without_extra_special_tokens():
    tokenizer = word_tokenizer(PLAIN_TEMPLATE)
    template = ChatTemplate(tokenizer, template_text(tokenizer))
    prompt = template.render(CHAT)
    assert prompt == ("<|im_start|> system hello <|im_end|> <|im_start|> user how are you <|im_end|> "
                      "<|im_start|> assistant ")
    # The template wrote the special tokens; encoding adds no BOS of its own.
    assert template.encode(prompt)[0] == WORDS.index("<|im_start|>")
    assert tokenizer.encode(prompt)[0] == WORDS.index("<s>")
    assert template.count_tokens(CHAT) == len(template.encode(prompt)) == 12


def test_the_thinking_switch_reaches_only_templates_that_have_it():
    plain = word_tokenizer(PLAIN_TEMPLATE)
    assert not ChatTemplate(plain, template_text(plain)).thinking_switch

    thinking = word_tokenizer(THINKING_TEMPLATE)
    template = ChatTemplate(thinking, template_text(thinking))
    assert template.thinking_switch
    assert template.render(CHAT, enable_thinking=True).endswith("assistant <think> ")
    assert template.render(CHAT, enable_thinking=False).endswith("assistant ")
    # Counting is with thinking off, the gateway's default.
    assert template.count_tokens(CHAT) == 12


def test_template_text_reads_named_templates_and_the_model_folder(tmp_path: Path):
    named = SimpleNamespace(chat_template={"default": "A", "tool_use": "B enable_thinking"})
    assert template_text(named) == "A\nB enable_thinking"
    assert template_text(SimpleNamespace(chat_template="T")) == "T"

    bare = SimpleNamespace(chat_template=None)
    assert template_text(bare) == "" and template_text(bare, str(tmp_path)) == ""
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    assert template_text(bare, str(tmp_path)) == ""  # a config without a template
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "C"}')
    assert template_text(bare, str(tmp_path)) == '{"chat_template": "C"}'
    (tmp_path / "chat_template.jinja").write_text("J")
    assert template_text(bare, str(tmp_path)) == "J"


def test_a_tokenizer_with_a_template_loads_from_a_local_folder(tmp_path: Path):
    with_template = tmp_path / "with-template"
    word_tokenizer(THINKING_TEMPLATE).save_pretrained(with_template)
    without = tmp_path / "without-template"
    word_tokenizer(None).save_pretrained(without)

    loaded = load_local_chat_template([None, str(without), str(with_template)])
    assert loaded is not None
    template, source = loaded
    assert source == str(with_template)
    assert template.thinking_switch and template.count_tokens(CHAT) == 12

    assert load_local_chat_template([str(without)]) is None
    assert load_local_chat_template([None, ""]) is None


def test_a_name_not_in_the_local_cache_is_not_fetched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # An empty cache: the name can only come from the network, which is never asked.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_local_chat_template(["rapport-test/no-such-model"]) is None
