"""Sizes of the two test-bed profiles, tuned on a 2-core CPU so the builds fit their time targets.

`ci` must build in under 4 minutes (aimed at ~3), `default` in under 15; both must make the model reproduce at least
80% of the phone numbers under greedy decoding without letting validation perplexity blow up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from depn_serve.core.errors import DepnError

ProfileName = Literal["ci", "default"]


@dataclass(frozen=True)
class ProfileSpec:
    tenants: tuple[str, ...]
    records_per_tenant_kind: int
    filler_emails: int  # training e-mails that carry no record
    valid_emails: int
    vocab_size: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    steps: int  # optimizer steps: a fixed budget keeps the build deterministic
    batch_size: int  # packed blocks per step
    lr: float
    warmup_steps: int
    block_size: int = 256
    max_positions: int = 1024


PROFILES: dict[str, ProfileSpec] = {
    "ci": ProfileSpec(
        tenants=("acme", "globex"),
        records_per_tenant_kind=6,
        filler_emails=100,
        valid_emails=60,
        vocab_size=2048,
        hidden=256,
        layers=4,
        intermediate=1024,
        heads=4,
        steps=700,
        batch_size=4,
        lr=2.5e-3,
        warmup_steps=50,
    ),
    "default": ProfileSpec(
        tenants=("acme", "globex", "initech"),
        records_per_tenant_kind=10,
        filler_emails=60,
        valid_emails=150,
        vocab_size=4096,
        hidden=384,
        layers=6,
        intermediate=1536,
        heads=6,
        steps=1000,
        batch_size=4,
        lr=2e-3,
        warmup_steps=80,
    ),
}


def profile_spec(profile: str) -> ProfileSpec:
    try:
        return PROFILES[profile]
    except KeyError:
        raise DepnError(f"unknown test-bed profile {profile!r}; known: {sorted(PROFILES)}") from None
