import pytest
import yaml
from click.testing import CliRunner

from depn_serve.cli import main
from depn_serve.serving.server.tenants import TenantsConfig, TenantsError, hash_key


def test_add_stores_only_the_hash_and_authenticates(tmp_path):
    path = tmp_path / "tenants.yaml"
    runner = CliRunner()
    res = runner.invoke(main, ["tenants", "add", "--config", str(path), "--tenant", "acme", "--mask", "acme-v1"])
    assert res.exit_code == 0, res.output
    key = res.stdout.strip().splitlines()[-1]
    assert key.startswith("depn_") and len(key) > 40
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    res = runner.invoke(main, ["tenants", "add", "--config", str(path), "--tenant", "globex", "--allow-unmasked"])
    other = res.stdout.strip().splitlines()[-1]

    config = TenantsConfig.load(path)
    assert config.authenticate(key).id == "acme" and config.authenticate(key).masks == ["acme-v1"]
    assert config.authenticate(other).id == "globex"
    assert config.authenticate(key + "x") is None
    assert config.authenticate(None) is None  # no anonymous tenant: no key means no tenant
    listing = runner.invoke(main, ["tenants", "list", "--config", str(path)]).output
    assert "acme\tmasks: acme-v1" in listing and key[:9] in listing and key not in listing

    res = runner.invoke(main, ["tenants", "add", "--config", str(path), "--tenant", "acme"])
    assert res.exit_code != 0 and "already exists" in res.output
    assert TenantsConfig.load(path).authenticate(key).id == "acme"  # the file was left as it was


def test_adapters_limits_and_criteria_in_the_file(tmp_path):
    path = tmp_path / "tenants.yaml"
    runner = CliRunner()
    add = ["tenants", "add", "--config", str(path), "--allow-unmasked"]
    assert runner.invoke(main, [*add, "--tenant", "acme", "--lora-adapter", "acme-style"]).exit_code == 0
    res = runner.invoke(main, [*add, "--tenant", "globex", "--lora-adapter", "acme-style"])
    assert res.exit_code != 0 and "taken already: {'acme-style': 'acme'}" in res.output
    assert "LoRA: acme-style" in runner.invoke(main, ["tenants", "list", "--config", str(path)]).output
    doc = yaml.safe_load(path.read_text())
    assert "limits" not in doc and "criteria" not in doc  # unset blocks stay out of the file
    doc["limits"] = {"max_n": 4, "tokens_per_minute": 1000}
    doc["tenants"][0]["limits"] = {"max_n": None}
    doc["criteria"] = {"max_rate": 0.05}
    path.write_text(yaml.safe_dump(doc))
    config = TenantsConfig.load(path)
    acme = config.tenant("acme")
    assert config.limits_of(acme).max_n is None and config.limits_of(acme).tokens_per_minute == 1000
    assert config.limits_of(acme).max_in_flight == 64 and config.criteria.max_rate == 0.05
    config.save(path)
    assert TenantsConfig.load(path).limits_of(acme).max_n is None  # an explicit "no limit" survives a save
    doc["tenants"].append({"id": "globex", "lora_adapters": ["acme-style"]})
    with pytest.raises(TenantsError, match="belong to several tenants"):
        TenantsConfig.parse(yaml.safe_dump(doc).encode(), path)


def test_keys_rotate_and_revoke_and_tenants_go(tmp_path):
    runner = CliRunner()
    path = tmp_path / "tenants.yaml"
    first = runner.invoke(main, ["tenants", "add", "--config", str(path), "--tenant", "acme"]).stdout.strip()
    second = runner.invoke(main, ["tenants", "key", "--config", str(path), "--tenant", "acme"]).stdout.strip()
    assert {TenantsConfig.load(path).authenticate(k).id for k in (first, second)} == {"acme"}
    res = runner.invoke(main, ["tenants", "revoke", "--config", str(path), "--tenant", "acme", "--key-hint", first[:9]])
    assert res.exit_code == 0 and "revoked 1 key" in res.output
    config = TenantsConfig.load(path)
    assert config.authenticate(first) is None and config.authenticate(second).id == "acme"
    res = runner.invoke(main, ["tenants", "revoke", "--config", str(path), "--tenant", "acme",
                               "--key-hint", "depn_zzzz"])
    assert res.exit_code != 0 and "no key starting with" in res.output
    assert runner.invoke(main, ["tenants", "remove", "--config", str(path), "--tenant", "acme"]).exit_code == 0
    assert TenantsConfig.load(path).tenants == []


def test_anonymous_tenant(tmp_path):
    config = TenantsConfig()
    config.add_tenant("public", ["public-mask"])
    config.anonymous_tenant = "public"
    path = tmp_path / "t.yaml"
    config.save(path)
    assert TenantsConfig.load(path).authenticate(None).id == "public"


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"tenants": [{"id": "a"}, {"id": "a"}]}, "unique"),
        ({"anonymous_tenant": "ghost", "tenants": [{"id": "a"}]}, "ghost"),
        ({"tenants": [{"id": "a b"}]}, "tenants.0.id"),
        ({"tenants": [{"id": "a", "api_keys": [{"sha256": "xyz", "hint": "d", "created_at": "2026-01-01T00:00:00Z"}]}]},
         "tenants.0.api_keys.0.sha256"),
        ({"tenants": [{"id": "a", "role": "admin"}]}, "tenants.0.role"),
        ({"version": 2}, "version"),
        ({"tenants": [{"id": "a", "masks": ["ok", "../etc"]}]}, "tenants.0.masks.1"),
    ],
)
def test_invalid_files_are_refused_with_the_field(tmp_path, doc, field):
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(TenantsError) as err:
        TenantsConfig.load(path)
    assert str(path) in str(err.value) and field in str(err.value)
