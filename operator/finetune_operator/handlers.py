"""kopf handlers: thin adapters from kopf's triggers to the controller (which calls the pure functions)."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import kopf

from . import metrics
from .controller import Controller
from .kube import Kube, KubeError, ensure_peering
from .manifests import ANNOTATION_RECORDED, LABEL_FINETUNE
from .settings import Settings
from .spec import GROUP, PLURAL, VERSION

# kopf keeps its handler progress and last-handled spec in annotations with this prefix (not kopf's default one),
# so our bookkeeping is recognisable and cannot collide with another kopf operator's.
PREFIX = "finetune.llmmultichat.io"
CFT = (GROUP, VERSION, PLURAL)
log = logging.getLogger(__name__)


def controller(memo: kopf.Memo) -> Controller:
    # Set once at startup; kopf hands every handler a shallow copy of the operator's memo.
    ctl: Controller = memo.controller
    return ctl


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # kopf's own credential loaders: in a pod the ServiceAccount, elsewhere $KUBECONFIG.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def tune_kopf(kopf_settings: kopf.OperatorSettings, ours: Settings) -> None:
    """kopf's own knobs: where it keeps its bookkeeping, peering, timeouts."""
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = f"{PREFIX}/cleanup"
    if not kopf_settings.peering.mandatory:  # `kopf run --peering=NAME` wins over the environment
        kopf_settings.peering.name = ours.peering_name
    if kopf_settings.peering.priority == 0:
        # Same-priority peers all pause; a random priority lets exactly one of several replicas work.
        kopf_settings.peering.priority = ours.peering_priority or random.randint(1, 2**30)
    # kopf turns its own log lines about an object into Events at this level; ours are posted explicitly.
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.execution.max_workers = 16
    kopf_settings.watching.server_timeout = 300
    kopf_settings.networking.request_timeout = 60


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # `python -m finetune_operator` puts the settings it resolved (flags on top of the environment) in the memo;
    # under `kopf run -m finetune_operator.handlers` they are read from the environment here.
    if "settings" not in memo:
        memo.settings = Settings()
    ours: Settings = memo.settings
    tune_kopf(settings, ours)
    try:
        metrics.serve(ours.metrics_port)
    except OSError as exc:
        # A taken port is a configuration error: stop instead of retrying forever.
        raise kopf.PermanentError(f"cannot serve /metrics on port {ours.metrics_port}: {exc}") from exc
    kube = Kube.from_environment()
    if not settings.peering.standalone:
        # kopf only joins a peering whose object exists; create it so that a second replica is paused, not racing.
        scope = None if settings.peering.clusterwide else list(ours.namespaces)
        for created in ensure_peering(kube, settings.peering.name, scope):
            log.info("created peering object %s", created)
    memo.controller = Controller(kube, ours)


@kopf.on.resume(*CFT)
@kopf.on.create(*CFT)
@kopf.on.update(*CFT)
def reconcile(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Spec, labels or annotations (e.g. llmmultichat.io/promote) changed, or the operator (re)started."""
    try:
        controller(memo).reconcile(namespace, name)
    except KubeError as exc:
        metrics.RECONCILE_ERRORS.labels("reconcile").inc()
        raise kopf.TemporaryError(str(exc), delay=5) from exc


@kopf.daemon(*CFT, cancellation_timeout=5.0)
async def resync(namespace: str, name: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    """Follows rollouts in flight and re-checks everything now and then (drift, missed events)."""
    ctl = controller(memo)
    while not stopped:
        await stopped.wait(ctl.settings.rollout_poll_seconds)
        if stopped or not ctl.due(namespace, name):
            continue
        try:
            await asyncio.to_thread(ctl.reconcile, namespace, name)
        except (KubeError, kopf.TemporaryError) as exc:
            metrics.RECONCILE_ERRORS.labels("resync").inc()
            log.warning("resync of %s/%s failed, will retry: %s", namespace, name, exc)


def guard_enabled(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("promotion") or {}).get("feedbackGuard"))


@kopf.daemon(*CFT, cancellation_timeout=5.0, when=guard_enabled)
async def feedback_guard(namespace: str, name: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    """promotion.feedbackGuard: every FINETUNE_FEEDBACK_POLL_SECONDS, judge the serving version by users' thumbs."""
    ctl = controller(memo)
    while not stopped:
        await stopped.wait(ctl.settings.feedback_poll_seconds)
        if stopped:
            break
        try:
            await asyncio.to_thread(ctl.check_feedback, namespace, name)
        except KubeError as exc:
            metrics.RECONCILE_ERRORS.labels("feedback").inc()
            log.warning("feedback guard of %s/%s failed, will retry: %s", namespace, name, exc)


@kopf.on.delete(*CFT)
def cleanup(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    try:
        controller(memo).cleanup(body)
    except KubeError as exc:
        metrics.RECONCILE_ERRORS.labels("cleanup").inc()
        raise kopf.TemporaryError(str(exc), delay=5) from exc


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_FINETUNE: kopf.PRESENT},
               annotations={ANNOTATION_RECORDED: kopf.ABSENT})
def job_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Training Jobs, scheduled or created by hand (`kubectl create job --from=cronjob/...`). Fires again for every
    Job on the initial listing after a restart; recording is idempotent (the status, then a mark on the Job)."""
    if type == "DELETED":
        return
    try:
        controller(memo).observe_job(body)
    except KubeError as exc:
        # Event handlers are not retried by kopf; the periodic resync sweeps the Jobs again.
        metrics.RECONCILE_ERRORS.labels("job").inc()
        log.warning("recording Job %s failed, the resync will retry: %s", body.get("metadata", {}).get("name"), exc)


@kopf.on.event("batch", "v1", "cronjobs", labels={LABEL_FINETUNE: kopf.PRESENT})
def cronjob_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Someone edited or deleted our CronJob: put the desired one back."""
    try:
        controller(memo).check_cronjob(body, type)
    except KubeError as exc:
        metrics.RECONCILE_ERRORS.labels("cronjob").inc()
        log.warning("restoring CronJob %s failed, the resync will retry: %s", body.get("metadata", {}).get("name"),
                    exc)
