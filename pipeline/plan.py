"""A training run's plan before it starts: what trains, whether it fits, how long its sequences are.

    bash scripts/plan.sh CONFIG.yaml [--key value ...] [--gpus N] [--out DIR] [--kind dpo|sft|clip] [--limit N]

Takes the same SFT, DPO and CLIP configs and ``--key value`` overrides as the training stages. The
model is built on the meta device (no weights: a folder with only ``config.json`` is enough), LoRA
is applied by the engine's own ``apply_lora``, and the plan is printed and written to
``<out>/plan.json`` (``--out`` defaults to the config's output folder; docs/DESIGN.md, contract 6):
parameters per part, per-GPU memory under ZeRO-2 and ZeRO-3, the token lengths of the config's
data measured with the checkpoint's processor, and steps per epoch.

A misconfiguration stops the plan with exit 2 and one line, before plan.json is written: LoRA
targets matching nothing, LoRA reaching the vision tower (or a vision tower the engine cannot
name), a ``max_length`` below the median prompt.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import open_clip
import torch
import yaml
from accelerate import init_empty_weights
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from common.config import ConfigError, cli_main, doc, help_text, load_config
from common.engine import PROJECTOR_MODULES, VISION_MODULES, LoraConfig, apply_lora, has_part
from common.io import InputError, atomic_write_json
from data.datasets import QueryDataset
from data.release import image_search_path
from dpo.pair_data import CpuEncoder, PairDataset, load_pairs, prompt_parts, select_types, split_heldout
from dpo.train_dpo import DpoConfig, answers_per_pair
from policy.budget import answer_tokens, budget_for, fit_prompt, model_limit, percentiles
from policy.policy import LOGITS_CHUNK_MB, PolicySpec
from policy.train_sft import SftConfig, keep, read_examples, training_sources
from retriever.clip_data import item_records
from retriever.finetune_clip import ClipTrainConfig
from retriever.model import resolve_model_config

KINDS: dict[str, type] = {"dpo": DpoConfig, "sft": SftConfig, "clip": ClipTrainConfig}
GB = 1024**3
# The loss's logits as policy.policy.sequence_logps makes them: only answer positions, at most
# LOGITS_CHUNK_MB of float32 logits at a time, alive as the chunk, its log-softmax and (backward)
# its gradient. A DPO step's reference forward scores its chunks after the policy's, not beside them.
LOGITS_COPIES = 3


@dataclass
class PlanOptions:
    """The plan's own options; every other ``--key`` belongs to the training config."""

    kind: Literal["auto", "dpo", "sft", "clip"] = doc("auto", "which trainer's config this is (auto: by its keys)")
    gpus: int = doc(8, "GPUs (processes) the run will use: memory per GPU under ZeRO, steps per epoch")
    out: str = doc("", "folder of plan.json (empty = the config's output folder)")
    limit: int = doc(0, "measure token lengths on the first N records (0 = all)")


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(plan options, training config arguments) from one command line."""
    own = {f"--{f.name}" for f in dataclasses.fields(PlanOptions)}
    plan, rest, i = [], [], 0
    while i < len(argv):
        key = argv[i].split("=", 1)[0]
        target = plan if key in own else rest
        target.append(argv[i])
        if "=" not in argv[i] and argv[i].startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            target.append(argv[i + 1])
            i += 1
        i += 1
    return plan, rest


def detect_kind(config: str) -> str:
    """The trainer whose config accepts every top-level key of ``config``."""
    try:
        keys = set(yaml.safe_load(Path(config).read_text()) or {})
    except (OSError, yaml.YAMLError, TypeError) as e:
        raise ConfigError(f"{config}: cannot read the config: {e}") from None
    fits = [k for k, cls in KINDS.items() if keys <= {f.name for f in dataclasses.fields(cls)}]
    if len(fits) != 1:
        raise ConfigError(f"{config}: cannot tell whether this is a {' or '.join(fits or KINDS)} config; give --kind")
    return fits[0]


# ---------------------------------------------------------------- the model and its parts


def meta_policy(spec: PolicySpec) -> torch.nn.Module:
    """The policy's architecture as the policy loader builds it (AutoModelForImageTextToText), no weights."""
    if not (Path(spec.path) / "config.json").is_file():
        raise InputError(f"{spec.path}: no config.json (policy.path must be a Hugging Face checkpoint folder)")
    try:
        config = AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"{spec.path}/config.json: {str(e).splitlines()[0]}") from None
    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=spec.trust_remote_code)


