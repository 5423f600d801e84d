#!/usr/bin/env python3
"""The Python side of the chart and Kubernetes checks (scripts/chart-check.sh,
scripts/render-k8s.sh, scripts/prometheus-check.sh): one subcommand per check.

    python3 scripts/chart_checks.py SUBCOMMAND [ARGS...]     (--help: the list)

Each check prints its findings ("ERROR: ..." lines) and exits 1 when it fails, 0 when it
passes; the shell scripts count PASS/FAIL from the exit status. Subcommands that read YAML
need PyYAML (scripts/k8s-tools.sh provides it as $TOOLS_PY); the others need only the
standard library.

`readme` generates charts/presence-service/README.md from the `# --` comments of
values.yaml (the helm-docs convention: a `# -- description` comment block directly above a
key documents it) and the template README.md.gotmpl next to it:

    python3 scripts/chart_checks.py readme --write    regenerate the README
    python3 scripts/chart_checks.py readme --check    fail when it is out of date
"""

import argparse
import difflib
import json
import os
import re
import socket
import sys
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(REPO, "charts", "presence-service")


def _yaml():
    try:
        import yaml  # noqa: PLC0415 (only the YAML subcommands need PyYAML)
    except ImportError:
        sys.exit("PyYAML is missing: run with the python of scripts/k8s-tools.sh ($TOOLS_PY)")
    return yaml


def load_docs(path):
    """The non-empty documents of a multi-document YAML file."""
    with open(path, encoding="utf-8") as f:
        return [d for d in _yaml().safe_load_all(f) if d]


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return _yaml().safe_load(f)


