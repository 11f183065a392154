"""The case gallery: evaluation's predictions as one self-contained HTML page a person reads.

People judge a medical VLM by looking at cases. One card per evaluated record: the image and its
noised x_v*, the question (or report task) and the gold answer, the retrieved references with
their scores, and every policy x condition answer marked right or wrong. Images are inlined as
data URIs and the CSS and script are inline, so ``gallery.html`` opens from disk in any browser
with no network. Filters (they combine: a card shows when it passes every active one):

- **DPO fixed it**: base wrong and DPO right under ``rag_fixed``;
- **DPO broke it**: base right and DPO wrong under ``rag_fixed``;
- **copied (base)** / **copied (DPO)**: that policy says the same under ``noised_rag`` as under
  ``rag_fixed`` (the same yes or no for a question, an answer without one never counts; ROUGE-L >=
  COPY_ROUGE between the two reports): with the image replaced and the references kept, its answer
  did not change. One case can agree by chance (x_v* may show the same finding); many cannot.

Right and wrong are evaluation's: the yes/no label for yes/no questions (``correct`` in
predictions.jsonl); for reports ROUGE-L >= REPORT_THRESHOLD against the gold report (the pair
builder's rule, policy.answers.is_correct). A question whose gold answer is not yes/no is not judged.
HTML is written here by hand: no library renders this page; every text is html.escape'd.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from PIL import Image

from policy.answers import is_correct, rouge_l

REPORT_THRESHOLD = 0.5  # a report is right at ROUGE-L >= this (pairs' report_threshold default)
COPY_ROUGE = 0.9  # two reports "say the same" at ROUGE-L >= this
THUMB = 160  # longest side of an inlined image, pixels
POLICY_NAMES = {"base": "base", "dpo": "DPO"}
CONDITION_NAMES = {"no_rag": "no retrieval", "rag_fixed": "RAG, fixed k", "rag_adaptive": "RAG, adaptive k",
                   "noised_rag": "noised image + same refs"}
FILTERS = (  # (data attribute, button label, definition shown in the page)
    ("fixed", "DPO fixed it", "base wrong, DPO right under RAG with fixed k"),
    ("broke", "DPO broke it", "base right, DPO wrong under RAG with fixed k"),
    ("copied-base", "copied (base)", "the base answer did not change when the image was replaced by x_v* "
                                     "(same references): the same yes or no, or reports with ROUGE-L >= 0.9 "
                                     "between them; one case can agree by chance (x_v* may show the same finding)"),
    ("copied-dpo", "copied (DPO)", "the same for the DPO policy"),
)


@dataclass
class CaseMedia:
    """What predictions.jsonl does not hold about a case: its pixels and its references."""

    image: Image.Image
    noised: Image.Image | None
    references: list[str]
    scores: list[float]


@dataclass
class Case:
    """One evaluated record with every policy x condition prediction row of it."""

    file: str
    index: int
    rows: dict[tuple[str, str], dict[str, Any]]

    @property
    def first(self) -> dict[str, Any]:
        return next(iter(self.rows.values()))

    def right(self, policy: str, condition: str) -> bool | None:
        """Whether that answer is right; None when it was not run or cannot be judged."""
        row = self.rows.get((policy, condition))
        if row is None or not row["answer"]:
            return None
        if row["task"] == "vqa":
            return row.get("correct")
        return is_correct(row["prediction"], row["answer"], "report", REPORT_THRESHOLD)

    def copied(self, policy: str, rag: str = "rag_fixed") -> bool | None:
        """The answer under noised_rag says the same as under ``rag`` (None if either is missing)."""
        rag_row, noised = self.rows.get((policy, rag)), self.rows.get((policy, "noised_rag"))
        if rag_row is None or noised is None:
            return None
        if rag_row["task"] == "vqa":
            labels = (rag_row.get("pred_label"), noised.get("pred_label"))
            return labels[0] == labels[1] if set(labels) <= {"yes", "no"} else None
        return rouge_l(noised["prediction"], rag_row["prediction"]) >= COPY_ROUGE

    def flags(self) -> dict[str, bool]:
        """The filters this case passes (FILTERS' attributes)."""
        base, dpo = self.right("base", "rag_fixed"), self.right("dpo", "rag_fixed")
        return {"fixed": base is False and dpo is True, "broke": base is True and dpo is False,
                "copied-base": self.copied("base") is True, "copied-dpo": self.copied("dpo") is True}


def group_cases(predictions: Iterable[dict[str, Any]]) -> list[Case]:
    """Prediction rows grouped per record (file, index), in evaluation order."""
    cases: dict[tuple[str, int], Case] = {}
    for p in predictions:
        key = (p["file"], p["index"])
        cases.setdefault(key, Case(p["file"], p["index"], {})).rows[(p["policy"], p["condition"])] = p
    return list(cases.values())


def counts(cases: list[Case]) -> dict[str, int]:
    """How many cases pass each filter, and a DPO fix of a copied base answer (``fixed+copied-base``)."""
    out: dict[str, int] = defaultdict(int)
    for case in cases:
        flags = case.flags()
        for name, on in flags.items():
            out[name] += on
        out["fixed+copied-base"] += flags["fixed"] and flags["copied-base"]
    return dict(out)


def data_uri(image: Image.Image, side: int = THUMB) -> str:
    """A small JPEG of ``image`` as a data URI."""
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text))


