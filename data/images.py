"""Image paths and robust decoding: every real image becomes an RGB PIL image or a clear error.

- ``resolve_image``: released annotation files carry their authors' absolute ``image_root``; a
  root that does not exist here falls back to the configured one (one warning per root). Several
  folders can be configured (one per image set, as data.release.image_search_path lists them):
  an image is then taken from the first that holds it. Paths that leave their root
  (``../../etc/passwd``, an absolute path elsewhere) are refused.
- ``load_image``: grayscale, palette, CMYK, alpha (composited on black: a transparent pixel
  carries no signal), 16-bit and float images (scaled by their own min..max, not clipped) and
  FairVLMed ``.npz`` arrays all become 8-bit RGB. The full decode happens here, so a truncated
  file fails here and not later in a transform.
- ``BadImageError`` says why an image cannot be used (``reason``: missing, empty, unreadable,
  too_small, too_large, outside_root); ``BadImageLog`` counts skipped samples for a run summary.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image

from common.io import InputError, atomic_write_json

log = logging.getLogger(__name__)

BadImagePolicy = Literal["skip", "error"]
MIN_SIDE = 4  # an image smaller than this on a side is a placeholder, not a scan
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I", "F")  # I;16* and friends are converted to "I" first


class BadImageError(InputError):
    """An image that cannot be used; ``reason`` is one of the short tags in the module doc."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        super().__init__(f"{path}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- paths

_root_exists: dict[str, bool] = {}  # per process: each root is checked (and warned about) once

Roots = str | Path | Sequence[str | Path] | None  # one configured image folder, or several in order


def image_roots(roots: Roots) -> list[str]:
    """The configured image folders as a list: one folder, several (in order), or none."""
    if roots is None or isinstance(roots, (str, Path)):
        return [str(roots)] if roots else []
    return [str(r) for r in roots if r]


def _exists_here(root: str, fallback: list[str]) -> bool:
    if root not in _root_exists:
        _root_exists[root] = os.path.isdir(root)
        if not _root_exists[root]:
            log.warning(
                "image_root %s (from the annotation file) does not exist on this machine; using %s",
                root, " then ".join(fallback) or "the image paths as written",
            )
    return _root_exists[root]


def search_path(record_root: str | Path | None, default_root: Roots) -> list[str]:
    """The folders a record's images are looked up in: its own root if it exists here, else the
    configured ones. A missing per-record root is warned about once per process (datasets call
    this for every distinct root at construction, so the warning comes from the main process)."""
    roots = image_roots(default_root)
    if record_root:
        own = str(record_root)
        if own in roots or _exists_here(own, roots):
            return [own]
    return roots


def root_for(rel: str | Path | None, roots: Sequence[str]) -> str | None:
    """The first of ``roots`` that holds ``rel`` (inside it), else the first, so that a missing
    image is reported under it; None without roots."""
    if rel is not None and len(roots) > 1:
        for root in roots:
            try:
                if inside_root(rel, root).exists():
                    return root
            except BadImageError:
                continue
    return roots[0] if roots else None


def pick_root(
    record_root: str | Path | None, default_root: Roots, rel: str | Path | None = None
) -> str | None:
    """The folder a record's image ``rel`` lives in: the record's own root if it exists here,
    else the first configured folder that holds ``rel``, else the first configured folder."""
    return root_for(rel, search_path(record_root, default_root))


def resolve_image(rel: str | Path, record_root: str | Path | None, default_root: Roots) -> Path:
    """The file of image ``rel``, under the record's root or (fallback) a configured root."""
    return inside_root(rel, pick_root(record_root, default_root, rel))


def inside_root(rel: str | Path, root: str | None) -> Path:
    """``rel`` joined to ``root``; BadImageError if the result leaves ``root``.

    Containment is checked on the normalised path (``..`` removed), not through symlinks, so a
    dataset folder that links to another disk still works. With no root the path is used as
    written (relative to the working directory).
    """
    if root is None:
        return Path(rel)
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, os.fspath(rel)))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise BadImageError(rel, "outside_root", f"resolves to {full}, outside the image root")
    return Path(full)


# ---------------------------------------------------------------- decoding


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map an array's own min..max onto 0..255 (a constant image becomes black)."""
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, np.nan)
    lo, hi = np.nanmin(arr), np.nanmax(arr)
    if not np.isfinite(lo) or hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    out = (np.nan_to_num(arr, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = _scale_to_uint8(arr)
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (see module doc for alpha and 16-bit handling)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if img.mode.startswith("I;16"):
        img = img.convert("I")
    if img.mode in _WIDE_MODES:
        return _array_to_rgb(np.asarray(img))
    return img.convert("RGB")


def _npz_array(path: Path, key: str | None) -> np.ndarray:
    """The image array of a FairVLMed-style .npz: ``key``, else the first 2-D or HxWx3 array."""
    with np.load(path, allow_pickle=False) as npz:
        if key is not None:
            if key not in npz.files:
                raise BadImageError(path, "unreadable", f"no array {key!r} in {npz.files}")
            return npz[key]
        for name in npz.files:
            arr = npz[name]
            image_like = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3))
            if image_like and arr.dtype.kind in "uif" and min(arr.shape[:2]) >= MIN_SIDE:
                return arr
        raise BadImageError(path, "unreadable", f"no 2-D or HxWx3 image array among {npz.files}")


