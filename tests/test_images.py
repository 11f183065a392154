"""Image decoding (every mode to RGB, 16-bit scaling, npz), bad images, root fallback, containment."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from common.io import InputError
from data import images
from data.images import BadImageError, BadImageLog, load_image, resolve_image
from tests.fixtures_data import SIDE, bad_images, good_images


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return good_images(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_images(tmp_path_factory.mktemp("bad"))


@pytest.fixture(autouse=True)
def fresh_root_cache(monkeypatch):
    monkeypatch.setattr(images, "_root_exists", {})


@pytest.mark.parametrize("name", ["rgb.png", "rgb.jpg", "gray.png", "rgba.png", "palette.png", "cmyk.jpg",
                                  "gray16.png", "int32.tif", "fundus.npz"])
def test_every_mode_becomes_rgb(good, name):
    img = load_image(good[name])
    assert img.mode == "RGB" and img.size == (SIDE, SIDE)
    img.resize((8, 8))  # usable after the file is closed


def test_grayscale_keeps_values_on_all_channels(good):
    arr = np.asarray(load_image(good["gray.png"]))
    expected = np.asarray(Image.open(good["gray.png"]))
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], expected)


def test_alpha_is_composited_on_black(good):
    arr = np.asarray(load_image(good["rgba.png"])).astype(int)
    src = np.asarray(Image.open(good["rgba.png"]))
    assert arr[:, : SIDE // 2].max() == 0  # transparent half: black
    np.testing.assert_array_equal(arr[:, SIDE // 2 :], src[:, SIDE // 2 :, :3])  # opaque half unchanged


def test_palette_and_cmyk_match_pillow_conversion(good):
    for name in ("palette.png", "cmyk.jpg"):
        expected = np.asarray(Image.open(good[name]).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(load_image(good[name])), expected)


@pytest.mark.parametrize("name", ["gray16.png", "int32.tif"])
def test_wide_images_scaled_by_their_own_range(good, name):
    src = np.asarray(Image.open(good[name])).astype(np.float64)
    arr = np.asarray(load_image(good[name]))[..., 0].astype(np.float64)
    assert arr.min() == 0 and arr.max() == 255  # 1000..3000 of 65535 is not crushed to near-black
    expected = (src - src.min()) / (src.max() - src.min()) * 255
    assert np.abs(arr - expected).max() <= 0.5 + 1e-9


def test_npz_picks_the_image_array_or_the_named_key(good, tmp_path):
    arr = np.asarray(load_image(good["fundus.npz"]))[..., 0]
    with np.load(good["fundus.npz"]) as npz:
        np.testing.assert_array_equal(arr, npz["slo_fundus"])
    np.savez(tmp_path / "two.npz", first=np.zeros((8, 8), np.uint8), second=np.full((8, 8), 7, np.uint8))
    assert np.asarray(load_image(tmp_path / "two.npz", npz_key="second")).max() == 7
    np.savez(tmp_path / "float.npz", label=np.array(1.0), img=np.linspace(-1, 1, 64).reshape(8, 8))
    assert np.asarray(load_image(tmp_path / "float.npz")).max() == 255
    np.savez(tmp_path / "labels.npz", label=np.array(1), volume=np.zeros((5, 8, 8)))
    with pytest.raises(BadImageError, match="no 2-D or HxWx3 image array"):
        load_image(tmp_path / "labels.npz")
    with pytest.raises(BadImageError, match="no array 'nope'"):
        load_image(tmp_path / "two.npz", npz_key="nope")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BadImageError, match="unreadable"):
        load_image(tmp_path / "corrupt.npz")


@pytest.mark.parametrize(
    "tag, reason",
    [("missing", "missing"), ("empty", "empty"), ("truncated_png", "unreadable"), ("truncated_jpg", "unreadable"),
     ("text_png", "unreadable"), ("tiny", "too_small")],
)
def test_bad_images_raise_input_error_naming_the_path(bad, tag, reason):
    with pytest.raises(InputError) as info:
        load_image(bad[tag])
    assert isinstance(info.value, BadImageError) and info.value.reason == reason
    assert str(info.value).startswith(str(bad[tag]))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, below 2x
@pytest.mark.parametrize("limit", [100, 400])  # 24x24 = 576 pixels: above 2x the limit, or above 1x
def test_decompression_bomb_is_a_clear_error(good, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(BadImageError, match="MAX_IMAGE_PIXELS") as info:
        load_image(good["rgb.png"])
    assert info.value.reason == "too_large"


def test_missing_record_root_falls_back_with_one_warning(tmp_path, caplog):
    (tmp_path / "a.png").touch()
    caplog.set_level(logging.WARNING, logger="data.images")
    gone = "/home/author/mimic/images"
    for _ in range(3):
        assert resolve_image("a.png", gone, tmp_path) == tmp_path / "a.png"
    resolve_image("a.png", "/other/missing/root", tmp_path)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and gone in warned[0] and "/other/missing/root" in warned[1]
    assert resolve_image("a.png", tmp_path, "/ignored") == tmp_path / "a.png"  # an existing root wins


def test_several_roots_first_one_holding_the_image(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "_root_exists", {})
    mimic, iu = tmp_path / "mimic", tmp_path / "iu"
    for folder, name in ((mimic, "m.png"), (iu, "i.png"), (iu, "m.png")):
        folder.mkdir(exist_ok=True)
        (folder / name).touch()
    roots = [str(mimic), str(iu)]
    assert resolve_image("m.png", None, roots) == mimic / "m.png"  # the first listed that holds it
    assert resolve_image("i.png", None, roots) == iu / "i.png"
    assert resolve_image("gone.png", None, roots) == mimic / "gone.png"  # missing: under the first
    assert resolve_image("i.png", "/authors/root", roots) == iu / "i.png"  # a missing own root falls back
    assert resolve_image("i.png", mimic, roots) == mimic / "i.png"  # an existing own root wins
    assert images.pick_root(None, roots, "i.png") == str(iu) and images.pick_root(None, roots) == str(mimic)
    assert resolve_image("i.png", None, str(mimic)) == mimic / "i.png"  # one folder: as given
    (tmp_path / "secret.png").touch()
    with pytest.raises(InputError, match="outside the image root"):
        resolve_image("../secret.png", None, roots)


def test_paths_outside_the_root_are_refused(tmp_path):
    for rel in ("../../etc/passwd", "/etc/passwd", "sub/../../x.png"):
        with pytest.raises(InputError, match="outside the image root"):
            resolve_image(rel, None, tmp_path)
    assert resolve_image(str(tmp_path / "sub" / "x.png"), None, tmp_path) == tmp_path / "sub" / "x.png"
    assert resolve_image("sub/../x.png", None, tmp_path) == tmp_path / "x.png"
    assert str(resolve_image("rel/x.png", None, None)) == "rel/x.png"  # no root: as written


def test_bad_image_log_counts_and_logs_each_path_once(caplog):
    caplog.set_level(logging.WARNING, logger="data.images")
    log = BadImageLog(max_listed=1)
    for path in ("a.png", "a.png", "b.png"):
        log.record(path, "missing")
    assert log.summary() == {
        "skipped": 3, "distinct_images": 2, "by_reason": {"missing": 3}, "images": {"a.png": "missing"}
    }
    assert len(caplog.records) == 2
