"""`make gpu-wheels`: the locked transformers and every runtime dependency it pulls in, as wheels for the
offline GPU machine (Python 3.12, Linux x86_64), in .whl/ (ignored; carried by the device tool).

That machine has CUDA torch 2.11 and transformers 5.17 but no internet, and the adapter refuses an
untested transformers (ficoco/models/guard.py). tools/gpu-bench.sh installs these wheels over the
image's packages. The dependency closure is read from the metadata of the lock's .venv (run with its
python), markers evaluated for the target; every version comes from requirements/lock.txt. numpy is
left to the image: its CUDA torch was built and tested with the image's numpy, which satisfies
transformers' numpy>=1.17.
"""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
WHEELS = ROOT / ".whl"
ROOTS = ("transformers",)
IMAGE_KEEPS = {"numpy"}              # the image's own, see above
# the GPU machine: python3 is CPython 3.12.3 on Linux x86_64 (/work/.library/device/KINDS.md)
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
# pip matches a manylinux tag exactly: the ones the locked wheels are published under
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def lock_entries(path: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """Canonical name -> (version, its sha256 hashes) of every pinned entry of the lock."""
    entries, current = {}, None
    for line in path.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        digest = re.match(r"^\s+--hash=(sha256:[0-9a-f]{64})", line)
        if pin:
            current = entries[canonicalize_name(pin[1])] = (pin[2], [])
        elif digest and current is not None:
            current[1].append(digest[1])
        elif not line.startswith(" "):
            current = None
    return entries


def closure(roots=ROOTS) -> list[str]:
    """Canonical names of `roots` and everything they require on the target, less IMAGE_KEEPS, sorted."""
    found, queue = set(), list(roots)
    while queue:
        name = canonicalize_name(queue.pop())
        if name in found or name in IMAGE_KEEPS:
            continue
        found.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            sys.exit(f"gpu-wheels: {name} is required but not installed in {sys.prefix}; run `make setup` "
                     f"(the lock's .venv) and run this with .venv/bin/python")
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(TARGET):
                queue.append(requirement.name)
    return sorted(found)


def main() -> int:
    entries = lock_entries()
    names = closure()
    missing = [name for name in names if name not in entries or not entries[name][1]]
    if missing:
        sys.exit(f"gpu-wheels: {', '.join(missing)} not pinned with hashes in {LOCK.relative_to(ROOT)}; run `make lock`")
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):            # two versions of one package would stop the install there
        old.unlink()
    # the pins with the lock's hashes: pip checks every download against them, and the GPU machine's install too
    requirements = WHEELS / "requirements.txt"
    requirements.write_text("".join(
        f"{name}=={entries[name][0]}" + "".join(f" \\\n    --hash={digest}" for digest in entries[name][1]) + "\n"
        for name in names))
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", TARGET["python_version"], "--implementation", "cp", *platforms,
                    "--dest", str(WHEELS), "--requirement", str(requirements)], check=True)
    wheels = sorted(WHEELS.glob("*.whl"))
    got = sorted(canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels)
    if got != names:
        sys.exit(f"gpu-wheels: expected one wheel each of {names}; .whl/ holds {[w.name for w in wheels]}")
    size = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in .whl/ (pins and hashes: .whl/requirements.txt); "
          f"left to the GPU image: {', '.join(sorted(IMAGE_KEEPS))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
