"""Reliability fault suite: every stage end to end on a tiny toy world, under faults.

    python -m tests.faults [--out DIR] [--only SUBSTRING ...]

Each scenario runs the real CLIs as subprocesses and decides "nothing lost?" by a check on
what the run left behind (exit code, summaries, files on disk, weights compared bit for bit),
never by a constant. The table goes to DIR/FAULTS.md (default outputs/faults).
The fast scenario functions are also used by tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
BAD_KINDS = ("missing", "empty", "truncated_jpeg", "text_png", "one_pixel", "bomb_header")
GOOD_ODD_KINDS = ("gray16", "cmyk")  # unusual but valid: must be used, not skipped


@dataclass
class Row:
    fault: str
    stage: str
    happened: str
    ok: bool | None  # None: scenario could not be run here (reason in ``happened``)


# ---------------------------------------------------------------- helpers


def cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def bomb_png() -> bytes:
    """A valid PNG header declaring 40000x40000 pixels (1.6 Gpx) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_kind(path: Path, kind: str) -> None:
    """Overwrite (or remove) ``path`` with one fault kind; the name (.png) is kept as the records say."""
    rng = np.random.default_rng(len(kind))
    if kind == "missing":
        path.unlink(missing_ok=True)
        return
    buf = io.BytesIO()
    if kind == "empty":
        data = b""
    elif kind == "truncated_jpeg":
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    elif kind == "text_png":
        data = b"this is a text file, not an image\n"
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1)).save(buf, "PNG")
        data = buf.getvalue()
    elif kind == "bomb_header":
        data = bomb_png()
    elif kind == "gray16":
        Image.fromarray(np.linspace(0, 60000, 64 * 64).reshape(64, 64).astype(np.uint16)).save(buf, "PNG")
        data = buf.getvalue()
    elif kind == "cmyk":
        Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "CMYK").save(buf, "JPEG")
        data = buf.getvalue()
    else:
        raise ValueError(kind)
    path.write_bytes(data)


def inject(paths: list[Path]) -> dict[str, Path]:
    """One fault kind per path (bad kinds first, then the valid odd ones). Returns kind -> path."""
    kinds = BAD_KINDS + GOOD_ODD_KINDS
    assert len(paths) >= len(kinds), "not enough distinct images to inject into"
    out = {}
    for kind, path in zip(kinds, paths):
        write_kind(path, kind)
        out[kind] = path
    return out


def per_record_images(world: Path, domain: str, name: str) -> list[list[Path]]:
    """The image files of each record of one annotation file of the toy world, in record order."""
    f = world / domain / name
    rows = json.loads(f.read_text()) if f.suffix == ".json" else [json.loads(x) for x in f.read_text().splitlines()]
    out = []
    for r in rows:  # toy files mix the released variants: `image`, or `image_path` (str or list of views)
        views = r.get("image") or r.get("image_path")
        out.append([world / domain / "images" / v for v in ([views] if isinstance(views, str) else views)])
    return out


def record_images(world: Path, domain: str, name: str) -> list[Path]:
    """Distinct image files of one annotation file, in record order."""
    return list(dict.fromkeys(p for views in per_record_images(world, domain, name) for p in views))


def named_check(text: str, injected: dict[str, Path]) -> tuple[bool, str]:
    """Every bad path is named in ``text``; neither valid odd image (16-bit, CMYK) is."""
    unnamed = [k for k in BAD_KINDS if str(injected[k]) not in text and injected[k].name not in text]
    wrongly = [k for k in GOOD_ODD_KINDS if k in injected and str(injected[k]) in text]
    msg = []
    if unnamed:
        msg.append(f"not named: {unnamed}")
    if wrongly:
        msg.append(f"valid image skipped: {wrongly}")
    return not msg, "; ".join(msg)


def poll(pred: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300, every: float = 0.005) -> bool:
    """Wait until ``pred()``; a path renamed away while ``pred`` globs it counts as "not yet"."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        try:
            if pred():
                return True
        except FileNotFoundError:
            pass
        time.sleep(every)
    return False


def kill_when(argv: list[str], pred: Callable[[], bool], timeout: float = 300) -> str:
    """Start ``python -m argv``, SIGKILL it once ``pred()``; returns what happened."""
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    hit = poll(pred, proc, timeout)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return "killed" if hit and proc.returncode == -signal.SIGKILL else f"not killed in time (rc {proc.returncode})"


def safetensors_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def all_checkpoints_load(ckpts: Path, weights: str) -> tuple[bool, int]:
    """Every complete step folder's weights load; latest.json points at a complete folder."""
    from safetensors.torch import load_file

    steps = [p for p in ckpts.glob("step-*") if p.is_dir()]
    for p in steps:
        load_file(str(p / weights))
        json.loads((p / "trainer_state.json").read_text())
    latest = json.loads((ckpts / "latest.json").read_text()) if (ckpts / "latest.json").exists() else None
    ok = latest is None or (ckpts / latest["name"] / "trainer_state.json").is_file()
    return ok, len(steps)


# ---------------------------------------------------------------- worlds


