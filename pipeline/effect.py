"""The effect study: does RAG preference tuning do what the paper says, over whole re-runs, against
controls, and where in the toy world's settings?

    bash scripts/effect.sh [--seeds 0 1 2] [--out outputs/toy/effect] [--limit 50] [--roles test_vqa]
        [--controls NAME ...] [--control_seeds 0] [--map_knob report_miss] [--map_values 0.0 0.3 0.6]
        [--world_args "..."] [--policy_args "..."] [--clip_args "..."] [--retrieve_args "..."] [--jobs N]

Seeds. Each seed runs the whole chain (pipeline.demo up to train_dpo: world, base policy,
retrievers, pairs, DPO, every stage seeded with it) in its own folder, so the spread over seeds is
that of the whole method. The study's defaults put the toy nearest the paper's regime, as chosen
on val_vqa and then on dev_vqa over three seeds (docs/RESULTS.md, "Reports that miss findings, a
base that trusted its references", and sessions 28-31): the demo's world with 3.75 times its
alignment split (with the demo's 200 studies per domain there are too few pairs for DPO to learn
when to trust its references; 750, not 1,000, to keep the study within the hour), a prior study
of the same patient in the corpus for nine studies in ten, and corpus reports that leave three
present findings in ten unsaid (``--world_args "--alignment_studies 750 --prior_share 0.9
--report_miss 0.3"``): the references are informative but wrong where the image
shows what they miss; a base policy tuned with one reference per prompt, always right, so that it
trusts them (right 95 times in 100, DPO's gain on dev was smaller by 0.02-0.03), three in ten of
those prompts on a noised image (x_v*) under the same answer, so that it answers from them
whatever its image shows, as the paper's Med-LVLMs do (without, its accuracy on x_v* plus
references stayed 0.053 under its RAG accuracy on dev; with, 0.040), and only until it reads 0.72
of held-out questions without them (with the configs' 0.76 it reads about as well as the
references know, and on val_vqa retrieval no longer helped it) (``--policy_args "--reference_k 1
--p_correct 1.0 --train.stop_at 0.72 --data.noised_reference_rate 0.3"``);
retrievers trained for 3 epochs on that corpus, four times the demo's (``--clip_args "--epochs
3"``: their reference vote on retriever_val as good as with 5, at 40% less time); and retrieval
of one report by image (``--retrieve_args "--match image --k.k 1"``). It is long: a chain there
takes about 20 minutes of one core (base policy 8, DPO 4, pairs 2, retrievers 2, tower 2,
world 1; the map's chains take seed 0's tower), a control 1-4, so the default study (3 seeds,
2 more map chains, 4 controls) took 3,356 s on 2 cores, 56 minutes (session 34; a GPU machine, or
``--seeds 0 --controls --map_values`` for a first look). Runs with other options go to their own chains,
``<out>/chains/seed<N>_<options>``; seed 0 with every option empty (``--world_args ""
--policy_args "" --clip_args "" --retrieve_args ""``) is the demo's own chain, ``outputs/toy``.
Base and DPO are then evaluated (evaluation.evaluate: conditions no_rag, rag_fixed, noised_rag,
noise seed = the seed, ``--limit`` records per file of ``--roles``) into ``<out>/seed<N>/eval``.

Controls, on the first seed (``--control_seeds`` for others), differ from the main method
(configs/toy/dpo.yaml: all pairs in one mixed pass, chosen on dev over the paper's order) in one
thing each, on the same pairs, base policy, engine, LoRA, prompts and images: ``dpo_cm`` D_cm
alone, ``dpo_oa`` D_oa1 + D_oa2 alone, ``dpo_ordered`` the paper's order (each epoch D_cm first,
then D_oa), ``sft_chosen`` supervised tuning on the chosen answers (loss_type sft). Each trains
into ``<out>/seed<N>/controls/<name>/dpo`` and is evaluated alone, paired with its seed's base
on the same questions. One seed by default: a control costs as much as the chain's own DPO (in
the study's world about 5 minutes of a core), and four on every seed would double the study.

The effect map: one whole chain (seed 0) per value of a world knob (a toy.make_toy option), beside
the seeds' chains, evaluated like a seed into ``<out>/map/<knob>=<value>/eval``; a value that gives
seed 0's own world (the knob's default) is that seed's run, not a second copy of it. A knob of the
retriever corpus alone (toy.make_toy.CORPUS_KNOBS, report_miss among them) leaves every other file
as it is, so the map's chains start from seed 0's pretrained tower, the same bytes they would
pretrain, and start once seed 0's chain is built.

``--dpo_args`` (and a ``--dpo_config`` other than the default) retrain the main method into
``<out>/seed<N>/dpo`` with those options, on the chain's pairs; the controls get them too. That
compares DPO settings on ``--roles dev_vqa`` without touching test (dev_vqa, not val_vqa: the
retrievers keep the checkpoint that retrieves best for val_vqa's studies, which flatters every
chain's references there). ``--chains`` points a study at an earlier study's chains
(``<its out>/chains``: seeds and map points), which it reads and does not rebuild while their
stages are as they were: settings chosen on ``--roles dev_vqa`` are then tested on the very
chains they were chosen with, at the cost of evaluation alone (a stage's fingerprint holds its
paths, so a copy or a link under another name would rebuild them; the Python counts by its
version, not its path).

``--jobs N`` (default: one more than the cores) runs N independent runs at once (the chains of
seeds and map points, and a seed's controls once its chain is built), each a forked process with
its share of the cores (``OMP_NUM_THREADS`` = cores / N, at least 1, unless set) and its output in
``<folder>/effect.log``. The toy's runs are small and single-threaded ones use cores best; one
more run than cores keeps both cores busy to the end, where with one per core the fifth of five
equal chains runs alone beside an idle core. ``--jobs 1`` runs them in turn with their output on
the terminal.

The room for the effect (toy.room), on every seed and map point: how much the base would gain by
trusting its references exactly as much as they deserve, a per-domain logistic combiner of its
own image reading and the references' vote fitted on val_vqa, against its accuracy with them
(``<folder>/room.json``). Where the room is below the effect looked for, no tuning that teaches
trust can show it. Beside it, base and DPO accuracy with references where their vote is right and
where it is wrong (``by_reference``): a base that copies is right only where they are, and DPO can
gain where they are wrong only as far as the image tells it.

Writes ``<out>/effect.json``, ``effect.md`` (docs/DESIGN.md: the effect study) and
``effect_map.png``. A run whose results exist is not redone while its chain's stages are as they
were when they were made (their fingerprints, common.stages, kept in ``<eval>/study.json`` and
``room.json``): changed code, config or input of a stage redoes the stage and the results made
from it. Results made with other settings (world, limit, roles, options) stop the study: a changed
setting needs its own ``--out``. One study at a time writes an ``--out``: a second one stops at
once, naming the first (common.io.run_lock); studies with their own ``--out`` may read the same
``--chains`` side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from common.config import cli_main, load_config, to_dict
from common.io import atomic_write_json, atomic_write_text, run_lock
from common.stages import plan
from evaluation.effect import CONDITIONS, CONTROLS as MEANING, assemble, control_figures, markdown, run_figures
from evaluation.plots import plot_effect_map
from pipeline import demo
from pipeline.demo import run_module as _python
from toy.make_toy import CORPUS_KNOBS, SIZES, ToyConfig
from toy.room import by_reference, read_questions, room

DPO_CONFIG = Path("configs/toy/dpo.yaml")  # what the chain's train_dpo stage runs
# the study's default stage options: the paper's regime, chosen on validation questions (module docstring: why)
EFFECT_WORLD = "--alignment_studies 750 --prior_share 0.9 --report_miss 0.3"  # make_toy
EFFECT_POLICY = "--reference_k 1 --p_correct 1.0 --train.stop_at 0.72 --data.noised_reference_rate 0.3"  # make_toy_policy.sh
EFFECT_CLIP = "--epochs 3"  # finetune_clip.sh, on top of configs/toy/clip.yaml
EFFECT_RETRIEVAL = "--match image --k.k 1"  # retrieve.sh, on top of configs/toy/retrieve.yaml
CONTROLS = {  # train_dpo options on top of the main method's (their meaning: evaluation.effect.CONTROLS)
    "dpo_cm": ["--pair_types", "[cm]", "--stages", "[[cm]]"],
    "dpo_oa": ["--pair_types", "[oa1,oa2]", "--stages", "[[oa1,oa2]]"],
    "dpo_ordered": ["--stages", "[[cm],[oa1,oa2]]"],
    "sft_chosen": ["--loss_type", "sft", "--sft_weight", "0"],
}


@dataclass
class Study:
    """What every run of the study shares: configs, evaluated questions, extra stage options."""

    dpo_config: Path
    eval_config: str
    limit: int
    roles: list[str]
    dpo_args: list[str]
    eval_args: list[str]

    @property
    def retrain(self) -> bool:
        """Whether the main method is trained by the study rather than taken from the chain."""
        return bool(self.dpo_args) or self.dpo_config != DPO_CONFIG


@dataclass
class Run:
    """One whole chain and the study's outputs for it (a seed, or a point of the map)."""

    label: str
    seed: int
    chain: Path  # pipeline.demo's folder: world/, policy/, clip/, retrieval/, pairs/, dpo/
    world_args: list[str]
    folder: Path  # eval/, dpo/ (with --dpo_args), controls/<name>/{dpo,eval}/
    options: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # stage name -> its options (demo.stages)
    tower_from: Path | None = None  # the chain whose pretrained tower it starts from, rather than its own

    @property
    def tower(self) -> Path | None:
        return demo.tower_file(self.tower_from) if self.tower_from else None

    @property
    def eval_dir(self) -> Path:
        return self.folder / "eval"


