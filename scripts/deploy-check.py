"""The chart's offline checks, run by scripts/deploy-check.sh inside its venv.

No cluster and no `helm` binary: helm-python-sdk embeds Helm's own Go SDK.
Steps, each fatal on failure:
  0. canary: kubernetes-validate and checkov must refuse a bad Deployment;
  1. lint the chart (strict: a warning fails), with both value sets;
  2. validate values.yaml, ci/production-values.yaml and a one-replica set
     against values.schema.json, and show that bad values are refused;
  3. render the three value sets into target/deploy-check/<set>/;
  4. check the rendered objects against this project's contract (the
     runtime NetworkPolicy, securityContexts, secrets by reference, RBAC);
  5. kubernetes-validate --strict on every object, for each Kubernetes
     version in KUBE_VERSIONS;
  6. checkov (kubernetes framework) with zero failed checks;
  7. the same for the data plane's own runtime objects (`data-plane
     k8s-objects`), when deploy-check.sh could produce them, and a
     comparison of its NetworkPolicy with the chart's.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

import helm_python as helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "agent-sandbox"
OUT = Path(os.environ.get("DEPLOY_CHECK_OUT", ROOT / "target" / "deploy-check"))
VENV_BIN = Path(sys.executable).parent
RELEASE = "agent-sandbox"
NAMESPACE = "agent-sandbox"
# The oldest Kubernetes the data plane's API types target (k8s-openapi
# `v1_33`) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.33.0", "1.37.0"]
# Custom resources: not in Kubernetes' schemas, checked structurally here.
CUSTOM_KINDS = {"monitoring.coreos.com/v1/ServiceMonitor"}
# checkov checks skipped for the data plane's runtime objects (its output
# carries no annotations, so a skip would be listed here with its reason).
# None is needed: the sample pod passes every check.
RUNTIME_OBJECT_SKIPS: dict[str, str] = {}

failures: list[str] = []


def step(title: str) -> None:
    print(f"[deploy-check] {title}", flush=True)


def fail(message: str) -> None:
    failures.append(message)
    print(f"[deploy-check] FAIL: {message}", flush=True)


def load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: not a YAML mapping")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_path(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(values)
    node = out
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return out


# A one-replica trial: the memory registry, artifacts on an emptyDir, no MCP,
# callers verified by JWKS only; it exercises the chart's other branches.
MINIMAL: dict[str, Any] = {
    "env": "dev",
    "secrets": {"authJwtSecret": {"enabled": False}},
    "controlPlane": {
        "replicas": 1,
        "mcp": {"enabled": False},
        "auth": {"jwksConfigMap": "idp-jwks"},
        "podDisruptionBudget": {"enabled": False},
    },
    "dataPlane": {
        "replicas": 1,
        "registry": {"backend": "memory"},
        "artifacts": {"store": "fs"},
        "podDisruptionBudget": {"enabled": False},
    },
    "runtime": {"createNamespace": False, "warmPool": {"python": 1}},
}


# ---------------------------------------------------------------- 1. lint


def lint(values_sets: dict[str, dict[str, Any]]) -> None:
    for set_name, values in values_sets.items():
        step(f"helm lint ({set_name} values, strict)")
        report = helm.lint(
            str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.33.0"
        )
        for m in report.get("messages", []):
            sev = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m.get("severity"), "?")
            print(f"    {sev} {m.get('path')}: {m.get('error')}")
            if m.get("severity", 0) >= 2:
                fail(f"lint ({set_name}): {m.get('path')}: {m.get('error')}")
        for e in report.get("errors", []) or []:
            fail(f"lint ({set_name}): {e}")


# ---------------------------------------------------------------- 2. schema


def bad_values_cases(defaults: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Values the schema must refuse, each with what it shows."""
    d = defaults
    return [
        ("replicas as a word", set_path(d, "controlPlane.replicas", "two")),
        ("zero replicas", set_path(d, "dataPlane.replicas", 0)),
        ("an unknown top-level key", set_path(d, "replicaCount", 3)),
        ("an unknown nested key (typo)", set_path(d, "dataPlane.registy", {"backend": "redis"})),
        ("an unknown ENV", set_path(d, "env", "live")),
        ("an unknown registry backend", set_path(d, "dataPlane.registry.backend", "postgres")),
        ("an unknown artifact store", set_path(d, "dataPlane.artifacts.store", "gcs")),
        ("a secret inlined as a value", set_path(d, "secrets.databaseUrl.value", "postgres://u:pw@db/x")),
        ("a malformed digest", set_path(d, "controlPlane.image.digest", "sha256:abc")),
        ("a bad duration", set_path(d, "runtime.readyTimeout", "one minute")),
        ("a runtime namespace that is not a DNS label", set_path(d, "runtime.namespace", "Runtime_NS")),
        # null is how `--set x=null` removes a default; the schema requires limits.
        ("a container without limits", set_path(d, "dataPlane.resources.limits", None)),
        ("a warm pool size as a word", set_path(d, "runtime.warmPool", {"python": "two"})),
        ("an env var name in lower case", set_path(d, "controlPlane.config", {"job_workers": "4"})),
    ]


