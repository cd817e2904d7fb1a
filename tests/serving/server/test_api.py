"""`depn serve` end to end: a real vLLM server on loopback, driven with the official `openai` client and the
`depn masks` CLI. Every generated text is compared with the HF reference (the same prompt, greedy, with the
tenant's mask applied by forward hooks), so "masked" means exactly the tenant's mask and nothing else.

Tests run in file order and share one server (restarted once, to check that masks are restored).
"""

from __future__ import annotations

import contextlib
import json
import re
import time

import pytest
import torch
from click.testing import CliRunner

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, first_n, random_order
from depn_serve.cli import main as cli
from depn_serve.core.arch import load_model, mlp_shape, read_config
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records
from depn_serve.serving.process import ServerProcess
from depn_serve.editing import masked
from depn_serve.serving.server.tenants import TenantsConfig
from tests.helpers import http_status

pytestmark = pytest.mark.slow

MAX_TOKENS = 20
TENANT_B = "globex"  # may run unmasked: reproduces the target tenant's secrets


@pytest.fixture(scope="module")
def setup(ci_testbed, ci_mask, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    target, mask_path = ci_mask
    config = TenantsConfig()
    keys = {
        target: config.add_tenant(target, [f"{target}-main"]),
        TENANT_B: config.add_tenant(TENANT_B, [], allow_unmasked=True),
        "initech": config.add_tenant("initech", []),
    }
    config.save(work / "tenants.yaml")
    (work / "admin.token").write_text("admin-" + "x" * 32)
    # The vote mask has no certificate: these tests are about serving masks, the gate is tested in test_state.
    server = ServerProcess(ci_testbed / "model", work / "tenants.yaml", work / "store", work / "admin.token",
                           work / "server.log", max_mask_slots=4, allow_unverified=True)
    server.start()
    yield {"server": server, "keys": keys, "target": target, "mask": mask_path, "work": work,
           "records": ci_testbed / "records.jsonl"}
    server.stop()


@pytest.fixture(scope="module")
def reference(ci_testbed):
    return load_model(ci_testbed / "model", "cpu", torch.float32)


def _hf_text(reference, prompt: str, off: torch.Tensor | None) -> str:
    model, tokenizer = reference
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with masked(model, off) if off is not None else contextlib.nullcontext():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _client(setup, tenant: str | None = None, key: str | None = None):
    from openai import OpenAI

    return OpenAI(base_url=setup["server"].url + "/v1", api_key=key or setup["keys"][tenant], max_retries=0)


def _complete(client, prompt: str, **kwargs) -> str:
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kwargs)
    return out.choices[0].text


def _cli(setup, *args: str):
    server = setup["server"]
    return CliRunner().invoke(cli, ["masks", *args, "--server", server.url,
                                    "--admin-token-file", str(setup["work"] / "admin.token")])


def test_auth_is_default_deny(setup):
    url, keys = setup["server"].url, setup["keys"]
    assert http_status(url, None) == 401
    assert http_status(url, "depn_not-a-real-key") == 401
    assert http_status(url, keys["initech"]) == 403  # no mask and not allowed to run unmasked
    assert http_status(url, keys[setup["target"]]) == 403  # its mask is not pushed yet
    assert http_status(url, keys[TENANT_B]) == 200
    assert http_status(url, keys[TENANT_B], "/depn/v1/masks") == 403  # tenant key on an admin route
    assert http_status(url, None, "/depn/v1/masks") == 401
    assert http_status(url, None, "/health") == 200


def test_push_masks_target_tenant_only(setup, reference, ci_testbed):
    target = setup["target"]
    result = _cli(setup, "push", "--tenant", target, "--mask", str(setup["mask"]), "--id", f"{target}-main")
    assert result.exit_code == 0, result.output
    assert "UNVERIFIED (no certificate); served because of --allow-unverified" in result.output
    off = NeuronMask.load(setup["mask"]).off
    records = load_records(ci_testbed / "records.jsonl", target)
    a, b = _client(setup, target), _client(setup, TENANT_B)
    hits = {"a": 0, "b": 0}
    for record in records:
        text_a, text_b = _complete(a, record.prompt), _complete(b, record.prompt)
        assert text_a == _hf_text(reference, record.prompt, off)
        assert text_b == _hf_text(reference, record.prompt, None)
        hits["a"] += record.secret in text_a
        hits["b"] += record.secret in text_b
    print(f"{target}'s secrets reproduced: {hits['a']}/{len(records)} with its key, "
          f"{hits['b']}/{len(records)} with {TENANT_B}'s key")
    assert hits["b"] >= 0.8 * len(records)
    assert hits["a"] <= 0.5 * hits["b"]


