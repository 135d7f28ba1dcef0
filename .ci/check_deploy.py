#!/usr/bin/env python3
"""Validates deploy/, config/ and the Grafana dashboard; .ci/run calls it inside the tools venv.

What it checks (each failure names the file and the problem; exit status 1 if any):
  1. Every kustomization (deploy/base, deploy/overlays/*) renders with `kubectl kustomize`
     (when kubectl is absent: the base's own files are loaded instead, overlays are skipped
     with a message).
  2. Every rendered core object validates against the Kubernetes OpenAPI schemas
     (kubernetes-validate, strict: unknown fields are errors) for the oldest and newest
     Kubernetes we support.
  3. Custom resources (PodMonitor, KEDA ScaledObject, InferencePool, HTTPRoute) are not in those
     schemas: they are checked against the subset schemas below (types, required fields, no
     unknown fields in the parts we use).
  4. Cross-references that schemas cannot see: selectors match the pod labels, probes hit
     /ready and /health on the server's port, terminationGracePeriodSeconds >= preStop sleep +
     shutdown_timeout, GPU requested iff the config says cuda, the model path is mounted, the
     autoscaler's query names the served model.
  5. Every deploy/**/*.toml is a byte-for-byte copy of a config/*.toml; config/default.toml
     documents every key the server's FileConfig accepts, and no profile uses an undocumented key.
  6. deploy/grafana/dashboard.json parses and uses only metric names the server exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONFIG = ROOT / "config"
# 1.30: the preStop `sleep` action is on by default from here; 1.37: newest schemas we have.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
DEFAULT_PORT = 8000
DEFAULT_SHUTDOWN_TIMEOUT = 30
# The metric names the server exposes; used when the server code does not (yet) define any.
SPEC_METRICS = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
}

errors: list[str] = []


def fail(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")
    print(f"FAIL {where}: {message}")


def obj(props: dict, required: list[str] | None = None, closed: bool = True) -> dict:
    """A JSON-schema object; `closed` rejects properties not listed (catches typos)."""
    schema = {"type": "object", "properties": props, "additionalProperties": not closed}
    if required:
        schema["required"] = required
    return schema


STR = {"type": "string"}
INT = {"type": "integer"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
LABELS = {"type": "object", "additionalProperties": STR}
LABEL_SELECTOR = obj({"matchLabels": LABELS, "matchExpressions": {"type": "array"}})
METADATA = obj({"name": STR, "namespace": STR, "labels": LABELS, "annotations": LABELS},
               ["name"], closed=False)


def resource(spec: dict) -> dict:
    return obj({"apiVersion": STR, "kind": STR, "metadata": METADATA, "spec": spec},
               ["apiVersion", "kind", "metadata", "spec"])


# Subsets of the CRDs' schemas (prometheus-operator, KEDA 2.x, Gateway API Inference
# Extension v1, Gateway API v1): the fields listed are real; a field we start using must be
# added here, which is the point: a misspelt field fails CI instead of being ignored by kubectl.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): resource(obj({
        "selector": LABEL_SELECTOR,
        "namespaceSelector": {"type": "object"},
        "jobLabel": STR,
        "podTargetLabels": {"type": "array", "items": STR},
        "sampleLimit": INT,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": obj({
            "port": STR, "portNumber": PORT, "path": STR, "scheme": {"enum": ["http", "https"]},
            "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"},
            "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"},
            "params": {"type": "object"}, "filterRunning": {"type": "boolean"},
        })},
    }, ["selector", "podMetricsEndpoints"])),
    ("keda.sh/v1alpha1", "ScaledObject"): resource(obj({
        "scaleTargetRef": obj({"name": STR, "apiVersion": STR, "kind": STR,
                               "envSourceContainerName": STR}, ["name"]),
        "pollingInterval": INT, "cooldownPeriod": INT, "initialCooldownPeriod": INT,
        "idleReplicaCount": INT, "minReplicaCount": INT, "maxReplicaCount": INT,
        "fallback": obj({"failureThreshold": INT, "replicas": INT}),
        "advanced": obj({
            "restoreToOriginalReplicaCount": {"type": "boolean"},
            "horizontalPodAutoscalerConfig": obj({"name": STR, "behavior": obj({
                "scaleUp": {"type": "object"}, "scaleDown": {"type": "object"}})}),
            "scalingModifiers": {"type": "object"},
        }),
        "triggers": {"type": "array", "minItems": 1, "items": obj({
            "type": STR, "name": STR, "useCachedMetrics": {"type": "boolean"},
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            # KEDA trigger metadata values are strings, numbers included.
            "metadata": {"type": "object", "additionalProperties": STR},
            "authenticationRef": obj({"name": STR, "kind": STR}, ["name"]),
        }, ["type", "metadata"])},
    }, ["scaleTargetRef", "triggers"])),
    ("inference.networking.k8s.io/v1", "InferencePool"): resource(obj({
        "selector": obj({"matchLabels": LABELS}, ["matchLabels"]),
        "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8,
                        "items": obj({"number": PORT}, ["number"])},
        "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
        "endpointPickerRef": obj({
            "group": STR, "kind": STR, "name": STR,
            "port": obj({"number": PORT}, ["number"]),
            "failureMode": {"enum": ["FailOpen", "FailClose"]},
        }, ["name"]),
    }, ["selector", "targetPorts", "endpointPickerRef"])),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): resource(obj({
        "parentRefs": {"type": "array", "items": obj({
            "group": STR, "kind": STR, "name": STR, "namespace": STR, "sectionName": STR,
            "port": PORT}, ["name"])},
        "hostnames": {"type": "array", "items": STR},
        "rules": {"type": "array", "items": obj({
            "name": STR,
            "matches": {"type": "array", "items": obj({
                "path": obj({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                             "value": STR}),
                "headers": {"type": "array"}, "queryParams": {"type": "array"}, "method": STR})},
            "filters": {"type": "array"},
            "backendRefs": {"type": "array", "items": obj({
                "group": STR, "kind": STR, "name": STR, "namespace": STR, "port": PORT,
                "weight": INT}, ["name"])},
            "timeouts": obj({"request": DURATION, "backendRequest": DURATION}),
        })},
    })),
}


def render(kustomization_dir: Path) -> list[dict] | None:
    """Renders a kustomization with kubectl; None when kubectl is not installed."""
    if shutil.which("kubectl") is None:
        return None
    result = subprocess.run(["kubectl", "kustomize", str(kustomization_dir)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        fail(str(kustomization_dir.relative_to(ROOT)), "kubectl kustomize failed:\n"
             + result.stderr.strip())
        return []
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def load_base_without_kustomize() -> list[dict]:
    """The base's resources and generated ConfigMap, read directly (no patches to apply)."""
    kustomization = yaml.safe_load((DEPLOY / "base/kustomization.yaml").read_text())
    docs = []
    for name in kustomization.get("resources", []):
        docs += [d for d in yaml.safe_load_all((DEPLOY / "base" / name).read_text()) if d]
    for gen in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (DEPLOY / "base" / f).read_text() for f in gen.get("files", [])}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"]}, "data": data})
    return docs


