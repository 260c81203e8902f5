"""
Print pip constraints that pin the core libraries (Twisted, Autobahn,
txredisapi) to the lowest or the highest release that pyproject.toml allows,
as the package index offers them.

    python .ci/versions.py lowest > lowest.txt
    pip install -c lowest.txt -e '.[test]'
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

CORE = ("twisted", "autobahn", "txredisapi")


def available(name: str) -> list[Version]:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"Available versions: (.+)", out)
    if match is None:
        raise SystemExit(f"pip index versions {name}: no versions in {out!r}")
    versions = []
    for v in match.group(1).split(","):
        try:
            versions.append(Version(v.strip()))
        except InvalidVersion:  # an old upload's name, such as autobahn's 0.3.1.win32
            continue
    return versions


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "lowest"
    if which not in ("lowest", "highest"):
        raise SystemExit("usage: versions.py lowest|highest")
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    for spec in project["project"]["dependencies"]:
        req = Requirement(spec)
        if req.name.lower() not in CORE:
            continue
        allowed = sorted(v for v in available(req.name) if not v.is_prerelease and v in req.specifier)
        if not allowed:
            raise SystemExit(f"no release of {req.name} satisfies {req.specifier}")
        print(f"{req.name}=={allowed[0] if which == 'lowest' else allowed[-1]}")


if __name__ == "__main__":
    main()
