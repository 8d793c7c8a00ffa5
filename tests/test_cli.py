"""`python -m runtime` as a subprocess (and `main(argv)` in-process): verbs, plan, check,
errors, --help, --cfg."""

from __future__ import annotations

import json
import subprocess

import pytest

from runtime.cli.main import main, split_verb
from tests.conftest import PYTHON, ROOT, TEST_OVERRIDES, cli_env

# Every selectable integration: one YAML file each under conf/integrations/.
INTEGRATION_FILES = list((ROOT / "conf" / "integrations").glob("*.yaml"))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "runtime", *args],
        cwd=ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_plan_prints_the_resolved_graph_for_a_comma_selection() -> None:
    result = run_cli("plan", *TEST_OVERRIDES, "integrations=dashboards,jobs")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["env"] == "test"
    by_name = {i["name"]: i for i in plan["integrations"]}
    assert set(by_name) == {"dashboards", "jobs", "metrics"}
    assert by_name["metrics"]["because"] == "dependency of dashboards"
    assert by_name["dashboards"] == {
        "name": "dashboards",
        "type": "monitoring",
        "enabled": True,
        "required": False,
        "priority": 1,
        "dependencies": ["metrics"],
        "target": "scripted",
    }
    assert plan["start_order"] == ["metrics", "dashboards", "jobs"]
    assert plan["endpoints"]["http"] == "127.0.0.1:3000"
    assert plan["endpoints"]["grpc"] == "127.0.0.1:50051"
    assert plan["models"] == []


