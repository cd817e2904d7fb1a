"""Prometheus rules and the Grafana dashboard in deploy/ (issue 12, point 5).

Fast: `promtool` checks the rules and both Prometheus configs, runs the rules' unit tests (every alert fires from
synthetic series, none for a healthy replica), and the dashboard JSON is checked against the provisioned datasource.
Slow: a real `depn serve` on loopback with two tenants, scraped with its metrics token by a real Prometheus (Debian's
package, fetched by scripts/get_prometheus.sh) that loads the rules; every dashboard query and every recording rule
must return data, and every alert rule must evaluate. A query that names a series the server does not export, or a
label it does not carry, returns nothing and fails here. Then a tenant limit and a tenant the server cannot keep up
with the mask store put their alerts in the pending state.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import http_status

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "depn-serve.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "depn-serve.rules.test.yml"
PROMETHEUS_CONFIGS = [DEPLOY / "prometheus.yml", DEPLOY / "prometheus-compose.yml"]
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "depn-serve.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
SEVERITIES = {"critical", "warning", "info"}
JOB = "depn-serve"  # the scrape job the rules expect (`up{job="depn-serve"}`)


def tool(name: str) -> str:
    """prometheus or promtool: .venv/bin (scripts/get_prometheus.sh puts them there), else PATH. Missing, the test
    fails in CI, where setup.sh should have fetched them, and is skipped elsewhere."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found:
        return found
    message = (f"{name} not found in {Path(sys.executable).parent} or PATH: run `bash scripts/get_prometheus.sh` "
               "(Debian's prometheus package, unpacked into .venv/bin)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def promtool(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "record" in rule]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every query of every panel."""
    return [(f"{panel['title']} / {target['refId']}", target["expr"])
            for panel in panels(board) if panel["type"] != "row" for target in panel["targets"]]


# ---------------------------------------------------------------------------------------------------------------
# promtool


def test_rules_pass_promtool_check() -> None:
    output = promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(recording_rules()) + len(alert_rules())} rules found" in output, output


def credentials_files(config: dict[str, Any]) -> list[str]:
    return [job["authorization"]["credentials_file"] for job in config["scrape_configs"]
            if (job.get("authorization") or {}).get("credentials_file")]


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda path: path.name)
def test_prometheus_config_passes_promtool_check_and_loads_the_rules(config: Path, tmp_path: Path) -> None:
    doc = yaml.safe_load(config.read_text())
    rule_files = [(config.parent / name).resolve() for name in doc["rule_files"]]
    assert RULES in rule_files, f"{config.name} does not load {RULES.relative_to(ROOT)}: {rule_files}"
    # promtool also checks every file the config names: the rules, and the token file, which is installed with it
    # (relative to it), not kept in deploy/. So the check runs on a copy with the rules beside it and a token file.
    copy = tmp_path / config.name
    copy.write_text(config.read_text())
    for name in doc["rule_files"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to((config.parent / name).resolve())
    for name in credentials_files(doc):
        assert not Path(name).is_absolute(), f"{config.name}: {name}: keep it relative to the config, like the rules"
        (tmp_path / name).write_text("a-token-for-the-check-only\n")
    promtool("check", "config", str(copy))


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda path: path.name)
def test_prometheus_config_sends_the_metrics_token(config: Path) -> None:
    """/metrics answers 401 without a token: every depn-serve job sends one, from a file (never written into the
    config, which is no secret)."""
    jobs = [job for job in yaml.safe_load(config.read_text())["scrape_configs"] if job["job_name"] == JOB]
    assert jobs, f"{config.name} has no {JOB} job"
    for job in jobs:
        authorization = job.get("authorization") or {}
        assert authorization.get("type", "Bearer") == "Bearer" and authorization.get("credentials_file"), job
        assert "credentials" not in authorization and "bearer_token" not in job, f"{config.name}: a token inline"


