"""The operator on the real control plane: the issue's "Must show" list.

Each test gets its own namespace, chat Deployment and operator process (running as a ServiceAccount bound to the
shipped ClusterRole); trainer results are delivered by releasing the Job's pod with a chosen termination message.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from devkit import harness
from devkit.harness import NEVER_READY_ANNOTATION, Env, trained, wait_until
from devkit.podrunner import pvc_local_path
from finetune_operator.manifests import build_cronjob
from finetune_operator.settings import Settings
from finetune_operator.spec import FineTuneSpec

pytestmark = pytest.mark.cluster

V1, V2, V3 = "20261001T030000Z", "20261101T030000Z", "20261201T030000Z"


def cronjob(env: Env, name: str) -> dict[str, Any]:
    return env.get("cronjob", f"{name}-finetune")


def pod_spec(cj: dict[str, Any]) -> dict[str, Any]:
    return cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_cronjob_follows_the_spec_and_drift_is_put_back(env: Env) -> None:
    env.operator.start()
    obj = env.apply_cft("lumina", resources={"gpus": 2, "memory": "8Gi"}, schedule="15 2 * * 1")
    cj = harness.wait_until("CronJob", lambda: env.maybe_get("cronjob", "lumina-finetune"), timeout=30)
    # Matches what the pure builder makes of the stored (defaulted) spec.
    stored = env.get("cft", "lumina")
    desired = build_cronjob(name="lumina", namespace=env.ns, spec=FineTuneSpec.from_dict(stored["spec"]),
                            serving_version=None, settings=Settings(trainer_image="llmmultichat/trainer:test"))
    assert cj["spec"]["schedule"] == "15 2 * * 1" and cj["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod_spec(cj)["containers"][0]["args"] == pod_spec(desired)["containers"][0]["args"]
    assert pod_spec(cj)["containers"][0]["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "2"}
    assert cj["spec"]["jobTemplate"]["metadata"]["labels"]["llmmultichat.io/finetune"] == "lumina"
    assert cj["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]

    # Edit the resource: the CronJob follows.
    env.apply_cft("lumina", resources={"gpus": 1, "memory": "8Gi"}, schedule="@weekly", suspend=True,
                  timeZone="Asia/Tokyo")
    cj = wait_until("CronJob to follow the edit",
                    lambda: (c := cronjob(env, "lumina"))["spec"]["schedule"] == "@weekly" and c, timeout=20)
    assert cj["spec"]["suspend"] is True and cj["spec"]["timeZone"] == "Asia/Tokyo"
    assert pod_spec(cj)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env.wait_status("lumina", "phase Suspended", lambda s: s.get("phase") == "Suspended")
    assert env.condition("lumina", "Scheduled")["reason"] == "Suspended"

    # Edit the CronJob by hand: restored.
    env.kubectl("patch", "cronjob", "lumina-finetune", "--type=merge", "-p",
                json.dumps({"spec": {"schedule": "* * * * *", "suspend": False, "concurrencyPolicy": "Allow"}}))
    cj = wait_until("CronJob restored",
                    lambda: (c := cronjob(env, "lumina"))["spec"]["schedule"] == "@weekly" and c, timeout=20)
    assert cj["spec"]["suspend"] is True and cj["spec"]["concurrencyPolicy"] == "Forbid"
    # Delete it by hand: re-created.
    uid = cj["metadata"]["uid"]
    env.kubectl("delete", "cronjob", "lumina-finetune")
    wait_until("CronJob re-created",
               lambda: (c := env.maybe_get("cronjob", "lumina-finetune")) and c["metadata"]["uid"] != uid, timeout=20)
    assert env.events("CronJobRestored")
    del obj


def test_train_now_promote_then_reject_skip_fail(env: Env) -> None:
    env.operator.start()
    env.apply_cft("lumina", training={"backoffLimit": 0})  # a failed pod fails the Job at once
    env.wait_status("lumina", "phase Scheduled", lambda s: s.get("phase") == "Scheduled")
    conditions = {c["type"]: c["status"] for c in env.status("lumina")["conditions"]}
    assert conditions == {"Scheduled": "True", "Trained": "Unknown", "Promoted": "Unknown", "Ready": "False"}

    # 1. A better adapter: recorded, mounted, rolled out, Ready.
    pod = env.start_job("lumina", "lumina-now-1")
    env.wait_status("lumina", "phase Training", lambda s: s.get("phase") == "Training")
    env.finish_job(pod, trained("lumina", V1, adapter=2.2, base=3.1))
    status = env.wait_status("lumina", "Ready serving V1",
                             lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
    assert status["lastRun"]["outcome"] == "trained" and status["lastRun"]["job"] == "lumina-now-1"
    assert status["lastRun"]["metrics"]["evalLossAdapter"] == 2.2
    assert status["servingMetrics"]["evalLossAdapter"] == 2.2
    assert status["observedGeneration"] == env.get("cft", "lumina")["metadata"]["generation"]
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    deployment = env.deployment()
    assert deployment["spec"]["template"]["metadata"]["annotations"]["llmmultichat.io/adapter-lumina"] == V1
    assert deployment["status"]["updatedReplicas"] == deployment["status"]["availableReplicas"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Scheduled": "True", "Trained": "True", "Promoted": "True", "Ready": "True"}
    row = env.kubectl("get", "cft", "lumina", "--no-headers").stdout.split()
    assert row[:5] == ["lumina", "lumina", "0", "3", "1"] and "Ready" in row and V1 in row and "trained" in row
    # The next runs evaluate against what serves.
    wait_until("--serving-version in the CronJob",
               lambda: f"--serving-version={V1}" in "=".join(pod_spec(cronjob(env, "lumina"))["containers"][0]["args"])
               or V1 in pod_spec(cronjob(env, "lumina"))["containers"][0]["args"], timeout=10)
    generation = deployment["metadata"]["generation"]

    # 2. A worse adapter: rejected, Deployment untouched.
    env.run_job("lumina", "lumina-now-2", trained("lumina", V2, adapter=2.7, serving=2.6, serving_version=V1))
    status = env.wait_status("lumina", "run 2 recorded", lambda s: s.get("lastRun", {}).get("job") == "lumina-now-2")
    assert status["lastRun"]["outcome"] == "rejected" and "not better" in status["lastRun"]["reason"]
    assert status["servingVersion"] == V1 and status["phase"] == "Ready"
    # 3. Too little data: skipped.
    env.run_job("lumina", "lumina-now-3", {"outcome": "skipped", "character": "lumina", "version": None,
                                           "reason": "too little data: 42 < 100 examples",
                                           "examples": {"pairs": 42}, "metrics": {}})
    status = env.wait_status("lumina", "run 3 recorded", lambda s: s.get("lastRun", {}).get("job") == "lumina-now-3")
    assert status["lastRun"]["outcome"] == "skipped" and "42 < 100" in status["lastRun"]["reason"]
    assert env.condition("lumina", "Trained")["reason"] == "Skipped"
    # 4. A failed Job (crash without a result: the log tail is the message).
    env.run_job("lumina", "lumina-now-4", "Traceback ...\nRuntimeError: CUDA out of memory", exit_code=1)
    status = env.wait_status("lumina", "run 4 recorded", lambda s: s.get("lastRun", {}).get("job") == "lumina-now-4",
                             timeout=60)
    assert status["lastRun"]["outcome"] == "failed" and "CUDA out of memory" in status["lastRun"]["reason"]
    assert status["lastRun"]["exitCode"] == 1
    assert env.condition("lumina", "Trained")["reason"] == "Failed"
    # Nothing of 2-4 touched what serves.
    assert env.deployment()["metadata"]["generation"] == generation
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    assert status["servingVersion"] == V1
    assert [h["outcome"] for h in status["history"]] == ["failed", "skipped", "rejected", "trained"]
    reasons = {e["reason"] for e in env.events()}
    assert {"RunTrained", "Promoted", "RunRejected", "RunSkipped", "RunFailed"} <= reasons
    assert "CronJobRestored" not in reasons  # our own updates are not mistaken for drift
    metrics = env.operator.metrics()
    for outcome in ("trained", "rejected", "skipped", "failed"):
        assert f'finetune_runs_total{{name="lumina",namespace="{env.ns}",outcome="{outcome}"}} 1.0' in metrics
    assert f'finetune_promotions_total{{name="lumina",namespace="{env.ns}"}} 1.0' in metrics


def test_two_characters_share_one_deployment(env: Env) -> None:
    env.operator.start()
    env.apply_cft("lumina")
    env.apply_cft("sora")
    env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
    env.run_job("sora", "sora-1", trained("sora", V1, adapter=2.0))
    for name in ("lumina", "sora"):
        env.wait_status(name, "Ready", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}", "/models/lora_sora": f"lora_sora/{V1}"}
    # A new lumina version leaves sora's mount alone (and the chat's own base model mount).
    env.run_job("lumina", "lumina-2", trained("lumina", V2, adapter=1.5, serving=2.0, serving_version=V1))
    env.wait_status("lumina", "Ready on V2", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V2)
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V2}", "/models/lora_sora": f"lora_sora/{V1}"}
    container = env.deployment()["spec"]["template"]["spec"]["containers"][0]
    assert any(m["mountPath"] == "/models/base" for m in container["volumeMounts"])
    live = json.loads(env.kubectl("get", "deployment", "chat", "-o", "json", "--show-managed-fields").stdout)
    managers = {m["manager"] for m in live["metadata"]["managedFields"]}
    assert {f"finetune-operator/{env.ns}.lumina", f"finetune-operator/{env.ns}.sora"} <= managers
    # A second resource for the same character cannot take over lumina's mount.
    env.apply_cft("lumina-copy", character="lumina", pinnedVersion=V1)
    env.wait_status("lumina-copy", "mount conflict", lambda s: s.get("phase") == "Error"
                    and "owned by" in (s.get("lastError") or ""))
    assert env.mounts()["/models/lora_lumina"] == f"lora_lumina/{V2}"
    env.kubectl("delete", "cft", "lumina-copy", "--timeout=30s")
    # Deleting sora removes only sora's mount.
    env.kubectl("delete", "cft", "sora", "--timeout=30s")
    wait_until("sora's mount removed", lambda: "/models/lora_sora" not in env.mounts(), timeout=20)
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V2}"}


@pytest.mark.env(progress_deadline=6)
def test_failed_rollout_is_rolled_back(env: Env) -> None:
    env.operator.start()
    env.apply_cft("lumina")
    env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
    env.wait_status("lumina", "Ready on V1", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
    # From now on the chat pods never become ready: the next rollout cannot complete.
    pod = env.start_job("lumina", "lumina-2")
    env.kubectl("patch", "deployment", "chat", "--type=merge", "-p", json.dumps(
        {"spec": {"template": {"metadata": {"annotations": {NEVER_READY_ANNOTATION: "true"}}}}}))
    env.finish_job(pod, trained("lumina", V2, adapter=1.5, serving=2.0, serving_version=V1))
    env.wait_status("lumina", "promoting V2", lambda s: (s.get("rollout") or {}).get("version") == V2)
    status = env.wait_status("lumina", "rollback", lambda s: s.get("failedVersion") == V2, timeout=40)
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    assert status["phase"] == "RolloutFailed"
    assert env.condition("lumina", "Promoted")["reason"] == "RolloutFailed"
    assert env.events("RolloutFailed")[0]["type"] == "Warning"
    # The cluster heals (someone fixes the pods): the restored version is Ready, the failed one is not retried.
    env.kubectl("patch", "deployment", "chat", "--type=json", "-p", json.dumps(
        [{"op": "remove", "path": "/spec/template/metadata/annotations/podrunner.llmmultichat.io~1never-ready"}]))
    status = env.wait_status("lumina", "restored V1 ready",
                             lambda s: not s.get("rollout") and s.get("servingVersion") == V1, timeout=30)
    assert status["phase"] == "RolloutFailed" and status["failedVersion"] == V2
    assert env.condition("lumina", "Ready")["status"] == "True"
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    assert f'finetune_rollbacks_total{{name="lumina",namespace="{env.ns}"}} 1.0' in env.operator.metrics()
    # A newer, better version is tried again.
    env.run_job("lumina", "lumina-3", trained("lumina", V3, adapter=1.2, serving=2.0, serving_version=V1))
    env.wait_status("lumina", "Ready on V3", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V3)


@pytest.mark.parametrize("crash_point", ["after-run-recorded", "after-deployment-patched", "operator-down"])
def test_restart_between_completion_and_promotion_promotes_once(env: Env, crash_point: str) -> None:
    if crash_point == "operator-down":
        env.operator.start()
    else:
        env.operator.start(FINETUNE_CRASH_POINT=crash_point)
    env.apply_cft("lumina")
    pod = env.start_job("lumina", "lumina-1")
    generation = env.deployment()["metadata"]["generation"]
    if crash_point == "operator-down":
        env.operator.kill()  # SIGKILL while the Job runs; it completes while nobody watches
        env.finish_job(pod, trained("lumina", V1, adapter=2.0))
    else:
        env.finish_job(pod, trained("lumina", V1, adapter=2.0))
        assert env.operator.wait_exit(30) == 137, env.operator.log_tail()
        status = env.status("lumina")
        assert status["lastRun"]["job"] == "lumina-1"
        if crash_point == "after-run-recorded":
            assert env.deployment()["metadata"]["generation"] == generation and env.mounts() == {}
        else:
            assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
            assert not status.get("servingVersion") and not status.get("rollout")
    env.operator.start()  # no crash point this time
    status = env.wait_status("lumina", "Ready on V1",
                             lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
    # Exactly one promotion: one recorded run, one template change, one ReplicaSet with the version.
    assert [h["job"] for h in status["history"]] == ["lumina-1"]
    assert env.deployment()["metadata"]["generation"] == generation + 1
    replica_sets = env.get("replicasets", "-l", "app=chat")["items"]
    with_v1 = [rs for rs in replica_sets
               if rs["spec"]["template"]["metadata"].get("annotations", {}).get("llmmultichat.io/adapter-lumina") == V1]
    assert len(with_v1) == 1
    # Events are best effort: one lost with the killed process is acceptable, a duplicate is not.
    assert len(env.events("RunTrained")) <= 1
    assert len(env.events("Promoted")) == 1


def test_manual_promotion_pin_and_unpin(env: Env) -> None:
    env.operator.start()
    env.apply_cft("lumina", promotion={"mode": "Manual"})
    env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
    status = env.wait_status("lumina", "awaiting approval", lambda s: s.get("phase") == "AwaitingApproval")
    assert status["candidateVersion"] == V1 and env.mounts() == {}
    env.kubectl("annotate", "cft", "lumina", f"llmmultichat.io/promote={V1}")
    env.wait_status("lumina", "Ready on V1", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
    env.run_job("lumina", "lumina-2", trained("lumina", V2, adapter=1.0, serving=2.0, serving_version=V1))
    env.wait_status("lumina", "V2 awaiting", lambda s: s.get("candidateVersion") == V2)
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    env.kubectl("annotate", "cft", "lumina", "--overwrite", f"llmmultichat.io/promote={V2}")
    env.wait_status("lumina", "Ready on V2", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V2)
    # Roll back declaratively: pin V1; unpin: back to the approved V2.
    env.kubectl("patch", "cft", "lumina", "--type=merge", "-p", json.dumps({"spec": {"pinnedVersion": V1}}))
    status = env.wait_status("lumina", "pinned V1",
                             lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
    assert status["previousVersion"] == V2 and env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    env.kubectl("patch", "cft", "lumina", "--type=json", "-p", '[{"op":"remove","path":"/spec/pinnedVersion"}]')
    env.wait_status("lumina", "unpinned: V2", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V2)
    # Someone removes the mount by hand: it is put back (periodic resync).
    mounts = env.deployment()["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    index = next(i for i, m in enumerate(mounts) if m["mountPath"] == "/models/lora_lumina")
    env.kubectl("patch", "deployment", "chat", "--type=json", "-p", json.dumps(
        [{"op": "remove", "path": f"/spec/template/spec/containers/0/volumeMounts/{index}"}]))
    wait_until("mount restored", lambda: env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V2}"}, timeout=20)


def test_delete_removes_children_and_mount_but_keeps_adapters(env: Env) -> None:
    env.operator.start()
    env.apply_cft("lumina")
    env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
    env.wait_status("lumina", "Ready on V1", lambda s: s.get("phase") == "Ready")
    assert env.get("jobs", "-l", "llmmultichat.io/finetune=lumina")["items"]
    # An adapter on the volume, as the trainer publishes it (contract §2).
    adapter = pvc_local_path(env.cluster, env.ns, "adapters") / "lora_lumina" / V1
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    env.kubectl("delete", "cft", "lumina", "--timeout=30s")
    wait_until("mount removed", lambda: env.mounts() == {}, timeout=20)
    annotations = env.deployment()["spec"]["template"]["metadata"].get("annotations") or {}
    assert "llmmultichat.io/adapter-lumina" not in annotations
    wait_until("CronJob gone", lambda: env.maybe_get("cronjob", "lumina-finetune") is None, timeout=30)
    wait_until("Jobs gone", lambda: not env.get("jobs", "-l", "llmmultichat.io/finetune=lumina")["items"], timeout=30)
    # The adapter volume (the user's data) stays, with its adapters.
    assert env.get("pvc", "adapters")["status"]["phase"] == "Bound"
    assert (adapter / "adapter_config.json").read_text() == "{}"
    # And the base-model mount of the chat container was never ours to touch.
    container = env.deployment()["spec"]["template"]["spec"]["containers"][0]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/models/base"]


def test_every_job_is_recorded_exactly_once_beyond_the_history(env: Env) -> None:
    # More finished Jobs than status.history holds, created by hand (no CronJob history limit cleans them up).
    env.operator.start()
    env.apply_cft("lumina", resources={"gpus": 0})  # CPU pods: the fake GPUs are shared with other tests
    template = harness.wait_until("CronJob", lambda: env.maybe_get("cronjob", "lumina-finetune"))["spec"]["jobTemplate"]
    total = 12
    for i in range(total):
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": f"manual-{i}", "labels": template["metadata"]["labels"]}, "spec": template["spec"]}
        env.kubectl("create", "-f", "-", input=json.dumps(job))
        pod = harness.wait_for_pod(env.cluster, env.ns, f"job-name=manual-{i}", timeout=60)
        env.finish_job(pod, {"outcome": "skipped", "reason": f"too little data: {i} < 100 examples", "metrics": {}})
    wait_until("all Jobs marked recorded", lambda: all(
        "finetune.llmmultichat.io/recorded" in (j["metadata"].get("annotations") or {})
        for j in env.get("jobs", "-l", "llmmultichat.io/finetune=lumina")["items"]), timeout=60)
    time.sleep(4)  # more than one resync period: nothing is recorded again
    status = env.status("lumina")
    assert len(status["history"]) == 10
    assert len({h["jobUID"] for h in status["history"]}) == 10
    assert f'finetune_runs_total{{name="lumina",namespace="{env.ns}",outcome="skipped"}} {total}.0' in \
        env.operator.metrics()


def test_two_replicas_with_peering_process_each_run_once(env: Env) -> None:
    env.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(harness.PEERING))
    env.cluster.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=30s")
    first = env.operator.start(standalone=False)
    second = harness.OperatorProcess(env.cluster, env.ns, env.kubeconfig, env.tmp / f"operator2-{env.ns}.log")
    second.start(standalone=False)
    try:
        wait_until("one replica to pause in favour of the other",
                   lambda: any("Pausing operations in favour of" in p.log_tail(400) for p in (first, second)),
                   timeout=30, interval=0.5)
        assert env.maybe_get("kopfpeering", "finetune-operator") is not None
        env.apply_cft("lumina")
        env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
        env.wait_status("lumina", "Ready on V1", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
        logs = first.log_tail(2000) + second.log_tail(2000)
        assert logs.count("recorded Job") == 1
        assert len(env.events("Promoted")) == 1
        assert env.deployment()["metadata"]["generation"] == 2
    finally:
        second.stop()


def test_missing_target_is_an_error_until_it_appears(env: Env) -> None:
    env.operator.start()
    env.apply_cft("lumina", target={"deployment": "chat-later"})
    status = env.wait_status("lumina", "phase Error", lambda s: s.get("phase") == "Error")
    assert "chat-later" in status["lastError"]
    assert env.condition("lumina", "Ready")["reason"] == "TargetError"
    env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
    env.wait_status("lumina", "run recorded, still no target", lambda s: s.get("approvedVersion") == V1)
    later = env.deployment()
    later["metadata"] = {"name": "chat-later"}
    later.pop("status", None)
    env.kubectl("apply", "-f", "-", input=json.dumps(later))
    # Picked up by the periodic resync (3 s in tests): promoted, Ready.
    env.wait_status("lumina", "Ready on V1", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
    assert env.status("lumina").get("lastError") is None
