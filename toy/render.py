"""Procedural images of the toy medical world: one look per domain, one visible sign per finding.

Everything is drawn with whole-array numpy operations on a 64x64 grid (soft ellipses, Gaussian
blobs, anti-aliased polylines, smooth noise); no per-pixel Python loops. A renderer first draws
all nuisance variation (position, anatomy shape, brightness, texture, noise) and only then the
findings, so rendering the same rng with and without a finding differs only by that finding's
sign. Severity in (0, 1] scales each sign's size and contrast; low severities are hard to see.

No drawing library does this (PIL.ImageDraw has no soft shapes or stain model), hence by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

S = 64  # image side in pixels
_YY, _XX = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
_AXIS = np.arange(S, dtype=np.float32) + 0.5


def ellipse(
    cx: float, cy: float, rx: float, ry: float, theta: float = 0.0, soft: float = 0.8
) -> np.ndarray:
    """A filled ellipse in [0, 1] with an anti-aliased edge ``soft`` pixels wide."""
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = _XX - cx, _YY - cy
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    r = np.sqrt(u * u + v * v)
    return np.clip((1.0 - r) * min(rx, ry) / soft + 0.5, 0.0, 1.0)


def blobs(cx, cy, sx, sy=None, amp=None) -> np.ndarray:
    """Sum of axis-aligned Gaussian blobs, one per array entry (separable: one matrix product)."""
    cx, cy, sx = (np.atleast_1d(np.asarray(a, np.float32)) for a in (cx, cy, sx))
    sx = np.broadcast_to(sx, cx.shape)
    sy = sx if sy is None else np.broadcast_to(np.asarray(sy, np.float32), cx.shape)
    amp = (
        np.ones_like(cx) if amp is None else np.broadcast_to(np.asarray(amp, np.float32), cx.shape)
    )
    gx = np.exp(-0.5 * ((_AXIS[None] - cx[:, None]) / sx[:, None]) ** 2)
    gy = np.exp(-0.5 * ((_AXIS[None] - cy[:, None]) / sy[:, None]) ** 2)
    return (gy * amp[:, None]).T @ gx


def polyline(points: np.ndarray, width: float) -> np.ndarray:
    """A soft line of ``width`` pixels (full width at half maximum) through ``points`` (N x 2, x y).

    Drawn as Gaussian dots every half pixel, scaled so the line's centre is 1, clipped to [0, 1].
    """
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], seg.cumsum()])
    t = np.arange(0.0, arc[-1] + 0.25, 0.5)
    sigma = max(width / 2.355, 0.4)
    dots = blobs(np.interp(t, arc, points[:, 0]), np.interp(t, arc, points[:, 1]), sigma)
    return np.clip(dots * 0.5 / (sigma * np.sqrt(2 * np.pi)), 0.0, 1.0)


@cache
def _upsampler(cells: int) -> np.ndarray:
    u = np.linspace(0, cells - 1, S, dtype=np.float32)
    return np.maximum(0.0, 1.0 - np.abs(u[:, None] - np.arange(cells)[None])).astype(np.float32)


def smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Zero-mean noise of unit-ish amplitude varying over about S/cells pixels (bilinear)."""
    w = _upsampler(cells)
    return w @ rng.standard_normal((cells, cells)).astype(np.float32) @ w.T


