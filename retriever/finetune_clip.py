"""Contrastive fine-tuning of one CLIP retriever per domain (then the domain classifier).

    bash scripts/finetune_clip.sh [CONFIG.yaml] [--key value ...]     # = python -m retriever.finetune_clip

Each domain in ``domains`` gets its own model, trained on that domain's ``retriever_train``
files (one image-text pair per view) and validated on its ``retriever_val`` files, into
``<output_dir>/<domain>/``: ``metrics.jsonl`` + TensorBoard (epoch-0 row first), ``run_config.yaml``,
``data.json`` (the files trained on: retrieval's default corpus), ``checkpoints/`` (``latest``,
``best`` by mean validation recall, rotated; each holds the full accelerate state for ``--resume``
and an ``open_clip/`` folder loadable by open_clip, see retriever.model). A run stopped by
``max_steps`` validates where it stops, so every run leaves a ``best``; a domain without any
validation file has its final checkpoint marked ``best``. After the last domain the domain
classifier F(x_v) is trained on every domain of ``classifier_domains`` that has training files
(retriever.domain), into ``<output_dir>/domain_classifier/``.

Annotation files are named relative to ``data.data_root`` (the release's ``data/`` folder). A named
file that is absent is warned about (one line) and left out; a domain with no training file is
skipped; only a run left with nothing stops (exit 2). ``<output_dir>/run_summary.json`` lists
the domains trained and skipped, the missing files and what became of the domain classifier.

The loss is open_clip's ``ClipLoss`` (features gathered across processes with gradient, local
loss), optionally Matryoshka: the same loss at several embedding prefixes, summed or one sampled
size per step. accelerate runs devices, processes (``accelerate launch``/``torchrun``), mixed
precision and gradient accumulation. Resume is exact: model, optimizer, scheduler, scaler and RNG
state come back from the checkpoint, the data order is a function of (seed, epoch), every
sample's augmentation a function of (seed, epoch, index), and the epoch is re-entered after
the batches already seen.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from common.checkpoint import CheckpointManager
from common.config import ConfigError, cli_main, doc, load_config, save_config
from common.engine import EngineConfig, _any_process, build_accelerator, param_groups, stop_diverged
from common.io import InputError, atomic_write_json, run_lock, write_path
from common.metrics import MetricsLogger
from data.readers import bad_records_summary
from data.records import DOMAINS, ReportRecord
from retriever.clip_data import (
    CLIP_SUBDIR,
    ClassifierConfig,
    DataSpec,
    SeededItems,
    image_text_dataset,
    item_records,
    present_domains,
    with_root,
)
from retriever.model import Clip, ClipSpec, build_clip, embed_images, embed_texts, export_clip, truncate
from retriever.recall import bidirectional_recall, findings_label, label_ids

# ---------------------------------------------------------------- config


@dataclass
class OptimConfig:
    lr: float = doc(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = doc(0.1, "AdamW weight decay (not on biases, norms, embeddings' gains, logit scale)")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.98, "AdamW beta2")
    eps: float = doc(1e-6, "AdamW epsilon")
    warmup_steps: int = doc(10, "linear warmup, in optimizer steps; then cosine decay to 0")
    grad_clip: float = doc(1.0, "clip the gradient norm to this; 0 = off")


@dataclass
class MatryoshkaConfig:
    dims: list[int] = doc([], "extra embedding sizes to train (prefixes of the full embedding); empty = plain loss")
    sample: bool = doc(False, "one size per step (drawn from (seed, step)) instead of the mean over all sizes")


@dataclass
class ClipTrainConfig:
    clip: ClipSpec = doc(ClipSpec(), "the open_clip model and its starting weights")
    data: DataSpec = doc(DataSpec(), "annotation files per domain")
    domains: list[str] = doc(list(DOMAINS), "domains to train a retriever for, one model each")
    output_dir: str = doc("outputs/toy/clip", "one folder per domain is made here, plus domain_classifier/")
    epochs: int = doc(10, "training epochs per domain")
    batch_size: int = doc(64, "pairs per process per micro-batch")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = doc("no", "autocast precision (accelerate)")
    optim: OptimConfig = doc(OptimConfig(), "optimizer and schedule")
    matryoshka: MatryoshkaConfig = doc(MatryoshkaConfig(), "Matryoshka loss (short vectors for large corpora)")
    num_workers: int = doc(0, "DataLoader workers per process")
    val_every: int = doc(5, "validate (and checkpoint) every N epochs, and after the last")
    val_batch_size: int = doc(256, "batch size for validation encoding and validation loss")
    select_by: Literal["own", "findings"] = doc("own", "which mean validation recall picks `best`: own report, or same findings (toy)")
    save_every_steps: int = doc(0, "also checkpoint every N optimizer steps (0 = only at validation)")
    keep: int = doc(2, "checkpoint folders kept (latest and best are never rotated away)")
    resume: str = doc("", "latest | best | a checkpoint folder: continue that run exactly; empty = fresh start")
    max_steps: int = doc(0, "stop after this many optimizer steps (0 = all epochs); the schedule still spans `epochs`")
    log_every: int = doc(10, "log training loss every N optimizer steps")
    seed: int = doc(0, "seed for initialisation, data order and augmentation")
    domain_classifier: bool = doc(True, "after the retrievers, train the domain classifier (retriever.domain) once every one of `classifier_domains` has a retriever in output_dir")
    classifier_domains: list[str] = doc(list(DOMAINS), "the classifier's domains (per-domain runs into one output_dir: the last one trains it)")
    classifier: ClassifierConfig = doc(ClassifierConfig(), "the domain classifier's head (retriever.domain)")


# ---------------------------------------------------------------- loss


class ContrastiveLoss:
    """open_clip's ClipLoss, optionally at several Matryoshka embedding sizes."""

    def __init__(self, full_dim: int, cfg: MatryoshkaConfig, seed: int, rank: int = 0, world_size: int = 1):
        bad = [d for d in cfg.dims if not 0 < d <= full_dim]
        if bad:
            raise ConfigError(f"matryoshka.dims {bad} must lie in 1..{full_dim} (the embedding size)")
        self.dims: list[int | None] = sorted(set(cfg.dims) - {full_dim}) + [None] if cfg.dims else [None]
        self.sample, self.seed = cfg.sample, seed
        # local loss + gather with grad: the exact global loss, each process computing its rows
        self.loss = open_clip.ClipLoss(local_loss=world_size > 1, gather_with_grad=world_size > 1, cache_labels=True, rank=rank, world_size=world_size)

    def dims_for(self, step: int) -> list[int | None]:
        """The sizes trained at ``step``: all, or one drawn from (seed, step), equal on every process."""
        if not self.sample or len(self.dims) == 1:
            return self.dims
        return [random.Random(self.seed * 7_919 + step).choice(self.dims)]

    def __call__(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, step: int) -> torch.Tensor:
        dims = self.dims_for(step)
        return sum(self.loss(truncate(image, d), truncate(text, d), logit_scale) for d in dims) / len(dims)


