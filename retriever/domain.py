"""Domain identification F(x_v): which domain's retriever and corpus a query image goes to.

The paper routes each image through a domain classifier; the released code has none. Ours is a
linear head (multinomial logistic regression) on the concatenated, frozen image embeddings of
every domain's fine-tuned CLIP: features retrieval computes anyway, so routing costs one small
matrix product. It is trained on domain-labelled images of every domain's ``retriever_train``
files and reported on their ``retriever_val`` images. Saved beside the retrievers::

    <clip_dir>/domain_classifier/model.safetensors   weight, bias, feature mean and std
    <clip_dir>/domain_classifier/config.json         domains, encoders (+ weight fingerprints), accuracy
    <clip_dir>/domain_classifier/metrics.jsonl       training and validation rows (+ TensorBoard)

Run by ``bash scripts/finetune_clip.sh`` after the last retriever, or alone:
``python -m retriever.domain [CONFIG.yaml] [--key value ...]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from common.checkpoint import CheckpointManager
from common.config import ConfigError, cli_main, doc, load_config, save_config
from common.io import InputError, atomic_path, atomic_write_json
from common.metrics import MetricsLogger
from data.records import DOMAINS
from retriever.clip_data import CLIP_SUBDIR, ClassifierConfig, DataSpec, image_text_dataset
from retriever.model import Clip, embed_images, load_clip, weights_fingerprint

SUBDIR = "domain_classifier"


@dataclass
class DomainConfig:
    clip_dir: str = doc("outputs/toy/clip", "folder holding one trained retriever per domain (finetune_clip.sh output)")
    domains: list[str] = doc(list(DOMAINS), "the classes, in order; each needs a retriever in clip_dir")
    data: DataSpec = doc(DataSpec(), "annotation files per domain (retriever_train to fit, retriever_val to report)")
    head: ClassifierConfig = doc(ClassifierConfig(), "the linear head and its training")
    num_workers: int = doc(0, "DataLoader workers for image encoding")
    seed: int = doc(0, "seed for the head's initialisation")


def clip_folder(clip_dir: str | Path, domain: str, checkpoint: str = "best") -> Path:
    """The exported open_clip folder of a domain's ``best``/``latest`` checkpoint (or of a path)."""
    manager = CheckpointManager(Path(clip_dir) / domain / "checkpoints")
    ckpt = manager.resolve(checkpoint)
    if ckpt is None:
        latest = manager.resolve("latest")
        hint = (f"its latest is {latest.name}: retrieve with --checkpoint latest, or finish the run with "
                "scripts/finetune_clip.sh --resume latest" if latest else "it has no checkpoint: run scripts/finetune_clip.sh first")
        raise FileNotFoundError(f"{manager.root / checkpoint}.json: the {domain} retriever has no '{checkpoint}' checkpoint; {hint}")
    return ckpt / CLIP_SUBDIR


class DomainClassifier(nn.Module):
    """Linear head on standardised concatenated embeddings; ``forward`` gives logits."""

    def __init__(self, in_dim: int, n_domains: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_domains)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.std)


@dataclass
class Router:
    """A trained F(x_v) with the encoders whose embeddings it reads (in ``domains`` order)."""

    domains: list[str]
    classifier: DomainClassifier
    info: dict[str, Any]

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """P(domain | image) [n, domains] from the images' concatenated embeddings [n, sum of dims]."""
        with torch.no_grad():
            return self.classifier(features).softmax(dim=1)

    def predict(self, features: torch.Tensor) -> list[str]:
        """Domains of images given their concatenated embeddings [n, sum of dims]."""
        return [self.domains[i] for i in self.probabilities(features).argmax(dim=1).tolist()]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(tmp))
        atomic_write_json(folder / "config.json", {"domains": self.domains, **self.info})

    @classmethod
    def load(cls, folder: str | Path, encoders: dict[str, Path] | None = None) -> "Router":
        """Load; if ``encoders`` (domain -> open_clip folder) are given, check they are the ones trained on."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no domain classifier (config.json); run scripts/finetune_clip.sh")
        info = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
        clf = DomainClassifier(state["linear.weight"].shape[1], state["linear.weight"].shape[0])
        clf.load_state_dict(state)
        clf.eval()
        for d, path in (encoders or {}).items():
            want = info.get("fingerprints", {}).get(d)
            if want and want != weights_fingerprint(path):
                raise ValueError(f"{folder}: trained on other {d} retriever weights than {path}; retrain the domain classifier")
        domains = info.pop("domains")
        return cls(domains, clf, info)


def concat_features(encoders: dict[str, Clip], pairs: list, bad_image: str, batch_size: int, accelerator: Any, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(concatenated embeddings of every encoder [n, sum dims], dataset item indices) of records' images."""
    feats, kept = [], None
    for d, enc in encoders.items():
        ds = image_text_dataset(pairs, enc.preprocess_val, bad_image)
        e, idx = embed_images(enc.model, ds, batch_size, accelerator, num_workers, desc=f"{d} encoder")
        feats.append(dict(zip(idx.tolist(), e)))
        kept = set(idx.tolist()) if kept is None else kept & set(idx.tolist())
    order = sorted(kept or [])
    if not order:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.stack([torch.cat([f[i] for f in feats]) for i in order]), torch.tensor(order)


