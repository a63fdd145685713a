"""Command-line flags written from a pydantic model, for ``talora-train`` and ``talora-serve``.

``add_flags(parser, TrainConfig, names)`` adds ``--shared-prompt-len`` for ``shared_prompt_len``: its
description and default as help, its type, a ``Literal``'s choices, ``--x/--no-x`` for a bool, ``A,B``
for a list. A flag not given stays out of the namespace (``argparse.SUPPRESS``), so that what lies
below the flags (a config file, ``TALORA_*`` variables, the defaults) keeps its value.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, SecretStr


def add_flags(parser: argparse._ActionsContainer, model: type[BaseModel], names: Iterable[str] | None = None,
              defaults: Mapping[str, Any] | None = None, env_prefix: str = "") -> None:
    """A flag for each field of ``model`` named in ``names`` (default: all, in order). ``defaults``: the
    defaults to show where they are not the field's; ``env_prefix``: the help names the environment
    variable ``<env_prefix><FIELD>``."""
    for name in model.model_fields if names is None else names:
        field = model.model_fields[name]
        default = (defaults or {}).get(name, field.get_default(call_default_factory=True))
        if isinstance(default, SecretStr | list):
            default = default.get_secret_value() if isinstance(default, SecretStr) else ",".join(default) or "none"
        env = f"env {env_prefix}{name.upper()}; " if env_prefix else ""
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f"{field.description} ({env}default: {default})".replace("%", "%%")}
        base = field.annotation
        if typing.get_origin(base) in (typing.Union, types.UnionType):  # X | None
            base = next(a for a in typing.get_args(base) if a is not type(None))
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is typing.Literal:
            kwargs.update(type=type(typing.get_args(base)[0]), choices=typing.get_args(base))
        elif typing.get_origin(base) is list:
            kwargs.update(type=_comma_list, metavar="A,B")
        else:
            kwargs.update(type=str if base is SecretStr else base, metavar=name.upper())
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