def by_kind_name(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


class Checker:
    """Collects the unmet expectations of one check."""

    def __init__(self):
        self.errors = []

    def need(self, cond, msg):
        if not cond:
            self.errors.append(msg)

    def finish(self):
        for e in self.errors:
            print("ERROR:", e)
        return 1 if self.errors else 0


# ----------------------------------------------------------------------- rendered objects

GRPC_TLS_DIR = "/etc/presence/grpc-tls"


def workload_env(w):
    return {e["name"]: e for e in w["spec"]["template"]["spec"]["containers"][0].get("env", [])}


def check_jwt(cm, c, jwks="https://idp.example.com/.well-known/jwks.json"):
    """A jwt variant's ConfigMap: PRESENCE_AUTH=jwt with the JWKS URL, no shared secret."""
    c.need(cm.get("PRESENCE_AUTH") == "jwt", "ConfigMap: PRESENCE_AUTH=jwt")
    c.need(cm.get("PRESENCE_JWT_JWKS_URL") == jwks, f"ConfigMap: PRESENCE_JWT_JWKS_URL={jwks}")
    c.need(bool(cm.get("PRESENCE_JWT_AUDIENCE")), "ConfigMap: PRESENCE_JWT_AUDIENCE")
    c.need("PRESENCE_JWT_SECRET" not in cm, "the JWT secret is never in the ConfigMap")


def check_grpc_tls(by, cm, c, secret, server_name):
    """mTLS: the four variables, and the Secret mounted read-only in gateways and shards."""
    c.need(cm.get("PRESENCE_GRPC_TLS_CERT") == f"{GRPC_TLS_DIR}/tls.crt"
           and cm.get("PRESENCE_GRPC_TLS_KEY") == f"{GRPC_TLS_DIR}/tls.key"
           and cm.get("PRESENCE_GRPC_TLS_CA") == f"{GRPC_TLS_DIR}/ca.crt", "ConfigMap: PRESENCE_GRPC_TLS_CERT/KEY/CA")
    c.need(cm.get("PRESENCE_GRPC_TLS_SERVER_NAME") == server_name, f"ConfigMap: PRESENCE_GRPC_TLS_SERVER_NAME={server_name}")
    for kind, name in (("Deployment", "presence-gateway"), ("StatefulSet", "presence-shard")):
        spec = by[(kind, name)]["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["name"]: m for m in spec["containers"][0].get("volumeMounts", [])}
        c.need(vols.get("grpc-tls", {}).get("secret", {}).get("secretName") == secret,
               f"{name}: volume grpc-tls from Secret {secret}")
        m = mounts.get("grpc-tls", {})
        c.need(m.get("mountPath") == GRPC_TLS_DIR and m.get("readOnly") is True,
               f"{name}: grpc-tls mounted read-only at {GRPC_TLS_DIR}")



def check_workers(by, cm, c, threads=None):
    """Worker threads: from each container's CPU request (downward API, rounded up) unless
    config.workerThreads sets them in the ConfigMap, where the env must not override them."""
    for kind, name, ctr_name in (("Deployment", "presence-gateway", "gateway"),
                                 ("StatefulSet", "presence-shard", "shard")):
        ctr = by[(kind, name)]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in ctr.get("env", [])}
        ref = env.get("PRESENCE_WORKER_THREADS", {}).get("valueFrom", {}).get("resourceFieldRef", {})
        if threads is None:
            c.need(ref == {"containerName": ctr_name, "resource": "requests.cpu", "divisor": "1"},
                   f"{ctr_name}: PRESENCE_WORKER_THREADS from its CPU request (divisor 1)")
            c.need(ctr.get("resources", {}).get("requests", {}).get("cpu"),
                   f"{ctr_name}: a CPU request to take the worker threads from")
        else:
            c.need("PRESENCE_WORKER_THREADS" not in env,
                   f"{ctr_name}: config.workerThreads is not overridden by the env")
    if threads is None:
        c.need("PRESENCE_WORKER_THREADS" not in cm, "ConfigMap: no PRESENCE_WORKER_THREADS by default")
    else:
        c.need(cm.get("PRESENCE_WORKER_THREADS") == str(threads), f"ConfigMap: PRESENCE_WORKER_THREADS={threads}")


def rendered_default(docs, c):
    by = by_kind_name(docs)
    cm = by[("ConfigMap", "presence-config")]["data"]
    drain = int(cm["PRESENCE_DRAIN_TIMEOUT"].rstrip("s"))
    c.need(cm["PRESENCE_DISCOVERY"] == "kubernetes", "discovery must default to kubernetes")
    c.need(cm["PRESENCE_K8S_SERVICE"] == "presence-shard" and cm["PRESENCE_K8S_PORT"] == "grpc",
           "k8s discovery service/port")
    check_jwt(cm, c)
    c.need(not any(k.startswith("PRESENCE_GRPC_TLS_") for k in cm), "no gRPC TLS by default")
    check_workers(by, cm, c)
    gw = by[("Deployment", "presence-gateway")]
    sh = by[("StatefulSet", "presence-shard")]
    for w, role in ((gw, "gateway"), (sh, "shard")):
        spec = w["spec"]["template"]["spec"]
        ctr = spec["containers"][0]
        env = {e["name"]: e for e in ctr.get("env", [])}
        c.need(env.get("PRESENCE_ROLE", {}).get("value") == role, f"{role}: PRESENCE_ROLE={role}")
        c.need(env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
               f"{role}: POD_IP from the downward API")
        c.need(ctr["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{role}: readiness on /readyz")
        c.need(ctr["livenessProbe"]["httpGet"]["path"] == "/livez", f"{role}: liveness on /livez")
        pre = ctr.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        c.need(pre > 0, f"{role}: preStop sleep")
        c.need(spec["terminationGracePeriodSeconds"] > pre + drain,
               f"{role}: terminationGracePeriodSeconds must exceed preStop + drain")
        c.need(spec["securityContext"].get("runAsNonRoot") is True, f"{role}: runAsNonRoot")
        c.need(ctr["securityContext"].get("readOnlyRootFilesystem") is True, f"{role}: read-only root")
        keys = [t["topologyKey"] for t in spec.get("topologySpreadConstraints", [])]
        c.need("topology.kubernetes.io/zone" in keys, f"{role}: spread across zones")
        c.need(spec["serviceAccountName"] == "presence", f"{role}: service account")
    c.need({p["name"] for p in sh["spec"]["template"]["spec"]["containers"][0]["ports"]} == {"http", "grpc"},
           "shard ports http+grpc")
    svc = by[("Service", "presence-shard")]
    c.need(sh["spec"]["serviceName"] == "presence-shard" and svc["spec"]["clusterIP"] == "None",
           "shards behind a headless Service")
    c.need(any(p["name"] == "grpc" and p["port"] == 9004 for p in svc["spec"]["ports"]),
           "headless Service port grpc 9004")
    c.need(not svc["spec"].get("publishNotReadyAddresses"), "only ready shards are published")
    hpa = by[("HorizontalPodAutoscaler", "presence-gateway")]["spec"]
    kinds = {(m["type"], m["resource"]["name"] if m["type"] == "Resource" else m["pods"]["metric"]["name"])
             for m in hpa["metrics"]}
    c.need(("Resource", "cpu") in kinds and ("Pods", "presence_ws_connections") in kinds,
           "HPA on cpu and presence_ws_connections")
    c.need(hpa["scaleTargetRef"]["name"] == "presence-gateway", "HPA targets the gateways")
    c.need("replicas" not in gw["spec"], "no fixed replicas under an HPA")
    for n in ("presence-gateway", "presence-shard"):
        c.need(("PodDisruptionBudget", n) in by, f"PDB {n}")
        c.need(("NetworkPolicy", n) in by, f"NetworkPolicy {n}")
    role = by[("Role", "presence-discovery")]
    c.need(role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}],
           "RBAC: exactly get/list/watch endpointslices")
    rb = by[("RoleBinding", "presence-discovery")]
    c.need(rb["subjects"][0]["name"] == "presence" and rb["roleRef"]["name"] == "presence-discovery", "RoleBinding")
    c.need(("ServiceAccount", "presence") in by, "ServiceAccount")
    dash = by[("ConfigMap", "presence-dashboard")]
    c.need(dash["metadata"]["labels"].get("grafana_dashboard") == "1",
           'dashboard ConfigMap label grafana_dashboard: "1"')


