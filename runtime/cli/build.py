"""`python -m runtime build [--gpu] [hydra overrides...]`: a Bento that serves one config.

Composes the config exactly like `plan` (same overrides, same validation), bakes it into
`bentos/baked/` (runtime/bake.py), runs `bentoml build` on `bentofile.yaml` (CPU) or
`bentofile.gpu.yaml` (`--gpu`: CUDA base image, the `gpu` extra, `serving.api_gpus=1` unless
the overrides set it) with the image's TIFFIN_ENV set to the baked env, removes the baked files
again and prints the tag and the next command.

Exit codes: 0 built, 1 a baked config is already there, 2 the config is invalid, else
`bentoml build`'s own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

import handlers
from runtime.app import Runtime, to_settings
from runtime.bake import BAKED_DIR, bake, is_baked, unbake
from runtime.config import compose
from runtime.errors import ConfigError
from runtime.telemetry.logging import configure_logging

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CPU_BENTOFILE = "bentofile.yaml"
GPU_BENTOFILE = "bentofile.gpu.yaml"
TAG_PREFIX = "__tag__:"
USAGE = """\
usage: python -m runtime build [--gpu] [key=value ...]

Composes the config like `plan` (same overrides), bakes it into a Bento with `bentoml build`
and prints the plan, the tag and `bentoml containerize <tag>`. --gpu: bentofile.gpu.yaml (CUDA
image, exllamav2, serving.api_gpus=1). In the container, TIFFIN_OVERRIDES and TIFFIN_ENV apply
on top of the baked config."""


def build_main(args: Sequence[str]) -> int:
    """The `build` verb: `args` are `--gpu` and Hydra overrides."""
    if "--help" in args or "-h" in args:
        print(USAGE)
        return 0
    gpu = "--gpu" in args
    overrides = [a for a in args if a != "--gpu"]
    if gpu and not any(o.lstrip("+").startswith("serving.api_gpus=") for o in overrides):
        overrides.append("serving.api_gpus=1")
    try:
        cfg = compose(overrides)
        configure_logging(to_settings(cfg).logging)  # as `plan` does: stdout is the plan
        plan = Runtime(cfg, builtins=handlers.builtin_plugins()).plan()
    except ConfigError as error:
        print(f"tiffin: config error: {error}", file=sys.stderr)
        return 2
    if is_baked(BAKED_DIR):
        # Never package a config this build did not compose; nor race another build.
        print(
            f"tiffin: {BAKED_DIR} exists: another build is running, or a killed one left it "
            "(remove it and build again)",
            file=sys.stderr,
        )
        return 1
    bentofile = GPU_BENTOFILE if gpu else CPU_BENTOFILE
    print(json.dumps(plan, indent=2))
    bake(cfg, overrides, plan, BAKED_DIR)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            options = Path(scratch) / bentofile
            options.write_text(with_env(PROJECT_ROOT / bentofile, str(cfg.env)))
            result = subprocess.run(
                [sys.executable, "-m", "bentoml", "build", "-f", str(options), "--output", "tag"],
                cwd=PROJECT_ROOT,
                env={"BENTOML_DO_NOT_TRACK": "true", **os.environ},
                stdout=subprocess.PIPE,
                text=True,
                check=False,
            )
    finally:
        unbake(BAKED_DIR)
    if result.returncode != 0:
        print(result.stdout, end="")
        print(f"tiffin: bentoml build -f {bentofile} failed", file=sys.stderr)
        return result.returncode
    tag = built_tag(result.stdout)
    print(f"built {tag} ({bentofile}) serving the plan above")
    print(f"next: bentoml containerize {tag}")
    return 0


def with_env(bentofile: Path, env: str) -> str:
    """`bentofile` with the image's TIFFIN_ENV set to the baked config's env, so that only an
    operator's own TIFFIN_ENV differs from it (and then switches env: runtime/bake.py)."""
    options = OmegaConf.to_container(OmegaConf.load(bentofile))
    assert isinstance(options, dict), bentofile
    envs = [e for e in options.get("envs", []) if e["name"] != "TIFFIN_ENV"]
    options["envs"] = [{"name": "TIFFIN_ENV", "value": env}, *envs]
    return OmegaConf.to_yaml(OmegaConf.create(options))


def built_tag(output: str) -> str:
    """The tag in `bentoml build --output tag`'s output (`__tag__:name:version`)."""
    for line in output.splitlines():
        if line.startswith(TAG_PREFIX):
            return line.removeprefix(TAG_PREFIX).strip()
    raise RuntimeError(f"bentoml build printed no {TAG_PREFIX} line: {output[-500:]!r}")
