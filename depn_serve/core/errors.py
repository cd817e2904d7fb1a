"""The project's error base class, and pydantic's validation errors turned into the one-line form every loader
reports ("file: field 'x': expected, found").

Every error a user can cause with bad input (a file, an option, a model) is a `DepnError`, so the command line turns
them into a clean message in one place and lets anything else (a bug) show its traceback.
"""

from __future__ import annotations

from pydantic import ValidationError


class DepnError(ValueError):
    """Bad input: the message names the file or field, what was expected and what was found."""


def field_error(exc: ValidationError, whole: str = "document") -> tuple[str, str, str]:
    """(dotted field path, what was expected, what was found) of the first error; `whole` names a
    model-level error."""
    err = exc.errors()[0]
    field = ".".join(str(part) for part in err["loc"]) or whole
    found = "nothing" if err["type"] == "missing" else repr(err.get("input"))[:200]
    return field, err["msg"], found


def one_line(exc: ValidationError, source: str | None = None) -> str:
    """A pydantic error as one line, prefixed by the file or settings it came from."""
    field, expected, found = field_error(exc)
    prefix = f"{source}: " if source else ""
    return f"{prefix}field '{field}': {expected}, found {found}"
