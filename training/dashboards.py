"""`lorasae dashboards`: what every latent of an SAE fires on and what it does, at corpus scale.

Two passes over the packed sequences of a corpus split, with the SAEs spliced exactly as the
server splices them (``lorasae.splice.Splice``; through the adapter with ``--adapter``):

1. **Statistics.** Each forward stops after the last SAE's layer; ``LatentStats`` accumulates, per
   latent, density, mean / max activation, a log-binned histogram, the top-N contexts (with the
   latent's activation at every token of the window) and hashed samples per histogram bin, from
   which contexts are drawn per activation quantile band. Position 0 (BOS) is not counted.
2. **Causal effect.** For each latent's top ``effect_contexts`` contexts: the next-token
   log-probabilities at the context's token with the latent removed from the reconstruction at
   that token, against the unedited spliced model. Exact, not an attribution estimate: a clean
   spliced forward of the sequence fills a KV cache, then every (latent, context) of the sequence
   is one decode step of that token, attending to the cached earlier positions, with the edit
   applied (``Splice(edit=...)``). Only the final hidden state is kept per row; the logits are
   formed at the end, so memory does not grow with the vocabulary.

Both passes work in shards of ``shard_sequences`` sequences; each shard's result is saved under
``<out>/.work`` when it is done, so an interrupted run resumes (``--resume``) where it stopped,
and under ``accelerate launch`` processes take shards round-robin. Shard results merge exactly
(``LatentStats.merge``, in shard order), so any number of processes gives the one-process result.
The main process writes the Parquet files and the manifest (``lorasae.dashboards``).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

import torch
from tqdm.auto import tqdm

from lorasae.dashboards import (
    MANIFEST_FILE,
    DashboardAdapter,
    DashboardManifest,
    DashboardSae,
    DashboardSettings,
    latents_file,
    log_edges,
    write_latents,
    write_tokens,
)
from lorasae.data import TokenTexts, packed_sequences
from lorasae.errors import LorasaeError
from lorasae.files import write_atomic, write_json_atomic
from lorasae.manifest import AdapterManifest, adapter_file_fingerprint
from lorasae.models import (
    cache_kwarg,
    final_norm,
    load_model,
    logits_from_hidden,
    model_fingerprint,
    output_cache,
    output_head,
)
from lorasae.saes import LoadedSAE, resolve_saes, sae_fingerprint
from lorasae.splice import Splice, run_until, stop_after

from .eval import load_adapter
from .fields import (
    corpus_field,
    ctx_field,
    device_field,
    dtype_field,
    keep_first_field,
    model_field,
    saes_field,
)
from .latent_stats import LatentStats
from .plots import plot_densities
from .train_sae import ensure_default_sae

WORK_DIR = ".work"
SAMPLES_PER_BIN = 2
QUANTILE_INTERVALS = ((0.0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.0))
DENSITY_PLOT = "densities.png"
DECODE_ROWS = 64  # (latent, context) rows per decode step of the effect pass


@dataclass
class DashboardConfig:
    model: str = model_field()
    saes: list[str] = saes_field(
        "sae-lens folder or release/sae_id; repeat for several (default: the adapter's SAEs, "
        "else the embedded default SAE)"
    )
    adapter: str | None = field(
        default=None, metadata={"help": "peft adapter folder (a `lorasae train` run): dashboards through it"}
    )
    corpus: str = corpus_field()
    split: Literal["train", "heldout"] = field(default="train", metadata={"help": "corpus split to read"})
    tokens: int = field(
        default=32_768,
        metadata={"help": "tokens to read (packed sequences of --ctx; default: ~8 min on 2 CPU cores)"},
    )
    ctx: int = ctx_field()
    batch_size: int = field(default=16, metadata={"help": "sequences per forward"})
    top_n: int = field(default=20, metadata={"help": "top-activating contexts kept per latent"})
    window_before: int = field(default=12, metadata={"help": "tokens shown before a context's token"})
    window_after: int = field(default=4, metadata={"help": "tokens shown after a context's token"})
    samples_per_interval: int = field(
        default=4, metadata={"help": "contexts sampled per activation quantile band"}
    )
    logit_top: int = field(default=10, metadata={"help": "promoted / suppressed tokens listed"})
    effect_contexts: int = field(
        default=4, metadata={"help": "top contexts per latent whose causal effect is measured (0: none)"}
    )
    shard_sequences: int = field(default=64, metadata={"help": "sequences per checkpointed shard"})
    keep_first: bool = keep_first_field()
    device: str | None = device_field()
    dtype: str | None = dtype_field()

    def validate(self) -> None:
        if self.tokens < self.ctx:
            raise LorasaeError("--tokens must be at least --ctx")
        for name in ("batch_size", "top_n", "logit_top", "shard_sequences"):
            if getattr(self, name) < 1:
                raise LorasaeError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("window_before", "window_after", "samples_per_interval", "effect_contexts"):
            if getattr(self, name) < 0:
                raise LorasaeError(f"--{name.replace('_', '-')} must not be negative")
        if self.effect_contexts > self.top_n:
            raise LorasaeError("--effect-contexts cannot exceed --top-n")


@dataclass
class _Job:
    """What both passes need: the (maybe adapted) model, SAEs, sequences, process layout."""

    cfg: DashboardConfig
    model: torch.nn.Module
    tokenizer: Any
    saes: list[LoadedSAE]
    sequences: torch.Tensor  # [S, ctx]
    edges: torch.Tensor
    work: Path
    rank: int
    processes: int
    wait: Callable[[], None]

    @property
    def window(self) -> int:
        return self.cfg.window_before + 1 + self.cfg.window_after

    @property
    def shards(self) -> range:
        return range(-(-self.sequences.shape[0] // self.cfg.shard_sequences))

    def shard_rows(self, shard: int) -> range:
        n = self.cfg.shard_sequences
        return range(shard * n, min((shard + 1) * n, self.sequences.shape[0]))

    def mine(self, prefix: str) -> list[int]:
        """This process's shards that are not done yet."""
        return [
            s for s in self.shards[self.rank :: self.processes] if not self.shard_file(prefix, s).exists()
        ]

    def shard_file(self, prefix: str, shard: int) -> Path:
        return self.work / f"{prefix}-{shard:05d}.pt"

    def bar(self, total: int, desc: str, unit: str):
        return tqdm(total=total, desc=desc, unit=unit, disable=self.rank != 0, smoothing=0.1)