class Worlds:
    """Tiny inputs built once per suite run under ``base``."""

    def __init__(self, base: Path):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)

    def world(self, name: str = "clean") -> Path:
        from toy.make_toy import make_world

        path = self.base / f"world_{name}"
        if not (path / "manifest.json").exists():
            make_world(path, size="tiny", progress=False)
        return path

    def clip_config(self, folder: Path, world: Path, **over) -> str:
        from tests.test_retriever_train import write_config

        opts = {"epochs": 1, "val_every": 1, "batch_size": 4, "log_every": 1, **over}
        return write_config(folder, world, **opts)

    def dpo_world(self) -> Path:
        from tests.test_pair_data import toy_policy, write_pairs

        root = self.base / "dpo_world"
        if not (root / "policy").exists():
            write_pairs(root, n=16)
            toy_policy(root / "policy")
        return root

    def sharp_policy(self) -> Path:
        """The DPO world's policy with its output head 50x larger: as confident as a trained policy
        (the untrained one's near-uniform head keeps its log-probs from moving at any learning rate)."""
        import torch
        from transformers import AutoModelForImageTextToText

        d = self.dpo_world()
        path = d / "policy_sharp"
        if not (path / "config.json").exists():
            shutil.copytree(d / "policy", path, dirs_exist_ok=True)
            model = AutoModelForImageTextToText.from_pretrained(path)
            with torch.no_grad():
                model.lm_head.weight.mul_(50.0)
            model.save_pretrained(path)
        return path

    def pairs_world(self) -> dict[str, Path]:
        from toy.oracle_retrieval import ToyRetrievalConfig, write_oracle_retrieval
        from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts

        world = self.world("pairs")
        index = self.base / "pairs_retrieval" / "index.json"
        policy = self.base / "pairs_policy"
        if not index.exists():
            write_oracle_retrieval(ToyRetrievalConfig(world=str(world), out=str(index.parent), roles=["alignment_vqa"]))
        if not policy.exists():
            cfg = ToyPolicyConfig(vocab_size=500, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                                  text_heads=2, vision_heads=2)
            build_toy_policy(world_texts(world), policy, cfg)
        return {"world": world, "index": index, "policy": policy}


def dpo_args(w: Path, out: Path, pairs: Path | None = None, **over: str) -> list[str]:
    opts = {"--pairs": f"[{pairs or w / 'pairs.json'}]", "--image_root": str(w / "images"), "--policy.path": str(w / "policy"),
            "--heldout_fraction": "0.25", "--lora.r": "8", "--lora.alpha": "16", "--lora.dropout": "0",
            "--lora.train_projector": "true", "--train.output_dir": str(out), "--train.batch_size": "2",
            "--train.lr": "5e-3", "--train.warmup_ratio": "0", "--train.max_steps": "4", "--train.log_every": "1",
            "--train.progress": "false", "--train.seed": "0", **over}
    return ["dpo.train_dpo", *[x for kv in opts.items() for x in kv]]


def pairs_args(p: dict[str, Path], out: Path, **over: str) -> list[str]:
    opts = {"--policy.path": str(p["policy"]), "--retrieval_index": str(p["index"]), "--roles": "[alignment_vqa]",
            "--domain": "pathology", "--out": str(out), "--limit": "0", "--batch_size": "4",
            "--max_new_tokens_vqa": "3", "--max_new_tokens_report": "4", "--report_threshold": "0",
            "--progress": "false", "--threads": "1", **over}
    return ["pairs.build_pairs", *[x for kv in opts.items() for x in kv]]


# ---------------------------------------------------------------- bad images


def bad_images_clip(w: Worlds) -> list[Row]:
    world = w.world("bad_clip")
    injected = inject(record_images(world, "pathology", "retriever_train_report.json"))
    rows = []
    shutil.rmtree(w.base / "clip_bad", ignore_errors=True)
    cfg = w.clip_config(w.base / "clip_bad", world)
    res = cli("retriever.finetune_clip", cfg, "--output_dir", str(w.base / "clip_bad" / "out"))
    named, why = named_check(res.stdout + res.stderr, injected)
    metrics = w.base / "clip_bad" / "out" / "pathology" / "metrics.jsonl"
    counted = [json.loads(x).get("bad_images") for x in metrics.read_text().splitlines()] if metrics.exists() else []
    n = max([c for c in counted if c is not None], default=0)
    ok = res.returncode == 0 and named and n >= len(BAD_KINDS)
    rows.append(Row("bad images x8 (skip)", "CLIP fine-tuning", f"rc {res.returncode}, bad_images counted {n}; {why or 'all 6 bad named, 16-bit/CMYK used'}", ok))
    res = cli("retriever.finetune_clip", cfg, "--output_dir", str(w.base / "clip_bad" / "err"), "--data.bad_image", "error")
    named_any = any(str(p) in res.stderr for k, p in injected.items() if k in BAD_KINDS)
    no_ckpt = not list((w.base / "clip_bad" / "err").rglob("step-*"))
    rows.append(Row("bad images, policy error", "CLIP fine-tuning",
                    f"rc {res.returncode}: {last_line(res.stderr)}", res.returncode == 2 and named_any and no_ckpt))
    return rows


