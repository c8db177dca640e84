"""The CLI's contract: JSON on stdout, one line on stderr and exit 2 for user mistakes."""

import json
import subprocess
import sys

import pytest


def subprocess_rtteval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rtteval.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_data_check_shared_years(shared_datasets, cli):
    r = cli("data", "check", str(shared_datasets / "years"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out["splits"]) == [f"split_{k}" for k in range(5)]
    assert sum(out["splits"].values()) == 789
    assert set(out) >= {"splits", "corpus", "wrong_corpus", "fixed_wrong_corpus", "dev"}
    assert out["dev"] == 5


def test_data_check_shared_random_bd(shared_datasets, cli):
    r = cli("data", "check", str(shared_datasets / "random_bd"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["splits"]) == 10
    assert out["splits"]["split_9"] == 157
    assert out["dev"] == 10


@pytest.mark.parametrize(
    "line, field",
    [
        ("{not json", None),
        ('{"choices": ["1", "2", "3", "4"], "answer": 0}', "question"),
        ('{"question": "q?", "choices": ["1", "2", "3", "4"], "answer": 7}', "answer"),
        ('{"question": "q?", "choices": ["1", "2", "3"], "answer": 0}', "choices"),
    ],
)
def test_data_check_malformed_is_one_line_exit_2(tmp_path, line, field, cli):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "split_0.jsonl").write_text(
        '{"question": "ok?", "choices": [1, 2, 3, 4], "answer": 1}\n' + line + "\n"
    )
    r = cli("data", "check", str(d))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "split_0.jsonl:2" in lines[0]
    assert "Traceback" not in r.stderr
    if field:
        assert field in lines[0]


def test_data_check_missing_dir(tmp_path, cli):
    r = subprocess_rtteval("data", "check", str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_world_cli_writes_a_loadable_world(tmp_path, cli):
    r = cli("world", "--out", str(tmp_path / "w"), "--preset", "tiny", "--seed", "3")
    assert r.returncode == 0, r.stderr
    r = cli("data", "check", str(tmp_path / "w"))
    out = json.loads(r.stdout)
    assert out["splits"] == {f"split_{k}": 8 for k in range(5)}
    assert out["retain"] == {"retain_eval": 16, "retain_train": 16}
    # refusing to overwrite is a user error, not a traceback
    r = cli("world", "--out", str(tmp_path / "w"), "--preset", "tiny")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_unknown_world_preset_is_user_error(tmp_path, cli):
    # a real process: the console entry point itself must turn the error into exit 2
    r = subprocess_rtteval("world", "--out", str(tmp_path / "w"), "--preset", "galaxy")
    assert r.returncode == 2 and "galaxy" in r.stderr and "Traceback" not in r.stderr


def test_eval_cli_on_pretrained_model(pretrained_tiny, cli):
    r = cli(
        "eval",
        "--model",
        str(pretrained_tiny["original"]),
        "--data",
        str(pretrained_tiny["world"]),
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "likelihood"
    assert min(out["accuracy"][f"split_{k}"] for k in range(5)) >= 0.75


def test_data_check_strict_rejects_repeated_question_text(shared_datasets, cli):
    r = cli("data", "check", "--strict", str(shared_datasets / "years"))
    assert r.returncode == 2
    assert "split_" in r.stderr and ".jsonl:" in r.stderr and "question" in r.stderr
