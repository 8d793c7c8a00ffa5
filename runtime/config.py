"""Structured-config schema for Tiffin and the one place that composes `conf/`.

The dataclasses here are stored in Hydra's ConfigStore as `schema`; `conf/config.yaml` lists it
first in its defaults, so every YAML layer merged on top is type-checked against them.
`compose()` is what the CLI, the BentoML service and the tests call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, cast

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runtime.config_errors import config_error
from runtime.errors import ConfigError
from runtime.graph import close_dependencies, start_order

CONFIG_MODULE = "conf"
CONFIG_NAME = "config"
INTEGRATIONS = "integrations"


class IntegrationType(StrEnum):
    """What kind of system an integration connects (the platform guide's `IntegrationType`)."""

    model_platform = "model_platform"
    monitoring = "monitoring"
    api = "api"
    external_service = "external_service"
    dev_tool = "dev_tool"
    # The platform guide spells the members in upper case; these are aliases of the same values.
    MODEL_PLATFORM = "model_platform"
    MONITORING = "monitoring"
    API = "api"
    EXTERNAL_SERVICE = "external_service"
    DEV_TOOL = "dev_tool"


class Topology(Enum):
    """Where GPU engines run: in the API process, or in their own BentoML runner service.
    (A plain Enum: a str one could not have a member named `split`.)"""

    embedded = "embedded"
    split = "split"


class LogFormat(StrEnum):
    console = "console"
    json = "json"


@dataclass
class RetryConfig:
    """How `initialize()` is retried: waits grow by `backoff_factor`, capped at `max_backoff`."""

    max_retries: int = 3  # 0: one attempt
    backoff_factor: float = 2.0
    max_backoff: float = 300.0
    initial_delay: float = 1.0


@dataclass
class IntegrationConfig:
    """One integration, as declared in `conf/integrations/<name>.yaml`."""

    _target_: str = MISSING  # the BaseIntegration class instantiated for it
    name: str = MISSING  # its key under `integrations`
    type: IntegrationType = IntegrationType.external_service  # the platform guide's kind
    enabled: bool = True  # false: declared but not started
    required: bool = False  # true: start fails (exit 1) and /readyz is 503 while it is down
    priority: int = 100  # start order among integrations with no dependency between them
    dependencies: list[str] = field(default_factory=list)  # started first; pulled in if unselected
    settings: dict[str, Any] = field(default_factory=dict)  # the integration's own (its YAML)
    health_check_interval: float = 60.0  # seconds between health checks
    health_check_timeout: float = 10.0  # a health check slower than this fails
    retry_config: RetryConfig = field(default_factory=RetryConfig)
    # Filled in by dependency resolution: why an integration nobody selected was enabled.
    because: str | None = None


@dataclass
class ModelConfig:
    """One local model, as declared under `integrations.custom_models.settings.models`."""

    id: str = MISSING  # the model name clients ask for
    # A path, a file or directory name under models_dir, or `pkg:<python package>`.
    source: str = MISSING
    # auto: from the files (.gguf -> llama_cpp, HF dir -> transformers, EXL2/GPTQ -> exllamav2).
    engine: str = "auto"
    aliases: list[str] = field(default_factory=list)
    # Model ids tried in order when this one's provider fails before the first token.
    fallbacks: list[str] = field(default_factory=list)
    # Prompt format when the weights carry no chat template (llama.cpp names: gemma, chatml...).
    chat_format: str | None = None
    context_length: int = 4096
    # Default request parameters (temperature, top_p, max_tokens...), overridden per request.
    defaults: dict[str, Any] = field(default_factory=dict)
    preload: bool = False
    idle_unload_s: float = 0.0  # 0: stay loaded
    # Requests waiting beyond the running ones (engine_settings.parallel); more get 429.
    max_queue: int = 16
    timeout_s: float = 300.0  # one generation's limit
    # Price per 1k tokens for the estimate_cost hook: {prompt_per_1k, completion_per_1k}.
    prices: dict[str, float] = field(default_factory=dict)
    # Passed to the engine: n_threads, n_batch, gpu_split, cache_size, device, batch_size...
    engine_settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class CorsConfig:
    """Cross-origin access for browsers. Closed by default: with no `allow_origins`, no CORS
    header is ever sent, so a page on another origin cannot read any answer. `["*"]` allows
    every origin (never together with `allow_credentials`)."""

    # Origins allowed to call from a browser, e.g. https://app.example (env: TIFFIN_CORS_ORIGINS).
    allow_origins: list[str] = field(default_factory=list)
    # Methods and request headers a preflight may ask for.
    allow_methods: list[str] = field(default_factory=lambda: ["GET", "POST"])
    allow_headers: list[str] = field(
        default_factory=lambda: ["authorization", "content-type", "x-api-key", "x-request-id"]
    )
    # Let browsers send cookies / credentials (refused together with origin "*").
    allow_credentials: bool = False
    # How long a browser may cache a preflight's answer.
    max_age_s: int = 600


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # the address both ports bind (prod: 0.0.0.0, env TIFFIN_HOST)
    http_port: int = 3000  # HTTP: OpenAI API, /integrations/*, /readyz, /metrics, WS, GraphQL
    grpc_port: int = 50051  # gRPC transport (transports.grpc)
    workers: int = 1  # BentoML worker processes, each with its own Runtime
    request_timeout_s: float = 300.0  # BentoML's per-request timeout
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    # Shutdown (SIGTERM): in-flight requests get `drain_timeout_s` to finish, then open streams
    # end with finish_reason "abort"; `graceful_timeout_s` (BentoML's, must be larger) is when
    # the server cancels whatever is left.
    drain_timeout_s: float = 20.0
    graceful_timeout_s: float = 30.0
    # WebSocket transport: a `{"type": "ping"}` frame every this many seconds keeps proxies from
    # closing idle sockets (0: off); at most `ws_send_queue` frames wait for a slow reader.
    ws_ping_interval_s: float = 20.0
    ws_send_queue: int = 64
    # Where `python -m runtime` writes the resolved config and start record of each run.
    run_dir: str = ".tiffin/runs"
    # Cross-origin (browser) access: closed unless origins are listed (server.cors below).
    cors: CorsConfig = field(default_factory=CorsConfig)


@dataclass
class LimitsConfig:
    """Per-request limits (0: no limit), answered in each protocol's own error shape."""

    max_tokens: int = 0  # a request asking for more tokens gets 400
    # A request that sets no max_tokens generates at most this many (fewer when the prompt
    # leaves less room in the context); a model's defaults.max_tokens overrides it. 0: no cap,
    # up to the end of the context.
    default_max_tokens: int = 2048
    # Streams open at once per client (the auth principal's name, else one anonymous bucket);
    # one more gets 429 with Retry-After.
    max_concurrent_streams: int = 0
    retry_after_s: int = 1


@dataclass
class ServingConfig:
    """`split`: models whose engine is in `runner_engines` run in the runner service (its own
    process, `runner_gpus` GPUs), reached from the API service through `bentoml.depends`."""

    topology: Topology = Topology.embedded  # split: GPU engines in their own runner service
    runner_engines: list[str] = field(default_factory=lambda: ["exllamav2"])  # runner-placed
    runner_gpus: int = 1  # GPUs BentoML assigns to the runner service
    runner_workers: int = 1  # runner worker processes
    # GPUs BentoML assigns to the API service's workers (embedded GPU engines); the GPU Bento
    # (`python -m runtime build --gpu`) sets 1 unless told otherwise.
    api_gpus: int = 0
    # How long the API service waits at start for the runner to load its preloaded models.
    runner_ready_timeout_s: float = 600.0


@dataclass
class LoggingConfig:
    level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR (env LOG_LEVEL in prod)
    format: LogFormat = LogFormat.console  # json: one JSON object a line (staging, prod)
    access_log: bool = True  # one log line per HTTP request


@dataclass
class RateLimitConfig:
    """Per-key limits over a one-minute window; 0 means no limit."""

    requests_per_minute: int = 0  # requests per key per minute (429 beyond)
    tokens_per_minute: int = 0  # prompt + completion tokens per key per minute


@dataclass
class ApiKeyConfig:
    """An API key declared in config. `key` is the secret itself, normally from the environment
    (`${oc.env:TIFFIN_ADMIN_KEY,''}`); `key_sha256` its hex digest instead, so the config never
    holds the secret (`python -m runtime keys create` prints both). A key left empty is skipped.
    `limits` replaces `auth.limits` for this key (a field left at 0 there is unlimited)."""

    name: str = MISSING  # who the key belongs to (logs, /admin/usage)
    key: str = ""  # the secret, from the environment
    key_sha256: str = ""  # or its hex SHA-256, so the config holds no secret
    scopes: list[str] = field(default_factory=lambda: ["inference"])  # inference, admin
    limits: RateLimitConfig | None = None


@dataclass
class OidcConfig:
    """OIDC/JWT bearer tokens (runtime/auth/oidc.py), on when `jwks_url` is set. A bearer token
    shaped like a JWT is verified against the JWKS (signature, exp, nbf, iss, aud); its
    `scope_claim` (space-separated string or list: `scope`, `scp`, `roles`...) gives scopes,
    each value mapped through `scope_map` when listed there (e.g. {tiffin-admins: [admin]})."""

    jwks_url: str = ""  # the issuer's JWKS; empty: OIDC off
    issuer: str = ""  # the `iss` tokens must carry; empty: not checked
    audience: str = ""  # the `aud` tokens must carry; empty: not checked
    algorithms: list[str] = field(default_factory=lambda: ["RS256"])  # accepted `alg`s
    scope_claim: str = "scope"  # the claim holding scopes or roles (`scope`, `scp`, `roles`)
    scope_map: dict[str, list[str]] = field(default_factory=dict)  # claim value -> scopes
    name_claim: str = "sub"  # names the principal: `oidc:<value>` (logs, limits, usage)
    leeway_s: float = 30.0  # clock skew allowed on exp and nbf
    jwks_cache_s: float = 300.0  # how long a fetched JWKS is used (an unknown kid refetches)
    timeout_s: float = 5.0  # the JWKS fetch's timeout


@dataclass
class AuthConfig:
    """API-key authentication (runtime/auth/). Enforced when `required` (staging, prod) or when
    any key is configured; routes marked `scope: public` never need a key."""

    required: bool = False  # true: every non-public route needs a key (staging, prod)
    keys: list[ApiKeyConfig] = field(default_factory=list)
    # The limits of a key that declares none of its own.
    limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    # How long an answer about a key stored in the database is cached (found or not): a
    # revocation takes effect within this time.
    cache_ttl_s: float = 5.0
    # OIDC/JWT bearer tokens, verified against an issuer's JWKS (off while jwks_url is empty).
    oidc: OidcConfig = field(default_factory=OidcConfig)


@dataclass
class TransportsConfig:
    """Which transports serve the route table (env: OPENAI_API_ENABLED, GRPC_ENABLED,
    WEBSOCKET_ENABLED, GRAPHQL_ENABLED). `openai_api` is the HTTP routes under /v1/."""

    openai_api: bool = True  # the /v1/ HTTP routes
    grpc: bool = True  # the gRPC server on server.grpc_port
    websocket: bool = True  # /ws/* routes
    graphql: bool = True  # /graphql


@dataclass
class GraphqlConfig:
    """Limits of the GraphQL transport (`/graphql`), checked before anything runs: how deep a
    selection may nest, how many tokens a document may have (its cost), how many aliases (one
    field asked many times). `graphiql` serves the in-browser IDE on GET /graphql."""

    max_depth: int = 8  # deepest selection nesting
    max_tokens: int = 2000  # tokens in one document
    max_aliases: int = 15  # aliases in one document
    graphiql: bool = True  # the IDE on GET /graphql


@dataclass
class TelemetryConfig:
    metrics: bool = True  # Prometheus metrics on /metrics (env PROMETHEUS_ENABLED)
    # How often state gauges (CPU, memory, GPU, queue depth, models, integrations) are read.
    sample_interval_s: float = 5.0
    tracing: bool = False  # OpenTelemetry spans (env OPENTELEMETRY_ENABLED in prod)
    exporters: list[str] = field(default_factory=list)  # otlp, prometheus


@dataclass
class HttpRoute:
    method: str = "GET"
    path: str = MISSING


@dataclass
class GrpcRoute:
    """A gRPC method: `tiffin.v1.Inference/Chat` (package.Service/Method)."""

    method: str = MISSING


class WsMode(StrEnum):
    """`feed`: one handler call per socket (query parameters as its event), each item of its
    stream a frame, the oldest dropped for a slow reader. `turns`: each client frame is one
    chat request; its OpenAI chunks become token frames (runtime/transports/ws_frames.py)."""

    feed = "feed"
    turns = "turns"


@dataclass
class WsRoute:
    """A WebSocket path on the HTTP port: `/ws/chat`, and how its frames map to handler calls."""

    path: str = MISSING
    mode: WsMode = WsMode.feed


class GraphqlKind(StrEnum):
    query = "query"
    mutation = "mutation"
    subscription = "subscription"


@dataclass
class GraphqlRoute:
    """A field of the GraphQL schema: `generateText` under `mutation`."""

    field: str = MISSING
    kind: GraphqlKind = GraphqlKind.query


@dataclass
class RouteConfig:
    """One row of the route table: a handler and where each transport exposes it. A transport
    serves exactly the rows that have its column; the handler is the same for all of them."""

    handler: str = MISSING  # a registered handler name, e.g. `openai.chat`
    http: HttpRoute | None = None
    grpc: GrpcRoute | None = None
    ws: WsRoute | None = None
    graphql: GraphqlRoute | None = None
    description: str = ""  # shown in OpenAPI and the GraphQL schema
    # The API-key scope a caller needs when auth is on: inference, admin, or public (no key).
    scope: str = "inference"


@dataclass
class HandlersConfig:
    routes: dict[str, RouteConfig] = field(default_factory=dict)


@dataclass
class TiffinConfig:
    """The whole config: what `python -m runtime --cfg job` prints."""

    env: str = "dev"  # the conf/env option composed (dev, test, staging, prod)
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    transports: TransportsConfig = field(default_factory=TransportsConfig)
    graphql: GraphqlConfig = field(default_factory=GraphqlConfig)
    integrations: dict[str, IntegrationConfig] = field(default_factory=dict)
    handlers: HandlersConfig = field(default_factory=HandlersConfig)
    # Dotted module names whose plugin objects are registered with the hook manager.
    plugins: list[str] = field(default_factory=list)
    # Also load plugins from the `tiffin` entry-point group (off in the test env).
    load_entrypoint_plugins: bool = True


def register_schema(store: ConfigStore | None = None) -> None:
    """Store the schema under the name `schema` that `conf/config.yaml` lists first."""
    store = store or ConfigStore.instance()
    store.store(name="schema", node=TiffinConfig)


# --- composition -------------------------------------------------------------------------------


@contextmanager
def _hydra() -> Iterator[None]:
    """Use the caller's Hydra context if there is one (tests), else open one on `conf`."""
    register_schema()
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(CONFIG_MODULE, version_base=None):
        yield


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/` with command-line style overrides into one validated config.

    The `integrations` group is multi-select: `integrations=a,b`, `integrations=[a,b]`,
    `+integrations=c` and `~integrations=c` are folded into one selection, which is then closed
    over its dependencies (pulled-in ones get `because`) and checked for cycles.
    Raises ConfigError for anything that would not run.
    """
    with _hydra():
        other, selection = _split_selection(overrides, _default_selection)
        searchpath = [o for o in other if o.startswith("hydra.")]
        available = group_options(INTEGRATIONS, searchpath)
        loaded: dict[str, DictConfig] = {}

        def dependencies_of(name: str) -> list[str] | None:
            if name not in available:
                return None
            if name not in loaded:
                # Only this integration is composed, so drop overrides aimed at the others.
                own = [o for o in other if not _targets_other_integration(o, name)]
                loaded[name] = _compose([*own, f"{INTEGRATIONS}=[{name}]"])[INTEGRATIONS][name]
            return list(loaded[name].dependencies)

        for name in selection:
            if name not in available:
                raise ConfigError(INTEGRATIONS, name, f"one of: {', '.join(available) or '(none)'}")
        because = close_dependencies(selection, dependencies_of)
        _refuse_unselected(other, list(because))
        cfg = _compose([*other, f"{INTEGRATIONS}=[{','.join(because)}]"])
    _validate_integrations(cfg, because)
    return cfg


def group_options(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The options of a config group (e.g. the integrations one can select)."""
    with _hydra():
        loader = GlobalHydra.instance().config_loader()
        return sorted(
            loader.get_group_options(group, config_name=CONFIG_NAME, overrides=list(overrides))
        )


def config_groups() -> dict[str, list[str]]:
    """Every user-facing config group and its options, for `--help`."""
    with _hydra():
        loader = GlobalHydra.instance().config_loader()
        groups = [g for g in loader.list_groups("") if g not in ("hydra", "schema")]
        return {g: group_options(g) for g in sorted(groups)}


def load_config_file(path: str | Path) -> DictConfig:
    """Load a resolved config written by the CLI (`TIFFIN_CONFIG`) and validate it again."""
    try:
        loaded = OmegaConf.load(path)
        cfg = OmegaConf.merge(OmegaConf.structured(TiffinConfig), loaded)
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None
    return cast(DictConfig, cfg)


def _split_selection(
    overrides: Sequence[str], defaults: Callable[[list[str]], list[str]]
) -> tuple[list[str], list[str]]:
    """Separate overrides of the integrations group from the rest and fold them into a list.

    The fold starts from the config's default selection (`defaults(other_overrides)`), unless
    the first integrations override replaces it (`integrations=...`)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(
            "overrides", " ".join(overrides), f"key=value overrides ({str(exc).splitlines()[0]})"
        ) from None
    other: list[str] = []
    mine: list[tuple[str, Override]] = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.key_or_group == INTEGRATIONS and override.package is None:
            mine.append((text, override))
        else:
            other.append(text)
    replaces = bool(mine) and not (
        mine[0][1].is_add() or mine[0][1].is_force_add() or mine[0][1].is_delete()
    )
    selection: list[str] = [] if replaces else defaults(other)
    for _, override in mine:
        names = _names(override)
        if override.is_delete():
            selection = [n for n in selection if names and n not in names]
        elif override.is_add() or override.is_force_add():
            selection += [n for n in names if n not in selection]
        else:
            selection = list(dict.fromkeys(names))
    return other, selection


def _default_selection(overrides: list[str]) -> list[str]:
    """The integrations config.yaml selects, composed without overrides of integration keys
    (which may name integrations the defaults do not include)."""
    rest = [o for o in overrides if not _targets_other_integration(o, "")]
    return list(_compose(rest)[INTEGRATIONS])


def _refuse_unselected(overrides: Sequence[str], selected: list[str]) -> None:
    """An override of an integration's key (`integrations.ollama.settings.timeout=...`) needs
    that integration selected; say so rather than Hydra's "not in the config"."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        parts = key.split(".")
        if parts[0] == INTEGRATIONS and len(parts) > 1 and parts[1] not in selected:
            raise ConfigError(
                key,
                parts[1],
                f"a selected integration (selected: {', '.join(selected) or 'none'}); "
                f"select it with +{INTEGRATIONS}={parts[1]}",
            )


def _targets_other_integration(override: str, name: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key.startswith(f"{INTEGRATIONS}.") and not key.startswith(f"{INTEGRATIONS}.{name}.")


def _names(override: Override) -> list[str]:
    value = override.value()
    if value is None:
        return []
    if isinstance(value, ChoiceSweep):
        value = value.list
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        raise ConfigError(
            INTEGRATIONS, value, "integration names, e.g. integrations=ollama,grafana"
        )
    return [str(v).strip() for v in value if str(v).strip()]


def _compose(overrides: Sequence[str]) -> DictConfig:
    try:
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except MissingConfigException as exc:
        raise _missing_option_error(exc, overrides) from None
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException):
            raise config_error(cause) from None
        raise ConfigError("overrides", " ".join(overrides), str(exc).splitlines()[0]) from None
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None


def _missing_option_error(exc: MissingConfigException, overrides: Sequence[str]) -> ConfigError:
    missing = exc.missing_cfg_file or ""
    if "/" not in missing:
        return ConfigError("config", missing, str(exc).splitlines()[0])
    group, option = missing.rsplit("/", 1)
    searchpath = [o for o in overrides if o.startswith("hydra.")]
    options = group_options(group, searchpath)
    return ConfigError(group, option, f"one of: {', '.join(options) or '(none)'}")


def _validate_integrations(cfg: DictConfig, because: dict[str, str | None]) -> None:
    integrations = cfg[INTEGRATIONS]
    for name, reason in because.items():
        node = integrations[name]
        if node.name != name:
            raise ConfigError(f"integrations.{name}.name", node.name, f"{name!r} (its file name)")
        node.because = reason
        for dep in node.dependencies:
            if node.enabled and not integrations[dep].enabled:
                raise ConfigError(
                    f"integrations.{name}.dependencies", dep, "an integration with enabled=true"
                )
    start_order(
        {n: list(integrations[n].dependencies) for n in because},
        {n: int(integrations[n].priority) for n in because},
    )
