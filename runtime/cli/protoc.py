"""Generates the Python code of the gRPC API from `runtime/transports/proto/**/*.proto` with
grpcio-tools: `*_pb2.py` (messages), `*_pb2.pyi` (their types) and `*_pb2_grpc.py` (client
stubs and servicer bases). The `.proto` files are the source of truth; the generated files are
not committed. `setup.py` runs this for `pip install .` (into the build directory) and
`scripts/setup` for the editable checkout:

    python -m runtime.cli.protoc            # regenerate next to the .proto files
    python -m runtime.cli.protoc OUT_DIR    # into OUT_DIR (the build, the staleness test)

Importing `runtime.transports.proto` runs `ensure_generated()`: code that is missing or older
than its .proto (a fresh clone, an edited .proto) is generated then, so every entry point works
from a clean checkout without that step.

Only the standard library and grpcio-tools are imported, so a build can load this file by path.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "transports" / "proto"
# Where PROTO_ROOT sits among the importable modules.
PACKAGE = "runtime.transports.proto"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# protoc writes `from tiffin.v1 import x_pb2`, as if PROTO_ROOT were on sys.path.
_IMPORT = re.compile(r"^(from|import) (tiffin\.)", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files under `root`, relative to it."""
    return sorted(path.relative_to(root) for path in root.rglob("*.proto"))


def generated_files(out: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """The files `generate(out, root)` writes."""
    return [
        out / proto.with_suffix("").with_name(proto.stem + suffix)
        for proto in proto_files(root)
        for suffix in SUFFIXES
    ]


def generate(out: Path = PROTO_ROOT, root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on every .proto under `root`, writing the Python code under `out`."""
    from grpc_tools import protoc  # build-time dependency only

    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(path) for path in proto_files(root)),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {root}: {' '.join(args[1:])}")
    written = generated_files(out, root)
    for path in written:
        text = path.read_text()
        path.write_text(_IMPORT.sub(rf"\1 {PACKAGE}.\2", text))
    return written


def ensure_generated(out: Path = PROTO_ROOT, root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the code under `out` if a file is missing or older than a .proto under `root`;
    returns what was written ([] when it was current). Each file is written beside its place
    and renamed into it, so processes starting at once (BentoML workers) never import a
    half-written one. Code that is there but stale is kept when it cannot be regenerated
    (grpcio-tools not installed, `out` read-only, as in an installed package)."""
    wanted = generated_files(out, root)
    if not _stale(wanted, root):
        return []
    present = all(path.exists() for path in wanted)
    if importlib.util.find_spec("grpc_tools") is None:
        if present:
            return []
        raise ImportError(
            f"the gRPC code under {out} is not generated and grpcio-tools is not installed: "
            "pip install 'grpcio-tools>=1.85.1,<1.86', or run python -m runtime.cli.protoc "
            "where it is"
        )
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=".protoc-") as scratch:
            for path in generate(Path(scratch), root):
                target = out / path.relative_to(scratch)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    except OSError as exc:
        if present:
            return []
        raise ImportError(f"cannot generate the gRPC code under {out}: {exc}") from exc
    return wanted


def _stale(generated: list[Path], root: Path) -> bool:
    try:
        oldest = min(path.stat().st_mtime for path in generated)
    except (OSError, ValueError):  # one is missing
        return True
    return any((root / proto).stat().st_mtime > oldest for proto in proto_files(root))


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else PROTO_ROOT
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
