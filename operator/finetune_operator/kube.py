"""A small dict-in, dict-out Kubernetes API client for the operator's own requests.

kopf watches and patches the resources it handles with its own client; the operator's other requests (server-side
apply of the CronJob and the Deployment mount, reading pods and Deployments, status writes with optimistic
concurrency) go through this wrapper around the `kubernetes` package's authenticated ApiClient. Working with plain
dicts keeps manifests, patches and API responses in one shape, the shape the pure functions are tested with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from .spec import GROUP, PLURAL, VERSION

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
JSON = "application/json"


class KubeError(Exception):
    """An API error with the server's Status object (reason, message, details.causes) at hand."""

    def __init__(self, status: int, body: Mapping[str, Any], method: str, path: str) -> None:
        self.status = status
        self.body = dict(body)
        self.reason = str(body.get("reason") or "")
        self.message = str(body.get("message") or body)
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")

    @property
    def causes(self) -> list[dict[str, Any]]:
        return list((self.body.get("details") or {}).get("causes") or ())


class Kube:
    def __init__(self, api_client: k8s_client.ApiClient, request_timeout: float = 30.0) -> None:
        self.api = api_client
        self.timeout = request_timeout

    @classmethod
    def from_environment(cls) -> Kube:
        """In a pod: the ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config (as kubectl)."""
        configuration = k8s_client.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=configuration)
        return cls(k8s_client.ApiClient(configuration))

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int | bool] | None = None,
        body: Any = None,
        content_type: str = JSON,
    ) -> dict[str, Any]:
        headers = {"Accept": JSON, "Content-Type": content_type}
        params = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in (query or {}).items()]
        # The REST layer serialises dict bodies as JSON for JSON and YAML content types alike (JSON is YAML).
        payload = None if body is None else _plain(body)
        method_, url, headers_, _, _ = self.api.param_serialize(
            method, path, query_params=params, header_params=headers, auth_settings=["BearerToken"]
        )
        try:
            response = self.api.call_api(method_, url, header_params=headers_, body=payload,
                                         _request_timeout=self.timeout)
            response.read()
        except ApiException as exc:
            raise _error(exc.status or 0, exc.body, method, path) from None
        except urllib3.exceptions.HTTPError as exc:
            # The API server unreachable (restarting, partitioned): status 0, like any other failed request, so
            # every caller's retry applies — uncaught, it would stop the resync daemon for kopf's 60 s backoff.
            raise KubeError(0, {"reason": "Unreachable", "message": str(exc)}, method, path) from None
        if not 200 <= response.status <= 299:
            raise _error(response.status, response.data, method, path)
        return json.loads(response.data) if response.data else {}

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, path: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        return list(self.request("GET", path, query=query).get("items") or ())

    def apply(self, path: str, body: Mapping[str, Any], *, field_manager: str, force: bool) -> dict[str, Any]:
        query = {"fieldManager": field_manager, "force": force, "fieldValidation": "Strict"}
        return self.request("PATCH", path, query=query, body=body, content_type=APPLY)

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body=body, content_type=MERGE)


def _plain(body: Any) -> Any:
    # kopf hands us its own Body/Mapping views; the REST layer's json.dumps wants plain dicts and lists.
    return json.loads(json.dumps(body, default=dict))


def _error(status: int, raw: Any, method: str, path: str) -> KubeError:
    body: Any = raw
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"message": raw}
    if not isinstance(body, dict):
        body = {"message": str(body)}
    return KubeError(status, body, method, path)


# --- paths ---------------------------------------------------------------------------------------------------------

def _q(part: str) -> str:
    return quote(part, safe="")


def cft_path(namespace: str, name: str | None = None, *, subresource: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{_q(namespace)}/{PLURAL}"
    if name:
        path += f"/{_q(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


def cronjob_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/batch/v1/namespaces/{_q(namespace)}/cronjobs"
    return f"{path}/{_q(name)}" if name else path


def jobs_path(namespace: str) -> str:
    return f"/apis/batch/v1/namespaces/{_q(namespace)}/jobs"


def job_path(namespace: str, name: str) -> str:
    return f"{jobs_path(namespace)}/{_q(name)}"


def deployment_path(namespace: str, name: str) -> str:
    return f"/apis/apps/v1/namespaces/{_q(namespace)}/deployments/{_q(name)}"


def configmap_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{_q(namespace)}/configmaps/{_q(name)}"


def pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{_q(namespace)}/pods"


def ensure_peering(kube: Kube, name: str, namespaces: list[str] | None) -> list[str]:
    """Create kopf's peering object(s) if the peering kinds are installed and the objects are not: a
    ClusterKopfPeering for a cluster-wide operator (`namespaces` None), a KopfPeering per watched namespace."""
    targets = ([("/apis/kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", None)] if namespaces is None else
               [(f"/apis/kopf.dev/v1/namespaces/{_q(ns)}/kopfpeerings", "KopfPeering", ns) for ns in namespaces])
    created = []
    for path, kind, namespace in targets:
        metadata: dict[str, Any] = {"name": name}
        if namespace:
            metadata["namespace"] = namespace
        try:
            kube.request("POST", path, body={"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": metadata})
            created.append(f"{kind} {namespace + '/' if namespace else ''}{name}")
        except KubeError as exc:
            if exc.status not in (404, 409):  # kind not installed (no peering) / exists already
                raise
    return created
