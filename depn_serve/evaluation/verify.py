"""Attack a mask and write its certificate: the gate every served mask passes, whatever selected its neurons.

Before the mask: greedy decoding on the records to keep (which of them the model reproduces at all) and the
exposure of the digit secrets to forget. With the mask: the whole attack suite (`attacks.run_attacks`) on the
records to forget, greedy decoding on the records to keep, and validation perplexity. The unrelated mails of the
context attack come from the validation text, which no fit sees.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from depn_serve.artifacts.criteria import Criteria
from depn_serve.artifacts.mask import NeuronMask
from depn_serve.artifacts.verification import RecordVerdict, Verification, judge
from depn_serve.core.records import PrivateRecord
from depn_serve.core.selectors import MaskPolicy
from depn_serve.editing import masked
from depn_serve.evaluation.attacks import AttackSettings, ModelOracle, run_attacks
from depn_serve.evaluation.metrics import perplexity


def verify_mask(
    model, tokenizer, mask: NeuronMask, records: Sequence[PrivateRecord], valid_texts: Sequence[str],
    policy: MaskPolicy | None = None, settings: AttackSettings | None = None, criteria: Criteria | None = None,
    records_sha256: str | None = None, source: str = "records",
) -> Verification:
    """The certificate of `mask` under `policy` (default: the one in its provenance, else forget the tenant's own
    records). The model must be the one the mask was made for (the caller checks the fingerprint)."""
    started = time.perf_counter()
    settings = settings or AttackSettings()
    criteria = criteria or Criteria()
    policy = policy or mask.manifest.provenance.policy or MaskPolicy.own_records(mask.manifest.tenant)
    forget, keep = policy.split(records, source)
    oracle = ModelOracle(model, tokenizer)
    baseline = settings.model_copy(update={"paraphrases": False, "contexts": 0, "samples": 0, "beam_width": 0})
    before = {r.id: r for r in run_attacks(oracle, tokenizer, forget, keep, (), baseline, model).records}
    ppl_before = perplexity(model, tokenizer, valid_texts)
    with masked(model, mask.off):
        after = run_attacks(oracle, tokenizer, forget, keep, valid_texts, settings, model)
        ppl_after = perplexity(model, tokenizer, valid_texts)
    verdicts = [
        RecordVerdict(id=r.id, tenant=r.tenant, kind=r.kind, role=r.role, tries=r.tries, hits=r.hits,
                      exposure_before=before[r.id].exposure, exposure=r.exposure,
                      reproduced_before=before[r.id].reproduced if r.role == "keep" else None)
        for r in after.records
    ]
    failures = judge(criteria, verdicts, ppl_before, ppl_after)
    return Verification(
        model_fingerprint=mask.manifest.model_fingerprint, mask_sha256=mask.bits_sha256(),
        records_sha256=records_sha256, policy=policy, attacks=settings.model_dump(mode="json"),
        contexts_sha256=hashlib.sha256("\n\n".join(valid_texts).encode()).hexdigest(), criteria=criteria,
        records=verdicts, perplexity_before=ppl_before, perplexity_after=ppl_after,
        seconds=time.perf_counter() - started, failures=failures, passed=not failures,
    )
