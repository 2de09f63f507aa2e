"""Strict checkpoint loading: release layout, our exports, corrupt and mismatched files, hf cache."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from reference_terrafm import random_release_checkpoint
from terrafm.model import CheckpointError, create_model, load_weights


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return create_model("terrafm_tiny").state_dict()


def _save(tmp_path, obj, name="w.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_roundtrip_with_fusion_is_silent_and_exact(tmp_path, tiny_state, recwarn):
    path = _save(tmp_path, tiny_state)
    model = create_model("terrafm_tiny")
    result = load_weights(model, path)
    assert result.fusion_trained and model.fusion_trained
    assert not [w for w in recwarn if "fusion" in str(w.message)]
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny_state[k]), k
    assert model.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_module_prefix_and_wrappers_are_accepted(tmp_path, tiny_state):
    prefixed = {f"module.{k}": v for k, v in tiny_state.items()}
    for obj in (prefixed, {"state_dict": tiny_state}, {"model": prefixed}):
        model = create_model("terrafm_tiny")
        load_weights(model, _save(tmp_path, obj))
        assert torch.equal(model.cls_token, tiny_state["cls_token"])


def test_missing_fusion_warns(tmp_path, tiny_state):
    release = {k: v for k, v in tiny_state.items() if not k.startswith("patch_embed.fusion.")}
    with pytest.warns(UserWarning, match="untrained fusion"):
        result = load_weights(create_model("terrafm_tiny"), _save(tmp_path, release))
    assert len(result.missing_fusion) == 6


def test_truncated_file_is_reported_as_corrupt(tmp_path, tiny_state):
    path = _save(tmp_path, tiny_state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*download or export it again"):
        load_weights(create_model("terrafm_tiny"), path)


def test_base_weights_into_large_lists_mismatches_and_suggests_the_config(tmp_path):
    path = _save(tmp_path, random_release_checkpoint(seed=0), "TerraFM-B.pth")
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("terrafm_large"), path)
    message = str(info.value)
    assert "164 shape mismatches" in message and "144 missing keys: blocks.12." in message
    assert "create_model('terrafm_base')" in message


def test_extra_keys_are_refused_and_listed(tmp_path, tiny_state):
    path = _save(tmp_path, dict(tiny_state, **{"head.weight": torch.zeros(3), "head.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"2 unexpected keys: head\.bias, head\.weight"):
        load_weights(create_model("terrafm_tiny"), path)


def test_missing_trunk_key_is_refused(tmp_path, tiny_state):
    path = _save(tmp_path, {k: v for k, v in tiny_state.items() if k != "norm.weight"})
    with pytest.raises(CheckpointError, match=r"1 missing keys: norm\.weight"):
        load_weights(create_model("terrafm_tiny"), path)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_that_weights_only_refuses(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": Payload()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True.*never unpickles"):
        load_weights(create_model("terrafm_tiny"), path)


def test_hf_source_for_unpublished_config():
    with pytest.raises(CheckpointError, match="only terrafm_base has a released checkpoint"):
        create_model("terrafm_large", weights="hf")


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights='hf'"):
        create_model("terrafm_tiny", weights=tmp_path / "nope.pth")


HF_SCRIPT = textwrap.dedent("""
    import warnings, torch
    from terrafm.model import create_model, load_weights
    model = create_model("terrafm_base")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            result = load_weights(model, "hf")
        except Exception as exc:
            print("ERROR", type(exc).__name__, exc)
            raise SystemExit(0)
    print("OK", result.path, float(model.cls_token.flatten()[0]))
""")


def _run_hf(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TERRAFM_"))}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", HF_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def release_bytes_file(tmp_path_factory):
    state = random_release_checkpoint(seed=3)
    path = tmp_path_factory.mktemp("rel") / "TerraFM-B.pth"
    torch.save(state, path)
    return path, float(state["cls_token"].flatten()[0])


def test_hf_from_a_real_offline_huggingface_cache(tmp_path, release_bytes_file):
    """huggingface_hub resolves the file from its own cache layout with HF_HUB_OFFLINE=1."""
    path, first = release_bytes_file
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--MBZUAI--TerraFM"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "TerraFM-B.pth").symlink_to(path)
    stdout = _run_hf({"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert stdout.startswith("OK") and str(snapshot) in stdout
    assert float(stdout.split()[-1]) == pytest.approx(first)


def test_hf_offline_without_cache_says_how_to_fix(tmp_path):
    stdout = _run_hf({"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert stdout.startswith("ERROR CheckpointError")
    assert "TERRAFM_WEIGHTS" in stdout and "weights=None" in stdout


def test_terrafm_weights_environment_variable(tmp_path, release_bytes_file):
    path, first = release_bytes_file
    stdout = _run_hf({"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TERRAFM_WEIGHTS": str(path)})
    assert stdout.startswith(f"OK {path}")
    assert float(stdout.split()[-1]) == pytest.approx(first)
