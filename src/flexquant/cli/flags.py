"""Command-line flags generated from config fields: ``--group-size`` <-> ``group_size``, help text, type,
choices and default from the field's metadata (`config.option`). Every generated flag defaults to "not
given" (argparse.SUPPRESS), so that a recipe file's values stand unless a flag overrides them."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import METHOD_CONFIGS, field_kind


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def show(value) -> str:
    """A default as the user would type it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "unset"
    return str(value)


def add_field(group, f: dataclasses.Field, extra_help: str = "") -> None:
    """Add the flag of config field ``f`` to an argparse (group)."""
    kind = field_kind(f)
    help_text = f.metadata.get("help", "") + extra_help + f" (default: {show(default_of(f))})"
    kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    if kind.base is bool:
        group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        return
    kw["type"] = kind.base
    if kind.is_tuple:
        kw["nargs"] = "+"
    group.add_argument(flag(f.name), **kw)


def method_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every method option by name, with the methods that have it (a name shared by methods is one flag)."""
    out: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for method, cls in sorted(METHOD_CONFIGS.items()):
        for f in dataclasses.fields(cls):
            if f.name in out:
                if field_kind(out[f.name][0]) != field_kind(f):
                    raise TypeError(f"option {f.name} of {method} clashes in type with {out[f.name][1]}'s")
                out[f.name][1].append(method)
            else:
                out[f.name] = (f, [method])
    return out


def add_method_flags(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """One argument group per method with its option flags; returns {option: methods that have it}."""
    fields = method_fields()
    groups = {m: parser.add_argument_group(f"--method {m} options") for m in sorted(METHOD_CONFIGS) if
              dataclasses.fields(METHOD_CONFIGS[m])}
    for f, owners in fields.values():
        shared = f" [also --method {', '.join(owners[1:])}]" if len(owners) > 1 else ""
        add_field(groups[owners[0]], f, shared)
    return {name: owners for name, (_, owners) in fields.items()}


def at_least(low: int, what: str = "a whole number"):
    """An argparse type: an integer >= ``low`` (a clear message otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: give {low} or more")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def text(value: str) -> str:
    """An argparse type: a non-empty string."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty text was given")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (and the same exit status 2 as every user error)."""

    def error(self, message: str):
        self.exit(2, f"flexquant: error: {message} (see `{self.prog} --help`)\n")
