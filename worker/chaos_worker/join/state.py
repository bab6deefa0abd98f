"""The full-state copy a `copy` joiner (or a rejoining member) takes: only as vouched for.

With TLS (a `Verifier`) a `StateTransfer` is used only if it is sealed by its sender (a
certificate of the run's CA naming it, `net.signing`), its payload's SHA-256 is the digest
sealed, and its sender is the member the admitting decision names to send it
(`rules.state_source`) for that decision's epoch. Anything else is refused as `forged`
before a byte of it is loaded, and the join goes on waiting for the right one (after its
patience it gives up and asks again). Until the decision is known, states that pass the
seal are held, one per sender and at most `MAX_HELD`. Without TLS the payload is checked
against the digest it came with, and the latest state is taken, as before.

A hostile state source can seal a forged state of its own. So, with TLS, a second member
(`rules.state_witness`) sends a sealed `StateWitness`: the `state_digest` of its own state
at that step, which every member holds alike. A state is handed out only with the
witness's word for the same epoch and step (`vouched`), and the newcomer loads
it and compares before it trains with it (`Newcomer`). Without a second member that
neither joins nor sends, there is no witness: the source's seal is all there is, unless
the quorum is 2 (`WorkerConfig.state_quorum`), which refuses such a decision outright.
"""

from __future__ import annotations

import logging

import numpy as np

from chaos_worker.membership.rules import state_source, state_witness
from chaos_worker.net.bounds import Reject
from chaos_worker.net.receiver import Payload
from chaos_worker.net.signing import Verifier
from chaos_worker.net.wire import Decision, StateTransfer, StateWitness
from chaos_worker.replication.snapshot import fresh_bytes

log = logging.getLogger(__name__)

MAX_HELD = 4
"""States held from distinct senders while the decision that says whose counts is unknown."""


class StateInbox:
    """The states offered to this member, checked; see the module docstring."""

    def __init__(self, verifier: Verifier | None, reject: Reject, quorum: int = 1) -> None:
        self._verifier = verifier
        self._reject = reject
        self._quorum = quorum
        self._held: dict[str, tuple[StateTransfer, Payload | np.ndarray]] = {}
        self._witnesses: dict[str, StateWitness] = {}
        self._placed: tuple[str, StateTransfer, np.ndarray] | None = None
        """The last buffer of this inbox's own a state was read into, not yet handed on."""

    def place(self, sender: str, message: StateTransfer, nbytes: int) -> memoryview | None:
        """A buffer for the payload of the state `sender` sends (a `receiver.Place`): this
        inbox's own, so the state loads in place (the optimizer's moments keep views of
        it) instead of as a copy of a read-only one. Only the last one is remembered: a
        frame cut short, or refused after it was read, leaves none behind."""
        try:
            buffer = fresh_bytes(nbytes)
        except (MemoryError, RuntimeError):  # torch's allocator says RuntimeError
            return None  # the receiver refuses the frame as oversize
        self._placed = (sender, message, buffer)
        return memoryview(buffer)

    def writable(
        self, sender: str, message: StateTransfer, payload: Payload
    ) -> Payload | np.ndarray:
        """The writable buffer of `place` that `payload` (read-only) views, if it is one
        (else `payload`, which a load copies)."""
        if self._placed is None or self._placed[:2] != (sender, message):
            return payload
        buffer, self._placed = self._placed[2], None
        view = np.frombuffer(payload, np.uint8)
        same = view.size == buffer.size and np.shares_memory(view, buffer)
        return buffer if same else payload

    def offer(
        self,
        sender: str,
        message: StateTransfer,
        payload: Payload | np.ndarray,
        digest: str,
        decision: Decision | None,
    ) -> bool:
        """Hold the state `sender` sent unless it is refused (judged by `decision`, the one
        admitting this member, if known); `digest` is the payload's SHA-256 (hex), hashed
        by the caller off the event loop. True if held."""
        if self._verifier is None:
            if digest != message.sha256:
                log.warning("state from %s failed its checksum; ignored", sender)
                return False
        else:
            why = self._forged(sender, message, digest, decision)
            if why is not None:
                self._reject(sender, "forged", f"state of step {message.step}: {why}")
                return False
        if sender not in self._held and len(self._held) >= MAX_HELD:
            self._reject(sender, "unexpected", f"{MAX_HELD} states held already")
            return False
        self._held.pop(sender, None)
        self._held[sender] = (message, payload)
        return True

    def witness(self, sender: str, message: StateWitness) -> bool:
        """Hold a second member's sealed digest of the state (with TLS only); True if held."""
        if self._verifier is None:
            return False
        why = self._verifier.check(message)
        if why is None and message.sender != sender:
            why = f"it names {message.sender} as its sender"
        if why is None and sender not in self._witnesses and len(self._witnesses) >= MAX_HELD:
            self._reject(sender, "unexpected", f"{MAX_HELD} witnesses held already")
            return False
        if why is not None:
            self._reject(sender, "forged", f"witness of step {message.step}: {why}")
            return False
        self._witnesses[sender] = message
        return True

    def take(self, decision: Decision) -> tuple[StateTransfer, Payload | np.ndarray] | None:
        """The state to load for `decision` (None: not arrived yet, or its witness's word
        not yet); held states it refuses are counted and dropped, and once one is taken
        the others are dropped."""
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
        if self._due(decision) is not None and self.vouched(decision, taken[0]) is None:
            return None  # its witness's word has not come
        self._held.clear()
        return taken

    def vouched(self, decision: Decision, state: StateTransfer) -> str | None:
        """The `state_digest` the witness of `decision` sealed for `state`'s step (None:
        no witness is due, or its word has not come)."""
        witness = self._due(decision)
        word = self._witnesses.get(witness) if witness is not None else None
        if word is None or word.epoch != decision.view.epoch or word.step != state.step:
            return None
        return word.state_sha256

    def unvouched(self, decision: Decision) -> str | None:
        """Why no state `decision` admits this member with can be taken at all: with TLS
        and a quorum of 2, a decision whose view has no second member to vouch for the
        state (a single incumbent, or a hostile member's forged view of itself alone)."""
        if self._verifier is None or self._quorum < 2 or state_witness(decision) is not None:
            return None
        return (
            f"decision {decision.id} names no member beside {state_source(decision)} to vouch "
            f"for the state, and the state quorum is {self._quorum}"
        )

    def _due(self, decision: Decision) -> str | None:
        """The member whose witness the state of `decision` waits for (with TLS only)."""
        return state_witness(decision) if self._verifier is not None else None

    def clear(self) -> None:
        self._held.clear()
        self._witnesses.clear()
        self._placed = None

    def _forged(
        self, sender: str, message: StateTransfer, digest: str, decision: Decision | None
    ) -> str | None:
        """Why the state `sender` sent is not its sealed word, or not for `decision`."""
        assert self._verifier is not None
        if message.sender != sender:
            return f"it names {message.sender} as its sender"
        why = self._verifier.check(message)
        if why is not None:
            return why
        if digest != message.sha256:
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
