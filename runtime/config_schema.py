"""Tiffin's config schema: the structured-config dataclasses every composed config is checked
against (Hydra stores `TiffinConfig` as `schema`; `conf/config.yaml` lists it first in its
defaults). runtime/config.py composes `conf/` into one of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from omegaconf import MISSING


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
    # Responses API answers kept (per worker, in memory) for `previous_response_id` and
    # GET /v1/responses/{id}; the oldest is dropped beyond this.
    stored_responses: int = 1000


@dataclass
class BatchConfig:
    """The Files and Batch APIs (`/v1/files`, `/v1/batches`): uploads kept by the object_storage
    integration, batch lines run by workers in every process that reads the queue integration."""

    # An upload larger than this gets 413 (OpenAI's batch input limit is 200 MB).
    max_file_bytes: int = 200 * 1024 * 1024
    max_lines: int = 50_000  # lines in one batch input file (OpenAI's limit)
    # Of a model's slots (its engine's `parallel`), at most this share runs batch lines while
    # live requests use the model, and only while they leave a slot free: live traffic first.
    max_share: float = 0.75
    # A model with no live request for this long lends batch lines every slot (0: never).
    idle_s: float = 5.0
    # Batch lines this process runs at once, over all models (0: no batch worker here).
    concurrency: int = 8
    # How often the supervisor looks for batches to finish, expire or recover.
    poll_s: float = 1.0
    completion_windows: list[str] = field(default_factory=lambda: ["24h"])


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
    # A larger body limit than server.max_body_bytes for this path (0: the server's), for
    # uploads (POST /v1/files: batch.max_file_bytes).
    max_body_bytes: int = 0


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
    batch: BatchConfig = field(default_factory=BatchConfig)
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
