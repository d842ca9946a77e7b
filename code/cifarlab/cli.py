"""`python -m cifarlab <command>`: parse, validate, call. No logic of its own.

Subcommands live in cifarlab/commands/, one module each (NAME, HELP, add_arguments, run).
Every TrainConfig field is a flag of the commands that train (`--batch-size`, `--net-type`...):
``add_config_arguments`` adds them, ``config_from_args`` merges --config YAML, recipe and flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import sys
import typing

from cifarlab.errors import CifarlabError


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + exiting, so errors stay one line."""

    def error(self, message):
        raise CifarlabError(message)


def _flag_type(tp):
    """Map a dataclass annotation to an argparse type (None = boolean flag)."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing))  # annotations are strings under `from __future__ import annotations`
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        tp = args[0]
    if tp is bool:
        return None
    if tp in (list, tuple) or typing.get_origin(tp) in (list, tuple):
        return "list"
    if tp is dict:
        return "dict"
    return tp


def _parse_number_list(text: str):
    try:
        return [float(x) if any(c in x for c in ".e") else int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None


def _parse_kv(text: str) -> dict:
    import yaml

    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value[,key=value], got {text!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per TrainConfig field; defaults are None so only given flags override."""
    from cifarlab.config import TrainConfig

    parser.add_argument("--config", metavar="FILE", help="YAML file of options; flags override it")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(f.type)
        if kind is None:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind == "list":
            parser.add_argument(flag, dest=f.name, type=_parse_number_list, default=None, metavar="X,Y,...")
        elif kind == "dict":
            parser.add_argument(flag, dest=f.name, type=_parse_kv, default=None, metavar="K=V,...")
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None)


def config_from_args(args: argparse.Namespace, **forced):
    """TrainConfig from --config YAML, then the flags given, then ``forced`` values."""
    from cifarlab.config import TrainConfig, load_yaml, make_config

    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return make_config(base, **flags, **forced)


def _commands():
    import cifarlab.commands as pkg

    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"cifarlab.commands.{info.name}"))
    return sorted(mods, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="python -m cifarlab",
                             description="CIFAR training, BatchNorm study, DessiLBI, dropout, Grad-CAM, reports.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except CifarlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
