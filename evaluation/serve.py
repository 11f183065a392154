"""The web demo: one image and question through the whole path, base and DPO side by side.

    bash scripts/serve.sh [CONFIG.yaml] [--port 7860] [--policy.path P --adapter A --clip_dir C]

One process (gradio): a person uploads an image or picks an example from the test files, asks a
question (or leaves it empty for a report) and sees the routed domain with F(x_v)'s confidence,
the retrieved reports with their scores and the k kept (the fixed or the adaptive rule), and the
base and DPO answers without retrieval, with it, and with the noised image x_v* and the same
references: the copy test, where an answer that does not change never looked at the image.
Examples are the test questions of ``retrieval_dir``; when ``eval_dir`` holds an evaluation,
those where DPO fixed a copied base answer come first (evaluation.gallery's filters). x_v* is made
as evaluation makes it (evaluation.evaluate.ImageSource over the same test files), so an example
shows the x_v* of its gallery card. The app binds to 127.0.0.1 unless ``--host`` says otherwise.

The models load once at start; a missing one stops there with exit code 2 and one line naming
the script that makes it. In the page, a bad image or question gives a one-line message, never a
traceback.
"""

from __future__ import annotations

import hashlib
import html
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from common.config import ConfigError, cli_main, doc, load_config
from common.io import InputError, read_jsonl
from data.answers import yes_no
from data.datasets import first_image
from data.images import BadImageError, load_image, resolve_image
from data.noise import NoiseConfig
from evaluation.evaluate import TEST_ROLES, EvalConfig, EvalFile, ImageSource, eval_files, judge_vqa
from evaluation.gallery import POLICY_NAMES, TABLE_CSS, Case, answers_table, group_cases, references_list
from evaluation.infer import AnswerConfig, load_answerer, load_retriever, pick_adapter, retrieve
from policy.budget import BudgetLog, PromptParts, fit_prompt
from policy.prompts import own_options
from retriever.select_k import KRule

EXAMPLES_PER_FILE = 50  # test records per file looked at for examples
K_MODES = ("adaptive", "fixed")
CSS = TABLE_CSS + ("#shown-image img,#noised img{min-height:180px !important;object-fit:contain;image-rendering:pixelated}"
                   ".error{color:#c62828}")


@dataclass
class ServeConfig(AnswerConfig):
    host: str = doc("127.0.0.1", "address the app binds to; 0.0.0.0 opens it to the network")
    port: int = doc(7860, "port the app listens on")
    retrieval_dir: str = doc("outputs/toy/retrieval", "retrieval output whose test files give the examples and each "
                                                      "domain's images for x_v* (empty: no examples, no copy test)")
    eval_dir: str = doc("outputs/toy/eval", "evaluation output: its cases where DPO fixed a copied base answer are "
                                            "offered first as examples (if its predictions.jsonl exists)")
    examples: int = doc(8, "example cases offered")
    noise: NoiseConfig = doc(NoiseConfig(), "x_v* of the copy test, made as evaluation makes it")


@dataclass
class Models:
    """What the app loaded at start."""

    retriever: Any
    policies: dict[str, Any]  # "base", and "dpo" when there is an adapter
    header: str  # which policy and adapter, and why
    images: ImageSource | None  # each domain's images for x_v*
    budget: BudgetLog
    templates: Any


@dataclass
class Reply:
    """One answered request."""

    domain: str
    confidence: dict[str, float]
    rule: KRule
    hits: list[Any]
    case: Case  # the answers as evaluation's prediction rows, so the gallery's marks and copy test apply
    noised: Image.Image | None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- loading


def load_models(cfg: ServeConfig, files: list[EvalFile]) -> Models:
    """The retriever, the base policy and (if there is an adapter) the DPO one, and x_v*'s image pool
    (the images of the test ``files``)."""
    retriever = load_retriever(cfg)
    base, _ = load_answerer(replace(cfg, adapter="none"))
    policies = {"base": base}
    adapter, _ = pick_adapter(cfg)
    header = f"policy {cfg.policy.path}; no DPO adapter ({'--adapter none' if cfg.adapter == 'none' else 'none found'})"
    if adapter:
        policies["dpo"], header = load_answerer(cfg)
    images = ImageSource(files, EvalConfig(noise=cfg.noise)) if files else None
    return Models(retriever, policies, header, images, BudgetLog.of(base, cfg.max_length),
                  cfg.policy.templates())