def retrieve_args(w: Worlds, world: Path) -> list[str]:
    """retriever.retrieve on the world's pathology test VQA with the reference CLIP run."""
    return ["--clip_dir", str(clip_reference(w)), "--checkpoint", "latest", "--data.world", str(world),
            "--domains", "[pathology]", "--routing", "oracle",
            "--queries", f"[{{path: {world / 'pathology' / 'test_vqa.jsonl'}, domain: pathology, role: test_vqa, "
            f"image_root: {world / 'pathology' / 'images'}}}]"]


def bad_images_retrieve(w: Worlds) -> list[Row]:
    world = w.world("bad_retr")
    injected = inject(record_images(world, "pathology", "test_vqa.jsonl"))
    base = retrieve_args(w, world)
    rows = []
    for name in ("retr_bad", "retr_err"):
        shutil.rmtree(w.base / name, ignore_errors=True)
    res = cli("retriever.retrieve", *base, "--output_dir", str(w.base / "retr_bad"))
    summary = w.base / "retr_bad" / "retrieval_metrics.json"
    text = res.stdout + res.stderr + (summary.read_text() if summary.exists() else "")
    named, why = named_check(text, injected)
    in_summary = summary.exists() and all(str(injected[k]) in summary.read_text() or injected[k].name in summary.read_text() for k in BAD_KINDS)
    counted = json.loads(summary.read_text())["files"]["pathology_test_vqa.jsonl"]["unreadable_images"] if summary.exists() else None
    want = {str(injected[k]) for k in BAD_KINDS}
    n_bad = sum(bool({str(v) for v in views} & want) for views in per_record_images(world, "pathology", "test_vqa.jsonl"))
    result = w.base / "retr_bad" / "pathology_test_vqa.jsonl"
    flagged = sum("retrieve_error" in json.loads(x) for x in result.read_text().splitlines()) if result.exists() else None
    rows.append(Row("bad images x8 (skip)", "retrieval",
                    f"rc {res.returncode}; {why or 'all 6 bad named in log'}; unreadable_images in summary {counted}; "
                    f"rows flagged retrieve_error {flagged} of {n_bad} on a bad image; paths named in retrieval_metrics.json: {in_summary}",
                    res.returncode == 0 and named and counted == len(BAD_KINDS) and flagged == n_bad))
    res = cli("retriever.retrieve", *base, "--output_dir", str(w.base / "retr_err"), "--data.bad_image", "error")
    named_any = any(str(p) in res.stderr for k, p in injected.items() if k in BAD_KINDS)
    complete = (w.base / "retr_err" / "index.json").exists()
    rows.append(Row("bad images, policy error", "retrieval", f"rc {res.returncode}: {last_line(res.stderr)}",
                    res.returncode == 2 and named_any and not complete))
    return rows


def bad_images_pairs(w: Worlds) -> list[Row]:
    p = w.pairs_world()
    injected = inject(record_images(p["world"], "pathology", "alignment_vqa.jsonl"))
    out = w.base / "pairs_bad"
    for folder in (out, w.base / "pairs_err"):
        shutil.rmtree(folder, ignore_errors=True)
    res = cli(*pairs_args(p, out))
    stats = json.loads((out / "pairs_stats.json").read_text()) if (out / "pairs_stats.json").exists() else {}
    skipped = {s["path"] for s in stats.get("skipped_records", [])}
    want = {str(injected[k]) for k in BAD_KINDS}
    n_bad = sum(bool({str(v) for v in views} & want) for views in per_record_images(p["world"], "pathology", "alignment_vqa.jsonl"))
    lost_good = {str(injected[k]) for k in GOOD_ODD_KINDS} & skipped
    ok = res.returncode == 0 and want <= skipped and not lost_good and stats.get("skipped") == n_bad
    rows = [Row("bad images x8 (skip)", "pair building",
                f"rc {res.returncode}; pairs_stats skipped {stats.get('skipped')} (records on a bad image: {n_bad}) by reason {stats.get('skipped_by_reason')}; "
                f"missing from summary {sorted(want - skipped)}; valid skipped {sorted(lost_good)}", ok)]
    res = cli(*pairs_args(p, w.base / "pairs_err", **{"--bad_image": "error"}))
    rows.append(Row("bad images, policy error", "pair building",
                    f"rc {res.returncode}: {last_line(res.stderr)}",
                    res.returncode == 2 and any(str(injected[k]) in res.stderr for k in BAD_KINDS)))
    return rows


