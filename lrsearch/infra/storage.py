"""Paths that may be local or on shared storage (``s3://``, ``gs://``, ...), through pyarrow.fs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def filesystem(path: str) -> tuple[Any, str]:
    """The pyarrow filesystem of a local path or a storage URI, and the path on it."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def listing(fs: Any, base: str, dirs: bool) -> dict[str, str]:
    """``{name: path}`` of the directories (``dirs``) or files directly under base."""
    import pyarrow.fs as pafs

    kind = pafs.FileType.Directory if dirs else pafs.FileType.File
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return {i.base_name: i.path for i in infos if i.type == kind}