def world_label(world_args: list[str]) -> str:
    """``--size tiny --subtle_share 0.5`` -> ``size=tiny_subtle_share=0.5``: a folder name."""
    parts, i = [], 0
    while i < len(world_args):
        key = world_args[i].removeprefix("--")
        if i + 1 < len(world_args) and not world_args[i + 1].startswith("--"):
            key, i = f"{key}={world_args[i + 1]}", i + 1
        parts.append(key.replace("/", "_"))
        i += 1
    return "_".join(parts)


def knob_value(text: str) -> float | str:
    """A map value as effect.json holds it: a number when it is one."""
    try:
        return float(text)
    except ValueError:
        return text


def is_demos(world_args: list[str], options: dict[str, list[str]]) -> bool:
    """Whether a seed-0 chain with these options is the demo's: its world, the configs' stages."""
    return same_world(world_args, []) and not options


def chain_folder(seed: int, world_args: list[str], options: dict[str, list[str]], chains: Path) -> Path:
    """A chain's folder: the demo's for seed 0 in its world with the configs' stages, else
    ``<chains>/seed<N>_<options>``, named by everything that builds it (world and stage options)."""
    if seed == 0 and is_demos(world_args, options):
        return demo.OUT
    label = world_label([*world_args, *(o for opts in options.values() for o in opts)])
    return chains / (f"seed{seed}_{label}" if label else f"seed{seed}")