def bad_images_dpo(w: Worlds) -> list[Row]:
    d = w.dpo_world()
    img = d / "images"
    records = json.loads((d / "pairs.json").read_text())
    extra, injected = [], {}
    for i, kind in enumerate(BAD_KINDS + GOOD_ODD_KINDS):
        path = img / f"fault_{kind}.png"
        if kind != "missing":
            path.write_bytes(b"x")
        write_kind(path, kind)
        injected[kind] = path
        extra.append({**records[i % len(records)], "id": f"fault-{kind}", "image": path.name})
    bad_pairs = d / "pairs_bad.json"
    bad_pairs.write_text(json.dumps(records + extra))
    out = w.base / "dpo_bad"
    for folder in (out, w.base / "dpo_err"):
        shutil.rmtree(folder, ignore_errors=True)
    # heldout 0: every pair is trained on; 8 steps x 2 = one pass over all 24 pairs
    res = cli(*dpo_args(d, out, bad_pairs, **{"--heldout_fraction": "0", "--train.max_steps": "0", "--train.epochs": "1"}))
    text = res.stdout + res.stderr
    named, why = named_check(text, injected)
    listed = json.loads((out / "bad_images.json").read_text()) if (out / "bad_images.json").exists() else {}
    counted = listed.get("skipped") == len(BAD_KINDS) and {str(injected[k]) for k in BAD_KINDS} <= set(listed.get("images", {}))
    rows = [Row("bad images x8 (skip)", "DPO training",
                f"rc {res.returncode}; bad_images.json counts and names the {len(BAD_KINDS)}: {counted}; {why or 'all 6 bad named'}",
                res.returncode == 0 and named and counted and (out / "adapter" / "adapter_model.safetensors").exists())]
    err = w.base / "dpo_err"
    res = cli(*dpo_args(d, err, bad_pairs, **{"--heldout_fraction": "0", "--bad_image": "error"}))
    rows.append(Row("bad images, policy error", "DPO training", f"rc {res.returncode}: {last_line(res.stderr)}",
                    res.returncode == 2 and any(str(injected[k]) in res.stderr for k in BAD_KINDS)
                    and not (err / "adapter").exists()))
    return rows


# ---------------------------------------------------------------- malformed input

# per CLI: the option naming its output folder, and an int field for the wrong-type case
CLIS = {
    "retriever.finetune_clip": ("--output_dir", "--epochs"),
    "retriever.retrieve": ("--output_dir", "--k.k"),
    "pairs.build_pairs": ("--out", "--limit"),
    "dpo.train_dpo": ("--train.output_dir", "--train.max_steps"),
    "policy.train_sft": ("--train.output_dir", "--train.epochs"),
}


def config_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    broken = tmp / "broken.yaml"
    broken.write_text("epochs: [1, 2\nseed: 0\n")
    return [("unknown config key", ["--no_such_key", "1"]), ("config file does not exist", [str(tmp / "nope.yaml")]),
            ("broken YAML config", [str(broken)])]


def exit2_row(fault: str, stage: str, res: subprocess.CompletedProcess, out: Path, mention: str) -> Row:
    left = [p.name for p in out.rglob("*")] if out.exists() else []
    ok = res.returncode == 2 and mention in res.stderr and not left and "Traceback" not in res.stderr
    return Row(fault, stage, f"rc {res.returncode}: {last_line(res.stderr)}" + (f"; left {left[:5]}" if left else ""), ok)


def malformed_config(w: Worlds) -> list[Row]:
    tmp = w.base / "cfg"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for module, (out_key, int_key) in CLIS.items():
        cases = config_cases(tmp) + [("wrong type", [int_key, "abc"])]
        for fault, args in cases:
            out = tmp / f"out_{module}_{len(rows)}"
            res = cli(module, *args, out_key, str(out))
            mention = {"unknown config key": "no_such_key", "wrong type": int_key.lstrip("-"),
                       "config file does not exist": "nope.yaml", "broken YAML config": "broken.yaml"}[fault]
            rows.append(exit2_row(fault, module, res, out, mention))
    return rows


def malformed_annotations(w: Worlds) -> list[Row]:
    d = w.dpo_world()
    tmp = w.base / "ann"
    tmp.mkdir(parents=True, exist_ok=True)
    good = json.loads((d / "pairs.json").read_text())
    cases = {
        "broken JSON": '[{"id": "a", "image": ',
        "missing key (conversations)": json.dumps([{k: v for k, v in good[0].items() if k != "conversations"}] + good[1:]),
        "wrong type (conversations a string)": json.dumps([{**good[0], "conversations": "yes"}] + good[1:]),
    }
    rows = []
    for fault, text in cases.items():  # a bad record stops the run only with bad_record: error
        f = tmp / f"{len(rows)}.json"
        f.write_text(text)
        out = tmp / f"out{len(rows)}"
        args = dpo_args(d, out, f, **({} if fault == "broken JSON" else {"--bad_record": "error"}))
        rows.append(exit2_row(f"annotation: {fault}", "DPO training", cli(*args), out, str(f)))
    rows.append(bad_record_skipped(d, tmp, good))
    out = tmp / "out_nopath"
    rows.append(exit2_row("annotation path does not exist", "DPO training", cli(*dpo_args(d, out, tmp / "none.json")),
                          out, "none.json"))
    out = tmp / "out_world"
    rows.append(exit2_row("world path does not exist", "retriever.finetune_clip",
                          cli("retriever.finetune_clip", "--data.world", str(tmp / "noworld"), "--output_dir", str(out)),
                          out, "noworld"))
    rows += malformed_retriever_files(w, tmp)
    index = tmp / "index.json"
    index.write_text("{ not json")
    out = tmp / "out_pairs"
    rows.append(exit2_row("retrieval index: broken JSON", "pair building",
                          cli("pairs.build_pairs", "--retrieval_index", str(index), "--out", str(out)), out, str(index)))
    return rows


