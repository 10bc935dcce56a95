"""Pad-free training batches: one packed row gives the padded batch's loss on every architecture the trainer supports,
and a model for which it would not trains on padded batches instead."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from datasets import Dataset
from devkit.model_families import FAMILIES, ensure_family_model
from peft import LoraConfig, get_peft_model
from training.collate import IGNORE_INDEX, CompletionCollator, FlatteningCollator, tokenize_example
from training.train import make_collator, train_collator
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

RECORDS = [
    {"instruction": "おすすめのお茶は？", "input": "", "output": "緑茶はいかがですか。少しぬるめのお湯でいれます。"},
    {"instruction": "tea?", "input": "", "output": "brew it with water that is not too hot"},
    {"instruction": "今日の天気は？", "input": "朝は雨でした", "output": "午後は晴れるそうです。"},
    {"instruction": "hi", "input": "", "output": "hello! what shall we talk about today?"},
]


def _peft(family: str) -> tuple[Any, Any, Dataset]:
    path = ensure_family_model(family)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=8, target_modules="all-linear"))
    dataset = Dataset.from_list([tokenize_example(r, tokenizer, 512) for r in RECORDS])
    return model, tokenizer, dataset


def test_flattening_collator_packs_one_row_with_restarting_positions() -> None:
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = FlatteningCollator()(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The second example's first token is never a target: it would be predicted from the first example's last one.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["use_cache"] is False and "attention_mask" not in batch


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_gives_the_padded_loss(family: str) -> None:
    model, tokenizer, dataset = _peft(family)
    collator = train_collator(model, tokenizer, dataset, 512, "none")
    assert isinstance(collator, FlatteningCollator), f"{family}: the trainer fell back to padded batches"
    model.eval()
    with torch.no_grad():
        padded = model(**make_collator(tokenizer, 512)(list(dataset))).loss
        packed = model(**collator(list(dataset))).loss
    assert torch.allclose(padded, packed, rtol=1e-4, atol=1e-5), (family, padded.item(), packed.item())


class _IgnoresPositionIds(LlamaForCausalLM):
    """An architecture whose forward takes no position ids (as some remote-code models): packed examples would
    attend to each other, so packing must not be used for it."""

    def forward(self, *args: Any, position_ids: Any = None, **kwargs: Any) -> Any:
        return super().forward(*args, **kwargs)


def test_a_model_that_ignores_position_ids_trains_on_padded_batches() -> None:
    path = ensure_family_model("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(_IgnoresPositionIds.from_pretrained(path), LoraConfig(r=8, target_modules="all-linear"))
    dataset = Dataset.from_list([tokenize_example(r, tokenizer, 512) for r in RECORDS])
    assert isinstance(train_collator(model, tokenizer, dataset, 512, "none"), CompletionCollator)
    assert model.training, "the check leaves the model in training mode"


def test_explicit_padding_is_kept_for_benchmarks() -> None:
    model, tokenizer, dataset = _peft("llama")
    collator = train_collator(model, tokenizer, dataset, 512, "max_length")
    assert isinstance(collator, CompletionCollator) and collator.padding == "max_length"
