"""The wire format of the lorasae feature server: request and response models, defined once.

The server (``lorasae.service``) imports these models for validation and its OpenAPI docs; the
client parses responses into them. pydantic only, no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from . import display

if TYPE_CHECKING:
    import pandas as pd

LogitsMode = Literal["none", "top_k", "full"]
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch; reserved
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _no_empty_texts(value: object, what: str) -> None:
    """Refuse an empty text, an empty list, and empty texts / id lists inside it (``what``: how the
    items are called in the message)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty text")
        return
    if not isinstance(value, list) or not value:
        raise ValueError(f"empty list of {what}s")
    for i, item in enumerate(value):
        if isinstance(item, str) and not item.strip():
            raise ValueError(f"{what} {i} is empty text")
        if isinstance(item, list) and not item:
            raise ValueError(f"{what} {i} is an empty list of token ids")


# ------------------------------------------------------------------ features


class FeaturesRequest(BaseModel):
    """``POST /v1/features``. ``inputs``: one text, a list of texts, or a list of token-id lists.

    Texts are tokenised without special tokens and get the model's BOS prepended (as in training);
    token ids are used as given. ``adapter`` null runs the base model with the SAE(s) spliced in.
    ``saes`` selects the SAEs spliced in and reported (ids, folder names or layer numbers as
    strings); null means all loaded SAEs, or with an adapter the SAEs it was trained with.
    """

    model_config = ConfigDict(extra="forbid")

    inputs: StrictStr | list[StrictStr] | list[list[StrictInt]] = Field(
        ..., description="text, list of texts, or list of token-id lists"
    )
    adapter: StrictStr | None = Field(None, description="registered adapter name; null = base model")
    saes: list[StrictStr] | None = Field(None, description="SAE ids / folder names / layers to splice")
    top_k: StrictInt = Field(8, ge=1, le=1024, description="latents reported per token and SAE")
    logits: LogitsMode = Field("none", description="none | top_k | full (next-token logits)")
    logits_top_k: StrictInt = Field(5, ge=1, le=1000, description="entries when logits = top_k")
    latents: dict[StrictStr, list[StrictInt]] | None = Field(
        None,
        description="SAE id -> latent indices whose activation is returned at every token "
        "(TokenResult.latents), whether or not they are among the top_k",
    )

    @field_validator("inputs")
    @classmethod
    def _not_empty(cls, value: str | list[str] | list[list[int]]) -> str | list[str] | list[list[int]]:
        _no_empty_texts(value, "input")
        return value

    @field_validator("saes")
    @classmethod
    def _saes_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("empty list of SAEs (use null for the default)")
        return value

    def input_list(self) -> list[str] | list[list[int]]:
        """``inputs`` as a list (a single text becomes a one-item list)."""
        if isinstance(self.inputs, str):
            return [self.inputs]
        return self.inputs.copy()  # a new list, as list(); list() of the union would type as a join


class FeatureEntry(_Model):
    index: int
    activation: float


class LogitEntry(_Model):
    id: int
    text: str
    logit: float
    logprob: float


class TokenResult(_Model):
    """One token. ``loss``, ``top_logits`` and ``logits`` are about predicting the *next* token
    (``loss`` is null at the last position); ``recon_error`` is the squared L2 norm of the SAE's
    reconstruction error at this token (position 0 keeps its clean activation but is still encoded)."""

    position: int
    id: int
    text: str
    loss: float | None = None
    features: dict[str, list[FeatureEntry]] = Field(default_factory=dict)
    recon_error: dict[str, float] = Field(default_factory=dict)
    top_logits: list[LogitEntry] | None = None
    logits: list[float] | None = None
    latents: dict[str, dict[str, float]] | None = Field(
        None, description="SAE id -> {latent index: activation} for the latents the request named"
    )


class InputResult(_Model):
    tokens: list[TokenResult]


