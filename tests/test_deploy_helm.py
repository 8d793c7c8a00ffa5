"""deploy/helm/tiffin: `helm lint` clean, and for every values file the manifests Helm renders
are valid Kubernetes objects (kubernetes-validate's bundled schemas, strict, at the chart's
oldest supported version and the newest) that fit together and fit Tiffin: ports, probes, the
config the pods serve, the grace period against the drain timeout, the autoscaling metric."""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from omegaconf import OmegaConf

import handlers
from runtime.app import Runtime
from runtime.config import compose, load_config_file
from runtime.config_changes import plan_changes
from runtime.config_schema import ServerConfig
from runtime.reconfigure import resolved
from runtime.telemetry.metrics import Metrics
from tests.helm_chart import (
    CHART,
    RELEASE,
    VALUES_FILES,
    by_kind,
    containers,
    render,
    values_file,
)

KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
SERVER = ServerConfig()


@pytest.fixture(scope="module", params=VALUES_FILES)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(values_file(request.param))


def config_map_data(manifests: list[dict[str, Any]]) -> dict[str, str]:
    data = by_kind(manifests, "ConfigMap")[RELEASE]["data"]
    assert isinstance(data, dict)
    return data


def env_of(container: dict[str, Any], manifests: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment, ConfigMap references resolved (Secrets stay out)."""
    data = config_map_data(manifests)
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = data[item["valueFrom"]["configMapKeyRef"]["key"]]
    return env


def served_config(container: dict[str, Any], manifests: list[dict[str, Any]], tmp: Path) -> Any:
    """The config the container serves, loaded as bentos/service.py loads it."""
    env = env_of(container, manifests)
    if "TIFFIN_CONFIG" in env:
        mount = next(
            m for m in container["volumeMounts"] if env["TIFFIN_CONFIG"].startswith(m["mountPath"])
        )
        assert env["TIFFIN_CONFIG"] == f"{mount['mountPath']}/config.yaml"
        path = tmp / "config.yaml"
        live = by_kind(manifests, "ConfigMap")[f"{RELEASE}-config"]["data"]
        path.write_text(live["config.yaml"])
        return load_config_file(path)
    return compose([f"env={env['TIFFIN_ENV']}", *shlex.split(env["TIFFIN_OVERRIDES"])])


def test_helm_lint_is_clean() -> None:
    for name in VALUES_FILES:
        result = helm.lint(str(CHART), values_file(name), strict=True)
        assert result["errors"] == [], (name, result)
        assert not [m for m in result["messages"] if m["severity"] > 1], (name, result)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_match_kubernetes_schemas(
    rendered: tuple[str, list[dict[str, Any]]], version: str
) -> None:
    _, manifests = rendered
    assert manifests
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_schemas_catch_a_wrong_field() -> None:
    deployment = by_kind(render({}), "Deployment")[RELEASE]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_resources_each_values_file_asks_for(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, manifests = rendered
    values = {**yaml.safe_load((CHART / "values.yaml").read_text())}
    for key, value in values_file(name).items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    deployments = by_kind(manifests, "Deployment")
    services = by_kind(manifests, "Service")
    assert set(deployments) == {RELEASE} | (
        {f"{RELEASE}-gpu"} if values["gpu"]["enabled"] else set()
    )
    expected_services = {RELEASE, f"{RELEASE}-grpc"}
    if values["gpu"]["enabled"]:
        expected_services |= {f"{RELEASE}-gpu", f"{RELEASE}-gpu-grpc"}
    assert set(services) == expected_services
    assert bool(by_kind(manifests, "HorizontalPodAutoscaler")) == values["autoscaling"]["enabled"]
    assert bool(by_kind(manifests, "Ingress")) == values["ingress"]["enabled"]
    assert (
        bool(by_kind(manifests, "PodDisruptionBudget")) == values["podDisruptionBudget"]["enabled"]
    )
    assert bool(by_kind(manifests, "Secret")) == (not values["secret"]["existingSecret"])


def test_pods_serve_a_valid_config_and_outlive_the_drain(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Each container's config builds a Runtime as the service does (the integrations exist,
    the keys are in the schema, graceful_timeout_s clears the drain), and its grace period
    exceeds the drain timeout it serves with."""
    _, manifests = rendered
    for deployment, container in containers(manifests):
        cfg = served_config(container, manifests, tmp_path)
        Runtime(cfg, builtins=handlers.builtin_plugins())
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > cfg.server.drain_timeout_s, deployment["metadata"]["name"]
        # ... and the gRPC server's graceful stop after it: Kubernetes kills nothing mid-way.
        assert grace > cfg.server.graceful_timeout_s, deployment["metadata"]["name"]
        assert cfg.server.grpc_port == SERVER.grpc_port
        # The gRPC server binds server.host: reachable from outside the container.
        assert cfg.server.host == "0.0.0.0"


def test_ports_probes_and_selectors(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, manifests = rendered
    services = by_kind(manifests, "Service")
    for deployment, container in containers(manifests):
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        # BentoML serves HTTP on 3000 in its image; gRPC on server.grpc_port.
        assert ports == {"http": SERVER.http_port, "grpc": SERVER.grpc_port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        selected = {
            name
            for name, service in services.items()
            if service["spec"]["selector"].items() <= labels.items()
        }
        assert {
            port["targetPort"] for name in selected for port in services[name]["spec"]["ports"]
        } == {
            "http",
            "grpc",
        }, deployment["metadata"]["name"]
    for budget in by_kind(manifests, "PodDisruptionBudget").values():
        api = by_kind(manifests, "Deployment")[RELEASE]
        labels = api["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for ingress in by_kind(manifests, "Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services
                names = {port["name"] for port in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"]["name"] in names


def test_gpu_runner_asks_for_gpus() -> None:
    manifests = render(values_file("values-prod.yaml"))
    deployment = by_kind(manifests, "Deployment")[f"{RELEASE}-gpu"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].startswith("tiffin-gpu:")
    env = env_of(container, manifests)
    assert "serving.topology=split" in shlex.split(env["TIFFIN_OVERRIDES"])
    api = by_kind(manifests, "Deployment")[RELEASE]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in api["resources"].get("limits", {})


def test_hpa_scales_the_api_on_cpu_and_queue_depth() -> None:
    manifests = render(values_file("values-prod.yaml"))
    (hpa,) = by_kind(manifests, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] in by_kind(manifests, "Deployment")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    name = metrics["Pods"]["pods"]["metric"]["name"]
    # The gauge Tiffin exports under that name.
    assert Metrics().queue_depth.describe()[0].name == name


def test_resolved_config_goes_through_the_config_map(tmp_path: Path) -> None:
    """`config` (a resolved config file, as `python -m runtime` writes it) is mounted and named
    by TIFFIN_CONFIG, and the container loads exactly that config."""
    cfg = compose(["env=prod", "integrations=custom_models,database", "server.drain_timeout_s=12"])
    manifests = render({"config": OmegaConf.to_yaml(cfg)})
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBE_VERSIONS[-1], strict=True)
    (_, container), *_ = containers(manifests)
    served = served_config(container, manifests, tmp_path)
    assert OmegaConf.to_container(served) == OmegaConf.to_container(cfg)
    assert served.server.drain_timeout_s == 12


def pod_annotations(manifests: list[dict[str, Any]]) -> dict[str, str]:
    deployment = by_kind(manifests, "Deployment")[RELEASE]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert isinstance(annotations, dict)
    return annotations


def test_a_config_change_is_applied_by_the_pods_unless_it_needs_a_restart(
    tmp_path: Path,
) -> None:
    """Changing `config` changes only the mounted ConfigMap, which the pods watch and apply
    (TIFFIN_CONFIG_WATCH_S), unless what changed needs a restart: then the pod template's
    checksum changes and Kubernetes rolls the pods."""
    base = ["env=prod", "integrations=custom_models"]

    def rendered(*overrides: str) -> list[dict[str, Any]]:
        return render({"config": OmegaConf.to_yaml(compose([*base, *overrides]))})

    before = rendered()
    (_, container), *_ = containers(before)
    assert env_of(container, before)["TIFFIN_CONFIG_WATCH_S"] == "10"
    mount = next(v for v in container["volumeMounts"] if v["name"] == "config")
    assert "subPath" not in mount  # a subPath mount would never see the ConfigMap's updates
    for live in ("limits.max_tokens=64", "logging.level=ERROR", "auth.cache_ttl_s=9"):
        after = rendered(live)
        assert pod_annotations(after) == pod_annotations(before), live
        assert served_config(containers(after).__next__()[1], after, tmp_path) != served_config(
            container, before, tmp_path
        )
    for restart in ("server.workers=3", "transports.grpc=false", "telemetry.metrics=false"):
        after = rendered(restart)
        changed = pod_annotations(after)["checksum/config-restart"]
        assert changed != pod_annotations(before)["checksum/config-restart"], restart


def test_secret_values_reach_the_pods_by_reference() -> None:
    manifests = render(
        {"secret": {"data": {"TIFFIN_API_KEY": "k-1", "DATABASE_URL": "postgresql://u:p@db/t"}}}
    )
    secret = by_kind(manifests, "Secret")[RELEASE]
    assert secret["stringData"] == {
        "TIFFIN_API_KEY": "k-1",
        "DATABASE_URL": "postgresql://u:p@db/t",
    }
    for _, container in containers(manifests):
        assert container["envFrom"] == [{"secretRef": {"name": RELEASE}}]
        assert "k-1" not in str(container)
    existing = render({"secret": {"existingSecret": "mine"}})
    assert not by_kind(existing, "Secret")
    for _, container in containers(existing):
        assert container["envFrom"] == [{"secretRef": {"name": "mine"}}]


def test_chart_refuses_a_grace_period_inside_the_drain() -> None:
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({"server": {"drainTimeoutSeconds": 60}, "terminationGracePeriodSeconds": 60})


def test_values_schema_refuses_a_misspelt_key() -> None:
    """values.schema.json: each values file renders (above), a typo does not."""
    with pytest.raises(helm.HelmError, match="autoscalng"):
        render({"autoscalng": {"enabled": True}})
    with pytest.raises(helm.HelmError, match="gpusPerPod"):
        render({"gpu": {"enabled": True, "gpusPerPod": 0}})


def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*prefix, str(key)))
    else:
        yield prefix


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        return [*value, "x"]
    return f"{value}x"


def test_every_key_that_needs_a_restart_rolls_the_pods() -> None:
    """The chart's restart-only list (tiffin.restartConfig) covers every key the server refuses
    to change live (runtime/config_changes.py): each such key, changed, changes the checksum."""
    cfg = compose(["env=prod", "integrations=custom_models"])
    base = resolved(cfg)
    checksum = pod_annotations(render({"config": yaml.safe_dump(base)}))["checksum/config-restart"]
    first_route = next(iter(base["handlers"]["routes"]))
    checked = 0
    live = ("integrations", "auth", "limits")  # planned per item, never a restart
    for path in _leaves({k: v for k, v in base.items() if k not in live}):
        if path[:2] == ("handlers", "routes") and path[2] != first_route:
            continue  # one route stands for all
        changed = copy.deepcopy(base)
        node = changed
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _changed(node[path[-1]])
        if not plan_changes(base, changed).restart_required:
            continue
        rendered = render({"config": yaml.safe_dump(changed)})
        assert pod_annotations(rendered)["checksum/config-restart"] != checksum, ".".join(path)
        checked += 1
    assert checked > 20
