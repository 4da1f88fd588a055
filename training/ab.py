"""`lorasae ab`: adapters A/B (and base) at dataset scale, per token, with the SAEs spliced.

One forward pass per model and batch over the packed sequences of a corpus split (held-out by
default: text the adapters never trained on), every adapter loaded into one peft model under its
own name and switched with ``set_adapter``:

- ``ce_clean``: adapter disabled, no SAE; ``ce_base``: adapter disabled, SAEs spliced;
  ``ce_<adapter>``: that adapter, SAEs spliced. Next-token CE at every position 0..ctx-2 (position
  0 predicts token 1 from BOS), as ``lorasae eval`` measures it, so the means are its numbers.
- Where each adapter helps / hurts most: the tokens with the largest / most negative
  ``ce_base - ce_<adapter>``, shown with the text before them.
- Latents over-represented there: per SAE, the latents active (activation > 0, base spliced run)
  at those tokens, ranked by enrichment = (fraction of those tokens where the latent is active) /
  (its density over all analysed tokens). Densities come from fired counts accumulated during the
  pass; only the sequences holding the listed tokens are run again for their latents at the end.
  Latents are read at the predicting position; with ``keep_first`` position 0 keeps its clean
  activation (its latents are not used), so it counts for neither side.
- CE gain by token frequency: the predicted tokens bucketed by the rank of their token's
  frequency among the analysed tokens (1 = most frequent).

Per-token memory is a few floats per analysed token; latents are never kept per token.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from lorasae.data import TokenTexts, packed_sequences
from lorasae.errors import LorasaeError
from lorasae.files import write_atomic, write_json_atomic
from lorasae.manifest import AdapterManifest
from lorasae.metrics import eval_mode, next_token_logprobs, token_ce
from lorasae.models import load_model, model_fingerprint
from lorasae.saes import LoadedSAE, resolve_saes, sae_fingerprint
from lorasae.splice import Splice, run_until, stop_after

from .fields import (
    corpus_field,
    ctx_field,
    device_field,
    dtype_field,
    keep_first_field,
    model_field,
    saes_field,
)
from .plots import plot_ab

if TYPE_CHECKING:
    from peft import PeftModel

TOKENS_FILE = "tokens.parquet"
RESULT_FILE = "ab.json"
PLOT_FILE = "ab.png"
TOP_LATENTS = 10  # latents listed per SAE, adapter and direction
MIN_LATENT_COUNT = 2  # a latent is listed only when active at this many of the top tokens
# frequency-rank buckets: (first rank, last rank or None, label)
BUCKETS: tuple[tuple[int, int | None, str], ...] = (
    (1, 10, "1-10"),
    (11, 100, "11-100"),
    (101, 1000, "101-1000"),
    (1001, 10000, "1001-10000"),
    (10001, None, ">10000"),
)
DIRECTIONS = ("helps", "hurts")
RESERVED = {"clean", "base"}  # taken by the ce_clean / ce_base columns


@dataclass
class AbConfig:
    model: str = model_field()
    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "flag": "--adapter",
            "help": "peft adapter folder (a `lorasae train` run); repeat to compare several (at least one)",
        },
    )
    saes: list[str] = saes_field(
        "sae-lens folder or release/sae_id; repeat for several (default: the first adapter's SAEs, "
        "which every adapter must have been trained with; given explicitly, adapters trained with "
        "another set are compared anyway and flagged)"
    )
    corpus: str = corpus_field()
    split: Literal["train", "heldout"] = field(
        default="heldout", metadata={"help": "corpus split to read (held-out: never trained on)"}
    )
    tokens: int = field(default=16_384, metadata={"help": "tokens to read (packed sequences of --ctx)"})
    ctx: int = ctx_field()
    batch_size: int = field(default=8, metadata={"help": "sequences per forward"})
    top: int = field(default=10, metadata={"help": "contexts listed per adapter and direction"})
    window: int = field(default=12, metadata={"help": "tokens of context shown before a listed token"})
    keep_first: bool = keep_first_field()
    device: str | None = device_field()
    dtype: str | None = dtype_field()

    def validate(self) -> None:
        if not self.adapters:
            raise LorasaeError("give at least one --adapter")
        if self.tokens < self.ctx:
            raise LorasaeError("--tokens must be at least --ctx")
        if self.ctx < 2:
            raise LorasaeError("--ctx must be at least 2")
        for name in ("batch_size", "top"):
            if getattr(self, name) < 1:
                raise LorasaeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.window < 0:
            raise LorasaeError("--window must not be negative")


def adapter_names(paths: list[str]) -> list[str]:
    """One peft adapter name per folder: its name (characters other than letters, digits, ``_`` and
    ``-`` replaced by ``_``), made unique with ``-2``, ``-3``...; never ``clean`` or ``base``."""
    names: list[str] = []
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).resolve().name) or "adapter"
        name, n = stem, 1
        while name in names or name in RESERVED:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def _sae_key(sae: LoadedSAE) -> tuple[int, str]:
    return sae.layer, sae_fingerprint(sae.sae)


def _check_adapters(
    manifests: list[AdapterManifest],
    paths: list[str],
    fingerprint: str,
    saes: list[LoadedSAE],
    explicit: bool,
) -> list[bool]:
    """Refuse an adapter for another base model, or (SAEs not given explicitly) one trained with
    another SAE set than the spliced one; per adapter, whether its trained set differs."""
    spliced = {_sae_key(s) for s in saes}
    differs = []
    for manifest, path in zip(manifests, paths):
        if manifest.base_model_fingerprint != fingerprint:
            raise LorasaeError(f"adapter {path} does not match: {manifest.mismatches(fingerprint, saes)[0]}")
        trained = {(e.layer, e.fingerprint) for e in manifest.saes}
        differs.append(trained != spliced)
        if trained != spliced and not explicit:
            layers = sorted(layer for layer, _ in trained)
            raise LorasaeError(
                f"adapter {path} was trained with another SAE set (layers {layers}) than the spliced "
                f"one (layers {sorted(s.layer for s in saes)}); pass --sae to compare under one set anyway"
            )
    return differs


def _load_adapters(model: torch.nn.Module, paths: list[str], names: list[str]) -> PeftModel:
    """Every adapter in one peft model, each under its name (inference only)."""
    from peft import PeftModel

    for path in paths:
        if not (Path(path) / "adapter_config.json").is_file():
            raise LorasaeError(f"no peft adapter (adapter_config.json) in {path}")
    peft_model = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0], is_trainable=False)
    for path, name in zip(paths[1:], names[1:]):
        peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
    peft_model.eval()
    return peft_model


def run_ab(cfg: AbConfig, out: Path) -> dict:
    """Compare the adapters; write ``out`` (tokens.parquet, ab.json, ab.png); the summary."""
    cfg.validate()
    started = time.time()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LorasaeError(f"{out} is not an empty folder; choose another --out")
    manifests = [AdapterManifest.load(path) for path in cfg.adapters]
    names = adapter_names(cfg.adapters)
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    specs = cfg.saes or [entry.id for entry in manifests[0].saes]
    saes = sorted(resolve_saes(lm, specs, cfg.model), key=lambda s: s.layer)
    fingerprint = model_fingerprint(lm.model)
    differs = _check_adapters(manifests, cfg.adapters, fingerprint, saes, explicit=bool(cfg.saes))
    sequences = packed_sequences(lm.tokenizer, cfg.split, cfg.tokens, cfg.ctx, cfg.corpus)
    model = _load_adapters(lm.model, cfg.adapters, names)
    with eval_mode(model):
        ce, fired = _pass(model, saes, sequences, names, cfg)
        tops = {name: _tops(ce["base"], ce[name], cfg.top) for name in names}
        active = _active_latents(model, saes, sequences, tops, cfg.keep_first, cfg.batch_size)
    ranks = frequency_ranks(sequences[:, 1:])
    first = 1 if cfg.keep_first else 0
    counted = sequences.shape[0] * (sequences.shape[1] - 1 - first)  # tokens whose latents count
    texts = TokenTexts(lm.tokenizer)
    adapters = []
    for name, path, manifest, differ in zip(names, cfg.adapters, manifests, differs):
        entry: dict[str, Any] = {
            "name": name,
            "path": str(path),
            "sae_set_differs": differ,
            "trained_saes": [
                {"id": e.id, "layer": e.layer, "fingerprint": e.fingerprint} for e in manifest.saes
            ],
            "ce": _mean(ce[name]),
            "gap_closed": _gap_closed(ce, name),
        }
        entry["top"] = {
            d: [_context(texts, sequences, ce, name, s, p, cfg.window) for s, p in tops[name][d]]
            for d in DIRECTIONS
        }
        entry["latents"] = {
            d: _enriched(saes, fired, counted, active, [(s, p) for s, p in tops[name][d] if p >= first])
            for d in DIRECTIONS
        }
        adapters.append(entry)
    buckets = bucket_table(ce, ranks, names)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokens(out / TOKENS_FILE, sequences, ce, names, ranks)
    plot_ab(buckets, names, out / PLOT_FILE)
    summary = {
        "out": str(out),
        "files": {
            k: str(out / f) for k, f in (("tokens", TOKENS_FILE), ("json", RESULT_FILE), ("plot", PLOT_FILE))
        },
        "model": lm.model_id,
        "model_fingerprint": fingerprint,
        "saes": [{"id": s.sae_id, "layer": s.layer, "fingerprint": sae_fingerprint(s.sae)} for s in saes],
        "corpus": cfg.corpus,
        "split": cfg.split,
        "ctx": cfg.ctx,
        "sequences": int(sequences.shape[0]),
        "tokens": int(ce["base"].numel()),
        "ce": {"clean": _mean(ce["clean"]), "base": _mean(ce["base"])} | {n: _mean(ce[n]) for n in names},
        "adapters": [
            {k: a[k] for k in ("name", "path", "ce", "gap_closed", "sae_set_differs")} for a in adapters
        ],
        "buckets": buckets,
        "seconds": round(time.time() - started, 1),
    }
    write_json_atomic(out / RESULT_FILE, {**summary, "config": asdict(cfg), "adapters": adapters})
    return summary


# ---------------------------------------------------------------------- the pass


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _pass(
    model: PeftModel, saes: list[LoadedSAE], sequences: torch.Tensor, names: list[str], cfg: AbConfig
) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Per-token CE ``[S, ctx-1]`` of clean, base (spliced) and each adapter (spliced); per SAE the
    number of analysed tokens each latent is active at (base spliced run)."""
    n, t = sequences.shape
    ce = {key: torch.zeros(n, t - 1) for key in ("clean", "base", *names)}
    fired = {s.layer: torch.zeros(s.d_sae, dtype=torch.int64) for s in saes}
    first = 1 if cfg.keep_first else 0
    device = _device(model)
    bar = tqdm(total=n * t, desc="ab", unit="tok", smoothing=0.1)
    for start in range(0, n, cfg.batch_size):
        ids = sequences[start : start + cfg.batch_size].to(device)
        rows = slice(start, start + ids.shape[0])
        with model.disable_adapter():
            ce["clean"][rows] = token_ce(next_token_logprobs(model, ids), ids).cpu()
            with Splice(model, saes, cfg.keep_first, record=True) as splice:
                ce["base"][rows] = token_ce(next_token_logprobs(model, ids), ids).cpu()
        for layer, record in splice.records.items():
            fired[layer] += (record.latents[:, first : t - 1] > 0).sum((0, 1)).cpu()
        del splice
        for name in names:
            model.set_adapter(name)
            with Splice(model, saes, cfg.keep_first):
                ce[name][rows] = token_ce(next_token_logprobs(model, ids), ids).cpu()
        bar.update(ids.numel())
    bar.close()
    return ce, fired


