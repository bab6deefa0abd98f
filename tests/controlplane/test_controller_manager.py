"""kube-controller-manager on a test control plane: namespaces finish deleting and children
owned by a ChaosJob are garbage-collected (what an apiserver-only plane never does)."""

from __future__ import annotations

import json

import pytest

from tests.controlplane.plane import install_crds, poll

pytestmark = pytest.mark.controlplane


def test_namespace_deletion_and_garbage_collection(control_plane_factory) -> None:
    plane = control_plane_factory("/party-gc")
    try:
        # CRDs first: the garbage collector discovers resource types at start and then only
        # every 30 s, so a CRD installed later is collected only after that resync.
        install_crds(plane)
        plane.start_controller_manager()
        plane.kubectl("create", "namespace", "gc")
        job = {
            "apiVersion": "chaos.training.dev/v1alpha1",
            "kind": "ChaosJob",
            "metadata": {"name": "owner", "namespace": "gc"},
            "spec": {
                "federation": "mnist",
                "image": "chaos-train:0.1.0",
                "entry": "chaos_worker.examples.digits:factory",
                "globalBatch": 8,
                "maxReplicas": 2,
            },
        }
        plane.apply(job)
        uid = plane.get("chaosjob", "owner", "gc")["metadata"]["uid"]
        child = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "owner-config",
                "namespace": "gc",
                "ownerReferences": [
                    {
                        "apiVersion": "chaos.training.dev/v1alpha1",
                        "kind": "ChaosJob",
                        "name": "owner",
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "data": {"k": "v"},
        }
        plane.kubectl("create", "-f", "-", input=json.dumps(child))
        plane.kubectl("delete", "chaosjob", "owner", "-n", "gc", "--wait=false")

        def child_gone() -> bool:
            done = plane.kubectl("get", "configmap", "owner-config", "-n", "gc", check=False)
            return done.returncode != 0 and "NotFound" in done.stderr

        poll(child_gone, "garbage collection of the ChaosJob's ConfigMap", timeout=120)

        plane.kubectl("delete", "namespace", "gc", "--wait=false")

        def namespace_gone() -> bool:
            done = plane.kubectl("get", "namespace", "gc", check=False)
            return done.returncode != 0 and "NotFound" in done.stderr

        poll(namespace_gone, "deletion of namespace gc", timeout=120)
    finally:
        plane.stop()
