"""Sessions: where a conversation's previous turn went, so its next turn follows its KV there
before the engines' cache events say so (they come with load reports, every 0.5 s, while an
agent's next call may come sooner), and for engines that publish none.

What is remembered is checked, not trusted: a turn is taken to hold the next one's prefix only if
the next prompt has the previous prompt's last piece hash at the same place, so a session name
reused for another conversation only loses the hint. Bounded in count and time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.controller.prefix_index import GRAIN_TOKENS


@dataclass(frozen=True)
class Turn:
    replica_ids: tuple[str, ...]
    """The instances its prompt went to: the one that prefilled it, the one that decodes it."""
    pieces: int
    """Whole pieces of its prompt."""
    last_hash: int
    """The chained hash of its prompt's last whole piece."""
    expires_s: float


class Sessions:
    """Session id -> its latest turn; at most `max_sessions`, each forgotten `ttl_s` after its
    latest turn."""

    def __init__(self, max_sessions: int = 100_000, ttl_s: float = 1800.0):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._turns: OrderedDict[str, Turn] = OrderedDict()

    def remember(self, session_id: str, prompt_hashes: Sequence[int], replica_ids: Sequence[str], now_s: float) -> None:
        """The session's turn with these prompt hashes went to `replica_ids`."""
        if not session_id or not prompt_hashes:
            return
        self._turns.pop(session_id, None)
        self._turns[session_id] = Turn(tuple(replica_ids), len(prompt_hashes), prompt_hashes[-1], now_s + self.ttl_s)
        while len(self._turns) > self.max_sessions:
            self._turns.popitem(last=False)

    def held(self, session_id: str, prompt_hashes: Sequence[int], now_s: float) -> tuple[tuple[str, ...], int]:
        """The instances the session's previous turn went to and how many leading tokens of this
        prompt they hold from it; ((), 0) when this prompt does not continue that turn's, or the
        session is unknown or expired."""
        turn = self._turns.get(session_id) if session_id else None
        if turn is None:
            return (), 0
        if turn.expires_s < now_s:
            del self._turns[session_id]
            return (), 0
        if len(prompt_hashes) < turn.pieces or prompt_hashes[turn.pieces - 1] != turn.last_hash:
            return (), 0
        return turn.replica_ids, turn.pieces * GRAIN_TOKENS

    def __len__(self) -> int:
        return len(self._turns)
