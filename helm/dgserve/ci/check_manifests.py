#!/usr/bin/env python3
"""Offline checks of a rendered dgserve chart (the output of `helm template`).

1. Schemas: every Kubernetes object against the OpenAPI-derived JSON schemas shipped in the
   `kubernetes-validate` package (strict: unknown fields fail), for each --k8s version; the
   custom resources (KEDA, Prometheus Operator) against the schemas in ci/crd-schemas/.
2. Wiring: Services, PDBs, HPAs, ScaledObjects, ServiceMonitors and Ingresses point at things
   that exist; named ports and mounts resolve; referenced Secrets/ConfigMaps are rendered or
   declared external (--external-secret).
3. dgserve rules: probes on /healthz and /readyz, a worker start-up budget long enough to load
   the model, grace period above the drain timeout, /dev/shm in memory, GPU limits, one Redis
   stream per model for KEDA, no worker HPA next to a ScaledObject, Redis with AOF and noeviction.
4. Expectations given on the command line (--expect KIND=N, --gpus N).

Needs PyYAML, jsonschema, referencing and kubernetes-validate. Exit status 0 when every check
passes, 1 otherwise; prints one line per problem and a summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


class Report:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.validations = 0

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")


def ref(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in WORKLOAD_KINDS:
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "Pod":
        return doc["spec"]
    return None


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    if doc["kind"] in WORKLOAD_KINDS:
        return doc["spec"]["template"]["metadata"].get("labels", {}) or {}
    return doc.get("metadata", {}).get("labels", {}) or {}


def selects(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_value(container: dict[str, Any], name: str) -> Any:
    for item in container.get("env", []) or []:
        if item.get("name") == name:
            return item.get("value", item.get("valueFrom"))
    return None


# --------------------------------------------------------------------------------- schemas
def load_crd_schemas(folder: Path) -> tuple[dict[tuple[str, str], dict], Registry]:
    registry: Registry = Registry()
    schemas: dict[tuple[str, str], dict] = {}
    for path in sorted(folder.glob("*.json")):
        contents = json.loads(path.read_text())
        registry = registry.with_resource(contents["$id"], Resource.from_contents(contents))
        if not path.name.startswith("_"):
            api = contents["properties"]["apiVersion"]["const"]
            kind = contents["properties"]["kind"]["const"]
            schemas[(api, kind)] = contents
    return schemas, registry


def check_schemas(docs, versions, crd_schemas, registry, report: Report) -> None:
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in crd_schemas:
            validator = jsonschema.Draft202012Validator(crd_schemas[key], registry=registry)
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(p) for p in err.absolute_path)
                report.fail(ref(doc), f"CRD schema: {path}: {err.message}")
            report.validations += 1
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.SchemaNotFoundError as exc:
                report.fail(ref(doc), f"no schema ({exc.message}); add one to ci/crd-schemas/")
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.absolute_path)
                report.fail(ref(doc), f"Kubernetes {version} schema: {path}: {exc.message}")
            report.validations += 1


# --------------------------------------------------------------------------------- wiring
def check_wiring(docs, external_secrets: set[str], report: Report) -> None:
    by_kind: dict[str, list[dict]] = {}
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
        key = (doc["kind"], doc["metadata"]["name"])
        if key in seen:
            report.fail(ref(doc), "rendered twice")
        seen.add(key)

    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    secrets = {
        s["metadata"]["name"]: set((s.get("stringData") or {}) | (s.get("data") or {}))
        for s in by_kind.get("Secret", [])
    }
    configmaps = {c["metadata"]["name"] for c in by_kind.get("ConfigMap", [])}
    accounts = {a["metadata"]["name"] for a in by_kind.get("ServiceAccount", [])}
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}

    def check_secret_ref(where: str, name: str, key: str | None) -> None:
        if name in external_secrets:
            return
        if name not in secrets:
            report.fail(where, f"references Secret {name!r}, which is neither rendered nor declared external")
        elif key is not None and key not in secrets[name]:
            report.fail(where, f"Secret {name!r} has no key {key!r}")

    for doc in [*workloads, *by_kind.get("Pod", [])]:
        spec = pod_spec(doc)
        where = ref(doc)
        if spec.get("serviceAccountName") and accounts and spec["serviceAccountName"] not in accounts:
            report.fail(where, f"serviceAccountName {spec['serviceAccountName']!r} is not rendered")
        if not (spec.get("securityContext") or {}).get("runAsNonRoot"):
            report.fail(where, "pod securityContext.runAsNonRoot is not true")
        volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
        claim_templates = (
            {t["metadata"]["name"] for t in (doc["spec"].get("volumeClaimTemplates") or [])}
            if doc["kind"] == "StatefulSet"
            else set()
        )
        for vol in volumes.values():
            if "secret" in vol:
                check_secret_ref(where, vol["secret"]["secretName"], None)
            if "configMap" in vol and vol["configMap"]["name"] not in configmaps:
                report.fail(where, f"volume {vol['name']!r}: ConfigMap {vol['configMap']['name']!r} not rendered")
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if claim not in {p["metadata"]["name"] for p in by_kind.get("PersistentVolumeClaim", [])}:
                    report.fail(where, f"volume {vol['name']!r}: PVC {claim!r} not rendered (existing claim?)")
        for c in spec.get("containers", []):
            cwhere = f"{where} container {c['name']}"
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1]:
                report.fail(cwhere, f"image {image!r} has no tag")
            res = c.get("resources") or {}
            if not res.get("requests"):
                report.fail(cwhere, "no resource requests")
            if not (res.get("limits") or {}).get("memory"):
                report.fail(cwhere, "no memory limit")
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                report.fail(cwhere, "securityContext.allowPrivilegeEscalation is not false")
            if doc["kind"] != "Pod":
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        report.fail(cwhere, f"no {probe}")
            port_names = {p.get("name") for p in c.get("ports", []) or []}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                handler = (c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket")
                if handler and isinstance(handler.get("port"), str) and handler["port"] not in port_names:
                    report.fail(cwhere, f"{probe} uses port {handler['port']!r}, not a named container port")
            for m in c.get("volumeMounts", []) or []:
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    report.fail(cwhere, f"volumeMount {m['name']!r} has no volume")
            for e in c.get("env", []) or []:
                skr = (e.get("valueFrom") or {}).get("secretKeyRef")
                if skr:
                    check_secret_ref(f"{cwhere} env {e['name']}", skr["name"], skr["key"])
            for ef in c.get("envFrom", []) or []:
                if "configMapRef" in ef and ef["configMapRef"]["name"] not in configmaps:
                    report.fail(cwhere, f"envFrom ConfigMap {ef['configMapRef']['name']!r} not rendered")
                if "secretRef" in ef:
                    check_secret_ref(cwhere, ef["secretRef"]["name"], None)

    def matching_workloads(selector: dict[str, str]) -> list[dict]:
        return [w for w in workloads if selects(selector, pod_labels(w))]

    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for svc in services.values():
        matched = matching_workloads(svc["spec"].get("selector"))
        if not matched:
            report.fail(ref(svc), "selector matches no rendered workload")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str):
                names = {
                    p.get("name") for w in matched for c in pod_spec(w)["containers"] for p in c.get("ports", []) or []
                }
                if matched and target not in names:
                    report.fail(ref(svc), f"targetPort {target!r} is not a container port of its pods")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not matching_workloads(pdb["spec"]["selector"].get("matchLabels")):
            report.fail(ref(pdb), "selector matches no rendered workload")

    hpa_targets: dict[str, str] = {}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        hpa_targets[target] = hpa["metadata"]["name"]
        if target not in deployments:
            report.fail(ref(hpa), f"scaleTargetRef {target!r} is not a rendered Deployment")
        elif "replicas" in deployments[target]["spec"]:
            report.fail(ref(hpa), f"Deployment {target!r} sets spec.replicas although an HPA owns it")

    trigger_auths = {t["metadata"]["name"] for t in by_kind.get("TriggerAuthentication", [])}
    for so in by_kind.get("ScaledObject", []):
        target = so["spec"]["scaleTargetRef"]["name"]
        where = ref(so)
        if target in hpa_targets:
            report.fail(where, f"Deployment {target!r} also has the HPA {hpa_targets[target]!r}: KEDA owns its HPA")
        dep = deployments.get(target)
        if dep is None:
            report.fail(where, f"scaleTargetRef {target!r} is not a rendered Deployment")
            continue
        if "replicas" in dep["spec"]:
            report.fail(where, f"Deployment {target!r} sets spec.replicas although KEDA owns it")
        model = env_value(dep["spec"]["template"]["spec"]["containers"][0], "DG_MODEL_NAME")
        kinds = set()
        for trig in so["spec"]["triggers"]:
            meta = trig.get("metadata", {})
            if trig["type"] == "redis-streams":
                if meta.get("stream") != f"dg:requests:{model}":
                    report.fail(where, f"stream {meta.get('stream')!r} is not dg:requests:{model}")
                if meta.get("consumerGroup") != "workers":
                    report.fail(where, f"consumerGroup {meta.get('consumerGroup')!r} is not 'workers'")
                if not (meta.get("address") or meta.get("host") or meta.get("addressFromEnv")):
                    report.fail(where, "redis-streams trigger without an address")
                kinds |= {k for k in ("lagCount", "pendingEntriesCount", "streamLength") if k in meta}
            auth = (trig.get("authenticationRef") or {}).get("name")
            if auth and auth not in trigger_auths:
                report.fail(where, f"authenticationRef {auth!r} is not a rendered TriggerAuthentication")
        if "lagCount" not in kinds:
            report.fail(where, "no redis-streams trigger on lagCount")
    for ta in by_kind.get("TriggerAuthentication", []):
        for item in ta["spec"].get("secretTargetRef", []):
            check_secret_ref(ref(ta), item["name"], item["key"])

    for sm in by_kind.get("ServiceMonitor", []):
        matched = [
            s
            for s in services.values()
            if selects(sm["spec"]["selector"].get("matchLabels"), s["metadata"].get("labels", {}))
        ]
        if not matched:
            report.fail(ref(sm), "selector matches no rendered Service")
        for ep in sm["spec"]["endpoints"]:
            if matched and ep.get("port") not in {p.get("name") for s in matched for p in s["spec"]["ports"]}:
                report.fail(ref(sm), f"endpoint port {ep.get('port')!r} is not a port of the selected Service")

    for ing in by_kind.get("Ingress", []):
        for rule in ing["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path["backend"]["service"]
                svc = services.get(backend["name"])
                if svc is None:
                    report.fail(ref(ing), f"backend Service {backend['name']!r} is not rendered")
                elif "name" in backend["port"] and backend["port"]["name"] not in {
                    p.get("name") for p in svc["spec"]["ports"]
                }:
                    report.fail(
                        ref(ing), f"backend port {backend['port']['name']!r} is not a port of {backend['name']}"
                    )


# --------------------------------------------------------------------------------- dgserve rules
def check_dgserve(docs, args, report: Report) -> None:
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    component = lambda d: d["metadata"].get("labels", {}).get("app.kubernetes.io/component")  # noqa: E731
    workers = [d for d in deployments if component(d) == "worker"]
    gateways = [d for d in deployments if component(d) == "gateway"]
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in docs if c["kind"] == "ConfigMap"}

    if len(gateways) != 1:
        report.fail("chart", f"expected 1 gateway Deployment, found {len(gateways)}")
    if not workers:
        report.fail("chart", "no worker Deployment")

    models = []
    for dep in workers:
        where = ref(dep)
        spec = dep["spec"]["template"]["spec"]
        c = spec["containers"][0]
        for name in ("DG_MODEL_NAME", "DG_MODEL_PATH", "REDIS_URL", "DG_DRAIN_TIMEOUT_S", "DG_METRICS_PORT", "HF_HOME"):
            if env_value(c, name) is None:
                report.fail(where, f"env {name} missing")
        models.append(env_value(c, "DG_MODEL_NAME"))
        startup = c.get("startupProbe") or {}
        if (startup.get("httpGet") or {}).get("path") != "/readyz":
            report.fail(where, "startupProbe is not on /readyz")
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        if budget < args.min_startup_seconds:
            report.fail(where, f"startupProbe allows {budget}s to load the model; need >= {args.min_startup_seconds}s")
        if (c.get("livenessProbe", {}).get("httpGet") or {}).get("path") != "/healthz":
            report.fail(where, "livenessProbe is not on /healthz")
        if (c.get("readinessProbe", {}).get("httpGet") or {}).get("path") != "/readyz":
            report.fail(where, "readinessProbe is not on /readyz")
        drain = float(env_value(c, "DG_DRAIN_TIMEOUT_S") or 60)
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[-1]) if pre_stop and pre_stop[0] == "sleep" else 0.0
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= drain + sleep:
            report.fail(where, f"terminationGracePeriodSeconds {grace} <= drain {drain:g} + preStop {sleep:g}")
        if not pre_stop:
            report.fail(where, "no preStop hook")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        shm = volumes.get(mounts.get("/dev/shm", ""), {})
        if (shm.get("emptyDir") or {}).get("medium") != "Memory":
            report.fail(where, "/dev/shm is not an in-memory emptyDir")
        if "/models-cache" not in mounts:
            report.fail(where, "no volume at /models-cache (HF_HOME)")
        limits = c.get("resources", {}).get("limits", {})
        gpus = int(limits.get(args.gpu_resource, 0))
        if args.gpus is not None and gpus != args.gpus:
            report.fail(where, f"{args.gpu_resource} limit is {gpus}, expected {args.gpus}")
        device = env_value(c, "DG_DEVICE")
        if gpus == 0 and device == "cuda":
            report.fail(where, "DG_DEVICE=cuda without a GPU limit")
        if gpus > 0 and device == "cpu":
            report.fail(where, "DG_DEVICE=cpu with a GPU limit")

    for dep in gateways:
        where = ref(dep)
        c = dep["spec"]["template"]["spec"]["containers"][0]
        if (c.get("livenessProbe", {}).get("httpGet") or {}).get("path") != "/healthz":
            report.fail(where, "livenessProbe is not on /healthz")
        if (c.get("readinessProbe", {}).get("httpGet") or {}).get("path") != "/readyz":
            report.fail(where, "readinessProbe is not on /readyz")
        env = {}
        for ef in c.get("envFrom", []):
            env.update(configmaps.get(ef.get("configMapRef", {}).get("name"), {}))
        env.update({e["name"]: e.get("value") for e in c.get("env", [])})
        if env.get("DG_HOST") != "0.0.0.0":
            report.fail(where, f"DG_HOST is {env.get('DG_HOST')!r}, not 0.0.0.0")
        if "REDIS_URL" not in env:
            report.fail(where, "REDIS_URL missing")
        served = {p.split("=", 1)[0] for p in (env.get("DG_MODELS") or "").split(",") if p}
        if served != set(models):
            report.fail(where, f"DG_MODELS serves {sorted(served)}, workers serve {sorted(models)}")

    for sts in (d for d in docs if d["kind"] == "StatefulSet" and component(d) == "redis"):
        conf = "\n".join(v for data in configmaps.values() for k, v in data.items() if k == "redis.conf")
        lines = {line.strip() for line in conf.splitlines()}
        for needed in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"):
            if needed not in lines:
                report.fail(ref(sts), f"redis.conf lacks {needed!r}")

    for item in args.expect:
        kind, _, count = item.partition("=")
        found = sum(1 for d in docs if d["kind"] == kind)
        if found != int(count):
            report.fail("expectation", f"{kind}: rendered {found}, expected {count}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", type=Path, help="output of helm template")
    ap.add_argument("--k8s", action="append", default=[], help="Kubernetes version to validate against (repeatable)")
    ap.add_argument("--crd-schemas", type=Path, default=Path(__file__).parent / "crd-schemas")
    ap.add_argument("--expect", action="append", default=[], metavar="KIND=N", help="exact count of a kind")
    ap.add_argument("--external-secret", action="append", default=[], help="Secret expected to exist already")
    ap.add_argument("--gpus", type=int, default=None, help="expected GPU limit per worker")
    ap.add_argument("--gpu-resource", default="nvidia.com/gpu")
    ap.add_argument("--min-startup-seconds", type=int, default=1200)
    args = ap.parse_args()

    docs = [d for d in yaml.safe_load_all(args.manifest.read_text()) if d]
    report = Report()
    crd_schemas, registry = load_crd_schemas(args.crd_schemas)
    check_schemas(docs, args.k8s or [kv.latest_version()], crd_schemas, registry, report)
    check_wiring(docs, set(args.external_secret), report)
    check_dgserve(docs, args, report)

    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    for problem in report.problems:
        print(f"  FAIL {problem}")
    status = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
    print(
        f"  {args.manifest.name}: {len(docs)} objects ({summary}); "
        f"{report.validations} schema validations (Kubernetes {', '.join(args.k8s) or 'latest'} + CRDs): {status}"
    )
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
