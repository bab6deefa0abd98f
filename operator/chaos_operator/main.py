"""`run_operator(settings)`: the operator's composition root (what `chaos operator` runs).

Kubernetes configuration (in-cluster, else kubeconfig) → one `ApiClient` → `KubePods`, the
`Autoscaler`, with worker TLS the `WorkerIdentities`, and the metrics server → the
`JobController` → with an identity, the `FederationService` → `kopf.operator` (standalone,
no peering) with `handlers.registry`.

Worker TLS (`Options.worker_tls`, off with `--insecure-workers`) holds for a federating
operator (`identity`) too: its worker CA is made for its party, sent to the peers over the
federation sync, and the peers' CAs come back and are cross-certified into the pods' trust
bundles (docs/operator.md, "Worker identities"; docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

import kopf
from kubernetes import client, config

from chaos_operator.autoscaler import PROMETHEUS_QUERY, Autoscaler
from chaos_operator.controller import Context, JobController
from chaos_operator.federation.identity import Identity
from chaos_operator.federation.service import FederationService
from chaos_operator.handlers import registry
from chaos_operator.identities import WorkerIdentities
from chaos_operator.kube import KubePods
from chaos_operator.pods import Options

log = logging.getLogger("chaos_operator")


class StartupError(Exception):
    """The operator cannot start; `setting` names the `Settings` field at fault, if one is."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Settings:
    """How one operator runs (the `chaos operator` options)."""

    namespaces: tuple[str, ...] = ()
    """Watched namespaces; empty: every namespace."""
    options: Options = field(default_factory=Options)
    """Pod addressing, training length, worker TLS; the identity's party is set by
    `run_operator`."""
    resync_s: float = 10.0
    liveness: str | None = "http://0.0.0.0:8080/healthz"
    """kopf's liveness endpoint; None: none."""
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8081
    """The operator's Prometheus metrics; 0: off."""
    prometheus_url: str | None = None
    prometheus_query: str = PROMETHEUS_QUERY
    identity: Identity | None = None
    federation_listen: tuple[str, int] | None = None
    """Where the federation API listens (with `identity`); None: no federation."""
    federation_interval_s: float = 3.0
    verbose: bool = False


def load_kube_config() -> None:
    """The in-cluster service account, else KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise StartupError(f"no Kubernetes configuration: {exc}") from None


def run_operator(settings: Settings) -> None:
    """Run the operator until it is stopped (StartupError if it cannot start)."""
    kopf.configure(verbose=settings.verbose)  # logging of kopf and of the handlers
    load_kube_config()
    api = client.ApiClient()
    identity = settings.identity
    options = replace(settings.options, party=identity.party if identity else None)
    ctx = Context(
        options=options,
        resync_s=settings.resync_s,
        autoscaler=Autoscaler(
            api, prometheus_url=settings.prometheus_url, prometheus_query=settings.prometheus_query
        ),
        identities=(
            WorkerIdentities(client.CoreV1Api(api), party=options.party)
            if options.worker_tls
            else None
        ),
    )
    controller = JobController(ctx, KubePods(api, settings.namespaces))
    if settings.metrics_port:
        host, port = settings.metrics_host, settings.metrics_port
        try:
            ctx.metrics.serve(host, port)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}", "metrics_port"
            ) from None
    asyncio.run(_operate(settings, api, controller))


async def _operate(settings: Settings, api: client.ApiClient, controller: JobController) -> None:
    ctx = controller.ctx
    if settings.identity and settings.federation_listen:
        ctx.federation = FederationService(
            settings.identity,
            api,
            listen=settings.federation_listen,
            namespaces=settings.namespaces,
            interval_s=settings.federation_interval_s,
            on_change=controller.sync_later,
        )
        if ctx.identities is not None:  # worker CAs travel with the sync, both ways
            ctx.federation.worker_ca = ctx.identities.ca_pem
            ctx.identities.trust = ctx.federation.worker_trust
        try:
            await ctx.federation.start()
        except OSError as exc:
            raise StartupError(f"cannot listen: {exc.strerror}", "federation_listen") from None
    try:
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=settings.liveness,
            memo=kopf.Memo(controller=controller),
        )
    finally:
        if ctx.federation:
            await ctx.federation.stop()
