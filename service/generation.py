"""Generations on the server: admission, and the step loop that shares the engine thread.

A generation holds one of ``max_generations`` slots while it runs; up to ``max_generation_queue``
more wait for one, and past that a request is refused at once (429 + Retry-After). Each step of a
generation (``lorasae.steering.BatchGeneration.advance``: one forward of the request's rows) is a
separate job on the engine thread, so feature batches and other generations run between two steps
of a long generation instead of waiting for its end. A generation is cancelled at its next step
when its client goes away (a closed stream): its slot is freed and its state dropped.

``run`` turns the steps into events: a ``token`` event per generated token (with its top latents
when asked: those come with the next forward, so then each token is announced one step later) and
the final answer. Stop strings are matched on the decoded text of each generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from lorasae.steering import BatchGeneration, RowSpec, StepOutput

from .engine import Engine
from .errors import ServiceError
from .metrics import Metrics


@dataclass
class Reported:
    """One generation of the answer: row ``row`` of the batch, continuing prompt ``prompt``."""

    row: int
    prompt: int
    variant: str
    adapter: str | None
    steered: bool
    prompt_tokens: int
    control: int | None = None  # compare: the follower row its KL is measured against
    tokens: list[dict[str, Any]] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    text: str = ""
    cut: bool = False  # ended at a stop string


@dataclass
class Plan:
    """What the route built: the batch's rows, the generations reported, the checks per step."""

    rows: list[RowSpec]
    layers: tuple[int, ...]  # SAEs spliced
    reported: list[Reported]
    max_new_tokens: int
    stop: list[str]
    features_k: int | None
    preserve_error: bool
    check: Callable[[], None]  # raises ServiceError when an adapter went away (engine thread)

    @property
    def stop_window(self) -> int:
        """Last tokens decoded to look for a stop string completed by the newest token: every
        token is at least one character, so a stop string of L characters lies in the last L
        tokens; the margin keeps the window's own first token (whose leading space a tokenizer
        may drop when decoding it alone) far from it. Decoding the whole text at every step
        would cost quadratic time in the tokens generated."""
        return 4 * max(map(len, self.stop), default=0) + 16


