"""The wire format of the lorasae feature server: request and response models, defined once.

The server (``lorasae.service``) imports these models for validation and its OpenAPI docs; the
client parses responses into them. pydantic only, no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

if TYPE_CHECKING:
    import pandas as pd

LogitsMode = Literal["none", "top_k", "full"]
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch; reserved
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


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

    @field_validator("inputs")
    @classmethod
    def _not_empty(cls, value: str | list[str] | list[list[int]]) -> str | list[str] | list[list[int]]:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("empty text")
            return value
        if not value:
            raise ValueError("empty list of inputs")
        for i, item in enumerate(value):
            if isinstance(item, str) and not item.strip():
                raise ValueError(f"input {i} is empty text")
            if isinstance(item, list) and not item:
                raise ValueError(f"input {i} is an empty list of token ids")
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


class InputResult(_Model):
    tokens: list[TokenResult]


class SaeInfo(_Model):
    id: str
    layer: int
    d_sae: int
    hook_name: str | None = None


class FeaturesResponse(_Model):
    model: str
    adapter: str | None = None
    saes: list[SaeInfo]
    results: list[InputResult]

    def to_pandas(self) -> pd.DataFrame:
        """One row per (input, token, SAE, latent): a long table for notebooks (needs pandas).

        Columns: input, position, token_id, token, loss, sae, layer, latent, activation, recon_error.
        Tokens with no active latent in an SAE give no row for that SAE.
        """
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_pandas() needs pandas: pip install 'lorasae-client[pandas]'") from exc
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


class AdapterList(_Model):
    adapters: list[AdapterInfo]


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
