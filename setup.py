"""Build hook: generate the gRPC code from runtime/transports/proto/**/*.proto with grpcio-tools
(a build requirement) whenever the package is built, so `pip install .` and wheels carry it.
An editable install generates it beside the .proto files. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _protoc() -> ModuleType:
    # By path: the package's own imports are not installed while it is being built.
    spec = importlib.util.spec_from_file_location(
        "tiffin_protoc", ROOT / "runtime" / "cli" / "protoc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()
        protoc = _protoc()
        if self.editable_mode:
            protoc.generate()
        else:
            protoc.generate(Path(self.build_lib) / "runtime" / "transports" / "proto")


setup(cmdclass={"build_py": BuildPyWithProtos})