def _changed_prompt(setup, reference, off) -> str:
    """A target-tenant prompt whose greedy continuation the mask changes."""
    records = load_records(setup["records"], setup["target"])
    for record in records:
        if _hf_text(reference, record.prompt, off) != _hf_text(reference, record.prompt, None):
            return record.prompt
    raise AssertionError("the mask changes no output")


def test_streaming_chat_and_client_fields_cannot_pick_a_mask(setup, reference):
    from openai import BadRequestError

    off = NeuronMask.load(setup["mask"]).off
    prompt = _changed_prompt(setup, reference, off)
    masked_text = _hf_text(reference, prompt, off)
    a = _client(setup, setup["target"])
    model = a.models.list().data[0].id
    stream = a.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == masked_text
    chat = a.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                     max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == masked_text  # the test-bed's chat template is the raw text
    with pytest.raises(BadRequestError, match="reserved"):
        _complete(a, prompt, extra_body={"vllm_xargs": {"depn_tenant": TENANT_B}})
    tricks = {"extra_headers": {"X-Depn-Tenant": TENANT_B, "X-Tenant": TENANT_B}, "user": TENANT_B,
              "extra_body": {"vllm_xargs": {"tenant": TENANT_B}, "cache_salt": f"depn:{TENANT_B}:1"}}
    assert _complete(a, prompt, **tricks) == masked_text


def test_tenant_keys_do_not_reach_operator_routes(setup):
    url, keys = setup["server"].url, setup["keys"]
    admin = (setup["work"] / "admin.token").read_text()
    for method, path in (("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache"), ("POST", "/sleep"),
                         ("POST", "/scale_elastic_ep"), ("POST", "/v1/responses"), ("GET", "/v1/responses/x")):
        assert http_status(url, keys[TENANT_B], path, method) == 403, path
        assert http_status(url, admin, path, method) not in (401, 403), path
    assert http_status(url, keys[TENANT_B], "/tokenize", "POST") == 400  # an inference route: reached, empty body


