"""The tenant mask artifact: the contract between the offline pipeline and the server.

A mask file is a safetensors file holding one packed bit per MLP neuron (`masked_bits`, uint8
`[num_layers, ceil(intermediate_size / 8)]`, little bit order, 1 = neuron switched off) and a JSON manifest in the
safetensors metadata under `depn_mask`. Loading validates every field and the bits against the manifest, and
every error names the file, the field, what was expected and what was found.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from depn_serve.artifacts.verification import Verification, bits_sha256
from depn_serve.core.arch import MlpShape
from depn_serve.core.errors import DepnError, field_error
from depn_serve.core.fileio import atomic_write_bytes
from depn_serve.core.fingerprint import ModelFingerprint
from depn_serve.core.selectors import MaskPolicy

MASK_FORMAT_VERSION = 1
MANIFEST_KEY = "depn_mask"
BITS_KEY = "masked_bits"


def pack_bits(off: torch.Tensor) -> np.ndarray:
    """`[layers, n]` bool -> `[layers, ceil(n / 8)]` uint8, little bit order (the file and wire format)."""
    return np.packbits(off.to(torch.bool).cpu().numpy(), axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `width` bits of each row, as `[layers, width]` bool."""
    return np.unpackbits(packed, axis=1, bitorder="little", count=width).astype(bool)


def first_n(order: torch.Tensor, n: int, dims: tuple[int, int]) -> torch.Tensor:
    """Bool `dims` mask of the first `n` neurons of `order` (flat indices, most wanted first): every selection
    method ends here, whether `n` is its own size, a fixed size or a budgeted search's choice."""
    off = torch.zeros(dims[0] * dims[1], dtype=torch.bool)
    off[order[:n]] = True
    return off.view(dims)


def random_order(dims: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Every neuron in a seeded random order: the paper's random-neuron baseline is a prefix of it."""
    return torch.randperm(dims[0] * dims[1], generator=torch.Generator().manual_seed(seed))


class MaskError(DepnError):
    """A mask file is malformed or does not fit the model; the message says where and why."""

    def __init__(self, source: str | Path, field: str, expected: Any, found: Any):
        self.source, self.field, self.expected, self.found = str(source), field, expected, found
        super().__init__(f"{source}: field '{field}': expected {expected}, found {found}")


class MaskProvenance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="how the neurons were chosen, e.g. 'depn-vote' or 'random'")
    policy: MaskPolicy | None = Field(None, description="the records the mask forgets and keeps")
    records_sha256: str | None = None
    records: int = Field(ge=0, default=0, description="records that contributed")
    detector: dict[str, Any] = Field(default_factory=dict)
    aggregator: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class MaskManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = MASK_FORMAT_VERSION
    tenant: str = Field(min_length=1)
    model_fingerprint: ModelFingerprint
    architecture: str
    num_layers: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    neurons_per_layer: list[int]
    provenance: MaskProvenance
    made_for: str | None = Field(None, min_length=1, description=(
        "the tenant this mask is made for: an isolation mask is made for the tenant whose records it keeps, and a "
        "server refuses it for any other tenant unless the operator opts in; None: any tenant may be served with it"))
    verification: Verification | None = Field(None, description="the attack certificate (`depn verify`)")

    @model_validator(mode="after")
    def _counts_fit(self) -> MaskManifest:
        if len(self.neurons_per_layer) != self.num_layers:
            raise ValueError(
                f"neurons_per_layer has {len(self.neurons_per_layer)} entries but num_layers is {self.num_layers}"
            )
        if any(not 0 <= n <= self.intermediate_size for n in self.neurons_per_layer):
            raise ValueError(f"neurons_per_layer entries must lie in [0, {self.intermediate_size}]")
        isolated = {p.isolates() for p in self._policies()} - {None}
        if "made_for" not in self.model_fields_set and len(isolated) == 1:
            self.made_for = next(iter(isolated))  # a file from before `made_for`: its isolation policy says
        if isolated - {self.made_for}:
            raise ValueError(f"made_for is {self.made_for!r}, but the mask's policy forgets every tenant's records "
                             f"but {sorted(isolated)[0]!r}'s: an isolation mask is made for that tenant")
        if self.verification is not None:
            if self.verification.model_fingerprint != self.model_fingerprint:
                raise ValueError("verification.model_fingerprint is not the mask's model_fingerprint")
            if self.verification.policy.tenant != self.tenant:
                raise ValueError(f"verification.policy.tenant {self.verification.policy.tenant!r} is not the mask's "
                                 f"tenant {self.tenant!r}")
        return self

    def _policies(self) -> list[MaskPolicy]:
        policies = [self.provenance.policy, self.verification.policy if self.verification else None]
        return [p for p in policies if p is not None]

    @property
    def neuron_count(self) -> int:
        return sum(self.neurons_per_layer)


