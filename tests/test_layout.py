"""Packaging rules: the runtime starts without torch; CI runs the README's test command."""
import re
import subprocess
import sys

from conftest import REPO

RUNTIME_MODULES = ["edge", "edge.bundle", "edge.images", "edge.frames", "edge.sources", "edge.batcher",
                   "edge.engine", "edge.decision", "edge.overlay", "edge.publisher", "edge.subscriber",
                   "edge.pipeline", "edge.synthetic"]


def test_runtime_imports_without_torch():
    code = ("import sys, importlib\n"
            f"for m in {RUNTIME_MODULES!r}: importlib.import_module(m)\n"
            # the CLI parser (used by `linegate run` / `watch`) must not pull torch in either
            "import linegate.cli; linegate.cli.build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", f"runtime imported {out.stdout.strip()}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)\n```", readme, re.S)
    test_cmd = [b for b in blocks if "pytest" in b]
    demo_cmd = [b for b in blocks if "linegate demo" in b]
    assert len(test_cmd) == 1 and "\n" not in test_cmd[0], "README needs exactly one one-line test command"
    assert len(demo_cmd) == 1 and "\n" not in demo_cmd[0], "README needs exactly one one-line demo command"
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmd[0] in ci_lines
    for cmd in (test_cmd[0], demo_cmd[0]):
        assert "constraints-cpu.txt" in cmd  # the CPU torch pin, or pip pulls a CUDA build
    assert "torch==2.13.0" in (REPO / "constraints-cpu.txt").read_text()
