"""environment.yml carries what pyproject.toml's default install and extras need, no test tools."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> set[str]:
    """'dask[distributed]>=2024.8' → {'dask', 'distributed'}; 'napari[pyqt6]' → {'napari'}."""
    m = re.match(r"\s*([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", requirement)
    assert m, requirement
    names = {m.group(1).lower().replace("_", "-")}
    if m.group(1).lower() == "dask" and m.group(3):
        names |= {e.strip().lower() for e in m.group(3).split(",")}
    return names


def _conda_names() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    names: set[str] = set()
    for dep in env["dependencies"]:
        for item in dep["pip"] if isinstance(dep, dict) else [dep]:
            if not item.startswith("-e"):
                names |= _name(item)
    return names


def test_environment_yml_has_the_runtime_dependencies_and_no_test_tools():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    runtime = list(project["dependencies"])
    for extra, requirements in extras.items():
        if extra != "test":
            runtime += requirements
    conda = _conda_names()
    missing = set().union(*(_name(r) for r in runtime)) - conda
    assert not missing, f"environment.yml lacks {sorted(missing)}"
    test_only = set().union(*(_name(r) for r in extras["test"])) - set().union(
        *(_name(r) for r in runtime)
    )
    assert test_only and not (test_only & conda), sorted(test_only & conda)


def test_viewer_needs_nothing_beyond_the_default_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    default = set().union(*(_name(r) for r in project["dependencies"]))
    assert {"bokeh", "jinja2"} <= default
