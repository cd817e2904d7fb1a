"""Private records (the unit that detection scores, masks target and evaluation measures) and texts files.

A record is one secret (a phone number, a name, ...) owned by one tenant, seen in training after a carrier prompt.
The same tokenization of prompt and secret is used everywhere (detector, evaluation, serving checks), so it lives
here once. A texts file (`train.txt`, `valid.txt`) holds one document per paragraph.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from depn_serve.core.errors import DepnError, one_line

RecordKind = Literal["name", "phone", "email", "id_number"]
DIGIT_KINDS: frozenset[str] = frozenset({"phone", "id_number"})


class PrivateRecord(BaseModel):
    """One line of `records.jsonl`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    tenant: str = Field(min_length=1)
    kind: RecordKind
    prompt: str = Field(min_length=1, description="carrier text that precedes the secret, without trailing space")
    secret: str = Field(min_length=1)
    repeats: int = Field(ge=0, description="how many times the record was injected into the training corpus")
    paraphrases: list[str] = Field(
        default_factory=list, description="prompts with carrier sentences never seen in training"
    )

    @property
    def text(self) -> str:
        """The record as it appears in training text (without the trailing punctuation)."""
        return f"{self.prompt} {self.secret}"


class RecordsError(DepnError):
    """A records file is malformed; the message names the file and line."""


def load_records(path: Path, tenant: str | None = None) -> list[PrivateRecord]:
    """Read and validate a records file, optionally keeping one tenant's records."""
    records = list(iter_records(path))
    if tenant is not None:
        records = [r for r in records if r.tenant == tenant]
        if not records:
            tenants = sorted({r.tenant for r in iter_records(path)})
            raise RecordsError(f"{path}: no records of tenant {tenant!r}; tenants present: {tenants}")
    return records


def iter_records(path: Path) -> Iterator[PrivateRecord]:
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = PrivateRecord.model_validate_json(line)
            except ValidationError as exc:
                raise RecordsError(one_line(exc, f"{path}:{lineno}")) from None
            if record.id in seen:
                raise RecordsError(f"{path}:{lineno}: field 'id': expected a unique id, found duplicate {record.id!r}")
            seen.add(record.id)
            yield record


def save_records(records: Iterable[PrivateRecord], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(record.model_dump_json() + "\n")


def encode_record(tokenizer, record: PrivateRecord, prompt: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, secret) such that prompt_ids + secret_ids == tokenize(prompt + " " + secret).

    Whitespace-only tokens at the start of the secret (byte-level BPE splits digits from the space before them)
    are moved to the prompt: they are the same for every candidate secret and carry no private information.
    `prompt` overrides the record's own prompt (paraphrases).
    """
    prompt = record.prompt if prompt is None else prompt
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(f"{prompt} {record.secret}")["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise RecordsError(
            f"record {record.id!r}: the tokenization of the prompt is not a prefix of prompt + secret; "
            "end the prompt with a letter or punctuation"
        )
    cut = len(prompt_ids)
    while cut < len(full_ids) - 1 and tokenizer.decode([full_ids[cut]]).strip() == "":
        cut += 1
    return full_ids[:cut], full_ids[cut:]



def write_texts(texts: Iterable[str], path: Path) -> None:
    """One document per paragraph: documents contain no blank line, so a blank line separates them."""
    Path(path).write_text("\n\n".join(texts) + "\n", encoding="utf-8")


def read_texts(path: Path) -> list[str]:
    """The documents of a texts file written by `write_texts` (e.g. a test-bed's `train.txt` or `valid.txt`)."""
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"{path}: no such texts file")
    return [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
