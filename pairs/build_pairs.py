"""Stage 2: build the preference pairs D_pt = D_cm + D_oa1 + D_oa2 (docs/DESIGN.md).

The released MMed-RAG code never shipped this step, so it is written here from the paper and
the released data. For every alignment record (retrieval JSONL, docs/DESIGN.md contract 2) the policy
answers three times, in batches:

    a = M(x_v,  (x_t, x_r))   real image, with the retrieved reports
    b = M(x_v*, (x_t, x_r))   noised image, with the retrieved reports
    c = M(x_v,  x_t)          real image, no retrieval

and ``pairs.rules`` turns the three answers into pairs. x_v* is stored as a PNG under
``OUT/noised/`` and named in the pair (``rejected_image``), so training sees exactly the pixels
the policy saw. Outputs in ``OUT`` (default ``outputs/toy/pairs``):

- ``pairs.json``: preference JSON (contract 3), validated by ``python -m data.validate``;
- ``pairs_stats.json``: pair counts per type x domain x task, accuracy under a/b/c, copy rate,
  over-reliance rate, skipped records, ``budget`` (what fitting the prompts cut or refused);
- ``generations.jsonl``: every record's three answers and the references a and b saw, for audit.

Prompts are fitted to ``max_length`` with ``max_new_tokens`` after them (policy.budget): references are
dropped from the last one or the last kept one shortened, the same for a and b (fitted with both
images); a record whose prompt cannot fit is skipped (reason ``too_long``). A pair's prompt holds the
references its answers were generated with, and names them (``question``, ``references``) so that
training can shorten it further without guessing where the references are.

Resumable: answers are appended per batch of records and a rerun answers only the missing
records (a half-written last line is dropped). Batches are fixed by record position, never by
what is left, so a resumed or multi-process run gives the same bytes as one uninterrupted run.
Several processes split the batches (``torchrun --nproc_per_node N -m pairs.build_pairs`` or
``accelerate launch -m pairs.build_pairs``); each appends to its own shard and rank 0 merges.

    bash scripts/build_pairs.sh [CONFIG.yaml] [--key value ...]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from PIL import Image
from tqdm import tqdm

from common.config import ConfigError, cli_main, doc, load_config, save_config, to_dict
from common.io import InputError, atomic_path, atomic_write_json, atomic_write_jsonl, run_lock, write_path
from data.images import BadImageError, Roots, load_image, pick_root, resolve_image
from data.noise import NoiseConfig, make_x_v_star as x_v_star
from data.readers import bad_records_summary, detect_kind, read_index, read_records
from data.records import VqaRecord
from pairs.rules import CmRule, Pair, copy_rate, over_reliance_rate, pairs_for_record
from policy.adapters import load_with_adapters
from policy.answers import is_correct
from policy.budget import BudgetLog, Note, PromptParts, budget_for, checkpoint_limit, describe, fit_prompt
from policy.policy import PolicySpec
from policy.prompts import OPTION_TEXT_HELP, PromptTemplates, own_options

PAIR_TYPES = ("cm", "oa1", "oa2")
CONDITIONS = ("a", "b", "c")
GENERATIONS = "generations.jsonl"
SETTINGS = "generation_settings.json"


@dataclass
class PairsConfig:
    policy: PolicySpec = doc(PolicySpec(), "the policy that answers: checkpoint, adapter merged into it, dtype, prompts")
    device: str = doc("cpu", "cpu | cuda (under torchrun/accelerate each process takes its own GPU)")
    threads: int = doc(0, "torch CPU threads per process (0: torch's default); 1 is much faster for a tiny "
                          "policy on shared cores")
    retrieval_index: str = doc("outputs/toy/retrieval/index.json", "index.json of retrieve.sh (used when `inputs` is empty)")
    roles: list[str] = doc(["alignment_vqa", "alignment_report"], "index entries (by role) to build pairs from")
    inputs: list[str] = doc([], "retrieval JSONL files to use instead of the index")
    image_root: str = doc("", "image folder ({domain} is filled in) for records whose own image_root is absent here; "
                          "default: the index entry's")
    domain: str = doc("", "domain of every record; default: the index entry's, else the record's routed `domain`")
    option_text: bool = doc(False, OPTION_TEXT_HELP)
    out: str = doc("outputs/toy/pairs", "output folder")
    noise: NoiseConfig = doc(NoiseConfig(), "the noised image x_v*")
    cm_rule: CmRule = doc("copy", "D_cm rule: copy (a and b right) | wrong (a right, b wrong) | both")
    report_metric: Literal["rouge_l", "bleu"] = doc("rouge_l", "text metric that decides a report's correctness")
    report_threshold: float = doc(0.5, "a report is right when its metric reaches this")
    batch_size: int = doc(16, "records per batch: one generation batch of 2 x batch_size prompts with "
                                "references, one of batch_size without; answers are saved per batch")
    group_by_length: bool = doc(True, "batch records of similar prompt length together (less padding); the answers "
                                      "and outputs stay in record order; false = batches by record position")
    max_new_tokens_vqa: int = doc(16, "answer length limit for VQA")
    max_new_tokens_report: int = doc(96, "answer length limit for reports")
    max_length: int = doc(0, "token budget of prompt (image tokens included) + max_new_tokens; references are dropped or "
                             "shortened to fit, a record that cannot fit is skipped (0 = the model's own limit)")
    limit: int = doc(0, "use only the first N records of each input file (0: all)")
    bad_image: Literal["skip", "error"] = doc("skip", "an unreadable image: skip the record (counted in "
                                              "pairs_stats.json) or stop with its path")
    bad_record: Literal["skip", "error"] = doc("skip", "an input record that cannot be used: skip it (named in "
                                               "pairs_stats.json) or stop")
    overwrite: bool = doc(False, "discard earlier generations made with other settings instead of refusing")
    progress: bool = doc(True, "tqdm progress bar")


@dataclass
class Item:
    """One alignment record to answer, with what the prompt and the rules need."""

    key: str  # unique over the run: task/domain/id
    id: str
    task: str  # "vqa" | "report"
    domain: str
    question: str | None  # None: the template's report instruction
    truth: str
    references: list[str]
    image: str  # first view, as written
    record_root: str | None
    default_root: Roots  # one folder or several, looked in turn (data.images.pick_root)
    source: str
    file: int  # position of the input file (batches never span files)
    error: str = ""  # the retriever could not serve this record (its `retrieve_error`)
    options: str | None = None  # the record's own option text, when option_text is on

    def image_path(self) -> Path:
        return resolve_image(self.image, self.record_root, self.default_root).absolute()

    def root_and_image(self) -> tuple[str, str]:
        """(absolute image folder, image path relative to it): the written path when a root is known."""
        root = pick_root(self.record_root, self.default_root, self.image)
        if root is None:
            path = str(self.image_path())
            return os.path.dirname(path), os.path.basename(path)
        return os.path.abspath(root), os.path.relpath(self.image_path(), os.path.abspath(root))


# ---------------------------------------------------------------- inputs


@dataclass
class Input:
    path: str
    domain: str | None
    image_root: str | None


def find_inputs(cfg: PairsConfig) -> list[Input]:
    """The retrieval JSONL files: ``inputs`` as given, else the index entries of ``roles``."""
    if cfg.inputs:
        return [Input(p, cfg.domain or None, None) for p in cfg.inputs]
    return [Input(str(e["path"]), cfg.domain or e.get("domain"), e.get("image_root"))
            for e in read_index(cfg.retrieval_index, cfg.roles)]


def read_items(inputs: list[Input], cfg: PairsConfig, skipped: list[str] | None = None) -> list[Item]:
    """Every usable record of every input, in order (bad records go to ``skipped``); a record
    without retrieval fields is an InputError."""
    items: list[Item] = []
    seen: Counter[str] = Counter()
    for n, inp in enumerate(inputs):
        kind = detect_kind(inp.path)
        if kind not in ("vqa", "report"):
            raise InputError(f"{inp.path}: expected VQA or report retrieval records, got {kind} records")
        records = read_records(inp.path, kind=kind, bad_record=cfg.bad_record, skipped=skipped)
        for rec in records[: cfg.limit or None]:
            refs = rec.meta.get("reference_reports")
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise InputError(f"{rec.source}: no `reference_reports` list: not a retrieval JSONL "
                                 "(make one with scripts/retrieve.sh)")
            error = str(rec.meta.get("retrieve_error") or "")
            domain = inp.domain or rec.meta.get("domain") or ("unknown" if error else None)
            if not isinstance(domain, str):
                raise InputError(f"{rec.source}: no `domain`; set --domain or use the retrieval index")
            image = rec.images[0] if rec.images else getattr(rec, "npz", None)
            if not image:
                raise InputError(f"{rec.source}: no image")
            task = "vqa" if isinstance(rec, VqaRecord) else "report"
            question = rec.question if isinstance(rec, VqaRecord) else None
            key = f"{task}/{domain}/{rec.id}"
            seen[key] += 1
            if seen[key] > 1:
                key = f"{key}#{seen[key]}"
            root = cfg.image_root.format(domain=domain) if cfg.image_root else inp.image_root
            items.append(Item(
                key=key, id=rec.id, task=task, domain=domain, question=question,
                options=own_options(rec.meta.get("text"), question, cfg.option_text),
                truth=rec.answer if isinstance(rec, VqaRecord) else rec.text,
                references=refs, image=image, record_root=rec.image_root, default_root=root,
                source=rec.source, file=n, error=error,
            ))
    return items


def prompt_chars(item: Item) -> int:
    """Characters of a record's question and references: the sort key of length-grouped batches,
    standing in for tokens (the image's tokens are the same for every record)."""
    return len(item.question or "") + sum(len(r) for r in item.references)


def batches(items: list[Item], size: int, by_length: bool = False) -> list[list[Item]]:
    """Fixed batches within each file: the same whatever was done before. By position, or with
    ``by_length`` of consecutive records in the file's order by prompt length (a stable sort, so a
    resumed or multi-process run forms the same batches)."""
    files: dict[int, list[Item]] = {}
    for it in items:
        files.setdefault(it.file, []).append(it)
    out: list[list[Item]] = []
    for group in files.values():
        if by_length:
            group = sorted(group, key=prompt_chars)
        out += [group[s:s + size] for s in range(0, len(group), size)]
    return out


# ---------------------------------------------------------------- the noised image x_v*


def noised_name(item: Item) -> str:
    """Where x_v* of an image is stored, relative to OUT: one file per (domain, image)."""
    digest = hashlib.sha256(f"{item.domain}|{item.image}".encode()).hexdigest()[:20]
    return f"noised/{item.domain}/{digest}.png"


def other_candidates(items: list[Item]) -> dict[str, dict[str, Item]]:
    """Per domain: image (as written) -> a record showing it; the pool x_v* draws from."""
    pool: dict[str, dict[str, Item]] = {}
    for it in items:
        pool.setdefault(it.domain, {}).setdefault(it.image, it)
    return pool


def make_x_v_star(item: Item, image: Image.Image, noise: NoiseConfig, pool: dict[str, Item],
                  load: Callable[[Item], Image.Image]) -> Image.Image:
    """x_v* for ``item`` (data.noise.make_x_v_star on its image name and its domain's pool)."""
    return x_v_star(item.image, image, noise, pool, load, domain=item.domain)


# ---------------------------------------------------------------- generation


def answer_batch(policy: Any, batch: list[Item], cfg: PairsConfig, templates: PromptTemplates,
                 pool: dict[str, dict[str, Item]], out: Path, max_length: int | None) -> list[dict[str, Any]]:
    """Generation rows for one batch: the three answers, or why the record was skipped. A row's
    ``budget`` holds the notes of fitting the prompt with references (a, b) and the one without (c)."""
    cache: dict[str, Image.Image] = {}

    def load(it: Item) -> Image.Image:
        path = str(it.image_path())
        if path not in cache:
            cache[path] = load_image(path)
        return cache[path]

    rows: dict[str, dict[str, Any]] = {}
    written: set[str] = set()
    answered: list[Item] = []
    with_refs: tuple[list, list] = ([], [])  # (images, prompts) of a and b, interleaved
    without: tuple[list, list] = ([], [])  # of c
    max_new = cfg.max_new_tokens_vqa if batch[0].task == "vqa" else cfg.max_new_tokens_report
    for it in batch:
        if it.error:
            rows[it.key] = {"key": it.key, "skipped": {"path": it.image, "reason": "retrieval_failed", "detail": it.error}}
            continue
        try:
            real = load(it)
            noised = make_x_v_star(it, real, cfg.noise, pool[it.domain], load)
        except BadImageError as e:
            if cfg.bad_image == "error":
                raise
            rows[it.key] = {"key": it.key, "skipped": {"path": e.path, "reason": e.reason, "detail": e.detail}}
            continue
        parts = PromptParts(it.domain, it.task, it.question, tuple(it.references), options=it.options)
        ab = fit_prompt(policy, parts, templates, [real, noised], max_length, max_new)
        c = fit_prompt(policy, PromptParts(it.domain, it.task, it.question, options=it.options), templates, [real], max_length, max_new)
        notes = {"ab": ab.note._asdict(), "c": c.note._asdict()}
        if ab.refused or c.refused:
            rows[it.key] = {"key": it.key, "budget": notes,
                            "skipped": {"path": it.image, "reason": "too_long", "detail": ab.refused or c.refused}}
            continue
        name = noised_name(it)
        if name not in written:  # rewritten on every run: a stored x_v* is never stale
            with atomic_path(out / name) as tmp:
                noised.save(tmp, format="PNG")
            written.add(name)
        rows[it.key] = {"key": it.key, "id": it.id, "task": it.task, "domain": it.domain,
                        "rejected_image": name, "reference": it.truth, "references": list(ab.references),
                        "budget": notes}
        answered.append(it)
        with_refs[0].extend([real, noised])
        with_refs[1].extend([ab.prompt, ab.prompt])
        without[0].append(real)
        without[1].append(c.prompt)
    if answered:
        # Two generation calls, each one batch: prompts with references are several times longer
        # than those without, and padding one to the other would waste most of the compute.
        ab = policy.generate(*with_refs, max_new_tokens=max_new, batch_size=len(with_refs[1]))
        c = policy.generate(*without, max_new_tokens=max_new, batch_size=len(without[1]))
        for i, it in enumerate(answered):
            rows[it.key].update(a=ab[2 * i], b=ab[2 * i + 1], c=c[i])
    return [rows[it.key] for it in batch]


def shard_path(out: Path, rank: int) -> Path:
    return out / (GENERATIONS if rank == 0 else f"generations.rank{rank}.jsonl")


def shard_paths(out: Path) -> list[Path]:
    return [p for p in [out / GENERATIONS, *sorted(out.glob("generations.rank*.jsonl"))] if p.is_file()]


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Rows of a generations file; a half-written last line (a killed run) is ignored."""
    rows = []
    lines = path.read_bytes().split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if n == len(lines):  # no newline after it: the write was cut off
                break
            raise InputError(f"{path}:{n}: not valid JSON (delete the file to start over)") from None
    return rows


def cut_partial_line(path: Path) -> None:
    """Truncate ``path`` after its last newline, so appending starts on a fresh line."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "rb+") as f:
            f.truncate(keep)


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append and force to disk: what is written survives a kill."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def settings_of(cfg: PairsConfig, inputs: list[Input]) -> dict[str, Any]:
    """What the answers depend on; earlier answers are reused only if these match. The policy is
    named by flat keys (its adapter as ``adapter``), so answers already written stay reusable."""
    keys = ("noise", "max_new_tokens_vqa", "max_new_tokens_report", "max_length", "limit", "image_root", "domain")
    plain = to_dict(cfg)
    spec = cfg.policy
    policy = {"policy": spec.path, "adapter": spec.init_adapter, "dtype": spec.dtype, "prompts": str(spec.prompts_file()),
              "policy_weights": weights_listing(spec.path), "adapter_weights": weights_listing(spec.init_adapter)}
    settings = {**policy, **{k: plain[k] for k in keys}, "inputs": [os.path.abspath(i.path) for i in inputs]}
    if cfg.option_text:  # only when on: answers made before the option existed stay reusable
        settings["option_text"] = True
    return settings


def weights_listing(path: str) -> list[list[Any]]:
    """Name, size and mtime of a local model folder's weight files, so that a policy retrained into
    the same folder does not reuse the answers of the one before (a hub id lists nothing)."""
    root = Path(path) if path else None
    if root is None or not root.is_dir():
        return []
    return [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(root.rglob("*")) if f.suffix in (".safetensors", ".bin")]


def settings_differ(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """True if ``out`` holds answers made with other settings; InputError unless ``overwrite``.

    Every process checks (before any of them writes), so a refusal stops them all.
    """
    path = out / SETTINGS
    if not path.is_file() or json.loads(path.read_text()) == settings:
        return False
    if not overwrite:
        raise InputError(f"{path}: {out} holds answers made with other settings; use --overwrite true or another --out")
    return True


def prepare_out(out: Path, settings: dict[str, Any], discard: bool) -> None:
    """Main process, before anyone appends: drop or keep earlier answers, cut partial lines."""
    if discard:
        for p in shard_paths(out):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SETTINGS, settings)
    for p in shard_paths(out):
        cut_partial_line(p)


# ---------------------------------------------------------------- pairs and stats


def correct_fn(task: str, cfg: PairsConfig) -> Callable[[str, str], bool]:
    """The rules' "== y": yes/no matching for VQA, the text-metric threshold for reports."""
    return lambda pred, ref: is_correct(pred, ref, task, cfg.report_threshold, cfg.report_metric)


def pair_record(it: Item, pair: Pair, references: list[str], templates: PromptTemplates, out: Path) -> dict[str, Any]:
    """One preference record (contract 3) whose prompt holds ``references`` (those the answers were
    generated with) and names them with its ``question``. The image keeps its root; for a noised
    rejected side ``image_root`` becomes the deepest folder holding both the real image and the
    stored x_v*, because readers resolve ``rejected_image`` against the record's one root. The root is
    written by ``common.io.write_path``: relative to pairs.json inside the outputs tree, so the tree
    can be moved (data.readers resolves it against the file), absolute elsewhere."""
    refs = references if pair.with_retrieval else []
    human = {"from": "human", "value": "<image>\n" + templates.text(it.domain, it.task, it.question, refs, it.options)}
    root, image = it.root_and_image()
    rejected_image = None
    if pair.rejected_noised:
        real, noised = os.path.join(root, image), str((out / noised_name(it)).absolute())
        root = os.path.commonpath([root, os.path.dirname(noised)])
        image, rejected_image = os.path.relpath(real, root), os.path.relpath(noised, root)
    rec: dict[str, Any] = {
        "id": f"{it.key}/{pair.pair_type}",
        "image": image,
        "image_root": write_path(root, out),
        "conversations": [human, {"from": "gpt", "value": pair.chosen}],
        "rejected_conversations": [human, {"from": "gpt", "value": pair.rejected}],
        "rejected_noised": int(pair.rejected_noised),
        "pair_type": pair.pair_type,
        "domain": it.domain,
        "task": it.task,
        "question": it.question,
        "references": refs,
    }
    if it.options:
        rec["options"] = it.options
    if rejected_image:
        rec["rejected_image"] = rejected_image
    return rec


def condition_stats(ok: dict[str, list[bool]]) -> dict[str, float | int]:
    return {
        "n": len(ok["a"]),
        **{f"accuracy_{c}": sum(ok[c]) / len(ok[c]) if ok[c] else 0.0 for c in CONDITIONS},
        "copy_rate": copy_rate(ok["b"]),
        "over_reliance_rate": over_reliance_rate(ok["c"], ok["a"]),
    }


def build_pairs(items: list[Item], gens: dict[str, dict[str, Any]], cfg: PairsConfig,
                templates: PromptTemplates, out: Path, budget: BudgetLog) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs (in record order) and the stats, from every record's generation row; the rows' budget
    notes are recorded in ``budget``, whose summary is the stats' ``budget``."""
    pairs: list[dict[str, Any]] = []
    counts: dict[str, Counter[str]] = {}
    ok: dict[str, dict[str, list[bool]]] = {}
    skipped: list[dict[str, str]] = []
    dropped = 0
    for it in items:
        row = gens[it.key]
        group = f"{it.domain}/{it.task}"
        counts.setdefault(group, Counter({t: 0 for t in PAIR_TYPES}))
        for prompt, note in row.get("budget", {}).items():
            budget.record(f"{it.key}/{prompt}", Note(**note))
        if "skipped" in row:
            skipped.append({"key": it.key, "source": it.source, **row["skipped"]})
            continue
        correct = correct_fn(it.task, cfg)
        for g in (group, f"all/{it.task}"):
            cond = ok.setdefault(g, {c: [] for c in CONDITIONS})
            for c in CONDITIONS:
                cond[c].append(correct(row[c], it.truth))
        for pair in pairs_for_record(it.truth, row["a"], row["b"], row["c"], correct, cfg.cm_rule):
            if not (pair.chosen.strip() and pair.rejected.strip()):
                dropped += 1  # the preference format needs text on both sides
                continue
            pairs.append(pair_record(it, pair, row["references"], templates, out))
            counts[group][pair.pair_type] += 1
    by_type = Counter(p["pair_type"] for p in pairs)
    stats = {
        "records": len(items),
        "answered": len(items) - len(skipped),
        "pairs": len(pairs),
        "pairs_by_type": {t: by_type[t] for t in PAIR_TYPES},
        "pairs_by_domain_task": {g: dict(c) for g, c in sorted(counts.items())},
        "dropped_empty_answer": dropped,
        "conditions": {g: condition_stats(v) for g, v in sorted(ok.items())},
        "skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "skipped_records": skipped,
        "budget": budget.summary(),
        "cm_rule": cfg.cm_rule,
        "report_metric": cfg.report_metric,
        "report_threshold": cfg.report_threshold,
        "noise": to_dict(cfg.noise),
    }
    return pairs, stats


def merge(items: list[Item], out: Path) -> dict[str, dict[str, Any]]:
    """All shards into one generations.jsonl in record order (atomic); the shards then go."""
    gens: dict[str, dict[str, Any]] = {}
    for p in shard_paths(out):
        for row in read_generations(p):
            gens.setdefault(row["key"], row)
    missing = [it.key for it in items if it.key not in gens]
    if missing:
        raise RuntimeError(f"{len(missing)} records have no answers (first: {missing[0]}); rerun to finish")
    atomic_write_jsonl(out / GENERATIONS, (gens[it.key] for it in items))
    for p in shard_paths(out):
        if p.name != GENERATIONS:
            p.unlink()
    return gens


def summary(stats: dict[str, Any], out: Path) -> str:
    lines = [f"pairs: {stats['pairs']} {stats['pairs_by_type']} from {stats['answered']} of "
             f"{stats['records']} records -> {out / 'pairs.json'}"]
    for g, c in stats["pairs_by_domain_task"].items():
        cond = stats["conditions"].get(g, {})
        acc = " ".join(f"{k[-1]}={cond[k]:.2f}" for k in ("accuracy_a", "accuracy_b", "accuracy_c") if k in cond)
        lines.append(f"  {g:22s} {dict(c)}  accuracy {acc}")
    if stats["skipped"]:
        named = ", ".join(f"{s['path']} ({s['reason']})" for s in stats["skipped_records"][:10])
        more = f" and {stats['skipped'] - 10} more" if stats["skipped"] > 10 else ""
        lines.append(f"skipped {stats['skipped']} records (bad image, failed retrieval or too long): {named}{more}")
    lines.append(describe(stats["budget"]))
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def run(cfg: PairsConfig) -> dict[str, Any] | None:
    """Generate what is missing (this process's share of the batches), then merge on rank 0."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    templates = cfg.policy.templates()
    inputs = find_inputs(cfg)
    bad_records: list[str] = []
    items = read_items(inputs, cfg, bad_records)
    if not items:
        raise InputError(f"{', '.join(i.path for i in inputs)}: no records")
    limit = checkpoint_limit(cfg.policy.path, cfg.policy.trust_remote_code)
    max_length = budget_for(cfg.max_length, limit)
    settings = settings_of(cfg, inputs)
    discard = settings_differ(out, settings, cfg.overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        prepare_out(out, settings, discard)
    state.wait_for_everyone()
    done = {row["key"] for p in shard_paths(out) for row in read_generations(p)}
    todo = [b for b in batches(items, cfg.batch_size, cfg.group_by_length) if any(it.key not in done for it in b)]
    mine = todo[state.process_index :: state.num_processes]
    if mine:
        device = str(state.device) if cfg.device != "cpu" else "cpu"
        policy = load_with_adapters(cfg.policy, device=device)
        pool = other_candidates(items)
        shard = shard_path(out, state.process_index)
        counts: Counter[str] = Counter()
        bar = tqdm(mine, desc="pairs", unit="batch", disable=not (cfg.progress and state.is_main_process))
        for batch in bar:
            rows = answer_batch(policy, batch, cfg, templates, pool, out, max_length)
            append_rows(shard, (r for it, r in zip(batch, rows) if it.key not in done))
            for it, row in zip(batch, rows):
                if "skipped" in row:
                    counts["skipped"] += 1
                    continue
                found = pairs_for_record(it.truth, row["a"], row["b"], row["c"], correct_fn(it.task, cfg), cfg.cm_rule)
                counts.update(p.pair_type for p in found)
            bar.set_postfix({k: counts[k] for k in (*PAIR_TYPES, "skipped")})
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    gens = merge(items, out)
    pairs, stats = build_pairs(items, gens, cfg, templates, out, BudgetLog(max_length, limit))
    stats["bad_records"] = bad_records_summary(bad_records)
    atomic_write_json(out / "pairs.json", pairs)
    atomic_write_json(out / "pairs_stats.json", stats)
    save_config(cfg, out / "run_config.yaml")
    from common.metrics import MetricsLogger

    logger = MetricsLogger(out)
    logger.log({"pairs": stats["pairs"], **{f"pairs_{t}": n for t, n in stats["pairs_by_type"].items()},
                **{f"{g}/{k}": v for g, c in stats["conditions"].items() for k, v in c.items()}}, step=0)
    logger.close()
    print(summary(stats, out))
    return stats


def main() -> None:
    cfg = load_config(PairsConfig, description=__doc__)
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    with run_lock(cfg.out):
        run(cfg)


if __name__ == "__main__":
    cli_main(main)
