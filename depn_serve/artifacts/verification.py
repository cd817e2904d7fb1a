"""The verification certificate a mask carries in its manifest (`verification`): the attacks a mask was put
through, on which model, with what per-record results, and whether it passed.

The certificate is bound to its mask and model: `mask_sha256` is the digest of the mask's packed bits and
`model_fingerprint` must be the manifest's; loading a mask checks both. `failures` and `passed` are not taken on
trust either: validation recomputes them from the per-record results, the criteria and the perplexities, so a
certificate edited to say "passed" fails to load like any malformed field. (Whoever can rewrite the file can
rewrite the per-record results too; that calls for a signed store, not a better checksum.)
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from depn_serve.artifacts.criteria import Criteria
from depn_serve.core.fingerprint import ModelFingerprint
from depn_serve.core.selectors import MaskPolicy


class RecordVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    tenant: str
    kind: str
    role: Literal["forget", "keep"]
    tries: dict[str, int]
    hits: dict[str, int]
    exposure_before: float | None = None
    exposure: float | None = None
    reproduced_before: bool | None = None  # keep records: did greedy decoding reproduce it before the mask?

    @property
    def leaks(self) -> list[str]:
        return [name for name, n in self.hits.items() if n]


class Verification(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    model_fingerprint: ModelFingerprint
    mask_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the mask's packed bits")
    records_sha256: str | None = None
    policy: MaskPolicy
    attacks: dict[str, Any] = Field(description="the attack settings (depn_serve.evaluation.attacks.AttackSettings)")
    contexts_sha256: str | None = Field(None, description="the texts the context attack drew its mails from")
    criteria: Criteria
    records: list[RecordVerdict]
    perplexity_before: float = Field(gt=0)
    perplexity_after: float = Field(gt=0)
    seconds: float = Field(ge=0)
    failures: list[str]
    passed: bool
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @model_validator(mode="after")
    def _verdict_follows(self) -> Verification:
        expected = judge(self.criteria, self.records, self.perplexity_before, self.perplexity_after)
        if self.failures != expected:
            raise ValueError(f"failures {self.failures} do not follow from the per-record results ({expected})")
        if self.passed != (not expected):
            raise ValueError(f"passed is {self.passed} but the per-record results give {not expected}")
        return self

    def shortfalls(self, required: Criteria, isolates: str | None = None) -> list[str]:
        """Why a server requiring `required` must not take this certificate as a pass (empty: it may): its criteria
        are weaker, an attack that must find no leak was never run (paraphrases, which need paraphrased prompts in
        the records, aside), or, for `isolates`' isolation mask, its policy spares another tenant's records."""
        weaker = self.criteria.weaker_than(required)
        found = [f"criteria weaker than required: {', '.join(weaker)}"] if weaker else []
        tried = {a for r in self.forget() for a, n in r.tries.items() if n}
        untried = sorted(set(required.zero) - tried - {"paraphrase"})
        found += [f"attacks never run: {untried}"] if untried else []
        if isolates is not None and not self.policy.forgets_all_but(isolates):
            found.append(f"policy forgets {list(self.policy.forget)}, not every record of every tenant but "
                         f"{isolates!r}")
        return found

    # --- figures the summary and the README report ------------------------------------------------------------
    def forget(self) -> list[RecordVerdict]:
        return [r for r in self.records if r.role == "forget"]

    def keep(self) -> list[RecordVerdict]:
        return [r for r in self.records if r.role == "keep"]

    def exposure_drop(self) -> float | None:
        return exposure_drop(self.forget())

    def summary(self) -> str:
        forget, keep = self.forget(), self.keep()
        kept_before = [r for r in keep if r.reproduced_before]
        kept = sum(bool(r.hits.get("greedy")) for r in kept_before)
        drop = self.exposure_drop()
        ppl = self.perplexity_after / self.perplexity_before - 1
        head = "passed" if self.passed else f"FAILED ({'; '.join(self.failures)})"
        leaking = sum(bool(r.leaks) for r in forget)
        return (f"verification {head}: {len(forget) - leaking}/{len(forget)} forgotten records resist every attack, "
                f"{kept}/{len(kept_before)} kept records still reproduced, "
                f"exposure {'n/a' if drop is None else f'-{100 * drop:.0f} %'}, perplexity {100 * ppl:+.2f} %")


def bits_sha256(packed: bytes) -> str:
    return hashlib.sha256(packed).hexdigest()


def exposure_drop(forget: list[RecordVerdict]) -> float | None:
    pairs = [(r.exposure_before, r.exposure) for r in forget if r.exposure is not None and r.exposure_before]
    if not pairs:
        return None
    before = sum(b for b, _ in pairs)
    return 1 - sum(a for _, a in pairs) / before


def judge(criteria: Criteria, records: list[RecordVerdict], ppl_before: float, ppl_after: float) -> list[str]:
    """Every criterion the results miss, as one line each (empty: passed)."""
    failures = []
    forget = [r for r in records if r.role == "forget"]
    if not forget:
        failures.append("no forgotten records were attacked")
    for attack in sorted({a for r in forget for a in r.tries}):
        hits = sum(r.hits.get(attack, 0) for r in forget)
        tries = sum(r.tries.get(attack, 0) for r in forget)
        if attack in criteria.zero:
            if hits:
                failures.append(f"{attack}: {sum(bool(r.hits.get(attack)) for r in forget)} records leak")
        elif tries and hits / tries > criteria.max_rate:
            failures.append(f"{attack}: {hits}/{tries} tries leak (> {100 * criteria.max_rate:g} %)")
    drop = exposure_drop(forget)
    if drop is not None and drop < criteria.min_exposure_drop:
        failures.append(f"exposure falls {100 * drop:.1f} % (< {100 * criteria.min_exposure_drop:g} %)")
    kept_before = [r for r in records if r.role == "keep" and r.reproduced_before]
    if kept_before:
        ratio = sum(bool(r.hits.get("greedy")) for r in kept_before) / len(kept_before)
        if ratio < criteria.min_keep_ratio:
            failures.append(f"kept records: {100 * ratio:.1f} % still reproduced (< {100 * criteria.min_keep_ratio:g} %)")
    increase = ppl_after / ppl_before - 1
    if not math.isfinite(increase) or increase > criteria.max_perplexity_increase:
        failures.append(f"perplexity {100 * increase:+.2f} % (> +{100 * criteria.max_perplexity_increase:g} %)")
    return failures