def seed_runs(seeds: list[int], out: Path, world_args: list[str], options: dict[str, list[str]] | None = None,
              chains: Path | None = None) -> list[Run]:
    """One run per seed, its chain under ``chains`` (default ``<out>/chains``), its results in ``<out>/seed<N>``."""
    options, chains = dict(options or {}), chains or out / "chains"
    return [Run(f"seed {s}", s, chain_folder(s, world_args, options, chains), list(world_args),
                out / f"seed{s}", options) for s in seeds]


def with_knob(world_args: list[str], knob: str, value: str) -> list[str]:
    """The world options with ``--<knob> <value>``: in place of the knob's own value when it is there."""
    flag, args = f"--{knob}", list(world_args)
    if flag in args[:-1]:
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def same_world(a: list[str], b: list[str]) -> bool:
    """Whether two make_toy option lists give the same world (``--prior_share 0.0`` is the default,
    ``--alignment_studies 200`` the small size's own)."""

    def world(args: list[str]) -> dict[str, Any]:
        cfg = to_dict(load_config(ToyConfig, args))
        return {**cfg, "alignment_studies": cfg["alignment_studies"] or SIZES[cfg["size"]]["alignment"]}

    return world(a) == world(b)


def map_runs(knob: str, values: list[str], out: Path, world_args: list[str], seeds: list[Run] = (),
             options: dict[str, list[str]] | None = None, chains: Path | None = None) -> list[Run]:
    """One seed-0 chain per knob value, the study's world with ``--<knob> <value>``, beside the seeds'
    chains (so ``--chains`` serves a later study the whole map too); its results in ``<out>/map/<knob>=<value>``.
    A value whose world is a seed-0 run's takes that run rather than repeating its whole chain; a knob
    of the retriever corpus alone (toy.make_toy.CORPUS_KNOBS) leaves the images the tower is pretrained
    on as they are, so its points start from seed 0's tower rather than pretraining the same one again."""
    runs, options, chains = [], dict(options or {}), chains or out / "chains"
    seed0 = next((r for r in seeds if r.seed == 0 and r.options == options), None)
    tower_from = seed0.chain if seed0 and knob in CORPUS_KNOBS else None
    for v in values:
        args = with_knob(world_args, knob, v)
        same = seed0 if seed0 and same_world(seed0.world_args, args) else None
        runs.append(same or Run(f"{knob}={v}", 0, chain_folder(0, args, options, chains), args,
                                out / "map" / f"{knob}={v}", options, tower_from))
    return runs