# ---------------------------------------------------------------- validation


@torch.no_grad()
def validate(
    model: torch.nn.Module, clip: Clip, records: list[ReportRecord], dataset: Dataset, cfg: ClipTrainConfig, accelerator: Any
) -> dict[str, float]:
    """Image-to-text and text-to-image recall (own report; same findings if known), ranks, loss.

    Gallery texts are the distinct report texts, so the two views of a study share one target.
    """
    net = accelerator.unwrap_model(model)
    net.eval()
    img, idx = embed_images(net, dataset, cfg.val_batch_size, accelerator, cfg.num_workers, desc="val images")
    first: dict[str, ReportRecord] = {}
    for r in records:
        first.setdefault(r.text, r)
    texts = list(first)
    txt = embed_texts(net, clip.tokenizer, texts, cfg.val_batch_size, accelerator, desc="val texts")
    rec_of_item = item_records(records)
    item_rec = [records[rec_of_item[i]] for i in idx.tolist()]
    il, tl = label_ids([r.text for r in item_rec], texts)
    out = bidirectional_recall(img, txt, il, tl, prefix="val/")
    if all(findings_label(r.meta) is not None for r in records):
        il, tl = label_ids([findings_label(r.meta) for r in item_rec], [findings_label(first[t].meta) for t in texts])
        out.update(bidirectional_recall(img, txt, il, tl, prefix="val/findings_"))
    # validation loss: the contrastive loss on (image, its report) pairs, in groups of val_batch_size
    pos = {t: i for i, t in enumerate(texts)}
    paired = txt[[pos[r.text] for r in item_rec]]
    scale = net.logit_scale.exp().float().cpu()
    plain, n = open_clip.ClipLoss(), cfg.val_batch_size
    losses = [plain(img[s : s + n], paired[s : s + n], scale).item() for s in range(0, img.shape[0], n) if img[s : s + n].shape[0] > 1]
    if losses:
        out["val/loss"] = sum(losses) / len(losses)
    out["val/pairs"] = int(img.shape[0])
    net.train()
    return out


