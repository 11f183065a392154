"""Chunked top-k against brute force, FAISS, the embedding cache, k rules and recall helpers."""

import math

import pytest
import torch
import torch.nn.functional as F

from retriever.index import CorpusIndex, cache_key, cached_embeddings, topk_chunked
from retriever.recall import (bidirectional_recall, first_relevant_ranks, label_ids, rank_summary, recall_at_k,
                             reference_vote_accuracy)
from retriever.select_k import KRule, log_gap_quantiles, select_k


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("n_q,n_c,k,qc,cc", [(37, 1000, 10, 8, 64), (5, 50, 7, 64, 3), (3, 4, 10, 2, 2), (20, 301, 1, 7, 300)])
def test_chunked_topk_equals_brute_force(n_q, n_c, k, qc, cc):
    q, c = unit(n_q, 16, 0), unit(n_c, 16, 1)
    s, i = topk_chunked(q, c, k, query_chunk=qc, corpus_chunk=cc)
    ref_s, ref_i = (q @ c.T).topk(min(k, n_c), dim=1)
    assert torch.equal(i, ref_i)
    assert torch.allclose(s, ref_s, atol=1e-6)


def test_faiss_flat_matches_torch_index():
    pytest.importorskip("faiss")
    q, c = unit(30, 32, 2), unit(500, 32, 3)
    ids = [f"r{j}" for j in range(500)]
    s_t, i_t = CorpusIndex(c, ids, ids).search(q, 5)
    s_f, i_f = CorpusIndex(c, ids, ids, backend="faiss").search(q, 5)
    assert torch.equal(i_t, i_f)
    assert torch.allclose(s_t, s_f, atol=1e-5)


def test_embedding_cache_reused_and_keyed_by_texts(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6, dtype=torch.float32).view(3, 2)

    key = cache_key({"weights": "abc"}, ["a", "b", "c"])
    first, hit1 = cached_embeddings(tmp_path, key, compute)
    second, hit2 = cached_embeddings(tmp_path, key, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first, second)
    assert cache_key({"weights": "abc"}, ["a", "b", "d"]) != key
    assert cache_key({"weights": "xyz"}, ["a", "b", "c"]) != key


def test_fixed_rule():
    assert select_k([0.9, 0.8, 0.7], KRule("fixed", k=2)) == 2
    assert select_k([0.9, 0.8, 0.7], KRule("fixed", k=5)) == 3
    assert select_k([], KRule("fixed", k=5)) == 0


def test_ratio_rule_released_code():
    scores = [0.9, 0.8, 0.55, 0.5]  # s1/s2 = 1.125 keeps; s1/s3 = 1.64 >= 1.5 stops
    assert select_k(scores, KRule("ratio", k=5, ratio_threshold=1.5)) == 2
    assert select_k(scores, KRule("ratio", k=1, ratio_threshold=1.5)) == 1
    assert select_k(scores, KRule("ratio", k=5, ratio_threshold=2.0)) == 4
    assert select_k([0.5, -0.1, -0.2], KRule("ratio", k=5, ratio_threshold=10)) == 1


def test_gap_rule_paper():
    scores = [0.9, 0.85, 0.5, 0.45]  # log gaps: 0.057, 0.531, 0.105
    assert select_k(scores, KRule("gap", k=5, gamma=0.1)) == 2
    assert select_k(scores, KRule("gap", k=5, gamma=0.6)) == 4
    assert select_k(scores, KRule("gap", k=3, gamma=0.6)) == 3
    assert select_k(scores, KRule("gap", k=5, gamma=0.05)) == 1
    assert select_k([0.4, 0.39, 0.0], KRule("gap", k=5, gamma=0.5)) == 2
    assert math.log(0.85 / 0.5) > 0.1 > math.log(0.9 / 0.85)


def test_log_gap_quantiles_are_on_the_gap_rules_scale():
    scores = [[0.9, 0.85, 0.5, 0.45], [0.4, 0.39, 0.0]]  # gaps 0.057, 0.531, 0.105; 0.025 (0.0 left out)
    q = log_gap_quantiles(scores, KRule("gap", k=5), qs=(0.0, 0.5, 0.99))
    assert q == pytest.approx({"log_gap_p0": math.log(0.4 / 0.39), "log_gap_p50": math.log(0.5 / 0.45),
                               "log_gap_p99": math.log(0.85 / 0.5)})
    assert log_gap_quantiles(scores, KRule("gap", k=2), qs=(0.99,)) == pytest.approx({"log_gap_p99": math.log(0.9 / 0.85)})
    assert log_gap_quantiles([[0.5]], KRule("gap", k=5)) == {}


def test_first_relevant_rank_and_recall():
    gallery = torch.eye(4)
    queries = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.0, 0.2, 0.3, 0.9], [1.0, 0.0, 0.0, 0.0]])
    q_lab, g_lab = label_ids(["a", "b", None], ["b", "a", "b", "a"])
    # query 0: scores [.1,.9,.5,0], relevant (a) at 1 and 3 -> best relevant .9 -> rank 1
    # query 1: scores [0,.2,.3,.9], relevant (b) at 0 and 2 -> best .3; irrelevant above: .9 -> rank 2
    ranks = first_relevant_ranks(queries, gallery, q_lab, g_lab, chunk=2)
    assert ranks[:2].tolist() == [1.0, 2.0] and math.isinf(ranks[2])
    summary = rank_summary(ranks)
    assert summary["R@1"] == 0.5 and summary["R@5"] == 1.0 and summary["mean_rank"] == 1.5
    retrieved = g_lab[torch.tensor([[1, 2], [3, 2], [0, 1]])]
    r = recall_at_k(retrieved, q_lab, ks=(1, 2))
    assert r == {"R@1": 0.5, "R@2": 1.0, "n": 2}


def test_bidirectional_recall_perfect_alignment():
    emb = unit(6, 8, 4)
    lab, lab2 = label_ids(list("abcdef"), list("abcdef"))
    out = bidirectional_recall(emb, emb, lab, lab2, prefix="v/")
    assert out["v/i2t_R@1"] == out["v/t2i_R@1"] == out["v/mean_recall"] == 1.0
    assert out["v/i2t_median_rank"] == 1.0


def test_reference_vote_accuracy_by_hand():
    refs = [[("a",), ("a", "b"), ("c",)],  # 2 of 3 have a: yes
            [("a",), (), ()],              # 1 of 3: no
            [("b",), ("a",)],              # 1 of 2 is no majority: no
            [("a",)],                      # left out: no finding asked
            [("a",), None]]                # left out: an unlabelled reference
    got = reference_vote_accuracy(["a", "a", "a", None, "a"], [True, True, False, True, True], refs)
    assert got == {"reference_vote_accuracy": 2 / 3, "reference_vote_n": 3}
    assert reference_vote_accuracy([None], [True], [[("a",)]]) == {}
