"""Turn a dataset spec into a local directory, downloading ``hf://`` specs.

A spec is either a local path or ``hf://owner/name[/sub/dir][@revision]``, a
dataset repository on the Hugging Face Hub.  Everything after the first ``@``
is the revision (a branch, tag or commit; it may contain ``/``, as in
``refs/pr/1``), so pinning a revision makes a study reproducible even if the
repository changes later.  An optional ``/sub/dir`` selects one dataset of a
repository that holds several.  Only ``*.jsonl`` and ``manifest.json`` are
fetched: that is all the loader reads, and it keeps large extras out.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rtteval.errors import DataError

HF_PREFIX = "hf://"
ALLOW_PATTERNS = ("*.jsonl", "manifest.json")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

#: Seconds to wait for the Hugging Face Hub to accept a connection before
#: working offline (only the local cache), instead of minutes of retries.
HUB_PROBE_TIMEOUT = 3.0


def hub_host() -> tuple[str, int]:
    """The Hub's host and port (``HF_ENDPOINT`` when set)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hub's host accepts a TCP connection within ``timeout`` seconds.

    ``HF_HUB_OFFLINE=1`` counts as unreachable.  Behind an HTTPS proxy a
    direct connection proves nothing, so the hub client decides.  The probe
    runs in a thread because name resolution has no timeout of its own.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host, port = hub_host()
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split ``hf://owner/name[/sub/dir][@rev]`` into ``(repo_id, revision, subdir)``.

    Raises :class:`DataError` for a malformed spec, so a typo is reported
    before any network access.
    """
    if not spec.startswith(HF_PREFIX):
        raise DataError(
            f"not a Hugging Face dataset spec (expected {HF_PREFIX}owner/name): {spec!r}"
        )
    body, at, revision = spec[len(HF_PREFIX) :].partition("@")
    parts = body.strip("/").split("/")
    bad = (
        len(parts) < 2
        or not all(_NAME.fullmatch(p) for p in parts[:2])
        or any(p in ("", ".", "..") for p in parts[2:])
        or (at and not revision)
    )
    if bad:
        raise DataError(
            f"invalid Hugging Face dataset spec {spec!r} "
            f"(expected {HF_PREFIX}owner/name, optionally /sub/dir and @revision)"
        )
    subdir = "/".join(parts[2:]) or None
    return f"{parts[0]}/{parts[1]}", revision or None, subdir


def _hub_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed download raises: OS/network errors and the hub's own.

    Every exception class that ``huggingface_hub.errors`` exposes counts, so
    a new hub error type (it grows between releases) still becomes a clean
    DataError instead of a traceback.  Anything else is a bug and propagates.
    """
    import huggingface_hub.errors as errors

    hub = [
        v
        for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, Exception) and v.__module__ != "builtins"
    ]
    return (OSError, ValueError, *hub)


def resolve_dataset_path(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return a local dataset directory for ``spec``.

    Local paths are returned as they are (with ``~`` expanded); the loader
    checks that they exist.  ``hf://`` specs are downloaded with
    ``huggingface_hub.snapshot_download`` into ``cache_dir`` (the hub's
    default cache when ``None``), which reuses an up-to-date snapshot
    instead of downloading it again.
    """
    if isinstance(spec, Path) or not spec.startswith(HF_PREFIX):
        return Path(spec).expanduser()
    repo_id, revision, subdir = parse_hf_spec(spec)
    patterns = [f"{subdir}/{p}" if subdir else p for p in ALLOW_PATTERNS]

    import huggingface_hub

    kwargs: dict[str, Any] = {
        "repo_id": repo_id,
        "repo_type": "dataset",
        "revision": revision,
        "allow_patterns": patterns,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
    }
    offline = not hub_reachable()
    kwargs["local_files_only"] = offline
    try:
        local = huggingface_hub.snapshot_download(**kwargs)
    except _hub_errors() as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        if offline:
            detail = f"the Hub ({hub_host()[0]}) is unreachable and the local cache has no copy"
        at = f" (revision {revision!r})" if revision else ""
        raise DataError(
            f"could not download dataset {repo_id!r} from the Hugging Face Hub: {detail}{at}"
        ) from e
    root = Path(local)
    return root / subdir if subdir else root