def query_files(cfg: ServeConfig) -> list[EvalFile]:
    """The test files of ``retrieval_dir`` (none when it is empty or has no index)."""
    if not cfg.retrieval_dir or not (Path(cfg.retrieval_dir) / "index.json").is_file():
        return []
    return eval_files(EvalConfig(retrieval_dir=cfg.retrieval_dir, roles=list(TEST_ROLES)))


def read_cases(eval_dir: str) -> list[Case]:
    """The evaluated cases of ``eval_dir`` (none without a predictions.jsonl)."""
    path = Path(eval_dir) / "predictions.jsonl"
    return group_cases(read_jsonl(path)) if eval_dir and path.is_file() else []


def pick_examples(files: list[EvalFile], cases: list[Case], n: int) -> list[tuple[EvalFile, int, bool]]:
    """``n`` test questions (file, record index, DPO fixed a copied base answer there): those first,
    then those DPO fixed, then the rest, taking turns between files."""
    flags = {(c.file, c.index): c.flags() for c in cases}

    def rank(item: tuple[int, EvalFile, int]) -> tuple[int, int, int]:
        pos, f, i = item
        got = flags.get((f.name, i), {})
        return (0 if got.get("fixed") and got.get("copied-base") else 1 if got.get("fixed") else 2, i, pos)

    pool = [(pos, f, i) for pos, f in enumerate(files) if f.task == "vqa"
            for i in range(min(len(f.records), EXAMPLES_PER_FILE))]
    picked = sorted(pool, key=rank)[:n]
    return [(f, i, rank((pos, f, i))[0] == 0) for pos, f, i in picked]


def example_rows(files: list[EvalFile], cases: list[Case], cfg: ServeConfig) -> tuple[list[list[str]], list[str]]:
    """gr.Examples rows [image path, question (with its own options under ``option_text``), gold answer,
    image name] and their labels."""
    rows, labels = [], []
    for f, i, star in pick_examples(files, cases, cfg.examples):
        r = f.records[i]
        rel = first_image(r)
        options = own_options(r.meta.get("text"), r.question, cfg.option_text)
        question = f"{r.question} {options}" if options else r.question
        rows.append([str(resolve_image(rel, r.image_root, f.image_root)), question, r.answer, rel])
        labels.append(f"{'★ ' if star else ''}{r.meta.get('domain') or f.domain}: {r.question}")
    return rows, labels


# ---------------------------------------------------------------- answering


def upload_name(image: Image.Image) -> str:
    """A name for an uploaded image's x_v* draw: its pixels' hash, so the same image gets the same x_v*."""
    return "upload-" + hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:16]


def k_rule(cfg: ServeConfig, mode: str, k: int) -> KRule:
    """The rule a request asked for: ``cfg.k`` (or the gap rule) when adaptive, else the top ``k``."""
    if mode == "fixed":
        return KRule(rule="fixed", k=k)
    return replace(cfg.k if cfg.k.rule != "fixed" else KRule(rule="gap"), k=k)


def ask(models: Models, cfg: ServeConfig, image: Image.Image, name: str, question: str | None,
        gold: str | None, rule: KRule) -> Reply:
    """Route, retrieve, then every policy answers without references, with them, and with x_v* and them."""
    confidence = models.retriever.route_confidence([image])[0]
    domain = max(confidence, key=confidence.get)
    hits = retrieve(models.retriever, [image], [domain], rule)[0]
    refs = tuple(h.text for h in hits)
    task = "vqa" if question else "report"
    rag = "rag_fixed" if rule.rule == "fixed" else "rag_adaptive"
    notes, noised = [], None
    if models.images is None:
        notes.append("copy test skipped: no test images to draw x_v* from (--retrieval_dir)")
    else:
        try:
            noised = models.images.noised(name, image, domain)
        except BadImageError as e:
            notes.append(f"copy test skipped: {e}")
    jobs = [("no_rag", image, ()), (rag, image, refs)] + ([("noised_rag", noised, refs)] if noised else [])
    max_new = cfg.max_new_tokens_vqa if task == "vqa" else cfg.max_new_tokens_report
    rows = []
    for policy_name, policy in models.policies.items():
        fitted = []
        for condition, img, kept in jobs:
            fit = fit_prompt(policy, PromptParts(domain, task, question, kept), models.templates, [img],
                             models.budget.max_length, max_new)
            if fit.refused:
                notes.append(f"{policy_name}, {condition}: not run, {fit.refused}")
            else:
                fitted.append((condition, img, fit))
        answers = policy.generate([img for _, img, _ in fitted], [fit.prompt for _, _, fit in fitted],
                                  max_new_tokens=max_new, batch_size=cfg.batch_size)
        for (condition, _, fit), answer in zip(fitted, answers):
            row = {"policy": policy_name, "condition": condition, "file": "request", "index": 0, "task": task,
                   "prediction": answer, "answer": gold or "", "k": len(fit.references)}
            if task == "vqa":
                row.update(judge_vqa(answer, gold) if gold else {"pred_label": yes_no(answer), "correct": None})
            rows.append(row)
    return Reply(domain, confidence, rule, hits, group_cases(rows)[0], noised, notes)


