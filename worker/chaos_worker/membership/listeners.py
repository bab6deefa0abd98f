"""What the membership protocol tells the other roles of a member (the trainer, the links,
the join roles): the listeners it calls, and what it passes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from chaos_worker.membership.view import View
from chaos_worker.net.wire import Decision, Proposal

Admitted = Callable[[Decision, View | None, list[str], bool], None]
"""(decision, the view before it, the members it adds, whether to send them the state)."""


@dataclass
class Listeners:
    """What the other roles hear from the protocol: called synchronously, in list order."""

    aborting: list[Callable[[], None]] = field(default_factory=list)
    """An immediate change aborts the step in flight."""
    admitted: list[Admitted] = field(default_factory=list)
    """A planned view is installed (before the links follow it)."""
    installed: list[Callable[[], None]] = field(default_factory=list)
    """A new view is in force, planned or recovered: the links follow it."""
    joining: list[Callable[[Decision], None]] = field(default_factory=list)
    """A decision was taken in while this member holds no view (a newcomer)."""
    rejoin: list[Callable[[], None]] = field(default_factory=list)
    """This member pauses in a minority or was removed: ask to be admitted again."""
    plan_join: Callable[[Proposal, View, set[str]], bool] | None = None
    """As root: plan the join of a newcomer that asked to observe (False: not yet)."""