class SaeInfo(_Model):
    id: str
    layer: int
    d_sae: int
    hook_name: str | None = None


class ResponseWarning(_Model):
    """Something about an answer the caller should know; the answer is still what was asked.

    ``splice_set_differs``: the request splices other SAEs than the adapter was trained with (an
    adapter trained for a set of SAEs can make CE worse than no adapter with part of the set);
    ``measured`` has the held-out CE of that subset without / with the adapter when its training
    run measured it (``ce_spliced``, ``ce_adapted_spliced``, ``gap_closed``)."""

    code: str
    message: str
    measured: dict[str, float | None] | None = None


class FeaturesResponse(_Model):
    model: str
    adapter: str | None = None
    saes: list[SaeInfo]
    results: list[InputResult]
    warnings: list[ResponseWarning] = Field(default_factory=list)

    def __repr__(self) -> str:
        return display.features_repr(self)

    def _repr_html_(self) -> str:
        return display.features_html(self)

    def to_pandas(self) -> pd.DataFrame:
        """One row per (input, token, SAE, latent): a long table for notebooks (needs pandas).

        Columns: input, position, token_id, token, loss, sae, layer, latent, activation, recon_error.
        Tokens with no active latent in an SAE give no row for that SAE. The latents a request
        named with ``latents=`` are in ``latents_frame()``.
        """
        pd = _pandas()
        layers = {s.id: s.layer for s in self.saes}
        rows = []
        for i, result in enumerate(self.results):
            for tok in result.tokens:
                for sae_id, feats in tok.features.items():
                    err = tok.recon_error.get(sae_id)
                    for f in feats:
                        rows.append(
                            (
                                i,
                                tok.position,
                                tok.id,
                                tok.text,
                                tok.loss,
                                sae_id,
                                layers.get(sae_id),
                                f.index,
                                f.activation,
                                err,
                            )
                        )
        columns = [
            "input",
            "position",
            "token_id",
            "token",
            "loss",
            "sae",
            "layer",
            "latent",
            "activation",
            "recon_error",
        ]
        return pd.DataFrame(rows, columns=columns)

    def latents_frame(self) -> pd.DataFrame:
        """The activations of the latents the request named (``features(..., latents={sae: [...]})``)
        as a long table, one row per (input, token, SAE, latent), zeros included (needs pandas).

        Columns: input, position, token_id, token, sae, layer, latent, activation; rows in input,
        token, then response order. Empty (same columns) when the request named no latents. For
        one column per latent: ``df.pivot_table(index=["input", "position"], columns=["sae",
        "latent"], values="activation")``.
        """
        pd = _pandas()
        layers = {s.id: s.layer for s in self.saes}
        rows = [
            (i, tok.position, tok.id, tok.text, sae_id, layers.get(sae_id), int(index), activation)
            for i, result in enumerate(self.results)
            for tok in result.tokens
            for sae_id, values in (tok.latents or {}).items()
            for index, activation in values.items()
        ]
        columns = ["input", "position", "token_id", "token", "sae", "layer", "latent", "activation"]
        dtypes = {"input": "int64", "position": "int64", "token_id": "int64", "latent": "int64"}
        return pd.DataFrame(rows, columns=columns).astype({**dtypes, "activation": "float64"})


# ------------------------------------------------------------------ generation and steering

InterventionOp = Literal["set", "add", "scale"]
InterventionPositions = Literal["all", "prompt", "generated"]
GenerationMode = Literal["spliced", "error-preserving"]
Variant = Literal["base", "adapter", "unsteered", "steered"]
FinishReason = Literal["length", "stop", "eos"]
MAX_INTERVENTION_VALUE = 1e4


