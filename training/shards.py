"""Corpus-scale jobs in checkpointed shards (``lorasae dashboards``, ``lorasae drift``).

A job reads packed sequences in shards of ``shard_sequences``; each pass saves a shard's result as
``<out>/.work/<pass>-<shard>.pt`` when it is done, so an interrupted run resumes (``--resume``) where
it stopped, and the processes of ``accelerate launch`` take shards round-robin. The job's settings
are saved in ``.work/config.json``: a resume with other settings is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from lorasae.errors import LorasaeError
from lorasae.files import write_atomic, write_json_atomic

WORK_DIR = ".work"
CONFIG_FILE = "config.json"


def check_out(out: Path, finished: str, what: str, settings: dict[str, Any], resume: bool) -> Path:
    """The work folder of a run in ``out``, refusing a finished one (``finished`` exists), a
    non-empty one without ``resume`` and a resume with other ``settings``. Writes nothing."""
    work = out / WORK_DIR
    if (out / finished).exists():
        raise LorasaeError(f"{out} already holds {what}; choose another --out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise LorasaeError(f"{out} is not empty; pass --resume to continue an interrupted run")
    saved = work / CONFIG_FILE
    old = json.loads(saved.read_text()) if resume and saved.exists() else settings
    changed = sorted(k for k, v in settings.items() if old.get(k) != v)
    if changed:
        raise LorasaeError(f"--resume with different settings: {changed}")
    return work


def save_settings(work: Path, settings: dict[str, Any]) -> None:
    write_json_atomic(work / CONFIG_FILE, settings)


@dataclass
class Batch:
    ids: torch.Tensor  # [B, ctx]
    sequence: torch.Tensor  # [B] index of each sequence
    index: torch.Tensor  # [B, ctx] global token index (sequence * ctx + position)
    valid: torch.Tensor  # [B, ctx] tokens that count


class Mergeable(Protocol):
    def merge(self, other: Any) -> None: ...


M = TypeVar("M", bound=Mergeable)


@dataclass
class ShardedJob:
    """Shard bookkeeping of one process: which shards exist, which are its own and not done yet."""

    sequences: torch.Tensor  # [S, ctx]
    shard_sequences: int
    work: Path
    rank: int
    processes: int

    @property
    def shards(self) -> range:
        return range(-(-self.sequences.shape[0] // self.shard_sequences))

    def shard_rows(self, shard: int) -> range:
        n = self.shard_sequences
        return range(shard * n, min((shard + 1) * n, self.sequences.shape[0]))

    def mine(self, prefix: str) -> list[int]:
        """This process's shards of pass ``prefix`` that are not done yet."""
        return [
            s for s in self.shards[self.rank :: self.processes] if not self.shard_file(prefix, s).exists()
        ]

    def shard_file(self, prefix: str, shard: int) -> Path:
        return self.work / f"{prefix}-{shard:05d}.pt"

    def bar(self, total: int, desc: str, unit: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=self.rank != 0, smoothing=0.1)

    def batches(self, shard: int, batch_size: int) -> Iterator[Batch]:
        """The shard's sequences in batches, with their global token indices and which tokens count
        (not position 0, BOS: excluded, as in training and evaluation)."""
        rows = self.shard_rows(shard)
        ctx = self.sequences.shape[1]
        for first in range(rows.start, rows.stop, batch_size):
            ids = self.sequences[first : min(first + batch_size, rows.stop)]
            seq = torch.arange(first, first + ids.shape[0])
            valid = torch.ones_like(ids, dtype=torch.bool)
            valid[:, 0] = False
            yield Batch(ids, seq, seq[:, None] * ctx + torch.arange(ctx), valid)

    def save(self, prefix: str, shard: int, result: Any) -> None:
        """A shard's result, written atomically: its file exists only once it is whole."""
        write_atomic(self.shard_file(prefix, shard), partial(torch.save, result))

    def merged(self, prefix: str, load: Callable[[Any], M]) -> dict[int, M]:
        """The per-layer states of every shard of pass ``prefix`` (``{layer: state}`` per file),
        read with ``load`` and merged in shard order: the same result in every process."""
        merged: dict[int, M] = {}
        for shard in self.shards:
            for layer, state in torch.load(self.shard_file(prefix, shard)).items():
                part = load(state)
                if layer in merged:
                    merged[layer].merge(part)
                else:
                    merged[layer] = part
        return merged
