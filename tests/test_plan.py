"""pipeline.plan: parameters per part on the published shapes of LLaVA-1.5-7B and Qwen2-VL-7B (built on
the meta device from tests/fixtures/<name>/config.json), memory by DeepSpeed's estimators, lengths
measured as training encodes them, and the misconfigurations it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from common.config import ConfigError, cli_main
from common.engine import LoraConfig
from dpo.pair_data import PairCollator, PairDataset, load_pairs, split_heldout
from pipeline import plan
from policy.policy import PolicySpec
from policy.prompts import DEFAULT_PROMPTS, load_prompt_templates
from tests.test_pair_data import policy_texts, toy_policy, write_pairs
from tests.tiny_qwen2vl import build_tiny_qwen2vl

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DPO = str(ROOT / "configs" / "mmed_rag" / "radiology" / "dpo.yaml")  # the shipped MMed-RAG setting: r 128, all-linear


def lora_count(r: int, layers: int, linears: list[tuple[int, int]]) -> int:
    """LoRA's trained parameters on ``layers`` decoder layers: r * (in + out) per adapted linear."""
    return layers * sum(r * (i + o) for i, o in linears)


def linear_count(shapes: list[tuple[int, int]]) -> int:
    """Weights and biases of a stack of linears (the projector, trained whole with train_projector)."""
    return sum(i * o + o for i, o in shapes)


# Published shapes (config.json of llava-hf/llava-1.5-7b-hf and Qwen/Qwen2-VL-7B-Instruct):
# q, k, v, o, gate, up, down as (in, out); the projector's linears.
LLAVA = {"layers": 32, "linears": [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)],
         "projector": linear_count([(1024, 4096), (4096, 4096)])}
QWEN2VL = {"layers": 28, "linears": [(3584, 3584), (3584, 512), (3584, 512), (3584, 3584)] + [(3584, 18944)] * 2
           + [(18944, 3584)], "projector": linear_count([(5120, 5120), (5120, 3584)]) + 2 * 1280}  # + ln_q


@pytest.mark.parametrize("name, shapes", [("llava-1.5-7b", LLAVA), ("qwen2-vl-7b", QWEN2VL)])
def test_trainable_count_is_peft_s_and_the_lora_formula(tmp_path, name, shapes):
    got, out = plan.make_plan([DPO, "--policy.path", str(FIXTURES / name), "--out", str(tmp_path)])
    assert out == tmp_path
    model = plan.with_lora(plan.meta_policy(PolicySpec(path=str(FIXTURES / name))), LoraConfig(train_projector=True))
    assert (got["trainable_params"], got["total_params"]) == model.get_nb_trainable_parameters()
    parts = got["parts"]
    assert parts["language_model"]["trainable"] == lora_count(128, shapes["layers"], shapes["linears"])
    assert parts["projector"]["trainable"] == shapes["projector"]
    assert parts["vision_tower"]["trainable"] == 0 and parts["vision_tower"]["total"] > 0


def test_published_sizes():
    """The fixtures hold the published architectures: 7.06 B and 8.29 B parameters."""
    for name, n in (("llava-1.5-7b", 7_063_427_072), ("qwen2-vl-7b", 8_291_375_616)):
        model = plan.meta_policy(PolicySpec(path=str(FIXTURES / name)))
        assert sum(p.numel() for p in model.parameters()) == n


def test_memory_is_deepspeed_s_estimate_over_trainable_parameters():
    total, trainable, gpus = 7_000_000_000, 300_000_000, 8
    states = plan.model_state_bytes(total, trainable, 100_000_000, gpus)
    _, zero2 = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, cpu_offload=False)
    assert sum(states["zero2"].values()) == pytest.approx(zero2 + 2 * (total - trainable))
    assert states["zero2"]["weights"] == pytest.approx(2 * total)
    # DeepSpeed's ZeRO-3 estimate: 18 bytes a trained parameter in all, + the largest layer at 4 bytes
    assert states["zero3"]["weights"] == pytest.approx(2 * (total - trainable) / gpus + 4 * 100_000_000)
    full = plan.model_state_bytes(total, total, 100_000_000, gpus)  # full fine-tuning: the estimator as it is
    _, zero2_full = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
    assert sum(full["zero2"].values()) == pytest.approx(zero2_full)


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of a forward (storages counted once, weights left out)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in weights)


