"""Class 8 of issue 15, the CLI: one-line errors with exit code 2 for bad arguments and for every
error of terrafm's, checked before any search or compute; ``--debug`` shows the traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from terrafm import cli, stac

GOOD = ["--bbox", "11.50", "48.10", "11.56", "48.14", "--start", "2024-06-01", "--end", "2024-06-30"]
UNREACHABLE = "http://127.0.0.1:9/stac"


@pytest.fixture
def searches(monkeypatch):
    """Record every search the CLI starts (none may start when the arguments are wrong)."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("the CLI searched although its arguments are wrong")

    monkeypatch.setattr(stac, "open_sentinel", record)
    monkeypatch.setattr(stac, "search", record)
    return calls


def run(argv, capsys) -> tuple[int, list[str]]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def embed_args(tmp_path, *extra, out=None, base=GOOD):
    return ["embed", *base, "--out", str(out or tmp_path / "out.zarr"), "--catalog", UNREACHABLE, *extra]


def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("not a store\n")
    return path


def _can_write(folder: str) -> bool:
    import tempfile

    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def a_folder_with_notes(tmp_path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    return folder


def junk_checkpoint(tmp_path) -> Path:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"")          # an interrupted download
    return path


ARG_CASES = [
    pytest.param(lambda t: embed_args(t, base=GOOD[:7] + ["--end", "2024-05-01"]),
                 r"starts after it ends: 2024-06-01 > 2024-05-01.*swap", id="start-after-end"),
    pytest.param(lambda t: embed_args(t, base=GOOD[:7] + ["--end", "2024-06-31"]),
                 r"'2024-06-31' is not a date: day is out of range.*YYYY-MM-DD", id="end-june-31"),
    pytest.param(lambda t: embed_args(t, base=GOOD[:7] + ["--end", "30.06.2024"]),
                 r"'30\.06\.2024' is not a date.*YYYY-MM-DD", id="end-european-format"),
    pytest.param(lambda t: embed_args(t, base=["--bbox", "48.10", "11.50", "48.14", "91.0"] + GOOD[5:]),
                 r"latitude outside \[-90, 90\].*\(lat, lon\) order", id="bbox-lat-91"),
    pytest.param(lambda t: embed_args(t, base=["--bbox", "190", "48.10", "191", "48.14"] + GOOD[5:]),
                 r"longitude outside \[-180, 180\]", id="bbox-lon-190"),
    pytest.param(lambda t: embed_args(t, base=["--bbox", "11.56", "48.10", "11.50", "48.14"] + GOOD[5:]),
                 r"min > max.*west < east", id="bbox-west-east-swapped"),
    pytest.param(lambda t: embed_args(t, base=["--bbox", "11.5", "nan", "11.56", "48.14"] + GOOD[5:]),
                 r"not finite", id="bbox-nan"),
    pytest.param(lambda t: ["embed", "--bbox", "11.5", "48.1", "11.56", "--start", "2024-06-01", "--end", "2024-06-30",
                            "--out", "x.zarr"], r"argument --bbox: expected 4 arguments.*terrafm embed --help", id="bbox-three-numbers"),
    pytest.param(lambda t: embed_args(t, base=["--bbox", "west", "48.10", "11.56", "48.14"] + GOOD[5:]),
                 r"argument --bbox: invalid float value: 'west'", id="bbox-word"),
    pytest.param(lambda t: ["embed", *GOOD], r"required: --out", id="missing-out"),
    pytest.param(lambda t: [], r"required: command.*terrafm --help", id="no-command"),
    pytest.param(lambda t: ["embedd"], r"invalid choice: 'embedd'", id="misspelt-command"),
    pytest.param(lambda t: embed_args(t, "--level", "tile"), r"argument --level: invalid choice: 'tile'", id="bad-level"),
    pytest.param(lambda t: embed_args(t, out=a_file(t) / "out.zarr"),
                 r"--out .*notes\.txt/out\.zarr: cannot write .*notes\.txt is a file, not a directory; choose a path in a directory", id="out-under-a-file"),
    pytest.param(lambda t: embed_args(t, out=a_file(t)), r"--out .*notes\.txt is an existing file.*new path", id="out-is-a-file"),
    pytest.param(lambda t: embed_args(t, out=Path("/sys/terrafm-test.zarr")),
                 r"--out /sys/terrafm-test\.zarr: cannot write .*: /sys is not writable.*choose a writable path", id="out-not-writable"),
    pytest.param(lambda t: embed_args(t, out=a_folder_with_notes(t)),
                 r"--out .*project: .*is a directory that is not a zarr store.*choose another path", id="out-is-a-folder"),
    pytest.param(lambda t: embed_args(t, "--model", "terrafm_tiny", "--weights", str(junk_checkpoint(t))),
                 r"--weights .*junk\.pth: .*empty \(0 bytes\).*--weights random", id="weights-empty-file"),
    pytest.param(lambda t: embed_args(t, "--model", "terrafm_huge"), r"--model 'terrafm_huge' is not a registered model.*terrafm_base",
                 id="unknown-model"),
    pytest.param(lambda t: embed_args(t, "--weights", str(t / "missing.pth")),
                 r"checkpoint .*missing\.pth' does not exist.*--weights", id="weights-missing"),
    pytest.param(lambda t: embed_args(t, "--device", "gpu"), r"--device 'gpu'.*auto, cpu, cuda", id="bad-device"),
    pytest.param(lambda t: ["embed", *GOOD, "--out", str(t / "o.zarr"), "--catalog", "planetry-computer"],
                 r"unknown catalog 'planetry-computer'.*planetary-computer", id="unknown-catalog"),
    pytest.param(lambda t: ["demo", "--out", str(a_file(t)), "--weights", "random"],
                 r"--out .*notes\.txt is an existing file", id="demo-out-is-a-file"),
    pytest.param(lambda t: ["demo", "--out", str(t), "--device", "tpu", "--weights", "random"],
                 r"--device 'tpu'", id="demo-bad-device"),
]


