#!/usr/bin/env python3
"""Checks of deploy/k8s/ that the Kubernetes schemas cannot make (run by
scripts/k8s-validate.sh, with the PyYAML kubernetes-validate brings):

- deploy/k8s/*.yaml holds only built-in kinds, so `kubectl apply -f deploy/k8s/` needs
  no CRD; the custom resources live in deploy/k8s/optional/;
- every resource is in the namespace the Namespace file creates;
- references resolve: the Secrets and keys the pods mount and the *_FILE variables name,
  the selectors of the Service, the PodDisruptionBudget and the NetworkPolicy, the
  ServiceMonitor's port, and the KEDA objects' target, authentication and secret;
- the custom resources (no schema here) have the fields their operators require.

Prints one line per problem and exits 1 when there is any.
"""

import pathlib
import sys

import yaml

BUILTIN_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}
SECRET_FILE_VARIABLES = ("DATABASE_URL_FILE", "AMQP_URL_FILE", "AMQP_CA_FILE",
                         "AMQP_CLIENT_CERT_FILE", "AMQP_CLIENT_KEY_FILE")

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def load(paths):
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((str(path), doc))
    return docs


def named(docs, kind, name):
    found = [d for _, d in docs if d.get("kind") == kind and d["metadata"].get("name") == name]
    return found[0] if found else None


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def secret_keys(secret):
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def check_pod(where, docs, pod_spec):
    """Every *_FILE variable points at a key of a Secret mounted in its container."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for container in pod_spec["containers"]:
        mounts = {}
        for mount in container.get("volumeMounts", []):
            secret = volumes.get(mount["name"], {}).get("secret")
            if secret is None:
                continue
            if secret.get("defaultMode") != 0o400:
                problem(where, f"secret volume {mount['name']} is not defaultMode 0400")
            target = named(docs, "Secret", secret["secretName"])
            if target is None:
                problem(where, f"mounts Secret {secret['secretName']}, which no file defines")
                continue
            mounts[mount["mountPath"].rstrip("/")] = secret_keys(target)
        for env in container.get("env", []):
            if env["name"] not in SECRET_FILE_VARIABLES:
                continue
            directory, _, key = env.get("value", "").rpartition("/")
            if key not in mounts.get(directory, set()):
                problem(where, f"{env['name']}={env.get('value')} is no key of a Secret mounted at {directory}")


def check_builtin(docs, namespace):
    deployment = next((d for _, d in docs if d["kind"] == "Deployment"), None)
    if deployment is None:
        problem("deploy/k8s", "no Deployment")
        return
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    if not matches(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        problem("Deployment", "selector does not match its pod labels")
    for where, doc in docs:
        kind = doc["kind"]
        if doc["apiVersion"] not in BUILTIN_API_VERSIONS:
            problem(where, f"{doc['apiVersion']} {kind} is not built in: move it to deploy/k8s/optional/")
        if kind != "Namespace" and doc["metadata"].get("namespace") != namespace:
            problem(where, f"{kind} {doc['metadata']['name']} is not in namespace {namespace}")
        if kind in ("Deployment", "Job"):
            check_pod(where, docs, doc["spec"]["template"]["spec"])
        if kind == "Service" and not matches(doc["spec"]["selector"], pod_labels):
            problem(where, "Service selects no replica")
        if kind == "PodDisruptionBudget" and not matches(doc["spec"]["selector"]["matchLabels"], pod_labels):
            problem(where, "PodDisruptionBudget selects no replica")
        if kind == "NetworkPolicy" and not matches(doc["spec"]["podSelector"]["matchLabels"], pod_labels):
            problem(where, "NetworkPolicy does not cover the replicas")


def check_optional(docs, builtin, namespace):
    service = next((d for _, d in builtin if d["kind"] == "Service"), {})
    for where, doc in docs:
        kind, spec = doc.get("kind"), doc.get("spec", {})
        if doc["metadata"].get("namespace") != namespace:
            problem(where, f"{kind} is not in namespace {namespace}")
        if doc["apiVersion"] == "keda.sh/v1alpha1" and kind == "ScaledObject":
            target = spec.get("scaleTargetRef", {})
            if named(builtin, target.get("kind", "Deployment"), target.get("name")) is None:
                problem(where, f"scaleTargetRef {target} is no resource of deploy/k8s/")
            if not 1 <= spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 0):
                problem(where, "needs 1 <= minReplicaCount <= maxReplicaCount")
            for trigger in spec.get("triggers", []):
                meta = trigger.get("metadata", {})
                if trigger.get("type") != "rabbitmq" or meta.get("mode") not in ("QueueLength", "MessageRate"):
                    problem(where, "a trigger is not rabbitmq with mode QueueLength or MessageRate")
                if not isinstance(meta.get("value"), str) or not meta.get("queueName"):
                    problem(where, "a rabbitmq trigger needs queueName and a string value")
                auth = trigger.get("authenticationRef", {}).get("name")
                if named(docs, "TriggerAuthentication", auth) is None:
                    problem(where, f"authenticationRef {auth} is defined nowhere")
            if not spec.get("triggers"):
                problem(where, "ScaledObject without triggers")
        elif doc["apiVersion"] == "keda.sh/v1alpha1" and kind == "TriggerAuthentication":
            for ref in spec.get("secretTargetRef", []):
                secret = named(builtin, "Secret", ref.get("name"))
                if ref.get("parameter") != "host" or secret is None or ref.get("key") not in secret_keys(secret):
                    problem(where, f"secretTargetRef {ref} is not parameter host of a defined Secret key")
        elif doc["apiVersion"] == "monitoring.coreos.com/v1" and kind == "ServiceMonitor":
            if not matches(spec.get("selector", {}).get("matchLabels", {}), service["metadata"]["labels"]):
                problem(where, "selector does not match the Service's labels")
            ports = {p["name"] for p in service["spec"]["ports"]}
            for endpoint in spec.get("endpoints", []):
                if endpoint.get("port") not in ports:
                    problem(where, f"endpoint port {endpoint.get('port')} is not a Service port")
        else:
            problem(where, f"{doc['apiVersion']} {kind}: no check for this kind; add one")


def main():
    root = pathlib.Path(sys.argv[1])
    builtin = load(sorted(root.glob("*.yaml")))
    optional = load(sorted((root / "optional").glob("*.yaml")))
    namespaces = [d["metadata"]["name"] for _, d in builtin if d.get("kind") == "Namespace"]
    if len(namespaces) != 1:
        print(f"{root}: needs exactly one Namespace, found {namespaces}")
        return 1
    for where, doc in builtin + optional:
        if not all(k in doc for k in ("apiVersion", "kind", "metadata")) or "name" not in doc["metadata"]:
            problem(where, "a document without apiVersion, kind or metadata.name")
            return report()
    check_builtin(builtin, namespaces[0])
    check_optional(optional, builtin, namespaces[0])
    return report()


def report():
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
