"""The run directory `python -m runtime` serves from (`server.run_dir/<time>-<pid>`): the
resolved `config.yaml` the workers load (TIFFIN_CONFIG), `plan.json`, and `workers/<pid>`, one
empty file per serving worker, so the CLI can pass a SIGHUP on to them (bentos/config_file.py)."""

from __future__ import annotations

from pathlib import Path

WORKERS_DIR = "workers"


def worker_file(run_dir: Path, pid: int) -> Path:
    return run_dir / WORKERS_DIR / str(pid)


def worker_pids(run_dir: Path) -> list[int]:
    """The workers serving from `run_dir`."""
    folder = run_dir / WORKERS_DIR
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
