"""Fixtures for the maps-and-notebooks tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
