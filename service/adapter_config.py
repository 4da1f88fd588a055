"""What the server accepts in an adapter's ``adapter_config.json``, checked before peft reads it.

peft trusts its config: a string ``target_modules`` (also ``exclude_modules``, ``layers_pattern``
and the keys of ``rank_pattern``/``alpha_pattern``) is a regular expression matched against every
module name (a catastrophic-backtracking pattern holds the registry for minutes), wrongly typed
fields fail deep inside peft after it has started wrapping modules, and some options change the
base weights when an adapter is added (PiSSA/OLoRA/LoftQ-style ``init_lora_weights``) or need
weights a served LoRA does not have. So the file is validated strictly here, by type and by
value, and anything the server does not serve is refused with the field named (400).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationError,
)

from lorasae.manifest import validation_summary

from .errors import ServiceError

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
# a module name or dotted suffix (peft matches list entries by name suffix, never as a regex)
ModuleName = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$", max_length=256)
]
Number = StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)]
# fields the server handles below; any other key must be unset (null, false, empty), as peft
# writes options that are off, or the adapter uses something the server does not serve
_HARMLESS = {
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
}


class LoraConfigFile(BaseModel):
    """The fields of a served LoRA config, strictly typed."""

    model_config = ConfigDict(strict=True, extra="allow")

    peft_type: Literal["LORA"]
    r: Annotated[StrictInt, Field(ge=1, le=65_536)]
    lora_alpha: Number
    lora_dropout: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=1024)]
    exclude_modules: Annotated[list[ModuleName], Field(max_length=1024)] | None = None
    layers_to_transform: (
        Annotated[StrictInt, Field(ge=0, le=100_000)]
        | Annotated[list[Annotated[StrictInt, Field(ge=0, le=100_000)]], Field(max_length=100_000)]
        | None
    ) = None
    layers_pattern: ModuleName | list[ModuleName] | None = None
    rank_pattern: dict[ModuleName, Annotated[StrictInt, Field(ge=1, le=65_536)]] = Field(default_factory=dict)
    alpha_pattern: dict[ModuleName, Number] = Field(default_factory=dict)
    fan_in_fan_out: StrictBool = False
    use_rslora: StrictBool = False
    bias: Literal["none"] = "none"
    use_dora: Literal[False] = False
    init_lora_weights: StrictBool | Literal["gaussian"] = True
    modules_to_save: Annotated[list[Any], Field(max_length=0)] | None = None


def read_lora_config(directory: Path) -> dict:
    """The validated ``adapter_config.json`` of ``directory`` as a dict peft can take
    (``LoraConfig(**...)``); ServiceError 400 naming the field otherwise."""
    path = Path(directory) / CONFIG_FILE
    try:
        if not path.is_file():
            raise ServiceError(400, "invalid_adapter", f"no {CONFIG_FILE} (not a peft adapter)")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ServiceError(400, "invalid_adapter", f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes")
        raw = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)[:200]
        raise ServiceError(400, "invalid_adapter", f"cannot read {CONFIG_FILE}: {reason}") from exc
    if not isinstance(raw, dict):
        raise ServiceError(400, "invalid_adapter", f"{CONFIG_FILE} must hold a JSON object")
    try:
        LoraConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ServiceError(400, "invalid_adapter", f"{CONFIG_FILE}: {validation_summary(exc)}") from exc
    for key, value in raw.items():
        if key not in LoraConfigFile.model_fields and key not in _HARMLESS and not _unset(value):
            raise ServiceError(
                400,
                "invalid_adapter",
                f"{CONFIG_FILE}: {key[:80]!r} is set, and the "
                "server serves plain LoRA adapters only (it must be null, false or empty)",
            )
    return raw


def _unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")
