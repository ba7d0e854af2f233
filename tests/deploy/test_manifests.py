"""The Kubernetes, KubeRay and llm-d manifests of ``deploy/`` (never run on a cluster here): every document parses;
the core kinds validate with ``kubernetes-validate`` (strict) against a pinned Kubernetes; the custom resources
validate against their CRD schemas (``tests/deploy/schemas/``, sources in each file's ``$comment``) with unknown
fields refused, as ``kubectl apply`` refuses them; and what must match lofit-serve does: flags and ``LOFIT_*``
variables parse with ``server.cli.parse``, probes and the metrics path are routes of ``server.app.create_app``
(built, no engine started), the HPA's metric is one lofit-serve exports, the Serve import path resolves."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.cli import env_name, parse

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMAS = Path(__file__).parent / "schemas"
FILES = sorted([*DEPLOY.glob("k8s/*.yaml"), *DEPLOY.glob("llm-d/*.yaml")])
K8S_VERSION = "1.35.0"  # kubernetes-validate 1.37 ships schemas for 1.25 .. 1.37
CORE = {"Secret", "Deployment", "Service", "HorizontalPodAutoscaler"}
CRD_SCHEMAS = {"InferencePool": "inferencepool-v1.json", "RayService": "rayservice-v1.json"}
CHECKED_BY_FIELDS = {"EndpointPickerConfig", "HTTPRoute"}  # no schema kept here: fields checked below
STORE = "s3://lofit-adapters/prod"
SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LOFIT_API_KEY", "LOFIT_ADMIN_KEY"}
# json tags of EndpointPickerConfig (llm-d/llm-d-router@ebab687 apix/config/v1alpha1/endpointpickerconfig_types.go)
EPP_FIELDS = {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "dataLayer", "flowControl",
              "requestHandler", "saturationDetector", "parser"}
EPP_SCORERS = {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "lora-affinity-scorer"}


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


DOCS = {path.relative_to(DEPLOY).as_posix(): load(path) for path in FILES}


def one(kind: str) -> dict:
    [doc] = [d for docs in DOCS.values() for d in docs if d.get("kind") == kind]
    return doc


def refuse_unknown_fields(schema: dict) -> dict:
    """The schema with ``additionalProperties: false`` on every object that lists its properties (and keeps no
    unknown fields): what the API server's strict field validation does with a CRD's structural schema."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: refuse_unknown_fields(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = refuse_unknown_fields(out[key])
    return out


def validate_crd(doc: dict) -> None:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[doc["kind"]]).read_text())
    jsonschema.validate(doc, refuse_unknown_fields(schema))
    if doc["kind"] == "RayService":  # its pod templates are core PodTemplateSpecs
        for template in pod_templates(doc):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, K8S_VERSION, strict=True)


