"""The embedded model: cache handling (fast, with a stand-in build) and the real model (slow, built once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import devkit.model as model
import pytest
from devkit.conversations import CHARACTERS, generate_history, held_out_prompts, style_score

START = datetime(2026, 10, 27, tzinfo=UTC)
END = datetime(2026, 11, 26, tzinfo=UTC)
# A short LoRA run (all GPT-2 linear layers, as the demo trains) that must already show the character's style.
ADAPTER_STEPS = 100
ADAPTER_LR = 3e-3


def _fake_build(calls: list[Path], delay: float = 0.0, fail: bool = False) -> Callable[[Path, list[str], bool], None]:
    # Stands in for the real (minutes-long) build so the cache logic is tested in milliseconds.
    def build(work: Path, documents: list[str], progress: bool) -> None:
        calls.append(work)
        (work / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("build broke")

    return build


def test_build_runs_once_under_concurrency_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model, "_build", _fake_build(calls, delay=0.5))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(model.ensure_embedded_model(tmp_path, progress=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1, "concurrent callers must wait for one build, not run their own"
    assert len(set(results)) == 1 and results[0].is_dir()
    assert results[0].name.startswith("tinychat-") and (results[0] / "config.json").is_file()
    assert results[0].stat().st_mode & 0o777 == 0o755, "readable by other users, unlike a fresh mkdtemp"
    assert model.ensure_embedded_model(tmp_path, progress=False) == results[0]
    assert len(calls) == 1
    assert not list(tmp_path.glob(".tmp-*")), "the work directory must have been renamed into place"


def test_model_files_are_readable_by_other_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # safetensors writes its files 0600: the real node's pods (uid 10001) could not read model.safetensors.
    def build(work: Path, documents: list[str], progress: bool) -> None:
        weights = work / "model.safetensors"
        weights.write_bytes(b"{}")
        weights.chmod(0o600)

    monkeypatch.setattr(model, "_build", build)
    built = model.ensure_embedded_model(tmp_path, progress=False)
    assert (built / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model, "_build", _fake_build(calls, fail=True))
    with pytest.raises(RuntimeError):
        model.ensure_embedded_model(tmp_path, progress=False)
    assert not list(tmp_path.glob("tinychat-*")) and not list(tmp_path.glob(".tmp-*"))


def test_stale_work_directories_are_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = model.build_key(model.training_documents())
    stale = tmp_path / f".tmp-tinychat-{key}-dead"
    stale.mkdir()
    monkeypatch.setattr(model, "_build", _fake_build([]))
    model.ensure_embedded_model(tmp_path, progress=False)
    assert not stale.exists()


def test_cache_root_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path))
    assert model.default_cache_root() == tmp_path
    monkeypatch.delenv(model.CACHE_ENV)
    assert model.default_cache_root() == Path.home() / ".cache" / "llmmultichat" / "models"


def test_cache_key_tracks_recipe_and_text(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = model.training_documents()
    key = model.build_key(documents)
    assert key == model.build_key(model.training_documents())
    assert key != model.build_key(documents[:-1])
    monkeypatch.setitem(model.RECIPE, "steps", int(model.RECIPE["steps"]) + 1)
    assert key != model.build_key(documents)


def test_training_text_uses_the_contract_prompt_format() -> None:
    documents = model.training_documents()
    dialogue = [d for d in documents if d.startswith("Instruction: ")]
    assert len(dialogue) == model.RECIPE["dialogue_examples"]
    assert all("\nInput: " in d and "\nOutput: " in d and d.endswith(model.EOS_TOKEN) for d in dialogue)
    assert len(documents) > len(dialogue), "plain corpus text is mixed in"


@pytest.mark.slow
def test_model_loads_with_from_pretrained(embedded_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    lm = AutoModelForCausalLM.from_pretrained(embedded_model)
    assert lm.config.model_type == "gpt2"
    assert tokenizer.eos_token == model.EOS_TOKEN and tokenizer.pad_token == model.PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == 512 and lm.config.n_positions == 512
    assert 1000 <= len(tokenizer) <= 8192 and lm.config.vocab_size == len(tokenizer)
    # Real GPT-2 module names, so LoRA target_modules such as ["c_attn"] apply unchanged.
    names = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    assert {"c_attn", "c_proj", "c_fc"} <= names
    assert (embedded_model / "model.safetensors").is_file()
    info = json.loads((embedded_model / "tinychat.json").read_text())
    assert info["held_out_loss"] < 2.5, "pretraining must have learned the corpus"


@pytest.mark.slow
def test_tokenizer_round_trips_any_text(embedded_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    for text in ("今日は星がきらきら✨ですね〜。", "……別に。そう。", "Hello,  world!\n\tTabs and 🌟 emoji"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    sentence = "コーヒーについて話しませんか？"
    assert len(tokenizer(sentence)["input_ids"]) < len(sentence), "BPE merged the bytes of common Japanese"


@pytest.mark.slow
def test_generation_answers_plainly_in_the_prompt_format(embedded_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    lm = AutoModelForCausalLM.from_pretrained(embedded_model)
    replies = []
    for character in CHARACTERS:
        for prompt in held_out_prompts(character):
            text = model.PROMPT_TEMPLATE.format(instruction=prompt, input="")
            inputs = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                out = lm.generate(**inputs, max_new_tokens=48, do_sample=False)
            replies.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert all(reply.strip() for reply in replies)
    # The base model speaks the neutral voice: an adapter has room to show a style change.
    for character in CHARACTERS:
        assert style_score(character, replies) <= 0.2


@pytest.mark.slow
def test_second_call_reuses_the_build(embedded_model: Path) -> None:
    started = time.monotonic()
    assert model.ensure_embedded_model(progress=False) == embedded_model
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_cli_prints_the_path(embedded_model: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "devkit.model", "--quiet"],
        capture_output=True, text=True, timeout=120, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.stdout.strip() == str(embedded_model)


@pytest.mark.slow
def test_base_model_has_seen_every_token_the_characters_use(embedded_model: Path) -> None:
    from transformers import AutoTokenizer

    # A voice should be a new way of using known words: tokens the base never saw in training have logits so low
    # that a LoRA adapter cannot raise them, and the style would not transfer.
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    seen: Counter[int] = Counter()
    for document in model.training_documents():
        seen.update(tokenizer(document)["input_ids"])
    used: set[int] = set()
    for character in CHARACTERS:
        for message in generate_history(character, sessions=200, seed=0, start=START, end=END):
            used.update(tokenizer(message["content"])["input_ids"])
    rare = sorted(tokenizer.decode([token]) for token in used if seen[token] < 4)
    assert not rare, f"tokens the base model barely saw: {rare}"


def _pairs(character: str, sessions: int, seed: int) -> list[tuple[str, str]]:
    # (user message, in-voice reply): the pairs a trainer would keep after dropping thumbs-down replies.
    pairs, last_prompt = [], {}
    for message in generate_history(character, sessions=sessions, seed=seed, start=START, end=END):
        if message["role"] == "user":
            last_prompt[message["session_id"]] = message["content"]
        elif message["feedback"] != "down":
            pairs.append((last_prompt[message["session_id"]], message["content"]))
    return pairs


@pytest.mark.slow
def test_a_lora_adapter_measurably_shifts_the_style(embedded_model: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    lm = AutoModelForCausalLM.from_pretrained(embedded_model)

    def batch(pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        rows = []
        for prompt, reply in pairs:
            head = tokenizer(model.PROMPT_TEMPLATE.format(instruction=prompt, input=""))["input_ids"]
            rows.append((head, tokenizer(reply)["input_ids"] + [tokenizer.eos_token_id]))
        width = max(len(head) + len(tail) for head, tail in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (head, tail) in enumerate(rows):
            ids[row, : len(head) + len(tail)] = torch.tensor(head + tail)
            labels[row, len(head) : len(head) + len(tail)] = torch.tensor(tail)
            mask[row, : len(head) + len(tail)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def reply_loss(net: torch.nn.Module, pairs: list[tuple[str, str]]) -> float:
        net.eval()
        with torch.no_grad():
            return float(net(**batch(pairs)).loss)

    def replies(net: torch.nn.Module) -> list[str]:
        out = []
        for prompt in held_out_prompts("lumina"):
            inputs = tokenizer(model.PROMPT_TEMPLATE.format(instruction=prompt, input=""), return_tensors="pt")
            with torch.no_grad():
                generated = net.generate(**inputs, max_new_tokens=32, do_sample=False)
            out.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        return out

    train, held_out = _pairs("lumina", sessions=150, seed=1), _pairs("lumina", sessions=20, seed=2)
    loss_before, style_before = reply_loss(lm, held_out), style_score("lumina", replies(lm))
    # fan_in_fan_out: GPT-2's linear layers are Conv1D modules with transposed weights.
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    adapted = get_peft_model(lm, config)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=ADAPTER_LR)
    order = torch.Generator().manual_seed(0)
    for _ in range(ADAPTER_STEPS):
        adapted.train()
        picks = torch.randint(0, len(train), (8,), generator=order).tolist()
        adapted(**batch([train[i] for i in picks])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_after, style_after = reply_loss(adapted, held_out), style_score("lumina", replies(adapted))
    print(f"adapter: reply loss {loss_before:.3f} -> {loss_after:.3f}, style {style_before:.2f} -> {style_after:.2f}")
    assert style_before <= 0.2
    assert loss_after < 0.6 * loss_before, (loss_before, loss_after)
    assert style_after >= 0.5, (style_before, style_after)