def _labelled(cfg: DomainConfig, encoders: dict[str, Clip], role: str, accelerator: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for label, d in enumerate(cfg.domains):
        x, _ = concat_features(encoders, cfg.data.records(d, role), cfg.data.bad_image, cfg.head.batch_size, accelerator, cfg.num_workers)
        if x.shape[0]:  # a domain without files of this role (e.g. no validation file) adds nothing
            xs.append(x)
            ys.append(torch.full((x.shape[0],), label, dtype=torch.long))
    if not xs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


def fit_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, head: ClassifierConfig, seed: int) -> DomainClassifier:
    """Full-batch AdamW on cross-entropy (the features fit in memory; deterministic from ``seed``)."""
    torch.manual_seed(seed)
    clf = DomainClassifier(x.shape[1], n_classes)
    clf.mean.copy_(x.mean(0))
    clf.std.copy_(x.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(clf.parameters(), lr=head.lr, weight_decay=head.weight_decay)
    for _ in range(head.steps):
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    return clf


def accuracy_report(pred: torch.Tensor, y: torch.Tensor, domains: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"accuracy": float((pred == y).float().mean()) if y.numel() else float("nan"), "n": int(y.numel())}
    for i, d in enumerate(domains):
        m = y == i
        if m.any():
            out[f"accuracy_{d}"] = float((pred[m] == i).float().mean())
    out["confusion"] = [[int(((y == i) & (pred == j)).sum()) for j in range(len(domains))] for i in range(len(domains))]
    return out


def train_classifier(cfg: DomainConfig, accelerator: Any) -> dict[str, Any]:
    """Fit F on retriever_train images of every domain, report on retriever_val, save; returns metrics."""
    if len(cfg.domains) < 2:
        raise ConfigError(f"the domain classifier needs at least two domains, got {cfg.domains}")
    folders = {d: clip_folder(cfg.clip_dir, d, cfg.head.checkpoint) for d in cfg.domains}
    encoders = {d: load_clip(f, device=accelerator.device) for d, f in folders.items()}
    x_tr, y_tr = _labelled(cfg, encoders, "retriever_train", accelerator)
    x_va, y_va = _labelled(cfg, encoders, "retriever_val", accelerator)
    clf = fit_head(x_tr, y_tr, len(cfg.domains), cfg.head, cfg.seed)
    with torch.no_grad():
        train_acc = accuracy_report(clf(x_tr).argmax(1), y_tr, cfg.domains)
        val_acc = accuracy_report(clf(x_va).argmax(1) if y_va.numel() else y_va, y_va, cfg.domains)
    out = Path(cfg.clip_dir) / SUBDIR
    metrics = {"train_accuracy": train_acc["accuracy"], **{f"val_{k}": v for k, v in val_acc.items()}}
    if accelerator.is_main_process:
        info = {
            "encoders": {d: str(f.relative_to(Path(cfg.clip_dir))) for d, f in folders.items()},
            "fingerprints": {d: weights_fingerprint(f) for d, f in folders.items()},
            "feature": "concatenated L2-normalised image embeddings of the encoders, in domains order",
            "metrics": metrics,
        }
        Router(list(cfg.domains), clf, info).save(out)
        save_config(cfg, out / "run_config.yaml")
        logger = MetricsLogger(out)
        logger.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step=cfg.head.steps)
        logger.close()
        print(f"[domain classifier] val accuracy {val_acc['accuracy']:.3f} on {val_acc['n']} images "
              f"(train {train_acc['accuracy']:.3f}) -> {out}")
    accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> None:
    from common.engine import EngineConfig, build_accelerator

    cfg = load_config(DomainConfig, argv, description=__doc__)
    try:
        train_classifier(cfg, build_accelerator(EngineConfig(seed=cfg.seed)))
    except FileNotFoundError as e:
        raise InputError(str(e)) from None


if __name__ == "__main__":
    cli_main(main)
