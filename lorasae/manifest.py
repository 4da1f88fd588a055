"""The adapter manifest (``lorasae.json``): what an adapter was trained on and for.

Written by ``lorasae train`` beside the peft files; read by ``lorasae eval`` and the service, which
refuse an adapter whose base model or SAEs do not match what they have loaded (an adapter trained
around one SAE is meaningless around another).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorasae.errors import LorasaeError
from lorasae.saes import LoadedSAE, sae_fingerprint

MANIFEST_FILE = "lorasae.json"
MANIFEST_VERSION = 1


@dataclass
class SaeEntry:
    id: str
    hook_name: str
    layer: int
    d_sae: int
    fingerprint: str

    @classmethod
    def of(cls, loaded: LoadedSAE) -> SaeEntry:
        return cls(id=loaded.sae_id, hook_name=loaded.hook_name, layer=loaded.layer,
                   d_sae=loaded.d_sae, fingerprint=sae_fingerprint(loaded.sae))


@dataclass
class AdapterManifest:
    base_model: str
    base_model_fingerprint: str
    saes: list[SaeEntry]
    lora: dict  # rank, alpha, dropout, target_modules, layers_to_transform, layers
    training: dict = field(default_factory=dict)  # tokens, steps, seconds, lr, seed, corpus, ...
    eval_before: dict | None = None
    eval_after: dict | None = None
    created_at: str = ""
    version: int = MANIFEST_VERSION

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: Path | str) -> AdapterManifest:
        path = Path(directory) / MANIFEST_FILE
        try:
            raw = json.loads(path.read_text())
            raw["saes"] = [SaeEntry(**s) for s in raw["saes"]]
            return cls(**raw)
        except FileNotFoundError as exc:
            raise LorasaeError(f"no {MANIFEST_FILE} in {directory}: not a lorasae adapter") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LorasaeError(f"corrupt {MANIFEST_FILE} in {directory}: {exc}") from exc

    def mismatches(self, model_fingerprint: str, saes: list[LoadedSAE]) -> list[str]:
        """Why this adapter does not fit the loaded model and SAEs (empty when it fits).

        Every SAE the adapter was trained with must be loaded (matched by fingerprint and layer);
        extra loaded SAEs are fine.
        """
        problems = []
        if self.base_model_fingerprint != model_fingerprint:
            problems.append(f"trained on base model {self.base_model!r} "
                            f"(fingerprint {self.base_model_fingerprint}), loaded model has "
                            f"fingerprint {model_fingerprint}")
        loaded = {(s.layer, sae_fingerprint(s.sae)) for s in saes}
        for entry in self.saes:
            if (entry.layer, entry.fingerprint) not in loaded:
                problems.append(f"trained with SAE {entry.id!r} at layer {entry.layer} "
                                f"(fingerprint {entry.fingerprint}), which is not loaded")
        return problems

    def check(self, model_fingerprint: str, saes: list[LoadedSAE]) -> None:
        problems = self.mismatches(model_fingerprint, saes)
        if problems:
            raise LorasaeError("adapter does not match: " + "; ".join(problems))
