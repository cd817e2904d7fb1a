"""What `depn serve` and the plugin refuse before any vLLM engine starts (fast; no engine)."""

import json
import shutil

import depn_serve_patches
import pytest
from click.testing import CliRunner

from depn_serve.cli import main as cli
from depn_serve.core.errors import DepnError
from depn_serve.serving.server.tenants import TenantsConfig
from tests.helpers import make_tiny_model


@pytest.fixture
def files(tmp_path):
    config = TenantsConfig()
    config.add_tenant("acme", ["acme-main"])
    config.save(tmp_path / "tenants.yaml")
    (tmp_path / "admin.token").write_text("a" * 24)
    return tmp_path


def _serve(files, model, *extra, token="admin.token"):
    return CliRunner().invoke(cli, ["serve", "--model", str(model), "--tenants", str(files / "tenants.yaml"),
                                    "--mask-store", str(files / "store"),
                                    "--admin-token-file", str(files / token), *extra])


def test_unservable_architecture_is_refused(files, tmp_path):
    result = _serve(files, make_tiny_model(tmp_path / "gpt2", arch="gpt2"))
    assert result.exit_code != 0 and "model_type 'gpt2' cannot be served" in result.output


@pytest.fixture
def handed_over(monkeypatch):
    """Stop `depn serve` where it would start vLLM; the states it would have served with."""
    from prometheus_client import CollectorRegistry

    hooks = depn_serve_patches.versioned().frontend_hooks()
    states = []  # a registry each: several start-ups in one process
    monkeypatch.setattr(hooks, "run", lambda args, spec: states.append(spec.build(CollectorRegistry())))
    return states


def test_bad_options_are_refused(files, tiny_model_dir, monkeypatch):
    (files / "short.token").write_text("short")
    result = _serve(files, tiny_model_dir, token="short.token")
    assert result.exit_code != 0 and "at least 16 characters" in result.output
    result = _serve(files, tiny_model_dir, "--worker-extension-cls", "x.Y")
    assert result.exit_code != 0 and "--worker-extension-cls is set by depn serve" in result.output
    for option, message in ((["--api-key", "secret"], "--api-key"), (["--enable-dbo"], "--enable-dbo"),
                            (["--prefill-context-parallel-size", "2"], "prefill context parallelism")):
        result = _serve(files, tiny_model_dir, *option)
        assert result.exit_code != 0 and message in result.output, option
    monkeypatch.setenv("VLLM_API_KEY", "secret")
    result = _serve(files, tiny_model_dir)
    assert result.exit_code != 0 and "VLLM_API_KEY" in result.output


def test_a_bad_stored_mask_quarantines_its_tenant_only(files, tiny_model_dir, handed_over):
    config = TenantsConfig.load(files / "tenants.yaml")
    config.add_tenant("globex", [], allow_unmasked=True)
    config.save(files / "tenants.yaml")
    (files / "store").mkdir()
    (files / "store" / "acme-main.safetensors").write_bytes(b"junk")  # a format-1 store: migrated, then checked
    (files / "store" / "index.json").write_text(
        '{"masks": {"acme-main": {"version": 1, "sha256": "' + "0" * 64 + '", "neurons": 1, "built_for": "acme",'
        ' "pushed_at": "2026-11-28T00:00:00Z"}}}')
    result = _serve(files, tiny_model_dir)
    assert result.exit_code == 0, result.output
    (state,) = handed_over
    problem = state._planned["acme"].problem
    assert "acme-main" in problem and "differs from the index's" in problem
    assert state._planned["globex"].problem is None


def test_unsupported_vllm_version_is_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    with pytest.raises(DepnError, match=r"supports vLLM 0\.32\.x; this is vLLM 0\.31\.2"):
        depn_serve_patches.versioned()
    with pytest.raises(DepnError, match="at least 1"):
        depn_serve_patches.engine_kwargs(0)


def test_an_unverified_stored_mask_is_quarantined_unless_allowed(files, tiny_model_dir, handed_over):
    import torch

    from depn_serve.artifacts.mask import MaskProvenance, NeuronMask
    from depn_serve.core.arch import mlp_shape, read_config
    from depn_serve.core.fingerprint import model_fingerprint
    from depn_serve.serving.server.store import MaskStore

    shape = mlp_shape(read_config(tiny_model_dir))
    off = torch.zeros(shape.dims, dtype=torch.bool)
    off[0, 1] = True
    mask = NeuronMask.create("acme", model_fingerprint(tiny_model_dir), shape, off, MaskProvenance(method="hand"))
    MaskStore(files / "store").put("acme", "acme-main", mask.to_bytes(), mask, ["acme-main"])
    assert _serve(files, tiny_model_dir).exit_code == 0
    assert "field 'verification': expected a passing certificate" in handed_over[-1]._planned["acme"].problem

    result = _serve(files, tiny_model_dir, "--allow-unverified")
    assert result.exit_code == 0, result.output
    assert handed_over[-1].gate.allow_unverified and handed_over[-1]._planned["acme"].problem is None


def test_the_server_holds_its_own_criteria(files, tiny_model_dir, handed_over):
    from depn_serve.artifacts.criteria import Criteria

    assert _serve(files, tiny_model_dir).exit_code == 0
    assert handed_over[-1].gate.criteria == Criteria()  # the product's
    config = TenantsConfig.load(files / "tenants.yaml")
    config.criteria = Criteria(max_rate=0.05, min_keep_ratio=0.5)
    config.save(files / "tenants.yaml")
    result = _serve(files, tiny_model_dir, "--require-max-rate", "0.02")
    assert result.exit_code == 0, result.output
    assert handed_over[-1].gate.criteria == Criteria(max_rate=0.02, min_keep_ratio=0.5)  # the command line wins
    (files / "metrics.token").write_text("a" * 24)  # the admin token
    result = _serve(files, tiny_model_dir, "--metrics-token-file", str(files / "metrics.token"))
    assert result.exit_code != 0 and "a token of its own" in result.output


@pytest.mark.parametrize("option, env, message", [
    (["--speculative-config", '{"method": "draft_model", "model": "/x", "num_speculative_tokens": 2}'], {},
     "draft model runs without the tenant's mask"),
    (["--speculative-config", '{"method": "eagle3", "model": "/x", "num_speculative_tokens": 2}'], {},
     "draft model runs without the tenant's mask"),
    ([], {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, "runtime LoRA loading is refused"),
])
def test_vllm_options_that_bypass_the_tenant_model_are_refused(files, tiny_model_dir, handed_over, monkeypatch,
                                                              option, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = _serve(files, tiny_model_dir, *option)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not handed_over


def test_masks_from_must_be_the_same_model_apart_from_quantization(files, tiny_model_dir, tmp_path, handed_over):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.01}))
    result = _serve(files, tiny_model_dir, "--masks-from", str(other))
    assert result.exit_code != 0 and "masks carry over only to a quantized copy of the same model" in result.output
    result = _serve(files, tiny_model_dir, "--masks-from", str(tiny_model_dir))
    assert result.exit_code == 0, result.output
