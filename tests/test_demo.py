import re
import subprocess

from conftest import linegate_cmd


def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run(linegate_cmd("demo", "--workdir", str(tmp_path / "demo"), "--frames", "60"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "decisions received: 60, sequence gaps: 0" in text
    decisions = re.findall(r"^\S+ line1 #(\d+) (ACCEPT|REJECT) ", text, re.M)
    assert [int(i) for i, _ in decisions] == list(range(60))
    accuracy = float(re.search(r"accuracy against the generator's labels: ([0-9.]+)", text).group(1))
    assert accuracy >= 0.9  # against the generator's own labels (0.985 over the default 200 frames, session 13)
    assert (tmp_path / "demo" / "run" / "bundle" / "manifest.json").is_file()