def dpo_command(run: Run, study: Study, output_dir: Path, extra: list[str] = ()) -> list[str]:
    """train_dpo on the run's pairs and base policy, seeded like the chain's own DPO stage."""
    return ["dpo.train_dpo", str(study.dpo_config), *demo.stage_args("train_dpo", run.chain, run.seed),
            "--train.output_dir", str(output_dir), *study.dpo_args, *extra]


def eval_command(run: Run, study: Study, dpo_dir: Path, out: Path, policies: list[str]) -> list[str]:
    """evaluate on the run's retrieval with the study's roles, limit and conditions."""
    return ["evaluation.evaluate", study.eval_config, *demo.stage_args("evaluate", run.chain, run.seed),
            "--adapter", str(dpo_dir / "adapter"), "--dpo_dir", str(dpo_dir), "--out", str(out),
            "--policies", f"[{','.join(policies)}]", "--conditions", f"[{','.join(CONDITIONS)}]",
            "--limit", str(study.limit), "--roles", f"[{','.join(study.roles)}]", *study.eval_args]


@contextlib.contextmanager
def progress(what: str) -> Iterator[None]:
    print(f"[effect] {what} ...", flush=True)
    start = time.time()
    yield
    print(f"[effect] {what}: done in {time.time() - start:.0f} s", flush=True)


def chain_until(study: Study, control: str | None = None) -> str:
    """The last chain stage a run's results come from: its DPO, or its pairs when the study trains."""
    return "build_pairs" if control or study.retrain else "train_dpo"


ChainPlan = list[tuple[str, str, bool]]


def chain_plan(run: Run) -> ChainPlan:
    """(stage, fingerprint, would it run?) of the run's chain through its DPO, as things stand
    (common.stages.plan): one listing of the chain serves every ``chain_state`` taken from it."""
    steps = demo.stages(run.chain, run.seed, run.world_args, "train_dpo", run.options, run.tower)
    return [(s.name, fp, todo) for s, fp, todo in plan(steps)]


def chain_state(steps: ChainPlan, until: str) -> dict[str, str] | None:
    """The fingerprints of the chain's stages through ``until``, or None while one of them would
    run: results made from the chain stay its results while these are the same."""
    state = {}
    for name, fp, todo in steps:
        if todo:
            return None
        state[name] = fp
        if name == until:
            break
    return state


def run_main(run: Run, study: Study) -> None:
    """The run's chain (up to DPO) and its evaluation of base and DPO into ``run.eval_dir``."""
    with progress(f"{run.label}: chain {run.chain}"):
        demo.run_chain(run.chain, run.seed, run.world_args, until=chain_until(study), options=run.options,
                       tower=run.tower)
    dpo_dir = run.chain / "dpo"
    if study.retrain:
        dpo_dir = run.folder / "dpo"
        with progress(f"{run.label}: DPO with {shlex.join(study.dpo_args)} -> {dpo_dir}"):
            _python(*dpo_command(run, study, dpo_dir))
    with progress(f"{run.label}: evaluation -> {run.eval_dir}"):
        _python(*eval_command(run, study, dpo_dir, run.eval_dir, ["base", "dpo"]))