def _check_pixels(path: Path, size: tuple[int, int]) -> None:
    """Refuse decompression bombs before decoding (PIL itself only warns below 2x its limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise BadImageError(
            path, "too_large", f"{size[0]}x{size[1]} pixels is above PIL.Image.MAX_IMAGE_PIXELS "
            f"= {limit} (raise it if the image is genuine)"
        )


def load_image(
    path: str | Path, npz_key: str | None = None, min_side: int = MIN_SIDE
) -> Image.Image:
    """Decode ``path`` (any PIL format, or .npz) fully into an RGB image; else BadImageError."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise BadImageError(path, "missing") from None
    if size == 0:
        raise BadImageError(path, "empty", "zero bytes")
    try:
        if path.suffix.lower() == ".npz":
            img = _array_to_rgb(_npz_array(path, npz_key))
        else:
            # our own file object: closing it does not invalidate the fully loaded image
            with open(path, "rb") as f:
                raw = Image.open(f)  # reads the header only; PIL refuses > 2x MAX_IMAGE_PIXELS
                _check_pixels(path, raw.size)
                raw.load()
                img = to_rgb(raw)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(path, "too_large", f"{e} (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types (struct.error, zlib.error,
        # BadZipFile...); any failure to decode one file makes it a bad image, named with the cause
        raise BadImageError(path, "unreadable", f"{type(e).__name__}: {e}") from None
    if min(img.size) < min_side:
        raise BadImageError(path, "too_small", f"{img.size[0]}x{img.size[1]} pixels")
    return img


# ---------------------------------------------------------------- skipped samples

SKIPPED_KEY = "skipped"  # the key under which a collated batch carries its skipped samples


class SkippedSample(NamedTuple):
    """What a worker sends back instead of a sample whose image is bad (plain data: picklable)."""

    path: str
    reason: str
    detail: str = ""


class BadImageLog:
    """Counts samples skipped for bad images, logs each bad path once, summarises at the end.

    Keep it in the main process: batches from ``data.datasets.collate_skip`` carry their skipped
    samples, and ``take`` records them here, so counts are right whatever the number of workers.
    """

    def __init__(self, max_logged: int = 50, max_listed: int = 1000):
        self.skipped = 0
        self.by_reason: Counter[str] = Counter()
        self.paths: dict[str, str] = {}  # bad path -> its reason, in the order first seen
        self.max_logged = max_logged
        self.max_listed = max_listed

    def record(self, path: str, reason: str, detail: str = "") -> None:
        self.skipped += 1
        self.by_reason[reason] += 1
        if path in self.paths:
            return
        self.paths[path] = reason
        if len(self.paths) <= self.max_logged:
            log.warning("skipping bad image %s: %s %s", path, reason, detail)
        elif len(self.paths) == self.max_logged + 1:
            log.warning("more bad images: further paths are counted, not logged")

    def take(self, batch: Any) -> Any:
        """Record a collated batch's skipped samples; the batch without them, None if empty."""
        if batch is None:
            return None
        for bad in batch.pop(SKIPPED_KEY, ()):
            self.record(bad.path, bad.reason, bad.detail)
        return batch if len(batch) else None

    def summary(self) -> dict[str, Any]:
        """Counts, and the bad paths themselves (the first ``max_listed``) so they can be fixed."""
        listed = dict(list(self.paths.items())[: self.max_listed])
        return {
            "skipped": self.skipped,
            "distinct_images": len(self.paths),
            "by_reason": dict(self.by_reason),
            "images": listed,  # fewer than distinct_images when more than max_listed
        }

    def merged(self, accelerator: Any) -> "BadImageLog":
        """Every process's bad images in one log. Collective: all processes call it."""
        logs = [self]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            logs = gather_object([self])
        total = BadImageLog(self.max_logged, self.max_listed)
        for other in logs:
            total.skipped += other.skipped
            total.by_reason.update(other.by_reason)
            total.paths.update(other.paths)
        return total

    def write(self, accelerator: Any, path: str | Path) -> None:
        """Every process's bad images in one JSON file, so a run names what it skipped.

        Collective: all processes call it. Writes nothing when no sample was skipped.
        """
        total = self.merged(accelerator)
        if total.skipped and accelerator.is_main_process:
            atomic_write_json(path, total.summary())
            accelerator.print(f"skipped {total.skipped} samples with bad images ({dict(total.by_reason)}): see {path}")
