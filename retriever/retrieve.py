"""Retrieval: F(x_v) routes each query image to a domain; that domain's CLIP searches its corpus.

    bash scripts/retrieve.sh [CONFIG.yaml] [--key value ...]     # = python -m retriever.retrieve

For every query record of the configured files (default: the toy world's test and alignment VQA
and report files) the output JSONL (docs/DESIGN.md contract 2) carries every query field plus
``reference_reports`` (best first), ``retrieve_k``, ``domain`` (routed), ``reference_ids`` and
``reference_scores``; a record whose image cannot be read gets empty lists and
``retrieve_error``. Files go to ``<output_dir>/<file domain>_<file stem>.jsonl``, listed in
``index.json`` (``path``, ``source``, ``domain``, ``role``, ``kind``, ``image_root``) for later stages, with ``retrieval_metrics.json``
(routing accuracy; R@1/5/10 of the query's own report and of a report with the same findings).
Paths in ``index.json`` are relative to its folder where they lie in the same outputs tree
(common.io.write_path), so the outputs folder can be moved; ``data.readers.read_index`` reads them.

Query paths are relative to ``data.data_root`` (the release's ``data/`` folder), or to
``sources_dir`` for the alignment queries that ``python -m pairs.release_sources`` makes from the
release's preference files (those are finished pairs, not queries). A query or corpus file that is
absent is warned about (one line) and listed under ``missing`` in ``retrieval_metrics.json``; a
domain without a corpus file is skipped; only a run left with nothing stops (exit 2).

A domain's corpus is its ``retriever_train`` reports. ``match: text`` (the paper's) scores the
query image against each report's text embedding, identical texts collapsed; ``match: image``
scores it against the image of each report's study (one entry per study; an unreadable corpus
image leaves its study out, counted in ``retrieval_metrics.json``), so a patient's prior study in
the archive is found by its anatomy, which its report does not describe. Corpus embeddings are
cached in ``<cache_dir>/corpus-<key>.safetensors``, the key hashing the retriever's weights, the
match and every text (and image path), so a rerun reuses them and a retrained model or changed
corpus does not.
Queries and corpus are encoded in shards across processes when launched with several
(``accelerate launch`` / ``torchrun``); the main process searches and writes.

Python API (the inference CLI's)::

    from retriever.retrieve import Retriever
    from retriever.select_k import KRule
    r = Retriever.load("outputs/toy/clip")          # each domain's CLIP, F(x_v), corpora (lazily)
    r.route(images)                                  # PIL images -> ["radiology", ...]
    hits = r.search(images, domain=None, k_rule=KRule(rule="gap", k=5))  # routed if domain is None
    hits[0][0].id, hits[0][0].text, hits[0][0].score
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import torch
from tqdm import tqdm

from common.config import ConfigError, cli_main, doc, load_config, save_config, to_dict
from common.io import InputError, atomic_path, atomic_write_json, read_path, run_lock, write_path
from data.answers import yes_no
from data.datasets import QueryDataset, first_image
from data.images import BadImageLog, Roots
from data.readers import BadRecordPolicy, bad_records_summary
from data.records import DOMAINS, ReportRecord, VqaRecord
from retriever.clip_data import DataSpec, present_domains, warn, with_root
from retriever.domain import SUBDIR as CLASSIFIER_SUBDIR
from retriever.domain import Router, clip_folder
from retriever.index import CorpusIndex, cache_key, cached_embeddings
from retriever.model import Clip, embed_images, embed_texts, load_clip, truncate, weights_fingerprint
from retriever.recall import KS, findings_label, label_ids, recall_at_k, reference_vote_accuracy
from retriever.select_k import KRule, log_gap_quantiles, select_k

QUERY_ROLES = ["test_vqa", "test_report", "val_vqa", "dev_vqa", "alignment_vqa", "alignment_report"]
Match = Literal["text", "image"]


class Hit(NamedTuple):
    id: str
    text: str
    score: float


@dataclass
class QueryFile:
    path: str = doc("", "a VQA JSONL or report JSON file; a relative path lies under `base`")
    base: Literal["data_root", "sources_dir"] = doc("data_root", "where a relative path lies: data.data_root (the release) or sources_dir (pairs.release_sources output)")
    domain: str = doc("", "the file's domain (oracle routing, output name, routing accuracy); empty = unknown")
    role: str = doc("", "a label carried into index.json (e.g. test_vqa)")
    kind: str = doc("", "vqa | report; empty = told by the keys")
    image_root: str | list[str] = doc("", "image folder(s) for records without their own image_root; empty = data.image_roots, then data.image_root")


@dataclass
class RetrieveConfig:
    clip_dir: str = doc("outputs/toy/clip", "the retrievers and domain classifier (finetune_clip.sh output)")
    checkpoint: str = doc("best", "which checkpoint of each retriever: best | latest")
    data: DataSpec = doc(DataSpec(), "each domain's corpus: its retriever_train files")
    domains: list[str] = doc(list(DOMAINS), "domains with a retriever and a corpus")
    queries: list[QueryFile] = doc([], "query files; empty = the toy world's files of `query_roles`")
    sources_dir: str = doc("outputs/mmed_rag/sources", "query files made from the release's alignment (preference) files by `python -m pairs.release_sources --data_root D --out SOURCES_DIR`")
    query_roles: list[str] = doc(QUERY_ROLES, "toy world roles used when `queries` is empty")
    routing: Literal["classifier", "oracle", "fixed"] = doc("classifier", "classifier F(x_v) | oracle (the file's domain) | fixed (`domain` for all)")
    domain: str = doc("", "routing=fixed: the domain every query goes to")
    k: KRule = doc(KRule(), "how many reports each query keeps")
    match: Match = doc("text", "what the query image is scored against: each report's text (the paper's) | the image of each report's study")
    backend: Literal["torch", "faiss"] = doc("torch", "exact chunked top-k (torch) or a FAISS index")
    faiss_factory: str = doc("Flat", "faiss.index_factory string (Flat is exact; HNSW32, IVF4096,PQ64 for millions)")
    dim: int = doc(0, "search with the first `dim` embedding coordinates (Matryoshka-trained); 0 = all")
    query_chunk: int = doc(2048, "queries per block of the chunked top-k")
    corpus_chunk: int = doc(8192, "corpus rows per block of the chunked top-k (block memory: query_chunk x corpus_chunk x 4 bytes)")
    batch_size: int = doc(256, "images or texts per encoding batch")
    num_workers: int = doc(0, "DataLoader workers per process")
    mixed_precision: Literal["no", "bf16", "fp16"] = doc("no", "autocast precision for encoding")
    output_dir: str = doc("outputs/toy/retrieval", "where the JSONL files, index.json and retrieval_metrics.json go")
    cache_dir: str = doc("", "corpus embedding cache; empty = <output_dir>/cache")


@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]
    findings: list[tuple[str, ...] | None]
    records: list[ReportRecord]  # the record behind each entry (match=image embeds its image)


def read_corpus(
    files: Sequence[tuple[str, Roots]], bad_record: BadRecordPolicy = "skip", skipped: list[str] | None = None,
    match: Match = "text",
) -> Corpus:
    """The reports of the files with a text: for ``match="text"`` identical texts collapsed (the
    first record's id and findings kept), for ``"image"`` one entry per distinct study image;
    bad records go to ``skipped`` (data.readers)."""
    from data.readers import read_records

    recs = [with_root(r, root) for path, root in files
            for r in read_records(path, "report", root, bad_record, skipped) if r.text]
    if not recs:
        raise InputError(f"{[p for p, _ in files]}: no report texts for a corpus")
    if match == "text":
        first: dict[str, ReportRecord] = {}
        for r in recs:
            first.setdefault(r.text, r)
        recs = list(first.values())
    else:
        recs = _unique_images(recs)[0]
    return Corpus([r.id for r in recs], [r.text for r in recs], [findings_label(r.meta) for r in recs], recs)


class Retriever:
    """Each domain's CLIP and corpus index, and F(x_v) to route between them."""

    def __init__(
        self, encoders: dict[str, Clip], folders: dict[str, Path], router: Router | None,
        corpus_files: dict[str, list[tuple[str, Roots]]], cache_dir: str | Path, accelerator: Any = None,
        backend: str = "torch", faiss_factory: str = "Flat", dim: int = 0, query_chunk: int = 2048,
        corpus_chunk: int = 8192, batch_size: int = 256, bad_record: BadRecordPolicy = "skip",
        match: Match = "text", bad_image: str = "skip",
    ):
        if match not in ("text", "image"):
            raise ConfigError(f"match must be text or image, got {match!r}")
        self.encoders, self.folders, self.router = encoders, folders, router
        self.bad_record, self.match, self.bad_image = bad_record, match, bad_image
        self.bad_records: list[str] = []  # the corpus files' skipped records
        self.corpus_files, self.cache_dir, self.accelerator = corpus_files, Path(cache_dir), accelerator
        self.backend, self.faiss_factory, self.dim = backend, faiss_factory, dim or None
        self.query_chunk, self.corpus_chunk, self.batch_size = query_chunk, corpus_chunk, batch_size
        self._corpora: dict[str, Corpus] = {}
        self._indexes: dict[str, CorpusIndex] = {}

    @property
    def domains(self) -> list[str]:
        return list(self.encoders)

    @classmethod
    def load(
        cls, clip_dir: str | Path, checkpoint: str = "best", domains: Sequence[str] | None = None,
        corpus_files: dict[str, list[tuple[str, Roots]]] | None = None, cache_dir: str | Path | None = None,
        accelerator: Any = None, require_router: bool = False, **index_options: Any,
    ) -> "Retriever":
        """Load from a finetune_clip.sh output folder.

        ``corpus_files`` (domain -> [(file, image root)]) defaults to the files each retriever was
        trained on (``<clip_dir>/<domain>/data.json``); ``cache_dir`` to ``<clip_dir>/corpus_cache``.
        """
        clip_dir = Path(clip_dir)
        domains = list(domains or [d for d in DOMAINS if (clip_dir / d / "checkpoints").is_dir()])
        if not domains:
            raise FileNotFoundError(f"{clip_dir}: no trained retriever; run scripts/finetune_clip.sh first")
        device = accelerator.device if accelerator is not None else "cpu"
        folders = {d: clip_folder(clip_dir, d, checkpoint) for d in domains}
        encoders = {d: load_clip(f, device=device) for d, f in folders.items()}
        router = None
        if (clip_dir / CLASSIFIER_SUBDIR / "config.json").is_file():
            router = Router.load(clip_dir / CLASSIFIER_SUBDIR, folders)
            missing = set(router.domains) - set(domains)
            if missing and require_router:
                raise InputError(f"{clip_dir}/{CLASSIFIER_SUBDIR} routes to {sorted(missing)}, which have no retriever or "
                                 "corpus here: route with routing=oracle or fixed, or retrain it on the domains you have")
            router = None if missing else router
        elif require_router:
            raise FileNotFoundError(f"{clip_dir}/{CLASSIFIER_SUBDIR}: no domain classifier; run scripts/finetune_clip.sh")
        if corpus_files is None:
            corpus_files = {}
            for d in domains:
                info = json.loads((clip_dir / d / "data.json").read_text())
                corpus_files[d] = [(read_path(p, clip_dir / d), read_path(r, clip_dir / d)) for p, r in info["train_files"]]
        return cls(encoders, folders, router, corpus_files, cache_dir or clip_dir / "corpus_cache", accelerator, **index_options)

    # ---------------------------------------------------------------- corpus

    def corpus(self, domain: str) -> Corpus:
        if domain not in self._corpora:
            self._corpora[domain] = read_corpus(self.corpus_files[domain], self.bad_record, self.bad_records, self.match)
        return self._corpora[domain]

    def index(self, domain: str) -> CorpusIndex:
        """The domain's corpus index; its embeddings come from the cache when they can."""
        if domain not in self._indexes:
            corpus, enc = self.corpus(domain), self.encoders[domain]
            parts = {"weights": weights_fingerprint(self.folders[domain]), "model": enc.name, "match": self.match}
            if self.match == "text":
                key = cache_key(parts, corpus.texts)
            else:
                key = cache_key(parts, [f"{r.image_root}\t{first_image(r)}\t{r.text}" for r in corpus.records])
            emb, _ = cached_embeddings(self.cache_dir, key, lambda: self._embed_corpus(domain),
                                       is_main=self.accelerator is None or self.accelerator.is_main_process)
            ids, texts = corpus.ids, corpus.texts
            if self.match == "image":  # unreadable images are NaN rows, in the cache too
                keep = ~emb.isnan().any(dim=1)
                ids, texts, emb = [i for i, k in zip(ids, keep) if k], [t for t, k in zip(texts, keep) if k], emb[keep]
                if not ids:
                    raise InputError(f"{domain}: no corpus image could be read (match=image)")
            self._indexes[domain] = CorpusIndex(
                truncate(emb, self.dim), ids, texts, backend=self.backend,
                faiss_factory=self.faiss_factory, query_chunk=self.query_chunk, corpus_chunk=self.corpus_chunk,
            )
        return self._indexes[domain]

    def _embed_corpus(self, domain: str) -> torch.Tensor:
        """The domain's corpus embeddings, one row per entry: of its texts, or of its images (NaN
        rows where unreadable)."""
        corpus, enc = self.corpus(domain), self.encoders[domain]
        if self.match == "text":
            return embed_texts(enc.model, enc.tokenizer, corpus.texts, self.batch_size, self.accelerator, desc=f"{domain} corpus")
        ds = QueryDataset(corpus.records, None, enc.preprocess_val, bad_image=self.bad_image)
        emb, idx = embed_images(enc.model, ds, self.batch_size, self.accelerator, desc=f"{domain} corpus images")
        out = torch.full((len(ds), emb.shape[1]), float("nan"))
        out[idx] = emb
        return out

    @property
    def unreadable(self) -> dict[str, int]:
        """Per indexed domain, the corpus entries left out of its index (match=image: unreadable images)."""
        return {d: len(self._corpora[d].ids) - len(index) for d, index in self._indexes.items()}

    # ---------------------------------------------------------------- queries

    def route_features(self, features: dict[str, torch.Tensor]) -> list[str]:
        """Domains from each encoder's embeddings of the same images."""
        if self.router is None:
            raise FileNotFoundError("no domain classifier loaded: route with a fixed domain or train one (finetune_clip.sh)")
        return self.router.predict(torch.cat([features[d] for d in self.router.domains], dim=1))

    @torch.no_grad()
    def embed(self, images: Sequence[Any], domain: str) -> torch.Tensor:
        """L2-normalised embeddings of PIL images by one domain's CLIP."""
        enc = self.encoders[domain]
        device = next(enc.model.parameters()).device
        out = [enc.model.encode_image(torch.stack([enc.preprocess_val(im) for im in images[s : s + self.batch_size]]).to(device), normalize=True).float().cpu()
               for s in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, 0)

    def route(self, images: Sequence[Any]) -> list[str]:
        """F(x_v) for PIL images."""
        return [max(p, key=p.get) for p in self.route_confidence(images)]

    def route_confidence(self, images: Sequence[Any]) -> list[dict[str, float]]:
        """P(domain | x_v) of F for PIL images, one {domain: probability} per image."""
        if self.router is None:
            raise FileNotFoundError("no domain classifier loaded: route with a fixed domain or train one (finetune_clip.sh)")
        probs = self.router.probabilities(torch.cat([self.embed(images, d) for d in self.router.domains], dim=1))
        return [dict(zip(self.router.domains, row.tolist())) for row in probs]

    def top(self, embeddings: torch.Tensor, domain: str, k: int) -> list[list[Hit]]:
        """The ``k`` best corpus reports per query embedding (of ``domain``'s CLIP), best first."""
        index = self.index(domain)
        scores, idx = index.search(truncate(embeddings, self.dim), k)
        return [[Hit(index.ids[j], index.texts[j], float(s)) for s, j in zip(srow.tolist(), irow.tolist())]
                for srow, irow in zip(scores, idx)]

    def search(self, images: Sequence[Any], domain: str | None = None, k_rule: KRule | None = None) -> list[list[Hit]]:
        """Reports for PIL images: routed by F unless ``domain`` is given, cut by ``k_rule``."""
        k_rule = k_rule or KRule()
        if domain is not None and domain not in self.encoders:
            raise ValueError(f"no retriever for domain {domain!r}; loaded: {self.domains}")
        domains = [domain] * len(images) if domain else self.route(images)
        hits: list[list[Hit]] = [[] for _ in images]
        for d in dict.fromkeys(domains):
            rows = [i for i, x in enumerate(domains) if x == d]
            for i, h in zip(rows, self.top(self.embed([images[i] for i in rows], d), d, k_rule.k)):
                hits[i] = h[: select_k([x.score for x in h], k_rule)]
        return hits


# ---------------------------------------------------------------- the CLI


def query_files(cfg: RetrieveConfig) -> tuple[list[QueryFile], list[str]]:
    """(the query files that exist, with their paths and image folders resolved; the listed ones that do not)."""
    if cfg.queries:
        files = [dataclasses.replace(qf, path=str(Path(cfg.sources_dir) / qf.path) if qf.base == "sources_dir" else cfg.data.path(qf.path),
                                     image_root=qf.image_root or cfg.data.roots() or "") for qf in cfg.queries]
        missing = [qf.path for qf in files if not Path(qf.path).is_file()]
        for qf in files:
            if qf.path in missing:
                made_by = f" (made by {release_sources_command(cfg)})" if qf.base == "sources_dir" else ""
                warn(f"{qf.path}: not found{made_by}; going on without it")
        return [qf for qf in files if qf.path not in missing], missing
    from data.manifest import manifest_files

    files = [QueryFile(path=e["path"], domain=e["domain"], role=e["role"], kind=e["kind"], image_root=e["image_root"])
             for role in cfg.query_roles for e in manifest_files(cfg.data.world, role=role)]
    if not files:
        raise InputError(f"{cfg.data.world}/manifest.json: no files of roles {cfg.query_roles}")
    return files, []


def release_sources_command(cfg: RetrieveConfig) -> str:
    return f"`python -m pairs.release_sources --data_root {cfg.data.data_root or 'DATA_ROOT'} --out {cfg.sources_dir}`"


def _unique_images(records: list[Any]) -> tuple[list[Any], list[int]]:
    """One representative record per distinct (root, first image), and each record's position."""
    seen: dict[tuple, int] = {}
    reps, pos = [], []
    for r in records:
        key = (r.image_root, first_image(r), r.npz if isinstance(r, ReportRecord) else None)
        if key not in seen:
            seen[key] = len(reps)
            reps.append(r)
        pos.append(seen[key])
    return reps, pos


def read_queries(qf: QueryFile, cfg: RetrieveConfig, skipped: list[str] | None = None) -> list[ReportRecord | VqaRecord]:
    """The usable records of one query file (bad records go to ``skipped``); read for every file
    before any work, so a bad file stops the run before hours of encoding, not after."""
    from data.readers import read_records

    records = read_records(qf.path, qf.kind or None, qf.image_root or None, cfg.data.bad_record, skipped)
    bad_kind = [r.source for r in records if not isinstance(r, (ReportRecord, VqaRecord))]
    if bad_kind:
        raise InputError(f"{bad_kind[0]}: a preference record (a finished pair), not a query; turn the release's alignment "
                         f"files into query files with {release_sources_command(cfg)} and list those (base: sources_dir)")
    return records


def retrieve_file(
    retriever: Retriever, qf: QueryFile, records: list[Any], cfg: RetrieveConfig, accelerator: Any
) -> tuple[list[dict], dict[str, Any]]:
    """Output rows (on the main process; [] elsewhere) and metrics of one query file."""
    kind = qf.kind or ("vqa" if records and isinstance(records[0], VqaRecord) else "report")
    if not records:
        return [], {"source": qf.path, "domain": qf.domain, "kind": kind, "records": 0}
    records = [with_root(r, qf.image_root or None) for r in records]
    reps, pos = _unique_images(records)
    if cfg.routing == "classifier":
        needed = retriever.router.domains
    else:
        target = qf.domain if cfg.routing == "oracle" else cfg.domain
        if target not in retriever.encoders:
            raise ConfigError(f"{qf.path}: routing={cfg.routing} needs a known domain, got {target!r}")
        needed = [target]
    feats, good, bad_log = {}, None, BadImageLog()
    for d in needed:
        ds = QueryDataset(reps, None, retriever.encoders[d].preprocess_val, bad_image=cfg.data.bad_image)
        e, idx = embed_images(retriever.encoders[d].model, ds, cfg.batch_size, accelerator, cfg.num_workers,
                              bad_log=bad_log, desc=f"{Path(qf.path).stem} ({d})")
        feats[d] = dict(zip(idx.tolist(), e))
        good = set(idx.tolist()) if good is None else good & set(idx.tolist())
    bad_images = bad_log.merged(accelerator).summary()["images"]  # path -> reason, all processes
    ok = sorted(good or [])
    stacked = {d: torch.stack([f[i] for i in ok]) if ok else torch.empty(0, 0) for d, f in feats.items()}
    routed = retriever.route_features(stacked) if cfg.routing == "classifier" and ok else [needed[0]] * len(ok)
    depth = max(cfg.k.k, max(KS))
    hits: dict[int, list[Hit]] = {}
    dom_of: dict[int, str] = {}
    if accelerator.is_main_process:
        for d in dict.fromkeys(routed):
            rows = [j for j, x in enumerate(routed) if x == d]
            for j, h in zip(rows, retriever.top(stacked[d][rows], d, depth)):
                hits[ok[j]], dom_of[ok[j]] = h, d
    else:
        return [], {}
    out_rows, own_q, own_r, fin_q, fin_r = [], [], [], [], []
    asked, truth_yes, ref_findings = [], [], []  # for reference_vote_accuracy (VQA with a `finding`)
    correct = known = 0
    n_k = []
    lookup = {d: dict(zip(retriever.corpus(d).texts, retriever.corpus(d).findings)) for d in set(dom_of.values())}
    present = {d: set(v.values()) for d, v in lookup.items()}
    for r, u in zip(records, pos):
        h = hits.get(u)
        row = dict(r.raw)
        if h is None:
            row.update(reference_reports=[], retrieve_k=0, domain=None, reference_ids=[], reference_scores=[],
                       retrieve_error="image could not be read")
            out_rows.append(row)
            continue
        k = select_k([x.score for x in h], cfg.k)
        n_k.append(k)
        row.update(reference_reports=[x.text for x in h[:k]], retrieve_k=k, domain=dom_of[u],
                   reference_ids=[x.id for x in h[:k]], reference_scores=[round(x.score, 6) for x in h[:k]])
        out_rows.append(row)
        if qf.domain:
            known += 1
            correct += dom_of[u] == qf.domain
        by_text = lookup[dom_of[u]]
        truth = r.text if isinstance(r, ReportRecord) else r.report
        own_q.append(truth if truth in by_text else None)
        own_r.append([x.text for x in h[: max(KS)]])
        f = findings_label(r.meta)
        fin_q.append(f if f is not None and f in present[dom_of[u]] else None)
        fin_r.append([by_text[x.text] for x in h[: max(KS)]])
        if isinstance(r, VqaRecord):
            asked.append(r.meta.get("finding"))
            truth_yes.append({"yes": True, "no": False}.get(yes_no(r.answer)))
            ref_findings.append([by_text[x.text] for x in h[:k]])
    metrics: dict[str, Any] = {"source": qf.path, "domain": qf.domain, "kind": kind,
                               "records": len(records), "images": len(reps),
                               "unreadable_images": len(reps) - len(ok), "mean_k": sum(n_k) / max(len(n_k), 1)}
    if bad_images:
        metrics["bad_images"] = bad_images
    if known:
        metrics["routing_accuracy"] = correct / known
        metrics["_routing_counts"] = (correct, known)
    metrics.update(_recall(own_q, own_r, "own_"))
    metrics.update(_recall(fin_q, fin_r, "findings_"))
    metrics.update(reference_vote_accuracy(asked, truth_yes, ref_findings))
    metrics.update(log_gap_quantiles([[x.score for x in h] for h in hits.values()], cfg.k))
    return out_rows, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def _recall(q_labels: list, retrieved: list[list], prefix: str) -> dict[str, float]:
    """R@1/5/10 over the queries whose target exists in the corpus (``n`` of them)."""
    if not q_labels:
        return {}
    width = max(KS)
    flat = [x for row in retrieved for x in row]
    q, g = label_ids(q_labels, flat)
    rows, s = [], 0
    for row in retrieved:
        rows.append(torch.cat([g[s : s + len(row)], torch.full((width - len(row),), -2, dtype=torch.long)]))
        s += len(row)
    return recall_at_k(torch.stack(rows), q, KS, prefix)


def _output_name(qf: QueryFile, taken: set[str]) -> str:
    """``<domain>_<stem>.jsonl``; a stem taken already gets its folder's name (the release's
    test/vqa/iuxray_test.jsonl and test/report/iuxray_test.json), then a number."""
    base = f"{qf.domain or 'any'}_{Path(qf.path).stem}"
    if f"{base}.jsonl" in taken:
        base = f"{qf.domain or 'any'}_{Path(qf.path).parent.name}_{Path(qf.path).stem}"
    name, n = f"{base}.jsonl", 2
    while name in taken:
        name, n = f"{base}_{n}.jsonl", n + 1
    taken.add(name)
    return name


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(RetrieveConfig, argv, description=__doc__)
    if cfg.routing == "fixed" and cfg.domain not in cfg.domains:
        raise ConfigError(f"routing=fixed needs --domain, one of {cfg.domains}")
    domains, missing = present_domains(cfg.data, cfg.domains, roles=("retriever_train",))
    found, absent = query_files(cfg)
    missing += absent
    if cfg.routing == "oracle":
        for qf in [qf for qf in found if qf.domain not in domains]:
            warn(f"{qf.path}: routing=oracle, and its domain {qf.domain!r} has no retriever corpus here; left out")
            found.remove(qf)
    if not domains or (cfg.routing == "fixed" and cfg.domain not in domains):
        raise InputError(f"no retriever_train file (the corpus) of {[cfg.domain] if cfg.routing == 'fixed' else cfg.domains} "
                         f"was found; missing: {missing}")
    if not found:
        raise InputError(f"no query file was found; missing: {missing}")
    with run_lock(cfg.output_dir):
        retrieve_all(cfg, domains, missing, found)


def retrieve_all(cfg: RetrieveConfig, domains: list[str], missing: list[str], found: list[QueryFile]) -> None:
    """Index the corpora of ``domains`` and write one retrieval JSONL per query file, the summary and index.json."""
    from common.engine import EngineConfig, build_accelerator

    accelerator = build_accelerator(EngineConfig(mixed_precision=cfg.mixed_precision))
    out = Path(cfg.output_dir)
    bad_records: list[str] = []
    queries = [(qf, read_queries(qf, cfg, bad_records)) for qf in found]
    try:
        retriever = Retriever.load(
            cfg.clip_dir, cfg.checkpoint, domains, {d: cfg.data.files(d, "retriever_train") for d in domains},
            cfg.cache_dir or out / "cache", accelerator, require_router=cfg.routing == "classifier",
            backend=cfg.backend, faiss_factory=cfg.faiss_factory, dim=cfg.dim, query_chunk=cfg.query_chunk,
            corpus_chunk=cfg.corpus_chunk, batch_size=cfg.batch_size, bad_record=cfg.data.bad_record,
            match=cfg.match, bad_image=cfg.data.bad_image,
        )
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    for d in domains:  # every process takes part in encoding a corpus that is not cached
        retriever.index(d)
    files, per_file, taken = [], {}, set()
    correct = known = 0
    for qf, records in tqdm(queries, desc="query files", disable=not accelerator.is_main_process):
        rows, m = retrieve_file(retriever, qf, records, cfg, accelerator)
        if not accelerator.is_main_process:
            continue
        name = _output_name(qf, taken)
        with atomic_path(out / name) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        c, k = m.pop("_routing_counts", (0, 0))
        m.setdefault("mean_k", 0.0)
        correct, known = correct + c, known + k
        per_file[name] = m
        files.append({"path": name, "source": write_path(qf.path, out), "domain": qf.domain or None,
                      "role": qf.role or None, "kind": m["kind"], "records": len(rows), "image_root": write_path(qf.image_root or None, out)})
        tqdm.write(f"{name}: {len(rows)} records, routing {m.get('routing_accuracy', float('nan')):.3f}, "
                   f"findings R@5 {m.get('findings_R@5', float('nan')):.3f}, mean k {m['mean_k']:.2f}"
                   + (f", reference vote {m['reference_vote_accuracy']:.3f}" if "reference_vote_accuracy" in m else ""))
        if cfg.k.rule == "gap" and m["mean_k"] == cfg.k.k and "log_gap_p99" in m:  # the rule never cut
            tqdm.write(f"warning: {name}: the gap rule (gamma {cfg.k.gamma}) kept all {cfg.k.k} reports for every "
                       f"query; this retriever's log-gaps between consecutive scores are {m['log_gap_p50']:.4f} "
                       f"(median) to {m['log_gap_p99']:.4f} (p99), so a gamma on that scale is needed to cut")
    if accelerator.is_main_process:
        summary = {"routing": cfg.routing, "match": cfg.match, "domain_accuracy": correct / known if known else None, "k_rule": to_dict(cfg.k),
                   "domains": domains, "skipped_domains": [d for d in cfg.domains if d not in domains], "missing": missing,
                   "files": per_file, "bad_records": bad_records_summary(bad_records + retriever.bad_records)}
        if cfg.match == "image":
            summary["corpus_unreadable_images"] = retriever.unreadable
        atomic_write_json(out / "retrieval_metrics.json", summary)
        atomic_write_json(out / "index.json", {"clip_dir": write_path(cfg.clip_dir, out), "routing": cfg.routing, "match": cfg.match,
                                               "k_rule": to_dict(cfg.k), "files": files})
        save_config(cfg, out / "run_config.yaml")
        acc = f"{summary['domain_accuracy']:.3f}" if known else "n/a"
        print(f"retrieval: {len(files)} files -> {out} (domain accuracy {acc})")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    cli_main(main)