def with_lora(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """``apply_lora`` as training calls it, its new weights on the meta device too."""
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renaming of gradient checkpointing
        return apply_lora(model, lora, gradient_checkpointing)


def policy_part(name: str) -> str:
    """Which part of a vision-language model a parameter belongs to, by the engine's module names
    (the projector first: Qwen2-VL's ``merger`` lies inside its ``visual`` tower)."""
    if has_part(name, PROJECTOR_MODULES):
        return "projector"
    return "vision_tower" if has_part(name, VISION_MODULES) else "language_model"


def clip_part(name: str) -> str:
    return "image_tower" if name.split(".")[0] == "visual" else "text_tower"


def count_parts(model: torch.nn.Module, part_of: Callable[[str], str]) -> dict[str, dict[str, int]]:
    """{part: {total, trainable}} over the model's parameters, each shared one counted once."""
    parts: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        row = parts.setdefault(part_of(name), {"total": 0, "trainable": 0})
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    return parts


def check_vision(model: torch.nn.Module) -> None:
    """Refuse a model whose vision tower LoRA reaches, or which the engine cannot tell apart."""
    config = getattr(model, "config", None)
    names = [n for n, _ in model.named_parameters()]
    if getattr(config, "vision_config", None) is not None and not any(policy_part(n) == "vision_tower" for n in names):
        raise ConfigError(f"{type(model).__name__}: no vision tower named one of {list(VISION_MODULES)}: the engine "
                          "would adapt and train it as language model (add its name to common.engine.VISION_MODULES)")
    reached = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and policy_part(n) == "vision_tower"]
    if reached:
        raise ConfigError(f"lora: reaches the vision tower ({reached[0]} and {len(reached) - 1} more)")


# ---------------------------------------------------------------- memory


def model_state_bytes(total: int, trainable: int, largest_layer: int, gpus: int) -> dict[str, dict[str, float]]:
    """Per-GPU bytes of weights, gradients and optimizer states under ZeRO-2 and ZeRO-3.

    DeepSpeed's estimators assume every parameter trains: 16-bit weights (whole on every GPU
    under ZeRO-2; under ZeRO-3 a share plus the largest layer, gathered) and 18 bytes a parameter
    split over the GPUs. With LoRA only ``trainable`` parameters carry gradients and optimizer
    states, so the estimators are called with the trainable count and the frozen weights are
    added (2 bytes each, whole under ZeRO-2, a 1/gpus share under ZeRO-3). The 18 bytes are shown
    as DeepSpeed's ZeRO-2 comment splits them: gradients 2 + 4, optimizer 4 (fp32 master weights)
    + 8 (Adam moments); weights are the rest of the estimate.
    """
    # DeepSpeed is imported here, after the checks: without a GPU its import logs a warning line
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    frozen = total - trainable
    _, zero2 = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        trainable, largest_layer, num_gpus_per_node=gpus, cpu_offload=False, cpu_offload_params=False
    )
    grads, optimizer = 6 * trainable / gpus, 12 * trainable / gpus
    return {
        stage: {"weights": estimate + frozen_weights - grads - optimizer, "gradients": grads, "optimizer": optimizer}
        for stage, estimate, frozen_weights in (("zero2", zero2, 2 * frozen), ("zero3", zero3, 2 * frozen / gpus))
    }


