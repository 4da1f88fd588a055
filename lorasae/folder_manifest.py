"""The manifest of a result folder written by a lorasae job (dashboards, drift reports).

A JSON file beside the folder's data files, written last (its presence marks a finished folder)
and read back strictly: size-capped, validated by pydantic (unknown keys refused), and of the
format and version this code reads. Subclasses name the file, format, version and size cap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from lorasae.errors import LorasaeError
from lorasae.files import write_json_atomic


class FolderManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    FILE: ClassVar[str]
    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    MAX_BYTES: ClassVar[int]
    KIND: ClassVar[str]  # what the folder is, in messages ("dashboard", "drift report")

    format: str
    version: int
    saes: list[Any]  # entries with a ``layer``

    def sae(self, layer: int) -> Any:
        for entry in self.saes:
            if entry.layer == layer:
                return entry
        raise LorasaeError(f"the {self.KIND} has no SAE at layer {layer}")

    def save(self, directory: Path) -> Path:
        return write_json_atomic(Path(directory) / self.FILE, self.model_dump(mode="json"))

    @classmethod
    def load(cls, directory: Path | str) -> Self:
        path = Path(directory) / cls.FILE
        try:
            if path.stat().st_size > cls.MAX_BYTES:
                raise LorasaeError(f"{path} is over {cls.MAX_BYTES} bytes: not a {cls.KIND} manifest")
            manifest = cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise LorasaeError(f"no {cls.FILE} in {directory}: not a lorasae {cls.KIND} folder") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "(top level)"
            raise LorasaeError(f"invalid {path}: {where}: {first.get('msg')}") from exc
        except OSError as exc:
            raise LorasaeError(f"cannot read {path}: {exc.strerror}") from exc
        if manifest.format != cls.FORMAT or manifest.version != cls.VERSION:
            raise LorasaeError(
                f"{path}: format {manifest.format!r} version {manifest.version} is not "
                f"{cls.FORMAT!r} version {cls.VERSION}"
            )
        return manifest
