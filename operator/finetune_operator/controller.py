"""The imperative shell: read the cluster, call the pure functions, write their results.

Every entry point (resource created/changed/resumed, periodic resync, a Job's event, a CronJob's event) ends in the
same idempotent steps, serialised per resource by a lock; status writes carry the resourceVersion they were computed
from, so a concurrent change makes them retry from a fresh read instead of overwriting it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import kopf

from . import metrics
from .engine import EngineRefused, plan_engine, refused, switched
from .feedback import guarded_versions, plan_feedback, thumbs_by_version
from .hotswap import EngineUnreachable, HotSwap
from .kube import Kube, KubeError, cft_path, cronjob_path, deployment_path, job_path, jobs_path, pods_path
from .manifests import (
    ANNOTATION_RECORDED,
    FIELD_MANAGER,
    LABEL_FINETUNE,
    build_cronjob,
    cronjob_name,
    deployment_field_manager,
    mount_apply_config,
    target_engine,
    unmount_apply_config,
)
from .runs import (
    TrainerResult,
    gate,
    job_finished_at,
    job_is_active,
    job_state,
    parse_result,
    pick_pod,
    recorded,
    run_record,
    terminated,
)
from .settings import Settings
from .spec import FineTuneSpec
from .status import Event, Observed, Plan, finalize, mark_active, plan_serving, record_run, run_event, status_patch

log = logging.getLogger(__name__)
CONFLICT_MANAGER = re.compile(r'conflict with "([^"]+)"')
ERROR_RETRY_SECONDS = 10.0


class StatusConflict(Exception):
    """The resource changed between our read and our status write; recompute from a fresh read."""


class MountConflict(Exception):
    """Another CharacterFineTune owns the same mount in the target Deployment."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fetch_feedback(chat_url: str, character: str, timeout: float = 10.0) -> dict[str, Any]:
    """The chat service's thumbs per adapter version (GET /v1/characters/{name}/feedback; it needs no token)."""
    url = f"{chat_url.rstrip('/')}/v1/characters/{urllib.parse.quote(character, safe='')}/feedback"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Controller:
    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self.hotswap = HotSwap(kube, settings.chat_admin_token, settings.engine_timeout_seconds)
        self._locks: dict[tuple[str, str], threading.RLock] = {}
        self._guard = threading.Lock()
        # When each finished Job was first seen, for the Job → Deployment patch latency metric.
        self._job_seen: dict[tuple[str, str, str | None], float] = {}
        # When each resource is next due for a resync (monotonic clock); every reconcile moves it.
        self._next: dict[tuple[str, str], float] = {}

    def _lock(self, namespace: str, name: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.RLock())

    def _crash(self, point: str) -> None:
        """Fault injection (FINETUNE_CRASH_POINT, one of settings.FAULT_POINTS): exit hard right here, as an OOM
        kill or a node loss would, so that a test can restart the operator and check that nothing is lost or done
        twice (tests/reliability/test_operator_crash_cluster.py)."""
        if self.settings.crash_point == point:
            log.error("fault injection: exiting hard at %s", point)
            os._exit(137)

    # --- the resource --------------------------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> float | None:
        """CronJob in sync, serving side one step further, status written. Returns seconds until the next check
        (short while a rollout is in flight), or None when the resource is gone."""
        with self._lock(namespace, name):
            for _ in range(8):
                cr = self.kube.get(cft_path(namespace, name))
                if cr is None or cr["metadata"].get("deletionTimestamp"):
                    self._next.pop((namespace, name), None)
                    return None
                try:
                    if self._sweep_jobs(cr):
                        continue  # recorded a run: plan from the fresh status
                    delay = self._reconcile(cr)
                except StatusConflict:
                    continue
                except KubeError as exc:
                    self._report_error(cr, exc)
                    raise
                self._next[(namespace, name)] = time.monotonic() + delay
                return delay
            raise kopf.TemporaryError("status kept changing under us", delay=1)

    def _report_error(self, cr: Mapping[str, Any], exc: KubeError) -> None:
        """Best effort: show an API failure in the status (phase Error, lastError) while kopf retries."""
        meta = cr["metadata"]
        status = dict(cr.get("status") or {})
        new = finalize(FineTuneSpec.from_dict(cr["spec"]), meta.get("annotations") or {}, status,
                       Observed(int(meta.get("generation") or 0), reconcile_error=str(exc)), now_iso())
        with contextlib.suppress(KubeError, StatusConflict):
            self._write_status(cr, status, new)

    def due(self, namespace: str, name: str) -> bool:
        """Is a periodic reconcile due? (Cheap: the daemon asks often, the API is called only when due.)"""
        return time.monotonic() >= self._next.get((namespace, name), 0.0)

    def _sweep_jobs(self, cr: Mapping[str, Any]) -> bool:
        """Record finished Jobs that no event delivered (an event handler is not retried); forget a Job that
        vanished while running. True if the status was written."""
        meta = cr["metadata"]
        status = dict(cr.get("status") or {})
        jobs = self.kube.list(jobs_path(meta["namespace"]), label_selector=f"{LABEL_FINETUNE}={meta['name']}")
        for job in sorted(jobs, key=lambda j: j["metadata"].get("creationTimestamp") or ""):
            state = job_state(job)
            if state is not None and not recorded(status, job):
                return self._record(cr, job, state)
        active = (status.get("activeRun") or {}).get("job")
        if active and not any(j["metadata"]["name"] == active and job_is_active(j) for j in jobs):
            spec = FineTuneSpec.from_dict(cr["spec"])
            new = finalize(spec, meta.get("annotations") or {}, {**status, "activeRun": None},
                           Observed(int(meta.get("generation") or 0)), now_iso())
            self._write_status(cr, status, new)
            return True
        return False

    def _reconcile(self, cr: Mapping[str, Any]) -> float:
        meta = cr["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec = FineTuneSpec.from_dict(cr["spec"])
        annotations = dict(meta.get("annotations") or {})
        status = dict(cr.get("status") or {})
        now = now_iso()
        cronjob_error = self._apply_cronjob(cr, spec, status.get("servingVersion"))
        self._crash("after-cronjob-applied")
        deployment = self.kube.get(deployment_path(namespace, spec.target.deployment))
        serve = self._hot_switch if spec.target.engine is not None else self._mount
        plan, target_error = serve(cr, spec, annotations, status, deployment, now)
        new_status = plan.status
        new_status = finalize(spec, annotations, new_status,
                              Observed(int(meta.get("generation") or 0), cronjob_error, target_error), now)
        self._write_status(cr, status, new_status)
        if (new_status.get("rollout") or {}).get("rollback") and not (status.get("rollout") or {}).get("rollback"):
            self._crash("after-rollback-started")
        elif new_status.get("rollout") and not status.get("rollout"):
            self._crash("after-rollout-started")
        self._emit(cr, plan.events)
        for counter in plan.counters:
            (metrics.PROMOTIONS if counter == "promotion" else metrics.ROLLBACKS).labels(namespace, name).inc()
        if new_status.get("servingVersion") != status.get("servingVersion"):
            self._crash("after-rollout-observed")
            # The trainer's --serving-version follows what serves.
            self._apply_cronjob(cr, spec, new_status.get("servingVersion"))
            self._crash("after-serving-cronjob")
        if new_status.get("rollout"):
            return self.settings.rollout_poll_seconds
        if target_error or cronjob_error:
            return min(self.settings.resync_seconds, ERROR_RETRY_SECONDS)  # often transient: retry soon
        if spec.target.engine is not None:
            # Engine pods that restarted or scaled up get the serving version at the next look.
            return min(self.settings.resync_seconds, self.settings.engine_sync_seconds)
        return self.settings.resync_seconds

    def _mount(self, cr: Mapping[str, Any], spec: FineTuneSpec, annotations: Mapping[str, str],
               status: Mapping[str, Any], deployment: dict[str, Any] | None, now: str) -> tuple[Plan, str | None]:
        """The serving step of a target without an engine: mount the version, the Deployment rolls (followed by
        later reconciles). Returns the plan and the target's error."""
        meta = cr["metadata"]
        plan = plan_serving(spec=spec, annotations=annotations, status=status, deployment=deployment, now=now)
        if plan.action not in ("apply", "unmount"):
            return plan, plan.error
        error = None
        try:
            live = self._apply_mount(meta["namespace"], meta["name"], spec, plan.version)
            plan.status["rollout"]["generation"] = int(live["metadata"]["generation"])
            self._observe_patch_latency(cr, plan.version)
        except (MountConflict, KubeError) as exc:
            plan, error = Plan("none", dict(status)), str(exc)
        self._crash("after-deployment-patched")
        return plan, error

    def _hot_switch(self, cr: Mapping[str, Any], spec: FineTuneSpec, annotations: Mapping[str, str],
                    status: Mapping[str, Any], deployment: dict[str, Any] | None, now: str) -> tuple[Plan, str | None]:
        """The serving step of an engine target (spec.target.engine): every ready engine and chat pod made to serve
        the desired version now, else what serves kept in place; Ready only once all of them do (engine.py)."""
        meta = cr["metadata"]
        if deployment is None:
            return Plan("none", dict(status)), f"target Deployment {spec.target.deployment!r} not found"
        plan = plan_engine(spec, annotations, status, now)
        switching = plan.action in ("apply", "unmount")
        version = plan.version if switching else (status.get("servingVersion") or None)
        if not switching and version is None:
            return plan, None  # the base model serves and nothing changes: no engine pod needs to be up for that
        try:
            self.hotswap.converge(meta["namespace"], meta["name"], spec, deployment, version)
        except EngineRefused as exc:
            if not switching:
                return plan, str(exc)  # what serves is refused now (its files went?): say so, keep trying
            log.warning("%s/%s: %s refused: %s", meta["namespace"], meta["name"], version, exc)
            return refused(plan, status, str(exc)), None
        except (EngineUnreachable, KubeError) as exc:
            return (Plan("none", dict(status)) if switching else plan), str(exc)
        if not switching:
            return plan, None
        self._observe_patch_latency(cr, plan.version)
        return switched(plan, status), None

    def _apply_cronjob(self, cr: Mapping[str, Any], spec: FineTuneSpec, serving: str | None) -> str | None:
        meta = cr["metadata"]
        desired = build_cronjob(name=meta["name"], namespace=meta["namespace"], spec=spec, serving_version=serving,
                                settings=self.settings, owner=cr)
        try:
            # force: the operator is the authority on these fields; a hand edit of them is drift, put back.
            self.kube.apply(cronjob_path(meta["namespace"], cronjob_name(meta["name"])), desired,
                            field_manager=FIELD_MANAGER, force=True)
        except KubeError as exc:
            log.warning("applying CronJob for %s/%s failed: %s", meta["namespace"], meta["name"], exc)
            return exc.message
        return None

    def _apply_mount(self, namespace: str, name: str, spec: FineTuneSpec, version: str | None) -> dict[str, Any]:
        path = deployment_path(namespace, spec.target.deployment)
        manager = deployment_field_manager(namespace, name)
        config = (mount_apply_config(namespace=namespace, spec=spec, version=version) if version
                  else unmount_apply_config(namespace=namespace, spec=spec))
        try:
            return self.kube.apply(path, config, field_manager=manager, force=False)
        except KubeError as exc:
            if exc.status != 409:
                raise
            owners = {m for c in exc.causes for m in CONFLICT_MANAGER.findall(c.get("message", ""))}
            owners |= set(CONFLICT_MANAGER.findall(exc.message))
            rivals = sorted(m for m in owners if m.startswith(f"{FIELD_MANAGER}/") and m != manager)
            if rivals:
                raise MountConflict(
                    f"the mount for character {spec.character!r} in Deployment {spec.target.deployment!r} is owned "
                    f"by {', '.join(rivals)}: only one CharacterFineTune per character and Deployment"
                ) from None
            # Someone edited our mount by hand: this resource is the authority on it.
            return self.kube.apply(path, config, field_manager=manager, force=True)

    def _write_status(self, cr: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        patch = status_patch(old, new)
        if not patch:
            return
        meta = cr["metadata"]
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
        try:
            self.kube.merge_patch(cft_path(meta["namespace"], meta["name"], subresource="status"), body)
        except KubeError as exc:
            if exc.status == 409:
                raise StatusConflict() from None
            raise

    def _emit(self, cr: Mapping[str, Any], events: list[Event]) -> None:
        for event in events:
            kopf.event(cr, type=event.type, reason=event.reason, message=event.message)  # type: ignore[arg-type]

    def _observe_patch_latency(self, cr: Mapping[str, Any], version: str | None) -> None:
        seen = self._job_seen.pop((cr["metadata"]["namespace"], cr["metadata"]["name"], version), None)
        if seen is not None:
            metrics.PATCH_LATENCY.observe(time.monotonic() - seen)

    # --- feedback guard ------------------------------------------------------------------------------------------

    def check_feedback(self, namespace: str, name: str) -> None:
        """promotion.feedbackGuard: read users' thumbs per version, record them, roll back a regression (the next
        reconciles follow that rollback like any other)."""
        with self._lock(namespace, name):
            cr = self.kube.get(cft_path(namespace, name))
            if cr is None or cr["metadata"].get("deletionTimestamp"):
                return
            spec = FineTuneSpec.from_dict(cr["spec"])
            status = dict(cr.get("status") or {})
            if guarded_versions(spec, status) is None:
                return
            try:
                counts = thumbs_by_version(fetch_feedback(spec.data.history_url, spec.character))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("feedback of %s/%s not read from %s: %s", namespace, name, spec.data.history_url, exc)
                return
            now = now_iso()
            plan = plan_feedback(spec, status, counts, now)
            if plan.action in ("apply", "unmount") and spec.target.engine is not None:
                if not self._feedback_switch(namespace, name, spec, plan):
                    return
                plan = Plan("none", switched(plan, status).status, events=plan.events, counters=plan.counters)
            elif plan.action in ("apply", "unmount"):
                live = self._apply_mount(namespace, name, spec, plan.version)
                plan.status["rollout"]["generation"] = int(live["metadata"]["generation"])
            meta = cr["metadata"]
            new = finalize(spec, meta.get("annotations") or {}, plan.status,
                           Observed(int(meta.get("generation") or 0)), now)
            try:
                self._write_status(cr, status, new)
            except StatusConflict:
                return  # changed meanwhile; the next check reads it again
            self._emit(cr, plan.events)
            if plan.counters:
                metrics.ROLLBACKS.labels(namespace, name).inc()
                metrics.FEEDBACK_REGRESSIONS.labels(namespace, name).inc()
            self._next[(namespace, name)] = 0.0  # follow the rollback at once

    def _feedback_switch(self, namespace: str, name: str, spec: FineTuneSpec, plan: Plan) -> bool:
        """The feedback guard's rollback on an engine target, at once; False: not done, the next check retries."""
        try:
            deployment = self.kube.get(deployment_path(namespace, spec.target.deployment))
            if deployment is None:  # no Deployment, no pods to select: an empty selector would pick every pod
                raise EngineUnreachable(f"target Deployment {spec.target.deployment!r} not found")
            self.hotswap.converge(namespace, name, spec, deployment, plan.version)
        except (EngineRefused, EngineUnreachable) as exc:
            log.warning("feedback rollback of %s/%s to %s not done: %s", namespace, name, plan.version, exc)
            return False
        return True

    # --- owned CronJobs ------------------------------------------------------------------------------------------

    def check_cronjob(self, cronjob: Mapping[str, Any], event_type: str | None) -> None:
        """A CronJob of ours changed (or was deleted): put the desired one back if the resource still wants it."""
        meta = cronjob.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(LABEL_FINETUNE)
        namespace = meta.get("namespace")
        if not owner or not namespace or meta.get("name") != cronjob_name(owner):
            return
        with self._lock(namespace, owner):
            cr = self.kube.get(cft_path(namespace, owner))
            if cr is None or cr["metadata"].get("deletionTimestamp"):
                return
            spec = FineTuneSpec.from_dict(cr["spec"])
            before = None if event_type == "DELETED" else meta.get("resourceVersion")
            desired = build_cronjob(name=owner, namespace=namespace, spec=spec,
                                    serving_version=(cr.get("status") or {}).get("servingVersion"),
                                    settings=self.settings, owner=cr)
            live = self.kube.apply(cronjob_path(namespace, cronjob_name(owner)), desired,
                                   field_manager=FIELD_MANAGER, force=True)
            if live["metadata"].get("resourceVersion") != before:
                what = "re-created" if before is None else "restored"
                log.info("CronJob %s/%s drifted from the spec: %s", namespace, cronjob_name(owner), what)
                self._emit(cr, [Event("Normal", "CronJobRestored",
                                      f"CronJob {cronjob_name(owner)} {what} to match the spec")])

    # --- Jobs ----------------------------------------------------------------------------------------------------

    def observe_job(self, job: Mapping[str, Any]) -> None:
        """Record a finished Job's result once (its UID lands in status.history), then let the gate's verdict act."""
        meta = job.get("metadata") or {}
        name = (meta.get("labels") or {}).get(LABEL_FINETUNE)
        namespace = meta.get("namespace")
        if not name or not namespace:
            return
        state = job_state(job)
        with self._lock(namespace, name):
            for _ in range(8):
                cr = self.kube.get(cft_path(namespace, name))
                if cr is None or cr["metadata"].get("deletionTimestamp"):
                    return
                try:
                    if state is None:
                        self._note_active(cr, job)
                        return
                    if not self._record(cr, job, state):
                        return
                    break
                except StatusConflict:
                    continue
            else:
                raise kopf.TemporaryError("status kept changing under us", delay=1)
            self._crash("after-run-recorded")
            self.reconcile(namespace, name)

    def _note_active(self, cr: Mapping[str, Any], job: Mapping[str, Any]) -> None:
        status = dict(cr.get("status") or {})
        if not job_is_active(job) or recorded(status, job):
            return
        if (status.get("activeRun") or {}).get("job") == job["metadata"]["name"]:
            return
        spec = FineTuneSpec.from_dict(cr["spec"])
        meta = cr["metadata"]
        new = finalize(spec, meta.get("annotations") or {}, mark_active(status, job),
                       Observed(int(meta.get("generation") or 0)), now_iso())
        self._write_status(cr, status, new)
        self._crash("after-job-seen")

    def _record(self, cr: Mapping[str, Any], job: Mapping[str, Any], state: str) -> bool:
        status = dict(cr.get("status") or {})
        job_meta = job["metadata"]
        if recorded(status, job):
            self._mark(job, cr)  # recorded before a crash, not marked yet
            return False
        namespace = job_meta["namespace"]
        pods = self.kube.list(pods_path(namespace),
                              label_selector=f"batch.kubernetes.io/controller-uid={job_meta['uid']}")
        pod = pick_pod(pods, state)  # type: ignore[arg-type]
        if pod is None:
            result = TrainerResult(outcome="failed", reason="no finished pod left to read the result from")
        else:
            exit_code, message = terminated(pod)
            result = parse_result(message, exit_code, state)  # type: ignore[arg-type]
        spec = FineTuneSpec.from_dict(cr["spec"])
        engine = "vllm" if spec.target.engine is not None else target_engine(
            self.kube.get(deployment_path(namespace, spec.target.deployment)), spec.target.container)
        decision = gate(result, manual=spec.promotion.manual, min_improvement=spec.promotion.min_improvement,
                        serving_version=status.get("servingVersion"), serving_metrics=status.get("servingMetrics"),
                        engine=engine)
        now = now_iso()
        record = run_record(job, result, decision, finished_at=job_finished_at(job, now))
        meta = cr["metadata"]
        new = record_run(status, record, result, decision, history_limit=self.settings.history_limit)
        new = finalize(spec, meta.get("annotations") or {}, new, Observed(int(meta.get("generation") or 0)), now)
        if decision.verdict == "promote":
            # Start of the "finished Job → Deployment patched" latency; only an approved version gets patched.
            self._job_seen[(meta["namespace"], meta["name"], result.version)] = time.monotonic()
        self._crash("after-result-read")
        self._write_status(cr, status, new)
        self._crash("after-run-status-written")
        log.info("recorded Job %s/%s for %s: %s (%s)", namespace, job_meta["name"], meta["name"],
                 record["outcome"], record.get("reason"))
        self._emit(cr, [run_event(record)])
        self._crash("after-run-event")
        metrics.RUNS.labels(meta["namespace"], meta["name"], record["outcome"]).inc()
        if result.outcome == "trained":
            metrics.LAST_SUCCESS.labels(meta["namespace"], meta["name"]).set(time.time())
        self._mark(job, cr)
        return True

    def _mark(self, job: Mapping[str, Any], cr: Mapping[str, Any]) -> None:
        meta = job["metadata"]
        if ANNOTATION_RECORDED in (meta.get("annotations") or {}):
            return
        try:
            self.kube.merge_patch(job_path(meta["namespace"], meta["name"]), {"metadata": {
                "uid": meta["uid"], "annotations": {ANNOTATION_RECORDED: cr["metadata"]["name"]}}})
        except KubeError as exc:
            if exc.status not in (404, 409):  # gone or replaced: nothing left to mark
                raise

    # --- deletion ------------------------------------------------------------------------------------------------

    def cleanup(self, cr: Mapping[str, Any]) -> None:
        """Remove this resource's mount from the Deployment (adapters on the PVC stay: they are the user's data).
        The CronJob and its Jobs go by their owner references."""
        meta = cr["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec = FineTuneSpec.from_dict(cr["spec"])
        with self._lock(namespace, name):
            try:
                self.kube.apply(deployment_path(namespace, spec.target.deployment),
                                unmount_apply_config(namespace=namespace, spec=spec),
                                field_manager=deployment_field_manager(namespace, name), force=True)
            except KubeError as exc:
                if exc.status != 404:
                    raise
            if spec.target.engine is not None:
                self._release_engine(namespace, name, spec)
            self._crash("after-unmount")  # before kopf removes the finalizer
        metrics.forget(namespace, name)
        with self._guard:
            self._locks.pop((namespace, name), None)

    def _release_engine(self, namespace: str, name: str, spec: FineTuneSpec) -> None:
        """Deletion of an engine target's resource: its character back on the base model, its versions unloaded,
        its ConfigMap key gone; best effort (pods that do not answer must not keep the resource from going)."""
        try:
            deployment = self.kube.get(deployment_path(namespace, spec.target.deployment))
            if deployment is not None:
                self.hotswap.converge(namespace, name, spec, deployment, None)
            self.hotswap.record(namespace, name, spec, None, remove=True)
        except (EngineRefused, EngineUnreachable, KubeError) as exc:
            log.warning("releasing the engine of %s/%s: %s", namespace, name, exc)