def bad_record_skipped(d: Path, tmp: Path, good: list[dict]) -> Row:
    """The default (bad_record: skip): the run completes and names the bad record in bad_records.json."""
    annotations = tmp / "one_bad_record.json"
    annotations.write_text(json.dumps([{**good[0], "conversations": "yes"}] + good[1:]))
    out = tmp / "out_skip"
    res = cli(*dpo_args(d, out, annotations))
    summary = out / "bad_records.json"
    named = json.loads(summary.read_text())["bad_records"]["records"] if summary.is_file() else []
    ok = res.returncode == 0 and len(named) == 1 and named[0].startswith(f"{annotations}:[0]: ")
    return Row("annotation: a record that cannot be used, default bad_record: skip", "DPO training",
               f"rc {res.returncode}; bad_records.json names {named}", ok)


def malformed_retriever_files(w: Worlds, tmp: Path) -> list[Row]:
    """A broken retriever-training JSON (CLIP fine-tuning) and a broken query JSONL line (retrieval)."""
    world = tmp / "world_broken"
    shutil.rmtree(world, ignore_errors=True)
    shutil.copytree(w.world(), world)
    train_json = world / "pathology" / "retriever_train_report.json"
    records = json.loads(train_json.read_text())
    cases = {
        "broken JSON": json.dumps(records)[:-40],
        "missing key (no report text)": json.dumps(
            records[:3] + [{k: v for k, v in records[3].items() if k not in ("report", "caption", "gpt4_summary")}]),
    }
    rows = []
    for fault, text in cases.items():
        train_json.write_text(text)
        out = tmp / f"clip_out{len(rows)}"
        res = cli("retriever.finetune_clip", w.clip_config(tmp / f"clip_cfg{len(rows)}", world), "--output_dir", str(out),
                  "--data.bad_record", "error")
        rows.append(exit2_row(f"retriever training JSON: {fault}", "CLIP fine-tuning", res, out, str(train_json)))
    queries = tmp / "queries.jsonl"
    lines = (w.world() / "pathology" / "test_vqa.jsonl").read_text().splitlines()
    queries.write_text("\n".join(lines[:2] + ['{"question_id": 7, "question": "Is there'] + lines[2:]) + "\n")
    out = tmp / "retr_out"
    res = cli("retriever.retrieve", "--clip_dir", str(clip_reference(w)), "--checkpoint", "latest",
              "--data.world", str(w.world()), "--domains", "[pathology]", "--routing", "oracle", "--output_dir", str(out),
              "--queries", f"[{{path: {queries}, domain: pathology, role: test_vqa, image_root: {w.world() / 'pathology' / 'images'}}}]")
    rows.append(exit2_row("query JSONL: broken line 3", "retrieval", res, out, f"{queries}:3"))
    return rows


# ---------------------------------------------------------------- SIGKILL and resume


def clip_reference(w: Worlds) -> Path:
    """Uninterrupted tiny CLIP run (2 epochs, a checkpoint every step); returns its output_dir."""
    folder = w.base / "clip_ref"
    if not (folder / "clip" / "pathology" / "checkpoints" / "latest.json").exists():
        res = cli("retriever.finetune_clip", w.clip_config(folder, w.world(), epochs=2, save_every_steps=1, keep=50))
        assert res.returncode == 0, res.stderr[-2000:]
    return folder / "clip"


CLIP_WEIGHTS = "clip/open_clip_model.safetensors"


def _clip_weights(out: Path) -> Path:
    from retriever.clip_data import CLIP_SUBDIR

    info = json.loads((out / "pathology" / "checkpoints" / "latest.json").read_text())
    return out / "pathology" / "checkpoints" / info["name"] / CLIP_SUBDIR / "open_clip_model.safetensors"


def sigkill_clip(w: Worlds, during_save: bool = False) -> Row:
    from retriever.clip_data import CLIP_SUBDIR

    ref = clip_reference(w)
    folder = w.base / ("clip_kill_save" if during_save else "clip_kill")
    shutil.rmtree(folder, ignore_errors=True)
    cfg = w.clip_config(folder, w.world(), epochs=2, save_every_steps=1, keep=50)
    ckpts = folder / "clip" / "pathology" / "checkpoints"
    if during_save:
        pred = lambda: any(ckpts.glob(".step-*.tmp/*")) and (ckpts / "latest.json").exists()  # noqa: E731
    else:
        pred = lambda: (ckpts / "latest.json").exists() and json.loads((ckpts / "latest.json").read_text() or "{}").get("step", 0) >= 2  # noqa: E731
    what = kill_when(["retriever.finetune_clip", cfg], pred)
    loads, n = all_checkpoints_load(ckpts, f"{CLIP_SUBDIR}/open_clip_model.safetensors") if ckpts.exists() else (False, 0)
    res = cli("retriever.finetune_clip", cfg, "--resume", "latest")
    same = res.returncode == 0 and safetensors_equal(_clip_weights(ref), _clip_weights(folder / "clip"))
    steps = [json.loads((p / "trainer_state.json").read_text())["step"] for p in (folder / "clip" / "pathology" / "checkpoints").glob("step-*")]
    ref_steps = [json.loads((p / "trainer_state.json").read_text())["step"] for p in (ref / "pathology" / "checkpoints").glob("step-*")]
    return Row("SIGKILL " + ("during checkpoint save" if during_save else "mid-training"), "CLIP fine-tuning",
               f"{what}; {n} checkpoints on disk all load: {loads}; resume rc {res.returncode}; "
               f"final weights equal uninterrupted: {same}; same steps: {sorted(steps) == sorted(ref_steps)}",
               what == "killed" and loads and same and sorted(steps) == sorted(ref_steps))


