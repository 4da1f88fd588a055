"""The residual-stream cache: a layer's output for the packed training sequences, stored on disk once.

A LoRA-SAE step with LoRA only on the layers after the (first) SAE, and an e2e SAE step (model
frozen), both start from the same thing: the residual stream after the SAE's layer ``L``, which no
training changes. `lorasae train-sae` collects exactly these activations to train the SAE; it
writes them here, and `train`, `train-e2e`, `compare` and `sweep` read them instead of running
layers ``0..L`` at every step (``lorasae.splice.start_after``), on every epoch, run and sweep point.

On disk (under ``$LORASAE_HOME/residuals/<key>/``, the key hashing the model's fingerprint, the
layer, the corpus, the context length and the tokenizer):

- ``residuals.npy``: float32 ``[sequences, ctx, d_model]`` in NumPy's ``.npy`` format, read
  memory-mapped (a step reads its rows; nothing else is loaded). Every position is kept, the
  first (BOS) one too. Size: sequences x ctx x d_model x 4 bytes, e.g. 400k tokens of the default
  model (d_model 576): 0.92 GB; 100k tokens: 0.24 GB.
- ``ids.npy``: int32 ``[sequences, ctx]``, the token ids the rows belong to. A request is served
  when its sequences are the first rows of the cache (packed sequences of a split are prefixes of
  each other), checked id for id; otherwise the cache is rebuilt for the request.
- ``residuals.json``: model, fingerprint, layer, corpus, ctx, shape, seconds; written last (the
  folder is published atomically, so a killed build leaves no half cache).
- ``final.npy`` + ``final.json`` (optional, for training): the clean model's final hidden states
  (the final norm's output, what the unembedding reads) for the first rows, float32
  ``[rows, ctx, d_model]``, the same size per row as the residuals. The clean model is the
  teacher of both LoRA-SAE and e2e training and never changes, so its next-token distribution is
  one head matmul away: the step no longer runs the teacher's layers. Built from the cached
  residuals (layers after ``L`` only), with the caller's adapter disabled; ``final.json`` last.

Stored in float32, the residuals are the ones the forward computes (up to the last-bit differences
of batch composition), so a cached step gives the same loss as the full one (``tests/test_train_lora``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lorasae.data import tokenizer_key
from lorasae.files import publish_dir, write_json_atomic
from lorasae.models import LoadedModel, final_norm, hidden_size, model_fingerprint
from lorasae.paths import data_dir
from lorasae.splice import residual_at, start_after

log = logging.getLogger("lorasae.training")

RESIDUALS_FILE = "residuals.npy"
IDS_FILE = "ids.npy"
RECORD_FILE = "residuals.json"  # written last: its presence marks a complete cache
FINAL_FILE = "final.npy"
FINAL_RECORD_FILE = "final.json"  # written last: the clean final hidden states are complete
BATCH = 16  # sequences per forward while building


def cache_dir(lm: LoadedModel, layer: int, corpus: str, ctx: int, fingerprint: str | None = None) -> Path:
    """Where the residuals after ``layer`` of ``lm`` on ``corpus`` at ``ctx`` are cached."""
    key = {
        "model": fingerprint or model_fingerprint(lm.model),
        "layer": layer,
        "corpus": corpus,
        "ctx": ctx,
        "tokenizer": tokenizer_key(lm.tokenizer),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return data_dir() / "residuals" / f"L{layer}-ctx{ctx}-{digest}"


def _covers(folder: Path, sequences: torch.Tensor) -> bool:
    """Whether the cache in ``folder`` holds ``sequences`` as its first rows; a cache that cannot
    be read (truncated, half-deleted) does not, and is built again."""
    if not (folder / RECORD_FILE).is_file():
        return False
    try:
        ids = np.load(folder / IDS_FILE, mmap_mode="r")
        residuals = np.load(folder / RESIDUALS_FILE, mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("residual cache %s unreadable (%s): building it again", folder, exc)
        return False
    n = sequences.shape[0]
    return (
        ids.shape[0] >= n
        and ids.shape[1] == sequences.shape[1]
        and residuals.shape[:2] == ids.shape
        and np.array_equal(ids[:n], sequences.numpy())
    )


def _build(
    lm: LoadedModel, layer: int, sequences: torch.Tensor, folder: Path, corpus: str, fingerprint: str
) -> None:
    started = time.time()
    n, ctx = sequences.shape
    shape = (n, ctx, hidden_size(lm.model))
    with publish_dir(folder, overwrite=True) as tmp:
        out = np.lib.format.open_memmap(tmp / RESIDUALS_FILE, mode="w+", dtype=np.float32, shape=shape)
        for start in tqdm(range(0, n, BATCH), desc=f"caching layer-{layer} residuals", unit="batch"):
            ids = sequences[start : start + BATCH].to(lm.device)
            out[start : start + ids.shape[0]] = residual_at(lm.model, layer, ids).float().cpu().numpy()
        out.flush()
        del out
        np.save(tmp / IDS_FILE, sequences.numpy().astype(np.int32))
        record = {
            "model": lm.model_id,
            "model_fingerprint": fingerprint,
            "layer": layer,
            "corpus": corpus,
            "ctx": ctx,
            "shape": list(shape),
            "dtype": "float32",
            "bytes": int(np.prod(shape)) * 4,
            "seconds": round(time.time() - started, 1),
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def ensure_residuals(
    lm: LoadedModel,
    layer: int,
    sequences: torch.Tensor,
    corpus: str,
    fingerprint: str | None = None,
    clean_final: bool = False,
) -> Path:
    """The cache folder holding the residuals after ``layer`` for ``sequences`` (``[N, ctx]``), built
    first when no cache covers them; with ``clean_final`` also the clean final hidden states of
    those rows (the caller disables any adapter while this runs). ``fingerprint``: ``lm``'s, when
    the caller has it (LoRA weights do not count)."""
    fingerprint = fingerprint or model_fingerprint(lm.model)
    folder = cache_dir(lm, layer, corpus, sequences.shape[1], fingerprint)
    if not _covers(folder, sequences):
        _build(lm, layer, sequences, folder, corpus, fingerprint)
    if clean_final and _final_rows(folder) < sequences.shape[0]:
        _build_final(lm, layer, sequences, folder)
    return folder


def _final_rows(folder: Path) -> int:
    """Rows of the cached clean final hidden states; 0 when there are none or they cannot be read
    (then they are computed again)."""
    record = folder / FINAL_RECORD_FILE
    if not record.is_file():
        return 0
    try:
        rows = int(json.loads(record.read_text())["rows"])
        final = np.load(folder / FINAL_FILE, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cached final hidden states in %s unreadable (%s): computing them again", folder, exc)
        return 0
    return rows if final.shape[0] >= rows else 0


@torch.no_grad()
def _build_final(lm: LoadedModel, layer: int, sequences: torch.Tensor, folder: Path) -> None:
    """The clean final hidden states of ``sequences`` (the cache's first rows), from the cached
    residuals: only the layers after ``layer`` run."""
    started = time.time()
    (folder / FINAL_RECORD_FILE).unlink(missing_ok=True)  # incomplete from here until the record
    n, ctx = sequences.shape
    residuals = load_residuals(folder, n)
    tmp = folder / f".{FINAL_FILE}.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(residuals.shape))
    captured: list[torch.Tensor] = []
    handle = final_norm(lm.model).register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        for start in tqdm(range(0, n, BATCH), desc="caching the clean final hidden states", unit="batch"):
            ids = sequences[start : start + BATCH].to(lm.device)
            with start_after(lm.model, layer, residuals[start : start + ids.shape[0]].to(lm.device)):
                lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            out[start : start + ids.shape[0]] = captured.pop().float().cpu().numpy()
    finally:
        handle.remove()
    out.flush()
    del out
    os.replace(tmp, folder / FINAL_FILE)
    record = {"rows": n, "seconds": round(time.time() - started, 1)}
    write_json_atomic(folder / FINAL_RECORD_FILE, record)


def load_clean_final(folder: Path, n: int) -> torch.Tensor:
    """The first ``n`` rows of the cached clean final hidden states, memory-mapped like
    ``load_residuals``."""
    array = np.load(Path(folder) / FINAL_FILE, mmap_mode="c")
    return torch.from_numpy(array[:n])


def load_residuals(folder: Path, n: int) -> torch.Tensor:
    """The first ``n`` cached rows, ``[n, ctx, d_model]`` float32, memory-mapped (copy-on-write:
    nothing is read until indexed, and nothing indexed is written back)."""
    array = np.load(Path(folder) / RESIDUALS_FILE, mmap_mode="c")
    return torch.from_numpy(array[:n])


def cache_seconds(folder: Path) -> float:
    """How long building the cache took (part of what an SAE's training cost)."""
    return float(json.loads((Path(folder) / RECORD_FILE).read_text())["seconds"])
