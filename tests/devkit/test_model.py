"""The embedded model: cache handling (fast, with a stand-in build), its tokenizer and chat template (fast, the
tokenizer alone), and the real model (slow, built once)."""

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
from jinja2.exceptions import TemplateError

START = datetime(2026, 10, 27, tzinfo=UTC)
END = datetime(2026, 11, 26, tzinfo=UTC)
# A short LoRA run (every linear layer of the Llama blocks, as the demo trains) that must already show the style.
ADAPTER_STEPS = 100
ADAPTER_LR = 3e-3
LLAMA_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PERSONA = "あなたはルミナ。星が大好きで、やさしく丁寧に話すアシスタントです。"


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


def test_model_files_are_readable_by_other_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # safetensors writes its files 0600: the real node's pods (uid 10001) could not read model.safetensors.
    def build(work: Path, documents: list[str], progress: bool) -> None:
        weights = work / "model.safetensors"
        weights.write_bytes(b"{}")
        weights.chmod(0o600)

    monkeypatch.setattr(model, "_build", build)
    built = model.ensure_embedded_model(tmp_path, progress=False)
    assert (built / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_cache_root_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path))
    assert model.default_cache_root() == tmp_path
    monkeypatch.delenv(model.CACHE_ENV)
    assert model.default_cache_root() == Path.home() / ".cache" / "llmmultichat" / "models"


