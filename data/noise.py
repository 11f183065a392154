"""The noised image x_v* of docs/DESIGN.md, made deterministically from a seed.

- ``other_image+gaussian`` (our default): a different real image of the same domain plus
  Gaussian pixel noise, so x_v* is plausible but not the original;
- ``gaussian``: pure noise, what the released MMed-RAG data means by ``rejected_noised`` = 1;
- ``diffusion``: the forward diffusion q(x_t | x_0) at step t (linear DDPM schedule, 1000 steps),
  as the released code offers.
All work in pixel space on PIL images, so the result can be stored as a file and seen again
exactly by the trainer. ``make_x_v_star`` is the one place x_v* is made from a record's image,
its NoiseConfig and its domain's pool of other images: the pair builder (pairs.build_pairs),
the evaluation's noised_rag (evaluation.evaluate) and the SFT reliance check (policy.train_sft)
all call it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from PIL import Image

from common.config import doc
from data.images import BadImageError

MODES = ("other_image+gaussian", "gaussian", "diffusion")
OTHER_TRIES = 5  # other images tried when the picked one is unreadable
T = TypeVar("T")


@dataclass
class NoiseConfig:
    mode: Literal["other_image+gaussian", "gaussian", "diffusion"] = doc(
        "other_image+gaussian", f"how x_v* is made: one of {MODES}")
    sigma: float = doc(0.1, "std of the Gaussian pixel noise (pixel values in [0, 1]) for other_image+gaussian")
    step: int = doc(500, "forward-diffusion step t of 1000 for the diffusion mode")
    seed: int = doc(0, "seed of the other-image pick and of the noise (with the image path)")


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


def make_x_v_star(name: str, image: Image.Image, noise: NoiseConfig, pool: Mapping[str, T],
                  load: Callable[[T], Image.Image], domain: str = "", salt: str = "x_v*") -> Image.Image:
    """x_v* of the image ``name`` (as written; ``image`` is its pixels): a function of (name,
    the names in ``pool``, noise settings, ``salt``) only.

    ``pool`` maps the name of each image of the domain to what ``load`` reads it from. For
    ``other_image+gaussian`` the other image is picked by (name, seed); an unreadable pick
    (``load`` raises BadImageError) is replaced by the next pick (up to OTHER_TRIES), so one bad
    file costs no record. Raises BadImageError("no_other_image") when no usable other image exists.
    ``salt`` keeps apart noise draws made for different purposes from the same image.
    """
    seed = stable_seed(salt, name, noise.seed)
    other = None
    if noise.mode == "other_image+gaussian":
        candidates = [c for c in pool if c != name]
        for attempt in range(OTHER_TRIES):
            if not candidates:
                break
            pick = pick_other(name, candidates, noise.seed + attempt)
            try:
                other = load(pool[pick])
                break
            except BadImageError:
                candidates.remove(pick)
        if other is None:
            raise BadImageError(name, "no_other_image", f"no readable other image of domain {domain}")
    return make_noised(noise.mode, image, seed, other=other, sigma=noise.sigma, step=noise.step)