def rendered_external_redis(docs, c):
    by = by_kind_name(docs)
    ctr = by[("StatefulSet", "presence-shard")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in ctr["env"]}
    c.need(env["PRESENCE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "presence-redis", "key": "password"},
           "password from the existing Secret")
    c.need(env.get("PRESENCE_REDIS_USERNAME", {}).get("value") == "presence", "ACL user")
    url = env["PRESENCE_REDIS_URL"]["value"]
    c.need(url.startswith("rediss://redis-cluster-0.") and "@" not in url, "URL without credentials")
    c.need(url.count("rediss://") == 3, "every seed URL")
    tls_dir = "/etc/presence/redis-tls"
    c.need(env.get("PRESENCE_REDIS_TLS_CA", {}).get("value") == f"{tls_dir}/ca.crt"
           and env.get("PRESENCE_REDIS_TLS_CERT", {}).get("value") == f"{tls_dir}/tls.crt"
           and env.get("PRESENCE_REDIS_TLS_KEY", {}).get("value") == f"{tls_dir}/tls.key",
           "Redis TLS: CA and client certificate from the mounted Secret")
    pod = by[("StatefulSet", "presence-shard")]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["name"]: m for m in ctr.get("volumeMounts", [])}
    c.need(vols.get("redis-tls", {}).get("secret", {}).get("secretName") == "presence-redis-tls"
           and mounts.get("redis-tls", {}).get("mountPath") == tls_dir
           and mounts["redis-tls"].get("readOnly") is True,
           "Redis TLS Secret mounted read-only in the shards")
    ing = by[("Ingress", "presence-gateway")]
    ann = ing["metadata"]["annotations"]
    c.need(ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout") == "3600"
           and ann.get("nginx.ingress.kubernetes.io/proxy-send-timeout") == "3600",
           "ingress-nginx WebSocket timeouts")
    c.need(ing["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/api/v1/presence",
           "Ingress path covers /api/v1/presence/ws")
    ep = by[("ServiceMonitor", "presence")]["spec"]["endpoints"][0]
    c.need(ep["port"] == "http" and ep["path"] == "/metrics", "ServiceMonitor scrapes http /metrics")
    c.need(any(r.get("targetLabel") == "role" for r in ep["relabelings"]),
           "ServiceMonitor adds the role label the alerts use")
    c.need(("PrometheusRule", "presence") in by, "PrometheusRule rendered")
    np = by[("NetworkPolicy", "presence-gateway")]["spec"]
    c.need("Egress" in np["policyTypes"], "egress policy when enabled")
    cm = by[("ConfigMap", "presence-config")]["data"]
    check_jwt(cm, c)
    c.need(cm.get("PRESENCE_JWT_ISSUER") == "https://idp.example.com/", "ConfigMap: PRESENCE_JWT_ISSUER")
    cert = by.get(("Certificate", "presence-grpc-tls"), {}).get("spec", {})
    c.need(cert.get("secretName") == "presence-grpc-tls", "cert-manager Certificate with Secret presence-grpc-tls")
    c.need("presence.internal" in cert.get("dnsNames", []), "Certificate names grpcTls.serverName")
    c.need({"server auth", "client auth"} <= set(cert.get("usages", [])), "Certificate: server auth + client auth")
    c.need(cert.get("issuerRef", {}).get("kind") == "ClusterIssuer", "Certificate issuerRef")
    check_grpc_tls(by, cm, c, "presence-grpc-tls", "presence.internal")
    check_workers(by, cm, c, threads=2)


def rendered_nacos(docs, c):
    by = by_kind_name(docs)
    kinds = {k for k, _ in by}
    cm = by[("ConfigMap", "presence-config")]["data"]
    c.need(cm["PRESENCE_DISCOVERY"] == "nacos" and cm["PRESENCE_NACOS_ADDR"] == "nacos.nacos.svc:8848",
           "nacos address")
    c.need(cm["PRESENCE_NACOS_SERVICE"] == "presence-shard" and cm["PRESENCE_NACOS_GROUP"] == "IM",
           "nacos service/group")
    c.need("Role" not in kinds and "RoleBinding" not in kinds, "no RBAC for nacos")
    shard = by[("StatefulSet", "presence-shard")]["spec"]["template"]["spec"]
    c.need(shard["automountServiceAccountToken"] is False, "no API token for nacos")
    r = by[("StatefulSet", "presence-redis")]
    c.need(r["spec"]["replicas"] == 6 and r["spec"].get("volumeClaimTemplates"), "bundled Redis: 6 nodes on PVCs")
    c.need(("Job", "presence-redis-cluster-init") in by, "cluster-init Job")
    env = {e["name"]: e for e in shard["containers"][0]["env"]}
    c.need(env["PRESENCE_REDIS_URL"]["value"].startswith("redis://presence-redis-0.presence-redis:6379,"),
           "shards use the bundled Redis")
    secret = {"name": "presence-redis", "key": "redis-password"}
    c.need(env["PRESENCE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret,
           "shards: Redis password from the Secret")
    redis = r["spec"]["template"]["spec"]["containers"][0]
    renv = {e["name"]: e for e in redis.get("env", [])}
    c.need(renv.get("REDISCLI_AUTH", {}).get("valueFrom", {}).get("secretKeyRef") == secret,
           "Redis nodes: REDISCLI_AUTH from the Secret (probes, redis-cli)")
    cmd = redis["command"]
    c.need("--requirepass" in cmd and "--masterauth" in cmd, "Redis nodes: requirepass and masterauth")
    job = by[("Job", "presence-redis-cluster-init")]["spec"]["template"]["spec"]["containers"][0]
    c.need(any(e["name"] == "REDISCLI_AUTH" for e in job["env"]), "cluster-init Job: REDISCLI_AUTH")
    # Only shards (and the Redis nodes and the init Job) reach Redis; gateways do not.
    peers = []
    for rule in by[("NetworkPolicy", "presence-redis")]["spec"]["ingress"]:
        for f in rule.get("from", []):
            peers.append(f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component"))
    c.need(sorted(peers) == ["redis", "redis-init", "shard"],
           f"Redis NetworkPolicy admits shard, redis, redis-init pods only, got {sorted(map(str, peers))}")
    cm = by[("ConfigMap", "presence-config")]["data"]
    check_jwt(cm, c)
    gw = workload_env(by[("Deployment", "presence-gateway")])
    c.need(gw.get("PRESENCE_JWT_SECRET", {}).get("valueFrom", {}).get("secretKeyRef")
           == {"name": "presence-jwt", "key": "jwt-secret"}, "gateways: PRESENCE_JWT_SECRET from the Secret")
    c.need("PRESENCE_JWT_SECRET" not in env, "shards do not get the JWT secret")
    c.need(not any(d["kind"] == "Certificate" for d in docs), "no Certificate with grpcTls.existingSecret")
    check_grpc_tls(by, cm, c, "presence-grpc-tls", "presence")


def rendered_disabled(docs, c):
    kinds = sorted(d["kind"] for d in docs)
    want = ["ConfigMap", "Deployment", "Service", "Service", "StatefulSet"]
    c.need(kinds == want, f"got {kinds}, want {want}")
    cm = [d for d in docs if d["kind"] == "ConfigMap"][0]["data"]
    c.need(cm.get("PRESENCE_AUTH") == "none", "ConfigMap: PRESENCE_AUTH=none (auth.allowAnonymous)")
    c.need(not any(k.startswith("PRESENCE_JWT_") for k in cm), "no JWT settings with auth off")


RENDERED = {
    "default": rendered_default,
    "external-redis": rendered_external_redis,
    "nacos": rendered_nacos,
    "disabled": rendered_disabled,
}


def cmd_rendered(a):
    c = Checker()
    RENDERED[a.variant](load_docs(a.manifests), c)
    return c.finish()


def prometheus_rule(docs):
    return [d for d in docs if d["kind"] == "PrometheusRule"][0]


def cmd_carried(a):
    """PrometheusRule spec == the rules file; dashboard ConfigMap == the dashboard JSON."""
    docs = load_docs(a.manifests)
    rule = prometheus_rule(docs)
    if rule["spec"] != load_yaml(a.rules):
        sys.exit("PrometheusRule spec differs from the rules file")
    cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "presence-dashboard"][0]
    dash = json.loads(cm["data"]["presence.json"])
    with open(a.dashboard, encoding="utf-8") as f:
        if dash != json.load(f):
            sys.exit("dashboard ConfigMap differs from presence.json")
    print(f"{len(rule['spec']['groups'][0]['rules'])} rules, {len(dash['panels'])} panels")
    return 0


def cmd_rule_spec(a):
    print(_yaml().safe_dump(prometheus_rule(load_docs(a.manifests))["spec"]))
    return 0


# ----------------------------------------------------------------------- metric names


def cmd_metric_names(a):
    """Every presence_* name of the dashboard, the alerts and the HPA is in a scrape."""
    exported = set()
    for path in a.scrapes:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                exported.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    used = {}  # name -> where
    name_re = re.compile(r"\bpresence_[a-zA-Z0-9_]+")

    def scan(text, where):
        for n in name_re.findall(text):
            used.setdefault(n, set()).add(where)

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    scan(v, "dashboard")
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    with open(f"{a.chart}/dashboards/presence.json", encoding="utf-8") as f:
        walk(json.load(f))
    for g in load_yaml(f"{a.chart}/alerts/presence-rules.yaml")["groups"]:
        for r in g["rules"]:
            scan(r["expr"], "alerts")
    values = load_yaml(f"{a.chart}/values.yaml")
    scan(values["gateway"]["autoscaling"]["wsConnections"]["metricName"], "HPA")
    missing = {n: w for n, w in used.items() if n not in exported}
    print(f"{len(exported)} series names scraped from {len(a.scrapes)} nodes; {len(used)} names used "
          f"(dashboard {sum('dashboard' in w for w in used.values())}, "
          f"alerts {sum('alerts' in w for w in used.values())}, HPA 1)")
    for n, w in sorted(missing.items()):
        print(f'MISSING: {n} (used by {", ".join(sorted(w))})')
    return 1 if missing else 0


# ----------------------------------------------------------------------- chart-testing layout


# Settings of src/config.rs the chart leaves to extraEnv, and why.
UNSET_BY_CHART = {
    "PRESENCE_SHARDS": "static discovery; the chart discovers shards through Kubernetes or Nacos",
    "PRESENCE_METRICS_LISTEN": "/metrics stays on the API port, which the Ingress does not route "
                               "(only ingress.hosts[].paths) and the ServiceMonitor scrapes",
}


def cmd_settings(a):
    """Every PRESENCE_* setting of src/config.rs is set by the chart's templates, or is one it
    leaves to extraEnv on purpose (UNSET_BY_CHART): a new setting cannot be forgotten."""
    c = Checker()
    with open(os.path.join(REPO, "src", "config.rs"), encoding="utf-8") as f:
        settings = set(re.findall(r'env = "(PRESENCE_[A-Z0-9_]+)"', f.read()))
    used = set()
    tdir = os.path.join(a.chart, "templates")
    for name in os.listdir(tdir):
        with open(os.path.join(tdir, name), encoding="utf-8") as f:
            used |= set(re.findall(r"\b(PRESENCE_[A-Z0-9_]+)\b", f.read()))
    c.need(len(settings) > 50, f"read only {len(settings)} settings from src/config.rs")
    for name in sorted(settings - used - set(UNSET_BY_CHART)):
        c.need(False, f"{name} (src/config.rs) is set nowhere in {os.path.relpath(tdir, REPO)}: "
                "add a value for it, or list it in UNSET_BY_CHART with the reason")
    for name in sorted(set(UNSET_BY_CHART) - settings):
        c.need(False, f"UNSET_BY_CHART names {name}, which src/config.rs no longer has")
    if not c.errors:
        print(f"{len(settings)} settings: {len(settings & used)} set by the chart, "
              f"{len(set(UNSET_BY_CHART) & settings)} left to extraEnv ({', '.join(sorted(UNSET_BY_CHART))})")
    return c.finish()


def cmd_ct_layout(a):
    """ct.yaml names the chart's directory, and ci/ holds only *-values.yaml files."""
    c = Checker()
    ct = load_yaml(a.ct_yaml) or {}
    chart_dir = os.path.relpath(a.chart, REPO)
    dirs = ct.get("chart-dirs") or []
    c.need(os.path.dirname(chart_dir) in dirs, f"ct.yaml chart-dirs {dirs} must contain {os.path.dirname(chart_dir)}")
    c.need(bool(ct.get("target-branch")), "ct.yaml sets target-branch")
    ci = os.path.join(a.chart, "ci")
    files = sorted(os.listdir(ci)) if os.path.isdir(ci) else []
    values = [f for f in files if f.endswith("-values.yaml")]
    c.need(bool(values), f"{chart_dir}/ci has no *-values.yaml (ct installs the chart once per file)")
    for f in files:
        c.need(f in values, f"{chart_dir}/ci/{f}: ct only reads ci/*-values.yaml")
    if not c.errors:
        print(f"ct.yaml: chart-dirs {dirs}, target-branch {ct['target-branch']}; "
              f"{len(values)} ci values files: {', '.join(values)}")
    return c.finish()


# ----------------------------------------------------------------------- chart README

KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_][A-Za-z0-9_.\-/]*):(?:\s|$)")