# ---------------------------------------------------------------- the page


def _e(text: Any) -> str:
    return html.escape(str(text))


def rule_text(rule: KRule) -> str:
    if rule.rule == "fixed":
        return f"fixed: the top {rule.k}"
    if rule.rule == "gap":
        return f"adaptive (gap rule, cut where log(s_i/s_i+1) > {rule.gamma}), at most {rule.k}"
    return f"adaptive (ratio rule, s_1/s_i < {rule.ratio_threshold}), at most {rule.k}"


def copy_line(case: Case, policy: str, rag: str) -> str:
    """What the copy test shows for one policy."""
    if (policy, "noised_rag") not in case.rows:
        return ""
    same = case.copied(policy, rag)
    verdict = ("cannot tell: an answer without a yes or no" if same is None
               else "unchanged: this answer does not depend on the image (copied)" if same
               else "changed: this answer depends on the image")
    return f"<li><b>{_e(POLICY_NAMES[policy])}</b> with x_v* and the same references: {verdict}</li>"


def render(reply: Reply, header: str) -> str:
    """The result panel as HTML (every text escaped)."""
    conf = ", ".join(f"{d} {p:.2f}" for d, p in sorted(reply.confidence.items(), key=lambda x: -x[1]))
    rag = "rag_fixed" if reply.rule.rule == "fixed" else "rag_adaptive"
    policies = [p for p in ("base", "dpo") if (p, "no_rag") in reply.case.rows]
    conditions = [c for c in ("no_rag", rag, "noised_rag") if any(c == k[1] for k in reply.case.rows)]
    cells = {(p, c): (row["prediction"], reply.case.right(p, c), f"k={row['k']}" if c != "no_rag" else "")
             for (p, c), row in reply.case.rows.items()}
    gold = reply.case.first["answer"]
    parts = [
        f"<div id='answer-panel'><p class='meta'>{_e(header)}</p>",
        f"<p><b>Domain</b>: <span id='domain'>{_e(reply.domain)}</span> (F(x_v): {_e(conf)})</p>",
        f"<p><b>Retrieved</b>: k = <span id='k'>{len(reply.hits)}</span>, {_e(rule_text(reply.rule))}</p>",
        references_list([h.text for h in reply.hits], [h.score for h in reply.hits]),
        f"<p><b>Gold</b>: {_e(gold)}</p>" if gold else "<p class='meta'>No gold answer: an uploaded image.</p>",
        answers_table(cells, policies, conditions),
        f"<ul class='copy'>{''.join(copy_line(reply.case, p, rag) for p in policies)}</ul>",
    ]
    parts += [f"<p class='note'>{_e(n)}</p>" for n in reply.notes]
    return "".join(parts) + "</div>"


def message(text: str, kind: str = "error") -> str:
    return f"<div id='answer-panel'><p class='{kind}'>{_e(text)}</p></div>"


def not_an_image(e: BadImageError) -> str:
    return message(f"{Path(e.path).name} is not an image the models can read ({e.reason})")


