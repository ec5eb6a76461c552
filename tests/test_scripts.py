import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
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


def test_each_floor_pyproject_states_is_the_version_the_oldest_check_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    checked = [Requirement(r) for r in [*project["dependencies"], *extras["test"], *extras["deploy"], *extras["fast"]]]
    pins = dict(
        line.split("==") for line in (ROOT / "constraints-oldest.txt").read_text().splitlines() if line and not line.startswith("#")
    )
    floors = {}
    for req in checked:
        (floor,) = [spec.version for spec in req.specifier if spec.operator == ">="]
        floors[req.name] = floor
    assert set(pins) == set(floors), "constraints-oldest.txt must pin exactly the packages whose floors pyproject.toml states"
    moved = {name: (floor, pins[name]) for name, floor in floors.items() if Version(floor) != Version(pins[name])}
    assert not moved, f"floor in pyproject.toml != pin in constraints-oldest.txt: {moved}"
    script = (ROOT / "scripts" / "check_versions.sh").read_text()
    (oldest_python,) = re.findall(r'oldest\) python="\$\{2:-python(3\.\d+)\}"', script)
    assert Version(oldest_python) == Version(project["requires-python"].removeprefix(">="))