def _tops(base: torch.Tensor, adapted: torch.Tensor, top: int) -> dict[str, list[tuple[int, int]]]:
    """(sequence, position) of the ``top`` tokens where ``base - adapted`` is largest (helps, > 0)
    and most negative (hurts, < 0); ties in token order."""
    diff = (base - adapted).flatten()
    width = base.shape[1]
    out = {}
    for direction, sign in (("helps", 1.0), ("hurts", -1.0)):
        order = torch.sort(-sign * diff, stable=True).indices[:top]
        picked = [int(i) for i in order if sign * float(diff[i]) > 0]
        out[direction] = [divmod(i, width) for i in picked]
    return out


def _context(
    texts: TokenTexts,
    sequences: torch.Tensor,
    ce: dict[str, torch.Tensor],
    name: str,
    seq: int,
    pos: int,
    window: int,
) -> dict:
    """A listed token: the prediction at ``pos`` of sequence ``seq`` (the token at ``pos + 1``),
    with the ``window`` tokens before it, each decoded alone, the predicted one marked ``[[...]]``."""
    token_id = int(sequences[seq, pos + 1])
    before = sequences[seq, max(0, pos + 1 - window) : pos + 1].tolist()
    token = texts(token_id)
    base, adapted = float(ce["base"][seq, pos]), float(ce[name][seq, pos])
    return {
        "sequence": seq,
        "position": pos,
        "token_id": token_id,
        "token": token,
        "text": "".join(texts(i) for i in before) + f"[[{token}]]",
        "ce_base": base,
        "ce_adapter": adapted,
        "difference": base - adapted,
    }