def run_dashboards(cfg: DashboardConfig, out: Path, resume: bool = False) -> dict | None:
    """Make the dashboards in ``out``; the summary on the main process (None on the others)."""
    from accelerate import PartialState

    cfg.validate()
    started = time.time()
    state = PartialState(cpu=cfg.device == "cpu")
    work = out / WORK_DIR
    if (out / MANIFEST_FILE).exists():
        raise LorasaeError(f"{out} already holds finished dashboards; choose another --out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise LorasaeError(f"{out} is not empty; pass --resume to continue an interrupted run")
    saved = work / "config.json"
    old = json.loads(saved.read_text()) if resume and saved.exists() else asdict(cfg)
    changed = sorted(k for k, v in asdict(cfg).items() if old.get(k) != v)
    if changed:
        raise LorasaeError(f"--resume with different settings: {changed}")
    manifest = AdapterManifest.load(cfg.adapter) if cfg.adapter else None
    device = cfg.device or str(state.device)
    lm = load_model(cfg.model, device, cfg.dtype)
    specs = cfg.saes or ([entry.id for entry in manifest.saes] if manifest else [])
    saes = sorted(resolve_saes(lm, specs, cfg.model, ensure_default_sae), key=lambda s: s.layer)
    fingerprint = model_fingerprint(lm.model)
    if manifest is not None:
        manifest.check(fingerprint, saes)
    model = lm.model if cfg.adapter is None else load_adapter(lm.model, cfg.adapter)
    model.eval()
    job = _Job(
        cfg=cfg,
        model=model,
        tokenizer=lm.tokenizer,
        saes=saes,
        sequences=packed_sequences(lm.tokenizer, cfg.split, cfg.tokens, cfg.ctx, cfg.corpus),
        edges=torch.tensor(log_edges()),
        work=work,
        rank=state.process_index,
        processes=state.num_processes,
        wait=state.wait_for_everyone,
    )
    state.wait_for_everyone()  # every process has checked --out before anything is written to it
    if state.is_main_process:  # written once the inputs load, so a bad flag leaves --out untouched
        write_json_atomic(saved, asdict(cfg))
    _statistics_pass(job)
    job.wait()
    stats = _merged_stats(job)
    rows = _effect_rows(job, stats)
    _effect_pass(job, rows)
    job.wait()
    if not state.is_main_process:
        return None
    summary = _write(job, stats, rows, out, fingerprint, started)
    shutil.rmtree(work, ignore_errors=True)
    return summary


# ---------------------------------------------------------------------- pass 1: statistics


def _statistics_pass(job: _Job) -> None:
    cfg = job.cfg
    todo = job.mine("stats")
    bar = job.bar(sum(len(job.shard_rows(s)) for s in todo) * cfg.ctx, "dashboards: statistics", "tok")
    last = max(s.layer for s in job.saes)
    for shard in todo:
        bins = len(job.edges) + 1
        stats = {
            s.layer: LatentStats.empty(s.d_sae, cfg.top_n, bins, SAMPLES_PER_BIN, job.window)
            for s in job.saes
        }
        rows = job.shard_rows(shard)
        for first in range(rows.start, rows.stop, cfg.batch_size):
            ids = job.sequences[first : min(first + cfg.batch_size, rows.stop)]
            seq = torch.arange(first, first + ids.shape[0])[:, None]
            index = seq * cfg.ctx + torch.arange(cfg.ctx)
            valid = torch.ones_like(ids, dtype=torch.bool)
            valid[:, 0] = False  # BOS: excluded, as in training and evaluation
            with torch.inference_mode():
                with Splice(job.model, job.saes, cfg.keep_first, record=True) as splice:
                    with stop_after(job.model, last):
                        run_until(job.model, input_ids=ids.to(_device(job.model)))
            for layer, st in stats.items():
                st.update(splice.records[layer].latents, index, job.edges, cfg.window_before, valid)
            bar.update(ids.numel())
        states = {layer: st.state_dict() for layer, st in stats.items()}
        write_atomic(job.shard_file("stats", shard), partial(torch.save, states))
    bar.close()


def _merged_stats(job: _Job) -> dict[int, LatentStats]:
    """All shards' statistics merged in shard order (the same in every process)."""
    merged: dict[int, LatentStats] = {}
    for shard in job.shards:
        for layer, state in torch.load(job.shard_file("stats", shard)).items():
            part = LatentStats.from_state_dict(state)
            if layer in merged:
                merged[layer].merge(part)
            else:
                merged[layer] = part
    return merged


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------- pass 2: causal effect


@dataclass
class _Rows:
    """The (SAE, latent, context) rows of the effect pass, in (layer, latent, rank) order."""

    layer: torch.Tensor  # [R] int64
    latent: torch.Tensor
    sequence: torch.Tensor
    position: torch.Tensor


def _effect_rows(job: _Job, stats: dict[int, LatentStats]) -> _Rows:
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    n = job.cfg.effect_contexts
    for layer, st in sorted(stats.items()):
        index = st.top.index[:, :n]
        latent, rank = torch.nonzero(index >= 0, as_tuple=True)
        gidx = index[latent, rank]
        for part, value in zip(
            parts,
            (torch.full_like(latent, layer), latent, gidx // job.cfg.ctx, gidx % job.cfg.ctx),
        ):
            part.append(value)
    empty = torch.zeros(0, dtype=torch.int64)
    return _Rows(*(torch.cat(p) if p else empty for p in parts))


def _effect_pass(job: _Job, rows: _Rows) -> None:
    todo = job.mine("effect")
    shard_of = rows.sequence // job.cfg.shard_sequences
    bar = job.bar(
        int(torch.isin(shard_of, torch.tensor(todo, dtype=torch.int64)).sum()), "dashboards: effects", "row"
    )
    for shard in todo:
        mine = torch.nonzero(shard_of == shard).flatten()
        clean = torch.zeros(mine.numel(), _hidden_size(job), dtype=torch.float32)
        ablated = torch.zeros_like(clean)
        for seq in rows.sequence[mine].unique().tolist():
            here = torch.nonzero(rows.sequence[mine] == seq).flatten()
            c, a = _effects_of_sequence(job, rows, mine[here], seq)
            clean[here], ablated[here] = c, a
            bar.update(here.numel())
        result = {"rows": mine, "clean": clean, "ablated": ablated}
        write_atomic(job.shard_file("effect", shard), partial(torch.save, result))
    bar.close()


def _hidden_size(job: _Job) -> int:
    return _unembedding(job).shape[1]


@torch.inference_mode()
def _effects_of_sequence(
    job: _Job, rows: _Rows, which: torch.Tensor, seq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at each row's token: clean (spliced, unedited) and with the row's latent
    removed from its SAE's reconstruction at that token."""
    model, device = job.model, _device(job.model)
    positions = rows.position[which]
    length = int(positions.max()) + 1
    ids = job.sequences[seq, :length][None].to(device)
    captured: list[torch.Tensor] = []
    # the final norm's output is what the unembedding reads: the logits are formed at the end
    handle = final_norm(model).register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        with Splice(model, job.saes, job.cfg.keep_first):
            cache = output_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))
        clean = captured.pop()[0, positions.to(device)].float().cpu()
        ablated = []
        for chunk in torch.split(torch.arange(which.numel()), DECODE_ROWS):
            ablated.append(_decode_ablated(job, rows, which[chunk], seq, cache, length, captured))
    finally:
        handle.remove()
    return clean, torch.cat(ablated)


def _decode_ablated(
    job: _Job,
    rows: _Rows,
    which: torch.Tensor,
    seq: int,
    cache: Any,
    length: int,
    captured: list[torch.Tensor],
) -> torch.Tensor:
    """One decode step per row: the row's token after the cached clean prefix before it (the
    attention mask hides the cached entries at and after its position), its latent zeroed."""
    device = _device(job.model)
    n = which.numel()
    positions = rows.position[which]
    step_cache = copy.deepcopy(cache)
    step_cache.batch_repeat_interleave(n)
    seen = torch.arange(length)[None] < positions[:, None]
    mask = torch.cat([seen, torch.ones(n, 1, dtype=torch.bool)], dim=1).long()
    latent_of = rows.latent[which].to(device)
    layer_of = rows.layer[which].to(device)
    batch = torch.arange(n, device=device)

    def remove(layer: int, latents: torch.Tensor) -> torch.Tensor:
        mine = layer_of == layer
        latents = latents.clone()
        latents[batch[mine], 0, latent_of[mine]] = 0.0
        return latents

    with Splice(job.model, job.saes, keep_first=False, edit=remove):
        job.model(
            input_ids=job.sequences[seq, positions][:, None].to(device),
            attention_mask=mask.to(device),
            position_ids=positions[:, None].to(device),
            use_cache=True,
            **{cache_kwarg(job.model): step_cache},
        )
    return captured.pop()[:, 0].float().cpu()


# ---------------------------------------------------------------------- writing


def _write(
    job: _Job, stats: dict[int, LatentStats], rows: _Rows, out: Path, fingerprint: str, started: float
) -> dict:
    cfg = job.cfg
    effects = _mean_effects(job, rows)
    texts = TokenTexts(job.tokenizer)
    pieces = [texts(i) for i in range(len(job.tokenizer))]
    write_tokens(out, pieces)
    entries = []
    tokens = int(job.sequences.shape[0] * (cfg.ctx - 1))
    summary_saes = []
    densities = []
    for sae in job.saes:
        st = stats[sae.layer]
        columns = _columns(job, st, tokens)
        columns.update(_lens(job, sae))
        columns.update(effects[sae.layer])
        write_latents(out / latents_file(sae.layer), columns)
        dead = [i for i, d in enumerate(columns["dead"]) if d]
        densities.append(columns["density"])
        entries.append(
            DashboardSae(
                sae_id=sae.sae_id,
                hook_name=sae.hook_name,
                layer=sae.layer,
                d_sae=sae.d_sae,
                fingerprint=sae_fingerprint(sae.sae),
                file=latents_file(sae.layer),
                dead=len(dead),
            )
        )
        summary_saes.append({"sae": sae.sae_id, "layer": sae.layer, "d_sae": sae.d_sae, "dead": dead})
    adapter = None
    if cfg.adapter:
        adapter = DashboardAdapter(path=str(cfg.adapter), fingerprint=adapter_file_fingerprint(cfg.adapter))
    seconds = round(time.time() - started, 1)
    manifest = DashboardManifest(
        model_id=cfg.model,
        model_fingerprint=fingerprint,
        adapter=adapter,
        saes=entries,
        corpus=cfg.corpus,
        split=cfg.split,
        ctx=cfg.ctx,
        sequences=int(job.sequences.shape[0]),
        tokens=tokens,
        hist_edges=job.edges.tolist(),
        settings=DashboardSettings(
            top_n=cfg.top_n,
            window_before=cfg.window_before,
            window_after=cfg.window_after,
            quantile_intervals=list(QUANTILE_INTERVALS),
            samples_per_interval=cfg.samples_per_interval,
            logit_top=cfg.logit_top,
            effect_contexts=cfg.effect_contexts,
            batch_size=cfg.batch_size,
            shard_sequences=cfg.shard_sequences,
        ),
        processes=job.processes,
        seconds=seconds,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    plot_densities(
        {f"{s['sae']} (L{s['layer']})": d for s, d in zip(summary_saes, densities)}, out / DENSITY_PLOT
    )
    manifest.save(out)  # last: its presence marks finished dashboards
    return {
        "out": str(out),
        "tokens": tokens,
        "seconds": seconds,
        "processes": job.processes,
        "saes": summary_saes,
    }


def _context(job: _Job, gidx: int, act: float, window: list[float], interval: str | None = None) -> dict:
    cfg = job.cfg
    seq, pos = divmod(gidx, cfg.ctx)
    start, stop = max(0, pos - cfg.window_before), min(cfg.ctx, pos + cfg.window_after + 1)
    offset = start - (pos - cfg.window_before)
    context = {
        "sequence": seq,
        "position": pos,
        "activation": act,
        "start": start,
        "token_ids": job.sequences[seq, start:stop].tolist(),
        "activations": window[offset : offset + stop - start],
    }
    return context if interval is None else {"interval": interval, **context}


def _columns(job: _Job, st: LatentStats, tokens: int) -> dict[str, list]:
    cfg = job.cfg
    fired = st.fired.tolist()
    top, quantile = [], []
    top_act, top_index, top_window = st.top.act.tolist(), st.top.index.tolist(), st.top.window.tolist()
    hist = st.hist.tolist()
    for j in range(st.d_sae):
        contexts = [
            _context(job, g, a, w) for g, a, w in zip(top_index[j], top_act[j], top_window[j]) if g >= 0
        ]
        top.append(contexts)
        quantile.append(
            _quantile_contexts(
                job, st, j, hist[j], {c["sequence"] * cfg.ctx + c["position"] for c in contexts}
            )
        )
    means = (st.act_sum / st.fired.clamp(min=1)).tolist()
    return {
        "latent": list(range(st.d_sae)),
        "fired": fired,
        "density": [f / tokens for f in fired],
        "mean_activation": means,
        "max_activation": st.act_max.tolist(),
        "dead": [f == 0 for f in fired],
        "hist_counts": hist,
        "top_contexts": top,
        "quantile_contexts": quantile,
    }


def _quantile_contexts(job: _Job, st: LatentStats, j: int, counts: list[int], shown: set[int]) -> list[dict]:
    """Up to ``samples_per_interval`` sampled contexts per quantile band of the latent's
    activations (a histogram bin belongs to the band its lower cumulative fraction falls in)."""
    total = sum(counts)
    if total == 0 or job.cfg.samples_per_interval == 0:
        return []
    band_of_bin = []
    below = 0
    for count in counts:
        frac = below / total
        band_of_bin.append(next(i for i, (lo, hi) in enumerate(QUANTILE_INTERVALS) if frac < hi or hi == 1.0))
        below += count
    groups = slice(j * len(counts), (j + 1) * len(counts))  # the latent's (latent, bin) groups
    kept = st.samples
    keys, acts, index = kept.rank_key[groups].tolist(), kept.act[groups].tolist(), kept.index[groups].tolist()
    windows = kept.window[groups].tolist()
    out = []
    for band, (lo, hi) in enumerate(QUANTILE_INTERVALS):
        pool = [
            (keys[b][k], index[b][k], acts[b][k], windows[b][k])
            for b in range(len(counts))
            if band_of_bin[b] == band
            for k in range(len(keys[b]))
            if index[b][k] >= 0 and index[b][k] not in shown
        ]
        picked = sorted(pool)[: job.cfg.samples_per_interval]
        label = f"{round(lo * 100)}-{round(hi * 100)}%"
        for _key, g, a, w in sorted(picked, key=lambda p: -p[2]):
            out.append(_context(job, g, a, w, label))
    return out


@torch.inference_mode()
def _lens(job: _Job, sae: LoadedSAE) -> dict[str, list]:
    """Logit lens of each decoder row: final norm, then the unembedding."""
    k = job.cfg.logit_top
    norm = final_norm(job.model)
    out: dict[str, list] = {
        f"lens_{w}_{v}": [] for w in ("promoted", "suppressed") for v in ("ids", "values")
    }
    w_dec = sae.sae.W_dec.detach()
    for chunk in torch.split(w_dec, 256):
        logits = logits_from_hidden(job.model, norm(chunk.to(_device(job.model))[:, None])[:, 0])
        _top_bottom(out, "lens", logits, k)
    return out


def _top_bottom(out: dict[str, list], prefix: str, values: torch.Tensor, k: int) -> None:
    k = min(k, values.shape[-1])
    top, bottom = values.topk(k, dim=-1), values.topk(k, dim=-1, largest=False)
    out[f"{prefix}_promoted_ids"] += top.indices.tolist()
    out[f"{prefix}_promoted_values"] += top.values.tolist()
    out[f"{prefix}_suppressed_ids"] += bottom.indices.tolist()
    out[f"{prefix}_suppressed_values"] += bottom.values.tolist()


@torch.inference_mode()
def _mean_effects(job: _Job, rows: _Rows) -> dict[int, dict[str, list]]:
    """Per latent: the mean over its measured contexts of log p(clean) - log p(latent removed),
    top / bottom tokens (what the latent adds to / takes from the next-token distribution)."""
    n = rows.layer.numel()
    clean = torch.zeros(n, _hidden_size(job))
    ablated = torch.zeros_like(clean)
    for shard in job.shards:
        path = job.shard_file("effect", shard)
        if path.exists():
            part = torch.load(path)
            clean[part["rows"]], ablated[part["rows"]] = part["clean"], part["ablated"]
    device, k = _device(job.model), job.cfg.logit_top
    result = {}
    for sae in job.saes:
        out: dict[str, list] = {
            f"effect_{w}_{v}": [] for w in ("promoted", "suppressed") for v in ("ids", "values")
        }
        out["effect_contexts"] = []
        mine = rows.layer == sae.layer
        latents = rows.latent[mine]
        counts = torch.bincount(latents, minlength=sae.d_sae)
        sel = torch.nonzero(mine).flatten()
        for first in range(0, sae.d_sae, 128):
            block = torch.arange(first, min(first + 128, sae.d_sae))
            here = sel[(latents >= first) & (latents < block[-1] + 1)]
            diff = torch.zeros(block.numel(), _vocab(job))
            if here.numel():
                d = _logprobs(job, clean[here].to(device)) - _logprobs(job, ablated[here].to(device))
                diff.index_add_(0, rows.latent[here] - first, d.cpu())
            used = counts[block]
            diff /= used.clamp(min=1)[:, None]
            for b in range(block.numel()):
                if used[b] == 0:
                    for key in ("promoted", "suppressed"):
                        out[f"effect_{key}_ids"].append([])
                        out[f"effect_{key}_values"].append([])
                else:
                    _top_bottom(out, "effect", diff[b : b + 1], k)
            out["effect_contexts"] += used.tolist()
        result[sae.layer] = out
    return result


def _vocab(job: _Job) -> int:
    return _unembedding(job).shape[0]


def _unembedding(job: _Job) -> torch.Tensor:
    # cast: nn.Module attributes are typed Tensor | Module; the head's weight is its [vocab, d] matrix
    return cast(torch.Tensor, output_head(job.model).weight)


def _logprobs(job: _Job, hidden: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_from_hidden(job.model, hidden), dim=-1)
