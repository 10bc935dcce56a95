"""The embedded default model: a tiny Llama-architecture causal LM that the project builds itself, with no model hub.

``ensure_embedded_model()`` returns a directory that ``AutoTokenizer.from_pretrained`` and
``AutoModelForCausalLM.from_pretrained`` load like any real checkpoint. The first call builds it — a byte-level BPE
tokenizer with a chat template, trained with ``tokenizers``, and a few Llama layers pretrained for a few minutes on
the bundled corpus (plain everyday text plus neutral dialogue, most of it rendered through the chat template, some in
the contract's Alpaca prompt format) — and later calls reuse it. The cache directory's name carries a hash of the
recipe, the chat template and the training text, so changing any of them builds a new model beside the old one
instead of silently reusing a stale one.

``python -m devkit.model`` builds (or finds) the model and prints its path; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from devkit.conversations import TOPICS, generic_dialogue, generic_sessions

if TYPE_CHECKING:  # torch and transformers are imported only when a build needs them: a cache hit stays cheap
    import jinja2
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# The contract's prompt format (docs/contracts.md §2), for models and adapters without a chat template.
PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nOutput: "
BOS_TOKEN = "<|begin|>"
# The end of a turn, and so of every reply: the model's eos_token_id, where generation stops.
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# One line, no literal newlines outside the strings, so Jinja's whitespace options cannot change the output.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# System lines of the pretraining dialogue: many personas (names, roles, likes and manners, in both languages) that
# change nothing about the neutral replies, so the base model learns where a persona goes and that any text may stand
# there, without taking on a voice from one (a character's voice is the adapter's job).
_PERSONA_NAMES = (("Kai", "カイ"), ("Mio", "ミオ"), ("Haru", "ハル"), ("Ren", "レン"), ("Yui", "ユイ"), ("Sam", "サム"))
_PERSONA_ROLES = (  # (English, Japanese)
    ("You are {name}, a helpful assistant.", "あなたは{name}。親切なアシスタントです。"),
    ("You are {name}. Answer everyday questions plainly.", "あなたはアシスタントの{name}です。わかりやすく答えます。"),
    ("You are {name}, a calm assistant.", "あなたは{name}。毎日の小さな相談に答えます。"),
    ("You are a friendly assistant named {name}.", "あなたは落ち着いたアシスタントの{name}です。"),
    ("You are {name}, a {kind}.", "あなたは{name}。{kind}です。"),
    ("Your name is {name}. You are a {kind}.", "名前は{name}。{kind}として答えます。"),
)
# Characters, not only assistants: a persona that casts the model as a spirit or an explorer is still only a system
# line to the base model (under the characters' personas it used to drift into corpus prose).
_PERSONA_KINDS = (  # (English, Japanese)
    ("cheerful guide", "明るい案内人"), ("kind robot", "やさしいロボット"), ("curious cat", "好奇心いっぱいの猫"),
    ("quiet librarian", "静かな図書館の司書"), ("spirit of the forest", "森の精霊"), ("young traveller", "若い旅人"),
    ("wise old wizard", "物知りな魔法使い"), ("lively sea explorer", "元気な海の探検家"),
    ("gentle fairy", "おだやかな妖精"),
    ("spirit of the wind", "風の精霊"), ("brave knight", "勇敢な騎士"), ("sleepy dragon", "ねむそうなドラゴン"),
)
_PERSONA_TRAITS = (
    ("You like {thing}.", "{thing}が好きです。"),
    ("Your favourite thing is {thing}.", "好きなものは{thing}です。"),
    ("You speak gently and politely.", "やさしく丁寧に話します。"),
    ("You keep your answers short.", "短く答えてください。"),
    ("You answer in casual, lively words.", "くだけた口調で元気に答えます。"),
    ("You answer politely, short and clear.", "丁寧な言葉で、短くはっきり答えます。"),
    ("You are curious about everything.", "何にでも興味があります。"),
)
_PERSONA_THINGS = (*((topic.en, topic.ja) for topic in TOPICS), ("the sea", "海"), ("mountains", "山"),
                   ("the moon", "月"), ("clouds", "雲"))


def neutral_persona(rng: random.Random, prose: Sequence[str] = ()) -> str:
    """A system line for the pretraining dialogue: a name and a role or kind, sometimes a like or a manner or two, now
    and then a line of ``prose`` (so that unfamiliar text in a persona is still no reason to leave the reply frame),
    in either language."""
    lang = rng.randrange(2)  # 0: English, 1: Japanese
    name = rng.choice(_PERSONA_NAMES)[lang]
    persona = rng.choice(_PERSONA_ROLES)[lang].format(name=name, kind=rng.choice(_PERSONA_KINDS)[lang])
    if rng.random() < 0.6:
        for trait in rng.sample(_PERSONA_TRAITS, rng.randint(1, 2)):
            persona += ("", " ")[lang == 0] + trait[lang].format(thing=rng.choice(_PERSONA_THINGS)[lang])
    if prose and rng.random() < float(RECIPE["persona_prose_share"]):
        # On a line of its own: joined to the persona's last sentence, the tokenizer would learn merges across the two
        # (such as "。……") that no reply of the base model ever uses.
        persona += "\n" + rng.choice(prose)
    return persona


MODEL_PREFIX = "tinychat"
CACHE_ENV = "LLMMC_MODEL_CACHE"

# Everything that shapes the built model. Changing any value changes the cache key.
RECIPE: dict[str, int | float] = {
    "recipe_version": 10,
    "seed": 1234,
    "vocab_size": 4096,
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 2,  # head_dim 64: vLLM's CPU attention supports it (not 16 or 32)
    "num_kv_heads": 2,
    "intermediate_size": 384,
    "max_positions": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_embeddings": 1,
    "corpus_repeats": 4,
    "chat_sessions": 1500,
    "system_share": 0.8,
    "persona_prose_share": 0.3,
    "alpaca_examples": 1000,
    "block_size": 256,
    "batch_size": 8,
    "steps": 800,
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
HELD_OUT_BLOCKS = 16


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[tinychat] {message}", file=sys.stderr, flush=True)


def format_example(instruction: str, context: str, output: str) -> str:
    """One dialogue pair in the contract's Alpaca format: prompt, reply and the end-of-turn token."""
    return PROMPT_TEMPLATE.format(instruction=instruction, input=context) + output + EOS_TOKEN