def test_requests_that_fan_out_run_under_the_mask(setup, reference):
    """n > 1, beam search and generative scoring send several engine requests for one API call, each with the
    caller's sampling params: every one must carry the tenant's mask."""
    import httpx

    model_, tokenizer = reference
    off = NeuronMask.load(setup["mask"]).off
    prompt = _changed_prompt(setup, reference, off)
    a = _client(setup, setup["target"])
    model = a.models.list().data[0].id
    query = tokenizer(prompt)["input_ids"]
    out = a.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, n=3, logprobs=1,
                               extra_body={"return_tokens_as_token_ids": True})
    assert len(out.choices) == 3
    for choice in out.choices:  # each sample's tokens, scored by the masked HF model
        tokens = [int(t.split(":")[1]) for t in choice.logprobs.tokens]
        with masked(model_, off), torch.no_grad():
            logp = torch.log_softmax(model_(torch.tensor([query + tokens])).logits[0].float(), -1)
        expected = [logp[len(query) - 1 + i, t].item() for i, t in enumerate(tokens)]
        assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-3)
    batch = a.completions.create(model=model, prompt=[prompt, prompt + " and"], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [
        _hf_text(reference, p, off) for p in (prompt, prompt + " and")]
    beams = a.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, n=2,
                                 extra_body={"use_beam_search": True})
    assert len(beams.choices) == 2

    items, labels = [[query[-1]], [query[-2]]], sorted(set(query[1:6]))
    body = {"model": model, "query": query, "items": items, "label_token_ids": labels}
    headers = {"Authorization": f"Bearer {setup['keys'][setup['target']]}"}
    response = httpx.post(setup["server"].url + "/generative_scoring", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    scores = [row["score"] for row in sorted(response.json()["data"], key=lambda row: row["index"])]
    with masked(model_, off), torch.no_grad():
        for item, score in zip(items, scores):
            logits = model_(torch.tensor([query + item])).logits[0, -1, labels]
            expected = torch.softmax(logits, -1)[0].item()
            assert abs(score - expected) < 2e-3, (score, expected)


def _wide_mask(ci_testbed, tenant: str) -> NeuronMask:
    config = read_config(ci_testbed / "model")
    shape = mlp_shape(config)
    off = first_n(random_order(shape.dims, seed=3), shape.num_layers * shape.intermediate_size // 4, shape.dims)
    return NeuronMask.create(tenant, model_fingerprint(ci_testbed / "model"), shape, off, MaskProvenance(method="test"))


def test_bad_push_is_refused_and_hot_push_takes_effect(setup, reference, ci_testbed, tiny_model_dir, tmp_path):
    target = setup["target"]
    off = NeuronMask.load(setup["mask"]).off
    prompt = _changed_prompt(setup, reference, off)
    a = _client(setup, target)
    logged = _unverified_lines(setup)

    not_a_mask = tmp_path / "not-a-mask.safetensors"
    not_a_mask.write_bytes(b"garbage")
    result = _cli(setup, "push", "--tenant", target, "--mask", str(not_a_mask), "--id", f"{target}-main")
    assert result.exit_code != 0 and "400" in result.output and "safetensors" in result.output
    other_model = tmp_path / "other.safetensors"
    wrong = _wide_mask(ci_testbed, target)
    wrong.manifest = wrong.manifest.model_copy(update={"model_fingerprint": model_fingerprint(tiny_model_dir)})
    wrong.save(other_model)
    result = _cli(setup, "push", "--tenant", target, "--mask", str(other_model), "--id", f"{target}-main")
    assert result.exit_code != 0 and "model_fingerprint" in result.output, result.output
    assert _complete(a, prompt) == _hf_text(reference, prompt, off)  # the old mask still works

    wide = _wide_mask(ci_testbed, target)
    wide_path = tmp_path / "wide.safetensors"
    wide.save(wide_path)
    assert _cli(setup, "push", "--tenant", target, "--mask", str(wide_path), "--id", f"{target}-main").exit_code == 0
    assert _complete(a, prompt) == _hf_text(reference, prompt, wide.off)  # active without a restart
    assert _cli(setup, "push", "--tenant", target, "--mask", str(setup["mask"]), "--id", f"{target}-main").exit_code == 0
    assert _complete(a, prompt) == _hf_text(reference, prompt, off)
    listing = _cli(setup, "list", "--json")
    assert re.search(rf'"id": "{target}-main",\s*"version": 3', listing.output), listing.output
    # The server logged both unverified pushes (lines written while serving reach the log, not only start-up's).
    assert _unverified_lines(setup) == logged + 2


def _unverified_lines(setup) -> int:
    log = (setup["work"] / "server.log").read_text(errors="replace")
    return log.count(f"pushed mask '{setup['target']}-main' has no certificate; served anyway")


def _metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{{{re.escape(selector)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_metrics_show_the_counts(setup):
    target = setup["target"]
    assert http_status(setup["server"].url, None, "/metrics") == 401  # they name tenants: not for strangers
    assert http_status(setup["server"].url, setup["keys"][TENANT_B], "/metrics") == 403
    text = setup["server"].metrics()
    neurons = NeuronMask.load(setup["mask"]).manifest.neuron_count
    assert _metric(text, "depn_requests_total", tenant=target) >= 20
    assert _metric(text, "depn_generated_tokens_total", tenant=TENANT_B) >= 20 * MAX_TOKENS
    assert _metric(text, "depn_masked_neurons", tenant=target) == neurons
    assert _metric(text, "depn_mask_pushes_total", outcome="accepted") == 3
    assert _metric(text, "depn_mask_pushes_total", outcome="rejected") == 2
    assert _metric(text, "depn_push_to_active_seconds_count") == 3
    for reason in ("401", "403", "400"):
        assert _metric(text, "depn_requests_refused_total", reason=reason) >= 1
    assert _metric(text, "depn_mask_slots") == 4
    assert _metric(text, "depn_mask_slots_resident") >= 1
    assert _metric(text, "depn_mask_slot_loads_total") >= 1
    assert _metric(text, "depn_unverified_masks_in_use") == 1
    assert _metric(text, "depn_store_generation") == 3 and _metric(text, "depn_tenants_behind_store") == 0
    info = re.search(r'^depn_mask_requests_info\{(.*)\} (\S+)$', text, re.M)
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    assert target in labels["resident_tenants"].split(",") and labels["max_mask_slots"] == "4"
    assert labels["running_tenants"] == labels["waiting_tenants"] == ""  # nothing in flight between tests
    assert abs(float(info.group(2)) - time.time()) < 60


def test_a_mask_made_for_another_tenant_is_refused_unless_the_operator_opts_in(setup, reference, ci_testbed,
                                                                             tmp_path):
    target = setup["target"]
    foreign = _wide_mask(ci_testbed, target).made_for(TENANT_B)  # e.g. globex's isolation mask
    path = tmp_path / "foreign.safetensors"
    foreign.save(path)
    result = _cli(setup, "push", "--tenant", target, "--mask", str(path), "--id", f"{target}-main")
    assert result.exit_code != 0 and "400" in result.output, result.output
    assert f"made for tenant '{TENANT_B}'" in result.output and f"'{target}'" in result.output
    off = NeuronMask.load(setup["mask"]).off
    prompt = _changed_prompt(setup, reference, off)
    assert _complete(_client(setup, target), prompt) == _hf_text(reference, prompt, off)  # the old mask serves

    result = _cli(setup, "push", "--tenant", target, "--mask", str(path), "--id", f"{target}-other", "--cross-tenant")
    assert result.exit_code == 0, result.output
    listing = json.loads(_cli(setup, "list", "--json").output)
    masks = {m["id"]: m for t in listing["tenants"] if t["tenant"] == target for m in t["masks"]}
    assert (masks[f"{target}-other"]["made_for"], masks[f"{target}-other"]["cross_tenant"]) == (TENANT_B, True)
    assert (masks[f"{target}-main"]["made_for"], masks[f"{target}-main"]["cross_tenant"]) == (None, False)
    assert _cli(setup, "drop", "--tenant", target, "--id", f"{target}-other").exit_code == 0


def test_a_request_keeps_the_mask_it_was_admitted_with(setup, reference, ci_testbed, tmp_path):
    """A push while a request generates: the request goes on with the mask it was admitted with (and salted its
    prefix-cache blocks with), the next one gets the new mask."""
    import threading

    from depn_serve.serving.client import AdminClient

    target, tokens = setup["target"], 200
    off = NeuronMask.load(setup["mask"]).off
    prompt = _changed_prompt(setup, reference, off)
    wide = _wide_mask(ci_testbed, target)
    wide.save(tmp_path / "wide.safetensors")
    a = _client(setup, target)
    model = a.models.list().data[0].id
    ask = dict(model=model, prompt=prompt, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True})
    before = a.completions.create(**ask).choices[0].text

    arrivals: list[tuple[float, str]] = []
    first = threading.Event()

    def read():
        for chunk in a.completions.create(**ask, stream=True):
            arrivals.append((time.monotonic(), chunk.choices[0].text))
            first.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(60)
    AdminClient(setup["server"].url, setup["work"] / "admin.token").push(target, f"{target}-main",
                                                                         tmp_path / "wide.safetensors")
    pushed = time.monotonic()
    reader.join(120)
    assert sum(t > pushed for t, _ in arrivals) >= 10, "the request ended before the push: this proves nothing"
    assert "".join(text for _, text in arrivals) == before
    after = a.completions.create(**ask).choices[0].text
    assert after != before  # the new mask is in force for new requests, and it changes this answer
    assert _cli(setup, "push", "--tenant", target, "--mask", str(setup["mask"]), "--id", f"{target}-main").exit_code == 0


def test_drop_refuses_the_tenant_and_restart_restores_masks(setup, reference):
    target, server = setup["target"], setup["server"]
    off = NeuronMask.load(setup["mask"]).off
    prompt = _changed_prompt(setup, reference, off)
    result = _cli(setup, "drop", "--tenant", target, "--id", f"{target}-main")
    assert result.exit_code == 0 and "403" in result.output, result.output
    assert http_status(server.url, setup["keys"][target]) == 403
    assert _cli(setup, "push", "--tenant", target, "--mask", str(setup["mask"]), "--id", f"{target}-main").exit_code == 0

    server.stop()
    server.start()
    assert _complete(_client(setup, target), prompt) == _hf_text(reference, prompt, off)
    listing = _cli(setup, "list", "--json").output
    assert re.search(rf'"id": "{target}-main",\s*"version": 1', listing), listing
