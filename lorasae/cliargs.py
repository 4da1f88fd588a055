"""Command-line flags derived from config classes: each setting is declared once, as a field.

A config is a dataclass (help in ``field(metadata={"help": ...})``) or a pydantic model (help in
``Field(description=...)``, the other keys below in ``json_schema_extra``). Field metadata:

- ``help``: the flag's help text;
- ``flag``: the flag's spelling instead of ``--field-name`` (``--no-field-name`` for a bool that
  defaults to True); ``None`` keeps the field off the command line;
- ``sep``: a list field takes one separated value (``--ranks 1,4,16``) instead of a repeated flag;
- ``flags``: on a nested dataclass field, ``{child field name: spelling or None}``.

Flag types come from the annotations: int, float, str, Path (any one-argument constructor), bool (a
switch), ``list[T]``, ``Literal[...]`` (choices) and ``T | None``. Nested dataclasses are flattened:
``CompareConfig.loop.lr`` is ``--lr``, parsed into the namespace as ``loop.lr``. No flag has a parsed
default (``argparse.SUPPRESS``), so the namespace holds exactly what the command line gave:
``explicit`` names it and ``build`` lays it over the config's defaults and a preset's values.
Abbreviated flags are refused (``allow_abbrev=False``): ``--token`` is not ``--tokens``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints, overload

T = TypeVar("T")
Handler = Callable[[argparse.Namespace], None]
_HANDLER = "_lorasae_handler"  # where a subcommand's parser leaves its handler in the namespace


@dataclass(frozen=True)
class _Field:
    """One field of a config as a flag."""

    path: str  # dotted path from the config's root: the namespace attribute
    flag: str
    annotation: Any
    default: Any  # dataclasses.MISSING: required
    help: str
    sep: str | None


def _flag_name(name: str, default: Any) -> str:
    return ("--no-" if default is True else "--") + name.replace("_", "-")


def _default(config: Any, name: str, field: dataclasses.Field) -> Any:
    if not isinstance(config, type):
        return getattr(config, name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _fields(config: Any, prefix: str = "", flags: Mapping[str, str | None] | None = None) -> Iterator[_Field]:
    """The command-line fields of ``config`` (a config class or instance), nested ones flattened."""
    cls: Any = config if isinstance(config, type) else type(config)
    flags = flags or {}
    if dataclasses.is_dataclass(cls):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default, meta = _default(config, f.name, f), dict(f.metadata)
            flag = flags.get(f.name, meta.get("flag", _flag_name(f.name, default)))
            if flag is None:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                nested = hints[f.name] if default is dataclasses.MISSING else default
                yield from _fields(nested, f"{prefix}{f.name}.", meta.get("flags"))
                continue
            yield _Field(prefix + f.name, flag, hints[f.name], default, meta.get("help", ""), meta.get("sep"))
        return
    for name, info in cls.model_fields.items():  # a pydantic model
        meta = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if info.is_required():
            default = dataclasses.MISSING
        else:
            default = (
                getattr(config, name) if config is not cls else info.get_default(call_default_factory=True)
            )
        flag = flags.get(name, meta.get("flag", _flag_name(name, default)))
        if flag is not None:
            yield _Field(
                prefix + name, str(flag), info.annotation, default, info.description or "", meta.get("sep")
            )


def _without_none(annotation: Any) -> Any:
    """``T`` for ``T | None`` (and ``Optional[T]``), else the annotation itself."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _scalar(annotation: Any) -> dict[str, Any]:
    if get_origin(annotation) is Literal:
        choices = list(get_args(annotation))
        return {"choices": choices, "type": type(choices[0])}
    return {"type": annotation}


def _separated(item: Any, sep: str) -> Callable[[str], list]:
    """Parser of one ``sep``-separated list of ``item`` values (``Literal`` items checked)."""
    scalar = _scalar(item)
    convert, choices = scalar["type"], list(scalar.get("choices", []))

    def parse(text: str) -> list:
        values = [convert(part.strip()) for part in text.split(sep) if part.strip()]
        wrong = [v for v in values if choices and v not in choices]
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong[0]!r} is not one of {sep.join(choices)}")
        return values

    parse.__name__ = f"{sep!r}-separated {getattr(convert, '__name__', 'value')}"
    return parse


def _shown(value: Any, sep: str | None) -> str:
    if isinstance(value, list):
        return (sep or " ").join(map(str, value))
    return str(value)


