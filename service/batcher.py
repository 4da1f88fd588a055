"""Micro-batching: rows from concurrent requests are gathered into one forward.

Each input sequence is one queued row. The batcher takes the oldest row, waits at most
``max_wait_ms`` from that row's arrival for more rows that can share its forward (same spliced SAEs;
adapters may differ: peft mixes them per row), up to ``max_batch`` rows, ``max_batch_tokens``
padded tokens and ``max_loaded_adapters`` distinct adapters (the most the model holds at once:
rows past it wait for the next batch), and runs the batch on the engine thread. Queued rows pin their
adapters, so loading another batch's adapters evicts them last (``residency``). While a batch
runs the next one gathers. The queue is bounded in rows: past ``max_queue`` a request is refused
at once (429 + Retry-After), so memory never grows without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from .engine import Engine, Row, RowOutput
from .errors import ServiceError
from .metrics import Metrics

log = logging.getLogger("lorasae.service")


@dataclass
class _Item:
    row: Row
    future: asyncio.Future[RowOutput]
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queue: int,
        retry_after_s: int = 1,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None  # made by start(), with the task
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run(self._wakeup), name="lorasae-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(ServiceError(503, "shutting_down", "the server is stopping"))

    async def submit(self, rows: list[Row]) -> list[RowOutput]:
        """Queue ``rows`` (all or none) and wait for their results, in order."""
        wakeup = self._wakeup
        if self._task is None or wakeup is None:  # start() sets both, stop() clears the task
            raise ServiceError(
                503, "not_ready", "the batcher is not running", {"Retry-After": str(self.retry_after_s)}
            )
        if len(rows) > self.max_queue:  # would never fit: retrying (429) cannot help
            raise ServiceError(
                413,
                "too_many_inputs",
                f"{len(rows)} inputs in one request; the queue holds at most {self.max_queue} sequences",
            )
        if len(self._pending) + len(rows) > self.max_queue:
            if self.metrics:
                self.metrics.rejected.inc()
            raise ServiceError(
                429,
                "queue_full",
                f"the server is at capacity ({len(self._pending)} sequences queued, limit "
                f"{self.max_queue}); retry after {self.retry_after_s} s",
                {"Retry-After": str(self.retry_after_s)},
            )
        loop = asyncio.get_running_loop()
        items = [_Item(row, loop.create_future()) for row in rows]
        adapters = [row.adapter for row in rows]
        self.engine.residency.pin(adapters)
        self._pending.extend(items)
        self._set_depth()
        wakeup.set()
        try:
            results = await asyncio.gather(*(item.future for item in items))
        except BaseException:
            for item in items:
                item.future.cancel()
            raise
        finally:
            self.engine.residency.unpin(adapters)
        return list(results)

    # ------------------------------------------------------------ loop

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))

    def _fits(self, batch: list[_Item], item: _Item, width: int, adapters: set[str]) -> bool:
        if len(batch) >= self.max_batch:
            return False
        adapter = item.row.adapter
        if adapter is not None and adapter not in adapters and len(adapters) >= self.engine.residency.max_hot:
            return False
        new_width = max(width, len(item.row.ids))
        return (len(batch) + 1) * new_width <= self.max_batch_tokens

    def _take(self) -> list[_Item]:
        """The oldest live row plus every queued row that can share its forward, FIFO."""
        while self._pending and self._pending[0].future.done():  # cancelled by its client
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        batch, width = [first], len(first.row.ids)
        adapters: set[str] = set() if first.row.adapter is None else {first.row.adapter}
        keep: deque[_Item] = deque()
        while self._pending:
            item = self._pending.popleft()
            if item.future.done():
                continue
            if item.row.key == first.row.key and self._fits(batch, item, width, adapters):
                batch.append(item)
                width = max(width, len(item.row.ids))
                if item.row.adapter is not None:
                    adapters.add(item.row.adapter)
            else:
                keep.append(item)
        self._pending = keep
        self._set_depth()
        return batch

    def _ready_count(self) -> int:
        """How many queued rows could join a batch with the oldest one."""
        key = self._pending[0].row.key
        return sum(1 for item in self._pending if item.row.key == key)

    async def _run(self, wakeup: asyncio.Event) -> None:
        while True:
            if not self._pending:
                wakeup.clear()
                await wakeup.wait()
                continue
            deadline = self._pending[0].enqueued + self.max_wait
            while self._ready_count() < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except TimeoutError:
                    break
                if not self._pending:
                    break
            batch = self._take()
            if not batch:
                continue
            await self._execute(batch)

    async def _execute(self, batch: list[_Item]) -> None:
        rows = [item.row for item in batch]
        started = time.perf_counter()
        try:
            results = await self.engine.call(self.engine.run_batch, rows)
        except ServiceError as exc:
            results = [exc] * len(batch)
        except Exception as exc:
            log.exception("batch of %d rows failed", len(batch))
            results = [ServiceError(500, "internal_error", f"forward failed: {type(exc).__name__}")] * len(
                batch
            )
        if self.metrics:
            self.metrics.observe_batch(
                len(rows), sum(len(r.ids) for r in rows), time.perf_counter() - started
            )
        for item, result in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
