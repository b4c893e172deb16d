"""`window`: the first `n_sink` tokens and the most recent ones, at decode (StreamingLLM, arXiv 2309.17453, §3.2: the
attention sinks plus a rolling window of recent tokens). The baseline every query-aware policy is compared with at
equal budget: it reads `budget` tokens whatever the query.

Positions stay the true ones (the cache holds keys rotated at their positions); StreamingLLM's cache-relative
re-positioning is not applied, so this is its attention pattern, not its position shift.
"""

import dataclasses

from effarch.layers.kv_policies.base import KVPolicy, PolicyError, sink_recent


@dataclasses.dataclass(frozen=True)
class WindowPolicy(KVPolicy):
    """Sinks [0, n_sink) and the last budget − n_sink tokens (the current one included), for all heads."""

    NAME = "window"
    n_sink: int = 4  # StreamingLLM's 4 initial tokens

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.n_sink < self.budget:
            raise PolicyError(f"kv policy window: n_sink must be in [0, budget={self.budget}), got {self.n_sink}")

    def select(self, state, q, k_cache, length):
        return [sink_recent(q.shape[0], self.n_sink, self.budget - self.n_sink, length)], state
