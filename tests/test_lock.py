"""The lock, the cluster environment and the installed environment agree (docs/install.md).

requirements/lock.txt (hashed pins), requirements/torch.txt (torch by version) and environment.yml
(the same pins for conda) are all generated from pyproject.toml by `make lock`; these tests read
each file independently and fail when one was edited or regenerated without the others.
"""
from __future__ import annotations

import re
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(\\)?$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from requirements/lock.txt, read line by line."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        match = PIN_LINE.match(line)
        if match:
            current = normalise(match.group(1))
            assert current not in entries, f"{current} is pinned twice in the lock"
            entries[current] = (match.group(2), [])
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            entries[current][1].append(line.strip().split(":", 1)[1].rstrip(" \\"))
        elif line and not line.lstrip().startswith("#"):
            raise AssertionError(f"unexpected line in the lock: {line!r}")
    return entries


def torch_pin() -> str:
    lines = [line for line in (ROOT / "requirements" / "torch.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("torch=="), lines
    return lines[0].split("==", 1)[1]


def test_every_locked_package_is_pinned_with_a_hash_and_torch_is_left_to_its_own_file():
    entries = lock_entries()
    assert len(entries) > 50
    for name, (version, hashes) in entries.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in hashes), name
    build_specific = [name for name in entries if re.match(r"^(torch|triton|nvidia-.*|cuda-.*)$", name)]
    assert build_specific == []
    assert re.fullmatch(r"\d+\.\d+\.\d+", torch_pin())


def test_the_lock_satisfies_pyproject_and_holds_every_direct_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]
    locked = {name: version for name, (version, _) in lock_entries().items()}
    locked["torch"] = torch_pin()
    for requirement in requirements:
        name = normalise(requirement.name)
        assert name in locked, f"{name} is a dependency in pyproject.toml but not in the lock"
        assert requirement.specifier.contains(locked[name]), \
            f"lock pins {name}=={locked[name]}, outside pyproject's {requirement.specifier}"


def test_environment_yml_installs_exactly_the_lock_and_torch_through_pip():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [item for item in environment["dependencies"] if isinstance(item, str)]
    assert "python=3.11" in conda and "pip" in conda
    assert not any(item.startswith(("pytorch", "torch")) for item in conda), "torch must come through pip"
    (pip_section,) = [item["pip"] for item in environment["dependencies"] if isinstance(item, dict)]
    assert "-e ." in pip_section
    pinned = dict(line.split("==", 1) for line in pip_section if "==" in line)
    pinned = {normalise(name): version for name, version in pinned.items()}
    expected = {name: version for name, (version, _) in lock_entries().items()} | {"torch": torch_pin()}
    assert pinned == expected


def test_the_test_environment_is_the_locked_one():
    """Tests run on what the lock installs (`make test`): a drifted environment fails here first."""
    installed = {normalise(dist.metadata["Name"]): dist.version for dist in distributions()}
    locked = {name: version for name, (version, _) in lock_entries().items()} | {"torch": torch_pin()}
    drifted = {name: (version, installed.get(name)) for name, version in locked.items()
               if (installed.get(name) or "").split("+")[0] != version}
    assert drifted == {}, f"installed versions differ from the lock (lock, installed): {drifted}; run `make setup`"
