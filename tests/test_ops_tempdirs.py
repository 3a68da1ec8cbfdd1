"""fedkd.ops.tempdirs: a killed run's temporary app folder is removed at the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from fedkd.ops.tempdirs import owned_temp_dir, remove_stale

HOLD = """
import sys, time
from fedkd.ops.tempdirs import owned_temp_dir
with owned_temp_dir("fedkd-app-", root=sys.argv[1]) as path:
    (path / "pyproject.toml").write_text("x")
    print(path, flush=True)
    time.sleep(120)
"""


def test_a_killed_runs_folder_goes_at_the_next_start_a_live_ones_stays(tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        killed_dir, live_dir = killed.stdout.readline().strip(), live.stdout.readline().strip()
        killed.send_signal(signal.SIGKILL)  # no chance to clean up
        killed.wait(timeout=30)
        assert os.path.isdir(killed_dir)
        (tmp_path / "fedkd-app-notapid").mkdir()  # not of the pattern: left alone
        with owned_temp_dir("fedkd-app-", root=tmp_path) as mine:
            assert mine.name.startswith(f"fedkd-app-{os.getpid()}-")
            assert not os.path.exists(killed_dir) and os.path.isdir(live_dir)
        assert not mine.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fedkd-app-notapid", os.path.basename(live_dir)])
    finally:
        live.kill()
        live.wait(timeout=30)
    assert [p.name for p in remove_stale("fedkd-app-", root=tmp_path)] == [os.path.basename(live_dir)]
