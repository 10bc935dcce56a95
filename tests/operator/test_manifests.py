"""The CronJob and the Deployment mount, as built from a spec (no cluster)."""

from __future__ import annotations

from typing import Any

from finetune_operator.manifests import (
    build_cronjob,
    deployment_field_manager,
    has_container,
    mount_apply_config,
    mounted_version,
    target_engine,
    trainer_args,
    unmount_apply_config,
)
from finetune_operator.settings import Settings
from finetune_operator.spec import FineTuneSpec


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def pod_of(cronjob: dict[str, Any]) -> dict[str, Any]:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_cronjob_carries_the_schedule_and_policy(spec: FineTuneSpec, owner: dict[str, Any]) -> None:
    cj = build_cronjob(name="lumina", namespace="chat", spec=spec, serving_version=None, settings=Settings(),
                       owner=owner)
    assert cj["metadata"]["name"] == "lumina-finetune" and cj["metadata"]["namespace"] == "chat"
    assert cj["spec"]["schedule"] == "0 3 1 * *"
    assert cj["spec"]["suspend"] is False
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    assert cj["spec"]["startingDeadlineSeconds"] == 3600
    assert cj["spec"]["successfulJobsHistoryLimit"] == 3 and cj["spec"]["failedJobsHistoryLimit"] == 3
    job = cj["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 1 and job["activeDeadlineSeconds"] == 21600
    assert job["ttlSecondsAfterFinished"] == 86400
    assert "timeZone" not in cj["spec"]
    ref = cj["metadata"]["ownerReferences"][0]
    assert ref["uid"] == "0000-1111" and ref["controller"] is True and ref["kind"] == "CharacterFineTune"


def test_labels_on_cronjob_job_template_and_pod_template(spec: FineTuneSpec) -> None:
    cj = build_cronjob(name="lumina-ft", namespace="chat", spec=spec, serving_version=None, settings=Settings())
    for labels in (cj["metadata"]["labels"], cj["spec"]["jobTemplate"]["metadata"]["labels"],
                   cj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]):
        assert labels["llmmultichat.io/finetune"] == "lumina-ft"
        assert labels["llmmultichat.io/character"] == "lumina"