def activation_bytes(model: torch.nn.Module, rows: int, length: int, checkpointing: bool, lora: LoraConfig,
                     element: int, lora_bytes: int, mask_bytes: int = 1) -> dict[str, float]:
    """Bytes of the language model's activations kept for the backward, and of the loss's logits.

    Hand-written (no library estimates activations), per decoder layer and token, from what autograd
    saves in a Llama / Mistral / Qwen2 layer with a fused attention (SDPA, FlashAttention: no
    [heads, length, length] matrix kept; cf. Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models"), checked against the saved tensors of a tiny Llama
    (tests/test_plan.py): q, k, v and the attention output, the MLP's gate, up and act(gate) in
    ``element`` bytes, each RMSNorm's float32 input, and the inputs of the linears that train.
    A frozen linear keeps no input; a LoRA one keeps its input once per group reading the same
    tensor (q/k/v, gate/up; o_proj reads the attention output), or, when it casts the input to
    its ``lora_bytes`` weights or drops it out, its own copy (+ the dropout mask: a bool on CUDA,
    ``mask_bytes`` 1; CPU keeps it in the input's dtype), and its r-wide hidden. Full fine-tuning
    keeps every linear's input and the norms' outputs (their weights train). The final norm adds
    its input once. With gradient checkpointing each layer keeps only its input and one layer is
    recomputed at a time. The frozen vision tower keeps nothing (no gradient flows through it).
    """
    text = model.config.get_text_config()
    h, i, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * (
        getattr(text, "head_dim", None) or h // text.num_attention_heads)
    per_token = element * (2 * h + 2 * kv + 3 * i) + 4 * 2 * h
    if not lora.enabled:  # every linear trains: the two norm outputs (for q/k/v, gate/up and the norms'
        per_token += element * (4 * h + i)  # weights, counted twice) and down_proj's input
    else:
        shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "o_proj": None}
        own_copy = lora.dropout > 0 or lora_bytes != element
        inputs, kept = set(), 0
        for name, m in model.named_modules():
            if not isinstance(m, LoraLayer) or policy_part(name) != "language_model":
                continue
            prefix, _, last = name.rpartition(".")
            group = shared.get(last, last)
            kept += lora.r * lora_bytes
            if own_copy:
                kept += m.in_features * (lora_bytes + (mask_bytes if lora.dropout > 0 else 0))
            elif group and (prefix, group) not in inputs:
                inputs.add((prefix, group))
                kept += m.in_features * element
        per_token += kept / layers
    layer = rows * length * per_token
    # the final norm's float32 input, and with full fine-tuning its output (lm_head's input)
    last = rows * length * (4 * h + (0 if lora.enabled else element * h))
    kept_all = last + (layers * rows * length * h * element + layer if checkpointing else layers * layer)
    vocab = model.get_output_embeddings().out_features
    return {"activations": kept_all, "logits": logits_bytes(rows * length, vocab)}


def logits_bytes(tokens: int, vocab: int) -> int:
    """Peak bytes of the loss's logits over ``tokens`` scored positions (an upper bound: every position)."""
    return LOGITS_COPIES * min(tokens * vocab * 4, LOGITS_CHUNK_MB * 2**20)


def memory_gb(states: dict[str, dict[str, float]], activations: dict[str, float] | None) -> dict[str, dict]:
    """{zero2, zero3}: {weights, gradients, optimizer, activations, logits, total} in GiB per GPU."""
    out = {}
    for stage, parts in states.items():
        row = {**parts, **(activations or {"activations": None, "logits": None})}
        row["total"] = sum(v for v in row.values() if v is not None)
        out[stage] = {k: None if v is None else round(v / GB, 3) for k, v in row.items()}
    return out


def largest_layer(model: torch.nn.Module) -> int:
    """DeepSpeed's largest layer (the most parameters one module holds itself), which ZeRO-3 gathers whole."""
    from deepspeed.runtime.zero.stage3 import model_to_params  # see model_state_bytes

    return model_to_params(model)[1]  # its total counts by data_ptr, which is 0 for every meta tensor


# ---------------------------------------------------------------- lengths


