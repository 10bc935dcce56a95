"""One configuration: the class's keywords, the flags and the ``TRAINER_*`` variables all come from TrainerConfig."""

from __future__ import annotations

import pytest
from training.config import TrainerConfig, UsageError, module_list
from training.lora_tuning import CharacterFineTuning, build_parser, parse_config

# Every flag users and the operator may pass today (contract §4 plus the trainer's additions, docs/trainer.md).
FLAGS = [
    "--character", "--base-model", "--history-url", "--history-file", "--days", "--min-examples", "--max-examples",
    "--epochs", "--batch-size", "--gradient-accumulation-steps", "--learning-rate", "--max-length", "--lora-r",
    "--lora-alpha", "--lora-dropout", "--target-modules", "--context-turns", "--persona", "--eval-fraction",
    "--output-root", "--serving-version", "--keep-versions", "--result-file", "--seed", "--log-level",
]
REQUIRED = ["--character", "lumina", "--history-file", "lumina.jsonl"]


def test_every_flag_and_its_variable_are_still_there() -> None:
    parser = build_parser({})
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags == FLAGS
    help_text = parser.format_help()
    for flag in FLAGS:
        assert f"TRAINER_{flag[2:].upper().replace('-', '_')}" in help_text
    # Knobs that are not flags have no variable either; the token never is a flag.
    assert "--history-token" not in help_text and "--logging-steps" not in help_text


def test_command_line_defaults_are_the_contracts() -> None:
    config = parse_config(REQUIRED, environ={})
    assert config == TrainerConfig(character="lumina", history_file="lumina.jsonl", output_root="/adapters")
    assert (config.base_model, config.days, config.min_examples, config.max_examples) == ("gpt2", 30, 100, None)
    assert (config.epochs, config.batch_size, config.learning_rate, config.max_length) == (3, 4, 3e-4, 512)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules) == (8, 16, 0.1, "auto")
    assert (config.keep_versions, config.seed, config.result_file) == (5, 42, None)
    # The spec's class keeps the spec's output directory.
    assert CharacterFineTuning().config.output_root == "models"


def test_variables_set_flags_and_flags_win() -> None:
    environ = {"TRAINER_CHARACTER": "sol", "TRAINER_EPOCHS": "1", "TRAINER_LORA_DROPOUT": "0.05",
               "TRAINER_TARGET_MODULES": "c_attn,c_proj", "TRAINER_OUTPUT_ROOT": "/data", "TRAINER_SEED": "",
               "TRAINER_MAX_EXAMPLES": "300"}
    config = parse_config(["--history-url", "http://chat:8000"], environ=environ)
    assert (config.character, config.epochs, config.lora_dropout) == ("sol", 1, 0.05)
    assert isinstance(config.epochs, int)  # recorded as 1, not 1.0
    assert (config.target_modules, config.output_root, config.max_examples) == ("c_attn,c_proj", "/data", 300)
    assert config.seed == 42  # an empty variable is not set
    flagged = parse_config(["--history-url", "u", "--epochs", "2.5", "--character", "lumina"], environ=environ)
    assert (flagged.epochs, flagged.character) == (2.5, "lumina")


def test_the_environment_is_read_when_asked_not_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_BATCH_SIZE", "16")
    assert parse_config(REQUIRED, environ={}).batch_size == 4
    assert parse_config(REQUIRED).batch_size == 16  # os.environ, read at this call


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--history-file", "h"], {}, "--character is required"),
    (["--character", "lumina"], {}, "give exactly one of --history-url or --history-file"),
    ([*REQUIRED, "--history-url", "u"], {}, "give exactly one of --history-url or --history-file"),
    ([*REQUIRED, "--epochs", "0"], {}, "--epochs must be positive, got 0"),
    ([*REQUIRED, "--gradient-accumulation-steps", "-1"], {}, "--gradient-accumulation-steps must be positive, got -1"),
    ([*REQUIRED, "--min-examples", "50", "--max-examples", "10"], {}, "--max-examples must be at least --min-examples"),
    ([*REQUIRED, "--lora-dropout", "1"], {}, "--lora-dropout must be in [0, 1)"),
    ([*REQUIRED, "--eval-fraction", "0"], {}, "--eval-fraction must be in (0, 1)"),
    ([*REQUIRED, "--context-turns", "-1"], {}, "--context-turns must be 0 or more"),
    ([*REQUIRED, "--batch-size", "four"], {}, "argument --batch-size: invalid int value: 'four'"),
    (REQUIRED, {"TRAINER_LORA_R": "eight"}, "TRAINER_LORA_R='eight': invalid literal for int() with base 10: 'eight'"),
    ([*REQUIRED, "--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
])
def test_what_the_command_line_refuses(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_config(argv, environ=environ)
    assert str(refused.value) == message


def test_the_class_takes_every_knob_by_keyword() -> None:
    tuner = CharacterFineTuning("/models/base", 4, 8, 0.0, epochs=1, history_url="http://chat:8000",
                                history_token="s3cret", logging_steps=5, target_modules=["q_proj"])
    assert tuner.config == TrainerConfig(base_model="/models/base", lora_r=4, lora_alpha=8, lora_dropout=0.0, epochs=1,
                                         history_url="http://chat:8000", history_token="s3cret", logging_steps=5,
                                         target_modules=["q_proj"])
    assert "s3cret" not in repr(tuner.config)
    with pytest.raises(TypeError, match="no_such_knob"):
        CharacterFineTuning(no_such_knob=1)
    # The spec's positional defaults are the configuration's.
    assert CharacterFineTuning().config == TrainerConfig()


@pytest.mark.parametrize(("given", "expected"), [
    ("auto", None), ("AUTO ", None), (None, None), ("", None), ([], None),
    ("c_attn", ["c_attn"]), ("q_proj, v_proj,", ["q_proj", "v_proj"]), (("q_proj", "o_proj"), ["q_proj", "o_proj"]),
])
def test_target_modules_text_or_list(given: object, expected: list[str] | None) -> None:
    assert module_list(given) == expected  # type: ignore[arg-type]