def sigkill_dpo(w: Worlds, during_save: bool = False) -> Row:
    d = w.dpo_world()
    over = {"--train.max_steps": "6", "--train.save_every": "1", "--train.keep": "50", "--train.resume": "latest"}
    ref = w.base / "dpo_ref"
    if not (ref / "adapter").exists():
        res = cli(*dpo_args(d, ref, **over))
        assert res.returncode == 0, res.stderr[-2000:]
    out = w.base / ("dpo_kill_save" if during_save else "dpo_kill")
    shutil.rmtree(out, ignore_errors=True)
    ckpts = out / "checkpoints"
    if during_save:
        pred = lambda: any(ckpts.glob(".step-*.tmp/*")) and (ckpts / "latest.json").exists()  # noqa: E731
    else:
        pred = lambda: (ckpts / "latest.json").exists() and json.loads((ckpts / "latest.json").read_text() or "{}").get("step", 0) >= 2  # noqa: E731
    what = kill_when(dpo_args(d, out, **over), pred)
    loads, n = all_checkpoints_load(ckpts, "model.safetensors") if ckpts.exists() else (False, 0)
    half_adapter = (out / "adapter").exists()
    res = cli(*dpo_args(d, out, **over))
    same = res.returncode == 0 and safetensors_equal(ref / "adapter" / "adapter_model.safetensors",
                                                     out / "adapter" / "adapter_model.safetensors")
    steps = [r.get("step") for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return Row("SIGKILL " + ("during checkpoint save" if during_save else "mid-training"), "DPO training",
               f"{what}; adapter before resume: {half_adapter}; {n} checkpoints all load: {loads}; resume rc {res.returncode}; "
               f"adapter equal uninterrupted: {same}; logged train steps {steps}",
               what == "killed" and loads and same and not half_adapter and steps == sorted(set(steps)))


def finite_weights(file: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for t in load_file(str(file)).values())


def diverged_dpo(w: Worlds, collapse: bool = False) -> Row:
    """A good DPO run writes its adapter; a diverging run into the same folder (fresh start) stops
    with one line naming the step and the figures, keeps only checkpoints from before the
    divergence (finite weights, ``latest`` on the newest) and leaves the good adapter as it was."""
    d = w.dpo_world()
    out = w.base / ("dpo_collapse" if collapse else "dpo_nan")
    shutil.rmtree(out, ignore_errors=True)
    res = cli(*dpo_args(d, out))
    good = (out / "adapter" / "adapter_model.safetensors").read_bytes() if res.returncode == 0 else b""
    if collapse:  # a confident policy and a learning rate 20x the demo's: log-probs of both sides fall
        over = {"--policy.path": str(w.sharp_policy()), "--train.lr": "0.1"}
        fault, want = "chosen and rejected log-probs collapse (lr 0.1, confident policy)", "nats per token"
    else:
        over, fault, want = {"--train.lr": "1000"}, "NaN loss (lr 1000)", "not finite"
    res = cli(*dpo_args(d, out, **{**over, "--train.max_steps": "12", "--train.save_every": "1", "--train.keep": "50"}))
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    ckpts = out / "checkpoints"
    latest = json.loads((ckpts / "latest.json").read_text())["step"] if (ckpts / "latest.json").exists() else None
    steps = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    finite = all(finite_weights(ckpts / f"step-{s:08d}" / "model.safetensors") for s in steps)
    stopped = int(lines[-1].split("diverged at step ")[1].split(":")[0]) if lines and "diverged at step" in lines[-1] else None
    kept = (out / "adapter" / "adapter_model.safetensors").read_bytes() == good and bool(good)
    before = stopped is not None and all(s < stopped - 1 for s in steps) and latest == (steps[-1] if steps else None)
    return Row(fault, "DPO training",
               f"rc {res.returncode}: {lines[-1][:400] if lines else last_line(res.stderr)}; checkpoints left {steps} "
               f"(latest {latest}), finite weights: {finite}; the earlier good adapter unchanged: {kept}",
               res.returncode == 1 and len(lines) == 1 and want in lines[0] and "Traceback" not in res.stderr
               and before and finite and kept)


def second_writer_dpo(w: Worlds) -> Row:
    """A second DPO run into a folder a live run is writing refuses at once and writes nothing there."""
    d = w.dpo_world()
    out = w.base / "dpo_two_writers"
    shutil.rmtree(out, ignore_errors=True)
    first = subprocess.Popen([sys.executable, "-m", *dpo_args(d, out, **{"--train.max_steps": "100000"})], cwd=ROOT,
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    live = poll(lambda: (out / "metrics.jsonl").exists(), first)
    config = (out / "run_config.yaml").stat().st_mtime_ns if live else None
    start = time.time()
    res = cli(*dpo_args(d, out))
    took = time.time() - start
    alive = first.poll() is None
    start = time.time()
    cli("dpo.train_dpo", "--help")  # the same interpreter start and imports, no work
    imports = time.time() - start
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    untouched = (out / "run_config.yaml").stat().st_mtime_ns == config and steps == list(range(1, len(steps) + 1))
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    ok = (live and alive and res.returncode == 2 and len(lines) == 1 and "another run is writing here" in lines[0]
          and untouched and not (out / "adapter").exists())
    return Row("a second run into a folder a live run is writing", "DPO training",
               f"second: rc {res.returncode} after {took:.1f} s (`--help`, the same imports: {imports:.1f} s), the first still running: "
               f"{alive}: {lines[-1][:220] if lines else ''}; the first's run_config.yaml and metrics (steps "
               f"1-{steps[-1] if steps else 0}, once each) untouched: {untouched}", ok)


def stale_lock_dpo(w: Worlds) -> Row:
    """A run SIGKILLed while it holds its folder leaves the lock file; the next run into it is not blocked."""
    from common.io import LOCK_FILE

    d = w.dpo_world()
    out = w.base / "dpo_stale_lock"
    shutil.rmtree(out, ignore_errors=True)
    over = {"--train.max_steps": "6", "--train.save_every": "1", "--train.resume": "latest"}
    what = kill_when(dpo_args(d, out, **over), lambda: (out / "checkpoints" / "latest.json").exists())
    left = (out / LOCK_FILE).exists()
    res = cli(*dpo_args(d, out, **over))
    return Row("stale lock: the writer was SIGKILLed", "DPO training",
               f"{what}; lock file left: {left}; rerun rc {res.returncode} (resumed, adapter written: "
               f"{(out / 'adapter').exists()}); lock file after: {(out / LOCK_FILE).exists()}",
               what == "killed" and left and res.returncode == 0 and (out / "adapter").exists()
               and not (out / LOCK_FILE).exists())


def sigkill_pairs(w: Worlds) -> Row:
    p = w.pairs_world()
    ref, out = w.base / "pairs_ref", w.base / "pairs_kill"
    shutil.rmtree(out, ignore_errors=True)
    if not (ref / "pairs.json").exists():
        cli(*pairs_args(p, ref))
    gen = out / "generations.jsonl"
    what = kill_when(pairs_args(p, out), lambda: gen.exists() and gen.read_bytes().count(b"\n") >= 1)
    premature = (out / "pairs.json").exists()
    res = cli(*pairs_args(p, out))
    ref_pairs = json.loads((ref / "pairs.json").read_text())
    got = json.loads((out / "pairs.json").read_text()) if (out / "pairs.json").exists() else None
    # image roots are absolute paths of each run's own folder (noised images): compare after mapping
    same = got is not None and json.dumps(got).replace(str(out), "@") == json.dumps(ref_pairs).replace(str(ref), "@")
    return Row("SIGKILL mid-run", "pair building",
               f"{what}; pairs.json before resume: {premature}; resume rc {res.returncode}; pairs identical: {same}",
               what == "killed" and not premature and same)


def sigkill_retrieve(w: Worlds) -> Row:
    ref, out = w.base / "retr_ref", w.base / "retr_kill"
    shutil.rmtree(out, ignore_errors=True)
    args = ["retriever.retrieve", *retrieve_args(w, w.world())]
    if not (ref / "index.json").exists():
        cli(*args, "--output_dir", str(ref))
    # killed once the corpus is encoded and cached, while the queries are being answered
    what = kill_when([*args, "--output_dir", str(out)], lambda: any((out / "cache").glob("*.safetensors")))
    premature = (out / "index.json").exists()
    res = cli(*args, "--output_dir", str(out))
    name = "pathology_test_vqa.jsonl"
    same = (out / name).is_file() and (out / name).read_bytes() == (ref / name).read_bytes()
    return Row("SIGKILL mid-run", "retrieval",
               f"{what}; index.json before rerun: {premature}; rerun rc {res.returncode}; retrieval JSONL identical: {same}",
               what == "killed" and not premature and res.returncode == 0 and same)


# ---------------------------------------------------------------- unwritable output, full disk


def _mount(target: Path, opts: str) -> str | None:
    target.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip() or "mount failed")


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True)


