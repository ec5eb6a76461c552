import re
import sys
from pathlib import Path

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