def test_trainer_command_line_follows_contract(spec_dict: dict[str, Any]) -> None:
    spec_dict.update({
        "baseModel": "/models/base",
        "data": {**spec_dict["data"], "windowDays": 14, "minExamples": 50, "maxExamples": 900},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["c_attn", "c_proj"]},
        "training": {"epochs": 2, "batchSize": 8, "learningRate": 0.0001, "maxLength": 256},
        "adapterStorage": {"claimName": "adapters", "keepVersions": 3},
    })
    spec = FineTuneSpec.from_dict(spec_dict)
    cj = build_cronjob(name="lumina", namespace="chat", spec=spec, serving_version="20261026T030000Z",
                       settings=Settings())
    container = pod_of(cj)["containers"][0]
    assert container["command"] == ["python", "-m", "training.lora_tuning"]
    args = container["args"]
    expected = {"--character": "lumina", "--base-model": "/models/base", "--history-url": "http://chat.llmmultichat:8000",
                "--days": "14", "--min-examples": "50", "--max-examples": "900", "--epochs": "2",
                "--batch-size": "8", "--learning-rate": "0.0001", "--max-length": "256", "--lora-r": "16",
                "--lora-alpha": "32", "--lora-dropout": "0.05", "--target-modules": "c_attn,c_proj",
                "--output-root": "/adapters", "--keep-versions": "3", "--serving-version": "20261026T030000Z",
                "--result-file": "/dev/termination-log"}
    for name, value in expected.items():
        assert flag(args, name) == value, name
    # The token is only ever an environment variable from the Secret (contract §4).
    assert not any("token" in a.lower() for a in args)
    env = {e["name"]: e for e in container["env"]}
    assert env["HISTORY_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "history-token", "key": "token"}


def test_optional_flags_are_left_out(spec: FineTuneSpec) -> None:
    args = trainer_args(spec, None)
    for name in ("--base-model", "--max-examples", "--target-modules", "--serving-version"):
        assert name not in args


def test_gpu_pod_shape(spec_dict: dict[str, Any]) -> None:
    spec_dict["resources"] = {"gpus": 2, "cpu": 8, "memory": "32Gi", "nodeSelector": {"pool": "a100"},
                              "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]}
    cj = build_cronjob(name="lumina", namespace="chat", spec=FineTuneSpec.from_dict(spec_dict),
                       serving_version=None, settings=Settings())
    pod = pod_of(cj)
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["adapters"]["persistentVolumeClaim"] == {"claimName": "adapters"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/adapters"] == "adapters" and mounts["/dev/shm"] == "dshm"


def test_cpu_only_pod_has_no_gpu_request_or_toleration(spec_dict: dict[str, Any]) -> None:
    spec_dict["resources"] = {"gpus": 0}
    pod = pod_of(build_cronjob(name="x", namespace="n", spec=FineTuneSpec.from_dict(spec_dict),
                               serving_version=None, settings=Settings()))
    assert "resources" not in pod["containers"][0]
    assert "tolerations" not in pod


def test_pod_is_non_root_and_locked_down(spec: FineTuneSpec) -> None:
    pod = pod_of(build_cronjob(name="x", namespace="n", spec=spec, serving_version=None, settings=Settings()))
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_image_time_zone_suspend_and_model_claim(spec_dict: dict[str, Any]) -> None:
    spec_dict.update({"image": "registry.example/trainer:1.2", "timeZone": "Asia/Tokyo", "suspend": True,
                      "modelStorage": {"claimName": "models"}})
    cj = build_cronjob(name="x", namespace="n", spec=FineTuneSpec.from_dict(spec_dict), serving_version=None,
                       settings=Settings(trainer_image="default/trainer:0"))
    assert cj["spec"]["timeZone"] == "Asia/Tokyo" and cj["spec"]["suspend"] is True
    pod = pod_of(cj)
    assert pod["containers"][0]["image"] == "registry.example/trainer:1.2"
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_default_image_comes_from_settings(spec: FineTuneSpec) -> None:
    cj = build_cronjob(name="x", namespace="n", spec=spec, serving_version=None,
                       settings=Settings(trainer_image="default/trainer:0"))
    assert pod_of(cj)["containers"][0]["image"] == "default/trainer:0"


def test_mount_config_is_one_keyed_mount(spec: FineTuneSpec) -> None:
    config = mount_apply_config(namespace="chat", spec=spec, version="20261126T030000Z")
    assert config["metadata"] == {"name": "chat", "namespace": "chat"}
    template = config["spec"]["template"]
    assert template["metadata"]["annotations"] == {"llmmultichat.io/adapter-lumina": "20261126T030000Z"}
    (container,) = template["spec"]["containers"]
    assert container == {"name": "chat", "volumeMounts": [{
        "name": "lora-lumina", "mountPath": "/models/lora_lumina", "subPath": "lora_lumina/20261126T030000Z",
        "readOnly": True}]}
    assert template["spec"]["volumes"] == [{"name": "lora-lumina", "persistentVolumeClaim": {
        "claimName": "adapters", "readOnly": True}}]
    # Nothing else: server-side apply would take ownership of anything listed here.
    assert set(config["spec"]) == {"template"}


def test_unmount_config_is_empty(spec: FineTuneSpec) -> None:
    assert unmount_apply_config(namespace="chat", spec=spec) == {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat", "namespace": "chat"}}


def test_field_manager_is_per_resource() -> None:
    assert deployment_field_manager("chat", "lumina") != deployment_field_manager("chat", "sora")
    assert len(deployment_field_manager("n" * 63, "x" * 43)) <= 128


def test_mounted_version_reads_the_live_deployment(spec: FineTuneSpec) -> None:
    deployment = {"spec": {"template": {"spec": {"containers": [
        {"name": "sidecar", "volumeMounts": [{"mountPath": "/models/lora_lumina", "subPath": "lora_lumina/X"}]},
        {"name": "chat", "volumeMounts": [
            {"name": "lora-sora", "mountPath": "/models/lora_sora", "subPath": "lora_sora/20260101T000000Z"},
            {"name": "lora-lumina", "mountPath": "/models/lora_lumina", "subPath": "lora_lumina/20261126T030000Z"},
        ]}]}}}}
    assert mounted_version(deployment, spec) == "20261126T030000Z"
    assert has_container(deployment, "chat") and not has_container(deployment, "web")
    assert mounted_version({"spec": {"template": {"spec": {"containers": [{"name": "chat"}]}}}}, spec) is None


def test_target_engine_is_what_the_chat_container_declares() -> None:
    def chat(env: list[dict[str, str]], name: str = "chat") -> dict[str, Any]:
        return {"spec": {"template": {"spec": {"containers": [{"name": name, "env": env}]}}}}

    assert target_engine(chat([{"name": "CHAT_ENGINE", "value": "openai"}]), "chat") == "vllm"  # deploy/vllm's patch
    assert target_engine(chat([{"name": "CHAT_ENGINE", "value": "inprocess"}]), "chat") is None
    assert target_engine(chat([]), "chat") is None
    assert target_engine(chat([{"name": "CHAT_ENGINE", "value": "openai"}], name="sidecar"), "chat") is None
    assert target_engine(None, "chat") is None  # no Deployment (yet): nothing declared
