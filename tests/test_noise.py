import numpy as np
import pytest
from PIL import Image

from data.noise import make_noised, pick_other, pure_noise, stable_seed


def _img(v):
    return Image.fromarray(np.full((16, 20, 3), v, np.uint8))


@pytest.mark.parametrize("mode", ["other_image+gaussian", "gaussian", "diffusion"])
def test_deterministic_and_seed_dependent(mode):
    a, b = _img(40), _img(200)
    x1 = np.asarray(make_noised(mode, a, seed=7, other=b))
    x2 = np.asarray(make_noised(mode, a, seed=7, other=b))
    x3 = np.asarray(make_noised(mode, a, seed=8, other=b))
    assert x1.shape == (16, 20, 3) and np.array_equal(x1, x2) and not np.array_equal(x1, x3)


def test_modes_mean_what_they_say():
    a, b = _img(40), _img(200)
    assert abs(np.asarray(make_noised("other_image+gaussian", a, 1, other=b, sigma=0.05)).mean() - 200) < 5
    assert abs(np.asarray(pure_noise((20, 16), 1)).mean() - 127) < 10
    early = np.asarray(make_noised("diffusion", a, 1, step=1)).astype(float)
    assert abs(early.mean() - 40) < 5  # step 1 keeps the image; step 1000 is noise
    with pytest.raises(ValueError):
        make_noised("other_image+gaussian", a, 1)


def test_pick_other_stable_and_never_self():
    cands = [f"img{i}.png" for i in range(10)]
    picks = [pick_other("img3.png", cands, seed=0) for _ in range(3)]
    assert len(set(picks)) == 1 and picks[0] != "img3.png"
    assert pick_other("img3.png", list(reversed(cands)), seed=0) == picks[0]
    assert stable_seed("a", 1) == stable_seed("a", 1) != stable_seed("a", 2)