def run_control(run: Run, name: str, study: Study) -> None:
    """One control trained on the run's pairs and evaluated alone, into ``control_dir``."""
    folder = control_dir(run, name)
    with progress(f"{run.label} {name}: training and evaluation -> {folder}"):
        _python(*dpo_command(run, study, folder / "dpo", CONTROLS[name]))
        _python(*eval_command(run, study, folder / "dpo", folder / "eval", ["dpo"]))


def control_dir(run: Run, name: str) -> Path:
    return run.folder / "controls" / name


@dataclass
class Job:
    """One run of the study: ``fn(*args)`` writes ``eval_dir``; in a worker its output goes to ``log``.
    ``settings`` (what the results depend on) are kept beside them, in ``eval_dir/study.json``, with
    the state of the chain stages they come from (``run``'s through ``until``)."""

    label: str
    fn: Callable[..., None]
    args: tuple[Any, ...]
    eval_dir: Path
    log: Path
    settings: dict[str, Any]
    run: Run
    until: str


def settings(run: Run, study: Study, control: str | None = None) -> dict[str, Any]:
    """What a run's results depend on beyond the code: its chain and world, the study's options."""
    got = {"chain": str(run.chain), "seed": run.seed, "world_args": run.world_args,
           **{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(study).items()}}
    if run.options:
        got["stage_options"] = run.options
    return got | ({"control": CONTROLS[control]} if control else {})


def finished(job: Job, steps: ChainPlan) -> bool:
    """Whether the job's results exist, made with its settings from its chain as it stands; results
    made with other settings stop the study rather than being read as this one's (or silently
    replaced), results from a chain that changed since (``steps``: its plan) are redone."""
    if not (job.eval_dir / "results.json").is_file():
        return False
    path = job.eval_dir / "study.json"
    got = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    made_from = got.pop("stages", None)
    if got != job.settings:
        changed = sorted(k for k in {*got, *job.settings} if got.get(k) != job.settings.get(k))
        raise SystemExit(f"[effect] {job.eval_dir}: its results were made with other settings "
                         f"({', '.join(changed) if got else 'not recorded'}); give this study its own --out, "
                         "or remove that folder to redo it")
    if made_from is None or made_from != chain_state(steps, job.until):
        print(f"[effect] {job.label}: its chain {job.run.chain} is not as it was when its results were made, "
              "redone", flush=True)
        return False
    return True


def execute(job: Job) -> None:
    """Run the job, then record the settings its results were made with."""
    job.fn(*job.args)
    made_from = chain_state(chain_plan(job.run), job.until)
    atomic_write_json(job.eval_dir / "study.json", {**job.settings, "stages": made_from})


