"""kopf registrations of the Chaos operator: its settings, and one delegating line per handler.

The work is done by `memo.controller`, the `controller.JobController` that
`main.run_operator` builds. Triggers (all level-based: each reconciles the job from what the
API server says now):

* every watch event of a ChaosJob (kopf delivers the initial listing too, so this also
  covers create, update and operator restarts);
* every watch event of a pod labelled `chaos.training.dev/job` (reconciles its job);
* the controller's resync loop, started and stopped with the operator.

No finalizer: kopf timers and daemons would add one (deleting a job would hang while the
operator is down), so the resync is an operator-wide task. Deletion is left to owner
references and the garbage collector.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from chaos_operator.api import GROUP, VERSION
from chaos_operator.kube import PLURAL
from chaos_operator.pods import LABEL_JOB

registry = kopf.OperatorRegistry()


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The same credentials as the `kubernetes` client: in-cluster, else kubeconfig."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our own annotation prefix and finalizer name; Events only for warnings."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
def on_job_event(
    type: str | None, name: str, namespace: str, memo: Any, logger: logging.Logger, **_: Any
) -> None:
    """Any change of a ChaosJob (and the initial listing): reconcile it."""
    memo.controller.handle_event(namespace, name, logger, deleted=type == "DELETED")


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
def on_pod_event(labels: dict[str, str], namespace: str, memo: Any,
                 logger: logging.Logger, **_: Any) -> None:  # fmt: skip
    """A worker pod changed (started, ended, deleted): reconcile its job."""
    memo.controller.handle_event(namespace, labels[LABEL_JOB], logger)


@kopf.on.probe(id="jobs", registry=registry)
def probe_jobs(memo: Any, **_: Any) -> int:
    """Liveness detail: how many jobs the resync loop last saw."""
    return memo.controller.jobs_seen


@kopf.on.startup(registry=registry)
async def start_resync(memo: Any, **_: Any) -> None:
    """Start the periodic resync (level-based safety net, step scraping, autoscaling)."""
    memo.controller.start_resync()


@kopf.on.cleanup(registry=registry)
async def stop_resync(memo: Any, **_: Any) -> None:
    await memo.controller.stop_resync()
