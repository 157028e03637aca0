"""Stage caching: each stage of a build writes its outputs and a ``<stage>.done.json``
marker holding a fingerprint of its inputs. A rerun with the same fingerprint loads the
outputs instead of recomputing them, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


# The one rule that keeps cache keys valid when a config grows: a field added later, whose default
# reproduces what the code did before it existed, is declared with ``added_field(default)``; left at
# that default it is not hashed, so the key is the one computed before the field existed (and every
# cached stage keyed by it stays valid). Set to anything else, it is hashed like any field.
_OMIT_AT_DEFAULT = "fingerprint_omits_at_default"


# A field that cannot change a stage's output (how often a learning curve is sampled, say) is
# declared with ``unhashed_field(default)`` and never hashed.
_NEVER_HASHED = "fingerprint_never_hashes"


def added_field(default: Any, **kwargs: Any) -> Any:
    """A dataclass field added after caches keyed without it existed: see ``fingerprint``."""
    return dataclasses.field(default=default, metadata={_OMIT_AT_DEFAULT: True}, **kwargs)


def unhashed_field(default: Any, **kwargs: Any) -> Any:
    """A dataclass field that does not change the stage's output: ``fingerprint`` ignores it."""
    return dataclasses.field(default=default, metadata={_NEVER_HASHED: True}, **kwargs)


def _key_form(value: Any) -> Any:
    """``to_jsonable`` for hashing: fields declared with ``added_field`` left at their default are dropped."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _key_form(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get(_NEVER_HASHED)
                and not (f.metadata.get(_OMIT_AT_DEFAULT) and getattr(value, f.name) == f.default)}
    if isinstance(value, dict):
        return {str(k): _key_form(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_key_form(v) for v in value]
    return to_jsonable(value)


def fingerprint(*parts: Any) -> str:
    """A short key for ``parts`` (dataclasses, dicts, sequences, arrays, scalars); fields declared
    with ``added_field`` count only when they differ from their default, ``unhashed_field`` never."""
    blob = json.dumps([_key_form(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, doc: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(doc), indent=1, allow_nan=False))
    os.replace(tmp, path)


class StageRunner:
    """Runs named stages in a work directory, skipping those already done with the same inputs."""

    def __init__(self, work_dir: Path, log: Callable[[str], None] = print):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.timings_s: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    def marker(self, name: str) -> Path:
        return self.work_dir / f"{name}.done.json"

    def run(self, name: str, key: str, compute: Callable[[Path], T], load: Callable[[Path], T]) -> T:
        stage_dir = self.work_dir / name
        marker = self.marker(name)
        if marker.exists():
            try:
                done = json.loads(marker.read_text())
            except json.JSONDecodeError:
                done = {}
            if done.get("key") == key:
                self.log(f"[{name}] cached ({stage_dir})")
                self.cached[name] = True
                self.timings_s[name] = float(done.get("seconds", 0.0))
                return load(stage_dir)
            self.log(f"[{name}] inputs changed: recomputing")
            marker.unlink()
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        result = compute(stage_dir)
        seconds = time.perf_counter() - t0
        write_json_atomic(marker, {"key": key, "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.timings_s[name] = seconds
        self.cached[name] = False
        self.log(f"[{name}] done in {seconds:.1f} s")
        return result