@pytest.mark.parametrize("argv, message", ARG_CASES)
def test_bad_arguments_give_one_line_and_exit_2_before_any_search(tmp_path, capsys, searches, argv, message):
    argv = argv(tmp_path)
    if any(arg.startswith("/sys/") for arg in argv) and _can_write("/sys"):
        pytest.skip("/sys is writable on this machine")
    code, lines = run(argv, capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("terrafm") and "error:" in lines[0]
    import re
    assert re.search(message, lines[0]), lines[0]
    assert searches == []
    assert not (tmp_path / "out.zarr").exists()


def _deep_error_of_ours(*args, **kwargs):
    stac.aoi_geometry((1.0, 2.0, 3.0))         # raised inside terrafm, after the arguments were accepted


def _multi_line_error_of_ours(*args, **kwargs):
    from pretrain.config import load_config

    load_config("tiny_cpu", ["optim.base_lr=-1", "optim.teacher_temp=0", "optim.centering=dino"]).validate()


def _library_error(*args, **kwargs):
    return {}["missing"]


@pytest.mark.parametrize("raiser, code, message", [
    pytest.param(_deep_error_of_ours, 2, r"error: a bbox needs 4 numbers", id="our-error-after-checks"),
    pytest.param(_multi_line_error_of_ours, 2, r"error: invalid pretraining config: - .*base_lr.* - .*teacher_temp",
                 id="multi-line-error-one-line"),
    pytest.param(_library_error, 1, r"unexpected KeyError: 'missing' .*--debug", id="library-error-exit-1"),
])
def test_errors_after_the_checks_are_one_line(tmp_path, capsys, monkeypatch, raiser, code, message):
    import re

    monkeypatch.setattr(stac, "open_sentinel", raiser)
    got, lines = run(["embed", *GOOD, "--out", str(tmp_path / "o.zarr"), "--model", "terrafm_tiny",
                      "--weights", "random", "--device", "cpu"], capsys)
    errors = [line for line in lines if "error" in line]
    assert got == code and not any("Traceback" in line for line in lines)
    assert len(errors) == 1 and re.search(message, errors[0]), lines


def test_debug_shows_the_traceback(tmp_path, capsys, searches):
    argv = embed_args(tmp_path, base=GOOD[:7] + ["--end", "2024-05-01"])
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        code = cli.main(debug_argv)
        err = capsys.readouterr().err
        assert code == 2
        assert "Traceback (most recent call last)" in err and "_stac_datetime" in err
        assert err.strip().splitlines()[-1].startswith("terrafm embed: error: the date range")


def test_subprocess_prints_exactly_one_line():
    res = subprocess.run([sys.executable, "-m", "terrafm.cli", "embed", *GOOD[:7], "--end", "2024-05-01",
                          "--out", "never-written.zarr", "--catalog", UNREACHABLE],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("terrafm embed: error: the date range 2024-06-01/2024-05-01 starts after it ends")
    assert not (Path(__file__).parent / "never-written.zarr").exists()


@pytest.mark.skipif(shutil.which("terrafm") is None, reason="the console script is not installed")
def test_console_script_bad_arguments_one_line():
    res = subprocess.run(["terrafm", "embed", "--bbox", "1", "2", "--start", "x"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("terrafm embed: error: argument --bbox: expected 4 arguments")


def test_valid_command_embeds(tmp_path, capsys, monkeypatch):
    """With the search replaced by the packaged real sample, the command writes the store."""
    import numpy as np
    import xarray as xr

    from terrafm.demo import load_demo

    calls = []

    def sample(aoi, start, end, **kwargs):
        calls.append((aoi, start, end, kwargs))
        return load_demo().isel(y=slice(0, 224), x=slice(0, 224))

    monkeypatch.setattr(stac, "open_sentinel", sample)
    out = tmp_path / "emb.zarr"
    assert cli.main(["embed", *GOOD, "--out", str(out), "--model", "terrafm_tiny", "--weights", "random",
                     "--device", "cpu", "--catalog", "earth-search"]) == 0
    assert calls == [((11.5, 48.1, 11.56, 48.14), "2024-06-01", "2024-06-30", {"catalog": "earth-search"})]
    store = xr.open_zarr(out, consolidated=False)
    values = store["embedding_vectors"].values
    assert values.shape[:2] == (14, 14) and np.isfinite(values).all()


def test_existing_store_passes_the_checks_and_is_resumed(tmp_path, capsys, monkeypatch):
    """An earlier run's store is not an error at the CLI: embed resumes it (or refuses a mismatch)."""
    store = tmp_path / "earlier.zarr"
    store.mkdir()
    (store / ".zgroup").write_text('{"zarr_format": 2}')
    reached = []

    def stop(*args, **kwargs):
        reached.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(stac, "open_sentinel", stop)
    code, lines = run(["embed", *GOOD, "--out", str(store), "--model", "terrafm_tiny", "--weights", "random",
                       "--device", "cpu"], capsys)
    assert code == 130 and len(reached) == 1 and lines == ["terrafm embed: interrupted"]
    assert sorted(p.name for p in store.iterdir()) == [".zgroup"]


def test_demo_offline_without_weights_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TERRAFM_WEIGHTS": ""}
    res = subprocess.run([sys.executable, "-m", "terrafm.cli", "demo", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("terrafm demo: error: could not load TerraFM weights 'hf'")
    assert "--weights random" in res.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("override, says", [
    pytest.param("optim.base_lr=-0.001", r"base_lr", id="c8-pretrain-negative-lr"),
    pytest.param("optim.centering=sideways", r"centering", id="c8-pretrain-bad-centering"),
])
def test_pretrain_train_says_a_config_error_in_one_line(capsys, override, says):
    import re

    from pretrain.config import ConfigError
    from pretrain.train import main as train_main

    with pytest.raises(SystemExit) as stop:
        train_main(["--config", "tiny_cpu", "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("pretrain.train: error:") and re.search(says, err[0]), err
    with pytest.raises(ConfigError):                      # --debug: the exception itself, with its traceback
        train_main(["--config", "tiny_cpu", "--set", override, "--debug"])