@torch.no_grad()
def _active_latents(
    model: PeftModel,
    saes: list[LoadedSAE],
    sequences: torch.Tensor,
    tops: dict[str, dict[str, list[tuple[int, int]]]],
    keep_first: bool,
    batch_size: int,
) -> dict[tuple[int, int], dict[int, list[int]]]:
    """Per listed (sequence, position): per SAE layer, the latents active there (base spliced run;
    only the sequences holding listed tokens are run, each forward stopped after the last SAE)."""
    wanted: dict[int, set[int]] = {}
    for directions in tops.values():
        for places in directions.values():
            for seq, pos in places:
                wanted.setdefault(seq, set()).add(pos)
    seqs = sorted(wanted)
    last = max(s.layer for s in saes)
    out: dict[tuple[int, int], dict[int, list[int]]] = {}
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids = sequences[chunk].to(_device(model))
        with model.disable_adapter(), Splice(model, saes, keep_first, record=True) as splice:
            with stop_after(model, last):
                run_until(model, input_ids=ids)
        for row, seq in enumerate(chunk):
            for pos in wanted[seq]:
                out[(seq, pos)] = {
                    layer: torch.nonzero(rec.latents[row, pos] > 0).flatten().tolist()
                    for layer, rec in splice.records.items()
                }
    return out


