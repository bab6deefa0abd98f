"""Prometheus metrics of the operator, in a registry of its own (docs/operator.md).

The handlers call `reconciling()` around each reconcile, `observe_phase()` with its result,
count `pods_created`/`pods_deleted` for each change that actually happened, and call
`keep_jobs()` with the jobs a resync listed. The phase gauge is rendered at scrape time from
the last phase of every job still known, so a deleted job leaves no stale series behind.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import get_args

from chaos_worker.telemetry.exporter import STEP_BUCKETS, Exporter
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chaos_operator.api.chaosjob import Phase

PHASES: tuple[str, ...] = get_args(Phase)
RESULTS = ("ok", "gone", "conflict", "error")
# 1 ms .. 60 s, like a step: a reconcile is a few API calls (and a scrape of each member on resync).
RECONCILE_BUCKETS = STEP_BUCKETS
JobKey = tuple[str, str]


class _JobPhases(Collector):
    """`chaos_operator_jobs{phase}`: jobs per phase, every phase listed (0 when none)."""

    def __init__(self) -> None:
        self._phases: dict[JobKey, str] = {}
        self._guard = threading.Lock()

    def set(self, job: JobKey, phase: str | None) -> None:
        with self._guard:
            self._phases[job] = phase if phase in PHASES else "Pending"

    def forget(self, job: JobKey) -> None:
        with self._guard:
            self._phases.pop(job, None)

    def keep(self, jobs: Iterable[JobKey]) -> None:
        keep = set(jobs)
        with self._guard:
            for job in set(self._phases) - keep:
                del self._phases[job]

    def describe(self) -> Iterable[Metric]:
        return [self._family(Tally())]

    def collect(self) -> Iterable[Metric]:
        with self._guard:
            counts = Tally(self._phases.values())
        return [self._family(counts)]

    @staticmethod
    def _family(counts: Tally[str]) -> Metric:
        family = GaugeMetricFamily(
            "chaos_operator_jobs",
            "ChaosJobs this operator reconciles, by status.phase (a job without one is Pending).",
            labels=["phase"],
        )
        for phase in PHASES:
            family.add_metric([phase], counts[phase])
        return family


@dataclass
class Reconcile:
    """What `reconciling()` yields: set `gone` when the job no longer exists."""

    gone: bool = False


class OperatorMetrics(Exporter):
    """The metrics one operator exports."""

    def __init__(self, *, version: str | None = None) -> None:
        super().__init__()
        r = self.registry
        self.reconciles = Counter(
            "chaos_operator_reconcile",
            "Reconciles of a ChaosJob by result: ok, gone (job deleted), conflict (a concurrent "
            "write, retried), error (an API error or a bug).",
            ["result"],
            registry=r,
        )
        for result in RESULTS:
            self.reconciles.labels(result)
        self.duration = Histogram(
            "chaos_operator_reconcile_duration_seconds",
            "Wall time of one reconcile: reading the job and its pods, applying the plan "
            "(and scraping the members' step on a resync).",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.pods_created = Counter(
            "chaos_operator_pods_created", "Worker pods the operator created.", registry=r
        )
        self.pods_deleted = Counter(
            "chaos_operator_pods_deleted",
            "Worker pods the operator deleted (scale-down, ended members).",
            registry=r,
        )
        self._phases = _JobPhases()
        r.register(self._phases)
        self.add_build_info("operator", version)

    @contextmanager
    def reconciling(self, namespace: str, name: str) -> Iterator[Reconcile]:
        """Time one reconcile of `namespace/name` and count it by result; exceptions propagate."""
        rec = Reconcile()
        start = time.perf_counter()
        try:
            yield rec
        except ApiException as exc:
            self.reconciles.labels("conflict" if exc.status == 409 else "error").inc()
            raise
        except Exception:
            self.reconciles.labels("error").inc()
            raise
        else:
            self.reconciles.labels("gone" if rec.gone else "ok").inc()
            if rec.gone:
                self._phases.forget((namespace, name))
        finally:
            self.duration.observe(time.perf_counter() - start)

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """The phase a reconcile gave job `namespace/name`."""
        self._phases.set((namespace, name), phase)

    def keep_jobs(self, jobs: Iterable[JobKey]) -> None:
        """Forget every job not in `jobs` (what a resync listed)."""
        self._phases.keep(jobs)
