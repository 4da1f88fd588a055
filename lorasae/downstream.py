"""A small zero-shot multiple-choice check: does an adapter (merged or not) hurt the model itself?

Task ``heldout-continuation-4way`` (built here, deterministic, no download): from the held-out
split of the corpus, each item is a ``context_tokens``-token passage and four candidate
continuations of ``choice_tokens`` tokens: the true one and three taken from elsewhere in the
held-out text. The model picks the candidate with the highest total log-probability given the
context (all candidates have the same number of tokens). Chance is 25%. It is the same kind of
test as LAMBADA / HellaSwag-style continuation choice, on text the model and the adapter never
trained on.

Users with real benchmark data can pass a JSONL file instead: one item per line,
``{"context": str, "choices": [str, ...], "label": int}`` (e.g. HellaSwag or ARC exported by
lm-eval-harness); then candidates are scored by their summed log-probability as above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorasae.data import token_stream
from lorasae.errors import LorasaeError

TASK_NAME = "heldout-continuation-4way"


@dataclass(frozen=True)
class McItem:
    context: list[int]
    choices: list[list[int]]
    label: int


def continuation_items(
    tokenizer,
    n_items: int = 300,
    context_tokens: int = 48,
    choice_tokens: int = 12,
    corpus: str | None = None,
    seed: int = 0,
) -> list[McItem]:
    """``n_items`` items of the ``heldout-continuation-4way`` task (see the module docstring)."""
    if n_items < 4:
        raise LorasaeError("the continuation task needs at least 4 items (distractors come from the others)")
    span = context_tokens + choice_tokens
    stream = token_stream(tokenizer, "heldout", None, corpus)
    eos = tokenizer.eos_token_id
    starts = list(range(0, stream.numel() - span, span))
    clean = [s for s in starts if eos is None or not bool((stream[s : s + span] == eos).any())]
    if len(clean) < n_items:
        raise LorasaeError(
            f"the held-out split has {len(clean)} EOS-free passages of {span} tokens, "
            f"fewer than the {n_items} items asked for"
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(clean), generator=gen).tolist()
    picked = [clean[i] for i in order[:n_items]]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    items = []
    for i, start in enumerate(picked):
        context = bos + stream[start : start + context_tokens].tolist()
        true = stream[start + context_tokens : start + span].tolist()
        others = [picked[(i + j) % n_items] for j in (1, 2, 3)]
        distractors = [stream[o + context_tokens : o + span].tolist() for o in others]
        label = int(torch.randint(4, (1,), generator=gen))
        choices = distractors[:label] + [true] + distractors[label:]
        items.append(McItem(context, choices, label))
    return items


def jsonl_items(path: str | Path, tokenizer) -> list[McItem]:
    """Items from a JSONL file of ``{"context", "choices", "label"}`` objects."""
    items = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices = [
                tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] for c in row["choices"]
            ]
            item = McItem(
                bos + tokenizer(row["context"], add_special_tokens=False)["input_ids"],
                choices,
                int(row["label"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LorasaeError(f"{path}:{n}: expected {{'context', 'choices', 'label'}}: {exc}") from exc
        if not 0 <= item.label < len(item.choices):
            raise LorasaeError(f"{path}:{n}: label {item.label} out of range")
        items.append(item)
    if not items:
        raise LorasaeError(f"{path} holds no items")
    return items


@torch.no_grad()
def mc_accuracy(model: torch.nn.Module, items: list[McItem], batch_size: int = 16, pad_id: int = 0) -> dict:
    """Accuracy of picking the highest summed log-probability choice; also the mean log-prob margin."""
    device = next(model.parameters()).device
    rows = [
        (i, c, item.context + choice, len(item.context), len(choice))
        for i, item in enumerate(items)
        for c, choice in enumerate(item.choices)
    ]
    scores = [[0.0] * len(item.choices) for item in items]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="multiple choice", leave=False):
            chunk = rows[start : start + batch_size]
            width = max(len(r[2]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for b, row in enumerate(chunk):  # right padding: causal attention never sees it
                ids[b, : len(row[2])] = torch.tensor(row[2])
            logprobs = F.log_softmax(model(input_ids=ids.to(device)).logits.float(), -1)
            for b, (i, c, _seq, n_ctx, n_choice) in enumerate(chunk):
                positions = torch.arange(n_ctx - 1, n_ctx - 1 + n_choice, device=device)
                targets = ids[b, n_ctx : n_ctx + n_choice].to(device)
                scores[i][c] = float(logprobs[b, positions, targets].sum())
    finally:
        model.train(was_training)
    correct = [max(range(len(s)), key=s.__getitem__) == item.label for s, item in zip(scores, items)]
    margins = [
        s[item.label] - max(v for c, v in enumerate(s) if c != item.label) for s, item in zip(scores, items)
    ]
    return {
        "accuracy": sum(correct) / len(items),
        "items": len(items),
        "mean_margin": sum(margins) / len(items),
        "chance": sum(1 / len(item.choices) for item in items) / len(items),
    }
