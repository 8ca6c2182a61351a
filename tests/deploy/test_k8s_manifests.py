"""Policy over the rendered overlays (dev and prod): what every Deployment must carry (probes,
resources, security context), and which traffic the NetworkPolicies let through."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from compute_local.config import Settings as ComputeLocalSettings
from compute_modal.config import Settings as ComputeModalSettings
from compute_runpod.config import Settings as ComputeRunpodSettings
from keyvault.config import Settings as KeyvaultSettings
from scheduler.config import Settings as SchedulerSettings

Resource = dict[str, Any]

OVERLAY_NAMES = ["dev", "prod"]
GRPC_SERVICES = {
    # deployment: (gRPC port from docs/services.md, readiness name the health servicer sets)
    "scheduler": (50051, "influence.v1.Scheduler"),
    "keyvault": (50052, "influence.v1.KeyVault"),
    "compute-local": (50053, "influence.v1.ComputeProvider"),
    "compute-runpod": (50054, "influence.v1.ComputeProvider"),
    "compute-modal": (50055, "influence.v1.ComputeProvider"),
}
GATEWAY_PORT = 8080
POSTGRES_PORT = 5432
# The longest a service's own shutdown may take after SIGTERM (its settings' defaults).
SHUTDOWN_GRACE_S = {
    "scheduler": SchedulerSettings.model_fields["scheduler_shutdown_grace_s"].default,
    "keyvault": KeyvaultSettings.model_fields["keyvault_shutdown_grace_s"].default,
    "compute-local": ComputeLocalSettings.model_fields["compute_local_shutdown_grace_s"].default
    + ComputeLocalSettings.model_fields["compute_local_cancel_grace_s"].default,
    "compute-runpod": ComputeRunpodSettings.model_fields["shutdown_grace_s"].default,
    "compute-modal": ComputeModalSettings.model_fields["shutdown_grace_s"].default,
}
PRIVATE_RANGES = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def workloads(resources: list[Resource]) -> list[tuple[str, Resource]]:
    """(name, pod template) of every Deployment, StatefulSet and Job."""
    return [
        (r["metadata"]["name"], r["spec"]["template"])
        for r in resources
        if r["kind"] in {"Deployment", "StatefulSet", "Job"}
    ]


@pytest.fixture(params=OVERLAY_NAMES)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Resource]]) -> list[Resource]:
    return rendered[request.param]


def test_both_overlays_are_rendered(rendered: dict[str, list[Resource]]) -> None:
    assert set(OVERLAY_NAMES) <= set(rendered)


def test_every_service_has_a_deployment_service_account_and_service(overlay: list[Resource]) -> None:
    for name in [*GRPC_SERVICES, "gateway"]:
        deployment = named(overlay, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name
        assert named(overlay, "ServiceAccount", name)["automountServiceAccountToken"] is False
        assert pod["automountServiceAccountToken"] is False
        service = named(overlay, "Service", name)
        assert (
            service["spec"]["selector"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )


def test_every_workload_is_hardened(overlay: list[Resource]) -> None:
    for name, template in workloads(overlay):
        pod = template["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0, name
        assert isinstance(context["runAsGroup"], int) and context["runAsGroup"] > 0, name
        assert context["fsGroup"] == context["runAsGroup"], name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources[bound].keys(), f"{where} {bound}"
            # A read-only root filesystem still needs a writable temporary directory.
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp, f"{where} mounts nothing at /tmp"
            volume = next(v for v in pod["volumes"] if v["name"] == tmp[0]["name"])
            assert "emptyDir" in volume, where


@pytest.mark.parametrize("name", sorted(GRPC_SERVICES))
def test_grpc_probes_use_numeric_ports_and_health_names(overlay: list[Resource], name: str) -> None:
    port, readiness_name = GRPC_SERVICES[name]
    deployment = named(overlay, "Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    grpc_ports = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    assert grpc_ports == [port]
    for probe_name, expected_service in [
        ("startupProbe", ""),
        ("livenessProbe", ""),
        ("readinessProbe", readiness_name),
    ]:
        probe = container[probe_name]["grpc"]
        assert type(probe["port"]) is int and probe["port"] == port, f"{name} {probe_name}"
        assert probe.get("service", "") == expected_service, f"{name} {probe_name}"


def test_gateway_probes_its_health_endpoints(overlay: list[Resource]) -> None:
    (container,) = named(overlay, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": GATEWAY_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": GATEWAY_PORT}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("name", sorted(SHUTDOWN_GRACE_S))
def test_termination_grace_outlasts_the_service_shutdown(overlay: list[Resource], name: str) -> None:
    pod = named(overlay, "Deployment", name)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > SHUTDOWN_GRACE_S[name]


def test_service_ports_are_named_with_app_protocol(overlay: list[Resource]) -> None:
    for service in of_kind(overlay, "Service"):
        for port in service["spec"]["ports"]:
            assert port["port"] == port["targetPort"], service["metadata"]["name"]
            assert port.get("appProtocol"), f"{service['metadata']['name']}:{port['name']}"
        names = {p["name"]: p for p in service["spec"]["ports"]}
        if service["metadata"]["name"] in GRPC_SERVICES:
            assert names["grpc"]["appProtocol"] == "grpc"
            assert names["grpc"]["port"] == GRPC_SERVICES[service["metadata"]["name"]][0]
    assert named(overlay, "Service", "gateway")["spec"]["ports"][0]["name"] == "http"


def test_every_deployment_has_a_disruption_budget_and_the_gateway_an_autoscaler(
    overlay: list[Resource],
) -> None:
    budgets = of_kind(overlay, "PodDisruptionBudget")
    for deployment in of_kind(overlay, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets), (
            deployment["metadata"]["name"]
        )
    hpa = named(overlay, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert "replicas" not in named(overlay, "Deployment", "gateway")["spec"]


def test_a_job_applies_the_scheduler_migrations(overlay: list[Resource]) -> None:
    job = named(overlay, "Job", "scheduler-migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "scheduler", "migrate"]
    scheduler_image = named(overlay, "Deployment", "scheduler")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    assert container["image"] == scheduler_image
    database = next(e for e in container["env"] if e["name"] == "DATABASE_URL")
    assert database["valueFrom"]["secretKeyRef"]["key"] == "DATABASE_URL"


def test_secrets_come_from_secret_objects_only(overlay: list[Resource]) -> None:
    secret_like = ("DATABASE_URL", "_SECRET", "_SECRETS", "_TOKEN", "_TOKENS", "_API_KEY", "PASSWORD")
    for name, template in workloads(overlay):
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"].endswith(secret_like):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} is a literal"
    for config_map in of_kind(overlay, "ConfigMap"):
        leaked = [key for key in config_map.get("data", {}) if key.endswith(secret_like)]
        assert not leaked, f"ConfigMap {config_map['metadata']['name']} holds {leaked}"


def test_prod_keeps_no_secret_values_and_pins_images(rendered: dict[str, list[Resource]]) -> None:
    prod = rendered["prod"]
    assert of_kind(prod, "Secret") == []
    for name, template in workloads(prod):
        for container in template["spec"]["containers"]:
            image = container["image"]
            registry, _, tag = image.rpartition(":")
            assert "/" in registry and tag and tag != "latest", f"{name}: {image} is not pinned"
    config = of_kind(prod, "ConfigMap")[0]["data"]
    assert config["AUTH_MODE"] == "jwt" and config["JWT_ISSUER"] and config["JWT_AUDIENCE"]


def test_modal_is_the_hosted_default_of_prod(rendered: dict[str, list[Resource]]) -> None:
    """The original document keeps Modal the hosted default; prod routes the hosted backend there,
    and compute-modal, which serves it, gets the operator's Modal token from its Secret."""
    config = of_kind(rendered["prod"], "ConfigMap")[0]["data"]
    assert config["HOSTED_PROVIDER"] == "modal"
    (container,) = named(rendered["prod"], "Deployment", "compute-modal")["spec"]["template"]["spec"][
        "containers"
    ]
    secrets = {
        source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source
    }
    assert "compute-modal-secrets" in secrets


