"""The engine: the one model, its SAEs and its loaded adapters, and the batched forward that reads features.

Everything that touches weights runs on one dedicated thread (``Engine.call``), so a forward never
overlaps an adapter being loaded or deleted. Adapters live in one peft model as named adapters and
each row of a batch picks its own (peft's ``adapter_names``, ``"__base__"`` = no adapter): choosing
a loaded adapter is a hot swap, no weights move. Registered is not loaded: at most
``max_loaded_adapters`` are in the model, the others wait in host memory or on disk and are loaded
by the first batch that needs them, evicting the least recently used (``residency.Residency``).
With no adapter loaded the plain model runs.

A batch: right-pad the rows (causal attention never lets a real token see the padding that follows
it, so no attention mask is needed and the real positions are exact), splice the SAEs with
``lorasae.splice.Splice`` (the same code as training and evaluation), take the top-k latents, the
reconstruction error, the per-token loss and the requested logits on the device, and move only
those small tensors to the CPU.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from lorasae.data import TokenTexts
from lorasae.errors import LorasaeError
from lorasae.models import LoadedModel, load_model, model_fingerprint, unwrap
from lorasae.saes import DefaultSaeMaker, LoadedSAE, check_distinct_layers, resolve_saes, sae_fingerprint
from lorasae.splice import Splice
from lorasae_client.schemas import BASE_ADAPTER

from .adapter_config import read_lora_config
from .errors import ServiceError, shown
from .residency import Residency
from .settings import Settings

if TYPE_CHECKING:
    from peft import PeftModel
    from torch.nn.modules.module import _IncompatibleKeys

log = logging.getLogger("lorasae.service")

PEFT_PREFIX = "base_model.model."


@dataclass
class Row:
    """One input sequence of a request, as the engine sees it."""

    ids: list[int]
    adapter: str | None
    layers: tuple[int, ...]  # SAEs spliced (and reported), by layer
    top_k: int = 8
    logits: str = "none"
    logits_top_k: int = 5
    generation: int = 0  # of the adapter when the request was accepted (0: no adapter)
    latents: dict[int, tuple[int, ...]] | None = None  # layer -> latents reported at every token

    @property
    def key(self) -> tuple[int, ...]:
        """Rows with the same key can share a forward (the splice applies to the whole batch)."""
        return self.layers


@dataclass
class RowOutput:
    """Plain-Python results of one row (lists, not tensors), turned into JSON by the route."""

    ids: list[int]
    loss: list[float]  # len(ids) - 1 entries: loss of predicting token t+1 at position t
    features: dict[int, tuple[list[list[int]], list[list[float]]]]  # layer -> (indices, values)
    recon_error: dict[int, list[float]]
    top_logits: tuple[list[list[int]], list[list[float]], list[list[float]]] | None = None
    full_logits: list[list[float]] | None = None
    # layer -> (the row's requested latents, their activations per token); None: none requested
    latents: dict[int, tuple[tuple[int, ...], list[list[float]]]] | None = None


@dataclass
class ValidatedAdapter:
    """An adapter that passed every check, ready to enter the model: config + weights in memory."""

    config: Any  # peft LoraConfig
    state_dict: dict[str, torch.Tensor]
    layers: tuple[int, ...]  # layers of the SAEs it was trained with
    manifest: Any  # lorasae.manifest.AdapterManifest
    fingerprint: str  # of the weights (lorasae.manifest.adapter_fingerprint): ties dashboards to it
    directory: Path  # the folder it was read from (read again when it was evicted from memory)
    # SAE layers spliced -> held-out CE its training measured (``measured_splice_sets``)
    splice_sets: dict[tuple[int, ...], dict[str, float | None]] = field(default_factory=dict)


@dataclass
class AdapterSlot:
    """A registered adapter as requests see it, whether or not its weights are loaded."""

    layers: tuple[int, ...]
    generation: int  # unique per registration: a name deleted and registered again gets a new one
    fingerprint: str  # of the weights: picks the dashboards made through this adapter
    directory: Path
    splice_sets: dict[tuple[int, ...], dict[str, float | None]] = field(default_factory=dict)


@dataclass
class Engine:
    lm: LoadedModel
    saes: list[LoadedSAE]
    keep_first: bool = True
    names: dict[int, str] = field(default_factory=dict)  # layer -> public SAE id
    max_loaded_adapters: int = 16
    max_cpu_adapters: int = 0

    def __post_init__(self) -> None:
        check_distinct_layers(self.saes)
        self.saes = sorted(self.saes, key=lambda s: s.layer)
        self.by_layer = {s.layer: s for s in self.saes}
        if not self.names:
            self.names = public_sae_names(self.saes)
        self.base = self.lm.model
        self.base.eval()
        self.peft: PeftModel | None = None  # once an adapter is loaded
        self.adapters: dict[str, AdapterSlot] = {}  # registered (and valid), loaded or not
        # which of them are in the model / in host memory; the CPU tier keeps the weights
        self.residency: Residency[ValidatedAdapter] = Residency(
            self.max_loaded_adapters, self.max_cpu_adapters
        )
        self._loaded: dict[str, ValidatedAdapter] = {}  # hot ones, without their weights
        self.model_fingerprint = model_fingerprint(self.base)
        # the plain model's module names, for checking which modules an adapter config targets
        self._module_names = tuple(name for name, _ in self.base.named_modules() if name)
        self.sae_fingerprints = {s.layer: sae_fingerprint(s.sae) for s in self.saes}
        config = unwrap(self.base).config
        self.vocab_size = int(getattr(config, "vocab_size", 0) or _output_rows(self.base))
        tok = self.lm.tokenizer
        self.bos = tok.bos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self._pieces = TokenTexts(tok)
        self._tok_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lorasae-engine")
        self._generations = itertools.count(1)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, settings: Settings, make_default_sae: DefaultSaeMaker | None = None) -> Engine:
        """Load the model and SAEs named by the settings (no SAE given: the embedded model's default
        SAE, made by ``make_default_sae`` when it is not cached yet). Leaves torch's thread count
        alone: whoever runs the server applies ``settings.torch_threads``."""
        lm = load_model(settings.model, settings.device, settings.dtype)
        saes = resolve_saes(lm, list(settings.saes), settings.model, make_default_sae)
        return cls(
            lm,
            saes,
            keep_first=settings.keep_first,
            max_loaded_adapters=settings.max_loaded_adapters,
            max_cpu_adapters=settings.max_cpu_adapters,
        )

    @property
    def model_id(self) -> str:
        return self.lm.model_id

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def sae_info(self, layers: Sequence[int] | None = None) -> list[dict]:
        layers = [s.layer for s in self.saes] if layers is None else layers
        return [
            {
                "id": self.names[layer],
                "layer": layer,
                "d_sae": self.by_layer[layer].d_sae,
                "hook_name": self.by_layer[layer].hook_name,
            }
            for layer in layers
        ]

    # ------------------------------------------------------------ threading

    async def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the engine thread (the only thread that touches weights)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ inputs

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids as in training: BOS (when the tokenizer has one) + the text's tokens."""
        with self._tok_lock:  # one Rust tokenizer shared by threads: serialise its use
            ids = list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ([self.bos] if self.bos is not None else []) + ids

    def piece(self, token_id: int) -> str:
        """The text of one token as it reads inside a text (leading space kept; ``TokenTexts``)."""
        with self._tok_lock:  # the tokenizer is shared with tokenize()
            return self._pieces(token_id)

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text (special tokens kept, as generated)."""
        with self._tok_lock:
            return str(self.lm.tokenizer.decode(ids))

    @staticmethod
    def adapter_names(rows: Sequence[Any]) -> list[str]:
        """peft's per-row ``adapter_names`` of rows with an ``adapter`` (None: the base model)."""
        return [row.adapter or BASE_ADAPTER for row in rows]

    def select_layers(
        self, selectors: Sequence[str] | None, default: Sequence[int] | None = None
    ) -> tuple[int, ...]:
        """Layers of the SAEs named by ``selectors`` (public id, full id or layer number)."""
        if selectors is None:
            return tuple(sorted(default)) if default else tuple(self.by_layer)
        lookup: dict[str, int] = {}
        for s in self.saes:
            lookup[self.names[s.layer]] = s.layer
            lookup[s.sae_id] = s.layer
            lookup[str(s.layer)] = s.layer
        layers = set()
        for sel in selectors:
            if sel not in lookup:
                known = ", ".join(self.names[s.layer] for s in self.saes)
                raise ServiceError(404, "unknown_sae", f"no SAE {shown(sel)} is loaded (loaded: {known})")
            layers.add(lookup[sel])
        return tuple(sorted(layers))

    # ------------------------------------------------------------ the forward (engine thread)

    def run_batch(self, rows: list[Row]) -> list[RowOutput | ServiceError]:
        """One forward for ``rows`` (all with the same SAE layers); per row a result or an error."""
        out: list[RowOutput | ServiceError | None] = [None] * len(rows)
        live = []
        for i, row in enumerate(rows):
            slot = self.adapters.get(row.adapter) if row.adapter is not None else None
            if row.adapter is not None and (slot is None or slot.generation != row.generation):
                # deleted, or deleted and registered again, while the request waited in the queue
                out[i] = ServiceError(
                    404,
                    "unknown_adapter",
                    f"adapter {shown(row.adapter)} was deleted or replaced while the request was queued",
                )
            else:
                live.append(i)
        failed = self._make_resident({a for i in live if (a := rows[i].adapter) is not None})
        for i in live:
            adapter = rows[i].adapter
            if adapter is not None and adapter in failed:
                out[i] = failed[adapter]
        live = [i for i in live if out[i] is None]
        if live:
            results = self._forward([rows[i] for i in live])
            for i, res in zip(live, results):
                out[i] = res
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _forward(self, rows: list[Row]) -> list[RowOutput]:
        ids, lens = self._pad(rows)
        host, full = self._forward_gather(rows, ids, lens)
        return _to_rows(rows, lens, host, full)

    def _pad(self, rows: list[Row]) -> tuple[torch.Tensor, list[int]]:
        """The rows' ids right-padded into one ``[B, T]`` batch on the device, and each row's length."""
        lens = [len(r.ids) for r in rows]
        ids = torch.full((len(rows), max(lens)), self.pad, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : lens[b]] = torch.tensor(row.ids, dtype=torch.long)
        return ids.to(self.device), lens

    def _forward_gather(
        self, rows: list[Row], ids: torch.Tensor, lens: list[int]
    ) -> tuple[dict[str, list], dict[int, list[list[float]]]]:
        """The spliced forward, and on the device only what the rows asked for (losses, top-k
        latents and reconstruction errors of each SAE, top logits), moved to the host as lists
        keyed ``loss``, ``i<layer>``/``v<layer>``/``e<layer>`` and ``li``/``lv``/``lp``; plus the
        full logits of the rows that want them, by row index. The latents rows name (``Row.latents``)
        are gathered once per layer for the whole batch, the union of the rows' indices
        (``latent_union``), as ``x<layer>`` ``[B, T, union]``."""
        layers = rows[0].layers
        kwargs: dict[str, Any] = {}
        model = self.base
        if self.peft is not None:
            model = self.peft
            kwargs["adapter_names"] = [r.adapter or BASE_ADAPTER for r in rows]
        with Splice(
            model, [self.by_layer[layer] for layer in layers], keep_first=self.keep_first, record=True
        ) as splice:
            logits = model(input_ids=ids, **kwargs).logits
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)  # [B, T]
        loss = lse[:, :-1] - logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        gathered: dict[str, torch.Tensor] = {"loss": loss}
        for layer in layers:
            record = splice.records[layer]
            k = min(max(r.top_k for r in rows), record.latents.shape[-1])
            values, indices = record.latents.topk(k, dim=-1)
            gathered[f"v{layer}"], gathered[f"i{layer}"] = values.float(), indices
            gathered[f"e{layer}"] = record.error_sq().float()
            union = latent_union(rows, layer)
            if union:
                index = torch.tensor(union, dtype=torch.long, device=record.latents.device)
                gathered[f"x{layer}"] = record.latents.index_select(-1, index).float()
        wants_top = [r.logits_top_k for r in rows if r.logits == "top_k"]
        if wants_top:
            lvalues, lindices = logits.topk(min(max(wants_top), logits.shape[-1]), dim=-1)
            gathered["lv"], gathered["li"], gathered["lp"] = lvalues, lindices, lvalues - lse[..., None]
        host = {name: t.cpu() for name, t in gathered.items()}  # the only device -> host copies
        full = {b: logits[b, : lens[b]].cpu().tolist() for b, r in enumerate(rows) if r.logits == "full"}
        return {name: t.tolist() for name, t in host.items()}, full

    # ------------------------------------------------------------ adapters (engine thread)

    def validate_adapter(self, directory: Path) -> ValidatedAdapter:
        """Every check before an adapter may enter the model (any thread; reads files only).

        Raises ServiceError 400 (not an adapter, corrupt files) or 409 (does not fit the loaded
        model or SAEs: manifest fingerprints, LoRA module names and shapes).
        """
        from peft import LoraConfig
        from safetensors.torch import load_file

        from lorasae.manifest import AdapterManifest, adapter_fingerprint

        directory = Path(directory)
        try:
            manifest = AdapterManifest.load(directory, where="the adapter folder")
        except LorasaeError as exc:
            raise ServiceError(400, "invalid_adapter", str(exc)) from exc
        problems = manifest.mismatches(self.model_fingerprint, self.saes, self.sae_fingerprints)
        if problems:
            raise ServiceError(
                409,
                "adapter_mismatch",
                "adapter does not match the loaded model and SAEs: " + "; ".join(problems),
            )
        raw = read_lora_config(directory)  # strict: types, plain module names, plain LoRA only
        try:
            config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**raw))
        except Exception as exc:
            raise ServiceError(
                400, "invalid_adapter", f"adapter_config.json: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file():
            raise ServiceError(400, "invalid_adapter", "no adapter_model.safetensors")
        try:
            state = load_file(str(weights))
        except Exception as exc:
            raise ServiceError(400, "invalid_adapter", f"corrupt adapter_model.safetensors: {exc}") from exc
        bad = next(
            (k for k, t in state.items() if not t.is_floating_point() or not torch.isfinite(t).all()), None
        )
        if bad is not None:  # NaN/inf weights would put NaN into every answer (not even valid JSON)
            raise ServiceError(
                400,
                "invalid_adapter",
                f"adapter_model.safetensors: {shown(bad)} is not a finite floating-point tensor",
            )
        self._check_shapes(config, state)
        self._check_targets(config, state)
        layers = tuple(sorted({e.layer for e in manifest.saes}))
        return ValidatedAdapter(
            config=config,
            state_dict=state,
            layers=layers,
            manifest=manifest,
            fingerprint=adapter_fingerprint(state),
            directory=directory,
            splice_sets=measured_splice_sets(manifest.eval_after),
        )

    def _check_shapes(self, config, state: dict[str, torch.Tensor]) -> None:
        base = unwrap(self.peft) if self.peft is not None else self.base
        if not state:
            raise ServiceError(400, "invalid_adapter", "adapter_model.safetensors holds no weights")
        for key, tensor in state.items():
            if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise ServiceError(
                    409,
                    "adapter_mismatch",
                    f"unsupported adapter weight {shown(key)} "
                    "(only LoRA A/B matrices on linear layers are served)",
                )
            path, kind = key[len(PEFT_PREFIX) :].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            try:
                module = base.get_submodule(path)
            except AttributeError as exc:
                raise ServiceError(
                    409, "adapter_mismatch", f"adapter targets {shown(path)}, which the loaded model lacks"
                ) from exc
            module = getattr(module, "base_layer", module)
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2:
                raise ServiceError(
                    409, "adapter_mismatch", f"adapter targets {shown(path)}, not a linear layer"
                )
            if isinstance(module, torch.nn.Linear):
                d_in, d_out = module.in_features, module.out_features
            else:  # transformers Conv1D (GPT-2): weight [in, out]
                d_in, d_out = weight.shape
            if tensor.dim() != 2:
                raise ServiceError(
                    409, "adapter_mismatch", f"{shown(key)}: expected a matrix, got {tuple(tensor.shape)}"
                )
            r = tensor.shape[0] if kind == "lora_A" else tensor.shape[1]
            expected = (r, d_in) if kind == "lora_A" else (d_out, r)
            if tuple(tensor.shape) != expected:
                raise ServiceError(
                    409,
                    "adapter_mismatch",
                    f"{shown(key)}: shape {tuple(tensor.shape)} does not fit {shown(path)} "
                    f"(in {d_in}, out {d_out})",
                )

    def _check_targets(self, config, state: dict[str, torch.Tensor]) -> None:
        """The modules the config makes peft wrap must be exactly those the weights are for,
        checked before peft touches the model: peft wraps the targeted modules in place, and when
        it fails on one of them (a norm layer, say) the modules it already wrapped stay in the base
        model and change the numbers of every later request."""
        from peft.tuners.tuners_utils import check_target_module_exists

        weighted = {key[len(PEFT_PREFIX) :].rsplit(".", 2)[0] for key in state}
        targeted = {name for name in self._module_names if check_target_module_exists(config, name)}
        if targeted != weighted:
            extra, unfilled = sorted(targeted - weighted), sorted(weighted - targeted)
            raise ServiceError(
                409,
                "adapter_mismatch",
                "adapter_config.json and the weights disagree: "
                f"{len(extra)} targeted modules without weights {extra[:3]}, weights for "
                f"{len(unfilled)} modules not targeted {unfilled[:3]}",
            )

    def add_adapter(self, name: str, adapter: ValidatedAdapter, hot: bool = True) -> None:
        """Register a validated adapter under ``name`` (engine thread): with ``hot``, load it into
        the model now (evicting the least recently used one when the model is full), else keep it
        in the CPU tier when that has room, or leave it on disk until a batch needs it.

        Raises ServiceError 409 when peft finds that it does not fit the model. Any other failure
        (out of memory, a bug) propagates as it is, for a logged 500; either way the adapter is
        taken out again first, so the model is as it was before the call.
        """
        if name in self.adapters:
            raise ServiceError(409, "duplicate_adapter", f"adapter {name!r} is already loaded")
        if hot:
            for victim in self.residency.victims([name]):
                self.evict(victim)
            self._insert(name, adapter)
        else:
            self.residency.keep_in_cpu(name, adapter)
        self.adapters[name] = AdapterSlot(
            layers=adapter.layers,
            generation=next(self._generations),
            fingerprint=adapter.fingerprint,
            directory=adapter.directory,
            splice_sets=adapter.splice_sets,
        )

    def resident(self) -> list[str]:
        """Names of the adapters in the model, least recently used first."""
        return list(self.residency.hot)

    def make_resident(self, names: Collection[str]) -> None:
        """Load the registered adapters ``names`` into the model (engine thread), evicting others;
        raises the first one's ServiceError when one cannot be loaded (404 unknown, 409 files
        changed or gone since registration)."""
        for error in self._make_resident(set(names)).values():
            raise error

    def _make_resident(self, names: set[str]) -> dict[str, ServiceError]:
        """``make_resident`` that returns the adapters that could not be loaded, with the reason,
        and loads the others."""
        failed: dict[str, ServiceError] = {}
        for name in names - set(self.adapters):
            failed[name] = ServiceError(404, "unknown_adapter", f"adapter {shown(name)} is not registered")
        wanted = [n for n in sorted(names) if n in self.adapters]
        self.residency.stats.hits += sum(1 for n in wanted if n in self.residency.hot)
        # read what is missing before evicting anything: from the CPU tier (taken out of it first,
        # as evictions push others out of it) or its checked files; what fails evicts nothing
        ready: dict[str, tuple[str, ValidatedAdapter]] = {}
        for name in wanted:
            if name in self.residency.cpu:
                ready[name] = ("cpu", self.residency.cpu.pop(name))
            elif name not in self.residency.hot:
                started = time.perf_counter()
                try:
                    ready[name] = ("disk", self._reread(name))
                except ServiceError as exc:
                    failed[name] = exc
                self.residency.stats.load_seconds["disk"] += time.perf_counter() - started
        wanted = [n for n in wanted if n not in failed]
        for victim in self.residency.victims(wanted):
            self.evict(victim)
        for name, (tier, adapter) in ready.items():
            started = time.perf_counter()
            try:
                self._insert(name, adapter)
            except ServiceError as exc:
                failed[name] = exc
                continue
            self.residency.stats.load_seconds[tier] += time.perf_counter() - started
            self.residency.stats.loads[tier] += 1
        self.residency.touch(wanted)
        return failed

    def _reread(self, name: str) -> ValidatedAdapter:
        """An evicted adapter's files read and checked again; refused when they are not the
        weights that were registered (changed or gone since)."""
        slot = self.adapters[name]
        try:
            adapter = self.validate_adapter(slot.directory)
        except ServiceError as exc:
            raise ServiceError(
                409, "adapter_unavailable", f"adapter {shown(name)} could not be loaded again: {exc.message}"
            ) from exc
        if adapter.fingerprint != slot.fingerprint:
            raise ServiceError(
                409,
                "adapter_unavailable",
                f"adapter {shown(name)}: its files changed since it was registered; register it again",
            )
        return adapter

    def evict(self, name: str) -> None:
        """Take adapter ``name`` out of the model (engine thread) into the CPU tier, or to disk
        when that tier has no room; nothing happens when it is not in the model."""
        from peft import get_peft_model_state_dict

        if name not in self.residency.hot or self.peft is None:
            return
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        weights = {key: tensor.detach().to("cpu", copy=True) for key, tensor in state.items()}
        kept = replace(self._loaded.pop(name), state_dict=weights)
        self.residency.hot.pop(name)
        self._drop(name)
        self.residency.stats.evicted += 1
        self.residency.keep_in_cpu(name, kept)

    def _insert(self, name: str, adapter: ValidatedAdapter) -> None:
        """Put ``adapter``'s weights into the peft model as ``name`` (see ``add_adapter``)."""
        from peft import PeftModel, set_peft_model_state_dict

        config = adapter.config
        config.inference_mode = True
        try:
            if self.peft is None:
                self.peft = PeftModel(self.base, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
            # cast: peft annotates the result as ``namedtuple``; it is torch's load_state_dict result
            result = cast(
                "_IncompatibleKeys",
                set_peft_model_state_dict(self.peft, adapter.state_dict, adapter_name=name),
            )
            bad = [k for k in result.unexpected_keys if "lora_" in k]
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if bad or missing:
                raise ServiceError(
                    409,
                    "adapter_mismatch",
                    f"adapter weights do not fit the model: unexpected {bad[:3]}, missing {missing[:3]}",
                )
            self.peft.eval()
        except BaseException as exc:
            self._drop(name)
            if isinstance(exc, ServiceError) or not is_mismatch(exc):
                raise
            raise ServiceError(
                409, "adapter_mismatch", f"adapter does not load into the model: {type(exc).__name__}: {exc}"
            ) from exc
        self._loaded[name] = replace(adapter, state_dict={})  # the weights live in the model now
        self.residency.hot[name] = None

    def remove_adapter(self, name: str) -> None:
        """Unregister ``name``: out of the model and the CPU tier (engine thread)."""
        self.adapters.pop(name, None)
        was_hot = name in self.residency.hot
        self.residency.forget(name)
        self._loaded.pop(name, None)
        if was_hot:
            self._drop(name)

    def _drop(self, name: str) -> None:
        """Take adapter ``name`` out of the model, including whatever a failed ``add_adapter`` left
        half-made (peft wraps modules one by one and keeps those it wrapped before failing)."""
        from peft.tuners.tuners_utils import BaseTuner, delete_adapter

        if self.peft is None:  # no adapter loaded, or building the first one's PeftModel failed
            _strip_peft_layers(self.base)
            return
        with warnings.catch_warnings():  # "adapter X was active, now deleted": expected here
            warnings.simplefilter("ignore", UserWarning)
            if name in self.peft.peft_config:
                self.peft.delete_adapter(name)
            else:  # peft.add_adapter failed: it forgot the config but not the layers it made
                # cast: peft infers base_model from the wrapped model; with a LoRA config it is the tuner
                tuner = cast(BaseTuner, self.peft.base_model)
                delete_adapter(tuner.model, name, tuner.prefix)
        if not self.peft.peft_config:  # no adapter left: back to the plain model
            self.base = self.peft.unload()
            self.peft = None


def _output_rows(model: torch.nn.Module) -> int:
    """Rows of the output embedding matrix: the vocabulary size of a config that lacks one."""
    # casts: nn.Module's __getattr__ is typed Tensor | Module; these are transformers'
    # get_output_embeddings() method and the weight of the module it returns
    get_output_embeddings = cast("Callable[[], torch.nn.Module]", model.get_output_embeddings)
    return cast(torch.Tensor, get_output_embeddings().weight).shape[0]


def is_mismatch(exc: BaseException) -> bool:
    """Whether peft refused an adapter because it does not fit the model (409), rather than
    failing for the server's own reasons (out of memory, a bug: 500). peft checks a config
    against the model with ValueErrors (targets, layers, ranks); loading weights of the wrong
    size is torch's ``load_state_dict`` RuntimeError."""
    if isinstance(exc, ValueError):
        return True
    return (
        isinstance(exc, RuntimeError)
        and not isinstance(exc, torch.OutOfMemoryError)
        and str(exc).startswith("Error(s) in loading state_dict")
    )


def _strip_peft_layers(model: torch.nn.Module) -> None:
    """Put the original module back in place of every peft layer found in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def _to_rows(
    rows: list[Row], lens: list[int], host: dict[str, list], full: dict[int, list[list[float]]]
) -> list[RowOutput]:
    """Cut the batch's host lists (see ``Engine._forward_gather``) back into one result per row:
    its own length, its own ``top_k`` and ``logits_top_k``."""
    layers = rows[0].layers
    unions = {layer: latent_union(rows, layer) for layer in layers}
    results = []
    for b, row in enumerate(rows):
        n = lens[b]
        features = {
            layer: (
                [x[: row.top_k] for x in host[f"i{layer}"][b][:n]],
                [x[: row.top_k] for x in host[f"v{layer}"][b][:n]],
            )
            for layer in layers
        }
        top = None
        if row.logits == "top_k":
            k = row.logits_top_k
            top = (
                [x[:k] for x in host["li"][b][:n]],
                [x[:k] for x in host["lv"][b][:n]],
                [x[:k] for x in host["lp"][b][:n]],
            )
        results.append(
            RowOutput(
                ids=row.ids,
                loss=host["loss"][b][: n - 1],
                features=features,
                recon_error={layer: host[f"e{layer}"][b][:n] for layer in layers},
                top_logits=top,
                full_logits=full.get(b),
                latents=None if row.latents is None else _row_latents(row, b, n, host, unions),
            )
        )
    return results


MEASURED_KEYS = ("ce_spliced", "ce_adapted_spliced", "gap_closed")


def measured_splice_sets(eval_after: dict[str, Any] | None) -> dict[tuple[int, ...], dict[str, float | None]]:
    """The ``splice_sets`` an adapter's training measured (``lorasae.json`` ``eval_after``), by SAE
    layers. The manifest comes from an upload: anything not shaped as expected is left out."""
    found: dict[tuple[int, ...], dict[str, float | None]] = {}
    rows = (eval_after or {}).get("splice_sets")
    if not isinstance(rows, list):
        return found
    for row in rows[:64]:
        if not isinstance(row, dict):
            continue
        layers = row.get("layers")
        if not isinstance(layers, list) or not 0 < len(layers) <= 64:
            continue
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            continue
        values = {k: row.get(k) for k in MEASURED_KEYS}
        if all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in values.values()):
            found[tuple(sorted(layers))] = {k: None if v is None else float(v) for k, v in values.items()}
    return found


def latent_union(rows: list[Row], layer: int) -> list[int]:
    """The latents of SAE ``layer`` any row of a batch asks for, ascending: gathered once."""
    return sorted({i for row in rows if row.latents for i in row.latents.get(layer, ())})


def _row_latents(
    row: Row, b: int, n: int, host: dict[str, list], unions: dict[int, list[int]]
) -> dict[int, tuple[tuple[int, ...], list[list[float]]]]:
    """Row ``b``'s requested latents cut out of the batch's gathered unions (its ``n`` tokens)."""
    out: dict[int, tuple[tuple[int, ...], list[list[float]]]] = {}
    for layer, indices in (row.latents or {}).items():
        if not indices:  # an SAE named with an empty list: nothing was gathered for it
            out[layer] = (indices, [[] for _ in range(n)])
            continue
        column = {latent: j for j, latent in enumerate(unions[layer])}
        picks = [column[i] for i in indices]
        out[layer] = (indices, [[token[j] for j in picks] for token in host[f"x{layer}"][b][:n]])
    return out


def public_sae_names(saes: Sequence[LoadedSAE]) -> dict[int, str]:
    """Short ids for the wire: a local SAE folder's name, else the ``release/sae_id`` spec."""
    names: dict[int, str] = {}
    for s in saes:
        path = Path(s.sae_id)
        names[s.layer] = path.name if path.is_absolute() else s.sae_id
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {layer: (f"{name}@L{layer}" if counts[name] > 1 else name) for layer, name in names.items()}
