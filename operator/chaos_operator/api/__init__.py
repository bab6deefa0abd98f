"""The Chaos API (`chaos.training.dev/v1alpha1`): pydantic models of `ChaosJob` and `ChaosPeer`.

The CRDs in `crds/` are generated from these models by `chaos_operator.api.crdgen`
(`chaos crds --out crds`).
"""

from chaos_operator.api.chaosjob import (
    AutoscalingPolicy,
    AutoscalingStatus,
    ChaosJob,
    ChaosJobSpec,
    ChaosJobStatus,
    ResourceRequirements,
)
from chaos_operator.api.chaospeer import ChaosPeer, ChaosPeerSpec, ChaosPeerStatus, PeerPolicy
from chaos_operator.api.durable import CheckpointPolicy, CheckpointRef, ResumeStatus
from chaos_operator.api.meta import API_VERSION, GROUP, VERSION, Condition, ObjectMeta

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AutoscalingPolicy",
    "AutoscalingStatus",
    "ChaosJob",
    "ChaosJobSpec",
    "ChaosJobStatus",
    "ChaosPeer",
    "ChaosPeerSpec",
    "ChaosPeerStatus",
    "CheckpointPolicy",
    "CheckpointRef",
    "Condition",
    "ObjectMeta",
    "PeerPolicy",
    "ResourceRequirements",
    "ResumeStatus",
]
