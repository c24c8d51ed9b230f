"""Print a pip constraints file that pins every direct dependency (runtime and the dev extra) to its floor in
pyproject.toml: installing with it (`pip install -c FILE -e '.[dev]'`) builds the oldest environment the project
claims to support, so CI proves the floors instead of trusting them."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
for requirement in requirements:
    floor = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([^,\s]+).*", requirement)
    if floor is None:
        sys.exit(f"pyproject.toml: '{requirement}' has no '>=' floor to test")
    print(f"{floor[1]}=={floor[2]}")
