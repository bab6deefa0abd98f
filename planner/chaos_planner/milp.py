"""The same model as a mixed-integer linear program (PuLP + CBC), one per shard count.

For a fixed K the model is linear: integer `x_u`, binary `y_u` ("u sends something"),
continuous makespan `T`:  min T  s.t.  sum x_u = K,  y_u <= x_u <= min(c_u, K) * y_u,
T >= t_u * y_u + x_u * (L_u + W / (K * B_u)). It cross-checks the greedy; it is much slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pulp

from chaos_planner.chain import search_chain
from chaos_planner.cost import finish_time, shard_seconds
from chaos_planner.errors import PlanningError
from chaos_planner.models import PlanRequest, ShardPlan, Source


def cbc() -> pulp.LpSolver:
    """CBC, silent and asked for a proven optimum: no gap, and solutions that improve by
    only 1e-9 (CBC's default is 1e-5) or differ from integers by 1e-9 still count.

    A CBC on PATH if there is one, else the binary bundled with PuLP (whose wrapper PuLP 3.3
    deprecates in favour of installing CBC separately).
    """
    options = {
        "msg": False,
        "gapRel": 0,
        "gapAbs": 0,
        "options": ["increment 1e-9", "integerT 1e-9"],
    }
    installed = pulp.COIN_CMD(**options)
    if installed.available():
        return installed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**options)


def milp_assignment(sources: Sequence[Source], state_bytes: int, shards: int) -> dict[str, int]:
    """Shards per source id (sources with none omitted) from CBC's optimum for `shards`.

    Times are divided by the earliest time any shard can arrive (a lower bound on the
    makespan), so the optimum is at least 1 whatever the units and CBC's absolute
    tolerances stay small relative to it.
    """
    able = [(i, s) for i, s in enumerate(sources) if s.shard_limit(shards)]
    if sum(s.shard_limit(shards) for _, s in able) < shards:
        raise PlanningError(f"sources[*].max_shards: the caps cannot hold {shards} shards")
    scale = min(finish_time(s, 1, state_bytes, shards) for _, s in able)
    problem = pulp.LpProblem("chaos_shards", pulp.LpMinimize)
    makespan = problem.add_variable("makespan", lowBound=0)
    counts: dict[str, pulp.LpVariable] = {}
    for index, source in able:
        limit = source.shard_limit(shards)
        count = problem.add_variable(f"x_{index}", lowBound=0, upBound=limit, cat=pulp.LpInteger)
        used = problem.add_variable(f"y_{index}", cat=pulp.LpBinary)
        problem += count <= limit * used
        problem += count >= used
        cost = shard_seconds(source, state_bytes, shards) / scale
        problem += makespan >= (source.ready_s / scale) * used + cost * count
        counts[source.id] = count
    problem += pulp.lpSum(counts.values()) == shards
    problem.setObjective(makespan)
    status = problem.solve(cbc())
    if status != pulp.LpStatusOptimal:
        raise PlanningError(
            f"sources: CBC found no optimum for {shards} shards ({pulp.LpStatus[status]})"
        )
    assignment = {source_id: round(count.value()) for source_id, count in counts.items()}
    return {source_id: count for source_id, count in assignment.items() if count > 0}


def solve_milp(request: PlanRequest) -> ShardPlan:
    """The MILP optimum for every K of the chain; the smallest makespan wins, ties to smaller K."""
    return search_chain(
        request,
        "milp",
        lambda shards, _bound: milp_assignment(request.sources, request.state_bytes, shards),
    )
