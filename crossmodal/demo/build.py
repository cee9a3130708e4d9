"""Build the demo model folders atomically and at most once.

A folder counts as finished only when ``demo_model.json`` is in it; that file is written last,
inside a temporary sibling folder that is then renamed into place, so a crash or a concurrent
builder never leaves a half-written model where the feature service would load it. A lock file
makes concurrent callers (parallel test sessions, ``make run``) wait for one build instead of
training twice. This module imports torch only when it has to build.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEMO_INFO = "demo_model.json"
DEFAULT_MODEL_DIR = Path("var/demo/model")


def is_finished_model(path: Path) -> bool:
    """Whether ``path`` holds a complete demo model (its info file is written last)."""
    return (path / DEMO_INFO).is_file() and (path / "config.json").is_file()


def read_info(path: Path) -> dict[str, Any]:
    return json.loads((path / DEMO_INFO).read_text(encoding="utf-8"))


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_atomically(path: Path, build: Callable[[Path], object], *, force: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(path):
        if is_finished_model(path) and not force:
            return path
        if path.exists() and any(path.iterdir()) and not is_finished_model(path) and not force:
            # Never delete a folder we did not write.
            raise FileExistsError(f"{path} exists and is not a demo model; pass force to replace")
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            if path.exists():
                old = path.with_name(f"{path.name}.old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _train_into(seed: int) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        from crossmodal.demo.model import save_model_dir
        from crossmodal.demo.train import train

        result = train(seed=seed)
        info = {**result.info(), "seed": seed}
        save_model_dir(result.model, out, info)
        return info

    return build


def ensure_demo_model(path: str | Path = DEFAULT_MODEL_DIR, *, force: bool = False) -> Path:
    """The trained tiny CLIP at ``path``: trained (about 10-30 s on two cores) and saved unless
    the folder already holds a finished one. Raises ``TrainingFailed`` if it does not align."""
    path = Path(path)
    if is_finished_model(path) and not force:
        return path
    log.info("building the demo model in %s", path)
    return _build_atomically(path, _train_into(seed=0), force=force)


def ensure_random_model(path: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """An untrained tiny CLIP at ``path`` (seconds): real plumbing, meaningless vectors."""
    path = Path(path)
    if is_finished_model(path) and not force:
        return path

    def build(out: Path) -> None:
        from crossmodal.demo.model import build_random_model

        build_random_model(out, seed=seed)

    return _build_atomically(path, build, force=force)
