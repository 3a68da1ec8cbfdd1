"""fedkd.ops.appguard: the checks a site's app guard makes before it runs a task, on FABs
built the way ``flwr build`` builds them (a zip: the app's files and ``.info/CONTENT``)."""

from __future__ import annotations

import hashlib
import io
import zipfile

from fedkd.config import load_config
from fedkd.ops.appguard import fab_problems, plugin_problems, task_problems
from fedkd.ops.deploy import app_pyproject


def fab(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(".info/CONTENT", "".join(f"{n},{hashlib.sha256(t.encode()).hexdigest()},{len(t)}\n"
                                                  for n, t in files.items()))
    return buffer.getvalue()


FEDKD_APP = fab({"pyproject.toml": app_pyproject(load_config())})


def test_fedkds_own_app_passes():
    assert fab_problems(FEDKD_APP) == []
    digest = hashlib.sha256(FEDKD_APP).hexdigest()
    assert task_problems(fab=FEDKD_APP, fab_hash=digest, run_config={"model.architectures": "mlp-small"}) == []
    assert task_problems(fab=FEDKD_APP, fab_hash=digest, run_config={}, pinned_hashes=[digest]) == []


def test_an_app_with_code_of_its_own_is_refused():
    foreign = fab({"pyproject.toml": app_pyproject(load_config()), "clients/client_app.py": "import os"})
    assert fab_problems(foreign) == [
        "app: carries files other than pyproject.toml (clients/client_app.py); fedkd's app has no code of its own"]


def test_an_app_naming_another_clientapp_or_no_pyproject_is_refused():
    other = app_pyproject(load_config()).replace('clientapp = "clients.client_app:app"', 'clientapp = "os:system"')
    assert fab_problems(fab({"pyproject.toml": other})) == [
        "app: clientapp must be 'clients.client_app:app'; got 'os:system'"]
    assert fab_problems(b"not a zip") == ["app: not a readable FAB with a pyproject.toml (BadZipFile)"]
    assert fab_problems(fab({})) == ["app: not a readable FAB with a pyproject.toml (KeyError)"]


def test_import_paths_in_the_run_config_need_the_sites_consent():
    config = {"model.architectures": ["mlp-small", "evil.mod:Net"], "data.dataset": "digits", "run-name": "a"}
    assert plugin_problems(config) == [
        "run config model.architectures: import path 'evil.mod:Net' not allowed on this site "
        "(allowed: none; fedkd deploy supernode --allow-plugin)"]
    assert plugin_problems(config, allowed=["evil.mod:Net"]) == []


def test_a_hash_that_is_not_the_contents_or_not_pinned_is_refused():
    problems = task_problems(fab=FEDKD_APP, fab_hash="0" * 64, run_config={}, pinned_hashes=["1" * 64])
    assert [p.split(" ")[1] for p in problems] == ["announced", "hash"]
