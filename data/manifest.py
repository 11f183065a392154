"""Reading a world's ``manifest.json``: which annotation file holds which role, domain and kind.

The toy world (toy.make_toy) writes the manifest; later stages find the world's files only
through it. Reading it is data, so the lower layers (retriever's toy-world fallback in
``DataSpec``, retrieval's default queries) import this module, never toy/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.io import InputError


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The world's manifest; InputError naming the file if it is missing or broken."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise InputError(
            f"{path}: no toy world here; make one with `bash scripts/make_toy.sh --out {root}`"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def manifest_files(
    root: str | Path, role: str | None = None, domain: str | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    """Manifest file entries matching the filters, with absolute ``path`` and ``image_root``."""
    root = Path(root).resolve()
    return [
        {**e, "path": str(root / e["path"]), "image_root": str(root / e["image_root"])}
        for e in load_manifest(root)["files"]
        if (role is None or e["role"] == role)
        and (domain is None or e["domain"] == domain)
        and (kind is None or e["kind"] == kind)
    ]