def _enriched(
    saes: list[LoadedSAE],
    fired: dict[int, torch.Tensor],
    counted: int,
    active: dict[tuple[int, int], dict[int, list[int]]],
    places: list[tuple[int, int]],
) -> list[dict]:
    """Per SAE, the latents active at >= MIN_LATENT_COUNT of ``places``, by enrichment (then count,
    then index), the first TOP_LATENTS."""
    result = []
    for sae in saes:
        counts: dict[int, int] = {}
        for place in places:
            for latent in active[place][sae.layer]:
                counts[latent] = counts.get(latent, 0) + 1
        rows = []
        for latent, count in counts.items():
            if count < MIN_LATENT_COUNT:
                continue
            density = int(fired[sae.layer][latent]) / counted
            rows.append(
                {
                    "latent": latent,
                    "count": count,
                    "density": density,
                    "enrichment": (count / len(places)) / density,
                }
            )
        rows.sort(key=lambda r: (-r["enrichment"], -r["count"], r["latent"]))
        result.append(
            {"sae": sae.sae_id, "layer": sae.layer, "tokens": len(places), "latents": rows[:TOP_LATENTS]}
        )
    return result


# ---------------------------------------------------------------------- summaries


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean())


def _gap_closed(ce: dict[str, torch.Tensor], name: str) -> float | None:
    clean, base, adapted = _mean(ce["clean"]), _mean(ce["base"]), _mean(ce[name])
    return (base - adapted) / (base - clean) if base > clean else None