def _mark(right: bool | None) -> tuple[str, str]:
    """(CSS class, symbol) of a judged answer."""
    return {True: ("right", "✓"), False: ("wrong", "✗"), None: ("unjudged", "·")}[right]


def answers_table(cells: dict[tuple[str, str], tuple[str, bool | None, str]], policies: list[str],
                  conditions: list[str]) -> str:
    """A policy x condition table; each cell (answer, right or None, note such as "k=5")."""
    head = "".join(f"<th>{_e(CONDITION_NAMES.get(c, c))}</th>" for c in conditions)
    body = []
    for p in policies:
        tds = []
        for c in conditions:
            if (p, c) not in cells:
                tds.append("<td class='unjudged'>–</td>")
                continue
            answer, right, note = cells[(p, c)]
            cls, sym = _mark(right)
            tds.append(f"<td class='{cls}'><span class='mark'>{sym}</span> {_e(answer)}"
                       f"{f' <small>{_e(note)}</small>' if note else ''}</td>")
        body.append(f"<tr><th>{_e(POLICY_NAMES.get(p, p))}</th>{''.join(tds)}</tr>")
    return f"<table class='answers'><tr><th></th>{head}</tr>{''.join(body)}</table>"


def references_list(references: list[str], scores: list[float]) -> str:
    """The retrieved reports, best first, with their cosine scores."""
    items = "".join(f"<li><span class='score'>{scores[i]:.3f}</span> {_e(r)}</li>" if i < len(scores)
                    else f"<li>{_e(r)}</li>" for i, r in enumerate(references))
    return f"<ol class='refs'>{items}</ol>" if references else "<p class='refs'>no references</p>"


def card(case: Case, media: CaseMedia | None, policies: list[str], conditions: list[str]) -> str:
    """One case's card (an <article> carrying its filter flags as data attributes)."""
    first = case.first
    flags = case.flags()
    attrs = " ".join(f"data-{k}='{int(v)}'" for k, v in flags.items())
    cells = {}
    for (p, c), row in case.rows.items():
        cells[(p, c)] = (row["prediction"], case.right(p, c), f"k={row['k']}" if c != "no_rag" else "")
    figures = ""
    if media is not None:
        figures = f"<figure><img alt='image' src='{data_uri(media.image)}'><figcaption>x_v</figcaption></figure>"
        if media.noised is not None:
            figures += (f"<figure><img alt='noised image' src='{data_uri(media.noised)}'>"
                        "<figcaption>x_v* (noised)</figcaption></figure>")
    ks = ", ".join(f"{kind} k={case.rows[(p, c)]['k']}" for p in policies[:1]
                   for c, kind in (("rag_fixed", "fixed"), ("rag_adaptive", "adaptive")) if (p, c) in case.rows)
    refs = references_list(media.references, media.scores) if media is not None else ""
    task = f"Q: {_e(first['question'])}" if first["task"] == "vqa" else "Write the report."
    badges = "".join(f"<span class='badge'>{_e(label)}</span>" for key, label, _ in FILTERS if flags[key])
    return (f"<article class='card' {attrs}><div class='media'>{figures}</div><div class='body'>"
            f"<h3>{_e(case.file)} #{case.index} <small>{_e(first['domain'])} · {_e(first['id'])}</small> {badges}</h3>"
            f"<p class='q'>{task}</p><p class='gold'>Gold: {_e(first['answer'])}</p>"
            f"<details><summary>references ({_e(ks)})</summary>{refs}</details>"
            f"{answers_table(cells, policies, conditions)}</div></article>")