class NeuronMask:
    """A validated mask: manifest plus a `[num_layers, intermediate_size]` bool tensor (True = switched off)."""

    def __init__(self, manifest: MaskManifest, off: torch.Tensor):
        self.manifest = manifest
        self.off = off

    @classmethod
    def create(
        cls,
        tenant: str,
        fingerprint: ModelFingerprint,
        shape: MlpShape,
        off: torch.Tensor,
        provenance: MaskProvenance,
        made_for: str | None = None,
    ) -> NeuronMask:
        """`made_for`: the tenant the mask is made for (default: the one whose isolation policy it follows, else
        none in particular)."""
        off = off.to(torch.bool).cpu()
        if tuple(off.shape) != (shape.num_layers, shape.intermediate_size):
            raise MaskError("<new mask>", "shape", (shape.num_layers, shape.intermediate_size), tuple(off.shape))
        manifest = MaskManifest(
            tenant=tenant,
            model_fingerprint=fingerprint,
            architecture=shape.model_type,
            num_layers=shape.num_layers,
            intermediate_size=shape.intermediate_size,
            neurons_per_layer=off.sum(dim=1).tolist(),
            provenance=provenance,
            made_for=made_for or (provenance.policy.isolates() if provenance.policy is not None else None),
        )
        return cls(manifest, off)

    def bits_sha256(self) -> str:
        """Digest of the packed bits: what a verification certificate is bound to."""
        return bits_sha256(pack_bits(self.off).tobytes())

    def certified(self, verification: Verification) -> NeuronMask:
        """The same mask with `verification` in its manifest (replacing any earlier certificate); certified as a
        tenant's isolation mask, a mask made for no tenant in particular becomes made for that tenant."""
        if verification.mask_sha256 != self.bits_sha256():
            raise MaskError("<new mask>", "verification.mask_sha256", self.bits_sha256(), verification.mask_sha256)
        made_for = self.manifest.made_for or verification.policy.isolates()
        try:
            manifest = MaskManifest.model_validate({**self.manifest.model_dump(), "made_for": made_for,
                                                    "verification": verification})
        except ValidationError as exc:
            raise MaskError("<new mask>", *field_error(exc, whole="manifest")) from None
        return NeuronMask(manifest, self.off)

    def made_for(self, tenant: str) -> NeuronMask:
        """The same mask, made for `tenant` (a server then refuses it for any other tenant)."""
        try:
            manifest = MaskManifest.model_validate({**self.manifest.model_dump(), "made_for": tenant})
        except ValidationError as exc:
            raise MaskError("<new mask>", *field_error(exc, whole="manifest")) from None
        return NeuronMask(manifest, self.off)

    # --- (de)serialization -------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors = {BITS_KEY: torch.from_numpy(pack_bits(self.off))}
        return st_save(tensors, metadata={MANIFEST_KEY: self.manifest.model_dump_json()})

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> NeuronMask:
        path = Path(path)
        if not path.is_file():
            raise MaskError(path, "file", "an existing mask file", "nothing at that path")
        return cls.from_bytes(path.read_bytes(), source=path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str | Path = "<bytes>") -> NeuronMask:
        try:
            tensors = st_load(data)
            metadata = _read_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
            raise MaskError(source, "file", "a safetensors file", f"unreadable data ({exc})") from None
        if MANIFEST_KEY not in metadata:
            raise MaskError(source, MANIFEST_KEY, "a manifest in the safetensors metadata", "no manifest")
        try:
            manifest = MaskManifest.model_validate_json(metadata[MANIFEST_KEY])
        except ValidationError as exc:
            raise MaskError(source, *field_error(exc, whole="manifest")) from None
        if BITS_KEY not in tensors:
            raise MaskError(source, BITS_KEY, "a packed-bits tensor", f"tensors {sorted(tensors)}")
        bits = tensors[BITS_KEY]
        expected_shape = (manifest.num_layers, (manifest.intermediate_size + 7) // 8)
        if bits.dtype != torch.uint8 or tuple(bits.shape) != expected_shape:
            raise MaskError(source, BITS_KEY, f"uint8 {expected_shape}", f"{bits.dtype} {tuple(bits.shape)}")
        if manifest.verification is not None and manifest.verification.mask_sha256 != bits_sha256(bits.numpy().tobytes()):
            raise MaskError(source, "verification.mask_sha256", "the digest of this file's mask bits",
                            "a certificate for other bits")
        unpacked = unpack_bits(bits.numpy(), bits.shape[1] * 8)
        if unpacked[:, manifest.intermediate_size :].any():
            raise MaskError(source, BITS_KEY, "zero padding bits past intermediate_size", "set padding bits")
        off = torch.from_numpy(unpacked[:, : manifest.intermediate_size].copy())
        counts = off.sum(dim=1).tolist()
        if counts != manifest.neurons_per_layer:
            raise MaskError(source, "neurons_per_layer", manifest.neurons_per_layer, f"{counts} bits set")
        return cls(manifest, off)

    # --- use ---------------------------------------------------------------------------------------------------
    def check_model(self, fingerprint: ModelFingerprint, shape: MlpShape, source: str | Path = "<mask>") -> None:
        """Refuse a mask made for other weights or another shape."""
        m = self.manifest
        checks = [
            ("architecture", shape.model_type, m.architecture),
            ("num_layers", shape.num_layers, m.num_layers),
            ("intermediate_size", shape.intermediate_size, m.intermediate_size),
            ("model_fingerprint.config_sha256", fingerprint.config_sha256, m.model_fingerprint.config_sha256),
            ("model_fingerprint.mlp_sha256", fingerprint.mlp_sha256, m.model_fingerprint.mlp_sha256),
        ]
        for field, expected, found in checks:
            if expected != found:
                raise MaskError(source, field, f"{expected!r} (the served model)", repr(found))

    def keep(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Multiplicative rows `[num_layers, intermediate_size]`: 0 for switched-off neurons, 1 elsewhere."""
        return (~self.off).to(dtype)

    def neurons(self) -> dict[int, list[int]]:
        return {layer: self.off[layer].nonzero().flatten().tolist() for layer in range(self.off.shape[0])}


def _read_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > len(data) - 8:
        raise ValueError("bad header length")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
