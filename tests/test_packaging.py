"""A non-editable install carries the whole package: the wheel built from the tracked files holds every module,
preset and asset, and the ``gsq-hf`` entry point names a module that is in it (an editable install hides a
subpackage missing from pyproject's list: its finder resolves the source tree)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in tracked.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(source), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    return zipfile.ZipFile(next(out.glob("gsq_hf-*.whl")))


def test_wheel_holds_every_module_preset_and_asset(wheel):
    names = set(wheel.namelist())
    package = ROOT / "gsq_hf"
    tracked = subprocess.run(["git", "ls-files", "gsq_hf", "configs"], cwd=ROOT, capture_output=True, text=True)
    expected = set()
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if name.startswith("configs/"):
            if path.parent == ROOT / "configs" and path.suffix == ".yaml":
                expected.add("gsq_hf/configs/" + path.name)  # presets; configs/examples are docs, not shipped
        elif path.suffix == ".py" or path.is_relative_to(package / "assets"):
            expected.add(name)
    assert expected and not expected - names, sorted(expected - names)


def test_wheel_entry_point_names_a_shipped_module(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    scripts = dict(line.replace(" ", "").split("=", 1) for line in wheel.read(entry_points).decode().splitlines()
                   if "=" in line)
    module, _, function = scripts["gsq-hf"].partition(":")
    assert (module, function) == ("gsq_hf.cli", "main")
    assert "gsq_hf/cli/__init__.py" in wheel.namelist()
