"""Docstring examples: every public function shows one, and every example that runs is correct."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import pretrain
import terrafm


def _modules() -> list[str]:
    names = []
    for package in (terrafm, pretrain):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return sorted(names)


MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=vars(module).copy()):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (run pytest --doctest-modules on it)"


def test_every_public_function_has_an_example():
    missing = []
    for name in MODULES:
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", ()):
            obj = getattr(module, public, None)
            if inspect.isfunction(obj) and obj.__module__ == name and "Examples" not in (obj.__doc__ or ""):
                missing.append(f"{name}.{public}")
    assert not missing, f"public functions without an Examples section: {missing}"
