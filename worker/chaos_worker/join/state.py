"""The full-state copy a `copy` joiner (or a rejoining member) takes: only as vouched for.

With TLS (a `Verifier`) a `StateTransfer` is used only if it is sealed by its sender (a
certificate of the run's CA naming it, `net.signing`), its payload's SHA-256 is the digest
sealed, and its sender is the member the admitting decision names to send it
(`rules.state_source`) for that decision's epoch. Anything else is refused as `forged`
before a byte of it is loaded, and the join goes on waiting for the right one (after its
patience it gives up and asks again). Until the decision is known, states that pass the
seal are held, one per sender and at most `MAX_HELD`. Without TLS the payload is checked
against the digest it came with, and the latest state is taken, as before.
"""

from __future__ import annotations

import hashlib
import logging

from chaos_worker.membership.rules import state_source
from chaos_worker.net.bounds import Reject
from chaos_worker.net.signing import Verifier
from chaos_worker.net.wire import Decision, StateTransfer

log = logging.getLogger(__name__)

MAX_HELD = 4
"""States held from distinct senders while the decision that says whose counts is unknown."""


class StateInbox:
    """The states offered to this member, checked; see the module docstring."""

    def __init__(self, verifier: Verifier | None, reject: Reject) -> None:
        self._verifier = verifier
        self._reject = reject
        self._held: dict[str, tuple[StateTransfer, bytes]] = {}

    def offer(
        self, sender: str, message: StateTransfer, payload: bytes, decision: Decision | None
    ) -> bool:
        """Hold the state `sender` sent unless it is refused (judged by `decision`, the one
        admitting this member, if known); True if held."""
        if self._verifier is None:
            if hashlib.sha256(payload).hexdigest() != message.sha256:
                log.warning("state from %s failed its checksum; ignored", sender)
                return False
        else:
            why = self._forged(sender, message, payload, decision)
            if why is not None:
                self._reject(sender, "forged", f"state of step {message.step}: {why}")
                return False
        if sender not in self._held and len(self._held) >= MAX_HELD:
            self._reject(sender, "unexpected", f"{MAX_HELD} states held already")
            return False
        self._held.pop(sender, None)
        self._held[sender] = (message, payload)
        return True

    def take(self, decision: Decision) -> tuple[StateTransfer, bytes] | None:
        """The state to load for `decision` (None: not arrived yet); held states it
        refuses are counted and dropped, and once one is taken the others are dropped."""
        if self._verifier is None:
            chosen = next(reversed(self._held), None)  # the latest, as before
        else:
            for sender in list(self._held):
                why = self._undue(self._held[sender][0], decision)
                if why is not None:
                    del self._held[sender]
                    self._reject(sender, "forged", f"state for epoch {decision.view.epoch}: {why}")
            chosen = next(iter(self._held), None)
        if chosen is None:
            return None
        taken = self._held[chosen]
        self._held.clear()
        return taken

    def clear(self) -> None:
        self._held.clear()

    def _forged(
        self, sender: str, message: StateTransfer, payload: bytes, decision: Decision | None
    ) -> str | None:
        """Why the state `sender` sent is not its sealed word, or not for `decision`."""
        assert self._verifier is not None
        if message.sender != sender:
            return f"it names {message.sender} as its sender"
        why = self._verifier.check(message)
        if why is not None:
            return why
        if hashlib.sha256(payload).hexdigest() != message.sha256:
            return "its bytes do not match the digest sealed"
        return None if decision is None else self._undue(message, decision)

    @staticmethod
    def _undue(message: StateTransfer, decision: Decision) -> str | None:
        """Why `message` is not the state `decision` says this member takes."""
        source = state_source(decision)
        if message.sender != source:
            return f"{source} sends it, not {message.sender}"
        if message.epoch != decision.view.epoch:
            return f"it is for epoch {message.epoch}, not {decision.view.epoch}"
        return None
