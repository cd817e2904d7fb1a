"""Turn pydantic's validation errors into the one-line 'field: expected, found' form every loader reports."""

from __future__ import annotations

from pydantic import ValidationError


def field_error(exc: ValidationError, whole: str = "document") -> tuple[str, str, str]:
    """(dotted field path, what was expected, what was found) of the first error; `whole` names a
    model-level error."""
    err = exc.errors()[0]
    field = ".".join(str(part) for part in err["loc"]) or whole
    found = "nothing" if err["type"] == "missing" else repr(err.get("input"))[:200]
    return field, err["msg"], found