def blend(img: np.ndarray, colour: Sequence[float], alpha: np.ndarray) -> np.ndarray:
    """Paint ``colour`` over an HxWx3 image with per-pixel opacity ``alpha``."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- radiology: chest film


def _radiology(sev: dict[str, float], rng: np.random.Generator, view: str) -> np.ndarray:
    cx, cy = 32 + rng.normal(0, 1.5), 33 + rng.normal(0, 1.5)
    k = rng.uniform(0.9, 1.05)
    img = 0.06 + 0.34 * ellipse(cx, cy + 3, 29 * k, 32 * k, soft=2.5)
    if view == "frontal":
        lungs = [
            (
                cx + side * 11 * k,
                cy - 3 + rng.normal(0, 0.7),
                9 * k * rng.uniform(0.9, 1.1),
                17 * k * rng.uniform(0.92, 1.05),
            )
            for side in (-1, 1)
        ]
        heart = [cx + 3 * k, cy + 9 * k, 8.5 * k * rng.uniform(0.92, 1.05), 7 * k]
        img = img + 0.22 * ellipse(cx, cy - 6, 3.5 * k, 20 * k, soft=1.5)  # mediastinum / spine
    else:  # lateral: one lung field, heart in front, spine behind
        lungs = [
            (cx + 1, cy - 2, 15 * k * rng.uniform(0.92, 1.05), 17 * k * rng.uniform(0.92, 1.05))
        ]
        heart = [cx - 7 * k, cy + 8 * k, 8 * k * rng.uniform(0.92, 1.05), 7.5 * k]
        img = img + 0.2 * ellipse(cx + 18 * k, cy, 3.5 * k, 26 * k, soft=1.5)
    masks = [ellipse(lx, ly, rx, ry, soft=1.5) for lx, ly, rx, ry in lungs]
    lung = np.maximum.reduce(masks)
    ribs = 0.05 * (np.sin((_YY - cy) * 0.85 + rng.uniform(0, 6.3)) > 0.55)
    markings = (0.05 * np.abs(smooth_noise(rng, 24)) + ribs) * lung
    brightness, contrast = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    noise = rng.normal(0, 0.02, (S, S)).astype(np.float32)

    # findings (drawn after every nuisance draw)
    if "cardiomegaly" in sev:
        heart[2] *= 1 + 0.55 * sev["cardiomegaly"]
        heart[3] *= 1 + 0.15 * sev["cardiomegaly"]
    img = img - 0.28 * lung + 0.33 * ellipse(*heart, soft=1.2)
    if "pleural effusion" in sev:
        s = sev["pleural effusion"]
        for i in _pick_lungs(rng, len(lungs)):
            lx, ly, rx, ry = lungs[i]
            level = ly + ry * (0.85 - 0.55 * s)
            meniscus = 0.12 * np.abs(_XX - lx) * np.sign(lx - cx)  # fluid climbs the lateral wall
            fluid = masks[i] * np.clip((_YY - level + meniscus) / 1.5, 0, 1)
            img = img + (0.12 + 0.25 * s) * fluid
            markings = markings * (1 - fluid)
    if "pneumothorax" in sev:
        s = sev["pneumothorax"]
        i = int(rng.integers(len(lungs)))
        lx, ly, rx, ry = lungs[i]
        w = 0.8 + 5.2 * s
        medial = np.sign(cx - lx)
        collapsed = ellipse(lx + medial * w, ly + 0.7 * w, rx - w, ry - w, soft=0.8)
        rim = masks[i] * (1 - collapsed)
        markings = markings * (1 - (0.3 + 0.7 * s) * rim)
        inner = ellipse(lx + medial * w, ly + 0.7 * w, rx - w - 0.9, ry - w - 0.9, soft=0.6)
        pleural_line = collapsed * (1 - inner)  # edge of the collapsed lung
        img = img - (0.01 + 0.09 * s) * rim + 0.12 * s * pleural_line
    if "nodule" in sev:
        s = sev["nodule"]
        lx, ly, rx, ry = lungs[int(rng.integers(len(lungs)))]
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6)
        img = img + (0.12 + 0.3 * s) * blobs(
            lx + rad * rx * np.cos(ang), ly + rad * ry * np.sin(ang), 0.9 + 1.4 * s
        )
    if "consolidation" in sev:
        s = sev["consolidation"]
        lx, ly, rx, ry = lungs[int(rng.integers(len(lungs)))]
        patch = blobs(
            lx + rng.uniform(-0.3, 0.3) * rx, ly + rng.uniform(-0.4, 0.5) * ry, 3 + 3.5 * s
        )
        haze = patch * (0.8 + 0.4 * smooth_noise(rng, 12)) * lung
        img = img + (0.1 + 0.22 * s) * haze

    img = (img + markings - 0.3) * contrast + 0.3
    grey = np.clip(img * brightness + noise, 0, 1)
    return _to_uint8(np.repeat(grey[..., None], 3, -1))


def _pick_lungs(rng: np.random.Generator, n: int) -> list[int]:
    """One lung, or both (a third of the time) when there are two."""
    if n == 1:
        return [0]
    choice = int(rng.integers(3))
    return [0, 1] if choice == 2 else [choice]


# ---------------------------------------------------------------- pathology: H&E tissue

_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)  # optical density per RGB channel
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)


def _pathology(sev: dict[str, float], rng: np.random.Generator, view: str) -> np.ndarray:
    eosin = 0.38 + 0.1 * smooth_noise(rng, 6) + 0.05 * smooth_noise(rng, 20)
    lumen = ellipse(
        rng.uniform(8, 56),
        rng.uniform(8, 56),
        rng.uniform(2, 5),
        rng.uniform(1.5, 3),
        rng.uniform(0, np.pi),
        soft=1.2,
    ) * (rng.random() < 0.5)
    n = int(rng.integers(45, 75))
    nx, ny = rng.uniform(0, S, n), rng.uniform(0, S, n)
    nsize, nstretch, ndark = (
        rng.uniform(0.9, 1.3, n),
        rng.uniform(0.75, 1.33, n),
        rng.uniform(0.8, 1.2, n),
    )
    tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    stain = rng.uniform(0.8, 1.2)
    noise = rng.normal(0, 0.015, (S, S, 3)).astype(np.float32)

    keep = np.ones(n, np.float32)  # nuclei a finding removes or replaces
    iy, ix = ny.astype(int).clip(0, S - 1), nx.astype(int).clip(0, S - 1)  # pixel of each nucleus
    extra = np.zeros((S, S), np.float32)  # hematoxylin a finding adds
    if "necrosis" in sev:
        s = sev["necrosis"]
        ex, ey, r = rng.uniform(12, 52), rng.uniform(12, 52), 5 + 9 * s
        ry = r * rng.uniform(0.7, 1.0)
        zone = ellipse(ex, ey, r, ry, soft=2.0)
        keep *= 1 - (0.3 + 0.7 * s) * zone[iy, ix]
        eosin = eosin * (1 - (0.3 + 0.55 * s) * zone)
        m = int(4 + 12 * s)
        extra += zone * blobs(
            ex + rng.normal(0, r / 2, m), ey + rng.normal(0, r / 2, m), 0.6, amp=0.5
        )  # debris
        m = int(6 + 16 * s)  # nuclei palisading around the necrotic zone
        t = rng.uniform(0, 2 * np.pi, m)
        extra += blobs(
            ex + (r + 1.2) * np.cos(t), ey + (ry + 1.2) * np.sin(t), 1.0, amp=0.6 + 0.6 * s
        )
    if "mitoses" in sev:
        s = sev["mitoses"]
        m = 1 + int(round(4 * s))
        centres, angles = rng.uniform(6, 58, (m, 2)), rng.uniform(0, np.pi, m)
        for (x, y), a in zip(centres, angles, strict=True):
            half = (1.2 + 2.2 * s) * np.array([np.cos(a), np.sin(a)])
            extra += (1.6 + 1.6 * s) * polyline(
                np.array([[x, y] - half, [x, y] + half]), 1.3 + 0.8 * s
            )
    if "inflammation" in sev:
        s = sev["inflammation"]
        m, r = int(10 + 100 * s), 4 + 8 * s
        fx, fy = rng.uniform(14, 50), rng.uniform(14, 50)
        extra += blobs(
            fx + rng.normal(0, r / 2, m), fy + rng.normal(0, r / 2, m), 0.65, amp=0.6 + 0.6 * s
        )
    if "fibrosis" in sev:
        s = sev["fibrosis"]
        theta, period = rng.uniform(0, np.pi), rng.uniform(7, 9)
        across = np.cos(theta) * _XX + np.sin(theta) * _YY + 2 * smooth_noise(rng, 5)
        region = ellipse(
            rng.uniform(16, 48), rng.uniform(16, 48), 14 + 14 * s, 10 + 10 * s, theta, soft=4
        )
        streaks = region * (0.5 + 0.5 * np.sin(2 * np.pi * across / period)) ** 2
        eosin = eosin + (0.1 + 0.9 * s) * streaks
        keep *= 1 - 0.6 * region[iy, ix]
    if "atypia" in sev:
        s = sev["atypia"]
        m = min(n, 2 + int(round(6 * s)))
        nsize[:m] *= 1.5 + 1.3 * s  # the first nuclei become large, dark and irregular
        nstretch[:m] *= rng.uniform(0.7, 1.4, m)
        ndark[:m] *= 1.2 + 0.3 * s
        extra += blobs(
            nx[:m] + rng.normal(0, 1.2, m),
            ny[:m] + rng.normal(0, 1.2, m),
            nsize[:m] * 0.7,
            amp=0.8 * ndark[:m],
        )  # a lobe: irregular outline

    hema = blobs(nx, ny, nsize * nstretch, nsize, ndark * keep) + extra
    hema, eosin = hema * (1 - lumen), np.clip(eosin, 0, None) * (1 - 0.9 * lumen)
    density = stain * (hema[..., None] * _HEMATOXYLIN + eosin[..., None] * _EOSIN)
    return _to_uint8(np.exp(-density) * tint + noise)


# ---------------------------------------------------------------- ophthalmology: fundus photo


def _vessel(rng: np.random.Generator, start, angle: float, length: float, bend: float, n: int = 7):
    """Points of a vessel leaving ``start`` at ``angle`` and curving by ``bend`` rad overall."""
    t = np.linspace(0, 1, n)
    a = angle + bend * t + rng.normal(0, 0.12, n).cumsum() * 0.5
    steps = np.stack([np.cos(a), np.sin(a)], -1) * (length / (n - 1))
    return np.asarray(start, np.float32) + np.vstack([[0, 0], steps[:-1].cumsum(0)])


def _ophthalmology(sev: dict[str, float], rng: np.random.Generator, view: str) -> np.ndarray:
    cx, cy, radius = 32 + rng.normal(0, 1), 32 + rng.normal(0, 1), rng.uniform(28, 31)
    side = 1 if rng.random() < 0.5 else -1  # laterality: disc on the right or the left
    dx, dy = cx + side * rng.uniform(11, 14), cy + rng.normal(0, 2)
    mx, my = cx - side * rng.uniform(2, 5), cy + rng.normal(0, 1.5)  # macula
    disc_r, cdr = rng.uniform(5.5, 6.5), rng.uniform(0.25, 0.5)
    base = np.array([0.86, 0.42, 0.16], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    r2 = ((_XX - cx) ** 2 + (_YY - cy) ** 2) / radius**2
    shade = (1 - 0.35 * r2 + 0.06 * smooth_noise(rng, 8) - 0.25 * blobs(mx, my, 4.0))[..., None]
    img = base * shade
    vessels = np.zeros((S, S), np.float32)
    # two temporal arcades curving around the macula, two shorter nasal vessels (disc on the left)
    for angle, bend, length in (
        (-np.pi / 3, 1.0, 32),
        (np.pi / 3, -1.0, 32),
        (-0.75 * np.pi, -0.3, 16),
        (0.75 * np.pi, 0.3, 16),
    ):
        a, b = (angle, bend) if side < 0 else (np.pi - angle, -bend)
        pts = _vessel(rng, (dx, dy), a + rng.normal(0, 0.12), length * rng.uniform(0.85, 1.1), b)
        vessels = np.maximum(vessels, polyline(pts, rng.uniform(1.1, 1.5)))
    brightness = rng.uniform(0.85, 1.12)
    noise = rng.normal(0, 0.015, (S, S, 3)).astype(np.float32)

    if "cupping" in sev:
        cdr = 0.38 + 0.55 * sev["cupping"]
    hemorrhage = drusen = exudate = new_vessels = None  # layers of absent findings are not painted
    if "drusen" in sev:
        s = sev["drusen"]
        m, r = int(2 + 16 * s), 6 + 4 * s
        drusen = blobs(
            mx + rng.normal(0, r / 2, m),
            my + rng.normal(0, r / 2, m),
            rng.uniform(0.7, 1.0 + 0.5 * s, m),
            amp=0.25 + 0.8 * s,
        )
    if "hemorrhage" in sev:
        s = sev["hemorrhage"]
        m = 1 + int(round(3 * s))
        ang, rad = rng.uniform(0, 2 * np.pi, m), rng.uniform(8, radius - 8, m)
        hemorrhage = blobs(
            cx + rad * np.cos(ang),
            cy + rad * np.sin(ang),
            rng.uniform(0.8, 1.0 + 2.2 * s, m),
            amp=0.3 + 1.3 * s,
        )
    if "exudates" in sev:
        s = sev["exudates"]
        m, ring = int(3 + 17 * s), rng.uniform(3, 4 + 3 * s)
        ex, ey = mx + rng.normal(0, 4), my + rng.normal(0, 4)
        ang = rng.uniform(0, 2 * np.pi, m)
        exudate = blobs(
            ex + ring * np.cos(ang),
            ey + ring * np.sin(ang),
            rng.uniform(0.6, 0.9 + 0.4 * s, m),
            amp=0.3 + 1.0 * s,
        )
    if "neovascularization" in sev:
        s = sev["neovascularization"]
        tangle = [
            polyline(
                _vessel(
                    rng,
                    (dx + rng.normal(0, 2), dy + rng.normal(0, 2)),
                    rng.uniform(0, 2 * np.pi),
                    rng.uniform(5, 8 + 6 * s),
                    rng.uniform(-3, 3),
                    n=8,
                ),
                0.8 + 0.4 * s,
            )
            for _ in range(1 + int(round(6 * s)))
        ]
        new_vessels = (0.3 + 0.6 * s) * np.maximum.reduce(tangle)

    layers = (
        ((0.92, 0.85, 0.35), drusen),
        ((1.0, 0.98, 0.7), exudate),
        ((0.55, 0.08, 0.04), 0.85 * vessels),
        ((0.97, 0.68, 0.3), 0.9 * ellipse(dx, dy, disc_r, disc_r * 1.08, soft=1.0)),
        ((1.0, 0.97, 0.88), ellipse(dx, dy, cdr * disc_r, cdr * disc_r * 1.08, soft=0.8)),
        ((0.7, 0.06, 0.05), new_vessels),
        ((0.3, 0.0, 0.0), hemorrhage),
    )
    for colour, alpha in layers:
        if alpha is not None:
            img = blend(img, colour, alpha)
    fundus = ellipse(cx, cy, radius, radius, soft=1.0)[..., None]
    return _to_uint8((img * brightness + noise) * fundus)


_RENDERERS = {"radiology": _radiology, "pathology": _pathology, "ophthalmology": _ophthalmology}
VIEWS = {"radiology": ("frontal", "lateral"), "pathology": ("field",), "ophthalmology": ("fundus",)}


def render_study(
    domain: str,
    findings: Sequence[str],
    severities: Sequence[float],
    rng: np.random.Generator,
    view: str | None = None,
) -> np.ndarray:
    """An HxWx3 uint8 image of one study showing ``findings`` at the given severities (0-1].

    ``view`` picks the radiology projection ("frontal" or "lateral"); other domains have one.
    """
    if domain not in _RENDERERS:
        raise ValueError(f"unknown domain {domain!r}; known: {sorted(_RENDERERS)}")
    view = view or VIEWS[domain][0]
    if view not in VIEWS[domain]:
        raise ValueError(f"{domain} has views {VIEWS[domain]}, not {view!r}")
    return _RENDERERS[domain](dict(zip(findings, map(float, severities), strict=True)), rng, view)
