"""Contract §4 from the operator's side: the command line the CronJob's pod runs is one the trainer accepts.

The operator never imports the trainer; this test does, to check both sides of the contract agree.
"""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.manifests import build_cronjob
from finetune_operator.settings import Settings
from finetune_operator.spec import FineTuneSpec


@pytest.mark.parametrize("extra", [
    {},
    {"baseModel": "/models/base", "data": {"historyURL": "http://chat:8000", "tokenSecretRef": {"name": "t"},
                                           "maxExamples": 500},
     "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["c_attn", "c_proj"]},
     "training": {"epochs": 1, "batchSize": 2, "learningRate": 0.001, "maxLength": 128}},
])
def test_trainer_parses_the_operators_command_line(spec_dict: dict[str, Any], extra: dict[str, Any]) -> None:
    from training import lora_tuning  # imported here: it pulls in torch, slow to collect

    spec = FineTuneSpec.from_dict({**spec_dict, **extra})
    cronjob = build_cronjob(name="lumina", namespace="chat", spec=spec, serving_version="20261026T030000Z",
                            settings=Settings())
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == lora_tuning.__name__
    args = lora_tuning.build_parser().parse_args(container["args"])
    assert args.character == "lumina" and args.serving_version == "20261026T030000Z"
    assert args.history_url == spec.data.history_url and args.output_root == "/adapters"
    assert args.min_examples == spec.data.min_examples and args.epochs == spec.training.epochs
    assert args.lora_r == spec.lora.r and args.lora_dropout == spec.lora.dropout
    assert args.keep_versions == spec.adapter_storage.keep_versions
    assert args.result_file == "/dev/termination-log"
    if spec.lora.target_modules:
        assert args.target_modules.split(",") == list(spec.lora.target_modules)
