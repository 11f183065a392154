"""The training engine shared by SFT and DPO: accelerate + PEFT + checkpoints in one readable loop.

A trainer brings a model, a DataLoader and ``loss_fn(model, batch) -> (loss, metrics)``; the
engine does the rest: AdamW with warmup + cosine (or linear/constant) decay, gradient
accumulation and clipping, mixed precision, gradient checkpointing, DeepSpeed from a JSON file,
LoRA through PEFT, logging (tqdm, ``metrics.jsonl``, TensorBoard), periodic evaluation, and
checkpoints that resume exactly (weights, optimizer, scheduler, RNG, step and data order).

Use (see policy/train_sft.py)::

    accelerator = build_accelerator(cfg.train)   # first: ZeRO-3 must be set up before the model loads
    model = apply_lora(load_model(...), cfg.lora, cfg.train.gradient_checkpointing)
    result = train(cfg.train, accelerator, model, loader, loss_fn, eval_fn)
    save_model(accelerator, result.model, cfg.train.output_dir, processor)

Steps are optimizer steps per process. A batch that is ``None`` (the collate function dropped
every sample of it, e.g. unreadable images) is skipped by all processes together.

A run that diverges stops (``RunStopped``, exit 1, one line naming the step and the figures): a
NaN or infinite loss on any process, or a log window in which the chosen and rejected answers'
log-probs both fell more than ``collapse_nats`` per token below the reference's (the metrics
``collapse/chosen`` and ``collapse/rejected`` a DPO loss logs). Checkpoints written after the last
good step are removed and ``latest`` points at the one before, so ``resume: latest`` and the next
stage never load diverged weights; the final model is not written.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import peft
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    DistributedType,
    InitProcessGroupKwargs,
    set_seed,
)
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from common.checkpoint import CheckpointManager
from common.config import ConfigError, doc
from common.io import RunStopped
from common.metrics import MetricsLogger

# Submodule names (as in model.named_modules()) by role: the Hugging Face LLaVA layout and the
# original LLaVA / LLaVA-Med one, Qwen2-VL / Qwen2.5-VL (``visual`` with its patch ``merger``
# inside), Idefics3 / SmolVLM (``connector``), Gemma 3 (as LLaVA).
VISION_MODULES = ("vision_tower", "vision_model", "visual")
PROJECTOR_MODULES = ("multi_modal_projector", "mm_projector", "merger", "connector")
OUTPUT_MODULES = ("lm_head",)
# Nats per answer token by which the policy's log-probs of the chosen / rejected answers fell below
# the reference's (logged by a DPO loss); both large at once is the collapse that precedes garbage.
COLLAPSE_METRICS = ("collapse/chosen", "collapse/rejected")

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class EngineConfig:
    """How to train: schedule, optimizer, precision, distribution, logging and checkpoints."""

    output_dir: str = doc("outputs/run", "run folder: metrics.jsonl, tensorboard/, run_config.yaml, checkpoints/")
    seed: int = doc(0, "seed of weights init, dropout and data order")
    epochs: int = doc(1, "passes over the training data")
    max_steps: int = doc(0, "stop after this many optimizer steps (0 = run all epochs)")
    batch_size: int = doc(4, "micro-batch size per process")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    lr: float = doc(2e-5, "peak learning rate (AdamW)")
    projector_lr: float = doc(0.0, "learning rate of the multimodal projector (MMed-RAG's mm_projector_lr); 0 = lr")
    weight_decay: float = doc(0.0, "AdamW weight decay (never on biases and norms)")
    adam_betas: list[float] = doc([0.9, 0.999], "AdamW betas")
    scheduler: str = doc("cosine", "learning-rate decay after warmup: cosine | linear | constant_with_warmup")
    warmup_ratio: float = doc(0.03, "fraction of the optimizer steps spent warming up linearly")
    max_grad_norm: float = doc(1.0, "clip gradients to this global norm (0 = no clipping)")
    mixed_precision: str = doc("no", "no | bf16 | fp16")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward to save memory")
    deepspeed: str = doc("", "DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json, zero3_offload.json); empty = off")
    num_workers: int = doc(0, "DataLoader worker processes")
    group_by_length: bool = doc(True, "training batches of samples of similar length (less padding; transformers' "
                                      "length-grouped order, reshuffled each epoch); false = uniformly shuffled")
    log_every: int = doc(10, "log training metrics every N optimizer steps")
    eval_every: int = doc(0, "evaluate every N optimizer steps (0 = at the end of each epoch)")
    save_every: int = doc(0, "checkpoint every N optimizer steps (0 = at the end of each epoch)")
    keep: int = doc(2, "step checkpoints kept (the best one is never removed)")
    best_metric: str = doc("", "eval metric that picks the best checkpoint, e.g. eval_loss (empty = none)")
    higher_is_better: bool = doc(False, "whether a larger best_metric is better")
    stop_at: float | None = doc(None, "end the run at the first evaluation whose best_metric reaches this value "
                                      "(max_steps is then the most it takes); None = never")
    resume: str = doc("", "continue from 'latest' (fresh start if there is none), 'best' or a checkpoint folder")
    progress: bool = doc(True, "show a tqdm progress bar")
    collapse_nats: float = doc(2.0, "stop when, over a log window, the chosen and rejected answers' log-probs both fell more "
                                    "than this many nats per token below the reference's (DPO; 0 = never); a NaN or "
                                    "infinite loss always stops")


@dataclass
class LoraConfig:
    """What is trained: LoRA adapters on the language model (or all of it), projector, vision tower."""

    enabled: bool = doc(True, "LoRA through PEFT; false = full fine-tuning of the language model")
    r: int = doc(128, "LoRA rank (MMed-RAG: 128)")
    alpha: int = doc(256, "LoRA alpha (MMed-RAG: 256)")
    dropout: float = doc(0.05, "dropout on the LoRA branch")
    target_modules: list[str] = doc(
        ["all-linear"], "language-model linear layers to adapt, by name (q_proj, v_proj, ...); all-linear = every one"
    )
    train_projector: bool = doc(False, "train the multimodal projector (with LoRA: saved with the adapter)")
    train_vision: bool = doc(False, "train the vision tower (with LoRA: saved with the adapter)")


@dataclass
class TrainResult:
    model: Any  # the prepared model (pass it to save_model)
    step: int
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    best_checkpoint: Path | None = None


def one_process_world() -> None:
    """Describe a world of one process when no launcher did.

    DeepSpeed (ZeRO-2/3) needs a process group even for one process, and accelerate creates it
    only from a launcher's variables; these are the ones ``accelerate launch --num_processes 1``
    sets: rank 0 of 1, on a free local port (a MASTER_ADDR / MASTER_PORT already set is kept).
    """
    if "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def build_accelerator(cfg: EngineConfig) -> Accelerator:
    """The Accelerator for ``cfg``: precision, accumulation, seeded data order, DeepSpeed; the one
    factory of every stage (CLIP fine-tuning and retrieval pass the fields they set).

    Build it before loading the model: under ZeRO-3 transformers then loads the weights sharded.
    A DeepSpeed run started without a launcher (``python -m ...``) runs as a world of one process.
    """
    plugin = None
    if cfg.deepspeed:
        if not Path(cfg.deepspeed).is_file():
            raise ConfigError(f"deepspeed: {cfg.deepspeed}: file does not exist")
        one_process_world()
        # "auto" entries of the JSON are filled from here and, in prepare(), from the model and loader.
        plugin = DeepSpeedPlugin(
            hf_ds_config=str(cfg.deepspeed),
            gradient_accumulation_steps=cfg.grad_accum,
            gradient_clipping=cfg.max_grad_norm,
        )
    # Without a GPU, accelerate runs several processes (torchrun) as one group only when told cpu=True.
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = Accelerator(
        cpu=not gpu and plugin is None,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        deepspeed_plugin=plugin,
        # Same shuffled order on every process and for every rerun: seed + epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        # Without a GPU, accelerate 1.15 only starts multi-process DeepSpeed given a backend.
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if plugin and not torch.cuda.is_available() else [],
    )
    set_seed(cfg.seed)
    return accelerator


def has_part(name: str, parts: tuple[str, ...]) -> bool:
    """Whether the dotted parameter or module ``name`` lies in one of the model parts named ``parts``."""
    return any(p in name.split(".") for p in parts)


def language_linear_names(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Full names of the language model's nn.Linear layers whose last name part is in ``targets``.

    ``["all-linear"]`` takes them all. The vision tower, the projector and the output head are
    never adapted (as LLaVA's ``find_all_linear_names``); naming full paths keeps PEFT from also
    matching the vision tower's identically named ``q_proj``.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not has_part(name, VISION_MODULES + PROJECTOR_MODULES + OUTPUT_MODULES)
        and ("all-linear" in targets or name.rsplit(".", 1)[-1] in targets)
    ]
    if not names:
        raise ConfigError(f"lora.target_modules: {targets} matches no linear layer of the language model")
    return names


def _top_modules(model: torch.nn.Module, parts: tuple[str, ...]) -> list[str]:
    """Names of the outermost submodules named one of ``parts``."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in parts and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Set what trains: LoRA adapters (a PeftModel) or the whole language model, + projector / vision."""
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no requires_grad trick on the frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    extra = (PROJECTOR_MODULES if cfg.train_projector else ()) + (VISION_MODULES if cfg.train_vision else ())
    if cfg.enabled:
        lora = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=language_linear_names(model, cfg.target_modules),
            modules_to_save=[n.rsplit(".", 1)[-1] for n in _top_modules(model, extra)] or None,
            task_type="CAUSAL_LM",
        )
        return peft.get_peft_model(model, lora)
    model.requires_grad_(True)
    for parts, trained in ((VISION_MODULES, cfg.train_vision), (PROJECTOR_MODULES, cfg.train_projector)):
        for name in _top_modules(model, parts):
            model.get_submodule(name).requires_grad_(trained)
    return model


