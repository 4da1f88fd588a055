"""Loading SAEs through sae-lens and mapping their hook names onto transformers decoder layers.

An SAE spec is one of:
- a local sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``), loaded with ``SAE.load_from_disk``;
- ``release/sae_id`` from the sae-lens pretrained registry, e.g.
  ``gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical`` (``SAE.from_pretrained``).

sae-lens names hook points TransformerLens-style; we support the residual stream:
``blocks.L.hook_resid_post`` is the output of decoder layer ``L`` and ``blocks.L.hook_resid_pre``
(L >= 1) the output of layer ``L - 1``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorasae.errors import LorasaeError
from lorasae.models import DEFAULT_MODEL, DEFAULT_MODEL_SLUG, LoadedModel, decoder_layers, hidden_size
from lorasae.paths import data_dir

if TYPE_CHECKING:
    from sae_lens import SAE  # imported where used at run time: sae-lens is slow to import

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


@dataclass
class LoadedSAE:
    """A frozen sae-lens SAE and where it goes in the model.

    ``layer`` is the index of the decoder layer whose output the SAE reads and replaces.
    """

    sae: SAE[Any]
    sae_id: str
    hook_name: str
    layer: int

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)


def hook_layer(hook_name: str) -> int:
    """The decoder layer whose output is the residual stream named by ``hook_name``."""
    match = _RESID.match(hook_name or "")
    if not match:
        raise LorasaeError(
            f"unsupported SAE hook {hook_name!r}: lorasae splices the residual stream "
            "(blocks.L.hook_resid_post, or blocks.L.hook_resid_pre with L >= 1)"
        )
    index, kind = int(match.group(1)), match.group(2)
    if kind == "pre":
        if index == 0:
            raise LorasaeError("unsupported SAE hook 'blocks.0.hook_resid_pre' (the embeddings)")
        return index - 1
    return index


def load_sae(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model: nn.Module | None = None,
) -> LoadedSAE:
    """Load an SAE (local folder or ``release/sae_id``), freeze it and, given ``model``, check it fits."""
    from sae_lens import SAE

    path = Path(spec).expanduser()
    device = torch.device(device)
    device = "cpu" if device.type == "cpu" else str(device)  # safetensors rejects "cpu:0"
    try:
        if path.is_dir():
            sae = SAE.load_from_disk(str(path), device=str(device))
            sae_id = str(path.resolve())
        elif "/" in spec and not spec.startswith((".", "/", "~")):
            release, sae_id_part = spec.split("/", 1)
            sae = SAE.from_pretrained(release, sae_id_part, device=str(device))
            sae_id = spec
        else:
            raise LorasaeError(f"SAE {spec!r} is neither a local sae-lens folder nor 'release/sae_id'")
    except LorasaeError:
        raise
    except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorasaeError(f"cannot load SAE {spec!r}: {first}") from exc
    if dtype is not None:
        sae.to(dtype=dtype)
    sae.eval()
    sae.requires_grad_(False)
    hook_name = sae.cfg.metadata.hook_name
    loaded = LoadedSAE(sae=sae, sae_id=sae_id, hook_name=hook_name, layer=hook_layer(hook_name))
    if model is not None:
        check_compatible(loaded, model)
    return loaded


def check_compatible(loaded: LoadedSAE, model: nn.Module) -> None:
    """Refuse an SAE whose width or layer does not fit the model, with a message saying why."""
    d_model = hidden_size(model)
    d_in = int(loaded.sae.cfg.d_in)
    if d_in != d_model:
        raise LorasaeError(f"SAE {loaded.sae_id!r} has d_in={d_in} but the model's hidden size is {d_model}")
    n_layers = len(decoder_layers(model))
    if not 0 <= loaded.layer < n_layers:
        raise LorasaeError(
            f"SAE {loaded.sae_id!r} hooks {loaded.hook_name} but the model has {n_layers} layers"
        )


def check_distinct_layers(saes: list[LoadedSAE]) -> None:
    layers = [s.layer for s in saes]
    if len(set(layers)) != len(layers):
        raise LorasaeError(f"two SAEs hook the same layer ({layers}); splice one SAE per layer")


def sae_fingerprint(sae: SAE[Any]) -> str:
    """sha256 (shortened) of the SAE's weights as float32 plus its architecture and hook."""
    digest = hashlib.sha256()
    digest.update(f"{sae.cfg.architecture()}:{sae.cfg.metadata.hook_name}".encode())
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ the default SAE

# The embedded default model has no published SAE, so lorasae trains its own (`lorasae train-sae`:
# TopK, k latents, expansion x d_model, at the middle layer unless given) and caches it here.
DEFAULT_SAE_K = 32
DEFAULT_SAE_EXPANSION = 8
# collected activations: 150k were measured too (README "Measured"): twice the CE gap, 10% dead
DEFAULT_SAE_TOKENS = 400_000
SAE_CONFIG_FILE = "cfg.json"  # sae-lens writes it last: its presence marks a finished SAE

# Makes the default SAE when it is not cached yet (training it); core only locates it. The
# composition root (`lorasae.cli`) passes the training package's trainer in.
DefaultSaeMaker = Callable[[LoadedModel], Path]


def default_sae_dir(
    layer: int | None = None,
    k: int = DEFAULT_SAE_K,
    expansion: int = DEFAULT_SAE_EXPANSION,
    tokens: int = DEFAULT_SAE_TOKENS,
) -> Path:
    """The cache folder of the default model's SAE with this recipe (``layer`` None: the middle;
    another token count than the default's adds it to the name)."""
    where = "mid" if layer is None else f"L{layer}"
    size = "" if tokens == DEFAULT_SAE_TOKENS else f"-{tokens // 1000}k"
    return data_dir() / "saes" / f"{DEFAULT_MODEL_SLUG}-{where}-topk{k}-x{expansion}{size}"


def resolve_saes(
    lm: LoadedModel, specs: list[str], model_spec: str | None, make_default: DefaultSaeMaker | None = None
) -> list[LoadedSAE]:
    """Load the SAEs named by ``specs``; with none given, the default SAE of the default model
    (made by ``make_default`` when it is not cached yet, else an error saying how to make it)."""
    if not specs:
        if model_spec not in (None, DEFAULT_MODEL):
            raise LorasaeError("--sae is required with a non-default --model")
        folder = default_sae_dir()
        if not (folder / SAE_CONFIG_FILE).exists():
            if make_default is None:
                raise LorasaeError(
                    "the default SAE is not trained yet: run `lorasae train-sae` "
                    "(about 10 minutes on a CPU) or pass --sae"
                )
            folder = make_default(lm)
        specs = [str(folder)]
    return [load_sae(spec, device=lm.device, model=lm.model) for spec in specs]
