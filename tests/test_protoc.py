"""The gRPC code is generated on demand (runtime/cli/protoc.py): missing or older than its
.proto, it is generated when the package is imported, so a fresh clone works. Every test works
on a copy: the project's own generated files are in use by tests running beside these."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from runtime.cli import protoc
from tests.conftest import PYTHON, ROOT, cli_env


def copy_protos(into: Path) -> Path:
    for proto in protoc.proto_files():
        target = into / proto
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(protoc.PROTO_ROOT / proto, target)
    return into


def test_missing_code_is_generated_and_current_code_left_alone(tmp_path: Path) -> None:
    root = copy_protos(tmp_path / "proto")
    out = tmp_path / "out"
    out.mkdir()
    written = protoc.ensure_generated(out, root)
    assert written == protoc.generated_files(out, root)
    assert all(path.is_file() for path in written)
    assert not [p for p in out.iterdir() if p.name.startswith(".protoc-")]  # scratch removed
    assert protoc.ensure_generated(out, root) == []


def test_code_older_than_its_proto_is_generated_again(tmp_path: Path) -> None:
    root = copy_protos(tmp_path / "proto")
    out = tmp_path / "out"
    out.mkdir()
    written = protoc.ensure_generated(out, root)
    stub = written[0]
    stub.write_text("# stale\n")
    edited = root / protoc.proto_files(root)[0]
    later = stub.stat().st_mtime + 10
    os.utime(edited, (later, later))  # the .proto was edited after the code was generated
    assert protoc.ensure_generated(out, root) == written
    assert stub.read_text() != "# stale\n"


def test_a_fresh_clone_generates_the_code_when_it_is_imported(tmp_path: Path) -> None:
    generated = tuple(f"*{suffix}" for suffix in protoc.SUFFIXES)
    shutil.copytree(
        ROOT / "runtime",
        tmp_path / "runtime",
        ignore=shutil.ignore_patterns("__pycache__", "graphiql", *generated),
    )
    proto_root = tmp_path / "runtime" / "transports" / "proto"
    assert not any(path.exists() for path in protoc.generated_files(proto_root, proto_root))
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            PYTHON,
            "-c",
            "from runtime.transports.proto.tiffin.v1 import inference_pb2, inference_pb2_grpc\n"
            "print(inference_pb2.__file__)",
        ],
        cwd=tmp_path,  # the copy, first on sys.path, is what is imported
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(proto_root)
    assert all(path.is_file() for path in protoc.generated_files(proto_root, proto_root))
