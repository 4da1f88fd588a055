"""`lorasae drift`: what an adapter changed about every latent of its SAEs, beyond noise.

The method adapts the model and keeps the SAE, but a latent's meaning has two sides and the
adapter can move either: what it fires on (input side: changes only if an adapted layer sits at
or before the SAE's layer) and what it does downstream (output side: its causal effect goes through
the adapted layers after it). This job compares, latent by latent, a reference model (the base
model, or ``--against`` another adapter) with the adapted one, on the same tokens, with the
adapter's SAEs spliced (``lorasae.splice.Splice``, as trained and served):

1. **Statistics pass.** Both models read every batch (each forward stops after the last SAE's
   layer); per latent, ``LatentStats`` (density, histogram, top-N contexts) of the reference,
   separately for even and odd sequences (the two halves of the noise floor; they merge exactly
   into the whole), of the adapted model, and the paired sums of the Pearson correlation per half.
2. **Effect pass.** The causal effect (``training.effects``, the dashboards' exact measure) of each
   latent at the reference's top ``effect_contexts`` contexts, under both models; and, for
   ``noise_latents`` sampled latents, at their top contexts within each half, under the reference.

Noise thresholds come from the halves (``lorasae.drift`` explains them); a latent's score is its
largest statistic over that statistic's threshold. Shards of ``shard_sequences`` sequences are
saved under ``<out>/.work`` as they finish (``--resume``), and taken round-robin by the processes of
``accelerate launch``; the results merge exactly, in shard order.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch

from lorasae.dashboards import log_edges
from lorasae.data import TokenTexts, packed_sequences
from lorasae.drift import (
    MANIFEST_FILE,
    PLOT_FILE,
    RANKED,
    DriftManifest,
    DriftModel,
    DriftSae,
    DriftSettings,
    DriftSummary,
    DriftThresholds,
    RankedLatent,
    drift_file,
    drifted_sides,
    evidence,
    write_drift,
)
from lorasae.errors import LorasaeError
from lorasae.manifest import AdapterManifest, adapter_file_fingerprint
from lorasae.models import decoder_layers, load_model, model_fingerprint, output_head
from lorasae.saes import LoadedSAE, resolve_saes, sae_fingerprint
from lorasae.splice import Splice, run_until, stop_after

from .effects import EffectRows, hidden_and_vocab, mean_effect_blocks, model_device, sequence_effects
from .fields import corpus_field, ctx_field, device_field, dtype_field, keep_first_field, model_field
from .latent_stats import LatentStats
from .plots import plot_drift
from .shards import ShardedJob, check_out, save_settings
from .train_sae import ensure_default_sae

EPS = 1e-6  # thresholds below this are float noise: a difference has to exceed it
Side = Literal["reference", "adapted"]
REFERENCE: Side = "reference"
ADAPTED: Side = "adapted"


@dataclass
class DriftConfig:
    adapter: str = field(metadata={"help": "the adapter folder (a `lorasae train` run) to check"})
    against: str = field(
        default="base", metadata={"help": "'base' (the base model) or another adapter folder to compare with"}
    )
    model: str = model_field()
    corpus: str = corpus_field()
    split: Literal["train", "heldout"] = field(default="train", metadata={"help": "corpus split to read"})
    tokens: int = field(
        default=16_384, metadata={"help": "tokens to read (packed sequences of --ctx; even/odd halves)"}
    )
    ctx: int = ctx_field()
    batch_size: int = field(default=16, metadata={"help": "sequences per forward"})
    top_n: int = field(default=20, metadata={"help": "top contexts compared per latent (Jaccard)"})
    effect_contexts: int = field(
        default=4, metadata={"help": "top contexts per latent whose causal effect is compared"}
    )
    noise_latents: int = field(
        default=256, metadata={"help": "latents per SAE whose effect is measured in both halves (noise)"}
    )
    noise_quantile: float = field(
        default=0.95, metadata={"help": "quantile of the half-vs-half statistics taken as threshold"}
    )
    logit_top: int = field(default=10, metadata={"help": "promoted / suppressed tokens compared"})
    shard_sequences: int = field(default=32, metadata={"help": "sequences per checkpointed shard"})
    seed: int = field(default=0, metadata={"help": "picks the noise latents"})
    keep_first: bool = keep_first_field()
    device: str | None = device_field()
    dtype: str | None = dtype_field()

    def validate(self) -> None:
        if self.tokens < 2 * self.ctx:
            raise LorasaeError("--tokens must be at least 2 x --ctx (two halves of whole sequences)")
        for name in ("batch_size", "top_n", "effect_contexts", "logit_top", "shard_sequences"):
            if getattr(self, name) < 1:
                raise LorasaeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.noise_latents < 0:
            raise LorasaeError("--noise-latents must not be negative")
        if not 0.5 < self.noise_quantile < 1:
            raise LorasaeError("--noise-quantile must be in (0.5, 1)")
        if self.effect_contexts > self.top_n:
            raise LorasaeError("--effect-contexts cannot exceed --top-n")


@dataclass
class _Job(ShardedJob):
    cfg: DriftConfig
    model: Any  # peft PeftModel holding "adapted" (and "reference" when --against is an adapter)
    tokenizer: Any
    saes: list[LoadedSAE]
    edges: torch.Tensor

    @contextmanager
    def side(self, side: Side) -> Iterator[None]:
        """The model as ``side``: the adapter, the other adapter, or the base (adapter disabled)."""
        if side == REFERENCE and self.cfg.against == "base":
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(side)
            yield


def run_drift(cfg: DriftConfig, out: Path, resume: bool = False) -> dict | None:
    """Write the drift report in ``out``; the summary on the main process (None on the others)."""
    from accelerate import PartialState
    from peft import PeftModel

    cfg.validate()
    started = time.time()
    state = PartialState(cpu=cfg.device == "cpu")
    work = check_out(out, MANIFEST_FILE, "a finished drift report", asdict(cfg), resume)
    manifest = AdapterManifest.load(cfg.adapter)
    against = None if cfg.against == "base" else AdapterManifest.load(cfg.against)
    device = cfg.device or str(state.device)
    lm = load_model(cfg.model, device, cfg.dtype)
    saes = sorted(
        resolve_saes(lm, [entry.id for entry in manifest.saes], cfg.model, ensure_default_sae),
        key=lambda s: s.layer,
    )
    fingerprint = model_fingerprint(lm.model)
    manifest.check(fingerprint, saes)
    if against is not None and against.base_model_fingerprint != fingerprint:
        raise LorasaeError(
            f"--against {cfg.against}: trained on base model fingerprint {against.base_model_fingerprint}, "
            f"the loaded model has {fingerprint}"
        )
    for path in (cfg.adapter, *([] if against is None else [cfg.against])):
        if not (Path(path) / "adapter_config.json").is_file():
            raise LorasaeError(f"no peft adapter (adapter_config.json) in {path}")
    model = PeftModel.from_pretrained(lm.model, cfg.adapter, adapter_name=ADAPTED, is_trainable=False)
    if against is not None:
        model.load_adapter(cfg.against, adapter_name=REFERENCE, is_trainable=False)
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
    )
    state.wait_for_everyone()  # every process has checked --out before anything is written to it
    if state.is_main_process:
        save_settings(work, asdict(cfg))
    _statistics_pass(job)
    state.wait_for_everyone()
    stats = _merged_stats(job)
    plan = _effect_plan(job, stats)
    _effect_pass(job, plan)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    summary = _write(job, stats, plan, out, fingerprint, started)
    shutil.rmtree(work, ignore_errors=True)
    return summary


# ---------------------------------------------------------------------- pass 1: statistics

PAIRED = ("n", "x", "y", "xx", "yy", "xy")  # per half: tokens and the sums of the Pearson correlation


@dataclass
class _LayerStats:
    halves: list[LatentStats]  # reference on even / odd sequences
    adapted: LatentStats
    paired: torch.Tensor  # [2 halves, len(PAIRED), d_sae] float64

    def state_dict(self) -> dict[str, Any]:
        return {
            "halves": [h.state_dict() for h in self.halves],
            "adapted": self.adapted.state_dict(),
            "paired": self.paired,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> _LayerStats:
        return cls(
            [LatentStats.from_state_dict(h) for h in state["halves"]],
            LatentStats.from_state_dict(state["adapted"]),
            state["paired"],
        )

    def merge(self, other: _LayerStats) -> None:
        for mine, theirs in zip(self.halves, other.halves):
            mine.merge(theirs)
        self.adapted.merge(other.adapted)
        self.paired += other.paired

    @cached_property
    def reference(self) -> LatentStats:
        """Both halves merged (exact: the reference's statistics over all tokens)."""
        whole = LatentStats.from_state_dict({k: v.clone() for k, v in self.halves[0].state_dict().items()})
        whole.merge(self.halves[1])
        return whole


def _empty_stats(job: _Job, d_sae: int) -> LatentStats:
    return LatentStats.empty(d_sae, job.cfg.top_n, len(job.edges) + 1, 0, 1)


def _latents(job: _Job, side: Side, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    with torch.inference_mode(), job.side(side):
        with Splice(job.model, job.saes, job.cfg.keep_first, record=True) as splice:
            with stop_after(job.model, max(s.layer for s in job.saes)):
                run_until(job.model, input_ids=ids.to(model_device(job.model)))
    return {layer: r.latents.float().cpu() for layer, r in splice.records.items()}


def _statistics_pass(job: _Job) -> None:
    cfg = job.cfg
    todo = job.mine("stats")
    bar = job.bar(sum(len(job.shard_rows(s)) for s in todo) * cfg.ctx, "drift: statistics", "tok")
    for shard in todo:
        stats = {
            s.layer: _LayerStats(
                [_empty_stats(job, s.d_sae), _empty_stats(job, s.d_sae)],
                _empty_stats(job, s.d_sae),
                torch.zeros(2, len(PAIRED), s.d_sae, dtype=torch.float64),
            )
            for s in job.saes
        }
        for batch in job.batches(shard, cfg.batch_size):
            ids, seq, index, valid = batch.ids, batch.sequence, batch.index, batch.valid
            ref, ada = _latents(job, REFERENCE, ids), _latents(job, ADAPTED, ids)
            for layer, st in stats.items():
                x, y = ref[layer], ada[layer]
                st.adapted.update(y, index, job.edges, 0, valid)
                for half in (0, 1):
                    sel = seq % 2 == half
                    if not sel.any():
                        continue
                    st.halves[half].update(x[sel], index[sel], job.edges, 0, valid[sel])
                    xs, ys = x[sel][:, 1:].reshape(-1, x.shape[-1]), y[sel][:, 1:].reshape(-1, y.shape[-1])
                    sums = [xs, ys, xs * xs, ys * ys, xs * ys]
                    st.paired[half, 0] += xs.shape[0]
                    for i, value in enumerate(sums, start=1):
                        st.paired[half, i] += value.sum(0, dtype=torch.float64)
            bar.update(ids.numel())
        job.save("stats", shard, {layer: st.state_dict() for layer, st in stats.items()})
    bar.close()


def _merged_stats(job: _Job) -> dict[int, _LayerStats]:
    return job.merged("stats", _LayerStats.from_state_dict)


# ---------------------------------------------------------------------- pass 2: causal effects


@dataclass
class _Plan:
    """The effect rows of each side (deduplicated) and where each measurement's rows are in them:
    ``main`` (reference top contexts, both sides) and ``noise`` (each half's top contexts of the
    noise latents, reference side), per SAE layer as indices into the side's rows."""

    rows: dict[Side, EffectRows]
    main: dict[Side, dict[int, torch.Tensor]]
    noise: dict[int, list[torch.Tensor]]  # layer -> [even rows, odd rows] (reference side)
    noise_latents: dict[int, torch.Tensor]


def _effect_plan(job: _Job, stats: dict[int, _LayerStats]) -> _Plan:
    k, ctx = job.cfg.effect_contexts, job.cfg.ctx
    gen = torch.Generator().manual_seed(job.cfg.seed)
    keys: dict[Side, dict[tuple[int, ...], int]] = {REFERENCE: {}, ADAPTED: {}}

    def place(side: Side, rows: EffectRows) -> torch.Tensor:
        table = keys[side]
        at = []
        for key in zip(*(t.tolist() for t in (rows.layer, rows.latent, rows.sequence, rows.position))):
            at.append(table.setdefault(key, len(table)))
        return torch.tensor(at, dtype=torch.int64)

    main: dict[Side, dict[int, torch.Tensor]] = {REFERENCE: {}, ADAPTED: {}}
    noise: dict[int, list[torch.Tensor]] = {}
    noise_latents: dict[int, torch.Tensor] = {}
    for layer, st in sorted(stats.items()):
        top = EffectRows.of_top(layer, st.reference.top.index[:, :k], ctx)
        main[REFERENCE][layer], main[ADAPTED][layer] = place(REFERENCE, top), place(ADAPTED, top)
        enough = torch.ones(st.adapted.d_sae, dtype=torch.bool)
        for half in st.halves:
            enough &= half.top.index[:, k - 1] >= 0
        eligible = torch.nonzero(enough).flatten()
        picked = (
            eligible[torch.randperm(eligible.numel(), generator=gen)[: job.cfg.noise_latents]].sort().values
        )
        noise_latents[layer] = picked
        noise[layer] = []
        for half in st.halves:
            rows = EffectRows.of_top(layer, half.top.index[picked, :k], ctx)
            rows.latent = picked[rows.latent]  # of_top numbers the picked latents 0..n-1
            noise[layer].append(place(REFERENCE, rows))
    rows_of = {side: _rows_of(keys[side]) for side in (REFERENCE, ADAPTED)}
    return _Plan(rows_of, main, noise, noise_latents)


def _rows_of(table: dict[tuple[int, ...], int]) -> EffectRows:
    if not table:
        return EffectRows.cat([])
    values = torch.tensor(list(table), dtype=torch.int64)  # insertion order = row index
    return EffectRows(*values.T.contiguous())


def _effect_pass(job: _Job, plan: _Plan) -> None:
    todo = job.mine("effect")
    shard_of = {side: rows.sequence // job.cfg.shard_sequences for side, rows in plan.rows.items()}
    wanted = torch.tensor(todo, dtype=torch.int64)
    bar = job.bar(sum(int(torch.isin(s, wanted).sum()) for s in shard_of.values()), "drift: effects", "row")
    hidden, _ = hidden_and_vocab(job.model)
    for shard in todo:
        result = {}
        for side, rows in plan.rows.items():
            mine = torch.nonzero(shard_of[side] == shard).flatten()
            clean = torch.zeros(mine.numel(), hidden)
            ablated = torch.zeros_like(clean)
            with job.side(side):
                for seq in rows.sequence[mine].unique().tolist():
                    here = torch.nonzero(rows.sequence[mine] == seq).flatten()
                    clean[here], ablated[here] = sequence_effects(
                        job.model, job.saes, job.sequences[seq], rows.take(mine[here]), job.cfg.keep_first
                    )
                    bar.update(here.numel())
            result[side] = {"rows": mine, "clean": clean, "ablated": ablated}
        job.save("effect", shard, result)
    bar.close()


# ---------------------------------------------------------------------- statistics of drift


def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between rows of two count tables; NaN where one is empty."""
    p, q = p.double(), q.double()
    sp, sq = p.sum(-1, keepdim=True), q.sum(-1, keepdim=True)
    p, q = p / sp.clamp(min=1), q / sq.clamp(min=1)
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / m.clamp(min=1e-300)).log(), 0.0).sum(-1)

    js = (kl(p) + kl(q)) / 2
    return torch.where((sp[:, 0] > 0) & (sq[:, 0] > 0), js, torch.nan)


def _pearson(sums: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per latent from the paired sums ``[len(PAIRED), d]``; NaN where a side is
    constant (a latent that never fired)."""
    n, x, y, xx, yy, xy = sums
    n = n.clamp(min=1)
    mx, my = x / n, y / n
    vx, vy = xx / n - mx * mx, yy / n - my * my
    r = (xy / n - mx * my) / (vx * vy).sqrt()
    return torch.where((vx > 0) & (vy > 0), r.clamp(-1, 1), torch.nan)


def _quantile(values: torch.Tensor, q: float, empty: float = 0.0) -> float:
    values = values[~values.isnan()]
    return float(values.double().quantile(q)) if values.numel() else empty


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    out = []
    for ra, rb in zip(a.tolist(), b.tolist()):
        sa, sb = {i for i in ra if i >= 0}, {i for i in rb if i >= 0}
        out.append(len(sa & sb) / len(sa | sb) if sa | sb else float("nan"))
    return out


@dataclass
class _Input:
    """Input-side columns of one SAE and its thresholds."""

    columns: dict[str, list]
    log_ratio: torch.Tensor
    one_minus_r: torch.Tensor
    js: torch.Tensor
    alive: torch.Tensor
    thresholds: dict[str, float]


def _input_side(job: _Job, st: _LayerStats, reference: LatentStats) -> _Input:
    q = job.cfg.noise_quantile
    fr, fa = reference.fired.double(), st.adapted.fired.double()
    tokens = float(st.paired[:, 0, 0].sum())
    log_ratio = ((fa + 0.5) / (fr + 0.5)).log()
    f0, f1 = (h.fired.double() for h in st.halves)
    n0, n1 = float(st.paired[0, 0, 0]), float(st.paired[1, 0, 0])
    noise_ratio = ((f0 + 0.5) / max(n0, 1) / ((f1 + 0.5) / max(n1, 1))).log().abs()
    r = _pearson(st.paired.sum(0))
    r_halves = _pearson(st.paired[0]) - _pearson(st.paired[1])
    js = _js(reference.hist, st.adapted.hist)
    js_noise = _js(st.halves[0].hist, st.halves[1].hist)
    thresholds = {
        "density_log_ratio": max(_quantile(noise_ratio[(f0 + f1) > 0], q), EPS),
        "pearson": max(_quantile(r_halves.abs(), q), EPS),
        "hist_js": max(_quantile(js_noise, q), EPS),
    }
    columns = {
        "fired_reference": reference.fired.tolist(),
        "fired_adapted": st.adapted.fired.tolist(),
        "density_reference": (fr / tokens).tolist(),
        "density_adapted": (fa / tokens).tolist(),
        "density_log_ratio": log_ratio.tolist(),
        "pearson": r.tolist(),
        "top_jaccard": _jaccard(reference.top.index, st.adapted.top.index),
        "hist_js": js.tolist(),
    }
    return _Input(columns, log_ratio.abs(), 1 - r, js, (fr + fa) > 0, thresholds)


def _load_effects(job: _Job, plan: _Plan) -> dict[Side, tuple[torch.Tensor, torch.Tensor]]:
    hidden, _ = hidden_and_vocab(job.model)
    out = {}
    for side, rows in plan.rows.items():
        clean, ablated = torch.zeros(len(rows), hidden), torch.zeros(len(rows), hidden)
        for shard in job.shards:
            part = torch.load(job.shard_file("effect", shard))[side]
            clean[part["rows"]], ablated[part["rows"]] = part["clean"], part["ablated"]
        out[side] = (clean, ablated)
    return out


def _blocks(
    job: _Job,
    side: Side,
    hidden: tuple[torch.Tensor, torch.Tensor],
    rows: EffectRows,
    at: torch.Tensor,
    d_sae: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``mean_effect_blocks`` of one side's rows ``at``, each block computed with the model as that
    side (an adapter may adapt the unembedding)."""
    blocks = mean_effect_blocks(job.model, rows.latent[at], hidden[0][at], hidden[1][at], d_sae)
    while True:
        with job.side(side):
            block = next(blocks, None)
        if block is None:
            return
        yield block


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30).float()


def _output_side(
    job: _Job, plan: _Plan, layer: int, d_sae: int, effects: dict
) -> tuple[dict[str, list], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output-side columns of one SAE, its cosines [d] (NaN unmeasured), the noise cosines, and
    how many contexts each latent's effect was measured on."""
    k = job.cfg.logit_top
    rows = plan.rows
    columns: dict[str, list] = {
        name: []
        for name in (
            "effect_cosine",
            "effect_norm_ratio",
            "promoted_reference_ids",
            "promoted_adapted_ids",
            "suppressed_reference_ids",
            "suppressed_adapted_ids",
            "promoted_overlap",
        )
    }
    cosines, used_all = [], []
    ref_blocks = _blocks(
        job, REFERENCE, effects[REFERENCE], rows[REFERENCE], plan.main[REFERENCE][layer], d_sae
    )
    ada_blocks = _blocks(job, ADAPTED, effects[ADAPTED], rows[ADAPTED], plan.main[ADAPTED][layer], d_sae)
    for (_, er, used), (_, ea, _) in zip(ref_blocks, ada_blocks):
        cos = torch.where(used > 0, _cosine(er, ea), torch.nan)
        ratio = torch.where(used > 0, ea.norm(dim=-1) / er.norm(dim=-1).clamp(min=1e-30), torch.nan)
        cosines.append(cos)
        used_all.append(used)
        columns["effect_cosine"] += cos.tolist()
        columns["effect_norm_ratio"] += ratio.tolist()
        for name, e in (("reference", er), ("adapted", ea)):
            top, bottom = e.topk(k, dim=-1).indices, e.topk(k, dim=-1, largest=False).indices
            columns[f"promoted_{name}_ids"] += [t if u else [] for t, u in zip(top.tolist(), used.tolist())]
            columns[f"suppressed_{name}_ids"] += [
                b if u else [] for b, u in zip(bottom.tolist(), used.tolist())
            ]
        for pr, pa, u in zip(
            columns["promoted_reference_ids"][-len(used) :],
            columns["promoted_adapted_ids"][-len(used) :],
            used.tolist(),
        ):
            columns["promoted_overlap"].append(len(set(pr) & set(pa)) / k if u else float("nan"))
    halves = [
        _blocks(job, REFERENCE, effects[REFERENCE], rows[REFERENCE], at, d_sae) for at in plan.noise[layer]
    ]
    picked = plan.noise_latents[layer]
    noise = []
    for (latents, e0, u0), (_, e1, u1) in zip(*halves):
        mine = torch.isin(latents, picked) & (u0 > 0) & (u1 > 0)
        noise.append(_cosine(e0[mine], e1[mine]))
    noise_cos = torch.cat(noise) if noise else torch.zeros(0)
    return columns, torch.cat(cosines), noise_cos, torch.cat(used_all)


# ---------------------------------------------------------------------- writing


def _first_adapted_layer(job: _Job) -> int | None:
    """The first decoder layer any compared adapter changes: None when it changes only the
    unembedding (after every layer), 0 for a module before the decoder layers (embeddings)."""
    from peft.tuners.lora import LoraLayer

    names = {ADAPTED} | ({REFERENCE} if job.cfg.against != "base" else set())
    inside = {id(m): i for i, layer in enumerate(decoder_layers(job.model)) for m in layer.modules()}
    head = output_head(job.model)
    layers = []
    for module in job.model.modules():
        if isinstance(module, LoraLayer) and names & set(module.lora_A) and module is not head:
            layers.append(inside.get(id(module), 0))
    return min(layers) if layers else None


def _write(
    job: _Job, stats: dict[int, _LayerStats], plan: _Plan, out: Path, fingerprint: str, started: float
) -> dict:
    cfg = job.cfg
    texts = TokenTexts(job.tokenizer)
    effects = _load_effects(job, plan)
    first_adapted = _first_adapted_layer(job)
    entries, ranked, plotted = [], [], {}
    for sae in job.saes:
        st = stats[sae.layer]
        reference = st.reference
        inp = _input_side(job, st, reference)
        columns, cos, noise_cos, used = _output_side(job, plan, sae.layer, sae.d_sae, effects)
        cos_threshold = (
            min(_quantile(noise_cos, 1 - cfg.noise_quantile), 1 - EPS) if noise_cos.numel() else 1 - EPS
        )
        th = DriftThresholds(effect_cosine=cos_threshold, **inp.thresholds)
        ratios = torch.stack(
            [
                inp.log_ratio / th.density_log_ratio,
                inp.one_minus_r / th.pearson,
                inp.js / th.hist_js,
            ]
        ).nan_to_num(0.0)
        input_score = ratios.max(0).values.float()
        output_score = ((1 - cos) / (1 - th.effect_cosine)).nan_to_num(0.0)
        input_drifted = inp.alive & (input_score > 1)
        output_drifted = (used > 0) & (output_score > 1)
        score = torch.maximum(input_score, output_score)
        order = sorted(range(sae.d_sae), key=lambda j: (-float(score[j]), j))
        rank = torch.empty(sae.d_sae, dtype=torch.int64)
        rank[torch.tensor(order)] = torch.arange(1, sae.d_sae + 1)
        columns |= inp.columns | {
            "latent": list(range(sae.d_sae)),
            "effect_contexts": used.tolist(),
            "input_drifted": input_drifted.tolist(),
            "output_drifted": output_drifted.tolist(),
            "score": score.tolist(),
            "rank": rank.tolist(),
        }
        write_drift(out / drift_file(sae.layer), columns)
        alive, measured = int(inp.alive.sum()), int((used > 0).sum())
        identical = first_adapted is None or first_adapted > sae.layer
        entries.append(
            DriftSae(
                sae_id=sae.sae_id,
                hook_name=sae.hook_name,
                layer=sae.layer,
                d_sae=sae.d_sae,
                fingerprint=sae_fingerprint(sae.sae),
                file=drift_file(sae.layer),
                first_adapted_layer=first_adapted,
                input_identical_by_construction=identical,
                thresholds=th,
                noise_latents=int(noise_cos.numel()),
                summary=DriftSummary(
                    latents=sae.d_sae,
                    alive=alive,
                    measured=measured,
                    input_drifted=int(input_drifted.sum()),
                    output_drifted=int(output_drifted.sum()),
                    input_fraction=int(input_drifted.sum()) / max(alive, 1),
                    output_fraction=int(output_drifted.sum()) / max(measured, 1),
                ),
            )
        )
        for j in order[:RANKED]:
            row = {name: values[j] for name, values in columns.items()}
            if float(score[j]) > 1:
                ranked.append((float(score[j]), sae.layer, j, row, th))
        plotted[f"{sae.sae_id.rsplit('/', 1)[-1]} (L{sae.layer})"] = {
            "cosine": cos[~cos.isnan()].tolist(),
            "noise": noise_cos.tolist(),
            "threshold": th.effect_cosine,
            "density_reference": inp.columns["density_reference"],
            "density_adapted": inp.columns["density_adapted"],
            "input_drifted": input_drifted.tolist(),
        }
    ranked.sort(key=lambda r: (-r[0], r[1], r[2]))
    manifest = DriftManifest(
        model_id=cfg.model,
        model_fingerprint=fingerprint,
        adapter=DriftModel(path=str(cfg.adapter), fingerprint=adapter_file_fingerprint(cfg.adapter)),
        reference=None
        if cfg.against == "base"
        else DriftModel(path=str(cfg.against), fingerprint=adapter_file_fingerprint(cfg.against)),
        saes=entries,
        ranked=[
            RankedLatent(
                layer=layer,
                latent=j,
                rank=row["rank"],
                score=score_j,
                sides=drifted_sides(row),
                evidence=evidence(row, th, texts),
            )
            for score_j, layer, j, row, th in ranked[:RANKED]
        ],
        corpus=cfg.corpus,
        split=cfg.split,
        ctx=cfg.ctx,
        sequences=int(job.sequences.shape[0]),
        tokens=int(job.sequences.shape[0] * (cfg.ctx - 1)),
        settings=DriftSettings(
            top_n=cfg.top_n,
            effect_contexts=cfg.effect_contexts,
            noise_latents=cfg.noise_latents,
            noise_quantile=cfg.noise_quantile,
            logit_top=cfg.logit_top,
            batch_size=cfg.batch_size,
            shard_sequences=cfg.shard_sequences,
        ),
        processes=job.processes,
        seconds=round(time.time() - started, 1),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    plot_drift(plotted, out / PLOT_FILE)
    manifest.save(out)  # last: its presence marks a finished report
    return {
        "out": str(out),
        "against": cfg.against,
        "tokens": manifest.tokens,
        "seconds": manifest.seconds,
        "saes": [
            {
                "sae": e.sae_id,
                "layer": e.layer,
                "input_identical_by_construction": e.input_identical_by_construction,
                **e.summary.model_dump(),
                "thresholds": e.thresholds.model_dump(),
            }
            for e in entries
        ],
        "most_drifted": [r.model_dump() for r in manifest.ranked[:5]],
    }


def format_drift(summary: dict) -> str:
    """The summary as the CLI prints it: per SAE the fractions beyond noise, then the most drifted."""
    lines = [f"drift against {summary['against']} over {summary['tokens']} tokens ({summary['seconds']} s)"]
    for sae in summary["saes"]:
        note = " (identical by construction)" if sae["input_identical_by_construction"] else ""
        lines.append(
            f"  layer {sae['layer']}: input side {sae['input_drifted']}/{sae['alive']} "
            f"({sae['input_fraction']:.1%}) beyond noise{note}; output side "
            f"{sae['output_drifted']}/{sae['measured']} ({sae['output_fraction']:.1%})"
        )
    for entry in summary["most_drifted"]:
        lines.append(
            f"  #{entry['rank']} L{entry['layer']} latent {entry['latent']} (score {entry['score']:.1f})"
        )
        lines.append(f"      {entry['evidence']}")
    return "\n".join(lines)
