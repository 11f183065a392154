"""The open_clip factory: toy config, export loadable by open_clip itself, HF text tower, Matryoshka loss."""

import shutil

import open_clip
import pytest
import torch

from common.io import InputError
from retriever.finetune_clip import ContrastiveLoss, MatryoshkaConfig
from retriever.model import TOY_MODEL, ClipSpec, build_clip, export_clip, load_clip, truncate

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
TEXTS = ["no acute findings", "mild cardiomegaly is present", "small left pleural effusion", "there is a nodule"]


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_toy_model_registered_with_bundled_tokenizer():
    clip = build_clip(ClipSpec())
    assert clip.name == TOY_MODEL and TOY_MODEL in open_clip.list_models()
    assert isinstance(clip.tokenizer, open_clip.SimpleTokenizer)
    img = clip.model.encode_image(_images(2, 32), normalize=True)
    assert img.shape == (2, clip.model_cfg["embed_dim"])


def test_export_loads_with_open_clip_itself(tmp_path):
    spec = ClipSpec(model="tiny-vit-test", model_config={"embed_dim": 16, "vision_cfg": VISION,
                                                         "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}})
    torch.manual_seed(0)
    clip = build_clip(spec)
    export_clip(clip, clip.model, tmp_path / "ckpt")
    x = _images()
    clip.model.eval()
    want = clip.model.encode_image(x, normalize=True)
    open_clip.add_model_config(tmp_path / "ckpt" / "tiny-vit-test.json")
    by_name, _, _ = open_clip.create_model_and_transforms("tiny-vit-test", pretrained=str(tmp_path / "ckpt" / "open_clip_model.safetensors"))
    by_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ckpt'}")
    ours = load_clip(tmp_path / "ckpt")
    for m in (by_name.eval(), by_dir.eval(), ours.model):
        assert torch.allclose(m.encode_image(x, normalize=True), want, atol=1e-6)


def _tiny_bert(folder):
    """A tiny local BERT (config + WordPiece tokenizer) standing in for BioClinicalBERT."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TEXTS * 3, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    BertConfig(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(folder)


def test_hf_text_tower_with_image_tower_from_clip_checkpoint(tmp_path):
    """The paper's variant: an image tower from a CLIP checkpoint beside a (Bio)ClinicalBERT text tower."""
    _tiny_bert(tmp_path / "bert")
    torch.manual_seed(0)
    donor = build_clip(ClipSpec(model="donor-test", model_config={
        "embed_dim": 16, "vision_cfg": VISION, "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}))
    export_clip(donor, donor.model, tmp_path / "donor")
    spec = ClipSpec(
        model="hf-text-test",
        model_config={"embed_dim": 16, "vision_cfg": VISION, "text_cfg": {
            "hf_model_name": str(tmp_path / "bert"), "hf_tokenizer_name": str(tmp_path / "bert"),
            "hf_pooler_type": "cls_pooler", "hf_proj_type": "linear", "context_length": 32}},
        image_tower_from=str(tmp_path / "donor" / "open_clip_model.safetensors"),
        pretrained_text=False,
    )
    clip = build_clip(spec)
    assert isinstance(clip.tokenizer, open_clip.tokenizer.HFTokenizer)
    for (k, v), (k2, v2) in zip(clip.model.visual.state_dict().items(), donor.model.visual.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    export_clip(clip, clip.model, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "bert")  # the exported folder must not need the original tower files
    loaded = load_clip(tmp_path / "ckpt")
    clip.model.eval()
    tokens = clip.tokenizer(TEXTS)
    assert torch.equal(tokens, loaded.tokenizer(TEXTS))
    assert torch.allclose(loaded.model.encode_text(tokens, normalize=True), clip.model.encode_text(tokens, normalize=True), atol=1e-6)


def test_matryoshka_loss_prefixes():
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    txt = torch.nn.functional.normalize(img + 0.1 * torch.randn(8, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    scale = torch.tensor(10.0)
    plain = ContrastiveLoss(16, MatryoshkaConfig(), seed=0)
    mat = ContrastiveLoss(16, MatryoshkaConfig(dims=[4, 8]), seed=0)
    assert mat.dims == [4, 8, None]
    clip_loss = open_clip.ClipLoss()
    expected = sum(clip_loss(truncate(img, d), truncate(txt, d), scale) for d in (4, 8, 16)) / 3
    assert torch.allclose(mat(img, txt, scale, step=0), expected)
    assert torch.allclose(plain(img, txt, scale, step=0), clip_loss(img, txt, scale))
    sampled = ContrastiveLoss(16, MatryoshkaConfig(dims=[4, 8], sample=True), seed=0)
    picks = {tuple(sampled.dims_for(s)) for s in range(40)}
    assert picks == {(4,), (8,), (None,)}
    assert sampled.dims_for(7) == sampled.dims_for(7)
    with pytest.raises(ValueError):
        ContrastiveLoss(16, MatryoshkaConfig(dims=[32]), seed=0)


TINY_SPEC = {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}


def test_pretrained_loads_from_a_local_file_or_folder(tmp_path):
    torch.manual_seed(0)
    source = build_clip(ClipSpec(model="tiny-pretrained-test", model_config=TINY_SPEC))
    export_clip(source, source.model, tmp_path / "weights")
    want = source.model.state_dict()
    for path in (tmp_path / "weights" / "open_clip_model.safetensors", tmp_path / "weights"):
        torch.manual_seed(1)  # a different random init, so equal weights prove they were loaded
        got = build_clip(ClipSpec(model="tiny-pretrained-test", model_config=TINY_SPEC, pretrained=str(path))).model.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), path


def test_pretrained_that_is_neither_file_nor_tag_is_a_config_error(tmp_path):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="no such file or folder, and not an open_clip tag"):
        build_clip(ClipSpec(model="tiny-pretrained-test", model_config=TINY_SPEC, pretrained=str(tmp_path / "nowhere.pt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weights file"):
        build_clip(ClipSpec(model="tiny-pretrained-test", model_config=TINY_SPEC, pretrained=str(tmp_path / "empty")))


@pytest.mark.parametrize("model, pretrained", [("RN50-quickgelu", "cc12m"), ("hf-hub:org/not-cached-clip", "")])
def test_offline_uncached_hub_weights_fail_fast_in_one_line(tmp_path, model, pretrained):
    """HF_HUB_OFFLINE and an empty cache: exit 2 and one line naming the tag, before any download."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONWARNINGS": "ignore"}
    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "train.json").write_text("[]")  # present; never read, the weights fail first
    proc = subprocess.run(
        [sys.executable, "-m", "retriever.finetune_clip", "--clip.model", model, "--clip.pretrained", pretrained,
         "--domains", "[pathology]", "--domain_classifier", "false", "--data.data_root", str(tmp_path),
         "--data.train_files", "{pathology: [train.json]}", "--output_dir", str(tmp_path / "out")],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and "not in the local cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert (repr(pretrained) if pretrained else model) in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_image_tower_file_is_named(tmp_path):
    spec = ClipSpec(model="donor-test", model_config={
        "embed_dim": 16, "vision_cfg": VISION, "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}},
        image_tower_from=str(tmp_path / "clip_init" / "open_clip_model.safetensors"))
    with pytest.raises(InputError, match="clip_init/open_clip_model.safetensors: no such file.*toy.pretrain_vision"):
        build_clip(spec)