def schema(chart: helm.Chart, values_sets: dict[str, dict[str, Any]]) -> None:
    for set_name, values in values_sets.items():
        step(f"values.schema.json accepts the {set_name} values")
        try:
            chart.validate_schema(values)
        except helm.HelmError as e:
            fail(f"schema refused the {set_name} values: {e}")
    step("values.schema.json refuses bad values")
    for what, values in bad_values_cases(values_sets["default"]):
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            print(f"    refused: {what} ({first[:110]})")
            continue
        fail(f"the schema accepted {what}")
    # Render refuses them too (what `helm install` does), not just validate_schema.
    try:
        chart.render(
            set_path(values_sets["default"], "controlPlane.replicas", "two"),
            name=RELEASE,
            namespace=NAMESPACE,
        )
        fail("render accepted controlPlane.replicas=two")
    except helm.HelmError:
        print("    refused by render too: replicas as a word")
    step("the chart refuses combinations that cannot work")
    for what, override in [
        ("memory registry with 2 data plane replicas", {"dataPlane": {"registry": {"backend": "memory"}}}),
        ("fs artifacts with 2 data plane replicas", {"dataPlane": {"artifacts": {"store": "fs"}}}),
        ("no way to verify callers", {"secrets": {"authJwtSecret": {"enabled": False}}}),
    ]:
        try:
            chart.render(deep_merge(values_sets["default"], override), name=RELEASE, namespace=NAMESPACE)
            fail(f"render accepted {what}")
        except helm.HelmError as e:
            print(f"    refused: {what} ({str(e).strip().splitlines()[-1][:110]})")
    try:
        chart.render(values_sets["default"], name=RELEASE, namespace="agent-sandbox-runtime")
        fail("render accepted a release in the runtime namespace")
    except helm.HelmError:
        print("    refused: the release installed into the runtime namespace")


# ---------------------------------------------------------------- 3. render


def render(chart: helm.Chart, set_name: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    step(f"render ({set_name} values) -> {OUT.relative_to(ROOT) if OUT.is_relative_to(ROOT) else OUT}/{set_name}/")
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    out_dir = OUT / set_name
    if out_dir.exists():
        for p in out_dir.iterdir():
            p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    objects: list[dict[str, Any]] = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt") or not text.strip():
            continue
        docs = [d for d in yaml.safe_load_all(text) if d]
        if not docs:
            continue
        (out_dir / Path(template).name).write_text(text)
        objects.extend(docs)
    kinds: dict[str, int] = {}
    for o in objects:
        kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
    print("    " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return objects


# ---------------------------------------------------------------- 4. contract


def find(objects: list[dict[str, Any]], kind: str, pred: Callable[[dict[str, Any]], bool] = lambda o: True) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind and pred(o)]


def component(o: dict[str, Any]) -> str | None:
    return o.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")


def expected_runtime_policy(owner: str, runtime_ns: str, dp_ns: str) -> dict[str, Any]:
    """The runtime NetworkPolicy's spec as /tmp/k8s-contract.md states it."""
    return {
        "podSelector": {"matchLabels": {"agentsandbox.dev/role": "runtime", "agentsandbox.dev/owner": owner}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": dp_ns}},
                        "podSelector": {"matchLabels": {"agentsandbox.dev/data-plane": owner}},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 9000}],
            }
        ],
        "egress": [],
    }


