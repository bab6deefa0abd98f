"""Chaos planner: pure functions for shard plans, aggregation trees, switch steps and scaling.

No torch, no network, no files, no clocks: every function here is deterministic. This package
exports what the other parts use; the solvers' building blocks stay in their modules
(`baselines`, `chain`, `cost`, `greedy`, `milp`).
"""

from chaos_planner.autoscale import AutoscaleInput, Observation, ScaleDecision, decide
from chaos_planner.errors import PlanningError
from chaos_planner.models import PlanRequest, ShardPlan, Source
from chaos_planner.solve import SOLVERS, solve
from chaos_planner.switch import switch_step
from chaos_planner.tree import Tree, connected_components, maximum_spanning_tree, repair_tree

__all__ = [
    "SOLVERS",
    "AutoscaleInput",
    "Observation",
    "PlanRequest",
    "PlanningError",
    "ScaleDecision",
    "ShardPlan",
    "Source",
    "Tree",
    "connected_components",
    "decide",
    "maximum_spanning_tree",
    "repair_tree",
    "solve",
    "switch_step",
]
