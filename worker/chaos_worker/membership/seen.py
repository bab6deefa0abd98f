"""Ids of the flooded messages a member has taken in: what stops a flood from looping.

A flooded message is acted on and forwarded on its first arrival only; its id is what
tells a copy coming back over another path. Ids are forgotten by age, oldest first, never
at random, and only once no copy can still be on its way: the membership protocol's by
epoch (`Flooded`), the heartbeats' by arrival time (`SeenIds` tagged with the second).
"""

from __future__ import annotations

from chaos_worker.net.bounds import Reject, Rejections
from chaos_worker.net.wire import Decision, MemberStatus, Proposal

SEEN_LIMIT = 1 << 16
"""Most ids held; past it the oldest go first (the oldest tag's, first taken in first)."""
SEEN_EPOCHS = 16
"""Epochs the membership protocol keeps ids for; messages older are refused as stale."""
WAYS_BACK = frozenset({"join", "link_up"})
"""Proposals that carry the asker's own epoch, however old (a newcomer's is -1)."""


class SeenIds:
    """Ids, each under a tag that orders them by age (an epoch, a second)."""

    def __init__(self, limit: int = SEEN_LIMIT) -> None:
        self._tags: dict[str, int] = {}
        self._ids: dict[int, dict[str, None]] = {}  # tag -> its ids, in arrival order
        self._limit = limit

    def __len__(self) -> int:
        return len(self._tags)

    def add(self, key: str, tag: int) -> bool:
        """Take `key` in under `tag`; False when it was there already (a copy)."""
        if key in self._tags:
            return False
        self._tags[key] = tag
        self._ids.setdefault(tag, {})[key] = None
        if len(self._tags) > self._limit:
            oldest = min(self._ids)
            ids = self._ids[oldest]
            gone = next(iter(ids))
            del ids[gone], self._tags[gone]
            if not ids:
                del self._ids[oldest]
        return True

    def forget_before(self, tag: int) -> None:
        """Forget the ids of every tag older than `tag`."""
        for old in [t for t in self._ids if t < tag]:
            self._forget(old)

    def _forget(self, tag: int) -> None:
        for key in self._ids.pop(tag):
            del self._tags[key]


class Flooded:
    """The membership protocol's flooded messages (proposals, decisions, statuses) taken in.

    An id is kept for `SEEN_EPOCHS` epochs past its message's epoch. A message older than
    that is refused as stale before its id is looked up, so a forgotten id is never taken
    in again. A way back in (a join, a link up) carries the asker's own epoch, which may be
    long gone: it is never stale, and its id is kept by the epoch it arrived in.
    """

    def __init__(self, reject: Reject | None = None) -> None:
        """`reject`: where messages too old to take in are refused (counted)."""
        self._ids = SeenIds()
        self._reject = reject or Rejections()
        self._epoch = -1  # the newest view in force here

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def floor(self) -> int:
        """The oldest epoch whose messages are still taken in."""
        return self._epoch - SEEN_EPOCHS

    def first(self, message: Proposal | Decision | MemberStatus) -> bool:
        """True on the first arrival of `message` (also one this member makes)."""
        epoch = message.view.epoch if isinstance(message, Decision) else message.epoch
        if isinstance(message, Proposal) and message.kind in WAYS_BACK:
            return self._ids.add(message.id, max(epoch, self._epoch))
        if epoch < self.floor:
            detail = f"{message.type} {message.id} of epoch {epoch}, before {self.floor}"
            self._reject(message.origin, "stale", detail)
            return False
        return self._ids.add(message.id, epoch)

    def installed(self, epoch: int) -> None:
        """A view of `epoch` is in force: forget what is now too old to come again."""
        self._epoch = max(self._epoch, epoch)
        self._ids.forget_before(self.floor)