def selection_metric(metrics: dict[str, float], select_by: str) -> float | None:
    key = "val/mean_recall" if select_by == "own" else "val/findings_mean_recall"
    return metrics.get(key, metrics.get("val/mean_recall"))


# ---------------------------------------------------------------- training


def train_domain(cfg: ClipTrainConfig, domain: str, accelerator: Any) -> dict[str, Any]:
    """Train (or resume) one domain's retriever; returns its last validation metrics.

    This loop shares common.engine's accelerator, parameter groups and checkpoint state but is
    not ``engine.train``: that loop is shaped for a Hugging Face model with a PEFT adapter
    (save_pretrained export, warmup as a ratio, max_steps as the schedule's length), and this one
    needs an open_clip export, an untrained validation row, validation on epoch boundaries, a
    per-step Matryoshka size, a schedule that spans ``epochs`` when ``max_steps`` stops early and
    equal batch sizes on every process for the gathered loss. Folding them into the engine would
    add five hooks the language-model trainers never use and change the retrievers' schedule,
    hence every number downstream of them.
    """
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from data.images import BadImageLog
    from data.loader import make_loader

    out = Path(cfg.output_dir) / domain
    is_main = accelerator.is_main_process
    set_seed(cfg.seed)
    clip = build_clip(cfg.clip, device=accelerator.device)
    bad_records: list[str] = []
    train_pairs = cfg.data.records(domain, "retriever_train", bad_records)
    val_pairs = cfg.data.records(domain, "retriever_val", bad_records)
    train_ds = SeededItems(image_text_dataset(train_pairs, clip.preprocess_train, cfg.data.bad_image), cfg.seed)
    val_records = [with_root(r, root) for r, root in val_pairs]
    val_ds = image_text_dataset(val_pairs, clip.preprocess_val, cfg.data.bad_image)
    drop_last = len(train_ds) >= cfg.batch_size * accelerator.num_processes
    loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, drop_last=drop_last, seed=cfg.seed)

    model = clip.model
    # fused: one kernel per step instead of ~10 per tensor; on CPU the per-tensor loop over the
    # embedding table's 6M entries was ~12% of a toy step (open_clip_train keeps the loop)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.lr, weight_decay=cfg.optim.weight_decay), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        fused=accelerator.device.type in ("cpu", "cuda"),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    micro_per_epoch = len(loader)
    if micro_per_epoch == 0:
        raise InputError(f"{domain}: no training batches ({len(train_ds)} pairs, batch size {cfg.batch_size})")
    total_steps = cfg.epochs * math.ceil(micro_per_epoch / cfg.grad_accum)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence "* n" (as common.engine)
    n = accelerator.num_processes
    scheduler = accelerator.prepare(
        get_cosine_schedule_with_warmup(optimizer, min(cfg.optim.warmup_steps, total_steps // 2) * n, total_steps * n)
    )
    loss_fn = ContrastiveLoss(
        int(clip.model_cfg["embed_dim"]), cfg.matryoshka, cfg.seed, accelerator.process_index, accelerator.num_processes
    )
    ckpt = CheckpointManager(out / "checkpoints", keep=cfg.keep)
    if is_main:
        save_config(cfg, out / "run_config.yaml")
        atomic_write_json(out / "data.json", {"domain": domain, "train_files": [
            [write_path(f, out), write_path(root, out)] for f, root in cfg.data.files(domain, "retriever_train")],
            "bad_records": bad_records_summary(bad_records)})
    bad_log = BadImageLog()

    def export(folder: Path) -> None:
        export_clip(clip, accelerator.unwrap_model(model), folder / CLIP_SUBDIR, extra={"domain": domain})

    state = {"epoch": 0, "batches_in_epoch": 0, "step": 0}
    resume = cfg.resume
    if resume in ("latest", "best") and ckpt.resolve(resume) is None:
        resume = ""  # a domain the interrupted run had not reached yet starts fresh
    elif resume:
        try:
            state.update(ckpt.load(accelerator, resume))
        except FileNotFoundError as e:
            raise ConfigError(f"--resume: {e}") from None
    logger = MetricsLogger(out, enabled=is_main, resumed_at=state["step"] if resume else None)
    metrics: dict[str, float] = {}
    if not resume and val_records:  # the untrained row, so the gain is visible
        metrics = validate(model, clip, val_records, val_ds, cfg, accelerator)
        logger.log({"epoch": 0, **metrics}, step=0)
        _print(accelerator, domain, 0, metrics)

    def validate_and_save(step: int, epoch: float, trainer_state: dict[str, Any]) -> dict[str, float]:
        """Validate (if there is validation data), log, and checkpoint with the selection metric (which may make it `best`)."""
        if not val_records:
            ckpt.save(accelerator, step, {**trainer_state, "metrics": {}}, export=export)
            return {}
        m = validate(model, clip, val_records, val_ds, cfg, accelerator)
        logger.log({"epoch": epoch, **m, "bad_images": bad_log.skipped}, step)
        _print(accelerator, domain, epoch, m)
        ckpt.save(accelerator, step, {**trainer_state, "metrics": m}, metric=selection_metric(m, cfg.select_by), export=export)
        return m

    step = state["step"]
    model.train()
    done = cfg.max_steps and step >= cfg.max_steps
    epoch = state["epoch"]
    while epoch < cfg.epochs and not done:
        loader.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        running, t0, seen = [], time.time(), 0
        bar = tqdm(epoch_loader, desc=f"{domain} epoch {epoch + 1}/{cfg.epochs}", total=micro_per_epoch - skip,
                   disable=not is_main, leave=False)
        for b, batch in enumerate(bar, start=skip + 1):
            batch = _common_batch(bad_log.take(batch), accelerator)
            if batch is not None:
                with accelerator.accumulate(model):
                    tokens = clip.tokenizer(batch["text"]).to(accelerator.device)
                    with accelerator.autocast():
                        image_f, text_f, scale = model(batch["image"], tokens)
                    loss = loss_fn(image_f, text_f, scale, step)
                    if _any_process(accelerator, not math.isfinite(loss.item())):
                        stop_diverged(accelerator, ckpt, step - 1, f"{domain}: diverged at step {step + 1}: the "
                                      f"contrastive loss is not finite (this process: {loss.item():.4g})")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad()
                running.append(loss.item())
                seen += batch["image"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients or batch is None:
                continue
            scheduler.step()
            step += 1
            bar.set_postfix(loss=f"{running[-1]:.3f}")
            if step % cfg.log_every == 0 and running:
                logger.log({"epoch": epoch + b / micro_per_epoch, "train/loss": sum(running) / len(running),
                            "train/lr": scheduler.get_last_lr()[0], "train/samples_per_s": seen / max(time.time() - t0, 1e-9)}, step)
                running, t0, seen = [], time.time(), 0
            at = {"epoch": epoch, "batches_in_epoch": b}
            if cfg.max_steps and step >= cfg.max_steps:  # stopped inside an epoch: validated, so it can be `best`
                metrics = validate_and_save(step, epoch + b / micro_per_epoch, at)
                done = True
                break
            if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                ckpt.save(accelerator, step, {**at, "metrics": {}}, export=export)
        bar.close()
        if done:
            break
        epoch += 1
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            metrics = validate_and_save(step, epoch, {"epoch": epoch, "batches_in_epoch": 0})
    final = ckpt.resolve("latest")
    if is_main and final is not None and ckpt.resolve("best") is None:  # never validated: the final weights stand for it
        ckpt.mark_best(final)
    logger.close()
    bad_log.write(accelerator, out / "bad_images.json")
    accelerator.free_memory()
    return metrics


def _common_batch(batch: dict[str, Any] | None, accelerator: Any) -> dict[str, Any] | None:
    """Cut every process's batch to the smallest one (bad images make them differ; the gather needs equal sizes)."""
    n = 0 if batch is None else batch["image"].shape[0]
    if accelerator.num_processes > 1:
        n = int(accelerator.gather(torch.tensor([n], device=accelerator.device)).min())
    if n == 0:
        return None
    return {"image": batch["image"][:n], "text": list(batch["text"][:n])}


def _print(accelerator: Any, domain: str, epoch: int, m: dict[str, float]) -> None:
    if not accelerator.is_main_process:
        return
    keys = ["val/i2t_R@1", "val/i2t_R@5", "val/t2i_R@5", "val/findings_i2t_R@5", "val/loss"]
    shown = "  ".join(f"{k[4:]} {m[k]:.3f}" for k in keys if k in m)
    tqdm.write(f"[{domain}] epoch {epoch}: {shown}")


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(ClipTrainConfig, argv, description=__doc__)
    unknown = sorted(set(cfg.domains) - set(DOMAINS))
    if unknown:
        raise ConfigError(f"unknown domain(s) {unknown}; expected some of {list(DOMAINS)}")
    checked = list(dict.fromkeys(cfg.domains + (cfg.classifier_domains if cfg.domain_classifier else [])))
    present, missing = present_domains(cfg.data, checked)
    domains = [d for d in cfg.domains if d in present]
    if not domains:
        raise InputError(f"no retriever_train file found for any of {cfg.domains} (missing: {missing}); nothing to train")
    accelerator = build_accelerator(EngineConfig(mixed_precision=cfg.mixed_precision, grad_accum=cfg.grad_accum, seed=cfg.seed))
    for domain in domains:
        with run_lock(Path(cfg.output_dir) / domain, accelerator.is_main_process):
            train_domain(cfg, domain, accelerator)
    summary = {"domains": domains, "skipped": [d for d in cfg.domains if d not in present], "missing": missing, "classifier": None}
    if cfg.domain_classifier:
        summary["classifier"] = _train_classifier(cfg, [d for d in cfg.classifier_domains if d in present], accelerator)
    if accelerator.is_main_process:
        atomic_write_json(Path(cfg.output_dir) / "run_summary.json", summary)


def _train_classifier(cfg: ClipTrainConfig, domains: list[str], accelerator: Any) -> dict[str, Any]:
    """Train F(x_v) on the classifier domains that have training files, once each has a retriever."""
    from retriever.domain import DomainConfig, clip_folder, train_classifier

    if len(domains) < 2:
        if accelerator.is_main_process:
            print(f"domain classifier: skipped, it needs two domains with retriever_train files, found {domains}")
        return {"domains": domains, "status": "skipped"}
    waiting = [d for d in domains if not _has_checkpoint(clip_folder, cfg.output_dir, d)]
    if waiting:
        if accelerator.is_main_process:
            print(f"domain classifier: not yet, no retriever for {waiting} in {cfg.output_dir} (trained after the last domain)")
        return {"domains": domains, "status": "waiting", "waiting_for": waiting}
    train_classifier(DomainConfig(clip_dir=cfg.output_dir, domains=domains, data=cfg.data, head=cfg.classifier,
                                  num_workers=cfg.num_workers, seed=cfg.seed), accelerator)
    return {"domains": domains, "status": "trained"}


def _has_checkpoint(clip_folder: Any, clip_dir: str, domain: str) -> bool:
    try:
        return clip_folder(clip_dir, domain).is_dir()
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    cli_main(main)
