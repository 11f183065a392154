"""The noised image x_v* of docs/DESIGN.md, made deterministically from a seed.

- ``other_image+gaussian`` (our default): a different real image of the same domain plus
  Gaussian pixel noise, so x_v* is plausible but not the original;
- ``gaussian``: pure noise, what the released MMed-RAG data means by ``rejected_noised`` = 1;
- ``diffusion``: the forward diffusion q(x_t | x_0) at step t (linear DDPM schedule, 1000 steps),
  as the released code offers.
All work in pixel space on PIL images, so the result can be stored as a file and seen again
exactly by the trainer.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

MODES = ("other_image+gaussian", "gaussian", "diffusion")


def stable_seed(*parts: object) -> int:
    """A seed from any values (record id, base seed), the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def pick_other(key: str, candidates: list[str], seed: int) -> str:
    """A candidate other than ``key``, chosen by (key, seed) alone: the order of ``candidates`` does not matter."""
    others = sorted(c for c in candidates if c != key)
    if not others:
        raise ValueError(f"no other image to pick for {key!r}")
    return others[stable_seed(key, seed) % len(others)]


def _to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _to_image(x: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def pure_noise(size: tuple[int, int], seed: int) -> Image.Image:
    """Gaussian noise image (mean 0.5, std 0.25 per channel, clipped) of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    return _to_image(rng.normal(0.5, 0.25, size=(size[1], size[0], 3)))


def gaussian(img: Image.Image, sigma: float, seed: int) -> Image.Image:
    """``img`` plus Gaussian pixel noise of std ``sigma`` (pixel values in [0, 1])."""
    x = _to_array(img)
    return _to_image(x + np.random.default_rng(seed).normal(0.0, sigma, size=x.shape))


def diffusion(img: Image.Image, step: int, seed: int, total: int = 1000) -> Image.Image:
    """Forward diffusion at ``step`` of ``total`` (betas linear from 1e-4 to 0.02)."""
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, total))[min(max(step, 1), total) - 1]
    x0 = _to_array(img) * 2.0 - 1.0
    eps = np.random.default_rng(seed).normal(size=x0.shape)
    xt = np.sqrt(alpha_bar) * x0 + np.sqrt(1.0 - alpha_bar) * eps
    return _to_image((xt + 1.0) / 2.0)


def make_noised(
    mode: str, img: Image.Image, seed: int, other: Image.Image | None = None,
    sigma: float = 0.1, step: int = 500,
) -> Image.Image:
    """x_v* for one record; ``other`` (a different image of the same domain) for the default mode."""
    if mode == "other_image+gaussian":
        if other is None:
            raise ValueError("other_image+gaussian needs another image of the same domain")
        return gaussian(other.convert("RGB").resize(img.size), sigma, seed)
    if mode == "gaussian":
        return pure_noise(img.size, seed)
    if mode == "diffusion":
        return diffusion(img, step, seed)
    raise ValueError(f"unknown noise mode {mode!r}; choose from {MODES}")
