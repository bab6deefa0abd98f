"""Pick a solver by name."""

from __future__ import annotations

from collections.abc import Callable

from chaos_planner.baselines import solve_equal, solve_proportional, solve_single
from chaos_planner.greedy import solve_greedy
from chaos_planner.milp import solve_milp
from chaos_planner.models import PlanRequest, ShardPlan

SOLVERS: dict[str, Callable[[PlanRequest], ShardPlan]] = {
    "greedy": solve_greedy,
    "milp": solve_milp,
    "single": solve_single,
    "equal": solve_equal,
    "proportional": solve_proportional,
}
"""Every solver by name; `greedy` is exact and fast, `milp` is exact and slow, the rest are
baselines."""


def solve(request: PlanRequest, solver: str = "greedy") -> ShardPlan:
    """The plan `solver` makes for `request`; ValueError for an unknown solver name."""
    try:
        run = SOLVERS[solver]
    except KeyError:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}") from None
    return run(request)