def values_descriptions(path):
    """{dotted key: description} from the `# --` comment blocks of a values file.

    helm-docs' convention: a comment block that starts with `# --` and is directly above a
    key documents that key; the lines after the first continue the description. Keys inside
    list items are not keys of the values tree and are skipped."""
    docs, stack, block = {}, [], None  # stack: [(indent, key)]
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for lineno, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped[1:].strip()
            if text.startswith("--"):
                block = (lineno, [text[2:].strip()])
            elif block is not None:
                block[1].append(text)
            continue
        m = KEY_LINE.match(line)
        if not m or stripped.startswith("-"):
            block = None  # a blank line or a list item ends a comment block
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if block is not None:
            docs[".".join(k for _, k in stack)] = (block[0], " ".join(t for t in block[1] if t))
        block = None
    return docs


def values_rows(values, docs):
    """(rows, errors): one row per leaf of the values tree, in file order.

    A leaf is a scalar, a list or an empty map; non-empty maps are walked into, so every
    value gets its own row (a `# --` comment on a non-empty map would hide its leaves from
    helm-docs, and is an error here)."""
    rows, errors = [], []

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                if key in docs:
                    errors.append(f"values.yaml:{docs[key][0]}: `# --` on the map {key}: document its "
                                  "values one by one instead (a plain `#` comment can describe the map)")
                walk(key + ".", v)
                continue
            if key not in docs:
                errors.append(f"values.yaml: {key} has no `# --` description")
            rows.append((key, value_type(v), v, docs.get(key, (0, ""))[1]))

    walk("", values)
    return rows, errors