@cache
def _compiled_chat_template() -> jinja2.Template:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    # The options transformers compiles chat templates with, so the text is the same as apply_chat_template's.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(CHAT_TEMPLATE)


def render_chat(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """``messages`` through :data:`CHAT_TEMPLATE`, as ``tokenizer.apply_chat_template(..., tokenize=False)`` renders
    them, without loading a tokenizer: the training text is needed before one exists."""
    return _compiled_chat_template().render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN
    )


def _chat_documents(seed: int, prose: Sequence[str]) -> list[str]:
    # Whole sessions, so every assistant turn is trained after its earlier turns, as the chat service renders them.
    rng = random.Random(f"personas:{seed}")
    documents = []
    for turns in generic_sessions(seed, int(RECIPE["chat_sessions"])):
        messages = [{"role": role, "content": text} for role, text in turns]
        if rng.random() < float(RECIPE["system_share"]):
            messages.insert(0, {"role": "system", "content": neutral_persona(rng, prose)})
        documents.append(render_chat(messages))
    return documents


def training_documents() -> list[str]:
    """The pretraining text: the bundled corpus in paragraphs of a few lines (repeated), neutral chat sessions in the
    chat template, and a share of neutral Alpaca-format pairs."""
    documents: list[str] = []
    files: dict[str, list[str]] = {}
    # Beside this module, not resources.files("devkit"): from the checkout's root, the folder devkit/ that holds the
    # package is also importable as "devkit" (a namespace package, which wins over the editable install).
    corpus = Path(__file__).with_name("corpus")
    for entry in sorted(corpus.glob("*.txt"), key=lambda item: item.name):
        files[entry.name] = [line for line in entry.read_text(encoding="utf-8").splitlines() if line.strip()]
    for lines in files.values():
        # Short paragraphs, so the plain text interleaves with dialogue when the blocks are shuffled.
        documents += ["\n".join(lines[i : i + 4]) + EOS_TOKEN for i in range(0, len(lines), 4)]
    # The plain text is small next to the dialogue; repeating it lets the model learn its words well enough that an
    # adapter can use them (a character's voice should be a new way of speaking, not a set of unseen tokens).
    documents *= int(RECIPE["corpus_repeats"])
    seed = int(RECIPE["seed"])
    documents += _chat_documents(seed, [line for lines in files.values() for line in lines])
    count = int(RECIPE["alpaca_examples"])
    documents += [format_example(*example) for example in generic_dialogue(seed, count)]
    return documents