def frequency_ranks(predicted: torch.Tensor) -> torch.Tensor:
    """Per predicted token (same shape), the rank of its token's frequency among ``predicted``:
    1 for the most frequent token; equal counts ranked by token id."""
    flat = predicted.flatten()
    counts = torch.bincount(flat, minlength=int(flat.max()) + 1)
    order = torch.sort(-counts, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, order.numel() + 1)
    return rank[flat].view(predicted.shape)


def bucket_table(ce: dict[str, torch.Tensor], ranks: torch.Tensor, names: list[str]) -> list[dict]:
    """Per frequency-rank bucket: tokens, distinct token ids, mean CE (clean, base) and per adapter
    mean CE and mean gain ``ce_base - ce_adapter`` (None for an empty bucket)."""
    table = []
    flat_ranks = ranks.flatten()
    for lo, hi, label in BUCKETS:
        mask = flat_ranks >= lo
        if hi is not None:
            mask &= flat_ranks <= hi
        n = int(mask.sum())
        row: dict[str, Any] = {"bucket": label, "first_rank": lo, "last_rank": hi, "tokens": n}
        row["distinct"] = int(flat_ranks[mask].unique().numel())

        def mean(values: torch.Tensor, mask: torch.Tensor = mask, n: int = n) -> float | None:
            return float(values.flatten()[mask].double().mean()) if n else None

        row["ce_clean"], row["ce_base"] = mean(ce["clean"]), mean(ce["base"])
        row["adapters"] = {
            name: {"ce": mean(ce[name]), "gain": mean(ce["base"] - ce[name])} for name in names
        }
        table.append(row)
    return table


def format_buckets(buckets: list[dict], names: list[str]) -> str:
    """The bucket table as text: tokens, base CE and each adapter's mean gain."""
    head = f"{'freq. rank':<12} {'tokens':>8} {'CE base':>9}" + "".join(f" {'gain ' + n:>14}" for n in names)
    lines = [head]
    for row in buckets:
        if not row["tokens"]:
            continue
        line = f"{row['bucket']:<12} {row['tokens']:>8} {row['ce_base']:>9.4f}"
        line += "".join(f" {row['adapters'][n]['gain']:>+14.4f}" for n in names)
        lines.append(line)
    return "\n".join(lines)


def _write_tokens(
    path: Path, sequences: torch.Tensor, ce: dict[str, torch.Tensor], names: list[str], ranks: torch.Tensor
) -> None:
    """``tokens.parquet``: one row per prediction: ``sequence``, ``position`` (of the predicting
    token; the predicted one is at ``position + 1``), ``token_id`` (predicted), ``freq_rank``,
    ``ce_clean``, ``ce_base``, ``ce_<adapter>``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, t = sequences.shape
    columns = {
        "sequence": pa.array(torch.arange(n).repeat_interleave(t - 1).numpy().astype("int32")),
        "position": pa.array(torch.arange(t - 1).repeat(n).numpy().astype("int32")),
        "token_id": pa.array(sequences[:, 1:].flatten().numpy().astype("int32")),
        "freq_rank": pa.array(ranks.flatten().numpy().astype("int32")),
    }
    for key in ("clean", "base", *names):
        columns[f"ce_{key}"] = pa.array(ce[key].flatten().numpy())
    table = pa.table(columns)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def print_table(summary: dict) -> None:
    """The bucket table on stderr (progress and tables go there; the JSON goes to stdout)."""
    names = [a["name"] for a in summary["adapters"]]
    print(format_buckets(summary["buckets"], names), file=sys.stderr, flush=True)