def corrupt_files(root: Path) -> list[str]:
    """Visible JSON / safetensors files under ``root`` that do not parse / load."""
    from safetensors.torch import load_file

    bad = []
    for f in root.rglob("*"):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".jsonl":
                [json.loads(x) for x in f.read_text().splitlines()]
            elif f.suffix == ".safetensors":
                load_file(str(f))
        except Exception:  # noqa: BLE001 - any failure to read it back means corrupt
            bad.append(str(f.relative_to(root)))
    return bad


def unwritable(w: Worlds) -> list[Row]:
    d = w.dpo_world()
    rows = []
    ro = w.base / "ro_mnt"
    err = _mount(ro, "ro,size=1m")
    if err:
        rows.append(Row("output folder read-only", "DPO training", f"skipped: {err}", None))
    else:
        try:
            res = cli(*dpo_args(d, ro / "run"))
            clear = "Read-only" in res.stderr and str(ro) in res.stderr
            rows.append(Row("output folder read-only", "DPO training",
                            f"rc {res.returncode}: {last_line(res.stderr)}; traceback: {'Traceback' in res.stderr}",
                            res.returncode != 0 and clear and not any(ro.iterdir())))
            p = w.pairs_world()
            res = cli(*pairs_args(p, ro / "pairs"))
            rows.append(Row("output folder read-only", "pair building",
                            f"rc {res.returncode}: {last_line(res.stderr)}; traceback: {'Traceback' in res.stderr}",
                            res.returncode != 0 and "Read-only" in res.stderr and not any(ro.iterdir())))
        finally:
            _umount(ro)
    full = w.base / "full_mnt"
    for size, stage in (("96k", "DPO training"), ("24k", "CLIP fine-tuning")):
        err = _mount(full, f"size={size}")
        if err:
            rows.append(Row(f"full disk (tmpfs {size})", stage, f"skipped: {err}", None))
            continue
        try:
            if stage == "DPO training":
                res = cli(*dpo_args(d, full / "run", **{"--train.save_every": "1", "--train.max_steps": "3"}))
            else:
                res = cli("retriever.finetune_clip", w.clip_config(w.base / "clip_full", w.world(), save_every_steps=1),
                          "--output_dir", str(full / "clip"))
            bad = corrupt_files(full)
            ckpts = next(full.rglob("checkpoints"), None)
            loads = all_checkpoints_load(ckpts, "model.safetensors" if stage == "DPO training"
                                         else CLIP_WEIGHTS)[0] if ckpts else True
            nospace = "No space left" in res.stderr
            rows.append(Row(f"full disk (tmpfs {size})", stage,
                            f"rc {res.returncode}: {last_line(res.stderr)}; traceback: {'Traceback' in res.stderr}; "
                            f"corrupt files: {bad or 'none'}; checkpoints load: {loads}",
                            res.returncode != 0 and nospace and "Traceback" not in res.stderr and not bad and loads))
        except Exception as e:  # noqa: BLE001 - a check that cannot read a checkpoint is itself a finding
            rows.append(Row(f"full disk (tmpfs {size})", stage, f"check failed: {type(e).__name__}: {e}"[:200], False))
        finally:
            _umount(full)
    return rows


