"""CPU-sized run settings: the defaults of `lorasae demo`, `lorasae compare` and `lorasae sweep`.

The paper's LoRA settings (rank 64, lr 5e-5; ``LoraTrainConfig``'s defaults) suit its 15M-token
budget; a CPU run sees a few hundred thousand tokens, where rank 16 and lr 1e-3 do better (numbers
in README). Such runs are budgeted in optimizer steps of ``LoopConfig``'s 8 sequences x 128 tokens,
so their results are the same on any machine. (The paper's GPU preset is ``compare.PAPER_PRESET``.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .loop import LoopConfig

CPU_RANK = 16
CPU_LR = 2e-3
CPU_SCHEDULE = "cosine"  # warm-up over the first tenth of the steps, then down to lr_end x CPU_LR
DEMO_STEPS = 50
DEMO_EVAL_TOKENS = 8192  # held-out tokens of the demo's before/after table (half `lorasae eval`'s)


def steps_budget(loop: LoopConfig) -> LoopConfig:
    """``loop`` with a token budget of exactly ``max_steps`` optimizer steps."""
    if loop.max_steps is None:
        raise ValueError("a budget in steps needs max_steps")
    return replace(loop, tokens=loop.max_steps * loop.batch_size * loop.ctx)


def cpu_loop(steps: int, **fields: Any) -> LoopConfig:
    """A CPU-sized run: ``steps`` optimizer steps at ``CPU_LR`` with ``CPU_SCHEDULE`` (``fields``
    set the rest)."""
    schedule = {"lr_schedule": CPU_SCHEDULE, "warmup_steps": max(1, steps // 10)}
    return steps_budget(LoopConfig(**{"lr": CPU_LR, "max_steps": steps, **schedule, **fields}))
