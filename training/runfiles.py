"""Reading a run directory's JSON files (run.json, split.json, metrics.json) with errors that
name the file, the missing key and the command that writes it again.

Run directories get copied, hand-edited and cut short by a full disk; a bare json or KeyError
traceback says none of that, and the CLI only reports ValueError / FileNotFoundError cleanly.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def retrain_hint(run_dir: Path) -> str:
    return f"re-train the run (`linegate train DATA --normal-class NAME --out {run_dir}`)"


def reevaluate_hint(run_dir: Path) -> str:
    return f"re-run `linegate evaluate {run_dir}`"


def remedy(path: Path) -> str:
    """What writes `path` again: metrics.json comes from evaluate, the rest from train."""
    return reevaluate_hint(path.parent) if path.name == "metrics.json" else retrain_hint(path.parent)


def read_run_json(path: str | Path, required: Iterable[str] = ()) -> dict:
    """The JSON object in `path`, checked to hold every `required` key ("a.b" for nested keys).

    A missing file is a FileNotFoundError, unreadable JSON or a missing key a ValueError; both
    name the file and say what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {remedy(path)}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); {remedy(path)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}; {remedy(path)}")
    for key in required:
        require(data, key, path)
    return data


def require(data: dict, key: str, path: Path) -> object:
    """data[a][b] for key "a.b"; a ValueError naming the file and key when it is absent."""
    node: object = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{path}: no key {key!r}; {remedy(path)}")
        node = node[part]
    return node