def pod_templates(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def lofit_container(pod_spec: dict) -> dict:
    [container] = pod_spec["containers"]
    return container


def container_settings(container: dict, flags: list[str], model_dir: Path):
    """``server.cli.parse(flags)`` in the container's environment (its ``env`` values and the Secret it takes
    whole), with ``--model`` added: the image's model is not on this machine."""
    secret = one("Secret")
    assert [source["secretRef"]["name"] for source in container["envFrom"]] == [secret["metadata"]["name"]]
    env = {**secret["stringData"], **{e["name"]: e["value"] for e in container.get("env", [])}}
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("LOFIT_")]:
            mp.delenv(name)
        for name, value in env.items():
            mp.setenv(name, value)
        try:
            return parse([*flags, "--model", str(model_dir)])
        except SystemExit as exc:  # lofit-serve's own refusal (its message is in the captured stderr)
            pytest.fail(f"lofit-serve refuses {flags} with this environment: exit {exc.code}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return path


@pytest.fixture(scope="module")
def deployment_settings(model_dir):
    container = lofit_container(one("Deployment")["spec"]["template"]["spec"])
    command = container["command"] + container["args"]
    return container_settings(container, command[command.index("lofit-serve") + 1:], model_dir)


@pytest.fixture(scope="module")
def app_routes(deployment_settings) -> set[str]:
    """The paths of lofit-serve's app for the Deployment's settings (vLLM's routes and ours; no engine starts)."""
    from server.app import create_app

    return {route.path for route in create_app(deployment_settings).routes if hasattr(route, "path")}


def test_every_file_parses_and_says_it_was_not_run():
    assert set(DOCS) >= {"k8s/lofit-serve.yaml", "k8s/rayservice.yaml", "k8s/prometheus-adapter-values.yaml",
                         "llm-d/inferencepool.yaml", "llm-d/epp-config.yaml"}
    for name, docs in DOCS.items():
        assert docs and all(isinstance(doc, dict) for doc in docs), name
        assert "not run on a cluster" in (DEPLOY / name).read_text().split("\n\n")[0].lower(), name
        for doc in docs:  # nothing escapes validation
            assert doc.get("kind") in CORE | set(CRD_SCHEMAS) | CHECKED_BY_FIELDS | {None}, (name, doc.get("kind"))
    assert not any("kind" in doc for doc in DOCS["k8s/prometheus-adapter-values.yaml"])  # Helm values
    readme = (DEPLOY / "k8s" / "README.md").read_text()
    assert "not run on a cluster" in readme.lower() and "tests/deploy/test_manifests.py" in readme
    for path in [*FILES, DEPLOY / "llm-d" / "epp_model.py"]:
        assert path.relative_to(DEPLOY).as_posix() in readme, f"README does not describe {path.name}"


@pytest.mark.parametrize("kind", sorted(CORE))
def test_core_kind_validates_strictly(kind):
    assert kubernetes_validate.validate(one(kind), K8S_VERSION, strict=True) == "1.35"


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_custom_resource_validates_against_its_crd_schema(kind):
    validate_crd(one(kind))


@pytest.mark.parametrize("kind, path, bad", [
    ("Deployment", ("spec", "template", "spec", "containers", 0), "readinessprobe"),  # misspelt field
    ("HorizontalPodAutoscaler", ("spec",), "minReplica"),
    ("InferencePool", ("spec",), "endpointPicker"),
    ("RayService", ("spec", "rayClusterConfig", "workerGroupSpecs", 0), "maxReplica"),
    ("RayService", ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec"), "container"),
])
def test_validation_refuses_unknown_fields(kind, path, bad):
    doc = copy.deepcopy(one(kind))
    target = doc
    for key in path:
        target = target[key]
    target[bad] = 1
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True) if kind in CORE else validate_crd(doc)


def test_objects_refer_to_each_other():
    secret, deployment, service, hpa = (one(k) for k in ("Secret", "Deployment", "Service", "HorizontalPodAutoscaler"))
    assert set(secret["stringData"]) == SECRET_KEYS
    assert secret["stringData"]["LOFIT_API_KEY"] != secret["stringData"]["LOFIT_ADMIN_KEY"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in lofit_container(pod["spec"])["ports"]}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"] and ports == {"http": 8000}
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    pool = one("InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000]
    [rule] = one("HTTPRoute")["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]


def test_deployment_runs_lofit_serve_on_the_store(deployment_settings):
    container = lofit_container(one("Deployment")["spec"]["template"]["spec"])
    assert container["command"] == ["tini", "--", "lofit-serve"]  # the image's ENTRYPOINT (docker/Dockerfile*)
    settings, secret = deployment_settings, one("Secret")["stringData"]
    assert (settings.host, settings.port, settings.adapter_store) == ("0.0.0.0", 8000, STORE)
    assert (settings.api_key, settings.admin_key) == (secret["LOFIT_API_KEY"], secret["LOFIT_ADMIN_KEY"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.adapter_cache_dir) in mounts and settings.adapter_store_ttl == 60


def test_every_lofit_variable_is_a_lofit_serve_flag(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    names = {env_name(flag) for flag in re.findall(r"--[a-z][a-z0-9-]+", capsys.readouterr().out)}
    containers = [lofit_container(one("Deployment")["spec"]["template"]["spec"]),
                  *(lofit_container(t["spec"]) for t in pod_templates(one("RayService")))]
    used = {e["name"] for c in containers for e in c.get("env", [])} | set(one("Secret")["stringData"])
    lofit = {name for name in used if name.startswith("LOFIT_")}
    assert lofit >= {"LOFIT_API_KEY", "LOFIT_ADAPTER_CACHE_DIR"} and lofit <= names | {"LOFIT_ENGINE_ARGS"}


def test_probes_and_metrics_path_are_routes_of_lofit_serve(app_routes):
    container = lofit_container(one("Deployment")["spec"]["template"]["spec"])
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready" and probes["livenessProbe"]["path"] == "/health"
    assert {probe["port"] for probe in probes.values()} == {"http"}
    pod_annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    paths = {probe["path"] for probe in probes.values()} | {pod_annotations["prometheus.io/path"]}
    assert paths == {"/ready", "/health", "/metrics"} and paths <= app_routes


def test_hpa_scales_on_a_gauge_lofit_serve_exports():
    [metric] = one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    [rule] = DOCS["k8s/prometheus-adapter-values.yaml"][0]["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    assert series == "vllm:num_requests_waiting"
    # the adapter serves the series under the rule's name, the HPA asks for that name: `:` becomes `_`
    assert re.fullmatch(rule["name"]["matches"], series)
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == series.replace(":", "_")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per-pod values: a Pods metric
    # vLLM's stat logger, which lofit-serve runs, registers the gauge (a running server's /metrics has it:
    # tests/server/test_metrics.py, tests/server/test_gateway_protocol.py)
    loggers = Path(importlib.util.find_spec("vllm.v1.metrics.loggers").origin).read_text()
    assert f'"{series}"' in loggers


def test_rayservice_serves_lofit_serve_with_the_store(model_dir):
    from ray.serve.schema import ServeDeploySchema

    rayservice = one("RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema of `serve deploy` configs
    application, front = config["applications"]
    assert application["import_path"] == "server.ray_app:app"
    assert front["import_path"] == "server.ray_cluster:cluster_app" and front["args"]["target_app"] == \
        application["name"] and front["route_prefix"] == "/cluster"
    args = application["args"]
    from server.ray_app import AppArgs

    AppArgs(**args)  # every key is one the builder takes
    assert args["flags"][:2] == ["--adapter-store", STORE]
    assert args["max_ongoing_requests"] > int(args["flags"][args["flags"].index("--max-num-seqs") + 1])
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert 1 <= args["num_replicas"] <= sum(group["maxReplicas"] for group in workers)
    for template in pod_templates(rayservice):
        settings = container_settings(lofit_container(template["spec"]), args["flags"], model_dir)
        assert settings.adapter_store == STORE and settings.api_key == one("Secret")["stringData"]["LOFIT_API_KEY"]


def test_serve_import_path_resolves():
    if not (REPO / "server" / "ray_app.py").is_file():
        pytest.skip("server/ray_app.py does not exist yet (the Ray Serve application of issue 20)")
    module, attribute = yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])["applications"][0][
        "import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attribute))  # an application builder: takes `args`


def test_epp_config_wires_the_four_scorers(app_routes):
    config = one("EndpointPickerConfig")
    assert config["apiVersion"] == "llm-d.ai/v1alpha1" and set(config) <= EPP_FIELDS
    names = [plugin.get("name", plugin["type"]) for plugin in config["plugins"]]
    assert len(names) == len(set(names))
    [profile] = config["schedulingProfiles"]
    weights = {p["pluginRef"]: p.get("weight", 1) for p in profile["plugins"]}
    assert set(weights) <= set(names) and set(weights) >= EPP_SCORERS and all(w > 0 for w in weights.values())
    sources = config["dataLayer"]["sources"]
    refs = {s["pluginRef"] for s in sources} | {e["pluginRef"] for s in sources for e in s["extractors"]}
    assert refs <= set(names) and set(names) == set(weights) | refs  # every plugin is used
    [source] = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["path"] in app_routes
