"""How the client's answers look in a notebook: ``_repr_html_`` views and one-line ``repr``s.

The response models (``lorasae_client.schemas``) call these from thin ``_repr_html_`` / ``__repr__``
methods, so ``display(client.features(...))`` in Jupyter shows token strips and
``client.latent(...)`` a small dashboard. Pure string building: no IPython, pandas or matplotlib.

Every text that comes from the server (token texts, names, paths, errors) is untrusted and goes
through ``html.escape``. Every view is bounded (``MAX_TOKENS`` token spans, ``MAX_ROWS`` table
rows, ``MAX_CONTEXTS`` contexts, ...) and says "… k more" for what it leaves out, so a large answer
cannot freeze a notebook; ``to_pandas()`` has everything.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schemas import (
        AdapterInfo,
        AdapterList,
        DriftLatent,
        DriftReport,
        DriftSaeInfo,
        DriftToken,
        FeatureEntry,
        FeaturesResponse,
        GenerateResponse,
        Generation,
        Histogram,
        LatentContext,
        LatentRecord,
        LatentSearchResponse,
        LatentSummary,
        TokenResult,
        TokenValue,
    )

MAX_TOKENS = 2000  # token spans in one features view, all SAEs and inputs together
MAX_TOKENS_PER_INPUT = 512  # token spans of one input (per SAE)
MAX_INPUTS = 32  # inputs shown per SAE
MAX_SAES = 8  # SAEs shown in a features view
MAX_ROWS = 100  # rows of a table (adapters, drifted latents, search hits, generations)
MAX_CONTEXTS = 12  # context windows shown per kind in a latent view
MAX_CONTEXT_TOKENS = 64  # tokens of one context window
MAX_BINS = 128  # histogram bars
MAX_EFFECTS = 16  # promoted / suppressed tokens listed
TOOLTIP_LATENTS = 5  # latents named in a token's tooltip
MAX_TEXT = 300  # characters of a free text (an error, a generation, evidence)
MAX_NAMES = 5  # names in a one-line repr
GOLDEN_ANGLE = 137.50776405003785  # successive latents get far-apart hues

STYLE = """<style>
.lorasae{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:13px;line-height:1.5}
.lorasae .lsae-head{font-weight:600;margin:2px 0 4px}
.lorasae .lsae-note{color:#6b7280;font-size:12px;margin:2px 0}
.lorasae .lsae-warn{color:#b45309;font-size:12px;margin:2px 0}
.lorasae .lsae-sae{margin:6px 0 2px;font-weight:600}
.lorasae .lsae-strip{margin:2px 0 4px;line-height:1.9}
.lorasae .lsae-label{color:#6b7280;font-size:11px;margin-right:6px;font-family:monospace}
.lorasae .lsae-tok{white-space:pre-wrap;padding:1px 0;border-radius:3px;font-family:monospace}
.lorasae .lsae-tok.lsae-max{outline:2px solid #1f2937;font-weight:700}
.lorasae .lsae-more{color:#6b7280;font-style:italic;font-size:12px}
.lorasae table.lsae-table{border-collapse:collapse;font-size:12px}
.lorasae table.lsae-table th,.lorasae table.lsae-table td{border-bottom:1px solid #e5e7eb;
padding:2px 8px;text-align:left;vertical-align:top}
.lorasae .lsae-error{color:#b91c1c}
.lorasae .lsae-chip{display:inline-block;border:1px solid #d1d5db;border-radius:3px;padding:0 4px;
margin:1px 2px;font-family:monospace;white-space:pre}
.lorasae ol.lsae-contexts{margin:2px 0;padding-left:2.2em}
.lorasae .lsae-act{display:inline-block;min-width:4em;color:#374151;font-size:11px}
</style>"""


# ------------------------------------------------------------------ small pieces


def _e(value: object) -> str:
    """``value`` as text, escaped for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _more(count: int, what: str) -> str:
    return f'<div class="lsae-more">… {count} more {_e(what)} not shown</div>' if count > 0 else ""


def _names(names: Sequence[str], limit: int = MAX_NAMES) -> str:
    """A short list for a repr: at most ``limit`` names, then "+k more"."""
    shown = ", ".join(repr(n) for n in names[:limit])
    extra = f", +{len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{extra}]"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def latent_hue(index: int) -> float:
    """The hue (degrees) a latent's tokens are coloured with: golden-angle steps, so neighbouring
    indices get clearly different colours."""
    return (index * GOLDEN_ANGLE) % 360.0


def _background(index: int, level: float) -> str:
    """The background of a token whose top latent is ``index`` at ``level`` (0..1) of the row's max
    (as the viewer's page: 0.1 + 0.75 * level opacity)."""
    level = max(0.0, min(1.0, level))
    return f"background:hsla({latent_hue(index):.1f},80%,55%,{0.1 + 0.75 * level:.3f})"


def _orange(level: float) -> str:
    """The viewer's colour for one latent's activation at ``level`` (0..1) of its max."""
    level = max(0.0, min(1.0, level))
    return f"background:rgba(234,88,12,{0.1 + 0.75 * level:.3f})"


def _table(columns: Sequence[str], rows: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    return f'<table class="lsae-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _row(cells: Sequence[str], attrs: str = "") -> str:
    """A table row of cells already escaped."""
    return f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _wrap(kind: str, body: str, attrs: str = "") -> str:
    return f'<div class="lorasae lorasae-{kind}"{attrs}>{STYLE}{body}</div>'


# ------------------------------------------------------------------ features


def _top(feats: Sequence[FeatureEntry]) -> FeatureEntry | None:
    best = None
    for f in feats:
        if best is None or f.activation > best.activation:
            best = f
    return best


def _token_title(tok: TokenResult, sae: str, feats: Sequence[FeatureEntry]) -> str:
    ranked = sorted(feats, key=lambda f: -f.activation)
    lines = [f"position {tok.position} · id {tok.id}"]
    loss = "– (last token)" if tok.loss is None else _fmt(tok.loss)
    lines.append(f"next-token loss {loss}")
    if sae in tok.recon_error:
        lines.append(f"reconstruction error {_fmt(tok.recon_error[sae])}")
    if not ranked:
        lines.append("no active latent")
    for f in ranked[:TOOLTIP_LATENTS]:
        lines.append(f"latent {f.index}: {_fmt(f.activation)}")
    if len(ranked) > TOOLTIP_LATENTS:
        lines.append(f"… {len(ranked) - TOOLTIP_LATENTS} more")
    return "\n".join(lines)


def _strip(tokens: Sequence[TokenResult], sae: str, limit: int) -> str:
    """One input's tokens as spans coloured by each token's top latent of ``sae``: hue from the
    latent's index, opacity from its activation relative to the largest top activation of the row
    (after position 0, whose norm is an outlier in most models, as in the viewer)."""
    tops = [_top(t.features.get(sae, ())) for t in tokens]
    scale = [top.activation for top in (tops[1:] if len(tops) > 1 else tops) if top is not None]
    row_max = max(scale, default=0.0)
    spans = []
    for tok, top in zip(tokens[:limit], tops[:limit]):
        feats = tok.features.get(sae, ())
        title = _e(_token_title(tok, sae, feats))
        if top is None or top.activation <= 0:
            spans.append(
                f'<span class="lsae-tok" data-position="{tok.position}" data-latent="" '
                f'title="{title}">{_e(tok.text)}</span>'
            )
            continue
        level = top.activation / row_max if row_max > 0 else 1.0
        spans.append(
            f'<span class="lsae-tok" style="{_background(top.index, level)}" '
            f'data-position="{tok.position}" data-latent="{top.index}" title="{title}">{_e(tok.text)}</span>'
        )
    return "".join(spans)


def features_html(resp: FeaturesResponse) -> str:
    """A token strip per input and SAE, coloured by each token's top latent (hover: its top latents
    and next-token loss). At most ``MAX_TOKENS`` spans in all."""
    tokens = sum(len(r.tokens) for r in resp.results)
    adapter = "base model" if resp.adapter is None else f"adapter {resp.adapter}"
    parts = [
        f'<div class="lsae-head">{_e(resp.model)} · {_e(adapter)} · {_plural(len(resp.results), "input")}'
        f" · {_plural(tokens, 'token')}</div>",
        '<div class="lsae-note">colour: hue = the token\'s top latent, strength = its activation '
        "relative to the row's largest (after position 0); hover a token for its top latents and "
        "next-token loss</div>",
    ]
    for w in resp.warnings:
        parts.append(f'<div class="lsae-warn">{_e(w.code)}: {_e(_cut(w.message))}</div>')
    saes = resp.saes[:MAX_SAES]
    budget = MAX_TOKENS // max(1, len(saes))
    for sae in saes:
        parts.append(
            f'<div class="lsae-sae" data-sae="{_e(sae.id)}">SAE {_e(sae.id)} · layer {sae.layer} · '
            f"d_sae {sae.d_sae}</div>"
        )
        left = budget
        for i, result in enumerate(resp.results):
            if i >= MAX_INPUTS or left <= 0:
                rest = len(resp.results) - i
                rest_tokens = sum(len(r.tokens) for r in resp.results[i:])
                parts.append(_more(rest, f"input{'' if rest == 1 else 's'} ({rest_tokens} tokens)"))
                break
            limit = min(MAX_TOKENS_PER_INPUT, left)
            shown = min(limit, len(result.tokens))
            left -= shown
            parts.append(
                f'<div class="lsae-strip" data-input="{i}" data-sae="{_e(sae.id)}">'
                f'<span class="lsae-label">{i}</span>{_strip(result.tokens, sae.id, limit)}</div>'
            )
            parts.append(_more(len(result.tokens) - shown, "tokens"))
    parts.append(_more(len(resp.saes) - len(saes), "SAEs"))
    return _wrap("features", "".join(parts))


def features_repr(resp: FeaturesResponse) -> str:
    tokens = sum(len(r.tokens) for r in resp.results)
    warned = f", {_plural(len(resp.warnings), 'warning')}" if resp.warnings else ""
    return (
        f"FeaturesResponse(model={resp.model!r}, adapter={resp.adapter!r}, "
        f"{_plural(len(resp.results), 'input')}, {_plural(tokens, 'token')}, "
        f"SAEs {_names([s.id for s in resp.saes])}{warned})"
    )


# ------------------------------------------------------------------ latent records


def histogram_svg(h: Histogram, width: int = 320, height: int = 70) -> str:
    """The activation histogram as inline SVG bars: the bins from one before the first non-empty
    one to one after the last (at most ``MAX_BINS``), each with its range and count as a tooltip."""
    counts, edges = h.counts, h.edges
    nonzero = [i for i, c in enumerate(counts) if c > 0]
    if not nonzero:
        return '<div class="lsae-note">histogram: no activation</div>'
    first = max(0, nonzero[0] - 1)
    last = min(len(counts) - 1, nonzero[-1] + 1, first + MAX_BINS - 1)

    def low(i: int) -> float:
        return 0.0 if i == 0 or i - 1 >= len(edges) else edges[i - 1]

    def label(i: int) -> str:
        return f"≥ {_fmt(low(i))}" if i >= len(edges) else f"[{_fmt(low(i))}, {_fmt(edges[i])})"

    top = max(counts[first : last + 1])
    bw = width / (last - first + 1)
    bars = []
    for i in range(first, last + 1):
        bar = (height - 14) * counts[i] / top if top > 0 else 0.0
        bars.append(
            f'<rect x="{(i - first) * bw + 0.5:.2f}" y="{height - bar:.2f}" '
            f'width="{max(0.5, bw - 1):.2f}" height="{bar:.2f}" fill="#ea580c" data-bin="{i}" '
            f'data-count="{counts[i]}"><title>{_e(label(i))}: {counts[i]}</title></rect>'
        )
    ticks = (
        f'<text x="0" y="{height + 12}" font-size="10" fill="#6b7280">{_e(_fmt(low(first)))}</text>'
        f'<text x="{width}" y="{height + 12}" font-size="10" fill="#6b7280" text-anchor="end">'
        f"{_e(label(last) if last >= len(edges) else _fmt(edges[last]))}</text>"
        f'<text x="{width / 2:.0f}" y="10" font-size="10" fill="#6b7280" text-anchor="middle">'
        f"max count {top}</text>"
    )
    return (
        f'<svg class="lsae-histogram" width="{width}" height="{height + 16}" '
        f'viewBox="0 0 {width} {height + 16}" role="img">'
        f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#9ca3af"/>'
        f"{''.join(bars)}{ticks}</svg>"
    )


def _context(c: LatentContext, top: float) -> str:
    """One context window, tokens coloured by their activation relative to the latent's max; the
    token the context is about (``position``) outlined."""
    center = c.position - c.start
    lo = max(0, min(center - MAX_CONTEXT_TOKENS // 2, len(c.tokens) - MAX_CONTEXT_TOKENS))
    spans = []
    for i in range(lo, min(len(c.tokens), lo + MAX_CONTEXT_TOKENS)):
        t = c.tokens[i]
        style = f' style="{_orange(t.activation / top)}"' if t.activation > 0 and top > 0 else ""
        cls = "lsae-tok lsae-max" if i == center else "lsae-tok"
        spans.append(
            f'<span class="{cls}"{style} title="id {t.id} · activation {_e(_fmt(t.activation))}">'
            f"{_e(t.text)}</span>"
        )
    where = f"sequence {c.sequence}, position {c.position}" + (f", {c.interval}" if c.interval else "")
    return (
        f'<li data-sequence="{c.sequence}" data-position="{c.position}">'
        f'<span class="lsae-act" title="{_e(where)}">{_e(_fmt(c.activation))}</span>{"".join(spans)}</li>'
    )


def _contexts(title: str, contexts: Sequence[LatentContext], top: float, kind: str) -> str:
    if not contexts:
        return f'<div class="lsae-sae">{_e(title)}</div><div class="lsae-note">none</div>'
    items = "".join(_context(c, top) for c in contexts[:MAX_CONTEXTS])
    return (
        f'<div class="lsae-sae">{_e(title)}</div><ol class="lsae-contexts" data-kind="{kind}">{items}</ol>'
        f"{_more(len(contexts) - MAX_CONTEXTS, 'contexts')}"
    )


def _chips(values: Sequence[TokenValue]) -> str:
    if not values:
        return '<span class="lsae-note">none</span>'
    chips = "".join(
        f'<span class="lsae-chip" title="id {v.id}">{_e(v.text)} <small>{v.value:+.3g}</small></span>'
        for v in values[:MAX_EFFECTS]
    )
    if len(values) > MAX_EFFECTS:
        chips += f' <span class="lsae-more">… {len(values) - MAX_EFFECTS} more</span>'
    return chips


def latent_html(rec: LatentRecord) -> str:
    """A latent's dashboard: density and activations, the histogram, top and quantile contexts
    (the context token outlined), and the tokens it promotes and suppresses."""
    d = rec.dashboard
    adapter = f" · adapter {_e(rec.adapter)}" if rec.adapter else ""
    dead = ' · <span class="lsae-error">dead</span>' if rec.dead else ""
    top = rec.max_activation or max((c.activation for c in rec.top_contexts), default=0.0)
    effect = rec.causal_effect
    effects = [
        ("logit lens promotes", rec.logit_lens.promoted),
        ("logit lens suppresses", rec.logit_lens.suppressed),
        (f"causal effect promotes ({effect.contexts} contexts)", effect.promoted),
        ("causal effect suppresses", effect.suppressed),
    ]
    parts = [
        f'<div class="lsae-head">Latent {rec.index} of {_e(rec.sae)}{adapter}{dead}</div>',
        f'<div class="lsae-note">density {rec.density:.3%} ({rec.fired:,} of {d.tokens:,} tokens) · mean '
        f"{_fmt(rec.mean_activation)} · max {_fmt(rec.max_activation)} · corpus "
        f"{_e(d.corpus)}/{_e(d.split)}, ctx {d.ctx}</div>",
        histogram_svg(rec.histogram),
        _contexts("Top contexts", rec.top_contexts, top, "top"),
        _contexts("Quantile samples", rec.quantile_contexts, top, "quantile"),
        '<table class="lsae-table lsae-effects"><tbody>',
        *(f"<tr><th>{_e(label)}</th><td>{_chips(values)}</td></tr>" for label, values in effects),
        "</tbody></table>",
    ]
    attrs = f' data-sae="{_e(rec.sae)}" data-index="{rec.index}"'
    return _wrap("latent", "".join(parts), attrs)


def latent_repr(rec: LatentRecord) -> str:
    dead = ", dead" if rec.dead else ""
    return (
        f"LatentRecord(sae={rec.sae!r}, index={rec.index}, adapter={rec.adapter!r}, "
        f"density={rec.density:.4g}, max_activation={rec.max_activation:.4g}, "
        f"{_plural(len(rec.top_contexts), 'top context')}{dead})"
    )


# ------------------------------------------------------------------ adapters

ADAPTER_COLUMNS = ("name", "status", "rank", "SAEs", "source", "created", "error")


def _adapter_row(a: AdapterInfo) -> str:
    saes = [s.id for s in a.saes]
    sae_text = ", ".join(saes[:MAX_NAMES])
    if len(saes) > MAX_NAMES:
        sae_text += f", +{len(saes) - MAX_NAMES} more"
    source = a.source + (f": {a.path}" if a.path and a.source == "path" else "")
    status = f'<span class="lsae-error">{_e(a.status)}</span>' if a.status != "ready" else _e(a.status)
    error = ""
    if a.error:
        error = (
            f'<span class="lsae-error" title="{_e(_cut(a.error, 4 * MAX_TEXT))}">{_e(_cut(a.error))}</span>'
        )
    cells = (
        _e(a.name),
        status,
        "–" if a.rank is None else str(a.rank),
        _e(sae_text),
        _e(_cut(source, 80)),
        _e(a.created_at),
        error,
    )
    return _row(cells, f' data-adapter="{_e(a.name)}"')


def adapters_html(adapters: Sequence[AdapterInfo]) -> str:
    """A table, one row per adapter (at most ``MAX_ROWS``)."""
    if not adapters:
        return _wrap("adapters", '<div class="lsae-note">no adapters registered</div>')
    body = (
        f'<div class="lsae-head">{_plural(len(adapters), "adapter")}</div>'
        + _table(ADAPTER_COLUMNS, [_adapter_row(a) for a in adapters[:MAX_ROWS]])
        + _more(len(adapters) - MAX_ROWS, "adapters")
    )
    return _wrap("adapters", body)


def adapter_html(adapter: AdapterInfo) -> str:
    return adapters_html([adapter])


def adapter_list_html(listing: AdapterList) -> str:
    return adapters_html(listing.adapters)


def adapter_repr(a: AdapterInfo) -> str:
    error = f", error={_cut(a.error, 60)!r}" if a.error else ""
    return (
        f"AdapterInfo(name={a.name!r}, status={a.status!r}, rank={a.rank}, "
        f"SAEs {_names([s.id for s in a.saes])}, source={a.source!r}{error})"
    )


def adapters_repr(listing: AdapterList) -> str:
    names = _names([a.name for a in listing.adapters])
    return f"AdapterList({_plural(len(listing.adapters), 'adapter')}: {names})"


# ------------------------------------------------------------------ drift

_DRIFT_SAE_COLUMNS = ("SAE", "layer", "input drifted", "output drifted", "alive", "measured", "note")
_DRIFT_COLUMNS = (
    "rank",
    "SAE",
    "latent",
    "score",
    "sides",
    "density ref → adapted",
    "pearson",
    "effect cosine",
    "promoted ref → adapted",
    "evidence",
)


def _token_texts(tokens: Sequence[DriftToken], limit: int = 6) -> str:
    return " ".join(repr(t.text) for t in tokens[:limit]) + (" …" if len(tokens) > limit else "")


def _drift_sae_row(s: DriftSaeInfo) -> str:
    m = s.summary
    cells = (
        _e(s.sae),
        str(s.layer),
        f"{m.input_drifted} ({m.input_fraction:.1%})",
        f"{m.output_drifted} ({m.output_fraction:.1%})",
        str(m.alive),
        str(m.measured),
        "input identical by construction" if s.input_identical_by_construction else "",
    )
    return _row(cells, f' data-sae="{_e(s.sae)}"')


def _drift_row(x: DriftLatent) -> str:
    cells = (
        str(x.rank),
        _e(x.sae),
        str(x.latent),
        _fmt(x.score),
        _e("+".join(x.sides)),
        f"{_fmt(x.density_reference)} → {_fmt(x.density_adapted)}",
        _fmt(x.pearson),
        _fmt(x.effect_cosine),
        f"{_e(_token_texts(x.promoted_reference))} → {_e(_token_texts(x.promoted_adapted))}",
        _e(_cut(x.evidence)),
    )
    return _row(cells, f' data-sae="{_e(x.sae)}" data-latent="{x.latent}"')


def drift_html(report: DriftReport) -> str:
    """Per SAE how many latents drifted beyond noise, then the page of latents, most drifted first."""
    against = "the base model" if report.against is None else f"adapter {report.against}"
    first = report.offset + 1 if report.latents else report.offset
    parts = [
        f'<div class="lsae-head">Drift of adapter {_e(report.adapter)} against {_e(against)}</div>',
        f'<div class="lsae-note">corpus {_e(report.corpus)}/{_e(report.split)} · {report.tokens:,} tokens'
        f" · side {_e(report.side)} · latents {first}–{report.offset + len(report.latents)} of "
        f"{report.total} · made {_e(report.created_at)}</div>",
        _table(_DRIFT_SAE_COLUMNS, [_drift_sae_row(s) for s in report.saes[:MAX_ROWS]]),
        _more(len(report.saes) - MAX_ROWS, "SAEs"),
        '<div class="lsae-sae">Latents</div>',
        _table(_DRIFT_COLUMNS, [_drift_row(x) for x in report.latents[:MAX_ROWS]])
        if report.latents
        else '<div class="lsae-note">none on this page</div>',
        _more(len(report.latents) - MAX_ROWS, "latents"),
    ]
    return _wrap("drift", "".join(parts))


def drift_repr(report: DriftReport) -> str:
    return (
        f"DriftReport(adapter={report.adapter!r}, against={report.against!r}, side={report.side!r}, "
        f"SAEs {_names([s.sae for s in report.saes])}, {len(report.latents)} of {report.total} latents)"
    )


# ------------------------------------------------------------------ search hits and generations

_SEARCH_COLUMNS = ("latent", "density", "max", "top tokens", "promoted", "score")
_GENERATION_COLUMNS = ("prompt", "variant", "adapter", "tokens", "finish", "text")


def _search_row(h: LatentSummary) -> str:
    cells = (
        str(h.index) + (' <span class="lsae-error">dead</span>' if h.dead else ""),
        f"{h.density:.3%}",
        _fmt(h.max_activation),
        _e(_cut(" ".join(repr(t) for t in h.top_tokens[:8]), 120)),
        _e(_cut(" ".join(repr(t) for t in h.promoted[:8]), 120)),
        _fmt(h.score),
    )
    return _row(cells, f' data-latent="{h.index}"')


def search_html(resp: LatentSearchResponse) -> str:
    adapter = f" · adapter {_e(resp.adapter)}" if resp.adapter else ""
    body = (
        f'<div class="lsae-head">{len(resp.latents)} of {resp.total} latents of {_e(resp.sae)}{adapter}</div>'
        + _table(_SEARCH_COLUMNS, [_search_row(h) for h in resp.latents[:MAX_ROWS]])
        + _more(len(resp.latents) - MAX_ROWS, "latents")
    )
    return _wrap("search", body)


def search_repr(resp: LatentSearchResponse) -> str:
    return (
        f"LatentSearchResponse(sae={resp.sae!r}, adapter={resp.adapter!r}, "
        f"{len(resp.latents)} of {resp.total} latents)"
    )


def _generation_row(g: Generation) -> str:
    cells = (
        str(g.prompt),
        _e(g.variant),
        _e(g.adapter or "–"),
        str(len(g.tokens)),
        _e(g.finish_reason),
        f'<span class="lsae-tok">{_e(_cut(g.text))}</span>',
    )
    return _row(cells)


def generate_html(resp: GenerateResponse) -> str:
    u = resp.usage
    parts = [
        f'<div class="lsae-head">{_e(resp.model)} · {_e(resp.mode)} · '
        f"{_plural(len(resp.generations), 'generation')} · {u.generated_tokens} tokens in "
        f"{u.seconds:.2f} s</div>",
        *(f'<div class="lsae-warn">{_e(w.code)}: {_e(_cut(w.message))}</div>' for w in resp.warnings),
        _table(_GENERATION_COLUMNS, [_generation_row(g) for g in resp.generations[:MAX_ROWS]]),
        _more(len(resp.generations) - MAX_ROWS, "generations"),
    ]
    return _wrap("generate", "".join(parts))


def generate_repr(resp: GenerateResponse) -> str:
    return (
        f"GenerateResponse(model={resp.model!r}, mode={resp.mode!r}, "
        f"{_plural(len(resp.generations), 'generation')}, {resp.usage.generated_tokens} tokens, "
        f"SAEs {_names([s.id for s in resp.saes])})"
    )