# helm-docs' type names, most specific first (bool is an int in Python).
VALUE_TYPES = ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"), (list, "list"), (dict, "object"))


def value_type(v):
    if v is None:
        return "string"
    return next((name for t, name in VALUE_TYPES if isinstance(v, t)), type(v).__name__)


def md_cell(text):
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def values_table(rows):
    out = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for key, typ, default, desc in rows:
        shown = json.dumps(default, ensure_ascii=False, separators=(",", ":")).replace("|", "\\|")
        out.append(f"| {key} | {typ} | `{shown}` | {md_cell(desc)} |")
    return "\n".join(out)


def render_readme(chart):
    """(text, errors): README.md from README.md.gotmpl, Chart.yaml and values.yaml.

    The template may use these helm-docs templates: chart.header, chart.description,
    chart.name, chart.version, chart.appVersion, chart.type, chart.kubeVersion,
    chart.valuesHeader, chart.valuesTable, chart.valuesSection."""
    meta = load_yaml(f"{chart}/Chart.yaml")
    rows, errors = values_rows(load_yaml(f"{chart}/values.yaml"), values_descriptions(f"{chart}/values.yaml"))
    table = values_table(rows)
    parts = {
        "chart.header": f"# {meta['name']}",
        "chart.description": meta.get("description", ""),
        "chart.name": meta["name"],
        "chart.version": str(meta["version"]),
        "chart.appVersion": str(meta.get("appVersion", "")),
        "chart.type": meta.get("type", "application"),
        "chart.kubeVersion": meta.get("kubeVersion", ""),
        "chart.valuesHeader": "## Values",
        "chart.valuesTable": table,
        "chart.valuesSection": f"## Values\n\n{table}",
    }
    with open(f"{chart}/README.md.gotmpl", encoding="utf-8") as f:
        template = f.read()

    def sub(m):
        if m.group(1) not in parts:
            errors.append(f"README.md.gotmpl: unknown template {m.group(1)!r}")
            return m.group(0)
        return parts[m.group(1)]

    text = re.sub(r'\{\{-?\s*template\s+"([^"]+)"\s+\.\s*-?\}\}', sub, template)
    return text.rstrip("\n") + "\n", errors, len(rows)