def length_stats(columns: dict[str, list[int]], max_length: int | None, unreadable: int) -> dict[str, Any]:
    """Median, p90 and max of each column of token counts; how many of the last exceed ``max_length``."""
    stats = {name: {"median": statistics.median(v), "p90": percentiles(v)["p90"], "max": max(v)}
             for name, v in columns.items()}
    last = list(columns.values())[-1]
    return {"available": True, "records": len(last), "unreadable_images": unreadable, "max_length": max_length,
            **stats, "over_max_length": sum(t > max_length for t in last) if max_length else 0}


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def load_processor(spec: PolicySpec) -> Any:
    """The checkpoint's processor, or None when the folder has none (a config.json-only folder)."""
    try:
        return AutoProcessor.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def measure(encoder: Any, items: list[tuple[Any, list, list[str]]], templates: Any) -> tuple[list[int], list[int]]:
    """(prompt tokens, prompt + longest answer tokens) of each (prompt parts, images, answers),
    counted as the token budget counts them (policy.budget), with every reference kept."""
    prompts, totals = [], []
    for parts, images, answers in items:
        n = fit_prompt(encoder, parts, templates, images, None, 0).note.prompt_tokens
        prompts.append(n)
        totals.append(n + answer_tokens(encoder, answers))
    return prompts, totals


def dpo_data(cfg: DpoConfig, limit: int) -> tuple[list[Any], int]:
    """(the pairs whose lengths are measured, the training pairs one epoch goes through)."""
    roots = image_search_path(cfg.image_root, cfg.image_roots) or None
    records = select_types(load_pairs(cfg.pairs, roots, "skip", []), cfg.pair_types)
    train, _ = split_heldout(records, cfg.heldout_fraction, cfg.heldout_seed)
    return train[: limit or None], len(train)


def readable(dataset: Any, item: Callable[[int, dict], Any]) -> tuple[list, int]:
    """``item(k, sample)`` of every sample whose images read; and how many did not."""
    items, bad = [], 0
    for k in range(len(dataset)):
        sample = dataset[k]
        if sample is None:
            bad += 1
        else:
            items.append(item(k, sample))
    return items, bad


def dpo_items(cfg: DpoConfig, records: list[Any], templates: Any) -> tuple[list, int]:
    """(parts, images, answers) of each pair whose images read; and how many did not."""
    def item(k: int, s: dict) -> tuple:
        images = [s["image"]] if s["rejected_image"] is s["image"] else [s["image"], s["rejected_image"]]
        return prompt_parts(records[k], templates), images, [records[k].chosen, records[k].rejected]

    roots = image_search_path(cfg.image_root, cfg.image_roots) or None
    return readable(PairDataset(records, roots, cfg.noise_seed), item)


def sft_data(cfg: SftConfig, limit: int) -> tuple[list[Any], int]:
    """(the training examples whose lengths are measured, the number one epoch goes through)."""
    examples = read_examples(training_sources(cfg.data), cfg.data, cfg.train.seed, skipped=[])
    train = [e for e in examples if keep(f"{e.domain}/{e.record.id}", cfg.data.val_fraction, cfg.train.seed, "val")]
    return train[: limit or None], len(train)


def sft_items(examples: list[Any]) -> tuple[list, int]:
    """(parts, image, answer) of each example whose image reads; and how many did not."""
    dataset = QueryDataset([e.record for e in examples], None, lambda im: im.convert("RGB"))
    return readable(dataset, lambda k, s: (examples[k].parts(), [s["image"]], [examples[k].answer]))


def steps_per_epoch(n: int, batch: int, accum: int, gpus: int) -> int:
    """Optimizer steps of one pass over ``n`` samples, counted as common.engine.train counts them."""
    return math.ceil(math.ceil(math.ceil(n / batch) / gpus) / accum)


# ---------------------------------------------------------------- the plans


