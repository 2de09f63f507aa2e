"""Classes 7 and 1 (export) of issue 15: untrusted checkpoint files and the export's output.

Every loader of a checkpoint in terrafm and pretrain reads with ``torch.load(weights_only=True)``:
a crafted pickle whose unpickling would create a marker file is refused with an error of ours,
and the marker is never created. ``pretrain.export`` never writes over the training checkpoint,
needs ``overwrite`` for any existing output, and writes through a temporary sibling.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.export import export_teacher, main as export_main
from pretrain.head import build_student_teacher
from pretrain.train import CHECKPOINT_NAME, train
from terrafm.model import CheckpointError, create_model, load_weights

ROOT = Path(__file__).resolve().parents[2]
HEAD = dict(out_dim=16, hidden_dim=16, bottleneck_dim=8)


class CreatesMarker:
    """Unpickling this calls ``open(path, "w")``: the file appears only if code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_malicious(path: Path, marker: Path, fmt: str) -> Path:
    """A pretrain-looking checkpoint whose ``iteration`` is the payload, as torch.save's zip
    or as a raw pickle (the legacy format torch.load also reads)."""
    state = {"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)}, "model_name": "terrafm_tiny",
             "fingerprint": "x", "iteration": CreatesMarker(marker)}
    if fmt == "zip":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    return path


@pytest.mark.parametrize("fmt", ["zip", "raw-pickle"])
def test_the_payload_really_runs_code_when_unpickled(tmp_path, fmt):
    """The control: without weights_only the crafted file creates the marker."""
    marker = tmp_path / "marker"
    path = write_malicious(tmp_path / "evil.pth", marker, fmt)
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # the raw pickle fails torch's magic-number check after unpickling
        pass
    assert marker.exists()


def _tiny_config(tmp_path: Path):
    """A valid run config whose data does not exist: a checkpoint check must come first."""
    return load_config("tiny_cpu", [f"run.output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'no-data'}",
                                    f"data.cell_stats={tmp_path / 'no-data' / 'cell_stats.csv'}"])


def load_with_load_weights(path, tmp_path, monkeypatch):
    load_weights(create_model("terrafm_tiny"), path)


def load_with_create_model(path, tmp_path, monkeypatch):
    create_model("terrafm_tiny", weights=path)


