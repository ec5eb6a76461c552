import re
import tomllib
from pathlib import Path

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
