"""A question or training text longer than the model's context is refused with its file:line (issue 13.8).

Scoring and training share one check (:func:`rtteval.scoring.check_context`);
without it ``eval`` scored past the context and ``unlearn`` tried to allocate
the attention matrix of a huge text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _lengthen(world: Path, dst: Path, file: str, line: int, key: str) -> Path:
    """A copy of the world with line ``line`` of ``file`` made ~40x longer (known words only)."""
    shutil.copytree(world, dst)
    p = dst / file
    lines = p.read_text().splitlines()
    rec = json.loads(lines[line - 1])
    rec[key] = " ".join([rec[key]] * 40)
    lines[line - 1] = json.dumps(rec)
    p.write_text("\n".join(lines) + "\n")
    return dst


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errs = [ln for ln in stderr.splitlines() if ln.startswith("rtteval:")]
    assert len(errs) == 1, stderr
    return errs[0]


def test_too_long_questions_and_texts_are_refused_with_their_line(
    tmp_path: Path, cli, pretrained_tiny
) -> None:
    model, world = pretrained_tiny["original"], pretrained_tiny["world"]
    data = _lengthen(world, tmp_path / "long_q", "split_0.jsonl", 3, "question")
    res = cli("eval", "--model", model, "--data", data)
    assert res.returncode == 2 and res.stdout == ""
    err = _one_error_line(res.stderr)
    assert err.startswith(f"rtteval: error: {data / 'split_0.jsonl'}:3: a question is ")
    assert "over the model's maximum context of 256 tokens" in err

    out = tmp_path / "unlearned"
    res = cli("unlearn", "--model", model, "--data", data, "--method", "gd", "--out", out,
              "--max-steps", "2")  # fmt: skip
    assert res.returncode == 2 and not out.exists()
    assert f"{data / 'split_0.jsonl'}:3: a question is " in _one_error_line(res.stderr)

    # a training passage: refused before any training, naming its corpus line
    data = _lengthen(world, tmp_path / "long_p", "corpus_split_1.jsonl", 2, "text")
    res = cli("unlearn", "--model", model, "--data", data, "--method", "gd", "--out", out,
              "--max-steps", "2")  # fmt: skip
    assert res.returncode == 2 and not out.exists()
    err = _one_error_line(res.stderr)
    assert f"{data / 'corpus_split_1.jsonl'}:2: a training text is " in err
