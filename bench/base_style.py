"""The base model under each character's persona: does it keep the neutral voice, and does it end its replies?

    .venv/bin/python -m bench.base_style                  # the embedded model, ~1 min on 2 cores
    .venv/bin/python -m bench.base_style --samples 8 --base-model /models/other

An adapter's style gain is only visible if the base model, prompted as the chat service prompts it (the character's
persona as the system turn, a held-out prompt, the character's sampling settings), does not already speak in the
character's voice (docs/embedded-model.md: base style ≤ 0.1). Baselines in the same run: the same prompts with no
system turn, and greedy decoding. Style is `devkit.conversations.style_score` (the character's marker words);
"ended" counts replies that reached the end of turn within the token budget.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devkit import conversations
from devkit.paths import REPO_ROOT

from bench._common import machine, table, write_json

CHARACTERS_FILE = REPO_ROOT / "chat_image" / "chat_service" / "characters.json"


def replies(model: Any, tokenizer: Any, system: str | None, prompts: Sequence[str], sampling: dict[str, Any],
            samples: int) -> tuple[list[str], int]:
    """``samples`` replies to each prompt (one when greedy) and how many of them ended with the end-of-turn token.
    The prompt is the chat service's own (`chat_service.prompting`), for a new session."""
    from chat_service.prompting import conversation, render_chat

    texts, ended = [], 0
    for prompt in prompts:
        text = render_chat(tokenizer, conversation(system or "", [], prompt))
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        for _ in range(samples if sampling.get("do_sample") else 1):
            output = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, **sampling)
            new = output[0, inputs["input_ids"].shape[1]:]
            ended += int(new[-1] == tokenizer.eos_token_id)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts, ended


def measure(model_path: Path, samples: int, seed: int) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    characters = {c["name"]: c for c in json.loads(CHARACTERS_FILE.read_text(encoding="utf-8"))["characters"]}
    rows = []
    for name in conversations.CHARACTERS:
        served = characters[name]["generation"]
        sampled = {"do_sample": True, "temperature": served["temperature"], "top_p": served["top_p"],
                   "max_new_tokens": served["max_tokens"]}
        greedy = {"do_sample": False, "max_new_tokens": served["max_tokens"]}
        for label, system, sampling in (("persona, as served", characters[name]["persona"], sampled),
                                        ("no system turn, as served", None, sampled),
                                        ("persona, greedy", characters[name]["persona"], greedy)):
            torch.manual_seed(seed)
            with torch.inference_mode():
                texts, ended = replies(model, tokenizer, system, conversations.held_out_prompts(name), sampling,
                                       samples)
            rows.append({"character": name, "prompting": label, "replies": len(texts),
                         "style": conversations.style_score(name, texts), "ended": ended / len(texts)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="sampled replies per held-out prompt")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--base-model", help="a save_pretrained causal LM directory (default: the embedded model)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from devkit.model import ensure_embedded_model

    model_path = Path(args.base_model) if args.base_model else ensure_embedded_model()
    rows = measure(model_path, args.samples, args.seed)
    info = machine() | {"model": model_path.name, "samples_per_prompt": args.samples}
    write_json(args.json, {"machine": info, "rows": rows})
    print(f"\n{info}")
    print(table(rows, [("character", "character", ""), ("prompting", "prompting", ""), ("replies", "replies", ""),
                       ("style", "style score", ".3f"), ("ended", "ended", ".0%")]))
    print("bar: base style ≤ 0.1 under the character's persona, as served")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
