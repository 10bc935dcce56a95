"""Atomic publication, pruning and the result JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training.publish import PublishError, list_versions, prune, publish
from training.result import MAX_BYTES, Result


def write_files(directory: Path) -> None:
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    (directory / "manifest.json").write_text("{}")


def test_publish_renames_a_complete_directory(tmp_path: Path) -> None:
    final = publish(tmp_path, "lumina", "20261126T030000Z", write_files)
    assert final == tmp_path / "lora_lumina" / "20261126T030000Z"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_model.safetensors", "manifest.json"]
    assert oct(final.stat().st_mode & 0o777) == "0o755"
    assert [p.name for p in (tmp_path / "lora_lumina").iterdir()] == ["20261126T030000Z"]  # no temp left
    with pytest.raises(PublishError, match="already exists"):
        publish(tmp_path, "lumina", "20261126T030000Z", write_files)
    assert (final / "adapter_model.safetensors").read_bytes() == b"weights"


def test_failure_while_writing_leaves_nothing_visible(tmp_path: Path) -> None:
    def broken(directory: Path) -> None:
        write_files(directory)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish(tmp_path, "lumina", "20261126T030000Z", broken)
    assert list((tmp_path / "lora_lumina").iterdir()) == []
    assert list_versions(tmp_path, "lumina") == []


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="YYYYMMDD"):
        publish(tmp_path, "lumina", "latest", write_files)
    with pytest.raises(PublishError, match="directory name"):
        publish(tmp_path, "../etc", "20261126T030000Z", write_files)


def test_prune_keeps_newest_and_the_serving_version(tmp_path: Path) -> None:
    versions = [f"202611{d:02d}T030000Z" for d in range(1, 8)]
    for v in versions:
        publish(tmp_path, "lumina", v, write_files)
    (tmp_path / "lora_lumina" / ".tmp-20261130T030000Z-abc").mkdir()  # someone's work in progress
    removed = prune(tmp_path, "lumina", keep=3, protect={versions[0]})
    assert removed == versions[1:4]
    assert list_versions(tmp_path, "lumina") == [versions[0], *versions[4:]]
    assert (tmp_path / "lora_lumina" / ".tmp-20261130T030000Z-abc").is_dir()
    assert not any(p.name.startswith(".tmp-delete") for p in (tmp_path / "lora_lumina").iterdir())


def test_result_json_fits_4096_bytes_and_keeps_its_shape() -> None:
    result = Result("failed", "lumina", reason="ルミナ" * 5000)
    text = result.to_json()
    assert len(text.encode("utf-8")) <= MAX_BYTES
    data = json.loads(text)
    assert data["outcome"] == "failed" and data["reason"].startswith("ルミナ") and data["reason"].endswith("…")
    assert result.exit_code != 0
    skipped = json.loads(Result("skipped", "lumina", examples={"pairs": 42},
                                reason="too little data: 42 < 100 examples").to_json())
    assert skipped == {"outcome": "skipped", "character": "lumina", "version": None, "path": None,
                       "serving_version": None, "examples": {"pairs": 42}, "metrics": {}, "compatibility": {},
                       "reason": "too little data: 42 < 100 examples", "trainer_version": "0.1.0"}
    assert Result("skipped", "lumina").exit_code == 0
    # The largest verdict the check writes (4 reasons of 160 characters) leaves room for everything else.
    verdict = {"vllm": {"compatible": False, "reasons": ["理由" * 80] * 4, "max_lora_rank": None}}
    metrics = dict.fromkeys(("eval_loss_base", "eval_loss_serving", "eval_loss_adapter", "train_loss",
                             "tokens_per_second", "duration_seconds"), 123456.789012)
    trained = Result("trained", "a" * 63, version="20261126T030000Z", path="lora_x/20261126T030000Z",
                     serving_version="20261026T030000Z", examples={"pairs": 9, "train": 8, "eval": 1},
                     metrics=metrics, compatibility=verdict)
    assert json.loads(trained.to_json())["compatibility"] == verdict


def test_check_writable_refuses_existing_versions_and_unwritable_volumes(tmp_path: Path) -> None:
    from training.publish import check_writable

    check_writable(tmp_path, "lumina", "20261126T030000Z")
    assert list((tmp_path / "lora_lumina").iterdir()) == []  # the probe is gone
    publish(tmp_path, "lumina", "20261126T030000Z", write_files)
    with pytest.raises(PublishError, match="already exists"):
        check_writable(tmp_path, "lumina", "20261126T030000Z")
    # A volume that cannot hold the directory (here a file in its place; a read-only mount in a pod).
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "lora_lumina").write_text("not a directory")
    with pytest.raises(PublishError, match="cannot write to the adapter volume"):
        check_writable(tmp_path / "other", "lumina", "20261127T030000Z")