def _in_worker(job: Job, threads: int) -> tuple[str, float]:
    """One run in a forked worker: its output (and its stages') into its log, its share of cores."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (1, 2):  # the stages' subprocesses write there
        os.dup2(fd, stream)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # and so do this process's own lines
    if not os.environ.get("OMP_NUM_THREADS"):  # unset or empty: an empty one lets torch take every core
        os.environ["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    try:
        execute(job)
    except (Exception, SystemExit) as e:  # a SystemExit would end the worker and leave the pool waiting
        raise RuntimeError(f"{job.label} failed ({type(e).__name__}: {e}); its output: {job.log}") from None
    return job.label, time.time() - start


def run_jobs(jobs: list[Job], n: int) -> None:
    """The jobs whose results are not there yet: in turn (n = 1, output to the terminal), or n at a
    time in forked workers with one log each; the first job of a chain builds it, and the chain's
    other jobs (its controls) start once it is done, beside the other chains, as do the chains that
    start from its tower (the map's). The first failure stops the study, naming the run and its log."""
    todo, plans = [], {}
    for job in jobs:
        if job.run.chain not in plans:  # a chain's listing once, however many of its jobs are checked
            plans[job.run.chain] = chain_plan(job.run)
        if finished(job, plans[job.run.chain]):
            print(f"[effect] {job.label}: results exist, not redone ({job.eval_dir})", flush=True)
        else:
            todo.append(job)
    if n <= 1 or len(todo) <= 1:
        for job in todo:
            execute(job)
        return
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    for job in todo:
        print(f"[effect] {job.label}: queued ({n} at a time, {threads} thread(s) each), output in {job.log}", flush=True)
    # multiprocessing's Pool has no dependencies between tasks: the jobs are handed out here as they become ready
    builder: dict[Path, str] = {}  # chain -> label of its first job, which builds it
    for job in todo:
        builder.setdefault(job.run.chain, job.label)

    def waits_for(job: Job) -> set[str]:
        """The jobs that build what this one reads: its chain, and the chain whose tower it starts from."""
        return {builder[c] for c in (job.run.chain, job.run.tower_from) if c in builder} - {job.label}

    waiting, running = list(todo), {}
    with multiprocessing.get_context("fork").Pool(min(n, len(todo)), maxtasksperchild=1) as pool:
        while waiting or running:
            busy = {j.label for j in waiting} | running.keys()
            ready = [j for j in waiting if not waits_for(j) & busy]
            for job in ready[: n - len(running)]:
                waiting.remove(job)
                running[job.label] = pool.apply_async(_in_worker, (job, threads))
            done = [label for label, result in running.items() if result.ready()]
            if not done:
                time.sleep(0.2)
            for label in done:
                try:
                    _, seconds = running.pop(label).get()
                except RuntimeError as e:
                    raise SystemExit(f"[effect] {e}") from None
                print(f"[effect] {label}: done in {seconds:.0f} s", flush=True)


def run_room(run: Run, study: Study) -> dict[str, Any]:
    """The room for the effect on the run's base (toy.room) over the study's questions, kept in
    ``<folder>/room.json`` and measured again when the roles, the limit or the chain's policy or
    retrieval differ."""
    path = run.folder / "room.json"
    stages = chain_state(chain_plan(run), "retrieve")  # the base policy and its references
    if path.is_file():
        got = json.loads(path.read_text(encoding="utf-8"))
        if got.get("roles") == study.roles and got.get("limit") == study.limit and got.get("stages") == stages:
            return got
    with progress(f"{run.label}: room for the effect -> {path}"):
        got = {**room(run.chain, study.roles, study.limit), "limit": study.limit, "stages": stages}
    atomic_write_json(path, got)
    return got


def reference_split(run: Run, study: Study) -> dict[str, Any]:
    """The run's evaluated answers split by whether its references' vote is right (toy.room.by_reference):
    whether the base copies, and whether DPO gains by following right references or resisting wrong ones."""
    return by_reference(read_questions(run.chain, study.roles, study.limit), run.eval_dir / "predictions.jsonl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="whole-chain seeds (default 0 1 2)")
    ap.add_argument("--out", type=Path, default=Path("outputs/toy/effect"), help="output folder")
    ap.add_argument("--chains", type=Path, default=None,
                    help="folder of the chains, seeds' and map points' (default <out>/chains); an earlier study's, "
                         "to test on the chains of a validation study, or compare DPO settings (--dpo_args, "
                         "--roles dev_vqa) on them, without rebuilding them")
    ap.add_argument("--world_args", default=EFFECT_WORLD,
                    help=f'make_toy options of every chain, one string (default "{EFFECT_WORLD}": 3.75 times the '
                         'demo\'s alignment split, a prior of the same patient for most studies, reports that '
                         'miss findings; "" = the demo\'s world)')
    ap.add_argument("--policy_args", default=EFFECT_POLICY,
                    help=f'make_toy_policy.sh options of every chain, one string (default "{EFFECT_POLICY}": '
                         'the base is tuned with as many references as it will be given, nearly always right, '
                         'until it reads a little less well than they know; "" = the script\'s)')
    ap.add_argument("--clip_args", default=EFFECT_CLIP,
                    help=f'finetune_clip.sh options of every chain on top of configs/toy/clip.yaml, one string '
                         f'(default "{EFFECT_CLIP}": the corpus with priors is four times the demo\'s; "" = the config\'s)')
    ap.add_argument("--retrieve_args", default=EFFECT_RETRIEVAL,
                    help=f'retrieval options of every chain on top of configs/toy/retrieve.yaml, one string '
                         f'(default "{EFFECT_RETRIEVAL}": one report, by image; "" = the config\'s)')
    ap.add_argument("--dpo_config", type=Path, default=DPO_CONFIG,
                    help="DPO config of the controls (and of the main method when not the default)")
    ap.add_argument("--eval_config", default="configs/toy/evaluate.yaml", help="evaluation config")
    ap.add_argument("--limit", type=int, default=50, help="records per evaluated file (0 = all)")
    ap.add_argument("--roles", nargs="+", default=["test_vqa"],
                    help="index roles to evaluate (default test_vqa; dev_vqa to compare settings)")
    ap.add_argument("--dpo_args", default="", help='extra train_dpo options, one string: "--beta 0.5"; '
                                                   "retrains the main method under <out>/seed<N>/dpo")
    ap.add_argument("--eval_args", default="", help='extra evaluate options, one string: "--batch_size 8"')
    ap.add_argument("--controls", nargs="*", choices=list(CONTROLS), default=list(CONTROLS),
                    help="controls to run on each of --control_seeds (default all; none when given empty): "
                         + "; ".join(f"{name}: {MEANING[name]}" for name in CONTROLS))
    ap.add_argument("--control_seeds", type=int, nargs="+", default=None,
                    help="seeds whose chains get the controls (default: the first of --seeds); "
                         "each must be one of --seeds")
    ap.add_argument("--map_knob", default="report_miss", help="world knob of the effect map (a toy.make_toy option)")
    ap.add_argument("--map_values", nargs="*", default=["0.0", "0.3", "0.6"],
                    help="its values, one seed-0 chain each (default 0.0 0.3 0.6: how much the references "
                         "leave unsaid, from none to six present findings in ten; none when given empty)")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) + 1,
                    help="independent runs at once, each in its own process with its share of the cores "
                         "(default: one more than the cores; 1 runs them in turn with their output here)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: at least 1")
    args.control_seeds = args.control_seeds or args.seeds[:1]
    if not set(args.control_seeds) <= set(args.seeds):
        ap.error(f"--control_seeds {args.control_seeds}: each must be one of --seeds {args.seeds}")
    knobs = [f.name for f in dataclasses.fields(ToyConfig) if f.name not in ("out", "seed")]
    if args.map_values and args.map_knob not in knobs:
        ap.error(f"--map_knob {args.map_knob}: not a make_toy option; its options are {knobs}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with run_lock(args.out):  # one study per folder: a second one would redo and overwrite the first's runs
        run_study(args)


def run_study(args: argparse.Namespace) -> None:
    """Every run of the study (those whose results are not there yet), then its tables and map."""
    world_args = shlex.split(args.world_args)
    study = Study(args.dpo_config, args.eval_config, args.limit, args.roles, shlex.split(args.dpo_args),
                  shlex.split(args.eval_args))
    options = demo.stage_options(args.policy_args, args.retrieve_args, args.clip_args)
    seeds = seed_runs(args.seeds, args.out, world_args, options, args.chains)
    on_map = map_runs(args.map_knob, args.map_values, args.out, world_args, seeds, options, args.chains)
    mains = seeds + [r for r in on_map if r not in seeds]
    controlled = [r for r in seeds if r.seed in args.control_seeds]
    run_jobs([Job(r.label, run_main, (r, study), r.eval_dir, r.folder / "effect.log", settings(r, study),
                  r, chain_until(study)) for r in mains]
             + [Job(f"{r.label} {name}", run_control, (r, name, study), control_dir(r, name) / "eval",
                    control_dir(r, name) / "effect.log", settings(r, study, name), r, chain_until(study, name))
                for name in args.controls for r in controlled], args.jobs)
    rooms = {r.label: {**run_room(r, study), "by_reference": reference_split(r, study)} for r in mains}
    figures = {r.seed: {**run_figures(r.eval_dir), "room": rooms[r.label]} for r in seeds}
    controls = {name: {r.seed: control_figures(r.eval_dir, control_dir(r, name) / "eval") for r in controlled}
                for name in args.controls}
    points = [{"value": knob_value(v), **run_figures(r.eval_dir), "room": rooms[r.label]}
              for v, r in zip(args.map_values, on_map)]
    effect = assemble(figures, controls, args.map_knob if args.map_values else None, points)
    text = markdown(effect)
    atomic_write_json(args.out / "effect.json", effect)
    atomic_write_text(args.out / "effect.md", text)
    if "map" in effect:
        plot_effect_map(effect["map"], args.out / "effect_map.png")
    print(text)


if __name__ == "__main__":
    cli_main(main)
