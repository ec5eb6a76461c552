import re
import sys
from pathlib import Path

import pytest

# packaging comes with pytest (a dependency of every pytest this suite runs on)
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_extra_a_set_up_script_installs_is_declared_in_pyproject():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    asked = set()
    for script in (ROOT / "scripts").glob("*.sh"):
        for args in re.findall(r'scripts/setup\.sh "\$\{[A-Z_]+:?-([^}]*)\}"|scripts/setup\.sh "([^"$]*)"', script.read_text()):
            asked.update(e.strip() for group in args for e in group.split(",") if e.strip())
    assert asked, "no set-up call found: the pattern no longer matches the scripts"
    # pip only warns about an extra a package does not declare, and installs nothing for it
    assert asked <= declared, f"extras {sorted(asked - declared)} are not in pyproject.toml"


# what the benchmarks alone need: they run in the main set-up only (README, "Supported versions")
UNPINNED = {"nilearn", "nncf"}


def test_each_floor_pyproject_states_is_the_version_the_oldest_check_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stated = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    floors: dict[str, set[Version]] = {}
    for req in map(Requirement, stated):
        lower = [spec for spec in req.specifier if spec.operator in (">=", "==", "~=")]
        assert len(lower) == 1, f"{req}: state one floor with >= so that the oldest check can pin it"
        floors.setdefault(canonicalize_name(req.name), set()).add(Version(lower[0].version))
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints-oldest.txt").read_text().splitlines()]
    pins = {}
    for pin in map(Requirement, filter(None, lines)):
        (spec,) = pin.specifier
        assert spec.operator == "==", f"constraints-oldest.txt: {pin} is not a pin"
        pins[canonicalize_name(pin.name)] = Version(spec.version)
    assert set(pins) == set(floors) - UNPINNED, "constraints-oldest.txt must pin each package pyproject.toml gives a floor"
    moved = {name: (sorted(map(str, floors[name])), str(pin)) for name, pin in pins.items() if floors[name] != {pin}}
    assert not moved, f"floors in pyproject.toml != pin in constraints-oldest.txt: {moved}"
    script = (ROOT / "scripts" / "check_versions.sh").read_text()
    (oldest_python,) = re.findall(r'oldest\) python="\$\{python:-python(3\.\d+)\}"', script)
    (requires,) = [spec.version for spec in SpecifierSet(project["requires-python"]) if spec.operator == ">="]
    assert Version(oldest_python) == Version(requires)


def test_the_monailabel_test_waits_for_the_set_up_beside_the_suite_and_fails_with_its_log(tmp_path):
    from tests.bundles.test_monailabel import wait_for_setup

    status, log = tmp_path / "monailabel", tmp_path / "setup.log"
    wait_for_setup(None, log)  # no set-up beside the suite: nothing to wait for
    with pytest.raises(pytest.fail.Exception, match="did not end in 0 s"):
        wait_for_setup(str(status), log, timeout=0.2)
    log.write_text("ERROR: No matching distribution found for monailabel\n")
    status.write_text("1\n")
    with pytest.raises(pytest.fail.Exception, match="(?s)exit status 1.*No matching distribution found for monailabel"):
        wait_for_setup(str(status), log)
    status.write_text("0\n")
    wait_for_setup(str(status), log)


class _Test:
    def __init__(self, path: str, *markers: str) -> None:
        self.path, self.markers = Path(path), markers

    def get_closest_marker(self, name: str) -> object:
        return name if name in self.markers else None


def test_a_file_waiting_for_a_set_up_comes_after_the_files_with_slow_tests_and_before_the_rest(monkeypatch):
    from tests.conftest import pytest_collection_modifyitems

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    items = [
        _Test("fast.py"),
        _Test("waits.py", "slow", "waits_for_setup"),
        _Test("waits.py", "slow", "waits_for_setup"),
        _Test("one_slow.py", "slow"),
        _Test("two_slow.py", "slow"),
        _Test("two_slow.py", "slow"),
    ]
    pytest_collection_modifyitems(items)
    assert [item.path.name for item in items] == ["two_slow.py", "two_slow.py", "one_slow.py", "waits.py", "waits.py", "fast.py"]


def _make_venv(folder: Path, **env: str):
    import os
    import subprocess

    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "make_venv.sh"), str(folder)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )


def test_a_venv_an_interrupted_set_up_left_without_pip_is_made_again(tmp_path):
    import subprocess

    # what Ctrl-C during venv's ensurepip leaves: a bin/python that runs, and no pip (set-up, demo and tests then
    # stopped with "No module named pip" until the user found and removed the folder)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    made = _make_venv(tmp_path / "venv", PYTHON=sys.executable)
    assert made.returncode == 0, made.stderr
    assert "is not a working venv" in made.stderr
    subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import pip"], check=True, timeout=60)
    again = _make_venv(tmp_path / "venv", PYTHON=sys.executable)  # a working one is kept as it is
    assert again.returncode == 0 and again.stderr == ""


def test_a_python_older_than_the_project_takes_is_named_with_what_to_do_and_nothing_is_made(tmp_path):
    old = tmp_path / "python3"
    old.write_text('#!/bin/sh\ncase "$1" in -V) echo "Python 3.9.18";; *) exit 1;; esac\n')
    old.chmod(0o755)
    made = _make_venv(tmp_path / "venv", PYTHON=str(old))
    assert made.returncode == 1
    assert f"needs Python 3.10 or newer (CI and the README's figures use 3.11), and {old} is Python 3.9.18" in made.stderr
    assert "PYTHON=/path/to/python3.11" in made.stderr and not (tmp_path / "venv").exists()
    missing = _make_venv(tmp_path / "venv", PYTHON=str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "nowhere does not exist" in missing.stderr


def test_the_oldest_python_the_set_up_takes_is_the_one_pyproject_states():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requires,) = [spec.version for spec in SpecifierSet(project["requires-python"]) if spec.operator == ">="]
    script = (ROOT / "scripts" / "make_venv.sh").read_text()
    (floor,) = set(re.findall(r"sys\.version_info < \((\d+), (\d+)\)", script))
    assert Version(".".join(floor)) == Version(requires) and f"Python {requires} or newer" in script
