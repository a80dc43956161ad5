"""Config values as the bundles receive them: ``--key value`` overrides reach a bundle as strings ("false",
"null", "224"), which these read into bools, ints and optional paths with errors that name the knob. The lowest
layer (it imports nothing of the package), so encoders, data, engines and the CLI read knobs the same way.
"""

from __future__ import annotations

import os
import sys

__all__ = ["as_bool", "as_int", "optional_path", "missing_setting", "progress_enabled"]


def as_bool(value: bool | int | str) -> bool:
    """A config flag as a bool. ``--flag false`` reaches a bundle as the *string* "false" (fire only parses
    ``False``), which Python reads as true; this accepts bools, 0/1 and true/false/yes/no/on/off strings."""
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", "null", ""):
        return False
    raise ValueError(f"expected a boolean flag (true/false), got {value!r}")


def progress_enabled(value: bool | int | str = "auto") -> bool:
    """A ``progress_bar`` knob: ``auto`` (on when stdout and stderr, where tqdm writes, are a terminal, so CI
    logs and redirected output get the summary lines only), or a boolean (``true``/``false``/``1``/``0``)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return sys.stdout.isatty() and sys.stderr.isatty()
    return as_bool(value)


def as_int(value: int | str, name: str, minimum: int = 1) -> int:
    """A config number as an int >= ``minimum``; a wrong-typed override (``--image_size abc``) raises a
    TypeError naming the knob instead of failing later inside a transform."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("+").isdigit():
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}: pass a number, e.g. --{name} 224")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def missing_setting(name: str, hint: str) -> None:
    """A config key without a default (e.g. ``init_weights`` in the paper preset): raises a ValueError naming the
    key and what to pass. Referenced as the key's value, it runs only when no ``--name`` override replaced it."""
    raise ValueError(f"{name} has no default in this configuration: {hint}")


def optional_path(value: str | os.PathLike | None) -> str | None:
    """A path config value, or None for ``None`` / "" / "null" / "none" (``--key null`` reaches a bundle as
    the string "null")."""
    if value is None or str(value).strip().lower() in ("", "null", "none"):
        return None
    return str(value)