def policy_plan(kind: str, cfg: DpoConfig | SftConfig, opts: PlanOptions) -> dict[str, Any]:
    """The plan of an SFT or DPO config (see the module docstring)."""
    model = meta_policy(cfg.policy)
    model = with_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    check_vision(model)
    parts = count_parts(model, policy_part)
    processor = load_processor(cfg.policy)
    tokenizer = getattr(processor, "tokenizer", processor)
    requested = cfg.max_length if kind == "dpo" else cfg.data.max_length
    max_length = budget_for(requested, model_limit(model.config, tokenizer))

    lengths, n_train = unavailable(f"{cfg.policy.path}: no processor (a config.json-only folder)"), None
    try:
        records, n_train = (dpo_data if kind == "dpo" else sft_data)(cfg, opts.limit)
    except (InputError, OSError) as e:
        lengths = unavailable(f"data: {e}")
    else:
        if processor is not None:
            templates = cfg.policy.templates()
            items, bad = dpo_items(cfg, records, templates) if kind == "dpo" else sft_items(records)
            if items:
                prompts, totals = measure(CpuEncoder(processor), items, templates)
                lengths = length_stats({"prompt": prompts, "sequence": totals}, max_length, bad)
            else:
                lengths = unavailable(f"none of the {len(records)} records' images could be read")
    if lengths["available"] and max_length and max_length < lengths["prompt"]["median"]:
        raise ConfigError(f"max_length {max_length} is below the median prompt ({lengths['prompt']['median']} tokens, "
                          f"p90 {lengths['prompt']['p90']}): most records would be refused; raise it")

    # DPO: chosen and rejected rows (mdpo: + the chosen answer under the corrupted image) in one forward
    # (an upper bound: a pair sharing its prompt takes one row for its two answers, shorter than two)
    rows = cfg.train.batch_size * (answers_per_pair(cfg.loss_type) if kind == "dpo" else 1)
    # the longest batch: the longest sequence of the data (fitted to max_length), else max_length itself
    measured = lengths["sequence"]["max"] if lengths["available"] else None
    length = min(x for x in (max_length, measured) if x) if max_length or measured else None
    element = 2 if cfg.policy.dtype in ("bfloat16", "float16") or cfg.train.mixed_precision != "no" else 4
    total = sum(p["total"] for p in parts.values())
    trainable = sum(p["trainable"] for p in parts.values())
    states = model_state_bytes(total, trainable, largest_layer(model), opts.gpus)
    # PEFT keeps LoRA weights in float32; under DeepSpeed the engine casts them to the model's dtype
    lora_bytes = element if cfg.train.deepspeed else 4
    acts = (activation_bytes(model, rows, length, cfg.train.gradient_checkpointing, cfg.lora, element, lora_bytes)
            if length else None)
    return {
        "kind": kind, "model": type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__,
        "total_params": total, "trainable_params": trainable, "parts": parts, "gpus": opts.gpus,
        "memory_gb": memory_gb(states, acts),
        "memory_assumptions": {"rows": rows, "length": length, "bytes_per_activation": element,
                               "gradient_checkpointing": cfg.train.gradient_checkpointing,
                               "not_counted": ["transient buffers of the backward (gradients of activations and "
                                               "logits)", "the vision tower's activations"
                                               + (" (it trains in this run)" if cfg.lora.train_vision else " (frozen)")]},
        "lengths": lengths,
        "steps_per_epoch": None if n_train is None else steps_per_epoch(
            n_train, cfg.train.batch_size, cfg.train.grad_accum, opts.gpus),
    }