TABLE_CSS = """
table.answers{border-collapse:collapse;width:100%;font-size:.85rem}
.answers td,.answers th{border:1px solid #e3e3e3;padding:4px 6px;vertical-align:top;text-align:left}
td.right{background:#eaf7ea}td.wrong{background:#fbeaea}.mark{font-weight:bold}
td.right .mark{color:#1a7f37}td.wrong .mark{color:#c62828}.refs{font-size:.8rem}.score{color:#666;font-family:monospace}
"""  # the answers table and references, also used by the web demo (evaluation.serve)

CSS = TABLE_CSS + """
body{font-family:system-ui,sans-serif;margin:1rem 2rem;color:#1f2733;background:#f7f7f5}
.card{display:flex;gap:1rem;background:#fff;border:1px solid #ddd;border-radius:8px;padding:.8rem;margin:.8rem 0}
.card[hidden]{display:none}.media figure{margin:0 0 .4rem}.media img{width:128px;image-rendering:pixelated}
figcaption{font-size:.75rem;color:#666}.body{flex:1;min-width:0}h3{margin:.1rem 0 .4rem;font-size:1rem}
.badge{font-size:.7rem;background:#eef;border-radius:4px;padding:1px 5px;margin-left:4px}
.filters button{margin:0 .3rem .3rem 0;padding:.3rem .7rem;border:1px solid #888;border-radius:14px;background:#fff;cursor:pointer}
.filters button.on{background:#1f2733;color:#fff}dl.defs{font-size:.85rem}dl.defs dt{font-weight:bold}
"""

SCRIPT = """
const buttons = document.querySelectorAll('.filters button');
function apply() {
  const on = [...buttons].filter(b => b.classList.contains('on')).map(b => b.dataset.filter);
  let shown = 0;
  for (const card of document.querySelectorAll('article.card')) {
    const keep = on.every(f => card.dataset[f.replace(/-(\\w)/g, (_, c) => c.toUpperCase())] === '1');
    card.hidden = !keep;
    shown += keep;
  }
  document.getElementById('shown').textContent = shown;
}
buttons.forEach(b => b.addEventListener('click', () => { b.classList.toggle('on'); apply(); }));
apply();
"""


def gallery_html(predictions: list[dict[str, Any]], media: Callable[[str, int], CaseMedia | None],
                 title: str = "Evaluation cases", max_cases: int = 0) -> str:
    """The whole page: a header with the filter definitions and counts, then one card per case
    (the first ``max_cases`` in evaluation order; 0 = all)."""
    cases = group_cases(predictions)
    total = len(cases)
    shown = cases[:max_cases] if max_cases > 0 else cases
    policies = [p for p in POLICY_NAMES if any(p == r["policy"] for r in predictions)]
    conditions = [c for c in CONDITION_NAMES if any(c == r["condition"] for r in predictions)]
    n = counts(shown)
    buttons = "".join(f"<button data-filter='{key}' title='{_e(why)}'>{_e(label)} ({n.get(key, 0)})</button>"
                      for key, label, why in FILTERS)
    defs = "".join(f"<dt>{_e(label)}</dt><dd>{_e(why)}</dd>" for _, label, why in FILTERS)
    cards = "\n".join(card(c, media(c.file, c.index), policies, conditions) for c in shown)
    cut = f" (the first {len(shown)} of {total})" if len(shown) < total else ""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p><span id='shown'>{len(shown)}</span> of {len(shown)} cases shown{_e(cut)}. "
            f"✓ right, ✗ wrong (yes/no label; reports: ROUGE-L ≥ {REPORT_THRESHOLD} against the gold report), "
            "· not judged. Filters combine; click again to turn one off.</p>"
            f"<div class='filters'>{buttons}</div><dl class='defs'>{defs}</dl>"
            f"<main>{cards}</main><script>{SCRIPT}</script></body></html>\n")
