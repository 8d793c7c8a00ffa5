"""Developer tooling: the Makefile's targets run commands that exist, the VS Code files are plain
JSON naming real modules, CLI verbs and scripts, and the pre-commit config is valid and its hooks
work."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.cli.main import USAGE, VERBS
from tests.binaries import require_binary
from tests.conftest import ROOT
from tests.devtools import venv_binary

VSCODE = ROOT / ".vscode"


def make_targets() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    return re.findall(r"^([a-z][a-z-]*):.*## ", makefile, re.M)


def is_verb(word: str) -> bool:
    """A verb of `python -m runtime`: serve, plan, check, or one its usage names (keys, ...)."""
    return word in VERBS or f"python -m runtime {word}" in USAGE


def assert_command_exists(command: str) -> None:
    """A shell command the tooling runs: its script, module or program is there."""
    words = shlex.split(command)
    program, args = words[0], words[1:]
    if program == "bash":
        assert (ROOT / args[0]).is_file(), command
    elif program.startswith(".venv/bin/") and program != ".venv/bin/python":
        assert Path(venv_binary(program.removeprefix(".venv/bin/"))).is_file(), command
    elif program in (".venv/bin/python", "python", "python3"):
        if args[0] == "-m":
            assert importlib.util.find_spec(args[1]) is not None, command
            if args[1] == "runtime" and len(args) > 2 and "=" not in args[2]:
                assert is_verb(args[2]), f"{command}: not a verb of python -m runtime"
        else:
            assert (ROOT / args[0]).is_file(), command
    else:
        assert shutil.which(program), command


def test_every_make_target_runs_a_command_that_exists() -> None:
    make = require_binary("make")
    targets = make_targets()
    assert {
        "setup",
        "setup-system",
        "test",
        "lint",
        "serve",
        "bench",
        "dashboards",
        "build",
    } <= set(targets)
    for target in targets:
        result = subprocess.run(
            [make, "-n", "-C", str(ROOT), target],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"make -n {target}: {result.stderr}"
        commands = [line for line in result.stdout.splitlines() if not line.startswith("make")]
        assert commands, target
        if target == "help":
            continue
        for command in commands:
            assert_command_exists(command)


def test_make_help_lists_every_target() -> None:
    result = subprocess.run(
        [require_binary("make"), "-C", str(ROOT), "--no-print-directory"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == make_targets()


def load_json(name: str) -> Any:
    # Plain JSON, no comments, so any JSON reader (and this test) can read what VS Code reads.
    return json.loads((VSCODE / name).read_text())


def test_vscode_launch_configurations_serve_plan_and_debug_a_test() -> None:
    configurations = {c["name"]: c for c in load_json("launch.json")["configurations"]}
    by_verb = {c["args"][0]: c for c in configurations.values() if c.get("module") == "runtime"}
    assert {"serve", "plan"} <= set(by_verb)
    assert all(is_verb(verb) for verb in by_verb)
    [test] = [c for c in configurations.values() if c.get("module") == "pytest"]
    assert test["args"][0] == "${file}"
    for configuration in configurations.values():
        assert configuration["type"] == "debugpy"
        assert configuration["python"] == "${workspaceFolder}/.venv/bin/python"
        assert importlib.util.find_spec(configuration["module"]) is not None


def test_vscode_tasks_run_the_scripts() -> None:
    tasks = {task["label"]: task for task in load_json("tasks.json")["tasks"]}
    assert {"setup", "test", "lint", "serve"} <= set(tasks)
    for name in ("setup", "setup-system", "test", "lint"):
        assert tasks[name]["command"] == f"bash scripts/{name}"
    for task in tasks.values():
        assert_command_exists(task["command"])


def test_vscode_recommends_the_extensions_for_the_tools() -> None:
    recommended = load_json("extensions.json")["recommendations"]
    assert {
        "ms-python.python",
        "charliermarsh.ruff",
        "ms-python.mypy-type-checker",
        "redhat.vscode-yaml",
    } <= set(recommended)
    settings = load_json("settings.json")
    assert settings["python.defaultInterpreterPath"] == "${workspaceFolder}/.venv/bin/python"


def test_pre_commit_config_is_valid_and_runs_what_scripts_lint_runs() -> None:
    config = ROOT / ".pre-commit-config.yaml"
    result = subprocess.run(
        [venv_binary("pre-commit"), "validate-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lint = (ROOT / "scripts" / "lint").read_text()
    [repo] = yaml.safe_load(config.read_text())["repos"]
    hooks = {hook["id"]: hook for hook in repo["hooks"]}
    assert set(hooks) == {"ruff-check", "ruff-format", "mypy", "bandit", "actionlint"}
    for hook in hooks.values():
        assert hook["language"] == "system"  # from .venv: nothing downloaded at commit time
        assert_command_exists(hook["entry"])
    assert hooks["bandit"]["entry"].replace(".venv/bin/python", '"$PY"') in lint
    assert '"$PY" -m mypy' in lint and hooks["mypy"]["pass_filenames"] is False


def test_the_ruff_format_hook_reformats_a_staged_file(tmp_path: Path) -> None:
    """The hooks run for real: a repository with this config, a badly formatted file and .venv."""
    git = require_binary("git")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / ".pre-commit-config.yaml", repo)
    shutil.copy(ROOT / "pyproject.toml", repo)
    (repo / ".venv").symlink_to(Path(venv_binary("pre-commit")).parent.parent)
    (repo / "ugly.py").write_text("x = {  'a':1 }\n")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    for command in (["init", "-q"], ["add", "ugly.py", ".pre-commit-config.yaml"]):
        subprocess.run([git, *command], cwd=repo, check=True, env=env, timeout=30)
    result = subprocess.run(
        [venv_binary("pre-commit"), "run", "ruff-format", "--files", "ugly.py"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # it changed the file
    assert "files were modified by this hook" in result.stdout, result.stdout
    assert (repo / "ugly.py").read_text() == 'x = {"a": 1}\n'


@pytest.mark.parametrize("name", ["launch.json", "tasks.json", "extensions.json", "settings.json"])
def test_vscode_files_are_plain_json(name: str) -> None:
    text = (VSCODE / name).read_text()
    assert not re.search(r"^\s*//", text, re.M), f"{name}: comments make it JSONC"
    json.loads(text)
