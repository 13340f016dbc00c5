"""Helpers for the control tests: a second kind of tiny bundle whose scores tell which bundle
judged a frame, a running `linegate run` with a control endpoint, and waits."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from conftest import free_tcp_endpoint, make_tiny_bundle
from runtime_helpers import Collector, RunProcess, write_config


def make_offset_bundle(path: Path, size: int = 48, offset: float = 10.0, model_id: str = "tiny-offset",
                       threshold: float | None = None) -> Path:
    """A real ONNX bundle like make_tiny_bundle but every score and map value is `offset`
    higher (its scores are >= offset, the tiny bundle's <= 1): a decision's score says which
    of the two judged it. Its own input size and model id."""
    import onnx
    from onnx import TensorProto, helper

    from edge.bundle import write_manifest

    make_tiny_bundle(path, size=size)
    model = onnx.load(path / "model.onnx")
    graph = model.graph
    half = size // 2
    for node in graph.node:  # rename the outputs, then add the offset to them
        node.output[:] = [{"anomaly_map": "raw_map", "score": "raw_score"}.get(o, o) for o in node.output]
        node.input[:] = [{"anomaly_map": "raw_map"}.get(i, i) for i in node.input]
    graph.initializer.append(helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]))
    graph.node.append(helper.make_node("Add", ["raw_map", "offset"], ["anomaly_map"]))
    graph.node.append(helper.make_node("Add", ["raw_score", "offset"], ["score"]))
    onnx.checker.check_model(model)
    onnx.save(model, path / "model.onnx")
    import json

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["model_id"] = model_id
    manifest["decision"]["threshold"] = offset + 0.5 if threshold is None else threshold
    manifest["decision"]["normalisation"] = {"min": offset, "max": offset + 1.0}
    manifest["display_range"] = [offset, offset + 1.0]
    assert manifest["outputs"]["map"]["shape"] == [-1, half, half]
    write_manifest(path, manifest)
    return path


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def start_line(tmp_path: Path, bundle: Path, sources: list[dict], topics=("decision", "event", "stats"),
               control: dict | None = None, publisher: dict | None = None, extra: dict | None = None,
               name: str = "line", collector_kwargs: dict | None = None,
               env: dict | None = None) -> tuple[RunProcess, Collector, str, Path]:
    """`linegate run --config` with a control endpoint; a Collector already connected.
    Returns (process, collector, control endpoint, config path)."""
    pub = {"endpoint": free_tcp_endpoint(), "wait_subscribers": len(topics), "wait_timeout_s": 20.0,
           **(publisher or {})}
    ctl = {"endpoint": free_tcp_endpoint(), **(control or {})}
    config = {"engine": {"bundle": str(bundle)}, "batching": {"max_batch": 4, "max_wait_ms": 5.0},
              "publisher": pub, "control": ctl, **(extra or {}), "source": sources}
    path = write_config(tmp_path / f"{name}.toml", config)
    run = RunProcess(path, tmp_path / f"{name}.log", env=env)
    collector = Collector(pub["endpoint"], topics, **(collector_kwargs or {}))
    collector.start()
    return run, collector, ctl["endpoint"], path