class Generations:
    def __init__(
        self,
        engine: Engine,
        *,
        max_active: int,
        max_waiting: int,
        retry_after_s: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_active)
        self.active = 0
        self.waiting = 0
        self.closing = False

    def admit(self) -> None:
        """429 when every slot is taken and the queue is full."""
        if self._slots.locked() and self.waiting >= self.max_waiting:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise ServiceError(
                429,
                "generation_queue_full",
                f"{self.active} generations running and {self.waiting} waiting; retry shortly",
                headers={"Retry-After": str(self.retry_after_s)},
            )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a generation slot, waiting for one (``admit`` first)."""
        self.admit()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self._gauge()
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.generations.set(self.active)

    def close(self) -> None:
        """The server is stopping: running generations end at their next step (503)."""
        self.closing = True

    async def run(
        self, plan: Plan, gone: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events of one generation (call inside ``slot``): ``("token", TokenEvent)`` and last
        ``("done", the answer's generations and usage)``. ``gone``: whether the client left (checked
        before every step; then the generation stops, as a closed stream stops it)."""
        engine = self.engine
        started = time.monotonic()
        adapters = {row.adapter for row in plan.rows}
        engine.residency.pin(adapters)  # evicted last while the generation runs
        try:
            state = await engine.call(self._start, plan)
            pending: dict[int, dict[str, Any]] = {}  # generation index -> token event awaiting features
            while not state.done:
                if self.closing:
                    raise ServiceError(503, "shutting_down", "the server is stopping")
                if gone is not None and await gone():
                    raise ServiceError(499, "client_closed_request", "the client went away")
                out: StepOutput = await engine.call(self._step, plan, state)
                for event in self._events(plan, state, out, pending):
                    yield "token", event
            if pending:
                finals = await engine.call(self._final, plan, state)
                for g, event in sorted(pending.items()):
                    event["features"] = self._features(finals[plan.reported[g].row])
                    plan.reported[g].tokens[-1]["features"] = event["features"]
                    yield "token", event
            seconds = time.monotonic() - started
            generated = sum(len(r.tokens) for r in plan.reported)
            if self.metrics is not None:
                self.metrics.generated_tokens.inc(generated)
            yield (
                "done",
                {
                    "generations": [self._generation(plan, state, r) for r in plan.reported],
                    "usage": {
                        "prompt_tokens": sum(r.prompt_tokens for r in plan.reported),
                        "generated_tokens": generated,
                        "steps": state.steps,
                        "seconds": round(seconds, 4),
                        "tokens_per_second": round(generated / seconds, 2) if seconds > 0 else 0.0,
                    },
                },
            )
        finally:
            engine.residency.unpin(adapters)

    # ---------------------------------------------------------------- engine thread

    def _ready(self, plan: Plan, state: BatchGeneration | None = None) -> None:
        """Before each forward of a generation: its adapter still registered and in the model (a
        batch in between may have evicted it), and ``state`` pointed at the model as it is now
        (peft wraps the base model's layers when the first adapter loads)."""
        plan.check()
        engine = self.engine
        engine.make_resident({row.adapter for row in plan.rows if row.adapter is not None})
        if state is not None:
            state.model = engine.peft if engine.peft is not None else engine.base
            state.adapter_names = engine.adapter_names if engine.peft is not None else None

    def _start(self, plan: Plan) -> BatchGeneration:
        self._ready(plan)
        engine = self.engine
        model = engine.peft if engine.peft is not None else engine.base
        tok = engine.lm.tokenizer
        eos = tok.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pairs = [(r.row, r.control) for r in plan.reported if r.control is not None]
        return BatchGeneration(
            model,
            [engine.by_layer[layer] for layer in plan.layers],
            plan.rows,
            max_new_tokens=plan.max_new_tokens,
            pad_id=engine.pad,
            eos_ids=eos_ids,
            keep_first=engine.keep_first,
            preserve_error=plan.preserve_error,
            features_k=plan.features_k,
            kl_pairs=pairs,
            adapter_names=engine.adapter_names if engine.peft is not None else None,
        )

    def _step(self, plan: Plan, state: BatchGeneration) -> StepOutput:
        self._ready(plan, state)
        return state.advance()

    def _final(self, plan: Plan, state: BatchGeneration) -> list[dict[int, tuple[list[int], list[float]]]]:
        self._ready(plan, state)
        return state.final_features()

    # ---------------------------------------------------------------- events

    def _features(self, found: dict[int, tuple[list[int], list[float]]]) -> dict[str, list[dict[str, Any]]]:
        names = self.engine.names
        return {
            names[layer]: [{"index": i, "activation": v} for i, v in zip(indices, values) if v != 0.0]
            for layer, (indices, values) in found.items()
        }

    def _events(
        self, plan: Plan, state: BatchGeneration, out: StepOutput, pending: dict[int, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """This step's token events; with features, the previous step's tokens (whose features this
        forward computed) instead of this step's, which wait in ``pending``."""
        events = []
        for g, rep in enumerate(plan.reported):
            if plan.features_k and g in pending:
                event = pending.pop(g)
                event["features"] = self._features(out.features[rep.row])
                rep.tokens[-1]["features"] = event["features"]
                events.append(event)
            token = out.tokens[rep.row]
            if token is None or rep.cut:
                continue
            text = self.engine.piece(token)
            kl = out.kl.get(rep.row)
            rep.tokens.append({"id": token, "text": text})
            if kl is not None:
                rep.kl.append(kl)
            event = {
                "generation": g,
                "prompt": rep.prompt,
                "variant": rep.variant,
                "index": len(rep.tokens) - 1,
                "id": token,
                "text": text,
                "kl": kl,
            }
            generated = state.generated[rep.row]
            if plan.stop and any(s in self.engine.decode(generated[-plan.stop_window :]) for s in plan.stop):
                decoded = self.engine.decode(generated)  # once, to cut at the first stop string
                rep.cut, rep.text = True, decoded[: min(decoded.find(s) for s in plan.stop if s in decoded)]
                state.finish(rep.row, "stop")
            if plan.features_k:
                pending[g] = event
            else:
                events.append(event)
        return events

    def _generation(self, plan: Plan, state: BatchGeneration, rep: Reported) -> dict[str, Any]:
        ids = [t["id"] for t in rep.tokens]
        return {
            "prompt": rep.prompt,
            "variant": rep.variant,
            "adapter": rep.adapter,
            "steered": rep.steered,
            "prompt_tokens": rep.prompt_tokens,
            "text": rep.text if rep.cut else self.engine.decode(ids),
            "tokens": rep.tokens,
            "finish_reason": "stop" if rep.cut else (state.finish_reason[rep.row] or "length"),
            "kl": rep.kl if rep.control is not None else None,
        }
