"""Config fields that several training configs share, each declared once with its flag's help.

Used as defaults in dataclass bodies (``model: str = model_field()``); ``lorasae.cliargs`` turns
every field into a flag of the commands that take the config.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from lorasae.data import DEFAULT_CORPUS
from lorasae.models import DEFAULT_MODEL


def model_field() -> Any:
    return field(
        default=DEFAULT_MODEL,
        metadata={"help": "hub id, local HF dir or .gguf file (default: embedded SmolLM2-135M-Instruct)"},
    )


def saes_field(help: str) -> Any:
    """``saes``: SAE specs, one repeatable ``--sae`` flag; ``help`` says what they are for."""
    return field(default_factory=list, metadata={"flag": "--sae", "help": help})


def device_field() -> Any:
    return field(default=None, metadata={"help": "cuda / cpu (default: cuda if available)"})


def dtype_field() -> Any:
    return field(default=None, metadata={"help": "float32 / bfloat16 (default: bf16 on cuda, fp32 on cpu)"})


def corpus_field() -> Any:
    return field(
        default=DEFAULT_CORPUS,
        metadata={
            "help": "text file/folder, HF dataset id, or a part of the default sotu + Wikipedia mix: "
            "default:sotu, default:wiki (default: the mix)"
        },
    )


def ctx_field() -> Any:
    return field(default=128, metadata={"help": "context length of packed sequences"})


def keep_first_field() -> Any:
    """``keep_first`` (True): position 0 keeps its clean activation; ``--splice-first`` clears it."""
    return field(
        default=True,
        metadata={
            "flag": "--splice-first",
            "help": "also splice position 0 (BOS); by default it keeps its clean activation",
        },
    )