def test_compose_mounts_the_rules_where_its_config_names_them() -> None:
    """prometheus-compose.yml names the rules relative to itself; in the container it is /etc/prometheus/prometheus.yml,
    so the rules must be mounted at the same relative place."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = {volume["target"]: volume["source"] for volume in compose["services"]["prometheus"]["volumes"]}
    config = yaml.safe_load((DEPLOY / "prometheus-compose.yml").read_text())
    for name in config["rule_files"]:
        target = str(Path("/etc/prometheus") / name)
        assert target in mounts, f"compose.yaml mounts nothing at {target}"
        assert (DEPLOY / mounts[target]).resolve() == (DEPLOY / name).resolve()


def test_rule_unit_tests_pass() -> None:
    output = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert "SUCCESS" in output, output


def test_every_alert_is_annotated_and_fires_in_a_unit_test() -> None:
    """Each alert has a severity, a summary and a description, fires in at least one unit test, and is checked
    silent for the healthy replica."""
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired, silent_when_healthy = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                fired.add(check["alertname"])
            elif case["name"] == "healthy replica":
                silent_when_healthy.add(check["alertname"])
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity not one of {SEVERITIES}"
        assert {"summary", "description"} <= set(rule.get("annotations", {})), f"{name}: summary/description"
        assert name in fired, f"{name} fires in no case of {RULES_TEST.name}"
        assert name in silent_when_healthy, f"{name} is not checked silent in the healthy case"


# ---------------------------------------------------------------------------------------------------------------
# the dashboard, statically


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uids = {source["uid"] for path in DATASOURCES.glob("*.yaml")
            for source in yaml.safe_load(path.read_text())["datasources"] if source["type"] == "prometheus"}
    board = dashboard()
    used = [item["datasource"] for item in [*panels(board), *board["templating"]["list"]] if item["type"] != "row"]
    used += [target["datasource"] for panel in panels(board) if panel["type"] != "row" for target in panel["targets"]]
    for datasource in used:
        assert datasource == {"type": "prometheus", "uid": datasource["uid"]} and datasource["uid"] in uids, datasource


def test_dashboard_layout_and_variables() -> None:
    board = dashboard()
    assert board["uid"] == "depn-serve" and board.get("id") is None  # provisioned: a stable uid, no database id
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = [panel["title"] for panel in panels(board)]
    assert len(titles) == len(set(titles)), "panel titles repeat"
    taken: set[tuple[int, int]] = set()
    for panel in panels(board):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"
        xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        cells = {(x, y) for x in xs for y in ys}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            assert panel.get("description") and panel["targets"], f"{panel['title']}: no description or no query"
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert variables == {"instance", "tenant"}
    used = {name for _, expr in panel_targets(board) for name in re.findall(r"\$\{?(\w+)", expr)}
    assert used - {"__rate_interval"} == variables, f"variables used: {used}"


# ---------------------------------------------------------------------------------------------------------------
# a real Prometheus scraping a real depn serve

TENANTS = ("acme", "globex")
RANGE_VARIABLES = {"__rate_interval": "2m", "__interval": "15s", "__range": "5m"}  # the whole run fits in 2m


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_prometheus(work: Path, target: str, token_file: Path) -> Prometheus:
    """Prometheus on a free loopback port, scraping `target` with the metrics token in `token_file` every second
    and evaluating the rules every second."""
    from depn_serve.serving.process import free_port

    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                            "authorization": {"credentials_file": str(token_file)},
                            "static_configs": [{"targets": [target]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([tool("prometheus"), f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(prometheus.url + "/-/ready", timeout=2):
                return prometheus
        except OSError:
            time.sleep(0.2)
    prometheus.stop()
    raise RuntimeError(f"prometheus was not ready after 60 s:\n{log.read_text()[-3000:]}")


def wait_for(what: str, check, timeout: float = 30) -> Any:
    deadline = time.time() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def random_mask(model_dir: Path, tenant: str, seed: int, fingerprint=None):
    """A mask with a tenth of the MLP neurons off, for `tenant` (no certificate: the server runs with
    --allow-unverified, which the dashboard and an alert show), made for `model_dir` or the model `fingerprint`."""
    from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, first_n, random_order
    from depn_serve.core.arch import mlp_shape, read_config
    from depn_serve.core.fingerprint import model_fingerprint

    shape = mlp_shape(read_config(model_dir))
    off = first_n(random_order(shape.dims, seed=seed), shape.num_layers * shape.intermediate_size // 10, shape.dims)
    return NeuronMask.create(tenant, fingerprint or model_fingerprint(model_dir), shape, off,
                             MaskProvenance(method="test"))


def post_status(url: str, key: str, path: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"a dashboard variable is left in {expr}"
    return expr


def promql_regex(values: list[str]) -> str:
    """What Grafana puts for a multi-value variable in `=~"..."`: the values, regex-escaped, joined by |, with the
    backslashes doubled for a PromQL string."""
    return "|".join(re.escape(value) for value in values).replace("\\", "\\\\")


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.mark.slow
def test_dashboard_and_rules_return_data_from_a_real_prometheus(ci_testbed: Path, tmp_path: Path) -> None:
    from depn_serve.core.fingerprint import ModelFingerprint
    from depn_serve.core.records import load_records
    from depn_serve.serving.client import AdminClient, AdminError
    from depn_serve.serving.process import SMALL_CPU_OPTIONS, ServerProcess
    from depn_serve.serving.server.fleet import push_to_store
    from depn_serve.serving.server.tenants import Limits, TenantsConfig

    tool("prometheus")  # before the server's minute of start-up
    model = ci_testbed / "model"
    config = TenantsConfig()
    keys = {tenant: config.add_tenant(tenant, [f"{tenant}-main"]) for tenant in TENANTS}
    config.find(TENANTS[0]).limits = Limits(max_n=1)  # so that a request with n = 2 is limited (429)
    tenants_file = tmp_path / "tenants.yaml"
    config.save(tenants_file)
    token = tmp_path / "admin.token"
    token.write_text("admin-" + "x" * 32)
    metrics_token = tmp_path / "metrics.token"  # Prometheus' own, as deploy/ sets it up
    metrics_token.write_text("metrics-" + "y" * 32)
    # --max-behind 1: a tenant the server cannot keep up with the store for is refused after a second, not 30.
    options = ("--metrics-token-file", str(metrics_token), "--max-behind", "1", *SMALL_CPU_OPTIONS)
    server = ServerProcess(model, tenants_file, tmp_path / "store", token, tmp_path / "server.log",
                           vllm_options=options, max_mask_slots=4, allow_unverified=True)
    started = time.monotonic()
    server.start()
    prometheus = None
    try:
        instance = f"127.0.0.1:{server.port}"
        assert http_status(server.url, None, path="/metrics") == 401  # so the scrapes below are the token's doing
        (tmp_path / "prometheus").mkdir()
        prometheus = start_prometheus(tmp_path / "prometheus", instance, metrics_token)
        wait_for("a first scrape", lambda: [s for s in prometheus.query(f'up{{job="{JOB}"}}') if s["value"][1] == "1"])
        served = time.monotonic()

        # Traffic after the first scrape, in two rounds with scrapes between them: a labelled counter appears with
        # its first event, and only a rise after that makes its rate (and the refused share) a number.
        admin = AdminClient(server.url, token)
        masks = {}
        for seed, tenant in enumerate(TENANTS):
            masks[tenant] = tmp_path / f"{tenant}.safetensors"
            random_mask(model, tenant, seed).save(masks[tenant])
        prompts = [record.prompt for record in load_records(ci_testbed / "records.jsonl")][:2]
        completions = 0

        def one_round(round_: int) -> None:
            nonlocal completions
            for tenant in TENANTS:
                admin.push(tenant, f"{tenant}-main", masks[tenant])  # accepted (a new version in the second round)
                server.complete(keys[tenant], prompts[round_], max_tokens=8)
                completions += 1
            assert http_status(server.url, None) == 401
            assert http_status(server.url, "depn_not-a-key") == 401
            limited = {"model": server.model_id(keys[TENANTS[0]]), "prompt": prompts[round_], "max_tokens": 1, "n": 2}
            assert post_status(server.url, keys[TENANTS[0]], "/v1/completions", limited) == 429

        one_round(0)
        wait_for("the first round to be scraped",
                 lambda: prometheus.query(f'sum(depn_requests_total{{job="{JOB}"}}) >= {completions}'))
        one_round(1)
        garbage = tmp_path / "garbage.safetensors"
        garbage.write_bytes(b"not a mask")
        with pytest.raises(AdminError) as refused:
            admin.push(TENANTS[0], f"{TENANTS[0]}-main", garbage)
        assert refused.value.status == 400  # rejected
        # A tenants file that cannot be applied: tenant requests get 503 until it is fixed.
        good = tenants_file.read_bytes()
        tenants_file.write_text("tenants: [oops")
        assert http_status(server.url, keys[TENANTS[0]]) == 503
        tenants_file.write_bytes(good)
        assert http_status(server.url, keys[TENANTS[0]]) == 200
        traffic = time.monotonic()

        # Scrapes after the traffic, and rule evaluations on them.
        wait_for("the last request to be scraped",
                 lambda: prometheus.query(f'sum(depn_requests_total{{job="{JOB}"}}) >= {completions}'))
        time.sleep(3)

        board = dashboard()
        # The variables' own queries find the replica and both tenants.
        values = {"instance": promql_regex([instance]), "tenant": promql_regex(list(TENANTS))}
        for variable in board["templating"]["list"]:
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable["query"]
            selector = substitute(match.group(1), {**values, **RANGE_VARIABLES})
            found = {series.get(match.group(2)) for series in prometheus.api("series", **{"match[]": selector})}
            expected = {instance} if variable["name"] == "instance" else set(TENANTS)
            assert expected <= found, f"variable {variable['name']}: {found}"

        queries = {f"panel {where}": substitute(expr, {**values, **RANGE_VARIABLES})
                   for where, expr in panel_targets(board)}
        queries |= {f"recording rule {rule['record']}": rule["expr"] for rule in recording_rules()}
        queries |= {f"recorded series {rule['record']}": rule["record"] for rule in recording_rules()}
        empty = [name for name, expr in queries.items() if not finite(prometheus.query(expr))]
        if empty:  # one scrape that timed out on a busy machine leaves gauges stale until the next: ask again
            time.sleep(3)
            empty = [name for name in empty if not finite(prometheus.query(queries[name]))]
        assert not empty, "queries without data:\n" + "\n".join(f"{name}: {queries[name]}" for name in empty)
        rising = prometheus.query("instance_tenant:depn_requests:rate5m > 0")
        assert {sample["metric"]["tenant"] for sample in rising} == set(TENANTS), rising

        # Every alert rule loaded and evaluates (an alert's query may rightly be empty).
        loaded = prometheus.api("rules")["groups"]
        assert {group["name"] for group in loaded} == {group["name"] for group in rule_groups()}
        for group in loaded:
            for rule in group["rules"]:
                assert rule["health"] == "ok", f"{rule['name']}: {rule['health']} {rule.get('lastError')}"
        for rule in alert_rules():
            prometheus.query(rule["expr"])

        def alert_states() -> dict[str, str]:
            return {alert["labels"]["alertname"]: alert["state"] for alert in prometheus.api("alerts")["alerts"]}

        # The state this run left: a rejected push (fires at once), unverified masks (pending for 10 minutes), a
        # tenant limit refusing a good share of the requests (pending for 15 minutes; its group evaluates on its own).
        wait_for("the limited requests' alert", lambda: alert_states().get("DepnRequestsLimited") == "pending", 10)
        states = alert_states()
        assert states.get("DepnMaskPushRejected") == "firing", states
        assert states.get("DepnUnverifiedMasksInUse") == "pending", states
        assert states.get("DepnRequestsLimited") == "pending", states
        assert {"DepnServerDown", "DepnMaskPushFailed", "DepnTenantsRefusedBehind", "DepnMaskSlotStale",
                "DepnUntaggedRequestReachedModel"}.isdisjoint(states), states
        limited = prometheus.query('instance_limit:depn_requests_limited:ratio_rate5m > 0')
        assert [sample["metric"]["limit"] for sample in limited] == ["n"], limited

        # A mask for another model written straight into the store: the server cannot apply it, keeps the tenant's
        # previous mask for --max-behind, then refuses the tenant; the critical alert goes pending on it.
        behind = TENANTS[1]
        other_model = ModelFingerprint(config_sha256="0" * 64, mlp_sha256="0" * 64)
        random_mask(model, behind, 7, fingerprint=other_model).save(tmp_path / "other-model.safetensors")
        push_to_store(tmp_path / "store", tenants_file, behind, f"{behind}-main",
                      (tmp_path / "other-model.safetensors").read_bytes())
        wait_for("the refused tenant's alert", lambda: alert_states().get("DepnTenantsRefusedBehind") == "pending")
        assert http_status(server.url, keys[behind]) == 503
        assert admin.health().tenants_refused_behind == [behind]  # where the alert sends the operator
        states = alert_states()
        assert states.get("DepnTenantsBehindStore") == "pending", states
        print(f"server start and first scrape {served - started:.0f} s, traffic {traffic - served:.0f} s, "
              f"checked {len(queries)} queries (panels, recording rules and their series), "
              f"{len(alert_rules())} alerts; alert states: {states}")
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
