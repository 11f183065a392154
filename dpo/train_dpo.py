"""Stage 3: DPO on the preference pairs D_pt, LoRA on the policy (docs/DESIGN.md).

    bash scripts/train_dpo.sh [CONFIG.yaml] [--key value ...]     (default configs/toy/dpo.yaml)

Reads our pairs and the released MMed-RAG alignment files as they are (data.readers); each side
of a pair sees its own image (dpo.pair_data). Chosen and rejected answers go through ONE forward
pass, their images stacked in one pixel batch; a pair whose sides see the same image and prompt
(D_oa) is one row [prompt, chosen, rejected] with ``share_prompt`` (exact; off where the model
cannot take it: policy.policy.prompt_sharing_blocker). The reference policy is the same model with its
LoRA disabled (``disable_adapter()``), never a second copy; with ``cache_reference`` its
log-probs are computed once, on the first step, for the training and held-out pairs. Losses
(sigmoid, hinge, IPO, mDPO, optional SFT term on the chosen answer; or ``sft`` alone, the control
without a preference, which trains without a reference forward) are dpo.loss; mDPO scores a third
answer per pair in the same forward, the chosen one under a corrupted image (pure noise, seeded by
the record: dpo.pair_data). The loop, DeepSpeed, checkpoints and exact resume are common.engine.
Outputs in ``train.output_dir``:

- ``adapter/``: the LoRA adapter (PEFT format) + processor; ``merged/`` with ``--merge``;
- ``metrics.jsonl`` + ``tensorboard/``: per step loss, rewards/{chosen,rejected,accuracies,
  margins} (mdpo: also rewards/corrupted{,_accuracies,_margins}), logps/{chosen,rejected}; at
  each evaluation the same on the held-out pairs, overall (``eval/...``) and per pair type
  (``eval/cm/...``);
- ``checkpoints/`` (resume with ``--train.resume latest``), ``run_config.yaml``;
- ``bad_records.json``: the pair records skipped as unusable (data.readers), beside ``bad_images.json``;
- ``run_summary.json``: the step reached, the last evaluation and ``budget``: what fitting the pairs
  to ``max_length`` cut or refused (policy.budget; an answer is never cut).

Several processes: ``NPROC=N bash scripts/train_dpo.sh ...`` (accelerate launch) or ``torchrun
--nproc_per_node N -m dpo.train_dpo ...``, with ``--train.deepspeed configs/deepspeed/zero2.json``
(or zero3). A DeepSpeed config also runs in one process started without a launcher.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from inspect import signature
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.integrations import unset_hf_deepspeed_config

from common.config import ConfigError, cli_main, doc, load_config, save_config
from common.engine import (
    COLLAPSE_METRICS, PROJECTOR_MODULES, VISION_MODULES, EngineConfig, LoraConfig, _any_process, apply_lora,
    build_accelerator, save_model, train,
)
from common.io import InputError, atomic_write_json, run_lock
from data.images import BadImageLog
from data.loader import StagedSampler, make_loader
from data.noise import pure_noise
from data.readers import bad_records_summary
from data.records import PreferenceRecord
from data.release import image_search_path
from dpo.loss import LOSS_TYPES, DpoOutput, dpo_loss, mdpo_loss, sft_loss
from dpo.pair_data import (
    PairCollator, PairDataset, answer_lengths, load_pairs, pair_lengths, pair_type_of, select_types, split_heldout,
    stage_indices,
)
from policy.adapters import load_with_adapters, save_merged
from policy.budget import BUDGET_KEY, BudgetLog, describe
from policy.policy import Policy, PolicySpec, causal_lm, prompt_sharing_blocker, sequence_logps, unwrap_parallel


@dataclass
class DpoConfig:
    policy: PolicySpec = doc(PolicySpec(), "the policy to tune (the reference is it with the LoRA off); its prompts: "
                                           "the wording the pairs were written in, to rebuild one with fewer references")
    pairs: list[str] = doc(["outputs/toy/pairs/pairs.json"], "preference JSON files: ours (pairs.build_pairs) or the released MMed-RAG ones")
    image_root: str = doc("", "image folder for records whose own image_root is absent or does not exist here (or one holding a folder per image set)")
    image_roots: dict[str, str] = doc({}, "image set (mimic, iuxray, harvard, pmc, quilt) -> its folder, looked in before image_root (the released pairs)")
    beta: float = doc(0.1, "DPO beta (strength of the pull towards the reference)")
    loss_type: Literal["sigmoid", "hinge", "ipo", "sft", "mdpo"] = doc(
        "sigmoid", f"loss: one of {[*LOSS_TYPES, 'mdpo']}; sft = NLL of the chosen answers only (no rejected "
                   "side, no reference); mdpo = sigmoid + mDPO's conditional term (the chosen answer under a "
                   "pure-noise image) and anchored term")
    mdpo_delta: float = doc(0.0, "mdpo's anchor delta: the chosen answer's reward is pulled above it (0 as the "
                                 "paper and its code)")
    sft_weight: float = doc(0.0, "weight of an added SFT term (token-mean NLL of the chosen answer); 0 = none")
    share_prompt: bool = doc(True, "a pair whose sides see the same image and prompt runs as one row [prompt, chosen, "
                                   "rejected], the rejected answer not seeing the chosen: the same log-probs, the prompt "
                                   "computed once (two rows where the model cannot take it, logged)")
    cache_reference: bool = doc(False, "compute the reference log-probs once (first step) instead of a reference forward per step")
    pair_types: list[str] = doc([], "train and evaluate only on these pair types, e.g. [cm] ([] = all)")
    stages: list[list[str]] = doc([], "data schedule: [] = one mixed pass; e.g. [[cm], [oa1, oa2]] = each epoch takes cm pairs first")
    heldout_fraction: float = doc(0.1, "fraction of pairs (by id, deterministic) held out for evaluation")
    heldout_seed: int = doc(0, "seed of the held-out split")
    noise_seed: int = doc(0, "seed of the pure-noise images of rejected_noised / chosen_noised pairs (with the record id)")
    max_length: int = doc(0, "token budget of prompt (image tokens included) + the longer answer; references are dropped "
                             "or shortened to fit, a pair that cannot fit is refused (0 = the model's own limit)")
    eval_batch_size: int = doc(0, "pairs per evaluation / reference-caching batch (0 = train.batch_size)")
    bad_image: Literal["skip", "error"] = doc("skip", "an unreadable image: skip the pair (counted) or stop")
    bad_record: Literal["skip", "error"] = doc("skip", "a pair record that cannot be used: skip it (named in bad_records.json) or stop")
    merge: bool = doc(False, "also write merged/: the policy with the adapter folded in (loads with from_pretrained)")
    lora: LoraConfig = doc(LoraConfig(), "what trains: LoRA on the language model (+ projector with lora.train_projector)")
    train: EngineConfig = doc(EngineConfig(output_dir="outputs/toy/dpo"), "optimizer, schedule, precision, DeepSpeed, checkpoints (common.engine)")


def check(cfg: DpoConfig) -> None:
    """Refuse settings that cannot work, before any model is loaded."""
    if not cfg.lora.enabled:
        raise ConfigError("lora.enabled: DPO here trains a LoRA (the reference is the model with its adapter disabled)")
    if cfg.beta <= 0:
        raise ConfigError(f"beta: must be > 0, got {cfg.beta}")
    if cfg.sft_weight < 0:
        raise ConfigError(f"sft_weight: must be >= 0, got {cfg.sft_weight}")
    if cfg.loss_type == "sft" and cfg.sft_weight > 0:
        raise ConfigError("sft_weight: loss_type sft is already the chosen answers' NLL; set sft_weight 0")
    if cfg.loss_type != "mdpo" and cfg.mdpo_delta != 0:
        raise ConfigError(f"mdpo_delta: only loss_type mdpo has an anchor; loss_type is {cfg.loss_type}")
    if not Path(cfg.policy.path).is_dir():
        raise ConfigError(f"policy.path: {cfg.policy.path}: checkpoint folder does not exist")


# ---------------------------------------------------------------- forward passes


def answers_per_pair(loss_type: str) -> int:
    """Answers scored per pair: chosen and rejected, for mdpo also the chosen one under the corrupted image."""
    return 3 if loss_type == "mdpo" else 2


def pair_logps(model: Any, inputs: dict[str, torch.Tensor], sides: int = 2) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected[, corrupted]) summed answer log-probs from ONE forward over the batch's
    ``sides`` x B answers."""
    return sequence_logps(model, inputs).chunk(sides)


