"""deploy/docker-compose*.yml: valid by the Compose specification's JSON schema (vendored in
tests/schemas/, see its README), and consistent with what the schema cannot see: the repo's
files they mount, the monitoring configs they run, Tiffin's ports, health and drain, and no
secret written into the production file."""

from __future__ import annotations

import itertools
import json
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

import handlers
from runtime.app import Runtime
from runtime.config import compose
from runtime.config_schema import ServerConfig
from tests.compose_files import (
    DEPLOY,
    ROOT,
    MissingVariable,
    bind_sources,
    container_ports,
    duration_s,
    interpolate,
    interpolate_string,
    load,
)

FILES = ["docker-compose.yml", "docker-compose.local.yml", "docker-compose.prod.yml"]
SCHEMA = json.loads((ROOT / "tests/schemas/compose-spec.json").read_text())
# What an operator would export for the production file; nothing else is set.
PROD_ENV = {
    "POSTGRES_PASSWORD": "pg-secret",
    "REDIS_PASSWORD": "redis-secret",
    "TIFFIN_API_KEY": "api-secret",
    "TIFFIN_ADMIN_KEY": "admin-secret",
}
SERVER = ServerConfig()


def resolved(name: str) -> dict[str, Any]:
    """The file as `docker compose` sees it with only PROD_ENV set."""
    result = interpolate(load(name), PROD_ENV)
    assert isinstance(result, dict)
    return result


def merged_dev_local() -> dict[str, Any]:
    """docker-compose.yml with docker-compose.local.yml layered on (Compose's merge: mappings
    merge key by key, other values are replaced)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(base[key], value) if key in base else value
            return out
        return over

    result = merge(resolved("docker-compose.yml"), resolved("docker-compose.local.yml"))
    assert isinstance(result, dict)
    return result


def tiffin_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in data["services"].items()
        if "TIFFIN_OVERRIDES" in service.get("environment", {})
    }


@pytest.mark.parametrize("name", FILES)
def test_file_matches_compose_spec_schema(name: str) -> None:
    jsonschema.validate(load(name), SCHEMA, cls=jsonschema.Draft7Validator)
    jsonschema.validate(resolved(name), SCHEMA, cls=jsonschema.Draft7Validator)


def test_schema_rejects_what_compose_rejects() -> None:
    """The vendored schema is the strict one: an unknown service key fails."""
    broken = load("docker-compose.yml")
    broken["services"]["tiffin"]["healthcheck"]["test_command"] = "curl"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("name", FILES)
def test_bind_mounts_name_repo_files(name: str) -> None:
    for service_name, service in load(name)["services"].items():
        for source, _ in bind_sources(service):
            path = (DEPLOY / source).resolve()
            assert path.exists(), f"{name}: {service_name} mounts missing {source}"
            assert ROOT in path.parents, f"{name}: {service_name} mounts {source} outside the repo"


@pytest.mark.parametrize("name", FILES)
def test_tiffin_ports_health_and_drain_match_the_server(name: str) -> None:
    data = merged_dev_local() if name == "docker-compose.local.yml" else resolved(name)
    services = tiffin_services(data)
    assert services, name
    for service_name, service in services.items():
        assert {SERVER.http_port, SERVER.grpc_port} <= container_ports(service), service_name
        test = service["healthcheck"]["test"]
        assert f"http://localhost:{SERVER.http_port}/readyz" in " ".join(test), service_name
        # The image is `bentoml containerize`'s: Python, no curl.
        assert test[:2] == ["CMD", "python"], service_name
        grace = duration_s(service["stop_grace_period"])
        assert grace > SERVER.drain_timeout_s, service_name
        assert grace > SERVER.graceful_timeout_s, service_name


@pytest.mark.parametrize("name", FILES)
def test_tiffin_overrides_compose_into_a_valid_config(name: str) -> None:
    """The default TIFFIN_ENV/TIFFIN_OVERRIDES of each file compose and build a Runtime, as
    bentos/service.py does."""
    data = merged_dev_local() if name == "docker-compose.local.yml" else resolved(name)
    for service in tiffin_services(data).values():
        environment = service["environment"]
        overrides = shlex.split(environment["TIFFIN_OVERRIDES"])
        cfg = compose([f"env={environment['TIFFIN_ENV']}", *overrides])
        Runtime(cfg, builtins=handlers.builtin_plugins())
        assert cfg.server.grpc_port == SERVER.grpc_port
        # The gRPC server binds server.host: reachable from outside the container.
        assert cfg.server.host == "0.0.0.0"
        assert cfg.server.drain_timeout_s == SERVER.drain_timeout_s


def test_monitoring_stack_wiring() -> None:
    """Prometheus and Alertmanager share Tiffin's network namespace, so the localhost targets of
    monitoring/prometheus.yml and monitoring/alertmanager.yml reach what they name; Grafana's
    datasource host is an alias of that namespace; every rule file Prometheus loads is mounted
    beside its config; Grafana's dashboard provider reads where the dashboards are mounted."""
    data = resolved("docker-compose.yml")
    services = data["services"]
    tiffin = services["tiffin"]
    prometheus_cfg = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    alertmanager_cfg = yaml.safe_load((ROOT / "monitoring/alertmanager.yml").read_text())
    published = container_ports(tiffin)

    for name in ("prometheus", "alertmanager"):
        assert services[name]["network_mode"] == "service:tiffin"
        assert name in tiffin["networks"]["default"]["aliases"]
    targets = [
        target
        for section in (
            *prometheus_cfg["scrape_configs"],
            *prometheus_cfg["alerting"]["alertmanagers"],
        )
        for static in section["static_configs"]
        for target in static["targets"]
    ]
    webhooks = [
        hook["url"]
        for receiver in alertmanager_cfg["receivers"]
        for hook in receiver.get("webhook_configs", [])
        if urlsplit(hook["url"]).hostname == "localhost"
    ]
    assert webhooks
    for target in [*targets, *(urlsplit(url).netloc for url in webhooks)]:
        host, _, port = target.partition(":")
        assert host == "localhost", target
        assert int(port) in published, f"{target}: nothing in tiffin's namespace publishes it"

    mounts = dict((target, source) for source, target in bind_sources(services["prometheus"]))
    config_target = next(
        arg.split("=", 1)[1]
        for arg in services["prometheus"]["command"]
        if arg.startswith("--config.file=")
    )
    assert Path(mounts[config_target]).name == "prometheus.yml"
    for rule_file in prometheus_cfg["rule_files"]:
        assert str(Path(config_target).parent / rule_file) in mounts, rule_file

    grafana_mounts = dict((t, s) for s, t in bind_sources(services["grafana"]))
    datasources_dir = DEPLOY / grafana_mounts["/etc/grafana/provisioning/datasources"]
    for file in datasources_dir.glob("*.yml"):
        for source in yaml.safe_load(file.read_text())["datasources"]:
            host = urlsplit(source["url"]).hostname
            assert host in tiffin["networks"]["default"]["aliases"], source["url"]
    providers_dir = DEPLOY / grafana_mounts["/etc/grafana/provisioning/dashboards"]
    for file in providers_dir.glob("*.yml"):
        for provider in yaml.safe_load(file.read_text())["providers"]:
            dashboards = DEPLOY / grafana_mounts[provider["options"]["path"]]
            assert list(dashboards.glob("*.json")), provider["options"]["path"]


