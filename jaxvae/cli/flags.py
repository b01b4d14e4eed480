"""Flags generated from the settings dataclasses: each setting's default and type live in its
dataclass (TrainConfig, AugmentConfig, PreprocessParams, EvalSettings) and nowhere else.

`add_flags` adds one flag per field to an argparse-compatible parser (jsonargparse's, as the
CLI uses, or the standard library's, as the experiment scripts do): `--latent-dim` for a top
level field, `--augmentation.noise_std` for a nested group (the config file's nested keys).
The default comes from the dataclass, or from the caller's `defaults` where a verb
deliberately differs (the CLI's training schedule, `config.CLI_SCHEDULE`); the help text
from the caller (what the flag means on the command line). A field whose default is False
is a switch (`--postprocess`); True a value (`--ensemble false`), as the flags were before.
"""

import dataclasses
import typing


def field_defaults(cls, defaults=None) -> dict:
    """{field: default} of a dataclass, with `defaults` (a dict) overriding some."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return {**out, **(defaults or {})}


def add_flags(parser, cls, names, *, help, defaults=None, group=None, types=None):
    """Add `--<name>` (or `--<group>.<name>`) for each field `names` of dataclass `cls`.

    Args:
      parser: an argparse-compatible parser.
      cls: the dataclass whose fields the flags set.
      names: the fields, in the order shown by --help.
      help: {field: help text} (a field without one is shown by its dataclass name).
      defaults: {field: default} where the flag's default is not the dataclass's.
      group: a nested group's name: flags `--group.field` (underscores kept, as the
        config file's keys).
      types: {field: type} where the command line reads another type than the field's
        (e.g. predictors as one comma-separated string).
    """
    hints = typing.get_type_hints(cls)
    values = field_defaults(cls, defaults)
    for name in names:
        if name not in hints:
            raise KeyError(f"{cls.__name__} has no field {name!r}")
        flag = f"--{group}.{name}" if group else "--" + name.replace("_", "-")
        text = help.get(name, f"{cls.__name__}.{name}")
        kind = (types or {}).get(name, hints[name])
        dest = f"{group}.{name}" if group else name
        if kind is bool and values[name] is False and group is None:
            parser.add_argument(flag, dest=dest, action="store_true", help=text)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=values[name], help=text)


def settings_of(cls, args, group=None, **extra):
    """The dataclass `cls` built from the parsed flags that set its fields (those of
    `--group.*` for a group), plus `extra`: it validates itself (`__post_init__`)."""
    values = dict(args[group]) if group else args
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)
                  if f.name in values and f.name not in extra}, **extra)
