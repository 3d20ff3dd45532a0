"""Commands' flags as dataclasses, parsed by transformers' `HfArgumentParser`.

A flag is a typed field: `--name` and `--name-with-dashes` come from the field's name, the type from its annotation
(`X | None` parses as X), the help from `setting(default, help, choices=...)`; a bool defaulting to False is a switch
(`--flag`), one defaulting to True also gets `--no-flag`. A dataclass with an `_argument_group_name` is one section of
`--help`.

A dataclass may refuse a value in `__post_init__` by raising `HscrError` with the field's name in the message (the
library's own callers know the field); `parse_flags` reports it under the flag the user typed instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import field

from hscr_fast.runtime.errors import HscrError


def setting(default, help_text: str, **extra):
    """A field with its default and its `--help` text; `extra` goes to argparse (choices, metavar, action)."""
    return field(default=default, metadata={"help": help_text, **extra})


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    # A help that already says its default in words ("default: the data's folder"), or a flag without one, is not
    # followed by "(default: None)".
    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def flag_parser(dataclass_types, **parser_options):
    """An `HfArgumentParser` over `dataclass_types` whose refusals are one line, like every other bad input."""
    from transformers import HfArgumentParser

    class OneLineErrors(HfArgumentParser):
        def error(self, message):
            # argparse would print the whole usage first: dozens of lines for these commands, the fault last.
            self.exit(2, f"error: {message} (all flags: {self.prog} --help)\n")

    return OneLineErrors(dataclass_types, **{"formatter_class": _DefaultsOnce, **parser_options})


def parse_flags(parser, argv: list[str] | None) -> tuple:
    """One instance per dataclass of `parser` (a `flag_parser`). A value argparse cannot take (wrong type, not a
    choice, unknown flag) exits 2 with one line; one a dataclass refuses raises `HscrError`, which the command turns
    into one line and exit 2."""
    try:
        # No "<command>.args" file beside the command is read: the flags are what the user typed.
        *configs, unknown = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                               return_remaining_strings=True)
    except HscrError as error:
        names = [item.name for dtype in parser.dataclass_types for item in dataclasses.fields(dtype)]
        raise HscrError(as_flags(str(error), names)) from None
    if unknown:  # HfArgumentParser would raise a ValueError (a traceback) where argparse refuses them
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(configs)


def as_flags(message: str, names: list[str]) -> str:
    """`message` with each field name in `names` spelled as its flag (`drop_ratio` → `--drop-ratio`)."""
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")
    return pattern.sub(lambda match: "--" + match.group(1).replace("_", "-"), message)
