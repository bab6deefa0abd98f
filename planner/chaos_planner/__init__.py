"""Chaos planner: pure functions for shard plans, aggregation trees, switch steps and scaling.

No torch, no network, no files, no clocks: every function here is deterministic.
"""

from chaos_planner.autoscale import AutoscaleInput, Observation, ScaleDecision, decide
from chaos_planner.baselines import (
    apportion,
    single_assignment,
    solve_equal,
    solve_proportional,
    solve_single,
)
from chaos_planner.chain import feasible_shard_counts, search_chain
from chaos_planner.cost import finish_time, makespan, shard_seconds
from chaos_planner.errors import PlanningError
from chaos_planner.greedy import greedy_assignment, solve_greedy
from chaos_planner.milp import milp_assignment, solve_milp
from chaos_planner.models import DEFAULT_SHARD_COUNTS, MAX_SHARDS, PlanRequest, ShardPlan, Source
from chaos_planner.solve import SOLVERS, solve
from chaos_planner.switch import switch_step
from chaos_planner.tree import (
    Tree,
    connected_components,
    maximum_spanning_tree,
    repair_tree,
)

__all__ = [
    "DEFAULT_SHARD_COUNTS",
    "MAX_SHARDS",
    "SOLVERS",
    "AutoscaleInput",
    "Observation",
    "PlanRequest",
    "PlanningError",
    "ScaleDecision",
    "ShardPlan",
    "Source",
    "Tree",
    "apportion",
    "connected_components",
    "decide",
    "feasible_shard_counts",
    "finish_time",
    "greedy_assignment",
    "makespan",
    "maximum_spanning_tree",
    "milp_assignment",
    "repair_tree",
    "search_chain",
    "shard_seconds",
    "single_assignment",
    "solve",
    "solve_equal",
    "solve_greedy",
    "solve_milp",
    "solve_proportional",
    "solve_single",
    "switch_step",
]