def _argparse_options(field: _Field) -> dict[str, Any]:
    """``add_argument`` keywords for ``field``."""
    help_text = field.help
    default = field.default
    if (
        default is not dataclasses.MISSING
        and default is not None
        and not isinstance(default, bool)
        and default != []
        and "default" not in help_text
    ):
        help_text = f"{help_text} (default: {_shown(default, field.sep)})".lstrip()
    options: dict[str, Any] = {
        "dest": field.path,
        "default": argparse.SUPPRESS,
        "help": help_text.replace("%", "%%"),
    }
    if default is dataclasses.MISSING:
        options["required"] = True
    annotation = _without_none(field.annotation)
    if annotation is bool:
        options["action"] = "store_false" if default is True else "store_true"
        return options
    metavar = field.flag.lstrip("-").replace("-", "_").upper()
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        if field.sep:
            choices = _scalar(item).get("choices")
            if choices:
                metavar = "{" + field.sep.join(map(str, choices)) + "}"
            return {**options, "type": _separated(item, field.sep), "metavar": f"{metavar}{field.sep}..."}
        options["action"] = "append"
        annotation = item
    options.update(_scalar(annotation))
    if "choices" not in options:
        options["metavar"] = metavar
    return options


def add_fields(parser: argparse.ArgumentParser, config: Any) -> None:
    """One flag per command-line field of ``config`` (a class, or an instance whose values are
    the defaults shown in the help and used by ``build``)."""
    for field in _fields(config):
        parser.add_argument(field.flag, **_argparse_options(field))


def add_command(
    subparsers: argparse._SubParsersAction, name: str, handler: Handler, *configs: Any, help: str
) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of ``configs``; ``parse_command`` returns ``handler``."""
    parser = subparsers.add_parser(name, help=help, description=help, allow_abbrev=False)
    for config in configs:
        add_fields(parser, config)
    parser.set_defaults(**{_HANDLER: handler})
    return parser


def parse_command(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[Handler, argparse.Namespace]:
    """Parse ``argv`` with a parser of ``add_command`` subcommands: the chosen command's handler,
    and a namespace holding only the fields given on the command line."""
    namespace = parser.parse_args(argv)
    return vars(namespace).pop(_HANDLER), namespace


def explicit(namespace: argparse.Namespace) -> set[str]:
    """Dotted paths of the fields given on the command line (whatever the flag's spelling)."""
    return {name for name in vars(namespace) if name != _HANDLER}


def given(namespace: argparse.Namespace, config: Any) -> dict[str, Any]:
    """The values the command line gave to ``config``'s fields, by dotted path."""
    paths = explicit(namespace)
    return {f.path: getattr(namespace, f.path) for f in _fields(config) if f.path in paths}


@overload
def updated(config: type[T], values: Mapping[str, Any]) -> T: ...
@overload
def updated(config: T, values: Mapping[str, Any]) -> T: ...
def updated(config: Any, values: Mapping[str, Any]) -> Any:
    """``config`` (an instance; a class: its defaults) with the fields at the dotted paths of
    ``values`` replaced; an unknown path is a ``KeyError``."""
    cls = config if isinstance(config, type) else type(config)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted({path.split(".")[0] for path in values} - set(known))
    if unknown:
        raise KeyError(f"{cls.__name__} has no field {', '.join(unknown)}")
    hints = get_type_hints(cls)
    changes: dict[str, Any] = {}
    for name, f in known.items():
        inner = {path[len(name) + 1 :]: v for path, v in values.items() if path.startswith(name + ".")}
        if inner:
            current = _default(config, name, f)
            changes[name] = updated(hints[name] if current is dataclasses.MISSING else current, inner)
        elif name in values:
            changes[name] = values[name]
    return cls(**changes) if isinstance(config, type) else dataclasses.replace(config, **changes)


@overload
def build(config: type[T], namespace: argparse.Namespace, preset: Mapping[str, Any] | None = None) -> T: ...
@overload
def build(config: T, namespace: argparse.Namespace, preset: Mapping[str, Any] | None = None) -> T: ...
def build(config: Any, namespace: argparse.Namespace, preset: Mapping[str, Any] | None = None) -> Any:
    """The config the command line asks for: the fields it gave, over ``preset``'s values (dotted
    paths), over ``config``'s own (an instance, or a dataclass and its defaults)."""
    return updated(config, {**(preset or {}), **given(namespace, config)})
