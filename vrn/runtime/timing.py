"""Per-stage wall-clock timing, the same way for every stage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StageTimer:
    """Accumulates milliseconds per named stage for one frame.

    >>> timer = StageTimer()
    >>> with timer("detect"):
    ...     pass
    >>> sorted(timer.ms)
    ['detect']
    """

    def __init__(self):
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str, sync=None) -> Iterator[None]:
        """Time the block; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before both
        clock reads so asynchronous device work is counted in its own stage."""
        if sync is not None:
            sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync is not None:
                sync()
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - start) * 1e3

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())