def build_key(documents: list[str]) -> str:
    """Hash of the recipe, the chat template and the exact training text: the cache directory's identity."""
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    digest.update(CHAT_TEMPLATE.encode("utf-8"))
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


def cached_build(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``root / name``, made by ``build(work_dir)`` unless it already exists.

    The build runs in a temporary sibling directory under a file lock and is renamed into place when complete, so a
    directory with the final name is always whole, and concurrent callers build it once.
    """
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{name}.lock"):
        if target.is_dir():  # another process finished it while this one waited for the lock
            return target
        # Holding the lock, any leftover work directory for this name belongs to a build that died.
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            build(work)
            # mkdtemp makes the directory private, and safetensors writes its files 0600; the model is meant to be
            # read by other users (pods run as uid 10001 on the real node, services).
            work.chmod(0o755)
            for path in work.iterdir():
                path.chmod(0o644)
            os.rename(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


def ensure_embedded_model(cache_root: Path | None = None, *, progress: bool = True) -> Path:
    """The embedded model's directory, built on first use and reused afterwards (see :func:`cached_build`)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    documents = training_documents()
    name = f"{MODEL_PREFIX}-{build_key(documents)}"
    if (root / name).is_dir():
        return root / name
    target = cached_build(root, name, lambda work: _build(work, documents, progress))
    _log(progress, f"model ready at {target}")
    return target


def train_tokenizer(documents: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every string, Japanese and emoji included, maps to tokens and decodes back unchanged.
    # Text is first cut into words by script, with every whitespace character a piece of its own:
    # - a prompt ending in "Output: " or "<|assistant|>\n" then tokenizes exactly as it does inside a training
    #   example, instead of ending in a lone-space token the model never saw before a reply;
    # - Japanese splits at kanji/kana boundaries, so nouns stay separate tokens instead of the templated dialogue
    #   merging whole phrases ("コーヒーについて話しませんか") into single tokens the model cannot compose.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    special = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=int(RECIPE["vocab_size"]),
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=12,  # byte-level characters: at most four kana or kanji, or twelve Latin letters
        show_progress=False,
    )

    def plain(document: str) -> str:
        # Special tokens are cut out of the training text so BPE does not learn merges across them.
        for token in special:
            document = document.replace(token, "\n")
        return document

    tokenizer.train_from_iterator((plain(doc) for doc in documents), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        # Byte-level BPE never needs it; declared so that tokenizer classes with a default of their own (transformers
        # loads Qwen2's for a qwen2 config) do not add one more token.
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=int(RECIPE["max_positions"]),
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """``save_pretrained`` with the chat template inside tokenizer_config.json, in the form transformers 4.x reads too
    (serving engines often pin it): the generic fast-tokenizer class, extra special tokens as
    ``additional_special_tokens``. transformers 5 reads that form unchanged."""
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "extra_special_tokens" in config:
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def llama_config(tokenizer: PreTrainedTokenizerFast) -> object:
    """The embedded model's ``LlamaConfig``: standard Llama fields only, values a serving engine accepts."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(RECIPE["hidden_size"]),
        intermediate_size=int(RECIPE["intermediate_size"]),
        num_hidden_layers=int(RECIPE["num_layers"]),
        num_attention_heads=int(RECIPE["num_heads"]),
        num_key_value_heads=int(RECIPE["num_kv_heads"]),
        head_dim=int(RECIPE["hidden_size"]) // int(RECIPE["num_heads"]),
        max_position_embeddings=int(RECIPE["max_positions"]),
        rope_theta=float(RECIPE["rope_theta"]),
        rms_norm_eps=float(RECIPE["rms_norm_eps"]),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=bool(RECIPE["tie_embeddings"]),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _token_blocks(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents tokenized, packed into blocks and shuffled: (training blocks, held-out blocks)."""
    import torch

    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"]
    block = int(RECIPE["block_size"])
    usable = len(ids) // block * block
    blocks = torch.tensor(ids[:usable], dtype=torch.long).view(-1, block)
    # A fixed slice of blocks is held out to report the base loss on text the model did not train on.
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(int(RECIPE["seed"])))]
    return blocks[HELD_OUT_BLOCKS:], blocks[:HELD_OUT_BLOCKS]


