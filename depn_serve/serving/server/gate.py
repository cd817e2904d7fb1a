"""The gate: whether a mask may serve a tenant. Every pushed mask and every stored mask passes it before it is bound
(at start-up, when the store follower applies another server's change), so a mask never reaches a tenant it was
not made for, or without a certificate that meets the criteria this server requires.

- the model: the mask's fingerprint and shape are the served model's;
- the tenant: a mask made for another tenant (`made_for`, e.g. another tenant's isolation mask, which keeps that
  tenant's records and forgets this one's) is refused unless the operator opted in for that push (`cross_tenant`,
  recorded in the store); a mask made for no tenant in particular may serve any tenant;
- the certificate: it must pass, judged by criteria at least as strict as the server's (a certificate carries
  its own criteria, which its maker chose), with every attack those criteria need run; a tenant's own isolation
  mask must be certified with a policy that forgets every other tenant's records. `--allow-unverified` serves
  masks that fail this part anyway (logged and counted); never the first two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from depn_serve.artifacts.mask import MaskError, NeuronMask
from depn_serve.artifacts.criteria import Criteria
from depn_serve.core.arch import MlpShape
from depn_serve.core.fingerprint import ModelFingerprint

logger = logging.getLogger("depn_serve.serving")


@dataclass(frozen=True)
class Gate:
    fingerprint: ModelFingerprint
    shape: MlpShape
    criteria: Criteria
    allow_unverified: bool = False

    def check(self, mask: NeuronMask, tenant: str, source: str, cross_tenant: bool = False) -> str:
        """Raise `MaskError` naming what fails; otherwise return what to tell the pusher."""
        mask.check_model(self.fingerprint, self.shape, source=source)
        made_for = mask.manifest.made_for
        foreign = made_for not in (None, tenant)
        if foreign and not cross_tenant:
            raise MaskError(source, "made_for", f"a mask made for tenant {tenant!r} or for any tenant (to serve "
                            f"{tenant!r} a mask made for another tenant, push it with --cross-tenant)",
                            f"a mask made for tenant {made_for!r}")
        note = f"; made for tenant {made_for!r}, served to {tenant!r} by the operator's choice" if foreign else ""
        v = mask.manifest.verification
        if v is None:
            found = "no certificate"
        elif not v.passed:
            found = f"a failed certificate ({'; '.join(v.failures)})"
        elif shortfalls := v.shortfalls(self.criteria, isolates=tenant if made_for == tenant else None):
            found = f"a certificate that falls short of this server's criteria ({'; '.join(shortfalls)})"
        else:
            return v.summary() + note
        if not self.allow_unverified:
            raise MaskError(source, "verification", "a passing certificate that meets this server's criteria (run "
                            "`depn verify`, or start depn serve with --allow-unverified)", found)
        logger.warning("depn-serve: %s has %s; served anyway (--allow-unverified)", source, found)
        return f"UNVERIFIED ({found}); served because of --allow-unverified{note}"