def test_local_file_adds_gpus_and_ollama() -> None:
    base = load("docker-compose.yml")
    local = load("docker-compose.local.yml")
    data = merged_dev_local()
    for name in local["services"]:
        if name != "ollama":
            assert name in base["services"], f"{name} overrides nothing in docker-compose.yml"
    for name in ("tiffin", "ollama"):
        devices = data["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in device["capabilities"] for device in devices), name
    tiffin = data["services"]["tiffin"]
    url = urlsplit(tiffin["environment"]["OLLAMA_BASE_URL"])
    assert url.hostname == "ollama"
    assert url.port in container_ports(data["services"]["ollama"])
    assert "ollama" in tiffin["depends_on"]
    assert "ollama" in tiffin["environment"]["TIFFIN_OVERRIDES"]


SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "_KEY", "AUTH", "REQUIREPASS")


def is_required_variable(text: str) -> bool:
    """`${VAR:?message}`: the whole value comes from the environment, and must."""
    if not (text.startswith("${") and text.endswith("}") and text.count("${") == 1):
        return False
    try:
        interpolate_string(text, {})
    except MissingVariable:
        return True
    return False


def url_password(url: str) -> str:
    """The password of `scheme://user:password@host...`, variables in it left as written."""
    userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
    depth = 0
    for index, char in enumerate(userinfo):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == ":" and depth == 0:
            return userinfo[index + 1 :]
    return ""


def test_prod_writes_no_secret() -> None:
    """Every secret in the production file is a required variable: a value of a secret-named
    key, a password in a URL, the argument of --requirepass; and the file does not start
    without them."""
    raw = load("docker-compose.prod.yml")
    checked = 0
    for service_name, service in raw["services"].items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if any(word in key for word in SECRET_WORDS) and "URL" not in key:
                assert is_required_variable(value), f"{service_name}.{key} = {value!r}"
                checked += 1
            if key.endswith("_URL") and "@" in value:
                assert is_required_variable(url_password(value)), (
                    f"{service_name}.{key} = {value!r}"
                )
                checked += 1
        command = service.get("command", [])
        for flag, argument in itertools.pairwise(command):
            if flag.lstrip("-").upper() in SECRET_WORDS:
                assert is_required_variable(argument), f"{service_name}: {flag} {argument!r}"
                checked += 1
    assert checked >= 7
    with pytest.raises(MissingVariable):
        interpolate(raw, {})


def test_prod_runs_replicas_on_postgres_and_redis() -> None:
    data = resolved("docker-compose.prod.yml")
    services = data["services"]
    tiffin = services["tiffin"]
    assert int(tiffin["deploy"]["replicas"]) >= 2
    for port in tiffin["ports"]:
        host = str(port).rsplit(":", 1)[0]
        first, _, last = host.partition("-")
        assert last and int(last) - int(first) + 1 >= int(tiffin["deploy"]["replicas"]), port
    for name in ("postgres", "redis"):
        assert tiffin["depends_on"][name]["condition"] == "service_healthy"
        assert "test" in services[name]["healthcheck"]
    database = urlsplit(tiffin["environment"]["DATABASE_URL"])
    assert database.scheme == "postgresql" and database.hostname == "postgres"
    assert database.password == PROD_ENV["POSTGRES_PASSWORD"]
    assert database.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"]
    redis = urlsplit(tiffin["environment"]["REDIS_URL"])
    assert redis.hostname == "redis" and redis.password == PROD_ENV["REDIS_PASSWORD"]
    assert "database" in tiffin["environment"]["TIFFIN_OVERRIDES"]
    # Replicas share events and rate limits through Redis (the redis integration).
    assert "redis" in tiffin["environment"]["TIFFIN_OVERRIDES"]