def load_through_terrafm_weights_env(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TERRAFM_WEIGHTS", str(path))
    create_model("terrafm_base", weights="hf")


def load_with_export(path, tmp_path, monkeypatch):
    export_teacher(path, tmp_path / "export.pth")


def load_with_resume_from_path(path, tmp_path, monkeypatch):
    train(_tiny_config(tmp_path), resume=str(path), device="cpu")


def load_with_resume_auto(path, tmp_path, monkeypatch):
    cfg = _tiny_config(tmp_path)
    run = Path(cfg.run.output_dir)
    run.mkdir(parents=True)
    os.replace(path, run / CHECKPOINT_NAME)
    train(cfg, resume="auto", device="cpu")


def load_with_upgrade(path, tmp_path, monkeypatch):
    from pretrain.train import upgrade_checkpoint

    run = tmp_path / "old-run"
    run.mkdir()
    os.replace(path, run / CHECKPOINT_NAME)
    upgrade_checkpoint(run)


TERRAFM_REFUSAL = r"not a plain tensor state dict: it pickles .*torch\.load\(weights_only=True\) refuses.*never unpickles"
PRETRAIN_REFUSAL = (r"not a checkpoint pretrain\.train wrote.*Python objects.*weights_only=True.*never unpickles code.*"
                    r"checkpoint\.pth written by pretrain\.train")
LOADERS = [
    ("load-weights", load_with_load_weights, TERRAFM_REFUSAL),
    ("create-model-weights-path", load_with_create_model, TERRAFM_REFUSAL),
    ("terrafm-weights-env", load_through_terrafm_weights_env, TERRAFM_REFUSAL),
    ("export", load_with_export, PRETRAIN_REFUSAL),
    ("resume-path", load_with_resume_from_path, PRETRAIN_REFUSAL),
    ("resume-auto", load_with_resume_auto, PRETRAIN_REFUSAL),
    ("upgrade-checkpoint", load_with_upgrade, PRETRAIN_REFUSAL),
]
MALICIOUS_CASES = [pytest.param(fmt, loader, message, id=f"c7-{name}-{fmt}")
                   for name, loader, message in LOADERS for fmt in ("zip", "raw-pickle")]


@pytest.mark.parametrize("fmt, loader, message", MALICIOUS_CASES)
def test_a_crafted_pickle_is_refused_by_every_loader(tmp_path, monkeypatch, fmt, loader, message):
    marker = tmp_path / "marker"
    path = write_malicious(tmp_path / "checkpoint_in.pth", marker, fmt)
    with pytest.raises(CheckpointError, match=message):
        loader(path, tmp_path, monkeypatch)
    assert not marker.exists(), "unpickling ran the payload"
    assert not (tmp_path / "export.pth").exists()


def test_the_export_cli_refuses_a_crafted_pickle_in_one_line(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = write_malicious(tmp_path / "checkpoint.pth", marker, "zip")
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(path), str(tmp_path / "export.pth")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "never unpickles code" in err and not marker.exists()


def terrafm_embed_cli(path, tmp_path):
    return ["embed", "--bbox", "11.5", "48.1", "11.6", "48.2", "--start", "2021-06-01", "--end", "2021-06-30",
            "--out", str(tmp_path / "emb.zarr"), "--model", "terrafm_tiny", "--weights", str(path)]


def terrafm_demo_cli(path, tmp_path):
    return ["demo", "--out", str(tmp_path / "demo"), "--weights", str(path)]


TERRAFM_COMMANDS = [pytest.param(terrafm_embed_cli, id="c7-terrafm-embed-cli"),
                    pytest.param(terrafm_demo_cli, id="c7-terrafm-demo-cli")]


def _run_terrafm(command, tmp_path, capsys, caplog) -> list[str]:
    """Exit code 2 and what the command said (stderr, or logged: the demo logs its errors)."""
    from terrafm.cli import main as terrafm_main

    marker = tmp_path / "marker"
    path = write_malicious(tmp_path / "weights.pth", marker, "zip")
    assert terrafm_main(command(path, tmp_path)) == 2
    assert not marker.exists() and not (tmp_path / "emb.zarr").exists() and not (tmp_path / "demo").exists()
    return [line for line in (capsys.readouterr().err + "\n" + caplog.text).splitlines() if line.strip()]


@pytest.mark.parametrize("command", TERRAFM_COMMANDS)
def test_the_terrafm_cli_refuses_a_crafted_pickle_in_one_line(tmp_path, capsys, caplog, command):
    said = _run_terrafm(command, tmp_path, capsys, caplog)
    assert len(said) == 1 and "Traceback" not in said[0] and "network" not in said[0], said
    assert "weights_only=True" in said[0] and "never unpickles" in said[0], said


# ------------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint in the layout pretrain.train writes (teacher with its fusion), untrained."""
    from pretrain.train import save_checkpoint

    torch.manual_seed(0)
    student, teacher = build_student_teacher("terrafm_tiny", HEAD)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / CHECKPOINT_NAME, {"student": student.state_dict(), "teacher": teacher.state_dict(),
                                            "iteration": 7, "model_name": "terrafm_tiny", "fingerprint": "f"})
    return run / CHECKPOINT_NAME


@pytest.fixture
def run_copy(pretrain_checkpoint, tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT_NAME).write_bytes(pretrain_checkpoint.read_bytes())
    return run / CHECKPOINT_NAME


def _exported_matches_the_teacher(out: Path, checkpoint: Path) -> None:
    teacher = torch.load(checkpoint, map_location="cpu", weights_only=True)["teacher"]
    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert exported.keys() == {k[len("backbone."):] for k in teacher if k.startswith("backbone.")}
    for k, v in exported.items():
        assert torch.equal(v, teacher["backbone." + k].float())


def same_path(ckpt: Path) -> Path:
    return ckpt


def same_path_other_spelling(ckpt: Path) -> Path:
    return ckpt.parent / ".." / ckpt.parent.name / "." / ckpt.name


def symlink_to_checkpoint(ckpt: Path) -> Path:
    link = ckpt.parent / "latest.pth"
    link.symlink_to(ckpt)
    return link


def hardlink_to_checkpoint(ckpt: Path) -> Path:
    link = ckpt.parent / "hard.pth"
    os.link(ckpt, link)
    return link


OUTPUT_IS_CHECKPOINT = [
    pytest.param(same_path, False, id="c1-export-out-is-checkpoint"),
    pytest.param(same_path, True, id="c1-export-out-is-checkpoint-overwrite"),
    pytest.param(same_path_other_spelling, False, id="c1-export-out-is-checkpoint-dotdot"),
    pytest.param(symlink_to_checkpoint, True, id="c1-export-out-symlink-to-checkpoint-overwrite"),
    pytest.param(hardlink_to_checkpoint, True, id="c1-export-out-hardlink-to-checkpoint-overwrite"),
]


@pytest.mark.parametrize("make_out, overwrite", OUTPUT_IS_CHECKPOINT)
def test_export_never_writes_over_the_training_checkpoint(run_copy, make_out, overwrite):
    before = _digest(run_copy)
    out = make_out(run_copy)
    with pytest.raises(FileExistsError, match=r"is the pretraining checkpoint itself.*export to another path"):
        export_teacher(run_copy, out, overwrite=overwrite)
    assert _digest(run_copy) == before
    assert sorted(p.name for p in run_copy.parent.iterdir()) == sorted(
        {CHECKPOINT_NAME, out.name} if out.name != CHECKPOINT_NAME else {CHECKPOINT_NAME})


def test_export_cli_with_the_checkpoint_as_output_keeps_it_byte_identical(run_copy):
    before = _digest(run_copy)
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(run_copy), str(run_copy)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "is the pretraining checkpoint itself" in lines[0]
    assert _digest(run_copy) == before


def test_an_existing_output_needs_overwrite(run_copy, tmp_path):
    out = tmp_path / "mine.pth"
    out.write_bytes(b"a file the export did not write")
    with pytest.raises(FileExistsError, match=r"mine\.pth exists.*overwrite=True \(--overwrite\)"):
        export_teacher(run_copy, out)
    assert out.read_bytes() == b"a file the export did not write"
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(run_copy), str(out)])
    assert exit_info.value.code == 2 and out.read_bytes() == b"a file the export did not write"
    assert export_main([str(run_copy), str(out), "--overwrite"]) == 0
    _exported_matches_the_teacher(out, run_copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.pth", "run"]


def test_export_writes_a_temporary_sibling_and_renames(run_copy, tmp_path, monkeypatch):
    """The output appears only complete and verified: a failure during the write leaves nothing."""
    import pretrain.export as export

    out = tmp_path / "out" / "export.pth"
    seen = []

    def failing_verify(path, model_name):
        seen.append(path)
        assert not out.exists() and path.parent == out.parent and path.exists()
        raise CheckpointError("simulated verification failure")

    monkeypatch.setattr(export, "_verify", failing_verify)
    with pytest.raises(CheckpointError, match="simulated"):
        export_teacher(run_copy, out)
    assert seen and not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()
    assert export_teacher(run_copy, out) == out
    _exported_matches_the_teacher(out, run_copy)
    assert [p.name for p in out.parent.iterdir()] == ["export.pth"]


# ------------------------------------------------------------------------------------------------ bad files
def empty_file(tmp_path, ckpt):
    path = tmp_path / "empty.pth"
    path.touch()
    return path


def truncated_checkpoint(tmp_path, ckpt):
    path = tmp_path / "truncated.pth"
    path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return path


def text_file(tmp_path, ckpt):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint\n")
    return path


def an_exported_inference_file(tmp_path, ckpt):
    path = tmp_path / "exported.pth"
    export_teacher(ckpt, path)
    return path


def a_directory(tmp_path, ckpt):
    return ckpt.parent


def missing_file(tmp_path, ckpt):
    return tmp_path / "nowhere.pth"


BAD_FILES = [
    pytest.param(empty_file, CheckpointError, r"empty\.pth is empty.*written completely", id="c7-export-empty-file"),
    pytest.param(truncated_checkpoint, CheckpointError, r"truncated\.pth is corrupt or truncated.*written completely",
                 id="c7-export-truncated"),
    pytest.param(text_file, CheckpointError, r"notes\.pth is corrupt or truncated", id="c7-export-text-file"),
    pytest.param(an_exported_inference_file, CheckpointError,
                 r"exported\.pth is not a pretrain\.train checkpoint \(no 'teacher'.*checkpoint\.pth written in "
                 r"run\.output_dir", id="c7-export-an-export"),
    pytest.param(a_directory, IsADirectoryError, r"is a directory.*checkpoint\.pth", id="c7-export-directory"),
    pytest.param(missing_file, FileNotFoundError, r"nowhere\.pth does not exist", id="c7-export-missing"),
]


@pytest.mark.parametrize("make, error, message", BAD_FILES)
def test_export_of_a_bad_file_names_the_problem(pretrain_checkpoint, tmp_path, make, error, message):
    path = make(tmp_path, pretrain_checkpoint)
    with pytest.raises(error, match=message):
        export_teacher(path, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


RESUME_FILES = [
    pytest.param(empty_file, CheckpointError, r"empty\.pth is empty.*resume=None", id="c7-resume-empty-file"),
    pytest.param(truncated_checkpoint, CheckpointError, r"truncated\.pth is corrupt or truncated",
                 id="c7-resume-truncated"),
    pytest.param(an_exported_inference_file, CheckpointError,
                 r"exported\.pth is not a pretrain\.train checkpoint \(no 'fingerprint', 'iteration', 'loss'.*"
                 r"--resume none", id="c7-resume-an-export"),
]


@pytest.mark.parametrize("make, error, message", RESUME_FILES)
def test_resume_from_a_bad_file_fails_before_any_work(pretrain_checkpoint, tmp_path, make, error, message):
    """The data root does not exist: the checkpoint's error must come before the data is read."""
    path = make(tmp_path, pretrain_checkpoint)
    with pytest.raises(error, match=message):
        train(_tiny_config(tmp_path), resume=str(path), device="cpu")