def test_prod_runs_more_replicas_behind_a_tls_ingress(rendered: dict[str, list[Resource]]) -> None:
    prod, dev = rendered["prod"], rendered["dev"]
    prod_hpa = named(prod, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert prod_hpa["minReplicas"] > named(dev, "HorizontalPodAutoscaler", "gateway")["spec"]["minReplicas"]
    assert named(prod, "Deployment", "keyvault")["spec"]["replicas"] >= 2
    scheduler = named(prod, "Deployment", "scheduler")
    assert scheduler["spec"]["replicas"] == 2
    (container,) = scheduler["spec"]["template"]["spec"]["containers"]
    replica_id = next(e for e in container["env"] if e["name"] == "SCHEDULER_REPLICA_ID")
    assert replica_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    budget = named(prod, "PodDisruptionBudget", "scheduler")["spec"]
    assert budget["maxUnavailable"] == 1
    pod_labels = scheduler["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    ingress = named(prod, "Ingress", "gateway")["spec"]
    hosts = {host for tls in ingress["tls"] for host in tls["hosts"]}
    assert {rule["host"] for rule in ingress["rules"]} <= hosts
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gateway", "port": {"name": "http"}}
    assert of_kind(prod, "StatefulSet") == []


def test_dev_runs_postgres_with_obviously_fake_secrets(rendered: dict[str, list[Resource]]) -> None:
    dev = rendered["dev"]
    assert named(dev, "StatefulSet", "postgres")["spec"]["replicas"] == 1
    named(dev, "Service", "postgres")
    for secret in of_kind(dev, "Secret"):
        for key, encoded in secret.get("data", {}).items():
            value = base64.b64decode(encoded).decode()
            if key.endswith("ENCRYPTION_SECRET"):  # a base64 master key
                value = base64.b64decode(value).decode(errors="replace")
            assert value == "" or "dev-only" in value or key in {"POSTGRES_USER", "POSTGRES_DB"}, (
                f"{secret['metadata']['name']}: {key} does not look like a development value"
            )


# ---- NetworkPolicies ------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert "matchExpressions" not in selector, "these checks only understand matchLabels"
    return selector.get("matchLabels", {}).items() <= labels.items()


def peer_name(peer: dict[str, Any]) -> str:
    """A readable name for a NetworkPolicy peer: pod:<name>, namespace:<name>, internet or dns."""
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        assert block["cidr"] == "0.0.0.0/0" and PRIVATE_RANGES <= set(block["except"]), block
        return "internet"
    namespace = peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
    pod = peer.get("podSelector", {}).get("matchLabels", {})
    if namespace == "kube-system" and pod == {"k8s-app": "kube-dns"}:
        return "dns"
    if namespace:
        assert not pod, peer
        return f"namespace:{namespace}"
    return f"pod:{pod['app.kubernetes.io/name']}"


def allowed(policies: list[Resource], labels: dict[str, str], direction: str) -> set[tuple[str, int]]:
    """(peer, port) pairs the policies selecting a pod with ``labels`` allow in ``direction``
    ('ingress' or 'egress'); an egress rule without `to` is the peer 'any'."""
    pairs: set[tuple[str, int]] = set()
    for policy in policies:
        spec = policy["spec"]
        if not selects(spec["podSelector"], labels):
            continue
        for rule in spec.get(direction, []):
            peers = rule.get("from" if direction == "ingress" else "to")
            names = [peer_name(p) for p in peers] if peers else ["any"]
            for port in rule["ports"]:
                last = port.get("endPort", port["port"])
                for number in range(port["port"], last + 1):
                    pairs.update((name, number) for name in names)
    return pairs


EXPECTED_INGRESS = {
    "gateway": {("namespace:ingress-nginx", GATEWAY_PORT)},
    "scheduler": {("pod:gateway", 50051)},
    "keyvault": {
        ("pod:gateway", 50052),
        ("pod:scheduler", 50052),
        ("pod:compute-runpod", 50052),
        ("pod:compute-modal", 50052),  # researchers' Hugging Face tokens (issue 24)
    },
    "compute-local": {("pod:scheduler", 50053)},
    "compute-runpod": {("pod:scheduler", 50054)},
    "compute-modal": {("pod:scheduler", 50055)},
    "scheduler-migrate": set(),
}
EXPECTED_EGRESS = {
    "gateway": {("pod:scheduler", 50051), ("pod:keyvault", 50052)},
    "scheduler": {
        ("pod:compute-local", 50053),
        ("pod:compute-runpod", 50054),
        ("pod:compute-modal", 50055),
        ("pod:keyvault", 50052),
        ("any", POSTGRES_PORT),
        ("internet", 443),  # the S3-compatible artifact store
    },
    "keyvault": {("any", POSTGRES_PORT)},
    "compute-local": set(),
    "compute-runpod": {("pod:keyvault", 50052), ("internet", 443)},
    "compute-modal": {("pod:keyvault", 50052), ("internet", 443)},
    "scheduler-migrate": {("any", POSTGRES_PORT)},
}
DNS = {("dns", 53)}
# prod signs in through an identity provider: the gateway fetches its JWKS over HTTPS.
PROD_EGRESS = {"gateway": {("internet", 443)}}
METRICS_SCRAPE = {("namespace:monitoring", port) for port in range(9090, 9096)}


def pod_labels(overlay: list[Resource], name: str) -> dict[str, str]:
    return next(template["metadata"]["labels"] for n, template in workloads(overlay) if n == name)


def test_everything_is_denied_by_default(overlay: list[Resource]) -> None:
    deny = named(overlay, "NetworkPolicy", "default-deny-all")["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    dns = named(overlay, "NetworkPolicy", "allow-dns-egress")["spec"]
    assert dns["podSelector"] == {}
    assert {(p["protocol"], p["port"]) for p in dns["egress"][0]["ports"]} == {("UDP", 53), ("TCP", 53)}


@pytest.mark.parametrize("name", sorted(EXPECTED_INGRESS))
def test_network_policies_allow_exactly_the_intended_traffic(
    rendered: dict[str, list[Resource]], name: str
) -> None:
    for overlay_name in OVERLAY_NAMES:
        overlay = rendered[overlay_name]
        policies = of_kind(overlay, "NetworkPolicy")
        labels = pod_labels(overlay, name)
        ingress = allowed(policies, labels, "ingress")
        assert ingress - METRICS_SCRAPE == EXPECTED_INGRESS[name]
        extra = PROD_EGRESS.get(name, set()) if overlay_name == "prod" else set()
        assert allowed(policies, labels, "egress") == EXPECTED_EGRESS[name] | extra | DNS, overlay_name


def test_sign_in_is_jwt_unless_the_overlay_opts_into_local(
    rendered: dict[str, list[Resource]], rendered_base: list[Resource]
) -> None:
    (base_config,) = of_kind(rendered_base, "ConfigMap")
    assert base_config["data"]["AUTH_MODE"] == "jwt"
    dev = of_kind(rendered["dev"], "ConfigMap")[0]["data"]
    # dev's pod listens on 0.0.0.0: local sign-in there needs the explicit flag.
    assert (dev["AUTH_MODE"], dev["GATEWAY_ALLOW_INSECURE_LOCAL_SIGN_IN"]) == ("local", "true")
    prod = of_kind(rendered["prod"], "ConfigMap")[0]["data"]
    assert "GATEWAY_ALLOW_INSECURE_LOCAL_SIGN_IN" not in prod


def test_only_the_cloud_providers_and_the_artifact_store_client_reach_the_internet(
    rendered: dict[str, list[Resource]],
) -> None:
    for overlay_name in OVERLAY_NAMES:
        overlay = rendered[overlay_name]
        policies = of_kind(overlay, "NetworkPolicy")
        reach = {
            name
            for name, template in workloads(overlay)
            if any(
                peer == "internet" for peer, _ in allowed(policies, template["metadata"]["labels"], "egress")
            )
        }
        # The scheduler reaches the S3-compatible artifact store over HTTPS; prod's gateway its
        # identity provider.
        expected = {"compute-runpod", "compute-modal", "scheduler"} | set(
            PROD_EGRESS if overlay_name == "prod" else ()
        )
        assert reach == expected, overlay_name


def test_egress_ports_match_the_peer_services(overlay: list[Resource]) -> None:
    policies = of_kind(overlay, "NetworkPolicy")
    service_ports = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in of_kind(overlay, "Service")
    }
    for name, template in workloads(overlay):
        for peer, port in allowed(policies, template["metadata"]["labels"], "egress"):
            if peer.startswith("pod:"):
                assert port in service_ports[peer.removeprefix("pod:")], f"{name} -> {peer}:{port}"


def test_dev_postgres_accepts_only_the_database_users(rendered: dict[str, list[Resource]]) -> None:
    dev = rendered["dev"]
    policies = of_kind(dev, "NetworkPolicy")
    ingress = allowed(policies, pod_labels(dev, "postgres"), "ingress")
    assert ingress == {
        ("pod:scheduler", POSTGRES_PORT),
        ("pod:keyvault", POSTGRES_PORT),
        ("pod:scheduler-migrate", POSTGRES_PORT),
    }
    assert allowed(policies, pod_labels(dev, "postgres"), "egress") == DNS
