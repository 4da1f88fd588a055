"""The adapter manifest (``lorasae.json``): what an adapter was trained on and for.

Written by ``lorasae train`` beside the peft files; read by ``lorasae eval`` and the service, which
refuse an adapter whose base model or SAEs do not match what they have loaded (an adapter trained
around one SAE is meaningless around another).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, TypeAdapter, ValidationError

from lorasae.errors import LorasaeError
from lorasae.files import write_json_atomic
from lorasae.saes import LoadedSAE, sae_fingerprint

MANIFEST_FILE = "lorasae.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's name
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few KB; bigger is not one
_Text = Annotated[str, Field(max_length=4096)]


@dataclass
class SaeEntry:
    id: _Text
    hook_name: Annotated[str, Field(max_length=256)]
    layer: Annotated[int, Field(ge=0, le=100_000)]
    d_sae: Annotated[int, Field(ge=1)]
    fingerprint: Annotated[str, Field(max_length=128)]

    @classmethod
    def of(cls, loaded: LoadedSAE) -> SaeEntry:
        return cls(
            id=loaded.sae_id,
            hook_name=loaded.hook_name,
            layer=loaded.layer,
            d_sae=loaded.d_sae,
            fingerprint=sae_fingerprint(loaded.sae),
        )


@dataclass
class AdapterManifest:
    base_model: _Text
    base_model_fingerprint: Annotated[str, Field(max_length=128)]
    saes: Annotated[list[SaeEntry], Field(min_length=1, max_length=256)]
    lora: dict[str, Any]  # rank, alpha, dropout, target_modules, layers_to_transform, layers
    training: dict[str, Any] = field(default_factory=dict)  # tokens, steps, seconds, lr, seed, ...
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    created_at: Annotated[str, Field(max_length=64)] = ""
    version: int = MANIFEST_VERSION

    def save(self, directory: Path) -> Path:
        return write_json_atomic(Path(directory) / MANIFEST_FILE, asdict(self))

    @classmethod
    def load(cls, directory: Path | str, where: str | None = None) -> AdapterManifest:
        """Read and strictly validate ``lorasae.json`` (types, not only JSON syntax: a manifest is
        also an upload from a stranger). ``where`` names the folder in messages (default: its path)."""
        path = Path(directory) / MANIFEST_FILE
        where = str(directory) if where is None else where
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise LorasaeError(f"{MANIFEST_FILE} in {where} is over {MAX_MANIFEST_BYTES} bytes")
            return _MANIFEST.validate_json(path.read_bytes(), strict=True)
        except FileNotFoundError as exc:
            raise LorasaeError(f"no {MANIFEST_FILE} in {where}: not a lorasae adapter") from exc
        except ValidationError as exc:
            raise LorasaeError(f"invalid {MANIFEST_FILE} in {where}: {validation_summary(exc)}") from exc
        except OSError as exc:
            raise LorasaeError(f"cannot read {MANIFEST_FILE} in {where}: {exc.strerror}") from exc

    def mismatches(
        self, model_fingerprint: str, saes: list[LoadedSAE], sae_fingerprints: Mapping[int, str] | None = None
    ) -> list[str]:
        """Why this adapter does not fit the loaded model and SAEs (empty when it fits).

        Every SAE the adapter was trained with must be loaded (matched by fingerprint and layer);
        extra loaded SAEs are fine. ``sae_fingerprints``: the loaded SAEs' fingerprints by layer,
        when the caller has them (hashing a Gemma-Scope-size SAE takes a second).
        """
        problems = []
        if self.base_model_fingerprint != model_fingerprint:
            problems.append(
                f"trained on base model {_short(self.base_model)} "
                f"(fingerprint {self.base_model_fingerprint}), loaded model has "
                f"fingerprint {model_fingerprint}"
            )
        if sae_fingerprints is None:
            sae_fingerprints = {s.layer: sae_fingerprint(s.sae) for s in saes}
        loaded = set(sae_fingerprints.items())
        for entry in self.saes:
            if (entry.layer, entry.fingerprint) not in loaded:
                problems.append(
                    f"trained with SAE {_short(entry.id)} at layer {entry.layer} "
                    f"(fingerprint {entry.fingerprint}), which is not loaded"
                )
        return problems

    def check(self, model_fingerprint: str, saes: list[LoadedSAE]) -> None:
        problems = self.mismatches(model_fingerprint, saes)
        if problems:
            raise LorasaeError("adapter does not match: " + "; ".join(problems))


_MANIFEST = TypeAdapter(AdapterManifest)


def adapter_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 (shortened) of an adapter's LoRA weights as float32, keyed by name: the identity that
    ties a dashboard made through an adapter to the adapter a server has registered (the names
    as peft saves them, so a file read back and a state_dict in memory agree)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_file_fingerprint(directory: Path | str) -> str:
    """``adapter_fingerprint`` of the weights file in an adapter folder."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS_FILE
    try:
        return adapter_fingerprint(load_file(str(path)))
    except (OSError, ValueError) as exc:
        raise LorasaeError(f"cannot read {path}: {exc}") from exc


def _short(text: str, limit: int = 120) -> str:
    """``repr(text)``, cut: ids from a manifest may be long (and come from anywhere)."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "...'"


def validation_summary(exc: ValidationError, limit: int = 3) -> str:
    """The first errors of a pydantic validation, each as ``field.path: message``."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(top level)"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)