class Intervention(BaseModel):
    """Edit one latent of a spliced SAE before it is decoded, at every forward of the generation
    (the prompt's and every cached decode step's). ``set``: the latent becomes ``value``; ``add``:
    ``value`` is added; ``scale``: the latent is multiplied by ``value``. ``positions``: the prompt's
    tokens, the generated tokens (as they are fed back in), or both."""

    model_config = ConfigDict(extra="forbid")

    sae: StrictStr = Field(..., max_length=512, description="SAE id / folder name / layer, as in saes")
    latent: StrictInt = Field(..., ge=0, le=1 << 30)
    op: InterventionOp
    value: float = Field(..., ge=-MAX_INTERVENTION_VALUE, le=MAX_INTERVENTION_VALUE, allow_inf_nan=False)
    positions: InterventionPositions = "all"


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: continue ``prompt`` (a text, token ids, or a list of either) with the
    SAEs spliced (``saes`` as in /v1/features) and the ``interventions`` applied.

    ``temperature`` 0 is greedy; otherwise softmax sampling at that temperature from the smallest set
    of tokens whose probability reaches ``top_p``, reproducible with ``seed``. Generation stops at
    ``max_new_tokens``, at the model's end-of-sequence token, or when the generated text contains a
    ``stop`` string (cut before it). ``mode``: ``spliced`` decodes the edited latents (what an
    adapted model is trained for); ``error-preserving`` adds decode(edited) - decode(original) to
    the model's own activation (steering without the reconstruction error). ``compare``: also the
    control (unsteered when there are interventions, else the base model next to ``adapter``) with
    the same seed, and per step the KL divergence from the treatment's next-token distribution to
    the control model's on the treatment's own text. ``return_features``: the top latents of each
    generated token (after the interventions: what was decoded). ``stream``: Server-Sent Events,
    one ``token`` event per generated token and a final ``done`` event with the whole answer."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]] = Field(
        ..., description="text, token ids, or a list of texts / token-id lists"
    )
    adapter: StrictStr | None = Field(None, description="registered adapter name; null = base model")
    saes: list[StrictStr] | None = Field(None, description="SAEs spliced while generating")
    max_new_tokens: StrictInt = Field(32, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 63)
    stop: list[StrictStr] = Field(default_factory=list, max_length=8)
    stream: bool = False
    interventions: list[Intervention] = Field(default_factory=list, max_length=32)
    mode: GenerationMode = "spliced"
    compare: bool = False
    return_features: StrictInt | None = Field(None, ge=1, le=64)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(
        cls, value: str | list[int] | list[str] | list[list[int]]
    ) -> str | list[int] | list[str] | list[list[int]]:
        _no_empty_texts(value, "prompt")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str]) -> list[str]:
        for s in value:
            if not s or len(s) > 64:
                raise ValueError("each stop string has 1 to 64 characters")
        return value

    @field_validator("saes")
    @classmethod
    def _saes_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("empty list of SAEs (use null for the default)")
        return value

    def prompt_list(self) -> list[str] | list[list[int]]:
        """``prompt`` as a list of prompts (one text or one token-id list becomes a one-item list)."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(x, int) for x in value):
            return [[x for x in value if isinstance(x, int)]]
        if all(isinstance(x, str) for x in value):
            return [x for x in value if isinstance(x, str)]
        return [x for x in value if isinstance(x, list)]


class GeneratedToken(_Model):
    id: int
    text: str
    features: dict[str, list[FeatureEntry]] | None = Field(
        None, description="SAE id -> top latents at this token, after the interventions (return_features)"
    )


class Generation(_Model):
    """One continuation: of prompt ``prompt`` (index), as ``variant``."""

    prompt: int
    variant: Variant
    adapter: str | None = None
    steered: bool
    prompt_tokens: int
    text: str
    tokens: list[GeneratedToken]
    finish_reason: FinishReason
    kl: list[float] | None = Field(
        None,
        description="compare, on the treatment: per step, KL(treatment || control) of the next-token "
        "distributions on the treatment's own prefix (nats)",
    )


class GenerationUsage(_Model):
    prompt_tokens: int
    generated_tokens: int
    steps: int
    seconds: float
    tokens_per_second: float


class GenerateResponse(_Model):
    model: str
    mode: GenerationMode
    saes: list[SaeInfo]
    generations: list[Generation]
    usage: GenerationUsage
    warnings: list[ResponseWarning] = Field(default_factory=list)

    def __repr__(self) -> str:
        return display.generate_repr(self)

    def _repr_html_(self) -> str:
        return display.generate_html(self)

    def to_pandas(self) -> pd.DataFrame:
        """One row per generated token (needs pandas). Columns: prompt, variant, step, token_id,
        token, kl (the treatment's, else NaN)."""
        pd = _pandas()
        rows = [
            (g.prompt, g.variant, s, t.id, t.text, g.kl[s] if g.kl and s < len(g.kl) else float("nan"))
            for g in self.generations
            for s, t in enumerate(g.tokens)
        ]
        return pd.DataFrame(rows, columns=["prompt", "variant", "step", "token_id", "token", "kl"])


class TokenEvent(_Model):
    """A streamed ``token`` event: generation ``generation`` (index into the final answer's
    ``generations``) produced token ``index``; ``kl`` on the treatment in compare mode."""

    generation: int
    prompt: int
    variant: Variant
    index: int
    id: int
    text: str
    features: dict[str, list[FeatureEntry]] | None = None
    kl: float | None = None


# ------------------------------------------------------------------ latent dashboards


class TokenActivation(_Model):
    """One token of a context window and the latent's activation there."""

    id: int
    text: str
    activation: float


class LatentContext(_Model):
    """A window of a corpus sequence around a token where the latent fired.

    ``sequence`` indexes the packed ``[BOS] + ctx-1`` sequences of the dashboard's corpus split;
    ``position`` is the token (in that sequence) the context is about, ``tokens[position - start]``.
    ``interval`` names the activation quantile band a sampled context was drawn from."""

    sequence: int
    position: int
    activation: float
    start: int
    tokens: list[TokenActivation]
    interval: str | None = None


class TokenValue(_Model):
    id: int
    text: str
    value: float


class TokenEffects(_Model):
    """Next tokens a latent promotes (largest positive values) and suppresses (most negative)."""

    promoted: list[TokenValue]
    suppressed: list[TokenValue]


class CausalEffect(TokenEffects):
    """Mean change of next-token log-probabilities over ``contexts`` top contexts when the latent
    alone is removed from the reconstruction (sign flipped: what the latent *adds*)."""

    contexts: int


class Histogram(_Model):
    """Counts per activation bin: ``counts[0]`` is ``(0, edges[0])``, ``counts[i]`` is
    ``[edges[i-1], edges[i])``, the last is ``>= edges[-1]``."""

    edges: list[float]
    counts: list[int]


class DashboardInfo(_Model):
    """Where a latent record comes from."""

    adapter: str | None = None
    corpus: str
    split: str
    tokens: int
    ctx: int


class LatentRecord(_Model):
    """``GET /v1/saes/{sae}/latents/{index}``: what a latent fires on and what it does."""

    sae: str
    index: int
    adapter: str | None = None
    dashboard: DashboardInfo
    dead: bool
    fired: int
    density: float
    mean_activation: float
    max_activation: float
    histogram: Histogram
    top_contexts: list[LatentContext]
    quantile_contexts: list[LatentContext]
    logit_lens: TokenEffects
    causal_effect: CausalEffect

    def __repr__(self) -> str:
        return display.latent_repr(self)

    def _repr_html_(self) -> str:
        return display.latent_html(self)

    def to_pandas(self) -> pd.DataFrame:
        """One row per context (top, then quantile samples): kind, interval, sequence, position,
        activation and the window's text with the context token in [[brackets]] (needs pandas)."""
        pd = _pandas()
        rows = []
        for kind, contexts in (("top", self.top_contexts), ("quantile", self.quantile_contexts)):
            for c in contexts:
                center = c.position - c.start
                text = "".join(f"[[{t.text}]]" if i == center else t.text for i, t in enumerate(c.tokens))
                rows.append((kind, c.interval, c.sequence, c.position, c.activation, text))
        columns = ["kind", "interval", "sequence", "position", "activation", "text"]
        return pd.DataFrame(rows, columns=columns)


class LatentSummary(_Model):
    """One search hit: the latent and the evidence it was found by."""

    index: int
    density: float
    max_activation: float
    dead: bool
    top_tokens: list[str] = Field(default_factory=list, description="tokens it fires on most")
    promoted: list[str] = Field(default_factory=list, description="next tokens it promotes")
    score: float | None = Field(None, description="text-match score (with q)")


class LatentSearchResponse(_Model):
    """``GET /v1/saes/{sae}/latents``: latents matching ``q`` (ranked) or listed by ``sort``."""

    sae: str
    adapter: str | None = None
    total: int
    latents: list[LatentSummary]

    def __repr__(self) -> str:
        return display.search_repr(self)

    def _repr_html_(self) -> str:
        return display.search_html(self)

    def to_pandas(self) -> pd.DataFrame:
        pd = _pandas()
        rows = [
            (
                h.index,
                h.density,
                h.max_activation,
                h.dead,
                " ".join(h.top_tokens),
                " ".join(h.promoted),
                h.score,
            )
            for h in self.latents
        ]
        columns = ["latent", "density", "max_activation", "dead", "top_tokens", "promoted", "score"]
        return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------ latent drift

DriftSide = Literal["any", "input", "output", "all"]


class DriftThresholds(_Model):
    """Noise thresholds of one SAE: each statistic between two disjoint halves of the tokens under
    the reference model, at the report's noise quantile. A latent drifted when its |ln density
    ratio|, histogram Jensen-Shannon divergence or 1 - Pearson is above its threshold (input side),
    or its effect cosine below ``effect_cosine`` (output side)."""

    density_log_ratio: float
    hist_js: float
    pearson: float
    effect_cosine: float


class DriftSummary(_Model):
    """How many latents drifted beyond noise: ``input_fraction`` of the ``alive`` ones (fired under
    either model), ``output_fraction`` of the ``measured`` ones (an effect under both models)."""

    latents: int
    alive: int
    measured: int
    input_drifted: int
    output_drifted: int
    input_fraction: float
    output_fraction: float


class DriftSaeInfo(_Model):
    """One SAE of a drift report. ``input_identical_by_construction``: the SAE sits before every
    adapted layer, so what its latents fire on cannot change (only their effect can)."""

    sae: str
    layer: int
    d_sae: int
    first_adapted_layer: int | None = None
    input_identical_by_construction: bool
    thresholds: DriftThresholds
    summary: DriftSummary


class DriftToken(_Model):
    id: int
    text: str


class DriftLatent(_Model):
    """One latent: reference (base model or ``against``) vs adapted. Statistics that are undefined
    for it (e.g. the Pearson correlation of a latent that never fired) are null. ``rank`` is within
    its SAE (1: most drifted); ``score`` is its largest statistic over that statistic's threshold
    (above 1: drifted); ``sides`` the sides it drifted on; ``evidence`` all of it in words."""

    sae: str
    layer: int
    latent: int
    rank: int
    score: float | None = None
    sides: list[str] = Field(default_factory=list)
    input_drifted: bool
    output_drifted: bool
    fired_reference: int
    fired_adapted: int
    density_reference: float | None = None
    density_adapted: float | None = None
    density_log_ratio: float | None = None
    pearson: float | None = None
    top_jaccard: float | None = None
    hist_js: float | None = None
    effect_contexts: int
    effect_cosine: float | None = None
    effect_norm_ratio: float | None = None
    promoted_overlap: float | None = None
    promoted_reference: list[DriftToken] = Field(default_factory=list)
    promoted_adapted: list[DriftToken] = Field(default_factory=list)
    suppressed_reference: list[DriftToken] = Field(default_factory=list)
    suppressed_adapted: list[DriftToken] = Field(default_factory=list)
    evidence: str


class DriftReport(_Model):
    """``GET /v1/adapters/{name}/drift``: what adapter ``adapter`` changed about its SAEs' latents,
    against the base model (``against`` null) or another adapter. ``latents``: the page
    (``offset``, ``limit``) of the ``total`` latents that match ``side``, most drifted first."""

    adapter: str
    against: str | None = None
    corpus: str
    split: str
    tokens: int
    created_at: str
    side: DriftSide
    saes: list[DriftSaeInfo]
    total: int
    offset: int
    latents: list[DriftLatent]

    def __repr__(self) -> str:
        return display.drift_repr(self)

    def _repr_html_(self) -> str:
        return display.drift_html(self)

    def to_pandas(self) -> pd.DataFrame:
        """One row per latent of the page, most drifted first: the fields of ``DriftLatent`` (null
        statistics as NaN), ``sides`` joined with "+" ("input+output", "" for none) and each token
        list as the list of its texts (needs pandas)."""
        pd = _pandas()
        columns = list(DriftLatent.model_fields)
        rows = []
        for latent in self.latents:
            row: dict[str, Any] = {name: getattr(latent, name) for name in columns}
            row["sides"] = "+".join(latent.sides)
            for name in _DRIFT_TOKEN_LISTS:
                row[name] = [t.text for t in getattr(latent, name)]
            rows.append(row)
        return pd.DataFrame(rows, columns=columns).astype({name: "float64" for name in _DRIFT_FLOATS})


_DRIFT_TOKEN_LISTS = ("promoted_reference", "promoted_adapted", "suppressed_reference", "suppressed_adapted")
_DRIFT_FLOATS = (
    "score",
    "density_reference",
    "density_adapted",
    "density_log_ratio",
    "pearson",
    "top_jaccard",
    "hist_js",
    "effect_cosine",
    "effect_norm_ratio",
    "promoted_overlap",
)


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("to_pandas() needs pandas: pip install 'lorasae-client[pandas]'") from exc
    return pd


# ------------------------------------------------------------------ adapters


class RegisterAdapterRequest(BaseModel):
    """``POST /v1/adapters`` (JSON): register the adapter folder ``path`` (relative to the
    server's adapter root) under ``name``. An archive upload uses multipart fields ``name`` + ``file``."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(
        ...,
        pattern=ADAPTER_NAME_PATTERN,
        description="letters, digits, '.', '_' or '-'; at most 64 characters",
    )
    path: StrictStr = Field(..., min_length=1, description="adapter folder, relative to the adapter root")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved")
        return value


class AdapterInfo(_Model):
    name: str
    base_model: str
    base_model_fingerprint: str | None = None
    saes: list[SaeInfo]
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] | None = None
    layers_to_transform: list[int] | None = None
    source: Literal["path", "upload"] = "path"
    path: str | None = None
    created_at: str
    status: Literal["ready", "error"] = "ready"
    error: str | None = None
    eval_after: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return display.adapter_repr(self)

    def _repr_html_(self) -> str:
        return display.adapter_html(self)


class AdapterList(_Model):
    adapters: list[AdapterInfo]

    def __repr__(self) -> str:
        return display.adapters_repr(self)

    def _repr_html_(self) -> str:
        return display.adapter_list_html(self)


# ------------------------------------------------------------------ health / errors


class HealthResponse(_Model):
    status: str
    model: str | None = None
    saes: list[SaeInfo] = Field(default_factory=list)
    adapters: int | None = None
    detail: str | None = None


class ErrorDetail(_Model):
    code: str
    message: str


class ErrorResponse(_Model):
    error: ErrorDetail
