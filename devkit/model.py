"""The embedded default model: a tiny GPT-2-style causal LM that the project builds itself, with no model hub.

``ensure_embedded_model()`` returns a directory that ``AutoTokenizer.from_pretrained`` and
``AutoModelForCausalLM.from_pretrained`` load like any real checkpoint. The first call builds it — a byte-level BPE
tokenizer trained with ``tokenizers`` and a few GPT-2 layers pretrained for a few minutes on the bundled corpus
(plain everyday text plus neutral dialogue in the contract's prompt format) — and later calls reuse it. The cache
directory's name carries a hash of the recipe and the training text, so changing either builds a new model beside
the old one instead of silently reusing a stale one.

``python -m devkit.model`` builds (or finds) the model and prints its path; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from devkit.conversations import generic_dialogue

if TYPE_CHECKING:  # transformers is imported only when a build needs it: reusing a cached model stays cheap
    from transformers import PreTrainedTokenizerFast

# The contract's prompt format (docs/contracts.md §2): the chat service and the trainer put the reply after it.
PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nOutput: "
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
MODEL_PREFIX = "tinychat"
CACHE_ENV = "LLMMC_MODEL_CACHE"

# Everything that shapes the built model. Changing any value changes the cache key.
RECIPE: dict[str, int | float] = {
    "recipe_version": 5,
    "seed": 1234,
    "vocab_size": 4096,
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "n_positions": 512,
    "corpus_repeats": 4,
    "dialogue_examples": 4000,
    "block_size": 128,
    "batch_size": 8,
    "steps": 400,
    "learning_rate": 3e-3,
    "warmup_steps": 30,
}
THREADS_ENV = "LLMMC_TORCH_THREADS"
# Pre-tokenizer pieces: one whitespace character, a run of one script (kanji, hiragana, katakana, Latin letters,
# digits), or a run of anything else (punctuation, emoji).
WORD_PATTERN = "|".join(
    (r"\s", r"\p{Han}+", r"[\p{Hiragana}ー]+", r"[\p{Katakana}ー]+", r"[A-Za-z]+", r"[0-9]+",
     r"[^\s\p{Han}\p{Hiragana}\p{Katakana}ーA-Za-z0-9]+")
)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[tinychat] {message}", file=sys.stderr, flush=True)


def format_example(instruction: str, context: str, output: str) -> str:
    """One dialogue pair as pretraining text: the contract's prompt, the reply and the end-of-text token."""
    return PROMPT_TEMPLATE.format(instruction=instruction, input=context) + output + EOS_TOKEN


def training_documents() -> list[str]:
    """The pretraining text: the bundled corpus in paragraphs of a few lines (repeated), then the neutral dialogue."""
    documents: list[str] = []
    # Beside this module, not resources.files("devkit"): from the checkout's root, the folder devkit/ that holds the
    # package is also importable as "devkit" (a namespace package, which wins over the editable install).
    corpus = Path(__file__).with_name("corpus")
    for entry in sorted(corpus.iterdir(), key=lambda item: item.name):
        if not entry.name.endswith(".txt"):
            continue
        lines = [line for line in entry.read_text(encoding="utf-8").splitlines() if line.strip()]
        # Short paragraphs, so the plain text interleaves with dialogue when the blocks are shuffled.
        documents += ["\n".join(lines[i : i + 4]) + EOS_TOKEN for i in range(0, len(lines), 4)]
    # The plain text is small next to the dialogue; repeating it lets the model learn its words well enough that an
    # adapter can use them (a character's voice should be a new way of speaking, not a set of unseen tokens).
    documents *= int(RECIPE["corpus_repeats"])
    count = int(RECIPE["dialogue_examples"])
    documents += [format_example(*example) for example in generic_dialogue(int(RECIPE["seed"]), count)]
    return documents


def build_key(documents: list[str]) -> str:
    """Hash of the recipe and the exact training text: the cache directory's identity."""
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for document in documents:
        digest.update(b"\0" + document.encode("utf-8"))
    return digest.hexdigest()[:16]