def param_groups(model: torch.nn.Module, lr: float, projector_lr: float = 0.0, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups of the trainable parameters: projector at ``projector_lr`` (0 = ``lr``),
    weight decay on matrices only (not on biases and norm gains), as LLaVA's trainer."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(has_part(name, PROJECTOR_MODULES), p.ndim >= 2)].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": ps, "lr": (projector_lr or lr) if proj else lr, "weight_decay": weight_decay if decay else 0.0}
        for (proj, decay), ps in sorted(groups.items())
    ]


def _one_trained_dtype(model: torch.nn.Module) -> None:
    """Cast trained weights to the frozen weights' dtype. DeepSpeed's ZeRO optimizers hold every
    trained weight in one dtype (and keep fp32 master copies themselves), while PEFT makes LoRA
    weights float32 on a bf16/fp16 model; without DeepSpeed they stay float32 for AdamW."""
    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    for p in model.parameters():
        if dtype is not None and p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _trainable_only_checkpoints(accelerator: Accelerator) -> list:
    """Checkpoints hold only trainable weights (the LoRA adapter, not a copy of the frozen 7B base).

    accelerate's save_state writes the whole state dict; these hooks filter it on save and load it
    back non-strictly on resume, checking every trained weight came back. DeepSpeed saves its own
    way, so there the hooks are not installed.
    """

    def on_save(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in trained}

    def on_load(models: list, input_dir: str) -> None:
        for i in reversed(range(len(models))):
            file = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(file)
            trained = {n for n, p in models[i].named_parameters() if p.requires_grad}
            missing, unexpected = models[i].load_state_dict(state, strict=False)
            lost = trained & set(missing)
            if lost or unexpected:
                raise ValueError(f"{file}: does not match the model (missing {sorted(lost)[:3]}, unexpected {unexpected[:3]})")
            models.pop(i)  # loaded here; accelerate must not load it again

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return []
    return [accelerator.register_save_state_pre_hook(on_save), accelerator.register_load_state_pre_hook(on_load)]


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True if ``flag`` is true on any process (a collective call when distributed)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return accelerator.reduce(t, "sum").item() > 0


