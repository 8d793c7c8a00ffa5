"""Security hardening: CORS closed by default, model paths confined to allowed directories,
and config that names code (`_target_`, `plugins:`, `pkg:` sources) refused before anything
is imported or run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from runtime.app import Runtime
from runtime.errors import ConfigError, StartupError
from runtime.integrations.custom_models import CustomModelsIntegration
from runtime.transports.http import create_app
from tests.conftest import PYTHON, cli_env
from tests.test_custom_models import fill_models_dir, gguf_file, overrides

MakeRuntime = Callable[..., Runtime]
ORIGIN = "https://app.example"


def client(runtime: Runtime) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://tiffin.test")


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "origin": origin,
        "access-control-request-method": method,
        "access-control-request-headers": "authorization, content-type",
    }


def cors_headers(response: httpx.Response) -> list[str]:
    return [h for h in response.headers if h.startswith("access-control-")]


# --- CORS -----------------------------------------------------------------------------------------


async def test_cors_is_closed_by_default(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime()
    assert runtime.settings.server.cors.allow_origins == []
    async with client(runtime) as http:
        simple = await http.get("/v1/models", headers={"origin": ORIGIN})
        assert simple.status_code == 200
        assert cors_headers(simple) == []
        pre = await http.options("/v1/chat/completions", headers=preflight(ORIGIN))
        assert cors_headers(pre) == []
        assert pre.status_code == 405
        assert pre.json()["error"]["type"] == "invalid_request_error"


async def test_listed_origins_get_cors_and_others_do_not(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime(
        f"server.cors.allow_origins=[{ORIGIN}]", "server.cors.allow_credentials=true"
    )
    async with client(runtime) as http:
        pre = await http.options("/v1/chat/completions", headers=preflight(ORIGIN))
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        assert pre.headers["access-control-allow-credentials"] == "true"
        assert "POST" in pre.headers["access-control-allow-methods"]
        simple = await http.get("/v1/models", headers={"origin": ORIGIN})
        assert simple.headers["access-control-allow-origin"] == ORIGIN

        other = "https://evil.example"
        refused = await http.options("/v1/chat/completions", headers=preflight(other))
        assert refused.status_code == 403
        assert "access-control-allow-origin" not in refused.headers
        error = refused.json()["error"]
        assert other in error["message"] and error["type"] == "permission_error"
        answered = await http.get("/v1/models", headers={"origin": other})
        assert "access-control-allow-origin" not in answered.headers
        # A method that is not allowed is refused even from a listed origin.
        put = await http.options("/v1/models", headers=preflight(ORIGIN, "PUT"))
        assert put.status_code == 403
        assert "allow_methods" in put.json()["error"]["message"]


def test_cors_origins_can_come_from_the_environment(
    compose_test: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIFFIN_CORS_ORIGINS", f"[{ORIGIN},'https://b.example:8443']")
    cfg = compose_test("env=prod")
    assert list(cfg.server.cors.allow_origins) == [ORIGIN, "https://b.example:8443"]  # type: ignore[attr-defined]
    monkeypatch.delenv("TIFFIN_CORS_ORIGINS")
    assert list(compose_test("env=prod").server.cors.allow_origins) == []  # type: ignore[attr-defined]


# --- model paths ----------------------------------------------------------------------------------


def models(runtime: Runtime) -> CustomModelsIntegration:
    integration = runtime.integrations.get_integration("custom_models")
    assert isinstance(integration, CustomModelsIntegration)
    return integration


@pytest.mark.parametrize("source", ["ABSOLUTE", "../outside.gguf", "sub/../../outside.gguf"])
def test_a_model_path_outside_the_allowed_dirs_is_a_config_error(
    make_runtime: MakeRuntime, tmp_path: Path, source: str
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    outside = gguf_file(tmp_path / "outside.gguf")
    source = str(outside) if source == "ABSOLUTE" else source
    with pytest.raises(ConfigError) as raised:
        make_runtime(*overrides(models_dir, tmp_path / "cache", f"[{{id:x,source:'{source}'}}]"))
    message = str(raised.value)
    assert raised.value.key == "integrations.custom_models.settings.models[0].source"
    assert source in message and str(models_dir) in message and "allowed_dirs" in message


def test_a_symlink_out_of_models_dir_is_refused(make_runtime: MakeRuntime, tmp_path: Path) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    outside = gguf_file(tmp_path / "secret" / "outside.gguf")
    (models_dir / "link.gguf").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"resolves to .*secret/outside\.gguf"):
        make_runtime(*overrides(models_dir, tmp_path / "cache", "[{id:x,source:link.gguf}]"))


async def test_a_symlink_made_after_the_config_was_read_is_refused_at_start(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    gguf_file(tmp_path / "secret" / "outside.gguf")
    runtime = make_runtime(*overrides(models_dir, tmp_path / "cache", "[]"))
    # The scan skips (and reports) a link that leads out of the allowed directories.
    (models_dir / "escape.gguf").symlink_to(tmp_path / "secret" / "outside.gguf")
    # So is a folder whose .gguf is a link out.
    (models_dir / "folder").mkdir()
    (models_dir / "folder" / "model.gguf").symlink_to(tmp_path / "secret" / "outside.gguf")
    await runtime.start()
    assert "escape" not in runtime.models.models and "folder" not in runtime.models.models
    assert "allowed directories" in models(runtime).rejected["escape.gguf"]
    assert "allowed directories" in models(runtime).rejected["folder"]
    assert "spare" in runtime.models.models


async def test_allowed_dirs_admits_more_directories(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    shared = gguf_file(tmp_path / "shared" / "big.gguf")
    (models_dir / "linked.gguf").symlink_to(shared)
    runtime = make_runtime(
        *overrides(models_dir, tmp_path / "cache", f"[{{id:big,source:'{shared}'}}]"),
        f"integrations.custom_models.settings.allowed_dirs=[{tmp_path / 'shared'}]",
    )
    await runtime.start()
    assert runtime.models.models["big"].spec.path == shared
    assert "linked" not in runtime.models.models  # the same file as `big`, not offered twice


# --- config that names code -----------------------------------------------------------------------


@pytest.fixture
def marker_module(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A module that leaves a file behind if it is ever imported."""
    marker = tmp_path / "imported"
    (tmp_path / "tiffin_marker_mod.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('yes')\nclass Thing: pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield "tiffin_marker_mod", marker
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tiffin_marker_mod", None)


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    return calls


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "subprocess.Popen",
        "builtins.eval",
        "runtime.os.system",
        "runtime.cli.main.main",
        "runtime.app.__builtins__",
        "../x.Y",
    ],
)
def test_an_integration_target_naming_the_stdlib_is_refused(
    make_runtime: MakeRuntime, no_processes: list[object], target: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        make_runtime("integrations=db", f"integrations.db._target_='{target}'")
    assert raised.value.key == "integrations.db._target_"
    assert no_processes == []


def test_a_target_outside_the_project_is_refused_before_it_is_imported(
    make_runtime: MakeRuntime, marker_module: tuple[str, Path]
) -> None:
    name, marker = marker_module
    with pytest.raises(ConfigError, match="BaseIntegration class of this project"):
        make_runtime("integrations=db", f"integrations.db._target_={name}.Thing")
    assert not marker.exists() and name not in sys.modules


@pytest.mark.parametrize("plugin", ["os", "subprocess", "os.system", "builtins", "__main__"])
def test_a_plugin_naming_the_stdlib_is_refused(
    make_runtime: MakeRuntime, no_processes: list[object], plugin: str
) -> None:
    with pytest.raises(
        ConfigError, match=r"not a (module of the standard library|dunder)"
    ) as raised:
        make_runtime(f"plugins=[tests.fakes,'{plugin}']")
    assert raised.value.key == "plugins"
    assert no_processes == []


def test_a_plugin_module_without_hooks_is_refused(make_runtime: MakeRuntime) -> None:
    with pytest.raises(ConfigError, match="at least one @hookimpl"):
        make_runtime("plugins=[tests.fakes,runtime.errors]")


@pytest.fixture
def cwd_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A module file in the working directory, which is on sys.path as `python -m` puts it
    there; it leaves a marker file behind if it is ever imported."""
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "imported"
    (work / "tiffin_cwd_mod.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('yes')\n"
        "def assemble(path): return path\n"
    )
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend("")  # "": the working directory, as for `python -m runtime`
    try:
        yield "tiffin_cwd_mod", marker
    finally:
        sys.modules.pop("tiffin_cwd_mod", None)


def test_a_plugin_in_the_working_directory_is_refused_before_it_is_imported(
    make_runtime: MakeRuntime, cwd_module: tuple[str, Path]
) -> None:
    name, marker = cwd_module
    with pytest.raises(ConfigError, match="an installed distribution") as raised:
        make_runtime(f"plugins=[tests.fakes,{name}]")
    assert raised.value.key == "plugins"
    assert f"{name}.py" in raised.value.expected  # where it would have come from
    assert not marker.exists() and name not in sys.modules


def test_a_pkg_source_in_the_working_directory_is_refused_before_it_is_imported(
    make_runtime: MakeRuntime, tmp_path: Path, cwd_module: tuple[str, Path]
) -> None:
    name, marker = cwd_module
    with pytest.raises(ConfigError, match="an installed distribution") as raised:
        make_runtime(*overrides(tmp_path, tmp_path, f"[{{id:x,source:'pkg:{name}'}}]"))
    assert raised.value.key == "integrations.custom_models.settings.models[0].source"
    assert not marker.exists() and name not in sys.modules


async def test_a_pkg_module_that_appears_after_the_config_is_read_is_refused_at_start(
    make_runtime: MakeRuntime, tmp_path: Path, cwd_module: tuple[str, Path]
) -> None:
    name, marker = cwd_module
    aside = str(tmp_path / f"{name}.py")
    os.replace(f"{name}.py", aside)  # not there when the config is read: nothing to refuse
    runtime = make_runtime(*overrides(tmp_path, tmp_path, f"[{{id:x,source:'pkg:{name}'}}]"))
    os.replace(aside, f"{name}.py")
    with pytest.raises(StartupError, match="an installed distribution"):
        await runtime.start()
    assert not marker.exists() and name not in sys.modules


def test_the_cli_never_imports_a_plugin_from_the_working_directory(
    cwd_module: tuple[str, Path],
) -> None:
    name, marker = cwd_module
    result = subprocess.run(
        [PYTHON, "-m", "runtime", "plan", f"plugins=[{name}]"],
        cwd=Path.cwd(),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"tiffin: config error: plugins: got {name!r}")
    assert not marker.exists()


@pytest.mark.parametrize("package", ["os", "subprocess", "os.path", "MARKER.sub", "a/b"])
def test_a_pkg_source_naming_other_code_is_refused_before_import(
    make_runtime: MakeRuntime, tmp_path: Path, marker_module: tuple[str, Path], package: str
) -> None:
    name, marker = marker_module
    package = package.replace("MARKER", name)
    with pytest.raises(ConfigError) as raised:
        make_runtime(*overrides(tmp_path, tmp_path, f"[{{id:x,source:'pkg:{package}'}}]"))
    assert raised.value.key == "integrations.custom_models.settings.models[0].source"
    assert not marker.exists()


@pytest.mark.parametrize(
    "source",
    [
        "/etc/passwd",
        "file:///etc/passwd",
        "../models/x.gguf",
        "hf://org/repo/../../../etc/passwd",
        "hf://../etc/passwd",
    ],
)
async def test_the_pull_endpoint_takes_no_path(make_runtime: MakeRuntime, source: str) -> None:
    runtime = make_runtime()
    await runtime.start()
    async with client(runtime) as http:
        response = await http.post("/admin/models/pull", json={"source": source})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "source" and error["code"] == "invalid_source"
    assert source in error["message"] and "hf://org/repo" in error["message"]


def test_any_origin_with_credentials_is_a_config_error(make_runtime: MakeRuntime) -> None:
    with pytest.raises(ConfigError, match=r"not '\*', when server\.cors\.allow_credentials"):
        make_runtime("server.cors.allow_origins=['*']", "server.cors.allow_credentials=true")


async def test_any_origin_without_credentials_is_allowed(make_runtime: MakeRuntime) -> None:
    async with client(make_runtime("server.cors.allow_origins=['*']")) as http:
        answer = await http.get("/v1/models", headers={"origin": "https://anywhere.example"})
        assert answer.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in answer.headers


def test_files_named_in_engine_settings_are_confined_too(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    gguf_file(tmp_path / "adapter.gguf")
    model = f"[{{id:x,source:tiny.gguf,engine_settings:{{lora_path:'{tmp_path}/adapter.gguf'}}}}]"
    with pytest.raises(ConfigError) as raised:
        make_runtime(*overrides(models_dir, tmp_path / "cache", model))
    assert raised.value.key.endswith("models[0].engine_settings.lora_path")