# ---------------------------------------------------------------- table and CLI

SCENARIOS: dict[str, Callable[[Worlds], list[Row] | Row]] = {
    "bad_images_clip": bad_images_clip,
    "bad_images_retrieve": bad_images_retrieve,
    "bad_images_pairs": bad_images_pairs,
    "bad_images_dpo": bad_images_dpo,
    "malformed_config": malformed_config,
    "malformed_annotations": malformed_annotations,
    "sigkill_clip": sigkill_clip,
    "sigkill_clip_save": lambda w: sigkill_clip(w, during_save=True),
    "sigkill_pairs": sigkill_pairs,
    "sigkill_retrieve": sigkill_retrieve,
    "sigkill_dpo": sigkill_dpo,
    "sigkill_dpo_save": lambda w: sigkill_dpo(w, during_save=True),
    "unwritable": unwritable,
    "diverged_nan": diverged_dpo,
    "diverged_collapse": lambda w: diverged_dpo(w, collapse=True),
    "second_writer": second_writer_dpo,
    "stale_lock": stale_lock_dpo,
}


def table(rows: list[Row]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    verdict = {True: "yes", False: "**no**", None: "skipped"}
    lines = ["| fault | stage | what happened | nothing lost? |", "|---|---|---|---|"]
    lines += [f"| {cell(r.fault)} | {cell(r.stage)} | {cell(r.happened)} | {verdict[r.ok]} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/faults", help="folder for FAULTS.md and the scenario runs")
    ap.add_argument("--only", nargs="*", default=[], help=f"run only scenarios whose name contains one of these: {list(SCENARIOS)}")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()  # the CLIs name files by absolute path; the checks compare with them
    w = Worlds(out / "work")
    rows: list[Row] = []
    for name, fn in SCENARIOS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        start = time.time()
        try:
            got = fn(w)
        except Exception as e:  # noqa: BLE001 - a scenario that breaks is a row, the suite goes on
            got = Row(name, "-", f"scenario error: {type(e).__name__}: {e}"[:300], False)
        got = got if isinstance(got, list) else [got]
        rows += got
        print(f"{name}: {time.time() - start:.0f}s " + " ".join({True: 'ok', False: 'FAIL', None: 'skip'}[r.ok] for r in got),
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "FAULTS.md").write_text("# Fault suite\n\n" + table(rows))
    print(f"wrote {out / 'FAULTS.md'}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
