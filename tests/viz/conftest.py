"""Fixtures for the maps-and-notebooks tests.

``offline_stack`` is the notebooks' offline launcher (``notebooks/offline.py``): the local STAC API
and blob server it starts serve every notebook and browser test of the session.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "notebooks"))  # offline.py, make_notebooks.py


@pytest.fixture(scope="session")
def offline_stack(tmp_path_factory):
    """A running :class:`offline.OfflineStack` whose work directory is a pytest temporary folder."""
    from offline import OfflineStack

    with OfflineStack(tmp_path_factory.mktemp("offline")) as stack:
        yield stack
