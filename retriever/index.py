"""Corpus index: exact top-k by cosine similarity in chunks, optional FAISS, and an embedding cache.

The released MMed-RAG code forms the whole (queries x corpus) logits matrix and takes its top-k;
for 5k queries against a 200k-report corpus that is 4 GB. ``topk_chunked`` walks the matrix in
(query chunk x corpus chunk) blocks, streaming the corpus once, and keeps a running top-k, so memory grows with
corpus + queries x k + one block, never with queries x corpus (benches/bench_retrieval.py). For
corpora of millions, ``backend="faiss"`` builds any ``faiss.index_factory`` index (``Flat`` is
exact; ``HNSW32`` or ``IVF4096,PQ64`` trade exactness for speed) with inner-product metric.

Embeddings must be L2-normalised (inner product = cosine); ``retriever.model`` returns them so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from common.io import atomic_path


@torch.no_grad()
def topk_chunked(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, query_chunk: int = 2048, corpus_chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the ``k`` largest inner products per query, best first.

    Hand-written because torch has no blocked top-k. The corpus is streamed once (outer loop),
    each (query chunk x corpus chunk) score block is written into one reused buffer, and each
    block's top-k candidates are merged into the running best k of its queries.
    """
    n_q, n_c = queries.shape[0], corpus.shape[0]
    k = min(k, n_c)
    best_s = torch.full((n_q, k), float("-inf"), dtype=torch.float32)
    best_i = torch.zeros((n_q, k), dtype=torch.long)
    if k == 0 or n_q == 0:
        return best_s, best_i
    queries = queries.float()
    buf = torch.empty(min(query_chunk, n_q) * min(corpus_chunk, n_c), dtype=torch.float32)
    for c0 in range(0, n_c, corpus_chunk):
        block_c = corpus[c0 : c0 + corpus_chunk].float()
        for q0 in range(0, n_q, query_chunk):
            q = queries[q0 : q0 + query_chunk]
            block = buf[: q.shape[0] * block_c.shape[0]].view(q.shape[0], block_c.shape[0])
            torch.mm(q, block_c.T, out=block)
            s, i = block.topk(min(k, block.shape[1]), dim=1)
            cand_s = torch.cat([best_s[q0 : q0 + q.shape[0]], s], dim=1)
            cand_i = torch.cat([best_i[q0 : q0 + q.shape[0]], i + c0], dim=1)
            s, pos = cand_s.topk(k, dim=1)
            best_s[q0 : q0 + q.shape[0]] = s
            best_i[q0 : q0 + q.shape[0]] = cand_i.gather(1, pos)
    return best_s, best_i


class CorpusIndex:
    """Normalised corpus embeddings with their ids and texts; ``search`` gives top-k per query."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        ids: list[str],
        texts: list[str],
        meta: list[dict[str, Any]] | None = None,
        backend: str = "torch",
        faiss_factory: str = "Flat",
        query_chunk: int = 2048,
        corpus_chunk: int = 8192,
    ):
        if not (len(ids) == len(texts) == embeddings.shape[0]):
            raise ValueError(f"corpus sizes differ: {embeddings.shape[0]} embeddings, {len(ids)} ids, {len(texts)} texts")
        self.embeddings = embeddings.float().contiguous()
        self.ids, self.texts = ids, texts
        self.meta = meta or [{} for _ in ids]
        self.backend = backend
        self.query_chunk, self.corpus_chunk = query_chunk, corpus_chunk
        self._faiss = None
        if backend == "faiss":
            import faiss

            index = faiss.index_factory(self.embeddings.shape[1], faiss_factory, faiss.METRIC_INNER_PRODUCT)
            data = self.embeddings.numpy()
            if not index.is_trained:
                index.train(data)
            index.add(data)
            self._faiss = index
        elif backend != "torch":
            raise ValueError(f"unknown index backend {backend!r}; expected torch or faiss")

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices), each [n_queries, min(k, len)], best first."""
        queries = queries.float().contiguous()
        if self._faiss is not None:
            scores, idx = self._faiss.search(queries.numpy(), min(k, len(self)))
            return torch.from_numpy(scores), torch.from_numpy(idx).long()
        return topk_chunked(queries, self.embeddings, k, self.query_chunk, self.corpus_chunk)


def cache_key(parts: dict[str, Any], texts: list[str]) -> str:
    """A hash of what the embeddings depend on: model weights, options, and every corpus text."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:20]


def cached_embeddings(
    cache_dir: str | Path, key: str, compute: Callable[[], torch.Tensor], is_main: bool = True
) -> tuple[torch.Tensor, bool]:
    """Embeddings from ``<cache_dir>/corpus-<key>.safetensors``, else ``compute()`` and store.

    Returns (embeddings, hit). ``compute`` must be called by every process (it may be
    distributed); only the main process writes, atomically.
    """
    path = Path(cache_dir) / f"corpus-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["embeddings"], True
    emb = compute()
    if is_main:
        with atomic_path(path) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"key": key})
    return emb, False
