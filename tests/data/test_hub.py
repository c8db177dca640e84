"""``hf://`` dataset specs, with ``snapshot_download`` faked (no network in tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from rtteval.data import load_dataset, resolve_dataset_path
from rtteval.data.hub import parse_hf_spec
from rtteval.errors import DataError

QUESTION = {"question": "When was Ada born?", "choices": [1815, 1816, 1817, 1818], "answer": 0}


class FakeHub:
    """Stands in for ``snapshot_download``: records its arguments, writes a tiny dataset."""

    def __init__(self, root: Path, error: BaseException | None = None) -> None:
        self.root = root
        self.error = error
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        target = self.root / "snapshots" / (kwargs.get("revision") or "main")
        sub = kwargs["allow_patterns"][0].rpartition("/")[0]
        data = target / sub if sub else target
        data.mkdir(parents=True, exist_ok=True)
        (data / "split_0.jsonl").write_text(json.dumps(QUESTION) + "\n", encoding="utf-8")
        (data / "corpus_split_0.jsonl").write_text('{"text": "Ada was born in 1815."}\n')
        return str(target)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr("rtteval.data.hub.hub_reachable", lambda: True)  # the fake hub answers
    return fake


def test_local_paths_pass_through(hub: FakeHub, tmp_path: Path) -> None:
    assert resolve_dataset_path(tmp_path / "x") == tmp_path / "x"
    assert resolve_dataset_path("rel/dir") == Path("rel/dir")
    assert resolve_dataset_path("~/data") == Path.home() / "data"
    assert hub.calls == []


def test_download(hub: FakeHub, tmp_path: Path) -> None:
    path = resolve_dataset_path("hf://owner/name", cache_dir=tmp_path / "cache")
    assert path == hub.root / "snapshots" / "main"
    assert hub.calls == [
        {
            "repo_id": "owner/name",
            "repo_type": "dataset",
            "revision": None,
            "allow_patterns": ["*.jsonl", "manifest.json"],
            "cache_dir": str(tmp_path / "cache"),
            "local_files_only": False,
        }
    ]
    ds = load_dataset("hf://owner/name")
    assert ds.splits["split_0"][0].choices == ("1815", "1816", "1817", "1818")
    assert ds.corpus["split_0"][0].text == "Ada was born in 1815."


def test_revision_and_subdir(hub: FakeHub) -> None:
    path = resolve_dataset_path("hf://owner/name.v2@v1.0")
    assert path == hub.root / "snapshots" / "v1.0"
    call = hub.calls[-1]
    assert (call["repo_id"], call["repo_type"], call["revision"]) == (
        "owner/name.v2",
        "dataset",
        "v1.0",
    )

    path = resolve_dataset_path("hf://owner/name/years@refs/pr/1")
    assert path == hub.root / "snapshots" / "refs/pr/1" / "years"
    assert hub.calls[-1]["revision"] == "refs/pr/1"
    assert hub.calls[-1]["allow_patterns"] == ["years/*.jsonl", "years/manifest.json"]
    assert load_dataset("hf://owner/name/years@refs/pr/1").split_names == ["split_0"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf://o/n", ("o/n", None, None)),
        ("hf://o/n@abc123", ("o/n", "abc123", None)),
        ("hf://o/n/a/b", ("o/n", None, "a/b")),
        ("hf://o/n/sub@main", ("o/n", "main", "sub")),
    ],
)
def test_parse_spec(spec: str, expected: tuple[str, str | None, str | None]) -> None:
    assert parse_hf_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "hf://",
        "hf://owner",
        "hf://owner/",
        "hf://owner/name@",
        "hf:///name",
        "hf://o/n/../x",
        "hf://o w/n",
    ],
)
def test_bad_spec(hub: FakeHub, spec: str) -> None:
    with pytest.raises(DataError, match="invalid Hugging Face dataset spec"):
        resolve_dataset_path(spec)
    assert hub.calls == []


@pytest.mark.parametrize(
    "error",
    [
        RepositoryNotFoundError("404 Client Error.\nRepository Not Found", response=mock.Mock()),
        LocalEntryNotFoundError("cannot reach the Hub and nothing is cached"),
        OSError("Network is unreachable"),
    ],
    ids=["repo-not-found", "offline", "oserror"],
)
def test_hub_errors_become_data_errors(hub: FakeHub, error: BaseException) -> None:
    hub.error = error
    with pytest.raises(DataError) as info:
        load_dataset("hf://owner/name@v2")
    message = str(info.value)
    assert message.startswith("could not download dataset 'owner/name' from the Hugging Face Hub: ")
    assert "\n" not in message  # one line for the CLI
    assert " ".join(str(error).split()) in message and "revision 'v2'" in message
    assert info.value.__cause__ is error


def test_bugs_are_not_swallowed(hub: FakeHub) -> None:
    hub.error = KeyError("a bug, not a download problem")
    with pytest.raises(KeyError):
        resolve_dataset_path("hf://owner/name")


def test_unreachable_hub_uses_only_the_cache(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: one quick look in the local cache, and a message that says why it failed."""
    monkeypatch.setattr("rtteval.data.hub.hub_reachable", lambda: False)
    hub.error = LocalEntryNotFoundError("not in the cache")
    with pytest.raises(DataError, match="unreachable and the local cache has no copy"):
        resolve_dataset_path("hf://owner/name")
    assert hub.calls[-1]["local_files_only"] is True