def _mean_metrics(accelerator: Accelerator, sums: dict[str, float], count: int) -> dict[str, float]:
    """Window averages, averaged over processes (all must log the same keys)."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] / max(count, 1) for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, "mean")
    return dict(zip(keys, t.tolist()))


def collapsed(row: dict[str, float], limit: float) -> bool:
    """Whether a log window's chosen and rejected log-probs both fell more than ``limit`` nats per
    token below the reference's (False when the loss logs no such metrics, or ``limit`` is 0)."""
    return limit > 0 and all(k in row for k in COLLAPSE_METRICS) and all(row[k] > limit for k in COLLAPSE_METRICS)


def stop_diverged(accelerator: Accelerator, manager: CheckpointManager, good_step: int, what: str) -> NoReturn:
    """Keep only the checkpoints up to ``good_step`` (``latest`` points at the newest of them) and
    stop the run on every process with one line."""
    if accelerator.is_main_process:
        manager.roll_back(good_step)
    accelerator.wait_for_everyone()
    kept = manager.resolve("latest")
    where = f"the last good checkpoint is {kept}" if kept else "no checkpoint of this run precedes it"
    raise RunStopped(f"{what}; stopped, {where}; the final model was not written")


def _figures(row: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("logps/", "collapse/")))


def train(
    cfg: EngineConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader,
    loss_fn: LossFn,
    eval_fn: EvalFn | None = None,
    processor: Any = None,
    take_batch: Callable[[Any], Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_loader`` minimizing ``loss_fn``; returns the prepared model.

    ``eval_fn(model)`` runs on every process (it reduces across processes itself) and returns
    metrics; ``cfg.best_metric`` among them picks the best checkpoint. Each checkpoint also holds
    ``model/``: the adapter or model (+ ``processor``) as from_pretrained loads it.
    ``take_batch(batch)`` sees every batch first and may return None to skip it (e.g.
    ``data.images.BadImageLog.take``, which counts the samples dropped for bad images).
    """
    if cfg.stop_at is not None and not (cfg.best_metric and eval_fn):
        raise ConfigError("stop_at needs best_metric and an evaluation (eval_fn) that reports it")
    out = Path(cfg.output_dir)
    # The DataLoader draws a base seed for its workers at every epoch; its own generator keeps
    # that draw out of the global RNG, which checkpoints restore (dropout continues exactly).
    if train_loader.generator is None:
        train_loader.generator = torch.Generator().manual_seed(cfg.seed)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _one_trained_dtype(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.lr, cfg.projector_lr, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.adam_betas)
    )
    n = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(train_loader) / n) / cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    # accelerate steps a prepared scheduler once per process per optimizer step, hence "* n".
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=math.ceil(total * cfg.warmup_ratio) * n, num_training_steps=total * n
    )
    # DeepSpeed wants all four in one prepare() call (it fills "auto" batch sizes from the loader).
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    hooks = _trainable_only_checkpoints(accelerator)

    manager = CheckpointManager(out / "checkpoints", keep=cfg.keep, higher_is_better=cfg.higher_is_better)
    step, epoch, seen = 0, 0, 0  # seen: batches of the current epoch already consumed
    resumed_at = None
    if cfg.resume:
        try:
            folder = manager.resolve(cfg.resume)
        except FileNotFoundError as e:
            raise ConfigError(f"resume: {e}") from None
        if folder is None and cfg.resume != "latest":
            raise ConfigError(f"resume: no '{cfg.resume}' checkpoint under {manager.root}")
        if folder is not None:
            state = manager.load(accelerator, folder)
            step, epoch, seen = state["step"], state["epoch"], state["batches_in_epoch"]
            resumed_at = step
            accelerator.print(f"resumed from {folder} (step {step}, epoch {epoch}, batch {seen})")
    if resumed_at is None and accelerator.is_main_process:
        cleared = manager.clear()
        if cleared:
            print(f"fresh start: removed {cleared} checkpoint(s) of an earlier run from {manager.root}")
    accelerator.wait_for_everyone()
    log = MetricsLogger(out, enabled=accelerator.is_main_process, resumed_at=resumed_at)

    def save(metrics: dict[str, float]) -> None:
        state_dict = accelerator.get_state_dict(model)  # collective: ZeRO-3 gathers its shards
        unwrapped = accelerator.unwrap_model(model)
        manager.save(
            accelerator,
            step,
            {"epoch": epoch, "batches_in_epoch": seen, "metrics": metrics},
            metrics.get(cfg.best_metric),
            export=lambda folder: _write_pretrained(unwrapped, state_dict, folder / "model", processor),
        )

    bar = tqdm(total=total, initial=step, disable=not (cfg.progress and accelerator.is_main_process), desc="train")
    sums: dict[str, float] = defaultdict(float)  # metric sums over the micro-batches of a log window
    count, norms = 0, []
    logged_at = step  # weights of steps from here on made the current log window's figures
    last_eval: dict[str, float] = {}
    model.train()
    ended = False  # stop_at reached
    while not ended and step < total and (cfg.max_steps or epoch < cfg.epochs):
        loader = accelerator.skip_first_batches(train_loader, seen) if seen else train_loader
        loader.set_epoch(epoch)  # seeds this epoch's order (a skipping loader is new and needs it too)
        for batch in loader:
            seen += 1
            if take_batch is not None:
                batch = take_batch(batch)
            if _any_process(accelerator, batch is None):
                continue
            with accelerator.accumulate(model):
                loss, metrics = loss_fn(model, batch)
                value = loss.item()
                if _any_process(accelerator, not math.isfinite(value)):
                    stop_diverged(accelerator, manager, step - 1, f"diverged at step {step + 1}: a loss is not "
                                  f"finite (this process: loss {value:.4g}{', ' if metrics else ''}{_figures(metrics)})")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    if norm is not None:
                        norms.append(float(norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            sums["loss"] += value
            for k, v in metrics.items():
                sums[k] += float(v)
            count += 1
            if not accelerator.sync_gradients:
                continue

            step += 1
            bar.update(1)
            last = step == total
            end_of_epoch = accelerator.gradient_state.end_of_dataloader
            if step % cfg.log_every == 0 or last:
                row = _mean_metrics(accelerator, sums, count)
                if norms:
                    row["grad_norm"] = sum(norms) / len(norms)
                row.update(lr=scheduler.get_last_lr()[0], epoch=epoch + seen / len(train_loader))
                log.log(row, step)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                sums, count, norms = defaultdict(float), 0, []
                if collapsed(row, cfg.collapse_nats):
                    stop_diverged(accelerator, manager, logged_at - 1, f"diverged at step {step}: chosen and rejected "
                                  f"log-probs both fell more than {cfg.collapse_nats} nats per token below the "
                                  f"reference over steps {logged_at + 1}-{step} ({_figures(row)})")
                logged_at = step
            if eval_fn and (last or (step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch)):
                last_eval = eval_fn(model)
                model.train()
                log.log(last_eval, step)
                accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
                if reached(cfg, last_eval):
                    accelerator.print(f"step {step}: {cfg.best_metric} reached {cfg.stop_at}; the run ends here")
                    last = ended = True
            if last or (step % cfg.save_every == 0 if cfg.save_every else end_of_epoch):
                save(last_eval)
            if last:
                break
        else:
            epoch, seen = epoch + 1, 0
    bar.close()
    log.close()
    for h in hooks:
        h.remove()
    accelerator.wait_for_everyone()
    return TrainResult(model=model, step=step, metrics=last_eval, best_checkpoint=manager.resolve("best"))


def reached(cfg: EngineConfig, metrics: dict[str, float]) -> bool:
    """Whether ``metrics`` meet ``cfg.stop_at`` (at or above it, or at or below with a lower-is-better metric)."""
    value = metrics.get(cfg.best_metric)
    if cfg.stop_at is None or value is None:
        return False
    return value >= cfg.stop_at if cfg.higher_is_better else value <= cfg.stop_at


def _write_pretrained(model: Any, state_dict: dict, out_dir: Path, processor: Any = None) -> None:
    """save_pretrained into a temporary folder, then rename the files into ``out_dir``, the config
    last: a folder with a config is complete. Other files in ``out_dir`` are left alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        configs = ("config.json", "adapter_config.json")
        for f in sorted(Path(tmp).iterdir(), key=lambda p: p.name in configs):
            os.replace(f, out_dir / f.name)


def save_model(accelerator: Accelerator, model: Any, out_dir: str | Path, processor: Any = None) -> Path:
    """Write the prepared ``model`` (a PEFT adapter or a full model) and ``processor`` to ``out_dir``
    for from_pretrained. A collective call: every process calls it (ZeRO-3 gathers shards)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        _write_pretrained(accelerator.unwrap_model(model), state_dict, Path(out_dir), processor)
    accelerator.wait_for_everyone()
    return Path(out_dir)
