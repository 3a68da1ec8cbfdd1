"""The README's Python example runs as written (in-process runner; its run goes to runs/ in
a temporary working directory, the config file is the repository's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_python_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'runner="inprocess"' in code
    code = code.replace('"simulations/digits.toml"', repr(str(ROOT / "simulations" / "digits.toml")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.splitlines()[0].split()
    assert first[0] == "completed" and 0.0 <= float(first[1]) <= 1.0
    assert Path(first[2]).parent == (tmp_path / "runs").resolve()
    assert "| run | method |" in done.stdout
