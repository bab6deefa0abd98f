"""The one error the planner raises for inputs that admit no plan."""


class PlanningError(ValueError):
    """No plan exists for the input; the message starts with the offending field."""