def default_cache_root() -> Path:
    """``$LLMMC_MODEL_CACHE`` if set, else ``~/.cache/llmmultichat/models``."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else Path.home() / ".cache" / "llmmultichat" / "models"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # An advisory lock on a side file: a second process waits here instead of building the same model in parallel.
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_embedded_model(cache_root: Path | None = None, *, progress: bool = True) -> Path:
    """The embedded model's directory, built on first use and reused afterwards.

    The build runs in a temporary sibling directory under a file lock and is renamed into place when complete, so a
    directory with the final name is always whole, and concurrent callers build it once.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    documents = training_documents()
    target = root / f"{MODEL_PREFIX}-{build_key(documents)}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{target.name}.lock"):
        if target.is_dir():  # another process finished it while this one waited for the lock
            return target
        # Holding the lock, any leftover work directory for this key belongs to a build that died.
        for stale in root.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
        try:
            _build(work, documents, progress)
            # mkdtemp makes the directory private, and safetensors writes its files 0600; the model is meant to be
            # read by other users (pods run as uid 10001 on the real node, services).
            work.chmod(0o755)
            for path in work.iterdir():
                path.chmod(0o644)
            os.rename(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    _log(progress, f"model ready at {target}")
    return target


def _train_tokenizer(documents: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every string, Japanese and emoji included, maps to tokens and decodes back unchanged.
    # Text is first cut into words by script, with every whitespace character a piece of its own:
    # - a prompt ending in "Output: " then tokenizes exactly as it does inside a training example, instead of ending
    #   in a lone-space token the model never saw before a reply;
    # - Japanese splits at kanji/kana boundaries, so nouns stay separate tokens instead of the templated dialogue
    #   merging whole phrases ("コーヒーについて話しませんか") into single tokens the model cannot compose.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(RECIPE["vocab_size"]),
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=12,  # byte-level characters: at most four kana or kanji, or twelve Latin letters
        show_progress=False,
    )
    # Special tokens are stripped from the training text so BPE does not learn merges across them.
    tokenizer.train_from_iterator((doc.replace(EOS_TOKEN, "\n") for doc in documents), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=int(RECIPE["n_positions"]),
        clean_up_tokenization_spaces=False,
    )


def _build(work: Path, documents: list[str], progress: bool) -> None:
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    started = time.monotonic()
    previous_threads = torch.get_num_threads()
    # One thread by default: on a 2-core machine shared with other work, two torch threads contend with it and run
    # several times slower than one (measured), while on an idle machine one thread costs less than 2x.
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    try:
        seed = int(RECIPE["seed"])
        torch.manual_seed(seed)
        _log(progress, f"training tokenizer on {len(documents)} documents")
        tokenizer = _train_tokenizer(documents)
        _log(progress, f"tokenizer: {len(tokenizer)} tokens ({time.monotonic() - started:.1f}s)")

        ids: list[int] = []
        for document in documents:
            ids += tokenizer(document)["input_ids"]
        block = int(RECIPE["block_size"])
        usable = len(ids) // block * block
        blocks = torch.tensor(ids[:usable], dtype=torch.long).view(-1, block)
        # A fixed slice of blocks is held out to report the base loss on text the model did not train on.
        generator = torch.Generator().manual_seed(seed)
        blocks = blocks[torch.randperm(len(blocks), generator=generator)]
        held_out, blocks = blocks[:16], blocks[16:]

        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=int(RECIPE["n_positions"]),
            n_embd=int(RECIPE["n_embd"]),
            n_layer=int(RECIPE["n_layer"]),
            n_head=int(RECIPE["n_head"]),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
        params = sum(p.numel() for p in model.parameters())
        _log(progress, f"model: {params / 1e6:.2f}M parameters, {len(blocks)} blocks of {block} tokens")

        steps, warmup = int(RECIPE["steps"]), int(RECIPE["warmup_steps"])
        batch = int(RECIPE["batch_size"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(RECIPE["learning_rate"]), weight_decay=0.01)
        # Linear warm-up, then cosine decay to 10% of the peak rate.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())),
        )
        model.train()
        order = torch.randperm(len(blocks), generator=generator)
        cursor = 0
        for step in range(1, steps + 1):
            if cursor + batch > len(order):
                order, cursor = torch.randperm(len(blocks), generator=generator), 0
            inputs = blocks[order[cursor : cursor + batch]]
            cursor += batch
            loss = model(input_ids=inputs, labels=inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == 1 or step == steps:
                _log(progress, f"step {step}/{steps} loss {loss.item():.3f} ({time.monotonic() - started:.0f}s)")

        model.eval()
        with torch.no_grad():
            held_out_loss = model(input_ids=held_out, labels=held_out).loss.item()
        _log(progress, f"held-out loss {held_out_loss:.3f}")

        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        seconds = time.monotonic() - started
        info = {
            "recipe": RECIPE,
            "prompt_template": PROMPT_TEMPLATE,
            "parameters": params,
            "vocab_size": len(tokenizer),
            "training_tokens": usable,
            "final_train_loss": round(loss.item(), 4),
            "held_out_loss": round(held_out_loss, 4),
            "build_seconds": round(seconds, 1),
        }
        (work / "tinychat.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _log(progress, f"built in {seconds:.0f}s")
    finally:
        torch.set_num_threads(previous_threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find) the embedded model and print its directory.")
    parser.add_argument("--cache-root", type=Path, default=None, help=f"default: ${CACHE_ENV} or ~/.cache/...")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    print(ensure_embedded_model(args.cache_root, progress=not args.quiet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