def validate_schemas(where: str, docs: list[dict]) -> None:
    for doc in docs:
        name = f"{where} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CRD_SCHEMAS:
            for err in jsonschema.Draft202012Validator(CRD_SCHEMAS[key]).iter_errors(doc):
                path = ".".join(str(p) for p in err.absolute_path)
                fail(name, f"{path}: {err.message}")
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                fail(name, f"no schema for {key} (add a subset schema to CRD_SCHEMAS)")
                break
            except kubernetes_validate.ValidationError as err:
                path = ".".join(str(p) for p in err.path)
                fail(name, f"Kubernetes {version}: {path}: {err.message}")


def only(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_references(where: str, docs: list[dict]) -> None:
    deployments = only(docs, "Deployment")
    if len(deployments) != 1:
        fail(where, f"expected one Deployment, found {len(deployments)}")
        return
    dep = deployments[0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    c = containers.get("mpt-server")
    if c is None:
        fail(where, "no container named mpt-server")
        return

    # The config file: mounted from the ConfigMap and named by --config.
    args = c.get("args", [])
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        fail(where, "the container does not pass --config FILE")
        return
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    volume = volumes.get(mounts.get(str(config_path.parent), ""), {})
    cm_name = volume.get("configMap", {}).get("name")
    cms = [d for d in only(docs, "ConfigMap") if d["metadata"]["name"] == cm_name]
    if not cms or config_path.name not in cms[0].get("data", {}):
        fail(where, f"{config_path} is not mounted from a ConfigMap key {config_path.name}")
        return
    try:
        cfg = tomllib.loads(cms[0]["data"][config_path.name])
    except tomllib.TOMLDecodeError as err:
        fail(where, f"ConfigMap {cm_name} {config_path.name}: {err}")
        return

    port = cfg.get("port", DEFAULT_PORT)
    http = [p for p in c.get("ports", []) if p.get("name") == "http"]
    if not http or http[0]["containerPort"] != port:
        fail(where, f"container port `http` must be the server's port {port}")
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"),
                        ("livenessProbe", "/health")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("http", port):
            fail(where, f"{probe} must GET {path} on the http port")

    sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    drain = cfg.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)
    if grace < sleep + drain:
        fail(where, f"terminationGracePeriodSeconds {grace} < preStop sleep {sleep} + "
             f"shutdown_timeout {drain}: Kubernetes would kill requests mid-drain")

    if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
        fail(where, "pod securityContext.runAsNonRoot must be true")
    if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
        fail(where, "container securityContext.readOnlyRootFilesystem must be true")

    gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if str(cfg.get("device", "cpu")).startswith("cuda"):
        if str(gpus) != "1":
            fail(where, f"device {cfg['device']} needs limits nvidia.com/gpu: 1 (found {gpus})")
    elif gpus is not None:
        fail(where, "device is cpu but the pod requests nvidia.com/gpu")

    model = cfg.get("model")
    if model and not any(Path(model).is_relative_to(m) for m in mounts):
        fail(where, f"model {model} is not under any volumeMount ({sorted(mounts)})")

    env = {e["name"] for e in c.get("env", [])}
    if "MPT_SERVER_API_KEY" not in env:
        fail(where, "MPT_SERVER_API_KEY is not set from a Secret")

    for svc in only(docs, "Service"):
        if not matches(svc["spec"].get("selector", {}), pod_labels):
            fail(where, f"Service {svc['metadata']['name']} selector does not match the pods")
        for p in svc["spec"].get("ports", []):
            if p.get("targetPort") not in ("http", port):
                fail(where, f"Service port {p.get('name')} does not target the http port")
    for pm in only(docs, "PodMonitor"):
        if not matches(pm["spec"]["selector"].get("matchLabels", {}), pod_labels):
            fail(where, "PodMonitor selector does not match the pods")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep.get("port") != "http" or ep.get("path", "/metrics") != "/metrics":
                fail(where, "PodMonitor must scrape /metrics on the http port")
    for pool in only(docs, "InferencePool"):
        if not matches(pool["spec"]["selector"]["matchLabels"], pod_labels):
            fail(where, "InferencePool selector does not match the pods")
        if [p["number"] for p in pool["spec"]["targetPorts"]] != [port]:
            fail(where, f"InferencePool targetPorts must be [{port}]")
    pools = {p["metadata"]["name"] for p in only(docs, "InferencePool")}
    for route in only(docs, "HTTPRoute"):
        for rule in route["spec"].get("rules", []):
            for ref in rule.get("backendRefs", []):
                if ref.get("kind") == "InferencePool" and ref["name"] not in pools:
                    fail(where, f"HTTPRoute refers to missing InferencePool {ref['name']}")
    served = cfg.get("served_model_name") or (Path(model).name if model else "mpt-demo")
    for so in only(docs, "ScaledObject"):
        if so["spec"]["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
            fail(where, "ScaledObject does not target the Deployment")
        for trig in so["spec"]["triggers"]:
            query = trig.get("metadata", {}).get("query", "")
            if trig["type"] == "prometheus" and (
                    "vllm:num_requests_waiting" not in query
                    or f'model_name="{served}"' not in query):
                fail(where, f"ScaledObject query must use vllm:num_requests_waiting for "
                     f'model_name="{served}": {query}')


def check_configs() -> None:
    profiles = {p: p.read_bytes() for p in sorted(CONFIG.glob("*.toml"))}
    for copy in sorted(DEPLOY.rglob("*.toml")):
        if copy.read_bytes() not in profiles.values():
            fail(str(copy.relative_to(ROOT)), "is not an exact copy of any config/*.toml "
                 "(copy the profile it stands for: kustomize cannot read files outside deploy/)")

    default_text = (CONFIG / "default.toml").read_text()
    # Documented keys: set (`key = ...`) or shown commented out (`# key = ...`).
    documented = set(re.findall(r"^#?\s*([a-z_]+)\s*=", default_text, re.M))
    for path, data in profiles.items():
        try:
            keys = set(tomllib.loads(data.decode()))
        except tomllib.TOMLDecodeError as err:
            fail(str(path.relative_to(ROOT)), str(err))
            continue
        for key in sorted(keys - documented):
            fail(str(path.relative_to(ROOT)), f"key {key} is not documented in config/default.toml")

    source = ROOT / "crates/server/src/config/mod.rs"
    struct = re.search(r"pub struct FileConfig \{(.*?)\n\}", source.read_text(), re.S) \
        if source.exists() else None
    if struct is None:
        print("note: crates/server/src/config/mod.rs has no FileConfig yet; key coverage not checked")
        return
    accepted = set(re.findall(r"pub ([a-z_]+):", struct.group(1)))
    for key in sorted(accepted - documented):
        fail("config/default.toml", f"does not document the server's key {key}")
    for key in sorted(documented - accepted):
        fail("config/default.toml", f"documents {key}, which the server does not accept")


def exported_metrics() -> set[str]:
    names = set()
    for src in (ROOT / "crates/server/src").rglob("*.rs"):
        names |= set(re.findall(r'"((?:vllm|mpt):[a-z0-9_]+)"', src.read_text()))
    if not names:
        print("note: no vllm:* or mpt:* metric names in crates/server/src yet; using the expected names")
        return set(SPEC_METRICS)
    return names


def check_dashboard(metrics: set[str]) -> None:
    where = "deploy/grafana/dashboard.json"
    try:
        dash = json.loads((DEPLOY / "grafana/dashboard.json").read_text())
    except json.JSONDecodeError as err:
        fail(where, f"invalid JSON: {err}")
        return
    ids = [p["id"] for p in dash.get("panels", [])]
    if len(ids) != len(set(ids)):
        fail(where, "duplicate panel ids")
    for panel in dash.get("panels", []):
        for target in panel.get("targets", []):
            for name in re.findall(r"(?:vllm|mpt):[a-z0-9_]+", target.get("expr", "")):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if base not in metrics and name not in metrics:
                    fail(where, f"panel {panel['title']!r} uses {name}, which the server "
                         "does not export")


def check_readme_metrics(metrics: set[str]) -> None:
    readme = (ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else ""
    for name in sorted(metrics):
        if f"`{name}`" not in readme:
            fail("README.md", f"metric {name} is not documented")


def main() -> int:
    kustomizations = [DEPLOY / "base"] + sorted(p for p in (DEPLOY / "overlays").iterdir()
                                                if p.is_dir())
    for kdir in kustomizations:
        where = str(kdir.relative_to(ROOT))
        docs = render(kdir)
        if docs is None:
            if kdir.name != "base":
                print(f"skip {where}: kubectl not installed, overlays cannot be rendered")
                continue
            print(f"note: kubectl not installed; checking {where}'s files without kustomize")
            docs = load_base_without_kustomize()
        kinds = ", ".join(sorted(f"{d['kind']}" for d in docs))
        print(f"{where}: {len(docs)} objects ({kinds})")
        validate_schemas(where, docs)
        check_references(where, docs)
    if shutil.which("kubectl") is None:
        for comp in sorted(p for p in (DEPLOY / "components").iterdir() if p.is_dir()):
            kustomization = yaml.safe_load((comp / "kustomization.yaml").read_text())
            docs = [d for name in kustomization.get("resources", [])
                    for d in yaml.safe_load_all((comp / name).read_text()) if d]
            print(f"{comp.relative_to(ROOT)}: {len(docs)} objects, schemas only")
            validate_schemas(str(comp.relative_to(ROOT)), docs)
    check_configs()
    metrics = exported_metrics()
    check_dashboard(metrics)
    check_readme_metrics(metrics)
    if errors:
        print(f"{len(errors)} problem(s) in deploy/, config/ or the dashboard")
        return 1
    print("deploy/, config/ and the dashboard are valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
