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

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

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
from lorasae.manifest import AdapterManifest, adapter_file_fingerprint
from lorasae.models import (
    final_norm,
    load_model,
    logits_from_hidden,
    model_fingerprint,
)
from lorasae.saes import LoadedSAE, resolve_saes, sae_fingerprint
from lorasae.splice import Splice, run_until, stop_after

from .effects import EffectRows, hidden_and_vocab, mean_effect_blocks, model_device, sequence_effects
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
from .shards import ShardedJob, check_out, save_settings
from .train_sae import ensure_default_sae

SAMPLES_PER_BIN = 2
QUANTILE_INTERVALS = ((0.0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.0))
DENSITY_PLOT = "densities.png"


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
class _Job(ShardedJob):
    """What both passes need: the (maybe adapted) model, SAEs, sequences, process layout."""

    cfg: DashboardConfig
    model: torch.nn.Module
    tokenizer: Any
    saes: list[LoadedSAE]
    edges: torch.Tensor
    wait: Callable[[], None]

    @property
    def window(self) -> int:
        return self.cfg.window_before + 1 + self.cfg.window_after


def run_dashboards(cfg: DashboardConfig, out: Path, resume: bool = False) -> dict | None:
    """Make the dashboards in ``out``; the summary on the main process (None on the others)."""
    from accelerate import PartialState

    cfg.validate()
    started = time.time()
    state = PartialState(cpu=cfg.device == "cpu")
    work = check_out(out, MANIFEST_FILE, "finished dashboards", asdict(cfg), resume)
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
        shard_sequences=cfg.shard_sequences,
        sequences=packed_sequences(lm.tokenizer, cfg.split, cfg.tokens, cfg.ctx, cfg.corpus),
        edges=torch.tensor(log_edges()),
        work=work,
        rank=state.process_index,
        processes=state.num_processes,
        wait=state.wait_for_everyone,
    )
    state.wait_for_everyone()  # every process has checked --out before anything is written to it
    if state.is_main_process:  # written once the inputs load, so a bad flag leaves --out untouched
        save_settings(work, asdict(cfg))
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
        for batch in job.batches(shard, cfg.batch_size):
            with torch.inference_mode():
                with Splice(job.model, job.saes, cfg.keep_first, record=True) as splice:
                    with stop_after(job.model, last):
                        run_until(job.model, input_ids=batch.ids.to(model_device(job.model)))
            for layer, st in stats.items():
                st.update(
                    splice.records[layer].latents, batch.index, job.edges, cfg.window_before, batch.valid
                )
            bar.update(batch.ids.numel())
        job.save("stats", shard, {layer: st.state_dict() for layer, st in stats.items()})
    bar.close()


def _merged_stats(job: _Job) -> dict[int, LatentStats]:
    """All shards' statistics merged in shard order (the same in every process)."""
    return job.merged("stats", LatentStats.from_state_dict)


# ---------------------------------------------------------------------- pass 2: causal effect


def _effect_rows(job: _Job, stats: dict[int, LatentStats]) -> EffectRows:
    n = job.cfg.effect_contexts
    return EffectRows.cat(
        [EffectRows.of_top(layer, st.top.index[:, :n], job.cfg.ctx) for layer, st in sorted(stats.items())]
    )


def _effect_pass(job: _Job, rows: EffectRows) -> None:
    todo = job.mine("effect")
    shard_of = rows.sequence // job.cfg.shard_sequences
    bar = job.bar(
        int(torch.isin(shard_of, torch.tensor(todo, dtype=torch.int64)).sum()), "dashboards: effects", "row"
    )
    hidden, _ = hidden_and_vocab(job.model)
    for shard in todo:
        mine = torch.nonzero(shard_of == shard).flatten()
        clean = torch.zeros(mine.numel(), hidden, dtype=torch.float32)
        ablated = torch.zeros_like(clean)
        for seq in rows.sequence[mine].unique().tolist():
            here = torch.nonzero(rows.sequence[mine] == seq).flatten()
            clean[here], ablated[here] = sequence_effects(
                job.model, job.saes, job.sequences[seq], rows.take(mine[here]), job.cfg.keep_first
            )
            bar.update(here.numel())
        job.save("effect", shard, {"rows": mine, "clean": clean, "ablated": ablated})
    bar.close()


# ---------------------------------------------------------------------- writing


def _write(
    job: _Job, stats: dict[int, LatentStats], rows: EffectRows, out: Path, fingerprint: str, started: float
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
        logits = logits_from_hidden(job.model, norm(chunk.to(model_device(job.model))[:, None])[:, 0])
        _top_bottom(out, "lens", logits, k)
    return out


def _top_bottom(out: dict[str, list], prefix: str, values: torch.Tensor, k: int) -> None:
    k = min(k, values.shape[-1])
    top, bottom = values.topk(k, dim=-1), values.topk(k, dim=-1, largest=False)
    out[f"{prefix}_promoted_ids"] += top.indices.tolist()
    out[f"{prefix}_promoted_values"] += top.values.tolist()
    out[f"{prefix}_suppressed_ids"] += bottom.indices.tolist()
    out[f"{prefix}_suppressed_values"] += bottom.values.tolist()


def _mean_effects(job: _Job, rows: EffectRows) -> dict[int, dict[str, list]]:
    """Per latent: the mean over its measured contexts of log p(clean) - log p(latent removed),
    top / bottom tokens (what the latent adds to / takes from the next-token distribution)."""
    hidden, _ = hidden_and_vocab(job.model)
    clean = torch.zeros(len(rows), hidden)
    ablated = torch.zeros_like(clean)
    for shard in job.shards:
        path = job.shard_file("effect", shard)
        if path.exists():
            part = torch.load(path)
            clean[part["rows"]], ablated[part["rows"]] = part["clean"], part["ablated"]
    result = {}
    for sae in job.saes:
        out: dict[str, list] = {
            f"effect_{w}_{v}": [] for w in ("promoted", "suppressed") for v in ("ids", "values")
        }
        out["effect_contexts"] = []
        mine = rows.layer == sae.layer
        blocks = mean_effect_blocks(job.model, rows.latent[mine], clean[mine], ablated[mine], sae.d_sae)
        for _latents, effects, used in blocks:
            for b in range(used.numel()):
                if used[b] == 0:
                    for key in ("promoted", "suppressed"):
                        out[f"effect_{key}_ids"].append([])
                        out[f"effect_{key}_values"].append([])
                else:
                    _top_bottom(out, "effect", effects[b : b + 1], job.cfg.logit_top)
            out["effect_contexts"] += used.tolist()
        result[sae.layer] = out
    return result
