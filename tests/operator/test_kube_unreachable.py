"""An API server that cannot be reached (restarting, partitioned) is a KubeError like any failed request, so the
operator's retries apply to it: the resync daemon logs it and polls again instead of dying for kopf's 60 s backoff
(found by tests/reliability/test_control_plane_restart_cluster.py)."""

from __future__ import annotations

import pytest
from devkit.waiting import free_port
from finetune_operator.kube import Kube, KubeError
from kubernetes import client as k8s_client


def test_a_refused_connection_is_a_kube_error_with_status_0() -> None:
    configuration = k8s_client.Configuration()
    configuration.host = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    kube = Kube(k8s_client.ApiClient(configuration), request_timeout=5)
    with pytest.raises(KubeError) as caught:
        kube.get("/api/v1/namespaces/default")
    assert caught.value.status == 0 and caught.value.reason == "Unreachable"
    assert "GET /api/v1/namespaces/default: 0 Unreachable" in str(caught.value)