def normalize_policy(spec: dict[str, Any]) -> dict[str, Any]:
    """A NetworkPolicy spec with defaults filled the way the API server does."""
    s = copy.deepcopy(spec)
    s.setdefault("egress", [])
    s.setdefault("ingress", [])
    for rule in s["ingress"] + s["egress"]:
        for p in rule.get("ports", []):
            p.setdefault("protocol", "TCP")
    return s


def config_env_names(crate: str) -> set[str]:
    """The environment variables a plane reads: its clap `env = "..."`
    fields, plus those read directly in shared/ (LOG_FORMAT, RUST_LOG)."""
    names: set[str] = set()
    for path in [ROOT / crate / "src" / "config.rs", *sorted((ROOT / "shared" / "src").rglob("*.rs"))]:
        text = path.read_text()
        names.update(re.findall(r'env\s*=\s*"([A-Z][A-Z0-9_]*)"', text))
        names.update(re.findall(r'env::var(?:_os)?\("([A-Z][A-Z0-9_]*)"\)', text))
    return names


SECRET_ENV = {
    "AUTH_JWT_SECRET", "DATA_PLANE_JWT_SECRET", "DATABASE_URL", "REDIS_URL",
    "ARTIFACT_KEK", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
}


def contract(set_name: str, objects: list[dict[str, Any]], values: dict[str, Any]) -> None:
    step(f"contract checks ({set_name} values)")
    owner = RELEASE  # the release is named like the chart: fullname == release
    runtime_ns = values["runtime"]["namespace"]
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    # Every namespaced object names its namespace.
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "RuntimeClass"}
    for o in objects:
        md = o.get("metadata", {})
        if o["kind"] not in cluster_scoped:
            check(bool(md.get("namespace")), f"{o['kind']}/{md.get('name')} has no namespace")

    # The runtime NetworkPolicy: the contract's name and spec.
    name = f"agent-sandbox-runtime-{owner}"
    rnp = find(objects, "NetworkPolicy", lambda o: o["metadata"]["name"] == name)
    check(len(rnp) == 1, f"no runtime NetworkPolicy named {name}")
    if rnp:
        check(rnp[0]["metadata"]["namespace"] == runtime_ns, "runtime NetworkPolicy not in the runtime namespace")
        want = normalize_policy(expected_runtime_policy(owner, runtime_ns, NAMESPACE))
        check(normalize_policy(rnp[0]["spec"]) == want, "runtime NetworkPolicy differs from the contract")
        check("app.kubernetes.io/managed-by" not in rnp[0]["metadata"].get("labels", {}),
              "runtime NetworkPolicy carries app.kubernetes.io/managed-by (the data plane sets it)")

    # The runtime namespace: Pod Security restricted, enforced, audited, warned.
    if values["runtime"]["createNamespace"]:
        ns = find(objects, "Namespace", lambda o: o["metadata"]["name"] == runtime_ns)
        check(len(ns) == 1, "no runtime Namespace")
        if ns:
            labels = ns[0]["metadata"].get("labels", {})
            for mode in ("enforce", "audit", "warn"):
                check(labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted",
                      f"runtime namespace lacks pod-security {mode}=restricted")
                check(bool(labels.get(f"pod-security.kubernetes.io/{mode}-version")),
                      f"runtime namespace lacks pod-security {mode}-version")

    # Deployments: restricted securityContexts, probes, secrets by reference.
    deployments = {component(d): d for d in find(objects, "Deployment")}
    check(set(deployments) == {"control-plane", "data-plane"}, f"Deployments: {sorted(map(str, deployments))}")
    for comp, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True, f"{comp}: pod runAsNonRoot")
        check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{comp}: pod seccomp")
        check(not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), f"{comp}: host namespaces")
        check(pod.get("enableServiceLinks") is False, f"{comp}: enableServiceLinks")
        check(not any("hostPath" in v for v in pod.get("volumes", [])), f"{comp}: hostPath volume")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            check(sc.get("allowPrivilegeEscalation") is False, f"{comp}: allowPrivilegeEscalation")
            check(sc.get("readOnlyRootFilesystem") is True, f"{comp}: readOnlyRootFilesystem")
            check(sc.get("privileged") is False, f"{comp}: privileged")
            check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{comp}: capabilities drop ALL")
            check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", f"{comp}: liveness /healthz")
            check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", f"{comp}: readiness /readyz")
            check(all(k in c.get("resources", {}).get(kind, {}) for kind in ("requests", "limits") for k in ("cpu", "memory")),
                  f"{comp}: cpu/memory requests and limits")
            env = {e["name"]: e for e in c.get("env", [])}
            known = config_env_names(comp)
            for var in env:
                check(var in known, f"{comp}: {var} is not a variable {comp} reads ({comp}/src/config.rs)")
            check(env.get("ENV", {}).get("value") == values["env"], f"{comp}: ENV")
            for var, e in env.items():
                if var in SECRET_ENV:
                    check("secretKeyRef" in e.get("valueFrom", {}) and "value" not in e,
                          f"{comp}: {var} is not a Secret reference")
            check("SESSION_AGENT_ADMIN_TOKEN" not in env, f"{comp}: SESSION_AGENT_ADMIN_TOKEN is set")
    cp = deployments.get("control-plane")
    dp = deployments.get("data-plane")
    if cp:
        check(cp["spec"]["template"]["spec"].get("automountServiceAccountToken") is False,
              "control plane mounts a service account token")
    if dp:
        pod = dp["spec"]["template"]
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        check(pod["metadata"]["labels"].get("agentsandbox.dev/data-plane") == owner, "data plane pod label")
        check(env.get("RUNTIME_OWNER", {}).get("value") == owner, "RUNTIME_OWNER")
        check(env.get("SESSION_RUNTIME_BACKEND", {}).get("value") == "k8s", "SESSION_RUNTIME_BACKEND")
        check(env.get("RUNTIME_NAMESPACE", {}).get("value") == runtime_ns, "RUNTIME_NAMESPACE")
        check(env.get("DATA_PLANE_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
              == "metadata.namespace", "DATA_PLANE_NAMESPACE from the downward API")

    # RBAC: only the data plane is bound; the control plane's account never.
    cp_sa = f"{RELEASE}-control-plane"
    for b in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        for s in b.get("subjects", []):
            check(s.get("name") != cp_sa, f"{b['kind']}/{b['metadata']['name']} binds the control plane")
    roles = find(objects, "Role")
    check(len(roles) == 1 and roles[0]["metadata"]["namespace"] == runtime_ns, "one Role, in the runtime namespace")
    want_rules = {
        ("", "pods"): {"create", "get", "list", "watch", "delete", "patch"},
        ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch", "update"},
    }
    # With runtime.secretsName: `get` on that one Secret, by name (issue 19 §4).
    secrets_name = values["runtime"].get("secretsName") or ""
    if secrets_name:
        want_rules[("", "secrets")] = {"get"}
    if roles:
        got = {(g, r): set(rule["verbs"]) for rule in roles[0]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
        check(got == want_rules, f"Role rules: {got}")
        for rule in roles[0]["rules"]:
            if "secrets" in rule["resources"]:
                check(rule.get("resourceNames") == [secrets_name], f"the Secret rule is not named: {rule}")
    if dp:
        got_name = env.get("RUNTIME_SECRETS_NAME", {}).get("value", "")
        check(got_name == secrets_name, f"RUNTIME_SECRETS_NAME {got_name!r} is not runtime.secretsName")
    for cr in find(objects, "ClusterRole"):
        for rule in cr["rules"]:
            check(rule.get("verbs") == ["get"] and bool(rule.get("resourceNames")),
                  f"ClusterRole rule is not a named get: {rule}")
    for o in objects:
        for rule in o.get("rules", []) if o["kind"] in ("Role", "ClusterRole") else []:
            check("*" not in rule.get("verbs", []) + rule.get("resources", []) + rule.get("apiGroups", []),
                  f"{o['kind']} has a wildcard")

    # Default-deny for both planes.
    for comp in ("control-plane", "data-plane"):
        nps = find(objects, "NetworkPolicy", lambda o, c=comp: component(o) == c)
        check(len(nps) == 1 and nps[0]["spec"].get("policyTypes") == ["Ingress", "Egress"],
              f"{comp}: default-deny NetworkPolicy")

    # ServiceMonitor (a custom resource: its shape is checked here).
    for sm in find(objects, "ServiceMonitor"):
        eps = sm.get("spec", {}).get("endpoints", [])
        check(bool(eps) and all(e.get("port") == "http" and e.get("path") == "/metrics" for e in eps),
              "ServiceMonitor endpoints")
        check(bool(sm["spec"].get("selector")), "ServiceMonitor selector")
    if values.get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
        check(len(find(objects, "ServiceMonitor")) == 1, "ServiceMonitor enabled but not rendered")

    for e in errors:
        fail(f"contract ({set_name}): {e}")
    if not errors:
        print("    ok")


# ---------------------------------------------------------------- 5./6. tools


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def kubernetes_validate(label: str, files: list[Path], kinds: list[str]) -> None:
    for version in KUBE_VERSIONS:
        step(f"kubernetes-validate --strict -k {version} ({label})")
        res = run([str(VENV_BIN / "kubernetes-validate"), "--strict", "-k", version, *map(str, files)])
        out = (res.stdout + res.stderr).splitlines()
        passed = sum(1 for line in out if line.startswith("INFO"))
        bad = [line for line in out if not line.startswith("INFO")]
        # A schema missing for a custom resource is expected; for anything else it hides a typo.
        unexpected = [line for line in bad if not (line.startswith("WARN") and any(k.split("/")[-1] in line for k in CUSTOM_KINDS))]
        for line in bad:
            expected = line not in unexpected
            print(f"    {line}" + ("  (a custom resource: its shape is checked in the contract step)" if expected else ""))
        if res.returncode != 0 or unexpected:
            fail(f"kubernetes-validate {version} ({label}): exit {res.returncode}")
        want = sum(1 for k in kinds if k not in CUSTOM_KINDS)
        if passed != want:
            fail(f"kubernetes-validate {version} ({label}): {passed} objects passed, expected {want}")
        else:
            print(f"    {passed} objects valid")


def checkov(label: str, directory: Path, skips: dict[str, str] | None = None) -> None:
    step(f"checkov --framework kubernetes ({label})")
    cmd = [
        str(VENV_BIN / "checkov"), "--framework", "kubernetes", "-d", str(directory),
        "--skip-download", "--compact", "-o", "json",
    ]
    if skips:
        cmd += ["--skip-check", ",".join(sorted(skips))]
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false", LOG_LEVEL="ERROR")
    res = run(cmd, env)
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        print(res.stdout[-3000:], res.stderr[-3000:])
        fail(f"checkov ({label}): unreadable output (exit {res.returncode})")
        return
    reports = report if isinstance(report, list) else [report]
    passed = failed = skipped = 0
    for r in reports:
        summary = r.get("summary", {})
        passed += summary.get("passed", 0)
        failed += summary.get("failed", 0)
        skipped += summary.get("skipped", 0)
        results = r.get("results", {})
        for c in results.get("failed_checks", []):
            fail(f"checkov ({label}): {c['check_id']} {c['check_name']} on {c['resource']} ({Path(c['file_path']).name})")
        for c in results.get("skipped_checks", []):
            reason = (c.get("check_result") or {}).get("suppress_comment", "")
            print(f"    skipped {c['check_id']} on {c['resource']}: {reason}")
    print(f"    passed {passed}, failed {failed}, skipped {skipped}")
    if passed == 0:
        fail(f"checkov ({label}): no check ran")
    if res.returncode not in (0, 1):
        fail(f"checkov ({label}): exit {res.returncode}: {res.stderr[-2000:]}")


def kind_key(o: dict[str, Any]) -> str:
    return f"{o['apiVersion']}/{o['kind']}"


CANARY = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: canary
  namespace: deploy-check
spec:
  selector:
    matchLabels: {app: canary}
  template:
    metadata:
      labels: {app: canary}
    spec:
      hostNetwork: true
      containers:
        - name: canary
          image: canary:latest
          securityContext:
            privileged: true
          unknownField: true
"""


def canary() -> None:
    """The tools can fail: a bad Deployment must be refused by both."""
    step("canary: kubernetes-validate and checkov refuse a bad Deployment")
    d = OUT / "canary"
    d.mkdir(parents=True, exist_ok=True)
    f = d / "canary.yaml"
    f.write_text(CANARY)
    res = run([str(VENV_BIN / "kubernetes-validate"), "--strict", "-k", KUBE_VERSIONS[0], str(f)])
    if res.returncode == 0 or "unknownField" not in res.stdout:
        fail(f"kubernetes-validate --strict accepted an unknown field: {res.stdout.strip()}")
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", LOG_LEVEL="ERROR")
    res = run([str(VENV_BIN / "checkov"), "--framework", "kubernetes", "-d", str(d),
               "--skip-download", "--compact", "-o", "json"], env)
    try:
        failed = json.loads(res.stdout).get("summary", {}).get("failed", 0)
    except (json.JSONDecodeError, AttributeError):
        failed = 0
    if res.returncode == 0 or failed < 5:
        fail(f"checkov did not fail a privileged host-network Deployment (exit {res.returncode}, {failed} failed)")
    else:
        print(f"    refused: kubernetes-validate (unknown field), checkov ({failed} failed checks)")


def image_interpreters() -> set[str]:
    """Interpreter paths the runtime images provide: Debian's bash, and the
    links each Dockerfile makes from /usr/local/bin into /usr/bin."""
    paths = {"/usr/bin/bash"}
    for runtime in ("python", "node"):
        text = (ROOT / "deploy" / "runtime" / runtime / "Dockerfile").read_text()
        for line in text.splitlines():
            parts = line.split()
            if parts[:3] == ["RUN", "ln", "-s"] and len(parts) == 5:
                paths.add(parts[4])
    return paths


IMAGE_INTERPRETERS = image_interpreters()


# ---------------------------------------------------------------- 7. runtime objects


def runtime_objects(chart_objects: list[dict[str, Any]]) -> None:
    path = OUT / "runtime-objects.json"
    if not path.exists():
        step("runtime objects: SKIPPED (no target/deploy-check/runtime-objects.json: `data-plane k8s-objects` is not available)")
        return
    step(f"runtime objects from `data-plane k8s-objects` ({path.name})")
    doc = json.loads(path.read_text())
    if doc.get("apiVersion") != "v1" or doc.get("kind") != "List" or not isinstance(doc.get("items"), list) or not doc["items"]:
        fail("runtime-objects.json is not a non-empty Kubernetes List")
        return
    items = doc["items"]
    print("    " + ", ".join(f"{o.get('kind')}/{o.get('metadata', {}).get('name')}" for o in items))
    out_dir = OUT / "runtime"
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.iterdir():
        p.unlink()
    files = []
    for i, o in enumerate(items):
        f = out_dir / f"{i:02d}-{o.get('kind', 'object').lower()}.yaml"
        f.write_text(yaml.safe_dump(o, sort_keys=False))
        files.append(f)
    kubernetes_validate("runtime objects", files, [kind_key(o) for o in items])
    checkov("runtime objects", out_dir, RUNTIME_OBJECT_SKIPS)

    # The runtime NetworkPolicy selects the sample pods, and each pod's
    # interpreter is a path the runtime images provide.
    policy = next((o for o in items if o.get("kind") == "NetworkPolicy"), None)
    selector = (policy or {}).get("spec", {}).get("podSelector", {}).get("matchLabels", {})
    for pod in (o for o in items if o.get("kind") == "Pod"):
        labels = pod["metadata"].get("labels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            fail(f"runtime NetworkPolicy does not select pod {pod['metadata']['name']} ({labels})")
        for c in pod["spec"]["containers"]:
            for e in c.get("env", []):
                if e["name"] in ("SESSION_AGENT_PYTHON", "SESSION_AGENT_NODE", "SESSION_AGENT_BASH"):
                    if e.get("value") not in IMAGE_INTERPRETERS:
                        fail(f"pod {pod['metadata']['name']}: {e['name']}={e.get('value')} is not a path the runtime images provide {sorted(IMAGE_INTERPRETERS)}")

    # The chart's runtime NetworkPolicy and the data plane's must not fight.
    theirs = [o for o in items if o.get("kind") == "NetworkPolicy"]
    ours = [o for o in chart_objects if o.get("kind") == "NetworkPolicy"
            and o["metadata"]["name"].startswith("agent-sandbox-runtime-")]
    if len(theirs) != 1 or len(ours) != 1:
        fail(f"runtime NetworkPolicy: data plane has {len(theirs)}, chart has {len(ours)}")
        return
    t, o = theirs[0], ours[0]
    same = (
        t["metadata"].get("name") == o["metadata"]["name"]
        and t["metadata"].get("namespace") == o["metadata"]["namespace"]
        and normalize_policy(t.get("spec", {})) == normalize_policy(o["spec"])
    )
    clash = {
        k: (v, o["metadata"]["labels"][k])
        for k, v in (t["metadata"].get("labels") or {}).items()
        if k in o["metadata"].get("labels", {}) and o["metadata"]["labels"][k] != v
    }
    if not same:
        fail("runtime NetworkPolicy: the data plane's and the chart's differ:\n"
             f"      data plane: {json.dumps({'metadata': t['metadata'], 'spec': t.get('spec')}, sort_keys=True)}\n"
             f"      chart:      {json.dumps({'metadata': o['metadata'], 'spec': o['spec']}, sort_keys=True)}")
    elif clash:
        fail(f"runtime NetworkPolicy: label values differ between the data plane and the chart: {clash}")
    else:
        print("    the data plane's runtime NetworkPolicy is the chart's (name, namespace, spec)")


# ---------------------------------------------------------------- main


def main() -> int:
    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    chart = helm.Chart.load(str(CHART))
    defaults = chart.values
    production_file = load_yaml(CHART / "ci" / "production-values.yaml")
    production = chart.merge_values(production_file)
    minimal = chart.merge_values(MINIMAL)
    values_sets = {"default": defaults, "production": production, "minimal": minimal}

    canary()
    lint({"default": {}, "production": production_file, "minimal": MINIMAL})
    schema(chart, values_sets)
    rendered: dict[str, list[dict[str, Any]]] = {}
    for set_name, values in values_sets.items():
        try:
            rendered[set_name] = render(chart, set_name, values)
        except helm.HelmError as e:
            fail(f"render ({set_name}): {e}")
    for set_name, objects in rendered.items():
        contract(set_name, objects, values_sets[set_name])
    for set_name, objects in rendered.items():
        files = sorted((OUT / set_name).glob("*.yaml"))
        kubernetes_validate(f"{set_name} values", files, [kind_key(o) for o in objects])
    for set_name in rendered:
        checkov(f"{set_name} values", OUT / set_name)
    runtime_objects(rendered.get("default", []))

    elapsed = time.monotonic() - started
    if failures:
        print(f"\n[deploy-check] FAILED: {len(failures)} problem(s) ({elapsed:.0f}s):", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print(f"[deploy-check] chart checks passed ({elapsed:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