def cmd_readme(a):
    readme = f"{a.chart}/README.md"
    rel = os.path.relpath(readme, REPO)
    regen = ("python3 scripts/chart_checks.py readme --write "
             "(a python3 with PyYAML, e.g. .tmp/tools/venv/bin/python after scripts/chart-check.sh)")
    text, errors, n = render_readme(a.chart)
    for e in errors:
        print("ERROR:", e)
    if errors:
        print("Document every value with a `# -- description` comment above it in values.yaml, "
              "then regenerate the README: " + regen)
        return 1
    try:
        with open(readme, encoding="utf-8") as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    if a.write:
        if current != text:
            with open(readme, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {rel}: {n} values")
        else:
            print(f"{rel} is up to date: {n} values")
        return 0
    if current != text:
        print(f"ERROR: {rel} is out of date with values.yaml (or README.md.gotmpl, Chart.yaml). "
              f"Regenerate it with: {regen}")
        for line in list(difflib.unified_diff(current.splitlines(), text.splitlines(), rel, "generated",
                                              lineterm="", n=1))[:30]:
            print("    " + line)
        return 1
    print(f"{rel} documents all {n} values of values.yaml")
    return 0


# ----------------------------------------------------------------------- render-k8s


def cmd_k8s_dev_redis(a):
    """The bundled Redis objects of a rendered chart, as the dev overlay's redis.yaml."""
    with open(a.rendered, encoding="utf-8") as f:
        text = f.read()
    keep = []
    for d in re.split(r"(?m)^---\s*$", text):
        src = re.search(r"(?m)^# Source: (\S+)", d)
        if not src:
            continue
        src = src.group(1)
        if src.endswith("/redis-bundled.yaml") or (
                src.endswith("/networkpolicy.yaml") and re.search(r"(?m)^  name: presence-redis$", d)):
            keep.append(d.strip("\n"))
    print(a.header)
    print("# The bundled development Redis Cluster of the dev overlay (chart values: values.yaml).")
    for d in keep:
        print("---")
        print(d)
    return 0


def _k8s_objects(path):
    out = {}
    for d in load_docs(path):
        md = d.get("metadata", {})
        md.pop("namespace", None)
        tmpl = d.get("spec", {}).get("template", {}).get("metadata", {})
        ann = tmpl.get("annotations")
        if ann is not None:
            ann.pop("checksum/config", None)
            if not ann:
                tmpl.pop("annotations")
        key = f"{d['kind']}/{md['name']}"
        if key in out:
            sys.exit(f"duplicate object {key} in {path}")
        out[key] = d
    return out


def cmd_k8s_compare(a):
    """Kustomized manifests == helm template, as data (namespace and config checksum aside)."""
    kust, helm = _k8s_objects(a.kustomized), _k8s_objects(a.helm)
    what, bad = a.what, False
    for key in sorted(set(kust) | set(helm)):
        if key not in kust:
            print(f"  {what}: {key} is rendered by the chart but missing from the manifests")
            bad = True
        elif key not in helm:
            print(f"  {what}: {key} is in the manifests but not rendered by the chart")
            bad = True
        elif kust[key] != helm[key]:
            bad = True
            x = json.dumps(kust[key], indent=1, sort_keys=True, ensure_ascii=False).splitlines()
            y = json.dumps(helm[key], indent=1, sort_keys=True, ensure_ascii=False).splitlines()
            print(f"  {what}: {key} differs (--- manifests, +++ chart):")
            for line in list(difflib.unified_diff(x, y, "manifests", "chart", lineterm="", n=2))[:60]:
                print("    " + line)
    print(f"  {what}: {len(kust)} objects, " + ("DRIFT" if bad else "equal to the chart"))
    return 1 if bad else 0


# ----------------------------------------------------------------------- Prometheus


def prom_get(url, query):
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}") as r:
        return json.load(r)


def cmd_prom_value(a):
    """The single value of an instant query ("" when the result is empty or on an error)."""
    try:
        res = prom_get(a.url, a.query)["data"]["result"]
    except Exception:  # noqa: BLE001 (the caller polls until the answer is right)
        res = []
    print(res[0]["value"][1] if res else "")
    return 0


def cmd_prom_dashboard(a):
    """Every dashboard query runs in Prometheus; the "Online users" stat answers WANT."""
    with open(a.dashboard, encoding="utf-8") as f:
        dash = json.load(f)
    errors, n, online = [], 0, None
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            q = t["expr"].replace("$namespace", ".*").replace("$role", ".*").replace("$__rate_interval", "1m")
            n += 1
            try:
                body = prom_get(a.url, q)
            except Exception as e:  # noqa: BLE001 (HTTP 400 on a parse error)
                errors.append(f"{panel['title']}: {q}: {e}")
                continue
            if body.get("status") != "success":
                errors.append(f"{panel['title']}: {q}: {body}")
            if panel["title"] == "Online users":
                res = body["data"]["result"]
                online = res[0]["value"][1] if res else ""
    print(f'{n} dashboard queries ran; "Online users" = {online}')
    for e in errors:
        print("ERROR", e)
    return 1 if errors or online != a.want else 0


def cmd_prom_rules(a):
    """Every alert rule loaded in Prometheus is healthy and none fires."""
    with urllib.request.urlopen(f"{a.url}/api/v1/rules") as r:
        groups = json.load(r)["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    unhealthy = [f"{r['name']}: {r.get('lastError') or r['health']}" for r in rules if r["health"] != "ok"]
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    print(f"{len(rules)} rules evaluated")
    for b in unhealthy:
        print("unhealthy:", b)
    for f in firing:
        print("firing:", f)
    return 1 if unhealthy or firing or not rules else 0


# ----------------------------------------------------------------------- misc


def cmd_free_ports(a):
    socks = []
    for _ in range(a.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="chart_checks.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")

    def add(name, func, help_text, *positionals):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.set_defaults(func=func)
        for arg in positionals:
            s.add_argument(arg)
        return s

    s = add("rendered", cmd_rendered, "check the objects a variant of the chart renders")
    s.add_argument("variant", choices=sorted(RENDERED))
    s.add_argument("manifests", help="output of helm template")
    add("carried", cmd_carried,
        "PrometheusRule spec == the rules file and dashboard ConfigMap == the dashboard JSON",
        "manifests", "rules", "dashboard")
    add("rule-spec", cmd_rule_spec, "print the spec of the rendered PrometheusRule (YAML)", "manifests")
    s = add("metric-names", cmd_metric_names,
            "every metric named by the dashboard, the alerts and the HPA is in the scrapes", "chart")
    s.add_argument("scrapes", nargs="+", help="/metrics scrapes of the running service")
    s = add("ct-layout", cmd_ct_layout, "ct.yaml and the ci/*-values.yaml layout of chart-testing")
    s.add_argument("--ct-yaml", default=os.path.join(REPO, "ct.yaml"))
    s.add_argument("--chart", default=CHART)
    s = add("settings", cmd_settings, "every PRESENCE_* setting of src/config.rs is set by the chart")
    s.add_argument("--chart", default=CHART)
    s = add("readme", cmd_readme, "generate (--write) or check (--check) the chart's README.md")
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    s.add_argument("--chart", default=CHART)
    add("k8s-dev-redis", cmd_k8s_dev_redis, "the dev overlay's redis.yaml from a rendered chart",
        "rendered", "header")
    add("k8s-compare", cmd_k8s_compare, "kustomized manifests == helm template, as data",
        "kustomized", "helm", "what")
    add("prom-value", cmd_prom_value, "the single value of a Prometheus instant query", "url", "query")
    s = add("prom-dashboard", cmd_prom_dashboard, "run every dashboard query in Prometheus", "url", "dashboard")
    s.add_argument("want", help='the expected value of the "Online users" stat')
    add("prom-rules", cmd_prom_rules, "every alert rule loaded in Prometheus is healthy, none firing", "url")
    s = add("free-ports", cmd_free_ports, "N distinct free TCP ports on 127.0.0.1")
    s.add_argument("n", type=int)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
