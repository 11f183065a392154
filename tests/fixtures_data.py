"""Small annotation files and images in every variant the data layer reads (shared by data tests).

Written by hand here, independent of the toy world generator, so the readers are tested on the
released formats themselves.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 24


def _noise(mode_channels: int, seed: int, side: int = SIDE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (side, side) if mode_channels == 1 else (side, side, mode_channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def good_images(root: Path) -> dict[str, Path]:
    """Images that decode: one per colour mode / format variant. Returns name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        out[name] = root / name
        img.save(out[name], **kw)

    save("rgb.png", Image.fromarray(_noise(3, 0)))
    save("rgb.jpg", Image.fromarray(_noise(3, 1)), quality=90)
    save("gray.png", Image.fromarray(_noise(1, 2)))
    rgba = _noise(4, 3)
    rgba[..., 3] = 0  # fully transparent left half
    rgba[:, SIDE // 2 :, 3] = 255
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("palette.png", Image.fromarray(_noise(3, 4)).convert("P", palette=Image.Palette.ADAPTIVE))
    save("cmyk.jpg", Image.fromarray(_noise(4, 5), "CMYK"))
    wide = np.linspace(1000, 3000, SIDE * SIDE).reshape(SIDE, SIDE).astype(np.uint16)
    save("gray16.png", Image.fromarray(wide))  # mode I;16, values 1000..3000 of 65535
    save("int32.tif", Image.fromarray(wide.astype(np.int32) * 1000, "I"))
    np.savez(root / "fundus.npz", glaucoma=np.array(1), race=np.array([2]), slo_fundus=_noise(1, 6))
    out["fundus.npz"] = root / "fundus.npz"
    return out


def bad_images(root: Path) -> dict[str, Path]:
    """Images that must be refused, by reason tag. The "missing" one is never written."""
    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(_noise(3, 7, side=64)).save(buf, "PNG")
    jpg = io.BytesIO()
    Image.fromarray(_noise(3, 8, side=64)).save(jpg, "JPEG")
    files = {
        "empty": ("empty.png", b""),
        "truncated_png": ("truncated.png", buf.getvalue()[: len(buf.getvalue()) // 2]),
        "truncated_jpg": ("truncated.jpg", jpg.getvalue()[: len(jpg.getvalue()) // 2]),
        "text_png": ("text.png", b"this is not an image\n"),
    }
    out = {}
    for tag, (name, data) in files.items():
        out[tag] = root / name
        out[tag].write_bytes(data)
    out["tiny"] = root / "tiny.png"
    Image.new("RGB", (1, 1)).save(out["tiny"])
    out["missing"] = root / "missing.png"
    return out


REPORT_RECORDS = [
    # IU-Xray style: two views, split key
    {"id": "iu-1", "report": "The heart is normal. No effusion.", "image_path": ["rgb.png", "gray.png"],
     "split": "train"},
    # MIMIC style: one view as a string, study and subject ids
    {"id": "mimic-1", "report": "Small left effusion.", "image_path": "rgba.png", "study_id": 5,
     "subject_id": 9, "split": "val"},
    # FairVLMed (Harvard) style: only an .npz filename
    {"id": "harvard-1", "report": "Cup to disc ratio 0.7.", "filename": "fundus.npz", "split": "train"},
]

PATHOLOGY_MIXED = [
    {"id": "pmc-1", "image": "palette.png", "report": "Tumour cells in sheets."},  # PMC-OA
    {"id": "quilt-1", "caption": "Granuloma with giant cells.", "image_path": "cmyk.jpg",  # Quilt
     "gpt4_summary": "", "metadata": {"source": "youtube"}},
    {"id": "quilt-2", "caption": "", "report": "", "gpt4_summary": "Necrosis.", "image_path": "rgb.jpg",
     "image": ""},
]

VQA_RECORDS = [
    {"question_id": 1, "question": "Is there pleural effusion?\n<image>", "answer": "Yes.",
     "image": "rgb.png", "report": "Small effusion.", "text": "extra"},
    {"question_id": 2, "question": "Is the heart enlarged?", "answer": "No", "image": "gray16.png",
     "report": "Normal heart."},
    {"question_id": "q3", "question": "<image>\nAre the lungs clear?", "answer": "Maybe",
     "image": "gray.png", "report": "Hazy lungs."},
]

RETRIEVAL_EXTRA = {"reference_reports": ["Ref one.", "Ref two."], "retrieve_k": 2, "domain": "radiology",
                   "reference_ids": ["iu-1", "mimic-1"], "reference_scores": [0.9, 0.8]}


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]


PREFERENCE_RECORDS = [
    {"id": "p1", "image": "rgb.png", "conversations": conversation("Is there effusion?", "Yes."),
     "rejected_conversations": conversation("Is there effusion?", "Yes."), "rejected_noised": 1,
     "pair_type": "cm", "domain": "radiology", "task": "vqa"},
    {"id": "p2", "image": "gray.png", "conversations": conversation("Describe.", "Normal."),
     "rejected_conversations": conversation("Describe.", "Effusion."), "rejected_noised": 0,
     "chosen_noised": 0, "pair_type": "oa1", "domain": "radiology", "task": "report"},
    {"id": "p3", "image": "rgb.jpg", "conversations": conversation("Any mass?", "No."),
     "rejected_conversations": conversation("Any mass?", "No."), "rejected_noised": 0,
     "rejected_image": "palette.png", "pair_type": "cm", "domain": "pathology", "task": "vqa",
     "image_root": "/nonexistent/authors/root"},
]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
