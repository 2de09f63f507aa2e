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

from terrafm.model import CheckpointError, HubWeights, create_model, get_config, load_weights

FUSION = "patch_embed.fusion."


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return create_model("terrafm_tiny").state_dict()


def _save(tmp_path, obj, name="w.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_roundtrip_with_fusion_is_exact_and_trained(tmp_path, tiny_state, recwarn):
    path = _save(tmp_path, tiny_state)
    model = create_model("terrafm_tiny", seed=1)   # another initialisation than tiny_state's
    assert model.fusion_mode == "random"
    result = load_weights(model, path)
    assert result.fusion_mode == model.fusion_mode == "trained" and result.fusion_trained
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


def test_missing_fusion_sets_the_masked_mean(tmp_path, tiny_state, caplog):
    release = {k: v for k, v in tiny_state.items() if not k.startswith(FUSION)}
    model = create_model("terrafm_tiny", seed=1)
    with caplog.at_level("INFO", logger="terrafm.model.weights"):
        result = load_weights(model, _save(tmp_path, release))
    assert len(result.missing_fusion) == 6 and result.fusion_mode == model.fusion_mode == "mean"
    assert "masked mean" in caplog.text and "untrained" not in caplog.text
    fusion = {k: v for k, v in model.state_dict().items() if k.startswith(FUSION)}
    assert len(fusion) == 6 and all(torch.count_nonzero(v) == 0 for v in fusion.values())
    for k, v in release.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("kept", [["queries"], ["queries", "query_proj.weight", "query_proj.bias",
                                                "key_proj.weight", "key_proj.bias"]])
def test_part_of_the_fusion_is_refused_naming_present_and_missing(tmp_path, tiny_state, kept):
    partial = {k: v for k, v in tiny_state.items()
               if not k.startswith(FUSION) or k[len(FUSION):] in kept}
    missing = sorted(k for k in tiny_state if k.startswith(FUSION) and k[len(FUSION):] not in kept)
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("terrafm_tiny"), _save(tmp_path, partial))
    message = str(info.value)
    present_part, missing_part = message.split("present ")[1].split("; missing ")
    assert all(FUSION + k in present_part for k in kept)
    assert all(k in missing_part and k not in present_part for k in missing)
    assert "remove every patch_embed.fusion.* key" in message and "pretrain.export" in message


def test_truncated_file_is_reported_as_corrupt(tmp_path, tiny_state):
    path = _save(tmp_path, tiny_state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*download or export it again"):
        load_weights(create_model("terrafm_tiny"), path)


def test_base_weights_into_large_lists_mismatches_and_suggests_the_config(release_checkpoint):
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("terrafm_large"), release_checkpoint)
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
    with pytest.raises(CheckpointError, match=r"no published weights for 'terrafm_large'.*"
                                              r"published weights: \['terrafm_base'\].*weights=None"):
        create_model("terrafm_large", weights="hf")


def test_weight_locations_come_from_the_config():
    assert get_config("terrafm_base").weights == HubWeights("MBZUAI/TerraFM", "TerraFM-B.pth",
                                                            revision=None, local_env="TERRAFM_WEIGHTS")
    assert all(get_config(n).weights is None for n in ("terrafm_large", "terrafm_tiny", "terrafm_small_test"))
    with pytest.raises(ValueError, match="HubWeights"):   # the former "repo/file" string form
        get_config("terrafm_tiny", weights="MBZUAI/TerraFM/TerraFM-B.pth")


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights='hf'"):
        create_model("terrafm_tiny", weights=tmp_path / "nope.pth")


# terrafm_base's published location (repository, file name, TERRAFM_WEIGHTS) on a terrafm_tiny:
# load_weights(model, "hf") resolves it from the model's config exactly as for TerraFM-B, while
# building the model and reading the file take milliseconds instead of seconds (86 M parameters
# initialised, then 450 MB read and hashed, in every child)
HF_SCRIPT = textwrap.dedent("""
    import warnings, torch
    from terrafm.model import TerraFM, get_config, load_weights
    model = TerraFM(get_config("terrafm_tiny", weights=get_config("terrafm_base").weights))
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
    """A terrafm_tiny checkpoint named like the release file, and its first cls_token value."""
    path = tmp_path_factory.mktemp("hub_file") / "TerraFM-B.pth"
    state = create_model("terrafm_tiny", seed=3).state_dict()
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


REVISION_SCRIPT = textwrap.dedent("""
    import dataclasses, sys
    from terrafm.model import HubWeights, get_config, resolve_weights
    base = get_config("terrafm_base")
    pinned = dataclasses.replace(base, name="pinned", weights=dataclasses.replace(base.weights, revision=sys.argv[1]))
    print(resolve_weights("hf", pinned))
    print(resolve_weights("hf", "terrafm_base"))
""")


def test_hf_revision_of_the_config_reaches_the_hub_download(tmp_path):
    """Two snapshots in the cache: the config's revision picks one, no revision follows refs/main."""
    repo = tmp_path / "hub" / "models--MBZUAI--TerraFM"
    (repo / "refs").mkdir(parents=True)
    main, pinned = "a" * 40, "b" * 40
    (repo / "refs" / "main").write_text(main)
    for revision in (main, pinned):
        (repo / "snapshots" / revision).mkdir(parents=True)
        (repo / "snapshots" / revision / "TerraFM-B.pth").write_bytes(revision.encode())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TERRAFM_"))}
    env.update(HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", REVISION_SCRIPT, pinned], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(repo / "snapshots" / r / "TerraFM-B.pth") for r in (pinned, main)]


def test_a_text_file_and_a_pickle_name_what_they_are(tmp_path):
    """Arbitrary bytes give our error (not torch's IndexError/KeyError); a pickle names what it would run."""
    import os

    from terrafm.model import CheckpointError, create_model, load_weights

    text = tmp_path / "notes.pth"
    text.write_text("hello world\n")
    with pytest.raises(CheckpointError, match=r"not a checkpoint torch can read .*torch\.save\(model\.state_dict"):
        load_weights(create_model("terrafm_tiny"), text)

    class Runs:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    crafted = tmp_path / "crafted.pth"
    torch.save({"x": Runs()}, crafted)
    with pytest.raises(CheckpointError, match=r"it pickles posix\.system, which torch\.load\(weights_only=True\) refuses"):
        load_weights(create_model("terrafm_tiny"), crafted)
    assert not (tmp_path / "ran").exists()