def respond(models: Models, cfg: ServeConfig, image_path: str | None, question: str, gold: str, name: str,
            mode: str, k: float) -> tuple[str, Image.Image | None]:
    """The click handler: (result HTML, x_v*); a bad input or any failure is a one-line message."""
    if not image_path:
        return message("Upload an image or pick an example first."), None
    try:
        image = load_image(image_path)
        reply = ask(models, cfg, image, name or upload_name(image), (question or "").strip() or None,
                    (gold or "").strip() or None, k_rule(cfg, mode, int(k)))
        return render(reply, models.header), reply.noised
    except BadImageError as e:
        return not_an_image(e), None
    except (InputError, ConfigError) as e:
        return message(str(e)), None
    except Exception as e:  # the page shows one line; the traceback goes to the server's log
        traceback.print_exc()
        return message(f"Internal error ({type(e).__name__}: {e}); the server log has the details."), None


def preview(image_path: str | None) -> tuple[Image.Image | None, str]:
    """The picked image for the page, or a one-line message when it is not one."""
    if not image_path:
        return None, message("No image yet: upload one or pick an example.", "meta")
    try:
        return load_image(image_path), message("Ask a question, or leave it empty for a report.", "meta")
    except BadImageError as e:
        return None, not_an_image(e)


def build_app(models: Models, cfg: ServeConfig, examples: tuple[list[list[str]], list[str]]) -> Any:
    """The gradio Blocks app."""
    try:
        import gradio as gr
    except ImportError:
        raise ConfigError("gradio is not installed in this environment: run `bash scripts/setup.sh --serve` "
                          "(scripts/serve.sh does)") from None

    with gr.Blocks(title="medrag-dpo", analytics_enabled=False) as app:
        gr.Markdown("# medrag-dpo: domain-aware RAG and RAG preference tuning\nUpload an image or pick an "
                    "example, ask a yes/no question (empty: a report), and compare the base and the DPO policy "
                    "without retrieval, with it, and with a noised image and the same references (the copy test).")
        with gr.Row():
            with gr.Column(scale=2):
                # a File, not an Image: gradio's Image decodes uploads itself and shows its own traceback-like
                # error for a file that is not an image; here every file reaches load_image (one-line message)
                image = gr.File(label="image x_v: upload", file_types=["image"], type="filepath", elem_id="image")
                shown = gr.Image(label="image x_v", interactive=False, height=220, elem_id="shown-image")
                question = gr.Textbox(label="question (empty: write a report)", elem_id="question")
                with gr.Row():
                    mode = gr.Radio(list(K_MODES), value="adaptive" if cfg.k.rule != "fixed" else "fixed",
                                    label="k rule", elem_id="k-mode")
                    k = gr.Slider(1, 10, value=cfg.k.k, step=1, label="k (fixed) or at most k (adaptive)")
                gold = gr.Textbox(label="gold answer (examples only)", interactive=False, elem_id="gold")
                name = gr.Textbox(visible=False)
                run = gr.Button("Ask", variant="primary", elem_id="ask")
                if examples[0]:
                    gr.Examples(examples=examples[0], inputs=[image, question, gold, name], example_labels=examples[1],
                                label="test questions (★: DPO fixed a copied base answer in evaluation)")
            with gr.Column(scale=3):
                result = gr.HTML(message("No question asked yet.", "meta"), elem_id="result")
                noised = gr.Image(label="x_v*: the noised image of the copy test", interactive=False, height=200,
                                  elem_id="noised")
        image.upload(lambda: ("", ""), outputs=[gold, name])
        image.change(preview, inputs=image, outputs=[shown, result])
        run.click(lambda *a: respond(models, cfg, *a), inputs=[image, question, gold, name, mode, k],
                  outputs=[result, noised])
    return app


def main() -> None:
    cfg = load_config(ServeConfig, description=__doc__)
    files = query_files(cfg)
    models = load_models(cfg, files)
    print(models.header)
    examples = example_rows(files, read_cases(cfg.eval_dir), cfg)
    roots = sorted({str(Path(row[0]).parent.resolve()) for row in examples[0]})
    app = build_app(models, cfg, examples)
    try:
        app.launch(server_name=cfg.host, server_port=cfg.port, allowed_paths=roots, show_error=True,
                   css=CSS, footer_links=[])
    except OSError as e:  # gradio's "Cannot find empty port": the port is taken or the address not ours
        raise ConfigError(f"cannot serve on {cfg.host}:{cfg.port} (the port is taken or the address is not this "
                          f"machine's: {str(e).split('.')[0]}): pass another --port or --host") from None


if __name__ == "__main__":
    cli_main(main)