def test_cache_key_tracks_recipe_template_and_text(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = model.training_documents()
    key = model.build_key(documents)
    assert key == model.build_key(model.training_documents())
    assert key != model.build_key(documents[:-1])
    monkeypatch.setitem(model.RECIPE, "steps", int(model.RECIPE["steps"]) + 1)
    assert key != model.build_key(documents)
    monkeypatch.undo()
    monkeypatch.setattr(model, "CHAT_TEMPLATE", model.CHAT_TEMPLATE.replace("\\n", " "))
    assert key != model.build_key(documents)


def test_training_text_mixes_corpus_chat_sessions_and_alpaca_pairs() -> None:
    documents = model.training_documents()
    assert all(document.endswith(model.EOS_TOKEN) for document in documents)
    chats = [d for d in documents if d.startswith(model.BOS_TOKEN + "<|")]
    alpaca = [d for d in documents if d.startswith("Instruction: ")]
    assert len(chats) == model.RECIPE["chat_sessions"] and len(alpaca) == model.RECIPE["alpaca_examples"]
    assert all("\nInput: " in d and "\nOutput: " in d for d in alpaca)
    with_persona = [d for d in chats if d.startswith(model.BOS_TOKEN + "<|system|>\n")]
    assert abs(len(with_persona) / len(chats) - model.RECIPE["system_share"]) < 0.05
    personas = {d.split("<|end|>", 1)[0].split("\n", 1)[1] for d in with_persona}
    assert len(personas) > 100, "many different personas, so that no one line is what the base model keys on"
    assert any(d.count("<|assistant|>") >= 3 for d in chats), "earlier turns precede many replies"
    plain = len(documents) - len(chats) - len(alpaca)
    assert plain > 0, "plain corpus text is mixed in"


@pytest.fixture(scope="module")
def tokenizer():  # the embedded tokenizer alone: seconds to train, no model needed
    return model.train_tokenizer(model.training_documents())


def test_chat_template_renders_the_pretraining_text(tokenizer) -> None:
    messages = [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "コーヒーについて話しませんか？"},
        {"role": "assistant", "content": "いいですね。"},
        {"role": "user", "content": "Anything else?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == model.render_chat(messages, add_generation_prompt=True)
    assert prompt == (
        f"<|begin|><|system|>\n{PERSONA}<|end|><|user|>\nコーヒーについて話しませんか？<|end|>"
        "<|assistant|>\nいいですね。<|end|><|user|>\nAnything else?<|end|><|assistant|>\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # Each marker is one token, so the chat service and the trainer cut turns at token boundaries.
    for token in (model.BOS_TOKEN, model.EOS_TOKEN, *model.ROLE_TOKENS):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    # A whole conversation is the prompt plus the reply plus the end-of-turn token: reply-only loss is a suffix.
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "Tea, maybe."}], tokenize=False)
    assert full == prompt + "Tea, maybe." + model.EOS_TOKEN
    assert tokenizer.decode(ids, skip_special_tokens=True).count("<|") == 0
    with pytest.raises(TemplateError, match="roles are system, user and assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_saved_tokenizer_keeps_template_and_special_tokens(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model.save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == model.CHAT_TEMPLATE and not list(tmp_path.glob("*.jinja"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["additional_special_tokens"] == list(model.ROLE_TOKENS)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == model.CHAT_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (model.BOS_TOKEN, model.EOS_TOKEN, model.PAD_TOKEN)
    assert set(model.ROLE_TOKENS) <= set(loaded.all_special_tokens)
    assert loaded("<|user|>hi", add_special_tokens=False)["input_ids"] == tokenizer("<|user|>hi")["input_ids"]


@pytest.mark.slow
def test_model_loads_with_from_pretrained(embedded_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    lm = AutoModelForCausalLM.from_pretrained(embedded_model)
    config = lm.config
    assert type(lm).__name__ == "LlamaForCausalLM" and config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads == config.head_dim == 64, "head_dim vLLM accepts"
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.max_position_embeddings >= 512 and tokenizer.model_max_length == config.max_position_embeddings
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.rms_norm_eps == 1e-5 and config.hidden_act == "silu"
    assert 1000 <= len(tokenizer) <= 8192 and config.vocab_size == len(tokenizer)
    # The end of a turn stops generation: tokenizer, model config and generation config agree on it.
    eos = tokenizer.convert_tokens_to_ids(model.EOS_TOKEN)
    generation = GenerationConfig.from_pretrained(embedded_model)
    assert tokenizer.eos_token_id == config.eos_token_id == generation.eos_token_id == eos
    assert tokenizer.pad_token_id == generation.pad_token_id != eos
    assert tokenizer.chat_template == model.CHAT_TEMPLATE
    # Llama's module names (nn.Linear, no GPT-2 Conv1D), so LoRA target_modules such as ["q_proj", "v_proj"] apply.
    names = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    assert set(LLAMA_LINEAR_LAYERS) <= names and not {"c_attn", "c_proj", "c_fc"} & names
    assert (embedded_model / "model.safetensors").is_file()
    info = json.loads((embedded_model / "tinychat.json").read_text())
    assert info["held_out_loss"] < 1.5, "pretraining must have learned the corpus"


@pytest.mark.slow
def test_tokenizer_round_trips_any_text(embedded_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    for text in ("今日は星がきらきら✨ですね〜。", "……別に。そう。", "Hello,  world!\n\tTabs and 🌟 emoji"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    sentence = "コーヒーについて話しませんか？"
    assert len(tokenizer(sentence)["input_ids"]) < len(sentence), "BPE merged the bytes of common Japanese"


def _base_replies(embedded_model: Path, render: Callable[[object, str], str]) -> list[tuple[str, list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    lm = AutoModelForCausalLM.from_pretrained(embedded_model)
    replies = []
    for character in CHARACTERS:
        for prompt in held_out_prompts(character):
            inputs = tokenizer(render(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = lm.generate(**inputs, max_new_tokens=64, do_sample=False)
            tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
            replies.append((tokenizer.decode(tokens, skip_special_tokens=True), tokens))
    return replies


def _chat_prompt(tokenizer, prompt: str) -> str:
    messages = [{"role": "system", "content": PERSONA}, {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _alpaca_prompt(tokenizer, prompt: str) -> str:
    return model.PROMPT_TEMPLATE.format(instruction=prompt, input="")


@pytest.mark.slow
@pytest.mark.parametrize("render", [_chat_prompt, _alpaca_prompt], ids=["chat-template", "alpaca"])
def test_generation_answers_plainly_and_stops_at_the_end_of_turn(embedded_model: Path, render) -> None:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(embedded_model).eos_token_id
    replies = _base_replies(embedded_model, render)
    assert all(text.strip() for text, _ in replies)
    # Generation ends at the end-of-turn token, well before the token limit, for (nearly) every reply.
    assert sum(tokens[-1] == eos for _, tokens in replies) >= 0.8 * len(replies)
    # The base model speaks the neutral voice even under a character's persona: an adapter has room to show a style.
    for character in CHARACTERS:
        assert style_score(character, [text for text, _ in replies]) <= 0.1


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
        # The chat template's prompt (persona, user turn), then the reply and the end-of-turn token; loss on the reply.
        rows = []
        for prompt, reply in pairs:
            head = tokenizer(_chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
            rows.append((head, tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]))
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
            inputs = tokenizer(_chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                generated = net.generate(**inputs, max_new_tokens=48, do_sample=False)
            out.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        return out

    train, held_out = _pairs("lumina", sessions=150, seed=1), _pairs("lumina", sessions=20, seed=2)
    loss_before, style_before = reply_loss(lm, held_out), style_score("lumina", replies(lm))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_LINEAR_LAYERS, task_type="CAUSAL_LM")
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
    assert style_before <= 0.1
    assert loss_after < 0.6 * loss_before, (loss_before, loss_after)
    assert style_after >= 0.5, (style_before, style_after)
