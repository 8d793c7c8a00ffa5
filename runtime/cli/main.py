"""`python -m runtime [verb] [hydra overrides...]` (also installed as `tiffin`).

The verb may stand anywhere among the words (`python -m runtime env=prod plan` is `plan
env=prod`): a bare word is never a Hydra override, so the one bare word that is a verb is the
verb; the words after `keys` are its own (`keys revoke plan` revokes a key named plan). Two
verbs, or a bare word that is no verb, is a usage error (exit 2).

Verbs: `serve` (default) starts the BentoML service; `plan` prints the resolved start plan as
JSON and starts nothing (`plan --diff --to URL`: what applying it to a running server would
change); `apply --to URL` applies it to a running server (runtime/cli/apply_command.py);
`check` starts the integrations once, health-checks them, prints a table
and exits non-zero if a required one fails; `keys create|list|revoke` manages API keys
(runtime/cli/key_commands.py); `build [--gpu]` bakes the config into a Bento
(runtime/cli/build.py). Every other word is a Hydra override
(`env=prod integrations=ollama,grafana server.http_port=9000`). `--help`, `--cfg job` and
`--info` keep their Hydra meaning (the printed config has its secrets masked).

Exit codes: 0 ok, 1 a required integration failed, 2 the config is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import handlers
from runtime.app import Runtime, to_settings
from runtime.cli.apply_command import apply_main
from runtime.cli.build import build_main
from runtime.cli.key_commands import keys_main
from runtime.config import compose, config_groups
from runtime.errors import STARTUP_FAILURE_FILE, ConfigError, StartupError
from runtime.run_dir import worker_pids
from runtime.telemetry.logging import configure_logging

PROJECT_ROOT = Path(__file__).resolve().parents[2]


VERBS = ("serve", "plan", "check", "build", "keys", "apply")
# Flags that take the next word as their value (`--cfg job`), which is then no verb.
VALUE_FLAGS = ("--cfg", "-c", "--to", "--key", "--timeout")
USAGE = """\
usage: python -m runtime [serve|plan|check] [--help] [--cfg job] [--info] [key=value ...]
       python -m runtime keys create --name NAME [--scope admin|inference] | list | revoke NAME
                              [key=value ...]   (integrations=database: keys stored in the database)
       python -m runtime build [--gpu] [key=value ...]
       python -m runtime apply --to URL [--dry-run] [--key KEY] [key=value ...]
       python -m runtime plan --diff --to URL [key=value ...]

  serve   start the service (default): OpenAI-compatible HTTP API, /integrations/*, /metrics
  plan    print the resolved start plan as JSON; start nothing
  check   start integrations once, health-check them, exit 1 if a required one fails
  keys    make an API key (shown once), list the configured and stored ones, revoke a stored one
  build   bake the resolved config into a Bento (bentoml build; --gpu: the CUDA image)
  apply   send the composed config to a running server (admin key: --key or TIFFIN_ADMIN_KEY),
          which changes only what differs, nothing in flight dropped; prints the change plan

The verb may come anywhere among the words. Overrides are Hydra's: pick group options
(env=prod, integrations=ollama,grafana, +integrations=redis) or set any key
(server.http_port=9000, logging.format=json).
Configuration errors exit with status 2; HYDRA_FULL_ERROR=1 shows the traceback.
"""


class UsageError(Exception):
    """Words that name no command: the CLI prints the message and exits 2."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        verb, args = split_verb(list(sys.argv[1:] if argv is None else argv))
    except UsageError as error:
        print(f"tiffin: usage error: {error}", file=sys.stderr)
        return 2
    if verb == "keys":
        return keys_main(args)
    if verb == "build":
        return build_main(args)
    if verb == "apply" or (verb == "plan" and "--diff" in args):
        return apply_main(args, plan_only=verb == "plan")
    show_cfg, show_info, overrides = _flags(args)
    if show_cfg == "help":
        print(_help())
        return 0
    try:
        cfg = compose(overrides)
        configure_logging(to_settings(cfg).logging)
        runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
    except ConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"tiffin: config error: {error}", file=sys.stderr)
        return 2
    if show_cfg:
        print(OmegaConf.to_yaml(OmegaConf.create(runtime.redacted_config())), end="")
        return 0
    if show_info:
        print(json.dumps(_info(runtime), indent=2))
        return 0
    if verb == "plan":
        print(json.dumps(runtime.plan(), indent=2))
        return 0
    if verb == "check":
        return asyncio.run(_check(runtime))
    return _serve(cfg, runtime)


def split_verb(words: Sequence[str]) -> tuple[str, list[str]]:
    """The verb among `words`, wherever it stands (`serve` when there is none), and the other
    words for it. `keys` takes the words after it first (its sub-command), then the overrides
    before it. Raises UsageError for two verbs, or a bare word that is no verb."""
    verb: str | None = None
    rest: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word in VERBS:
            if verb is not None:
                raise UsageError(
                    f"two verbs, {verb!r} and {word!r}; give one of: {', '.join(VERBS)}"
                )
            verb = word
            if word == "keys":
                return verb, [*words[index + 1 :], *rest]
        elif word in VALUE_FLAGS:
            rest += words[index : index + 2]
            index += 1
        elif _is_bare(word):
            close = difflib.get_close_matches(word, VERBS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(
                f"{word!r} is neither a verb ({', '.join(VERBS)}) nor a key=value override{hint}"
            )
        else:
            rest.append(word)
        index += 1
    return verb or "serve", rest


def _is_bare(word: str) -> bool:
    """A word Hydra would refuse as an override: no `=`, no flag, no `~key` deletion."""
    return "=" not in word and not word.startswith(("-", "~"))


def _flags(args: list[str]) -> tuple[str | None, bool, list[str]]:
    show_cfg: str | None = None
    show_info = False
    overrides: list[str] = []
    words = iter(args)
    for word in words:
        if word in ("--help", "-h"):
            show_cfg = "help"
        elif word in ("--cfg", "-c"):
            show_cfg = show_cfg or next(words, "job")
        elif word.startswith("--cfg="):
            show_cfg = show_cfg or word.split("=", 1)[1]
        elif word in ("--info", "-i"):
            show_info = True
        else:
            overrides.append(word)
    return show_cfg, show_info, overrides


def _help() -> str:
    lines = [USAGE, "Config groups (pick with group=option):"]
    for group, options in config_groups().items():
        multi = "  (several: a,b)" if group == "integrations" else ""
        lines.append(f"  {group}: {', '.join(options) or '(none)'}{multi}")
    lines.append("")
    lines.append("Environment: LOG_LEVEL, PROMETHEUS_ENABLED, OLLAMA_BASE_URL, HUGGINGFACE_TOKEN,")
    lines.append(
        "  DATABASE_URL, REDIS_URL, TIFFIN_HOST, TIFFIN_ENV, TIFFIN_OVERRIDES, TIFFIN_CONFIG"
    )
    return "\n".join(lines)


def _info(runtime: Runtime) -> dict[str, object]:
    return {
        "config_module": "conf",
        "groups": config_groups(),
        "plugins": [name for name, _ in runtime.plugins.list_name_plugin()],
        "hooks": sorted(h for h in dir(runtime.plugins.hook) if not h.startswith("_")),
        "handlers": sorted(runtime.handlers),
        "integration_targets": runtime.registry.targets,
    }


async def _check(runtime: Runtime) -> int:
    failure: StartupError | None = None
    try:
        await runtime.start()
    except StartupError as error:
        failure = error
    rows = [("integration", "required", "status", "latency_ms", "detail")]
    for name, integration in runtime.integrations.integrations.items():
        health = integration.last_health
        detail = integration.describe()["last_error"] or (health.detail if health else "")
        latency = f"{health.latency_s * 1000:.1f}" if health else "-"
        rows.append(
            (
                name,
                str(integration.config.required).lower(),
                integration.status.value,
                latency,
                detail,
            )
        )
    await runtime.stop()
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[4]
        )
    for warning in runtime.warnings():
        print(f"tiffin: warning: {warning['message']}", file=sys.stderr)
    if failure is not None:
        print(f"tiffin: {failure}", file=sys.stderr)
        return 1
    return 0


def _serve(cfg: DictConfig, runtime: Runtime) -> int:
    """Write the resolved config into a fresh run directory and serve it with `bentoml serve`
    (the same service a Bento runs), forwarding SIGINT/SIGTERM to it and waiting for it."""
    server = runtime.settings.server
    run_dir = Path(server.run_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yaml"
    # Unresolved: ${oc.env:...} values stay references, so secrets from the environment are
    # not written to disk; the workers resolve them from the same environment.
    config_file.touch(mode=0o600)
    config_file.write_text(OmegaConf.to_yaml(cfg))
    (run_dir / "plan.json").write_text(json.dumps(runtime.plan(), indent=2))
    env = {
        # BentoML keeps the Prometheus multiprocess files of its workers under its home and
        # wipes them when a server starts: a home per run keeps two servers on one machine
        # from erasing each other's metrics. An operator's own BENTOML_HOME wins.
        "BENTOML_HOME": str((run_dir / "bentoml").resolve()),
        **os.environ,
        "TIFFIN_CONFIG": str(config_file.resolve()),
        "TIFFIN_RUN_DIR": str(run_dir.resolve()),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "bentos.service:Tiffin",
        "--working-dir",
        str(PROJECT_ROOT),
        "--host",
        server.host,
        "--port",
        str(server.http_port),
        "--timeout-graceful-shutdown",
        str(int(server.graceful_timeout_s)),
    ]
    child = subprocess.Popen(command, env=env)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    def reapply(_signum: int, _frame: object) -> None:
        # To each worker, which reads config.yaml again and applies it; never to BentoML's
        # arbiter, for which SIGHUP means restarting every worker (bentos/config_file.py).
        for pid in worker_pids(run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    signal.signal(signal.SIGHUP, reapply)
    returncode = child.wait()
    failure = run_dir / STARTUP_FAILURE_FILE
    if failure.exists():
        print(f"tiffin: {json.loads(failure.read_text())['message']}", file=sys.stderr)
        return 1
    return 0 if returncode in (0, -signal.SIGINT, -signal.SIGTERM) else returncode


if __name__ == "__main__":
    sys.exit(main())
