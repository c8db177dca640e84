"""Output safety (issue 13 items 1, 7, 9, 15, 18): a user's files survive, outputs are whole.

Every command that takes ``--out`` is run against a directory holding a
user's ``thesis.tex`` and a subfolder: without ``--overwrite`` it must exit 2
with one line and touch nothing; with it, it must write its output beside the
user's files and delete only what rtteval itself wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rtteval.cli.main import _one_line_warning
from rtteval.errors import DataWarning
from rtteval.outputs import MARKER

# each run as short as the command allows: these tests are about files, not learning
FAST = {
    "pretrain": ["--model-preset", "micro", "--max-epochs", "1", "--anneal-epochs", "0"],
    "finetune": ["--max-epochs", "1"],
    "unlearn": ["--method", "gd", "--max-steps", "1", "--device", "cpu"],
    "attack": ["--lrs", "1e-3", "--epochs", "1", "--folds", "split_0", "--n-boot", "10"],
}


def _user_dir(path: Path) -> dict[str, str]:
    """A user's directory: a file and a subfolder that rtteval must never delete."""
    (path / "sub").mkdir(parents=True)
    (path / "thesis.tex").write_text("\\documentclass{article}")
    (path / "sub" / "notes.txt").write_text("notes")
    return _files(path)


def _files(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): p.read_text(errors="replace")
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _one_line_error(r, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("rtteval: error:") and "\n" not in err, err
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in err, (w, err)


def _args(cmd: str, models: dict[str, Path], out: Path) -> list[str]:
    world = str(models["world"])
    base = {
        "world": ["world", "--preset", "tiny"],
        "pretrain": ["pretrain", "--world", world],
        "finetune": ["finetune", "--model", str(models["control"]), "--world", world],
        "unlearn": ["unlearn", "--model", str(models["original"]), "--data", world],
        "attack": [
            "attack",
            "--model",
            str(models["original"]),
            "--original",
            str(models["original"]),
            "--data",
            world,
        ],
    }[cmd]
    return [*base, *FAST.get(cmd, []), "--out", str(out)]


@pytest.mark.parametrize("cmd", ["world", "pretrain", "finetune", "unlearn", "attack"])
def test_user_files_survive_every_out_command(pretrained_tiny, tmp_path, cli, cmd):
    d = tmp_path / "mine"
    before = _user_dir(d)
    r = cli(*_args(cmd, pretrained_tiny, d))
    _one_line_error(r, str(d), "--overwrite")
    assert _files(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp dirs left

    r = cli(*_args(cmd, pretrained_tiny, d), "--overwrite")
    assert r.returncode == 0, r.stderr
    after = _files(d)
    assert {k: after[k] for k in before} == before  # the user's files, untouched
    mine = json.loads((d / MARKER).read_text())["entries"]
    assert mine and not {"thesis.tex", "sub"} & set(mine)
    assert {k.split("/")[0] for k in after} - {MARKER} == {"thesis.tex", "sub", *mine}

    # an rtteval output is replaced only with --overwrite, and only its own entries
    r = cli(*_args(cmd, pretrained_tiny, d))
    if cmd == "attack":  # resumable: a second attack into its own output resumes
        assert r.returncode == 0 and "(0 new, 2 already finished)" in r.stderr, r.stderr
    else:
        _one_line_error(r, "earlier rtteval", "--overwrite")
        assert _files(d) == after
    (d / mine[0]).touch()  # stands for any change
    r = cli(*_args(cmd, pretrained_tiny, d), "--overwrite")
    assert r.returncode == 0, r.stderr
    if cmd == "attack":  # --overwrite recomputes
        assert "(2 new, 0 already finished)" in r.stderr, r.stderr
    assert {k: v for k, v in _files(d).items() if k in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_out_dot_never_empties_the_current_directory(tmp_path, cli, monkeypatch):
    d = tmp_path / "cwd"
    before = _user_dir(d)
    monkeypatch.chdir(d)
    _one_line_error(cli("world", "--preset", "tiny", "--out", "."), "not empty")
    assert _files(d) == before
    r = cli("world", "--preset", "tiny", "--out", ".", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in _files(d).items() if k in before} == before
    assert json.loads(cli("data", "check", ".").stdout)["splits"]["split_0"] == 8
    r = cli("world", "--preset", "tiny", "--seed", "1", "--out", ".", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in _files(d).items() if k in before} == before


def test_a_user_file_named_like_an_output_is_never_replaced(tmp_path, cli):
    d = tmp_path / "mine"
    (d).mkdir()
    (d / "manifest.json").write_text("my own manifest")
    _one_line_error(
        cli("world", "--preset", "tiny", "--out", d, "--overwrite"), "'manifest.json'", str(d)
    )
    assert _files(d) == {"manifest.json": "my own manifest"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_demo_and_run_refuse_a_directory_that_is_not_a_study(tmp_path, cli):
    d = tmp_path / "mine"
    before = _user_dir(d)
    _one_line_error(cli("demo", "--out", d), str(d), "not an rtteval study")
    assert _files(d) == before


def _corrupt_copies(src: Path, root: Path) -> dict[str, Path]:
    out = {}
    for how in ("truncated", "zero", "garbage"):
        dst = root / how
        shutil.copytree(src, dst)
        f = dst / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes({"truncated": data[: len(data) // 2], "zero": b"", "garbage": b"x" * 64}[how])
        out[how] = dst
    return out


def test_corrupt_safetensors_is_one_line_and_writes_nothing(pretrained_tiny, tmp_path, cli):
    bad = _corrupt_copies(pretrained_tiny["original"], tmp_path / "bad")
    for how, model in bad.items():
        r = cli("eval", "--model", model, "--data", pretrained_tiny["world"], "--device", "cpu")
        _one_line_error(r, str(model / "model.safetensors"), "corrupt or truncated")
        out = tmp_path / f"un-{how}"
        r = cli(*_args("unlearn", {**pretrained_tiny, "original": model}, out))
        _one_line_error(r, str(model / "model.safetensors"))
        assert not out.exists()
    # attack: the unlearned model is bad, the original fine; nothing may be left, not even
    # the original's finished attack.  A real process: the console entry point itself.
    out = tmp_path / "rtt"
    args = _args("attack", pretrained_tiny, out)
    args[2] = str(bad["truncated"])
    r = subprocess.run(
        [sys.executable, "-m", "rtteval.cli", *args], capture_output=True, text=True, timeout=300
    )
    _one_line_error(r, str(bad["truncated"] / "model.safetensors"))
    assert not out.exists()


STUDY = """\
name: s
output_dir: {out}
model:
  tiny: {{preset: micro}}
datasets:
  - name: w
    world: {{preset: tiny, seed: 0}}
methods:
  - name: gd
    grid: {{lr: [1.0e-3]}}
attacks:
  - name: rtt
    lrs: [1.0e-3]
    epochs: 1
executor: {{kind: sequential}}
debug: {{fake_jobs: true, sleep: 0.0}}
"""


def _study(tmp_path: Path, out: str) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(STUDY.format(out=out))
    return p


def test_output_dir_must_be_writable_at_validation_and_dry_run(pretrained_tiny, tmp_path, cli):
    (tmp_path / "afile").write_text("x")
    for out, words in (
        (tmp_path / "afile", "not a directory"),
        (tmp_path / "afile" / "below", "under the file"),
        ("/proc/rtteval-out", "not writable"),
    ):
        cfg = _study(tmp_path, str(out))
        for dry in (["--dry-run"], []):
            r = cli("run", cfg, *dry)
            _one_line_error(r, f"{cfg}:2", "output_dir", words)
    assert (tmp_path / "afile").read_text() == "x"
    # --out a file, for the commands that write directories
    for cmd in ("unlearn", "attack", "world"):
        r = cli(*_args(cmd, pretrained_tiny, tmp_path / "afile"))
        _one_line_error(r, str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"


def test_leftover_job_temp_dirs_are_swept_on_the_next_run(tmp_path, cli):
    from rtteval.runner.driver import DirLock

    out = tmp_path / "study"
    cfg = _study(tmp_path, str(out))
    assert cli("run", cfg).returncode == 0
    stage = next(p for p in (out / "jobs").iterdir() if p.is_dir())
    left = [stage / ".abc.tmp-123", stage / ".abc.old-9-9"]
    for p in left:
        (p / "model").mkdir(parents=True)
    with DirLock(out):  # a live run holds the lock: its temp dirs are not touched
        _one_line_error(cli("run", cfg), "another `rtteval run`")
    assert all(p.exists() for p in left)
    r = cli("run", cfg)
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in left)
    assert "removed 2 unfinished job dir(s)" in r.stdout + r.stderr


def test_failed_attack_leaves_no_directory(pretrained_tiny, tmp_path, cli):
    """The first model fails to load: before, an empty OUT was left behind."""
    out = tmp_path / "rtt"
    args = _args("attack", pretrained_tiny, out)
    assert args[3] == "--original"
    args[4] = str(tmp_path / "no-such-model")
    r = cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not out.exists()


def test_study_name_with_a_path_is_refused(tmp_path, cli):
    cfg = _study(tmp_path, str(tmp_path / "out"))
    for name in ("../evil", "a/b", ".."):
        _one_line_error(cli("run", cfg, "--dry-run", f"name={name}"), "name", "plain name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_duplicate_choices(tmp_path, cli):
    d = tmp_path / "ds"
    d.mkdir()
    rows = [
        {"question": "Q one?", "choices": ["1", "2", "3", "4"], "answer": 0},
        {"question": "Q two?", "choices": ["1", "1", "2", "3"], "answer": 0},
        {"question": "Q three?", "choices": ["5", "6", "7", "6"], "answer": 0},
    ]
    (d / "split_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _one_line_error(
        cli("data", "check", "--strict", d), f"{d / 'split_0.jsonl'}:2", "choices", "repeats"
    )
    # the released random_bd has such questions: loaded, counted, and the ambiguous ones
    # (the correct answer offered twice) named in one warning line
    with pytest.warns(DataWarning, match=r"split_0\.jsonl:2: field 'choices': 1 question") as w:
        r = cli("data", "check", d)
    assert r.returncode == 0, r.stderr
    line = _one_line_warning(w[0].message, DataWarning, "x.py", 1)
    assert line.startswith("rtteval: warning: ") and line.count("\n") == 1
    s = json.loads(r.stdout)
    assert s["duplicate_choices"] == 2 and s["ambiguous_answers"] == 1


def test_released_data_duplicate_choices_are_counted(shared_datasets, cli):
    """The counts ``data check`` reports match a direct reading of the files."""
    for name in ("years", "random_bd"):
        dup = amb = 0
        for f in (shared_datasets / name).glob("*.jsonl"):
            if not (f.name.startswith(("split_", "dev")) or f.name == "dev.jsonl"):
                continue
            for line in f.read_text().splitlines():
                q = json.loads(line)
                c = [str(x).strip() for x in q["choices"]]
                if len(set(c)) < len(c):
                    dup += 1
                    amb += c.count(c[q["answer"]]) > 1
        r = cli("data", "check", shared_datasets / name)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert (s.get("duplicate_choices", 0), s.get("ambiguous_answers", 0)) == (dup, amb)