def _pretrain(model: PreTrainedModel, blocks: torch.Tensor, progress: bool, started: float) -> float:
    """AdamW with linear warm-up and cosine decay to 10 % of the peak rate; returns the last step's loss."""
    import torch

    steps, warmup, batch = int(RECIPE["steps"]), int(RECIPE["warmup_steps"]), int(RECIPE["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(RECIPE["learning_rate"]), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup)
        * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())),
    )
    generator = torch.Generator().manual_seed(int(RECIPE["seed"]) + 1)
    model.train()
    order, cursor, loss = torch.randperm(len(blocks), generator=generator), 0, torch.tensor(0.0)
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
    return loss.item()


def _build(work: Path, documents: list[str], progress: bool) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    started, cpu_started = time.monotonic(), time.process_time()
    previous_threads = torch.get_num_threads()
    # One thread by default: on a 2-core machine shared with other work, two torch threads contend with it and run
    # several times slower than one (measured), while on an idle machine one thread costs less than 2x.
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    try:
        torch.manual_seed(int(RECIPE["seed"]))
        _log(progress, f"training tokenizer on {len(documents)} documents")
        tokenizer = train_tokenizer(documents)
        _log(progress, f"tokenizer: {len(tokenizer)} tokens ({time.monotonic() - started:.1f}s)")
        blocks, held_out = _token_blocks(tokenizer, documents)
        model = LlamaForCausalLM(llama_config(tokenizer))
        params = sum(p.numel() for p in model.parameters())
        _log(progress, f"model: {params / 1e6:.2f}M parameters, {len(blocks)} blocks of {blocks.shape[1]} tokens")
        final_loss = _pretrain(model, blocks, progress, started)
        with torch.no_grad():
            held_out_loss = model(input_ids=held_out, labels=held_out).loss.item()
        _log(progress, f"held-out loss {held_out_loss:.3f}")
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(work)
        save_tokenizer(tokenizer, work)
        seconds = time.monotonic() - started
        info = {
            "recipe": RECIPE,
            "prompt_template": PROMPT_TEMPLATE,
            "chat_template": CHAT_TEMPLATE,
            "parameters": params,
            "vocab_size": len(tokenizer),
            "training_tokens": blocks.numel() + held_out.numel(),
            "final_train_loss": round(final_loss, 4),
            "held_out_loss": round(held_out_loss, 4),
            "build_seconds": round(seconds, 1),
            "build_cpu_seconds": round(time.process_time() - cpu_started, 1),
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