def test_plan_takes_key_overrides() -> None:
    result = run_cli("plan", "server.http_port=9000", "env=prod")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["endpoints"]["http"].endswith(":9000")
    assert plan["env"] == "prod"
    assert plan["workers"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["integrations=nonesuch,ollama"],
            "tiffin: config error: integrations: got 'nonesuch', "
            f"expected one of: {', '.join(sorted(p.stem for p in INTEGRATION_FILES))}",
        ),
        (
            [*TEST_OVERRIDES, "integrations=cache", "integrations.db.dependencies=[cache]"],
            "tiffin: config error: integrations.cache.dependencies: got 'cache -> db -> cache', "
            "expected dependencies without a cycle",
        ),
        (
            ["integrations.custom_models.settings.models.0.engine_settings.parallel=0"],
            "tiffin: config error: integrations.custom_models.settings.models[0]"
            ".engine_settings.parallel: got 0, expected an integer >= 1"
            " (sequences decoded together)",
        ),
        (
            ["server.http_port=abc"],
            "tiffin: config error: server.http_port: got 'abc', expected a value of type Integer",
        ),
    ],
)
def test_an_invalid_config_exits_2_with_one_line(args: list[str], message: str) -> None:
    result = run_cli("plan", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stderr


def test_hydra_full_error_shows_the_traceback() -> None:
    env = {**cli_env(), "HYDRA_FULL_ERROR": "1"}
    result = run_cli("plan", "integrations=nonesuch", env=env)
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_help_lists_every_config_group() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "env: dev, prod, staging, test" in result.stdout
    assert "handlers: default" in result.stdout
    assert "integrations:" in result.stdout


def test_cfg_job_prints_the_config_with_secrets_masked() -> None:
    result = run_cli(*TEST_OVERRIDES, "integrations=dashboards", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "api_key: '***'" in result.stdout
    assert "http://admin:***@127.0.0.1:9/grafana" in result.stdout
    assert "hunter2" not in result.stdout and "sk-dashboards-secret" not in result.stdout


def test_check_passes_when_everything_is_healthy() -> None:
    result = run_cli("check", *TEST_OVERRIDES, "integrations=dashboards")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["integration", "required", "status", "latency_ms"]
    assert lines[1].split()[:3] == ["metrics", "false", "active"]
    assert lines[2].split()[:3] == ["dashboards", "false", "active"]


def test_check_warns_when_auth_is_on_with_no_key_to_pass_it() -> None:
    result = run_cli("check", *TEST_OVERRIDES, "integrations=dashboards", "auth.required=true")
    assert result.returncode == 0, result.stderr  # a warning, not a failure
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("tiffin: warning:")]
    assert "auth is on (auth.required) but no API key is configured" in warning
    assert "`python -m runtime keys create --name NAME --scope admin [overrides...]`" in warning
    healthy = run_cli("check", *TEST_OVERRIDES, "integrations=dashboards")
    assert "tiffin: warning:" not in healthy.stderr


def test_check_fails_when_a_required_integration_fails() -> None:
    result = run_cli(
        "check",
        *TEST_OVERRIDES,
        "integrations=[db,jobs]",
        "integrations.db.required=true",
        "+integrations.db.settings.fail_initialize=-1",
        "integrations.db.retry_config.max_retries=0",
    )
    assert result.returncode == 1
    db = next(line for line in result.stdout.splitlines() if line.startswith("db "))
    assert db.split()[:3] == ["db", "true", "error"]
    assert "cannot reach upstream" in db
    assert "required integration 'db' failed to start" in result.stderr


def test_check_passes_when_only_an_optional_integration_fails() -> None:
    result = run_cli(
        "check",
        *TEST_OVERRIDES,
        "integrations=jobs",
        "+integrations.jobs.settings.fail_initialize=-1",
        "integrations.jobs.retry_config.max_retries=0",
    )
    assert result.returncode == 0, result.stderr
    assert "jobs" in result.stdout and "error" in result.stdout


def test_info_lists_hooks_handlers_and_plugins() -> None:
    result = run_cli("--info", *TEST_OVERRIDES)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert "before_generate" in info["hooks"]
    assert "integrations.health" in info["handlers"]
    assert "tests.fakes" in info["plugins"]
    assert "scripted" in info["integration_targets"]


def test_the_configuration_guides_error_example_is_true() -> None:
    page = (ROOT / "docs" / "configuration-guide.md").read_text().splitlines()
    start = page.index("$ python -m runtime server.http_port=abc")
    result = run_cli("server.http_port=abc")
    assert result.returncode == 2
    assert result.stderr.strip() == page[start + 1]


def test_the_verb_may_come_after_the_overrides_as_people_type_it() -> None:
    result = run_cli("env=prod", "integrations=ollama,grafana", "plan")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["env"] == "prod"
    assert plan["start_order"] == ["prometheus", "grafana", "ollama"]


def test_main_takes_the_verb_anywhere(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TEST_OVERRIDES, "integrations=jobs", "plan", "server.http_port=9001"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["start_order"] == ["jobs"]
    assert plan["endpoints"]["http"] == "127.0.0.1:9001"


@pytest.mark.parametrize(
    ("words", "verb", "rest"),
    [
        (["env=prod", "plan"], "plan", ["env=prod"]),
        (["env=prod", "build", "--gpu"], "build", ["env=prod", "--gpu"]),
        (["--cfg", "job", "env=prod"], "serve", ["--cfg", "job", "env=prod"]),
        (["~integrations", "check"], "check", ["~integrations"]),
        # keys takes its sub-command first; a key may be named like a verb.
        (
            ["integrations=database", "keys", "revoke", "plan"],
            "keys",
            ["revoke", "plan", "integrations=database"],
        ),
    ],
)
def test_split_verb_finds_the_verb_and_keeps_the_other_words(
    words: list[str], verb: str, rest: list[str]
) -> None:
    assert split_verb(words) == (verb, rest)


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (
            ["plan", "env=test", "check"],
            "tiffin: usage error: two verbs, 'plan' and 'check'; "
            "give one of: serve, plan, check, build, keys, apply",
        ),
        (
            ["env=test", "pln"],
            "tiffin: usage error: 'pln' is neither a verb (serve, plan, check, build, keys, apply) "
            "nor a key=value override; did you mean 'plan'?",
        ),
    ],
)
def test_two_verbs_or_an_unknown_word_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], words: list[str], message: str
) -> None:
    assert main(words) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == message


OLLAMA_TIMEOUT_ERROR = (
    "tiffin: config error: integrations.ollama.settings.timeout: got 'x', expected a number (float)"
)


def test_a_setting_of_the_wrong_type_is_one_line_and_exit_2() -> None:
    result = run_cli(
        "env=prod", "integrations=ollama,grafana", "integrations.ollama.settings.timeout=x", "plan"
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip() == OLLAMA_TIMEOUT_ERROR


@pytest.mark.parametrize("verb", ["plan", "check", "serve", "build"])
def test_every_verb_checks_the_settings_before_anything_starts(
    capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    bad = ["integrations=ollama", "integrations.ollama.settings.timeout=x"]
    assert main([verb, *TEST_OVERRIDES, *bad]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == OLLAMA_TIMEOUT_ERROR