@pytest.mark.parametrize("enabled, dropout, lora_bytes", [
    (True, 0.0, 4), (True, 0.05, 4),  # PEFT's float32 LoRA weights (no DeepSpeed)
    (True, 0.0, 2), (True, 0.05, 2),  # cast to bf16 (DeepSpeed)
    (False, 0.0, 2),  # full fine-tuning
])
def test_activation_estimate_is_what_autograd_keeps(enabled, dropout, lora_bytes):
    """On a tiny bf16 Llama (GQA) the estimate is within 3% of the tensors autograd saves (10% with dropout) (on CPU
    the dropout mask has the input's dtype; CUDA keeps a bool)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.engine import apply_lora

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    lora = LoraConfig(enabled=enabled, r=8, alpha=16, dropout=dropout)
    model = apply_lora(LlamaForCausalLM(config).to(torch.bfloat16), lora)
    if lora_bytes == 2:
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    model.train()
    rows, length = 2, 256
    measured = saved_bytes(model, torch.randint(0, 300, (rows, length)))
    got = plan.activation_bytes(model, rows, length, False, lora, 2, lora_bytes, mask_bytes=lora_bytes)
    # with dropout, the first layer's q/k/v input needs no gradient (the embeddings are frozen), so
    # their masks are not kept: an edge of 1 layer in 4 here, ignored by the estimate
    assert got["activations"] == pytest.approx(measured, rel=0.1 if dropout else 0.03)
    assert got["logits"] == 3 * rows * length * 300 * 4  # below one chunk: every position's float32 logits, x3
    checkpointed = plan.activation_bytes(model, rows, length, True, lora, 2, lora_bytes, mask_bytes=lora_bytes)
    last = rows * length * 128 * (4 + (0 if enabled else 2))  # the final norm's
    layer = (got["activations"] - last) / 4
    assert checkpointed["activations"] == pytest.approx(last + layer + 4 * rows * length * 128 * 2)


def test_plan_json_is_written_with_the_contract_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["plan", DPO, "--policy.path", str(FIXTURES / "llava-1.5-7b"), "--out",
                                     str(tmp_path), "--gpus", "4"])
    plan.main()
    got = json.loads((tmp_path / "plan.json").read_text())
    assert {"total_params", "trainable_params", "parts", "memory_gb", "lengths", "steps_per_epoch"} <= set(got)
    assert set(got["memory_gb"]) == {"zero2", "zero3"} and got["gpus"] == 4
    assert {"weights", "gradients", "optimizer", "activations", "logits", "total"} == set(got["memory_gb"]["zero3"])
    assert got["lengths"]["available"] is False and "pairs.json" in got["lengths"]["reason"]
    assert "340,795,392 trainable" in capsys.readouterr().out


@pytest.mark.parametrize("cached", ["false", "true"])
def test_dpo_logits_are_one_chunk_at_a_real_vocabulary(tmp_path, cached):
    got, _ = plan.make_plan([DPO, "--policy.path", str(FIXTURES / "llava-1.5-7b"), "--cache_reference", cached,
                             "--out", str(tmp_path)])
    assert got["memory_assumptions"]["rows"] == 2 and got["memory_assumptions"]["length"] == 2048  # max_length
    # 2 x 2048 x 32064 float32 logits (0.49 GiB) would exceed a chunk: the chunk, its log-softmax and
    # gradient are what is alive, with or without the reference forward (it scores its chunks after)
    assert got["memory_gb"]["zero3"]["logits"] == round(3 * 64 * 2**20 / plan.GB, 3)


def test_mdpo_plans_a_third_row_per_pair(tmp_path):
    got, _ = plan.make_plan([DPO, "--policy.path", str(FIXTURES / "llava-1.5-7b"), "--loss_type", "mdpo",
                             "--out", str(tmp_path)])
    assert got["memory_assumptions"]["rows"] == 3  # chosen, rejected, chosen under the corrupted image


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    write_pairs(root, n=16)
    toy_policy(root / "policy")
    build_tiny_qwen2vl(policy_texts(), root / "qwen2vl")
    return root


@pytest.mark.parametrize("policy", ["policy", "qwen2vl"])  # a LLaVA; Qwen2-VL's image tokens depend on the image size
def test_lengths_are_the_encoded_lengths(world, tmp_path, policy):
    """The longest row of each pair as the DPO collator encodes it (all references kept) is the plan's sequence."""
    pairs = world / "pairs.json"
    got, _ = plan.make_plan([DPO, "--policy.path", str(world / policy), "--pairs", f"[{pairs}]", "--policy.prompts",
                             str(DEFAULT_PROMPTS), "--image_root", str(world / "images"), "--out", str(tmp_path), "--gpus", "2", "--train.batch_size", "2"])
    train, _ = split_heldout(load_pairs([pairs]), 0.05, 0)
    assert got["steps_per_epoch"] == -(-len(train) // 4)
    lengths = got["lengths"]
    assert lengths["available"], lengths
    assert lengths["records"] == len(train) and lengths["over_max_length"] == 0
    from transformers import AutoProcessor

    collate = PairCollator(train, AutoProcessor.from_pretrained(world / policy), ["cm", "oa1", "oa2"],
                           load_prompt_templates(DEFAULT_PROMPTS), None)
    dataset = PairDataset(train, str(world / "images"))
    rows = [int(collate([dataset[i]])["inputs"]["attention_mask"].sum(1).max()) for i in range(len(train))]
    assert lengths["sequence"]["max"] == max(rows)
    assert lengths["sequence"]["median"] == pytest.approx(torch.tensor(rows, dtype=torch.float).median().item(), abs=1)
    assert got["memory_assumptions"]["length"] == max(rows)  # the longest batch the data makes


def test_config_only_folder_has_no_lengths_but_a_plan(world, tmp_path):
    got, _ = plan.make_plan([DPO, "--policy.path", str(FIXTURES / "llava-1.5-7b"), "--pairs", f"[{world / 'pairs.json'}]",
                             "--out", str(tmp_path)])
    assert not got["lengths"]["available"] and "no processor" in got["lengths"]["reason"]
    assert got["steps_per_epoch"] == -(-len(split_heldout(load_pairs([world / "pairs.json"]), 0.05, 0)[0]) // 8)


def test_max_length_below_the_median_prompt_is_refused(world, tmp_path):
    with pytest.raises(ConfigError, match="below the median prompt"):
        plan.make_plan([DPO, "--policy.path", str(world / "policy"), "--pairs", f"[{world / 'pairs.json'}]",
                        "--image_root", str(world / "images"), "--max_length", "8", "--out", str(tmp_path)])
    assert not (tmp_path / "plan.json").exists()


def test_lora_targets_matching_nothing_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["plan", DPO, "--policy.path", str(FIXTURES / "llava-1.5-7b"),
                                     "--lora.target_modules", "[qkv_proj]", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        cli_main(plan.main)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no linear layer" in err[0]
    assert not (tmp_path / "plan.json").exists()


def test_lora_on_the_vision_tower_is_refused():
    model = plan.meta_policy(PolicySpec(path=str(FIXTURES / "llava-1.5-7b")))
    with torch.device("meta"):
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=r".*vision_tower.*\.q_proj"))
    with pytest.raises(ConfigError, match="reaches the vision tower"):
        plan.check_vision(lora)


def test_a_vision_tower_the_engine_cannot_name_is_refused(monkeypatch):
    model = plan.meta_policy(PolicySpec(path=str(FIXTURES / "llava-1.5-7b")))
    plan.check_vision(model)
    monkeypatch.setattr(plan, "VISION_MODULES", ("image_encoder",))
    with pytest.raises(ConfigError, match="no vision tower named"):
        plan.check_vision(model)


def test_kind_is_told_by_the_config_s_keys(tmp_path):
    assert [plan.detect_kind(str(ROOT / f"configs/toy/{k}.yaml")) for k in ("dpo", "sft", "clip")] == ["dpo", "sft", "clip"]
    both = tmp_path / "both.yaml"
    both.write_text("policy: {path: x}\n")  # a key DPO and SFT configs share
    with pytest.raises(ConfigError, match="give --kind"):
        plan.detect_kind(str(both))
    assert plan.split_args([DPO, "--gpus", "4", "--beta=0.2", "--merge", "--out", "o"]) == (
        ["--gpus", "4", "--out", "o"], [DPO, "--beta=0.2", "--merge"])


def test_clip_plan_counts_both_towers_all_trained(tmp_path):
    got, out = plan.make_plan([str(ROOT / "configs/mmed_rag/radiology/clip.yaml"), "--gpus", "2",
                               "--out", str(tmp_path)])
    assert set(got["parts"]) == {"image_tower", "text_tower"}
    assert got["trainable_params"] == got["total_params"] == 102_007_137  # open_clip RN50-quickgelu
    assert not got["lengths"]["radiology"]["available"] and "radiology_train.json" in got["lengths"]["radiology"]["reason"]
