"""
Plain counters for the hot path: integers and a bucketed histogram that
cost an addition (or a bisect) per batch, read by :mod:`sockdrawer.metrics`
only when Prometheus scrapes.  Standard library only.
"""

from __future__ import annotations

from bisect import bisect_left

#: histogram bucket bounds for durations, in seconds (Prometheus' ``le``)
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """
    Counts of observed values per bucket (not cumulative), their sum and
    count.

    :param bounds: the upper bounds of the buckets, ascending; values above
        the last fall into the ``+Inf`` bucket.
    """

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ending with ``+Inf``."""
        running = 0
        buckets = []
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets
