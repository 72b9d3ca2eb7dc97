"""Lints, renders and validates the Helm chart with the real Helm library (helm-sdkpy).

For the chart's default values and for each values file given:
  1. lint: Helm's own lint (chart file, values schema, every template rendered);
  2. render: a real `helm install` (Helm's engine, hooks and all) against a fake Kubernetes
     API served here on 127.0.0.1, with the release kept in memory; the fake cluster accepts
     only the kinds the chart may create and says every Job completed;
  3. validate: every object against the Kubernetes JSON schemas (kubernetes-validate,
     strict) of each version asked; CRDs (ServiceMonitor) have no schema there: skipped;
  4. check: what the chart promises (security contexts, probes, selectors that match,
     references to objects that exist, env without duplicates, NetworkPolicies on every pod).
Exits 1 on any problem. Run through infra/chart-lint.sh.
"""

import argparse
import asyncio
import copy
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

# --- The fake Kubernetes API ---------------------------------------------------------------

KINDS = {  # group -> version -> [(resource, kind)]
    "": {"v1": [("configmaps", "ConfigMap"), ("secrets", "Secret"), ("services", "Service"),
               ("serviceaccounts", "ServiceAccount"), ("pods", "Pod")]},
    "apps": {"v1": [("deployments", "Deployment")]},
    "batch": {"v1": [("jobs", "Job"), ("cronjobs", "CronJob")]},
    "autoscaling": {"v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")]},
    "policy": {"v1": [("poddisruptionbudgets", "PodDisruptionBudget")]},
    "networking.k8s.io": {"v1": [("networkpolicies", "NetworkPolicy"), ("ingresses", "Ingress")]},
    "monitoring.coreos.com": {"v1": [("servicemonitors", "ServiceMonitor")]},
}
OBJECT_PATH = re.compile(r"/(?:api|apis/[^/]+)/[^/]+/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?")


def kind_of(resource):
    for versions in KINDS.values():
        for resources in versions.values():
            for name, kind in resources:
                if name == resource:
                    return kind
    return None


class FakeApi(BaseHTTPRequestHandler):
    """Just enough of the API for `helm install`: discovery, the OpenAPI v3 index (saying the
    server validates fields itself), create, get (404 when absent), delete, list and watch."""

    protocol_version = "HTTP/1.1"
    server_version_info = {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
    store = {}

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def not_found(self, what):
        self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "reason": "NotFound", "message": f"{what} not found", "code": 404})

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def discovery(self, group, version):
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": [{"name": name, "singularName": kind.lower(), "namespaced": True,
                               "kind": kind, "verbs": ["create", "delete", "get", "list",
                                                       "patch", "update", "watch"]}
                              for name, kind in KINDS[group][version]]}

    def openapi(self, group, version):
        base = f"/apis/{group}/{version}" if group else f"/api/{version}"
        paths = {f"{base}/namespaces/{{namespace}}/{name}/{{name}}": {"patch": {
            "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {}}} for name, kind in KINDS[group][version]}
        return {"openapi": "3.0.0", "info": {"title": "fake", "version": version}, "paths": paths}

    def do_GET(self):
        url = urlparse(self.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/version":
            return self.reply(200, {**self.server_version_info, "platform": "linux/amd64"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = []
            for group, versions in KINDS.items():
                if group:
                    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
                    groups.append({"name": group, "versions": listed, "preferredVersion": listed[0]})
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        if path == "/openapi/v3":
            paths = {}
            for group, versions in KINDS.items():
                for version in versions:
                    key = f"apis/{group}/{version}" if group else f"api/{version}"
                    paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash=0"}
            return self.reply(200, {"paths": paths})
        match = re.fullmatch(r"/openapi/v3/(?:api|apis/([^/]+))/([^/]+)", path)
        if match and (match.group(1) or "") in KINDS:
            return self.reply(200, self.openapi(match.group(1) or "", match.group(2)))
        match = re.fullmatch(r"/(?:api|apis/([^/]+))/([^/]+)", path)
        if match and (match.group(1) or "") in KINDS and match.group(2) in KINDS[match.group(1) or ""]:
            return self.reply(200, self.discovery(match.group(1) or "", match.group(2)))
        match = OBJECT_PATH.fullmatch(path)
        if not match:
            return self.not_found(path)
        namespace, resource, name = match.groups()
        if name:
            found = self.store.get((resource, namespace, name))
            return self.reply(200, found) if found else self.not_found(name)
        items = [o for (r, n, _), o in self.store.items() if r == resource and n == namespace]
        if query.get("watch") not in (["true"], ["1"]):
            return self.reply(200, {"kind": f"{kind_of(resource)}List", "apiVersion": "v1",
                                    "metadata": {"resourceVersion": "1"}, "items": items})
        # A watch: the current objects, the end of the initial events, then silence.
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(kind, obj):
            data = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        if query.get("sendInitialEvents") == ["true"]:
            for obj in items:
                event("ADDED", obj)
            api_version = re.match(r"/(?:api/([^/]+)|apis/([^/]+/[^/]+))/", path)
            event("BOOKMARK", {"kind": kind_of(resource),
                               "apiVersion": api_version.group(1) or api_version.group(2),
                               "metadata": {"resourceVersion": "1", "annotations":
                                            {"k8s.io/initial-events-end": "true"}}})
        time.sleep(2)
        self.wfile.write(b"0\r\n\r\n")

    def do_POST(self):
        obj = self.read_body()
        match = OBJECT_PATH.fullmatch(urlparse(self.path).path)
        if not match or not kind_of(match.group(2)):
            return self.not_found(self.path)
        namespace, resource = match.group(1), match.group(2)
        meta = obj.setdefault("metadata", {})
        meta.update({"namespace": namespace, "resourceVersion": "1", "generation": 1,
                     "uid": f"uid-{resource}-{meta.get('name')}"})
        if obj.get("kind") == "Job":  # every hook Job "succeeds" at once
            obj["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        self.store[(resource, namespace, meta.get("name"))] = obj
        self.reply(201, obj)

    def do_DELETE(self):
        self.read_body()
        match = OBJECT_PATH.fullmatch(urlparse(self.path).path)
        key = (match.group(2), match.group(1), match.group(3)) if match else None
        if key in self.store:
            del self.store[key]
            return self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        self.not_found(self.path)


def fake_cluster():
    FakeApi.store = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    kubeconfig = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]})
    return server, kubeconfig


# --- Helm ----------------------------------------------------------------------------------

SEVERITY = {1: "INFO", 2: "WARNING", 3: "ERROR"}


def coalesce(base, override):
    """Helm's merge of values: maps merge, anything else replaces, null removes."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = coalesce(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lint(helm, chart, values, problems):
    """Helm's lint; helm-sdkpy lints a chart with its own values.yaml, so a copy of the
    chart gets the merged values. (helm-sdkpy does not pass the messages' text on.)"""
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = os.path.join(tmp, os.path.basename(chart.rstrip("/")))
        shutil.copytree(chart, copy_dir)
        if values:
            with open(os.path.join(chart, "values.yaml")) as f:
                defaults = yaml.safe_load(f) or {}
            with open(os.path.join(copy_dir, "values.yaml"), "w") as f:
                yaml.safe_dump(coalesce(defaults, values), f, sort_keys=False)
        result = asyncio.run(helm.Lint(helm.Configuration()).run(copy_dir))
    bad = 0
    for message in result.get("Messages") or []:
        severity = message.get("Severity", 0)
        if severity >= 2:
            bad += 1
            problems.append(f"lint {SEVERITY.get(severity, severity)} in {message.get('Path')}"
                            " (see the render step for the template error's text)")
    return f"{len(result.get('Messages') or [])} message(s), {bad} warning(s) or error(s)"


def render(helm, chart, values, namespace):
    server, kubeconfig = fake_cluster()
    try:
        config = helm.Configuration(namespace=namespace, kubeconfig=kubeconfig)
        release = asyncio.run(helm.Install(config).run(
            "relance", chart, values=values or None, wait=False, timeout=120))
    finally:
        server.shutdown()
    documents = []
    for source, manifest in [("release", release.get("manifest", ""))] + [
            (f"hook {h.get('path')}", h.get("manifest", "")) for h in release.get("hooks") or []]:
        for doc in yaml.safe_load_all(manifest):
            if doc:
                documents.append(doc)
    return documents, (release.get("info") or {}).get("notes", "")


# --- Validation ----------------------------------------------------------------------------

def validate_schemas(documents, versions, problems):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    checked, skipped = 0, set()
    for doc in documents:
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                checked += 1
            except SchemaNotFoundError:
                skipped.add(f"{doc['kind']} ({doc['apiVersion']})")
            except ValidationError as error:
                where = ".".join(str(p) for p in error.path)
                problems.append(f"schema {version}: {doc['kind']}/{doc['metadata']['name']}"
                                f" {where}: {error.message}")
    return checked, sorted(skipped)


def pod_templates(documents):
    for doc in documents:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "Job"):
            yield doc, spec["template"]
        elif kind == "CronJob":
            yield doc, spec["jobTemplate"]["spec"]["template"]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check(documents, networkpolicies_on, problems):
    def fail(doc, message):
        problems.append(f"check: {doc['kind']}/{doc['metadata']['name']}: {message}")

    by_kind = {}
    for doc in documents:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        name, limit = doc["metadata"]["name"], 52 if doc["kind"] == "CronJob" else 63
        if len(name) > limit or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
            fail(doc, f"name is not a DNS label of at most {limit} characters")
    configmaps, services = by_kind.get("ConfigMap", {}), by_kind.get("Service", {})
    deployments = by_kind.get("Deployment", {})
    pods = list(pod_templates(documents))

    for owner, template in pods:
        spec, labels = template["spec"], template["metadata"].get("labels", {})
        pod_security = spec.get("securityContext", {})
        if not (pod_security.get("runAsNonRoot") and pod_security.get("runAsUser") == 10001
                and pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
            fail(owner, "pod securityContext is not non-root 10001 with RuntimeDefault seccomp")
        if spec.get("automountServiceAccountToken") is not False:
            fail(owner, "mounts a ServiceAccount token")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume and volume["configMap"]["name"] not in configmaps:
                fail(owner, f"volume {volume['name']}: no ConfigMap {volume['configMap']['name']}")
        for container in spec["containers"]:
            security = container.get("securityContext", {})
            if not (security.get("allowPrivilegeEscalation") is False
                    and security.get("readOnlyRootFilesystem") is True
                    and "ALL" in security.get("capabilities", {}).get("drop", [])
                    and security.get("runAsNonRoot") is True):
                fail(owner, f"container {container['name']}: securityContext is not locked down")
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                fail(owner, f"container {container['name']}: /tmp is not an emptyDir")
            if not container.get("resources", {}).get("requests"):
                fail(owner, f"container {container['name']}: no resource requests")
            names = [e["name"] for e in container.get("env", [])]
            for duplicate in sorted({n for n in names if names.count(n) > 1}):
                fail(owner, f"container {container['name']}: env {duplicate} set twice")
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {}).get("name")
                if ref and ref not in configmaps:
                    fail(owner, f"envFrom: no ConfigMap {ref}")
            ports = {p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if owner["kind"] == "Deployment":
                    grpc = container.get(probe, {}).get("grpc")
                    if not grpc or grpc["port"] not in ports:
                        fail(owner, f"{probe} is not a gRPC probe on a container port")
        if networkpolicies_on and not any(
                selects(np["spec"]["podSelector"].get("matchLabels"), labels)
                for np in by_kind.get("NetworkPolicy", {}).values()):
            fail(owner, "no NetworkPolicy selects its pods")

    for name, deployment in deployments.items():
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not selects(deployment["spec"]["selector"]["matchLabels"], template_labels):
            fail(deployment, "selector does not match its pod labels")
        hpa = [h for h in by_kind.get("HorizontalPodAutoscaler", {}).values()
               if h["spec"]["scaleTargetRef"]["name"] == name]
        if hpa and "replicas" in deployment["spec"]:
            fail(deployment, "sets replicas although an HPA scales it")
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        if hpa["spec"]["scaleTargetRef"]["name"] not in deployments:
            fail(hpa, "scales a Deployment that does not exist")
    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        if not any(selects(pdb["spec"]["selector"]["matchLabels"],
                           d["spec"]["template"]["metadata"]["labels"]) for d in deployments.values()):
            fail(pdb, "selects no Deployment's pods")
    for np in by_kind.get("NetworkPolicy", {}).values():
        if not any(selects(np["spec"]["podSelector"].get("matchLabels"), t["metadata"].get("labels", {}))
                   for _, t in pods):
            fail(np, "selects no pod of the chart")

    def service_pods(service):
        return [t for _, t in pods if selects(service["spec"]["selector"], t["metadata"].get("labels", {}))]

    for service in services.values():
        matched = service_pods(service)
        if len(matched) != 1:
            fail(service, f"selects {len(matched)} pod templates, not 1")
            continue
        named = {p["name"] for c in matched[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            if isinstance(port["targetPort"], str) and port["targetPort"] not in named:
                fail(service, f"targetPort {port['targetPort']} is no container port")
    for ingress in by_kind.get("Ingress", {}).values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                target = services.get(backend["name"])
                if not target or backend["port"]["name"] not in {p["name"] for p in target["spec"]["ports"]}:
                    fail(ingress, f"backend {backend['name']}:{backend['port']} does not exist")
    for monitor in by_kind.get("ServiceMonitor", {}).values():
        selected = [s for s in services.values()
                    if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        if len(selected) != len(deployments) or not all(
                any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in selected):
            fail(monitor, "does not select every service's metrics port")
    for configmap in configmaps.values():
        for key, url in (configmap.get("data") or {}).items():
            if key.startswith("RELANCE_SERVICES__"):
                host, port = re.fullmatch(r"http://([^:/]+):(\d+)", url).groups()
                if host not in services or int(port) not in {p["port"] for p in services[host]["spec"]["ports"]}:
                    fail(configmap, f"{key} points at {url}, which no Service answers")


# --- Main ----------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chart")
    parser.add_argument("values", nargs="*", help="values files, each checked on its own")
    parser.add_argument("--kube-version", action="append", dest="versions",
                        help="Kubernetes version to validate against (repeatable)")
    parser.add_argument("--namespace", default="relance")
    parser.add_argument("--show", action="store_true", help="print the rendered manifests")
    args = parser.parse_args()
    versions = args.versions or ["1.27.0", "1.37.0"]
    import helm_sdkpy as helm

    failed = False
    for values_file in [None] + args.values:
        label = values_file or "default values"
        values = {}
        if values_file:
            with open(values_file) as f:
                values = yaml.safe_load(f) or {}
        problems = []
        print(f"== {label}")
        print(f"   lint: {lint(helm, args.chart, values, problems)}")
        try:
            documents, notes = render(helm, args.chart, values, args.namespace)
        except Exception as error:  # the install's error carries Helm's message
            problems.append(f"render: {error}")
            documents, notes = [], ""
        if documents:
            kinds = {}
            for doc in documents:
                kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
            print(f"   render: {len(documents)} objects: "
                  + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                  + f"; NOTES.txt {len(notes.splitlines())} lines")
            checked, skipped = validate_schemas(documents, versions, problems)
            print(f"   validate (Kubernetes {', '.join(versions)}, strict): {checked} checks"
                  + (f"; no schema, skipped: {', '.join(skipped)}" if skipped else ""))
            networkpolicies_on = any(d["kind"] == "NetworkPolicy" for d in documents)
            check(documents, networkpolicies_on, problems)
            if args.show:
                print(yaml.safe_dump_all(documents, sort_keys=False))
        for problem in problems:
            print(f"   FAIL {problem}")
        print(f"   {'FAILED' if problems else 'ok'}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