def clip_plan(cfg: ClipTrainConfig, opts: PlanOptions) -> dict[str, Any]:
    """The plan of a CLIP config: every weight trains; lengths are the reports' tokens against the
    text tower's context (open_clip truncates beyond it). Activations are not estimated."""
    name, _ = resolve_model_config(cfg.clip)
    try:
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, device="meta", pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"clip.model {cfg.clip.model}: cannot build it: {str(e).splitlines()[0]}") from None
    parts = count_parts(model, clip_part)
    total = sum(p["total"] for p in parts.values())
    states = model_state_bytes(total, total, largest_layer(model), opts.gpus)
    context = tokenizer.context_length
    lengths: dict[str, Any] = {}
    steps: dict[str, int] = {}
    for domain in cfg.domains:
        try:
            records = [r for r, _ in cfg.data.records(domain, "retriever_train", [])]
        except (InputError, OSError) as e:
            lengths[domain] = unavailable(f"data: {e}")
            continue
        if not records:
            lengths[domain] = unavailable(f"no training records (missing: {cfg.data.missing(domain, 'retriever_train')})")
            continue
        # finetune_clip drops the last partial batch of each process (when there is more than one)
        steps[domain] = math.ceil(max(1, len(item_records(records)) // (cfg.batch_size * opts.gpus)) / cfg.grad_accum)
        texts = [r.text for r in records[: opts.limit or None]]
        n = [len(tokenizer.tokenizer(t)["input_ids"]) if hasattr(tokenizer, "tokenizer") else len(tokenizer.encode(t)) + 2
             for t in texts]
        lengths[domain] = length_stats({"text": n}, context, 0)
    return {"kind": "clip", "model": cfg.clip.model, "total_params": total, "trainable_params": total, "parts": parts,
            "gpus": opts.gpus, "memory_gb": memory_gb(states, None), "lengths": lengths, "steps_per_epoch": steps}


def make_plan(argv: list[str]) -> tuple[dict[str, Any], Path]:
    """(the plan, the folder it belongs in) for a command line."""
    if "-h" in argv or "--help" in argv:
        print(f"{__doc__}\nthe plan's options:\n{help_text(PlanOptions)}\n\nevery other --key is the training config's: "
              "python -m dpo.train_dpo --help, python -m policy.train_sft --help, python -m retriever.finetune_clip --help")
        raise SystemExit(0)
    own, rest = split_args(argv)
    opts = load_config(PlanOptions, own)
    if opts.gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {opts.gpus}")
    if not rest or rest[0].startswith("--"):
        raise ConfigError("give the training config first: plan.sh CONFIG.yaml [--key value ...]")
    kind = detect_kind(rest[0]) if opts.kind == "auto" else opts.kind
    cfg = load_config(KINDS[kind], rest)
    if kind == "clip":
        return clip_plan(cfg, opts), Path(opts.out or cfg.output_dir)
    return policy_plan(kind, cfg, opts), Path(opts.out or cfg.train.output_dir)


def describe(plan: dict[str, Any]) -> str:
    """The plan as a few lines for the console."""
    lines = [f"{plan['kind']} plan for {plan['model']} on {plan['gpus']} GPU(s)",
             f"parameters: {plan['total_params']:,} total, {plan['trainable_params']:,} trainable "
             f"({100 * plan['trainable_params'] / plan['total_params']:.2f}%)"]
    lines += [f"  {part:15s} {p['total']:>15,} total {p['trainable']:>15,} trainable" for part, p in plan["parts"].items()]
    for stage, m in plan["memory_gb"].items():
        lines.append(f"memory per GPU, {stage}: " + ", ".join(f"{k} {v} GB" for k, v in m.items() if v is not None))
    if "memory_assumptions" in plan:
        a = plan["memory_assumptions"]
        lines.append(f"  (activations at {a['rows']} rows x {a['length']} tokens, {a['bytes_per_activation']} bytes, "
                     f"gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'})")
    groups = plan["lengths"] if plan["kind"] == "clip" else {"": plan["lengths"]}
    for name, n in groups.items():
        head = f"lengths{' ' + name if name else ''}: "
        if not n["available"]:
            lines.append(head + "unavailable: " + n["reason"])
            continue
        columns = [f"{k} median {v['median']} p90 {v['p90']} max {v['max']}" for k, v in n.items() if isinstance(v, dict)]
        lines.append(head + f"{n['records']} records; " + "; ".join(columns) + f"; {n['over_max_length']} over "
                     f"max_length {n['max_length']}" + (f"; {n['unreadable_images']} unreadable" if n["unreadable_images"] else ""))
    lines.append(f"steps per epoch: {plan['steps_per_epoch']}")
    return "\n".join(lines)


def main() -> None:
    plan, out = make_plan(sys.argv[1:])
    print(describe(plan))
    atomic_write_json(out / "plan.json", plan)
    print(f"plan: {out / 'plan.json'}")


if __name__ == "__main__":
    cli_main(main)