def encoded_images(model: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """``inputs`` with the images encoded once, passed as transformers' ``mm_encoder_outputs``
    forward argument in place of ``pixel_values``; None when the model takes no encoder outputs.

    For a policy and a reference forward that see the same image features (vision tower and
    projector frozen, no adapter on them), so the reference forward skips the vision tower the
    policy forward needs.
    """
    base = causal_lm(model).base_model
    encode = getattr(base, "get_image_features", None)
    if encode is None or "pixel_values" not in inputs or "mm_encoder_outputs" not in signature(base.forward).parameters:
        return None
    takes = signature(encode).parameters
    with torch.no_grad():
        features = encode(**{k: v for k, v in inputs.items() if k in takes}, return_dict=True)
    return {**{k: v for k, v in inputs.items() if k != "pixel_values"}, "mm_encoder_outputs": {"image": features}}


def frozen_image_encoder(model: Any) -> bool:
    """No parameter of the vision tower or projector trains (nor a copy PEFT keeps of them)."""
    parts = set(VISION_MODULES + PROJECTOR_MODULES)
    return not any(p.requires_grad for n, p in model.named_parameters() if parts & set(n.split(".")))


@contextlib.contextmanager
def reference_mode(accelerator: Accelerator, model: Any) -> Iterator[Any]:
    """The reference policy: the unwrapped model with its LoRA disabled, no gradients.

    The unwrapped module is used (as TRL does for its reference): no DDP collective in a forward
    that not every process may run. Under ZeRO-3 its forward still gathers weights collectively,
    so callers keep all processes in step (see ``lockstep``).
    """
    unwrapped = unwrap_parallel(model)
    with torch.no_grad(), unwrapped.disable_adapter():
        yield unwrapped


def lockstep(
    accelerator: Accelerator, loader: DataLoader, filler: dict, take: Callable[[Any], Any]
) -> Iterator[tuple[dict, bool]]:
    """(batch, real) for every batch any process has, on the device; a process whose batch is
    empty (``take`` gave None: all its images unreadable or pairs refused) runs ``filler`` and
    drops the result, so that ZeRO-3's collective weight gathers stay matched across processes."""
    for batch in loader:
        batch = take(batch)
        if _any_process(accelerator, batch is not None):
            batch = send_to_device(batch, accelerator.device) if batch is not None else None
            yield (filler, False) if batch is None else (batch, True)


def shard(n: int, accelerator: Accelerator) -> list[int]:
    """This process's share of positions 0..n-1; every process gets the same count (the last
    position repeats), so all run the same number of batches."""
    k = accelerator.num_processes
    per = math.ceil(n / k)
    mine = list(range(accelerator.process_index, n, k))
    return mine + [n - 1] * (per - len(mine))


def score_pairs(
    accelerator: Accelerator,
    model: Any,
    loader: DataLoader,
    filler: dict,
    policy: bool,
    reference: torch.Tensor | None,
    take: Callable[[Any], Any],
    desc: str,
    sides: int = 2,
) -> dict[int, list[float]]:
    """Per pair position: [type code, policy chosen, policy rejected(, policy corrupted), ref chosen,
    ref rejected(, ref corrupted), chosen length, rejected length], from all processes; the
    corrupted columns with ``sides`` 3 (mdpo). Reference from ``reference`` (cached) or a forward
    with the adapter disabled; policy log-probs only when ``policy``."""
    was_training = model.training
    model.eval()
    rows: list[list[float]] = []
    unwrapped = accelerator.unwrap_model(model)
    bar = tqdm(total=len(loader), desc=desc, disable=not accelerator.is_main_process, leave=False)
    for batch, real in lockstep(accelerator, loader, filler, take):
        bar.update(1)
        inputs = batch["inputs"]
        if reference is not None:
            ref = reference[batch["index"].cpu()].to(accelerator.device).unbind(1)
        else:
            with reference_mode(accelerator, model) as ref_model:
                ref = pair_logps(ref_model, inputs, sides)
        pol = [torch.full_like(r, float("nan")) for r in ref]
        if policy:
            with torch.no_grad():
                pol = pair_logps(unwrapped, inputs, sides)
        if not real:
            continue
        lengths = answer_lengths(inputs).chunk(sides)[:2]
        cols = [batch["pair_type"].float(), *pol, *ref, *lengths]
        table = torch.stack([c.float().cpu() for c in cols], 1).tolist()
        rows += [[int(i)] + r for i, r in zip(batch["index"].tolist(), table)]
    bar.close()
    model.train(was_training)
    return {int(r[0]): r[1:] for r in gather_object(rows)}


def reference_cache(
    accelerator: Accelerator, model: Any, loader: DataLoader, n: int, filler: dict, take: Callable[[Any], Any],
    desc: str, sides: int = 2,
) -> torch.Tensor:
    """[n, sides] reference (chosen, rejected[, corrupted]) log-probs by pair position; NaN where
    the pair's image could not be read or the pair was refused for length."""
    cache = torch.full((n, sides), float("nan"))
    for i, row in score_pairs(accelerator, model, loader, filler, False, None, take, desc, sides).items():
        cache[i] = torch.tensor(row[1 + sides : 1 + 2 * sides])
    return cache


# ---------------------------------------------------------------- loss and evaluation


def pair_loss(
    cfg: DpoConfig, policy: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> DpoOutput:
    """The configured loss from the (chosen, rejected[, corrupted]) log-probs of policy and reference."""
    if cfg.loss_type == "mdpo":
        return mdpo_loss(*policy, *reference, cfg.beta, cfg.mdpo_delta)
    return dpo_loss(*policy, *reference, cfg.beta, cfg.loss_type, chosen_lengths, rejected_lengths)


def step_loss(
    out: DpoOutput, chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, sft_weight: float, valid: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss over the valid pairs, plus ``sft_weight`` x token-mean NLL of the chosen answers."""
    if not valid.any():  # no usable reference in this batch: a zero loss that still reaches every weight
        return chosen_logps.sum() * 0.0, {}
    loss = out.losses[valid].mean()
    metrics: dict[str, float] = {}
    if sft_weight > 0:
        sft = sft_loss(chosen_logps[valid], chosen_lengths[valid])
        loss = loss + sft_weight * sft
        metrics["sft_loss"] = sft.item()
    return loss, metrics


def collapse_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, len_c: torch.Tensor,
    len_r: torch.Tensor, valid: torch.Tensor,
) -> dict[str, float]:
    """Nats per answer token by which the policy's chosen and rejected log-probs lie below the
    reference's, over the pairs that have a reference (0 when none): the engine's divergence stop
    watches them (common.engine.COLLAPSE_METRICS); per token, so long and short answers weigh alike."""
    if not valid.any():
        return dict.fromkeys(COLLAPSE_METRICS, 0.0)
    drops = [((ref - pol.detach()) / n.clamp(min=1))[valid].mean().item()
             for pol, ref, n in ((chosen, ref_c, len_c), (rejected, ref_r, len_r))]
    return dict(zip(COLLAPSE_METRICS, drops))


def summarize(scores: dict[int, list[float]], types: list[str], cfg: DpoConfig) -> dict[str, float]:
    """eval/ metrics over all held-out pairs and per pair type (loss, rewards/*, logps/*, count)."""
    if not scores:
        return {}
    sides = answers_per_pair(cfg.loss_type)
    t = torch.tensor([scores[i] for i in sorted(scores)], dtype=torch.float64)
    t = t[~t.isnan().any(1)]
    groups = [("eval/", torch.ones(len(t), dtype=torch.bool))]
    groups += [(f"eval/{name}/", t[:, 0] == k) for k, name in enumerate(types) if (t[:, 0] == k).any()]
    out: dict[str, float] = {}
    for prefix, sel in groups:
        s = t[sel]
        pol, ref = s[:, 1 : 1 + sides].unbind(1), s[:, 1 + sides : 1 + 2 * sides].unbind(1)
        res = pair_loss(cfg, pol, ref, s[:, -2], s[:, -1])
        out[f"{prefix}loss"] = res.losses.mean().item()
        out.update(res.metrics(prefix))
        out[f"{prefix}logps/chosen"] = pol[0].mean().item()
        out[f"{prefix}logps/rejected"] = pol[1].mean().item()
        out[f"{prefix}count"] = float(len(s))
    return out


class DpoTrainer:
    """The DPO pieces the engine calls: ``loss(model, batch)`` and ``evaluate(model)``."""

    def __init__(self, cfg: DpoConfig, accelerator: Accelerator, policy: Policy):
        self.cfg = cfg
        self.accelerator = accelerator
        self.bad_records: list[str] = []
        roots = image_search_path(cfg.image_root, cfg.image_roots) or None
        records = select_types(load_pairs(cfg.pairs, roots, cfg.bad_record, self.bad_records), cfg.pair_types)
        self.train_records, self.heldout_records = split_heldout(records, cfg.heldout_fraction, cfg.heldout_seed)
        self.types = sorted({pair_type_of(r) for r in records})
        stages = stage_indices(self.train_records, cfg.stages)
        lengths = pair_lengths(self.train_records) if cfg.train.group_by_length else None
        templates = cfg.policy.templates()
        self.budget = BudgetLog.of(policy, cfg.max_length)
        share = cfg.share_prompt and self._prompt_sharing(policy.model)
        self.bad_log = BadImageLog()
        self.sides = answers_per_pair(cfg.loss_type)
        corrupted = self.sides == 3
        self.train_set = PairDataset(self.train_records, roots, cfg.noise_seed, cfg.bad_image, corrupted)
        self.collate_train = PairCollator(self.train_records, policy.processor, self.types, templates,
                                          self.budget.max_length, share)
        self.train_loader = make_loader(self.train_set, cfg.train.batch_size, num_workers=cfg.train.num_workers,
                                        collate_fn=self.collate_train, seed=cfg.train.seed,
                                        sampler=StagedSampler(stages, cfg.train.seed, lengths=lengths,
                                                              batch_size=cfg.train.batch_size))
        self.heldout_set = PairDataset(self.heldout_records, roots, cfg.noise_seed, cfg.bad_image, corrupted)
        self.collate_heldout = PairCollator(self.heldout_records, policy.processor, self.types, templates,
                                            self.budget.max_length, share)
        self.heldout_loader = self._fixed_loader(self.heldout_set, self.collate_heldout, self.heldout_records)
        self.filler = self._filler()
        self.reference: dict[str, torch.Tensor] | None = None
        self.share_images: bool | None = None  # known at the first step (what trains is set after __init__)

    def _prompt_sharing(self, model: Any) -> bool:
        """Whether this model scores a shared-prompt row exactly; says so when it does not."""
        blocker = prompt_sharing_blocker(model)
        if blocker:
            self.accelerator.print(f"share_prompt: off for this model ({blocker}); each pair takes two rows")
        return blocker is None

    def _filler(self) -> dict:
        """A stand-in batch for a process whose own batch was dropped (see lockstep): the first
        training pair that fits, on noise images."""
        noise = pure_noise((32, 32), 0)
        item = {"image": noise, "rejected_image": noise} | ({"corrupted_image": noise} if self.sides == 3 else {})
        for i in range(len(self.train_records)):
            batch = self.collate_train([{**item, "index": i}])
            if "inputs" in batch:
                return batch
        raise InputError(f"{self.cfg.pairs}: no training pair fits max_length {self.budget.max_length}: "
                         f"{self.collate_train.names[0]}: {batch[BUDGET_KEY][0][1].refused}")

    def take(self, batch: Any) -> Any:
        """A training batch with its unreadable images and budget notes recorded; None when empty."""
        return self.budget.take(self.bad_log.take(batch))

    def take_again(self, batch: Any) -> Any:
        """``take`` for evaluation and reference passes: bad images are counted by training only."""
        return self.budget.take(BadImageLog().take(batch))

    def _fixed_loader(self, dataset: PairDataset, collate: PairCollator, records: list[PreferenceRecord]) -> DataLoader:
        """This process's share of ``dataset`` (evaluation, reference caching; results are kept by
        pair position): in order, or by pair length with ``train.group_by_length``."""
        batch = self.cfg.eval_batch_size or self.cfg.train.batch_size
        positions = shard(len(dataset), self.accelerator)
        if self.cfg.train.group_by_length:
            lengths = pair_lengths(records)
            positions.sort(key=lengths.__getitem__)
        return make_loader(dataset, batch, num_workers=self.cfg.train.num_workers, collate_fn=collate,
                           sampler=positions)

    def _cache(self, model: Any) -> dict[str, torch.Tensor]:
        """Reference log-probs of every training and held-out pair, computed once (same values
        after a resume: the adapter is disabled, and images and noise are deterministic)."""
        if self.reference is None:
            filler = send_to_device(self.filler, self.accelerator.device)
            self.reference = {
                name: reference_cache(self.accelerator, model, loader, len(loader.dataset), filler, self.take_again,
                                      f"reference ({name})", self.sides)
                for name, loader in (
                    ("train", self._fixed_loader(self.train_set, self.collate_train, self.train_records)),
                    ("heldout", self.heldout_loader),
                )
                if len(loader.dataset)
            }
        return self.reference

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = batch["inputs"]
        if self.share_images is None:
            self.share_images = self.cfg.loss_type != "sft" and not self.cfg.cache_reference and frozen_image_encoder(model)
        if self.share_images:  # one vision-tower pass for the policy and the reference forward
            inputs = encoded_images(model, inputs) or inputs
        logps = pair_logps(model, inputs, self.sides)  # all rows in one forward; sft only logs the rejected
        chosen, rejected = logps[:2]
        len_c, len_r = answer_lengths(inputs).chunk(self.sides)[:2]
        metrics = {"logps/chosen": chosen.detach().mean().item(), "logps/rejected": rejected.detach().mean().item()}
        if self.cfg.loss_type == "sft":
            return sft_loss(chosen, len_c), metrics
        if self.cfg.cache_reference:
            ref = self._cache(model)["train"][batch["index"].cpu()].to(chosen.device)
        else:
            with reference_mode(self.accelerator, model) as ref_model:
                ref = torch.stack(pair_logps(ref_model, inputs, self.sides), 1)
        valid = ~ref.isnan().any(1)
        out = pair_loss(self.cfg, logps, ref.nan_to_num().unbind(1), len_c, len_r)
        loss, step_metrics = step_loss(out, chosen, len_c, self.cfg.sft_weight, valid)
        collapse = collapse_metrics(chosen, rejected, ref[:, 0], ref[:, 1], len_c, len_r, valid)
        return loss, {**step_metrics, **out.metrics(), **metrics, **collapse}

    def evaluate(self, model: Any) -> dict[str, float]:
        if not len(self.heldout_set):
            return {}
        reference = self._cache(model)["heldout"] if self.cfg.cache_reference else None
        filler = send_to_device(self.filler, self.accelerator.device)
        scores = score_pairs(self.accelerator, model, self.heldout_loader, filler, True, reference, self.take_again,
                             "eval", self.sides)
        return summarize(scores, self.types, self.cfg)


# ---------------------------------------------------------------- outputs


@contextlib.contextmanager
def plain_loading(accelerator: Accelerator) -> Iterator[None]:
    """from_pretrained loads a whole model here, not ZeRO-3 shards: sharded loading is collective
    and only the main process loads the model to merge. (accelerate's
    ``zero3_init_context_manager(enable=False)`` leaves transformers' ZeRO-3 switch on.)"""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def fill_deepspeed_sizes(accelerator: Accelerator, model: Any) -> None:
    """accelerate fills the ZeRO bucket sizes marked "auto" from ``model.config.hidden_size``, which
    a vision-language config keeps in its text config; fill them from there, by accelerate's rule.
    (Belongs in common.engine; here until it does it.)"""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or hasattr(model.config, "hidden_size"):
        return
    h = model.config.get_text_config().hidden_size
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    sizes = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
             "stage3_param_persistence_threshold": 10 * h}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value


def start_run(cfg: Any, make_trainer: Callable[[Any, Accelerator, Policy], Any]
              ) -> tuple[Path, Accelerator, Policy, Any, Any]:
    """What a LoRA stage on the policy (DPO, GRPO) does before it trains: the accelerator first
    (ZeRO-3 must be set up before the model loads), the policy, the stage's trainer, the output
    folder with run_config.yaml, DeepSpeed's sizes from the model; then LoRA on the model.
    Returns (output folder, accelerator, policy, model to train, trainer)."""
    out = Path(cfg.train.output_dir)
    accelerator = build_accelerator(cfg.train)
    policy = load_with_adapters(cfg.policy)
    trainer = make_trainer(cfg, accelerator, policy)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "run_config.yaml")
    fill_deepspeed_sizes(accelerator, policy.model)
    model = apply_lora(policy.model, cfg.lora, cfg.train.gradient_checkpointing)
    return out, accelerator, policy, model, trainer


def run(cfg: DpoConfig) -> dict[str, Any]:
    """Train; returns the last evaluation, the step reached and the output paths."""
    check(cfg)
    out, accelerator, policy, model, trainer = start_run(cfg, DpoTrainer)
    accelerator.print(f"pairs: {len(trainer.train_records)} train, {len(trainer.heldout_records)} held out; "
                      f"types {trainer.types}; {accelerator.num_processes} process(es)")
    result = train(cfg.train, accelerator, model, trainer.train_loader, trainer.loss, trainer.evaluate,
                   processor=policy.processor, take_batch=trainer.take)
    adapter = save_model(accelerator, result.model, out / "adapter", policy.processor)
    merged = None
    if cfg.merge:
        if accelerator.is_main_process:
            with plain_loading(accelerator):
                # the policy (with init_adapter merged, as trained) with the DPO adapter folded in
                merged = save_merged(load_with_adapters(cfg.policy, adapter), out / "merged", cfg.policy.prompts_file())
        accelerator.wait_for_everyone()
    trainer.bad_log.write(accelerator, out / "bad_images.json")
    budget = trainer.budget.merged(accelerator).summary()
    if accelerator.is_main_process:
        atomic_write_json(out / "bad_records.json", {"bad_records": bad_records_summary(trainer.bad_records)})
        atomic_write_json(out / "run_summary.json", {"step": result.step, "metrics": result.metrics, "budget": budget})
    return {"metrics": result.metrics, "step": result.step, "adapter": adapter, "merged": merged, "budget": budget}


def main() -> None:
    cfg = load_config(DpoConfig, description=__doc__)
    with run_lock(cfg.train.output_dir):
        summary = run(cfg)
    print(describe(summary["budget"]))
    print(f"adapter: {summary['adapter']}" + (f"; merged model: {summary['merged']}" if summary["merged"] else ""))


if __name__ == "__main__":
    cli_main(main)
