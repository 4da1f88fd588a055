"""Where each registered adapter lives: in the model (hot), in host memory (CPU tier), or on disk.

Registered is not loaded. At most ``max_hot`` adapters are in the peft model at once; an adapter
evicted from it keeps its weights in host memory while the CPU tier (``max_cpu``) has room, and
is read from its folder again otherwise (like vLLM's ``max_loras`` / ``max_cpu_loras``). Both
tiers are least-recently-used: a forward touches its adapters.

Eviction never takes an adapter of the batch being loaded for; adapters pinned by queued rows or
running generations (``pin``/``unpin``, counted) go only when every other hot adapter is gone, so
a queue that needs more adapters than fit still makes progress instead of waiting for a slot that
never frees. This module holds the bookkeeping only (plain Python, no torch): ``Engine`` moves the
weights and calls it on its thread; pins come from the event loop, hence the lock.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")  # what the CPU tier holds per adapter (the engine's ValidatedAdapter)


@dataclass
class ResidencyStats:
    """Counters since start: adapter uses that found it in the model (hits), loads from each
    tier and the seconds they took, and evictions from the model."""

    hits: int = 0
    loads: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "disk": 0})
    load_seconds: dict[str, float] = field(default_factory=lambda: {"cpu": 0.0, "disk": 0.0})
    evicted: int = 0
    dropped_from_cpu: int = 0


class Residency(Generic[T]):
    def __init__(self, max_hot: int, max_cpu: int = 0) -> None:
        if max_hot < 1 or max_cpu < 0:
            raise ValueError("max_hot >= 1 and max_cpu >= 0")
        self.max_hot = max_hot
        self.max_cpu = max_cpu
        self.hot: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.cpu: OrderedDict[str, T] = OrderedDict()
        self.stats = ResidencyStats()
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ pins (event loop)

    def pin(self, names: Iterable[str | None]) -> None:
        with self._lock:
            self._pins.update(n for n in names if n is not None)

    def unpin(self, names: Iterable[str | None]) -> None:
        with self._lock:
            self._pins.subtract(n for n in names if n is not None)
            for name in [n for n, count in self._pins.items() if count <= 0]:
                del self._pins[name]

    def pinned(self) -> set[str]:
        with self._lock:
            return set(self._pins)

    # ------------------------------------------------------------ tiers (engine thread)

    def touch(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self.hot:
                self.hot.move_to_end(name)

    def victims(self, needed: Collection[str]) -> list[str]:
        """Hot adapters to evict, in order, so that every adapter of ``needed`` fits: unpinned ones
        least recently used first, then pinned ones; never one of ``needed``."""
        if len(needed) > self.max_hot:
            raise ValueError(f"{len(needed)} adapters in one forward; at most {self.max_hot} fit")
        missing = [n for n in needed if n not in self.hot]
        excess = len(self.hot) + len(missing) - self.max_hot
        if excess <= 0:
            return []
        pinned = self.pinned()
        candidates = [n for n in self.hot if n not in needed]
        order = [n for n in candidates if n not in pinned] + [n for n in candidates if n in pinned]
        return order[:excess]

    def keep_in_cpu(self, name: str, adapter: T) -> list[str]:
        """Put an evicted (or registered, not loaded) adapter into the CPU tier; returns the names
        that fell out of it to disk (least recently used first)."""
        if self.max_cpu == 0:
            return []
        self.cpu[name] = adapter
        self.cpu.move_to_end(name)
        dropped = []
        while len(self.cpu) > self.max_cpu:
            dropped.append(self.cpu.popitem(last=False)[0])
        self.stats.dropped_from_cpu += len(dropped)
        return dropped

    def forget(self, name: str) -> None:
        self.hot.pop(name, None)
        self.cpu.pop(name, None)

    def where(self, name: str) -> str:
        """``hot``, ``cpu`` or ``disk``."""
        return "hot" if name in self.hot else "cpu" if name in self.cpu else "disk"

    def snapshot(self) -> dict:
        """The tiers and counters, for ``/readyz``-style reporting and tests."""
        return {
            "max_loaded_adapters": self.max_hot,
            "max_cpu_adapters": self.max_cpu,
            "hot": list(self.hot),
            "cpu": list(self.cpu),
            "pinned": sorted(self.pinned()),
            "hits": self.stats.hits,
            "loads": dict(self.stats.loads),
            "load_seconds": {k: round(v, 4) for k, v in self.stats.load_seconds.items()},
            "evicted": self.stats.evicted,
            "dropped_from_cpu": self.stats.dropped_from_cpu,
        }
