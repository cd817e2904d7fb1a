"""Record selectors and mask policies: which records a mask must forget and which it must keep.

A selector is one or more clauses joined by `,` (all must hold); a clause is `field=value`, `field!=value` or
`all`, and a value may list alternatives with `|`. Fields are a record's `tenant`, `kind` and `id`:

    tenant!=acme              every record not owned by acme
    tenant=acme,kind=phone    acme's phone numbers
    id=r0001|r0007            two records by id

Several selectors given for one role (`--forget A --forget B`) select the records any of them selects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from depn_serve.core.errors import DepnError
from depn_serve.core.records import PrivateRecord

FIELDS = ("tenant", "kind", "id")
_CLAUSE = re.compile(r"^(?P<field>[a-z_]+)\s*(?P<op>!=|=)\s*(?P<values>[^=!]+)$")


class SelectorError(DepnError):
    pass


def _clauses(text: str) -> list[tuple[str, bool, frozenset[str]]]:
    """(field, equal?, values) per clause; raises SelectorError naming the selector and the bad clause."""
    if text.strip() == "all":
        return []
    clauses = []
    for part in text.split(","):
        match = _CLAUSE.match(part.strip())
        if not match:
            raise SelectorError(f"record selector {text!r}: expected 'field=value' or 'field!=value' clauses joined "
                                f"by ',' (or 'all'), found {part.strip()!r}")
        if match["field"] not in FIELDS:
            raise SelectorError(f"record selector {text!r}: field {match['field']!r}: expected one of {list(FIELDS)}")
        values = frozenset(v.strip() for v in match["values"].split("|"))
        if "" in values:
            raise SelectorError(f"record selector {text!r}: empty value in {part.strip()!r}")
        clauses.append((match["field"], match["op"] == "=", values))
    return clauses


def _holds(clauses: list[tuple[str, bool, frozenset[str]]], record: PrivateRecord) -> bool:
    return all((getattr(record, name) in values) == equal for name, equal, values in clauses)


def select_records(records: Sequence[PrivateRecord], selectors: Sequence[str]) -> list[PrivateRecord]:
    """The records (in file order) that any of `selectors` selects."""
    parsed = [_clauses(s) for s in selectors]
    return [r for r in records if any(_holds(clauses, r) for clauses in parsed)]


class MaskPolicy(BaseModel):
    """What a mask is for: the tenant it is served to, the records it must forget and those it must keep.

    `keep` empty means every record not forgotten. Saved in the mask's provenance, so a mask says what it promises.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(min_length=1, description="the tenant the mask is served to")
    forget: tuple[str, ...] = Field(min_length=1, description="selectors of the records to forget")
    keep: tuple[str, ...] = Field(default=(), description="selectors of the records to keep (default: the rest)")

    @field_validator("forget", "keep")
    @classmethod
    def _parse(cls, selectors: tuple[str, ...]) -> tuple[str, ...]:
        for selector in selectors:
            _clauses(selector)
        return selectors

    @classmethod
    def own_records(cls, tenant: str) -> MaskPolicy:
        """DEPN's per-tenant mask: forget the tenant's own records, keep everyone else's."""
        return cls(tenant=tenant, forget=(f"tenant={tenant}",))

    @classmethod
    def isolation(cls, tenant: str) -> MaskPolicy:
        """The isolation mask: forget every other tenant's records, keep the tenant's own."""
        return cls(tenant=tenant, forget=(f"tenant!={tenant}",), keep=(f"tenant={tenant}",))

    def forgets_all_but(self, tenant: str) -> bool:
        """Whether the policy forgets every record of every tenant other than `tenant` (one of its forget selectors
        is `tenant!=<tenant>` or `all`), whatever records file it is applied to."""
        return any(_clauses(s) in ([], [("tenant", False, frozenset({tenant}))]) for s in self.forget)

    def isolates(self) -> str | None:
        """The tenant this is the isolation policy of (it forgets every other tenant's records), else None."""
        forgets_everything = any(not _clauses(s) for s in self.forget)
        return self.tenant if self.forgets_all_but(self.tenant) and not forgets_everything else None

    def split(self, records: Sequence[PrivateRecord], source: str = "records") -> tuple[list[PrivateRecord],
                                                                                        list[PrivateRecord]]:
        """(forget, keep) records; refuses a policy that forgets nothing or both forgets and keeps a record."""
        forget = select_records(records, self.forget)
        if not forget:
            raise SelectorError(f"{source}: --forget {' '.join(self.forget)!r} selects no record")
        forget_ids = {r.id for r in forget}
        if self.keep:
            keep = select_records(records, self.keep)
            both = [r.id for r in keep if r.id in forget_ids]
            if both:
                raise SelectorError(f"{source}: records {both[:5]} are selected both to forget and to keep")
        else:
            keep = [r for r in records if r.id not in forget_ids]
        return forget, keep

    def describe(self) -> str:
        keep = " ".join(self.keep) if self.keep else "the rest"
        return f"for {self.tenant}: forget {' '.join(self.forget)}, keep {keep}"
