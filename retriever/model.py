"""The retrievers' CLIP: built, exported and loaded with open_clip (no vendored fork).

An architecture is an open_clip model name: a built-in (``RN50-quickgelu``), ``hf-hub:ORG/REPO``,
``local-dir:PATH``, or a name registered from a JSON architecture with
``open_clip.add_model_config`` (``ClipSpec.model_config``). The toy model ``toy-clip`` is such a
registered config (a tiny ViT + tiny text transformer on open_clip's bundled BPE tokenizer). A
Hugging Face text tower (BioClinicalBERT, as the paper names) is an architecture whose
``text_cfg`` carries ``hf_model_name``/``hf_tokenizer_name``; ``image_tower_from`` then fills the
image tower from a full CLIP checkpoint (e.g. RN50 trained on CC12M).

An exported folder (``export_clip``) is loadable three ways:

* ``load_clip(folder)`` (ours: registers the config, restores the tokenizer offline);
* ``open_clip.add_model_config(folder / "<name>.json")`` then
  ``open_clip.create_model_and_transforms("<name>", pretrained=folder / "open_clip_model.safetensors")``;
* ``open_clip.create_model_and_transforms("local-dir:" + folder)``.

Starting weights (``ClipSpec.pretrained``) are a weights file on disk, a folder holding one
(``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``, ...: picked as open_clip's
``local-dir:`` picks it), or an open_clip tag (``cc12m``), which open_clip fetches from the Hugging
Face Hub into its cache. On a machine without network (``HF_HUB_OFFLINE=1``, or the Hub not
reachable within ``PROBE_SECONDS``) a tag, or an ``hf-hub:`` model, must already be in that cache:
otherwise the run stops at once with one line saying so, instead of a minute of retries.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from common.config import ConfigError, doc
from common.io import InputError

TOY_MODEL = "toy-clip"
# Tiny enough to train on 2 CPU cores in about half a minute per domain. Its image tower is the
# toy policy's (32 px, patch 8, width 128, 2 layers, 4 heads): one pretrained tower starts both.
TOY_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # what open_clip's local-dir: schema reads
INFO = "clip.json"  # ours: registered name, source spec
HF_TEXT_DIR = "hf_text"  # HF text tower config, so a folder loads offline
PROBE_SECONDS = 3.0  # how long the Hub (or the proxy) may take to accept a connection before we call it offline


@dataclass
class ClipSpec:
    """Which open_clip model to build and where its starting weights come from."""

    model: str = doc(TOY_MODEL, "open_clip model name: built-in, registered, hf-hub:ORG/REPO or local-dir:PATH")
    pretrained: str = doc("", "starting weights: a weights file, a folder holding open_clip_model.safetensors / open_clip_pytorch_model.bin, or an open_clip tag (e.g. cc12m; offline it must be cached); empty = random init")
    model_config: dict[str, Any] = doc({}, "architecture JSON registered under `model` (open_clip.add_model_config); empty = built-in")
    image_tower_from: str = doc("", "full CLIP checkpoint whose image tower (visual.*) initialises ours, e.g. RN50 CC12M beside an HF text tower")
    pretrained_text: bool = doc(True, "load the HF text tower's own pretrained weights (hf_model_name) when no CLIP checkpoint is given")
    aug_cfg: dict[str, Any] = doc({}, "open_clip AugmentationCfg for training images (e.g. {scale: [0.7, 1.0], color_jitter: 0.2}); empty = open_clip's default")


@dataclass
class Clip:
    """A model with what it needs at hand: transforms, tokenizer, and its architecture."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str  # registered open_clip name (exported as <name>.json)
    model_cfg: dict[str, Any]


def register_model_config(name: str, cfg: dict[str, Any]) -> None:
    """Register ``cfg`` as open_clip model ``name`` (add_model_config reads it from a file)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)  # parsed at once; the registry keeps it in memory


def _export_name(model: str) -> str:
    """A file-safe open_clip name for an exported architecture (schemas and org/ dropped)."""
    return model.split(":", 1)[-1].rstrip("/").split("/")[-1]


def resolve_model_config(spec: ClipSpec) -> tuple[str, dict[str, Any]]:
    """Register the spec's architecture if needed; return (name to build, architecture dict)."""
    if spec.model_config:
        register_model_config(spec.model, spec.model_config)
    elif spec.model == TOY_MODEL and open_clip.get_model_config(TOY_MODEL) is None:
        register_model_config(TOY_MODEL, TOY_CONFIG)
    cfg = open_clip.get_model_config(spec.model)
    if cfg is None:
        raise ConfigError(f"unknown open_clip model {spec.model!r}; give model_config or one of open_clip.list_models()")
    return spec.model, cfg


def visual_weights(checkpoint: str | Path, option: str = "clip.image_tower_from") -> dict[str, torch.Tensor]:
    """The image tower of a full open_clip checkpoint (its ``visual.*`` keys, prefix dropped),
    read without unpickling code; ``option`` names what pointed at it in the messages."""
    if not Path(checkpoint).is_file():
        raise InputError(f"{option} {checkpoint}: no such file (no open_clip checkpoint there; the toy's is made by "
                         "`python -m toy.pretrain_vision`, the demo's pretrain_clip_tower stage)")
    state = open_clip.factory.load_state_dict(str(checkpoint), weights_only=True)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"{checkpoint}: no visual.* weights (not a full open_clip checkpoint)")
    return visual


def _load_visual_from(model: torch.nn.Module, checkpoint: str) -> None:
    """Copy the image tower of a full CLIP checkpoint (keys ``visual.*``) into ``model.visual``."""
    weights = visual_weights(checkpoint)  # read (and refused if unsafe) before the model is touched
    model.visual.load_state_dict(weights, strict=True)


@contextlib.contextmanager
def hub_offline(on: bool = True):
    """huggingface_hub's offline mode (what HF_HUB_OFFLINE sets) for the block: cached files, no request."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def offline_reason(seconds: float = PROBE_SECONDS) -> str | None:
    """Why the Hub cannot be used from here (HF_HUB_OFFLINE, or no connection within ``seconds``), or None.

    The connection (to the Hub, or to the HTTPS proxy if one is set) is tried in a thread, so a name
    lookup that hangs cannot hold the run longer than ``seconds`` either.
    """
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    proxy = urllib.request.getproxies().get("https")
    url = urllib.parse.urlsplit(proxy or constants.ENDPOINT)
    done, answered = threading.Event(), []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=seconds).close()
            answered.append(True)
        except (OSError, ValueError):
            pass
        finally:
            done.set()

    threading.Thread(target=connect, daemon=True).start()
    done.wait(seconds)
    return None if answered else f"{'proxy ' if proxy else ''}{url.hostname} not reachable within {seconds:g} s"


def _hub_cached(hub_file: str) -> bool:
    """Whether open_clip finds ``ORG/REPO/FILE`` (``ORG/REPO/``: its default weights) in the local cache."""
    with hub_offline():
        try:
            return bool(open_clip.download_pretrained({"hf_hub": hub_file}))
        except Exception:  # noqa: BLE001 - huggingface_hub and open_clip say "not cached" with several types
            return False


def _require_cached(what: str, hub_files: list[str], instead: str) -> bool:
    """True if the Hub must be left alone (offline, ``hub_files`` cached); ConfigError if offline and not cached."""
    from huggingface_hub import constants

    reason = offline_reason()
    if reason is None:
        return False
    if hub_files and all(_hub_cached(f) for f in hub_files):
        return True
    raise ConfigError(f"{what} is not in the local cache ({constants.HF_HUB_CACHE}) and this machine is offline "
                      f"({reason}); fetch it once where there is network, or {instead}")


def pretrained_source(model: str, pretrained: str) -> tuple[str | None, bool]:
    """What open_clip gets as ``pretrained``, and whether to build with the Hub offline (all of it cached).

    A folder stands for the weights file open_clip's ``local-dir:`` would pick in it. A tag, or an
    ``hf-hub:`` model, is checked before open_clip tries to fetch it (see the module docstring).
    """
    on_disk = "point clip.pretrained at the weights on disk (a file, or a folder holding open_clip_pytorch_model.bin / open_clip_model.safetensors)"
    if model.startswith("hf-hub:"):
        repo = model.removeprefix("hf-hub:").rstrip("/")
        return None, _require_cached(f"clip.model {model}", [f"{repo}/open_clip_config.json", f"{repo}/"],
                                     "set clip.model to local-dir:FOLDER (a folder holding open_clip_config.json and the weights)")
    if not pretrained or model.startswith("local-dir:"):
        return pretrained or None, False
    path = Path(pretrained).expanduser()
    if path.is_dir():
        found = open_clip.factory._find_checkpoint_in_dir(path)
        if found is None:
            raise ConfigError(f"clip.pretrained {path}: no weights file (*.safetensors, *.bin, *.pth) in this folder")
        return found, False
    if path.is_file():
        return str(path), False
    tag = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag:
        raise ConfigError(f"clip.pretrained {pretrained!r}: no such file or folder, and not an open_clip tag of {model} "
                          f"(its tags: {open_clip.list_pretrained_tags_by_model(model)})")
    return pretrained, _require_cached(f"clip.pretrained: open_clip tag {pretrained!r} of {model}",
                                       [tag["hf_hub"]] if tag.get("hf_hub") else [], on_disk)


def build_clip(spec: ClipSpec, device: str | torch.device = "cpu") -> Clip:
    """Create the model (fp32; mixed precision is accelerate's autocast) with transforms and tokenizer."""
    pretrained, offline = pretrained_source(spec.model, spec.pretrained)
    with hub_offline(offline):
        name, cfg = resolve_model_config(spec)
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, pretrained_text=spec.pretrained_text,
            aug_cfg=spec.aug_cfg or None,
        )
        tokenizer = open_clip.get_tokenizer(name)
    if spec.image_tower_from:
        _load_visual_from(model, spec.image_tower_from)
    return Clip(model, pre_train, pre_val, tokenizer, _export_name(name), cfg)


def export_clip(clip: Clip, model: torch.nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write open_clip weights (safetensors) and configs into ``folder`` (see module docstring).

    ``model`` is the (unwrapped) trained module; ``clip`` supplies architecture and tokenizer.
    """
    from open_clip.push_to_hf_hub import save_config_for_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    save_config_for_hf(model, folder / OPEN_CLIP_CONFIG, model_config=clip.model_cfg)
    (folder / f"{clip.name}.json").write_text(json.dumps(clip.model_cfg, indent=2))
    if hasattr(clip.tokenizer, "save_pretrained"):  # HF tokenizer: local-dir: loads it from here
        clip.tokenizer.save_pretrained(folder)
    text_config = getattr(getattr(model, "text", None), "config", None)
    if text_config is not None and hasattr(text_config, "save_pretrained"):
        text_config.save_pretrained(folder / HF_TEXT_DIR)
    (folder / INFO).write_text(json.dumps({"model_name": clip.name, "weights": WEIGHTS, **(extra or {})}, indent=2))


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> Clip:
    """Load an exported folder offline (an HF text tower is rebuilt from the saved config)."""
    folder = Path(folder)
    if not (folder / INFO).is_file():
        raise FileNotFoundError(f"{folder}: not an exported CLIP folder (no {INFO})")
    info = json.loads((folder / INFO).read_text())
    name = info["model_name"]
    cfg = json.loads((folder / f"{name}.json").read_text())
    local = copy.deepcopy(cfg)
    text_cfg = local.get("text_cfg", {})
    if "hf_model_name" in text_cfg and (folder / HF_TEXT_DIR).is_dir():
        text_cfg["hf_model_name"] = str(folder / HF_TEXT_DIR)
        text_cfg["hf_tokenizer_name"] = str(folder)
    register_model_config(name, local)
    model, pre_train, pre_val = open_clip.create_model_and_transforms(
        name, pretrained=str(folder / info["weights"]), device=device, pretrained_text=False,
    )
    model.eval()
    return Clip(model, pre_train, pre_val, open_clip.get_tokenizer(name), name, cfg)


def weights_fingerprint(folder: str | Path) -> str:
    """A content hash of an exported folder's weights (keys embedding caches)."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(folder) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def truncate(features: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Matryoshka view: the first ``dim`` coordinates, re-normalised (all of them if None)."""
    if dim is not None and dim < features.shape[-1]:
        features = features[..., :dim]
    return F.normalize(features.float(), dim=-1)


def gather_rows(accelerator: Any, local: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows in process order (shards may differ in length)."""
    if accelerator is None or accelerator.num_processes == 1:
        return local
    sizes = accelerator.gather(torch.tensor([local.shape[0]], device=accelerator.device)).tolist()
    padded = accelerator.gather(accelerator.pad_across_processes(local.to(accelerator.device), dim=0)).cpu()
    m = max(sizes)
    return torch.cat([padded[p * m : p * m + n] for p, n in enumerate(sizes)])


def _shard(n: int, accelerator: Any) -> range:
    """This process's contiguous slice of ``range(n)``."""
    if accelerator is None or accelerator.num_processes == 1:
        return range(n)
    with accelerator.split_between_processes(list(range(n))) as mine:
        return range(mine[0], mine[-1] + 1) if mine else range(0)


def _autocast(accelerator: Any):
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module, tokenizer: Callable, texts: list[str], batch_size: int = 256,
    accelerator: Any = None, desc: str = "texts",
) -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), D] (fp32, CPU), shards encoded across processes."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    mine = _shard(len(texts), accelerator)
    out = []
    quiet = accelerator is not None and not accelerator.is_main_process
    for s in tqdm(range(mine.start, mine.stop, batch_size), desc=desc, disable=quiet or len(mine) <= batch_size, leave=False):
        tokens = tokenizer(texts[s : min(s + batch_size, mine.stop)]).to(device)
        with _autocast(accelerator):
            out.append(model.encode_text(tokens, normalize=True).float().cpu())
    local = torch.cat(out) if out else torch.empty(0, _embed_dim(model))
    return gather_rows(accelerator, local)


@torch.no_grad()
def embed_images(
    model: torch.nn.Module, dataset: Any, batch_size: int = 256, accelerator: Any = None,
    num_workers: int = 0, bad_log: Any = None, desc: str = "images",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [n_good, D], dataset indices [n_good]) of a data.datasets image dataset.

    Items whose image is bad are left out (recorded in ``bad_log``): hence the indices. Shards
    are encoded across processes; every process gets the whole result, in dataset order.
    """
    from torch.utils.data import Subset

    from data.images import BadImageLog
    from data.loader import make_loader

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    bad_log = bad_log if bad_log is not None else BadImageLog()
    mine = _shard(len(dataset), accelerator)
    loader = make_loader(Subset(dataset, list(mine)), batch_size, num_workers=num_workers)
    embs, idx = [], []
    quiet = accelerator is not None and not accelerator.is_main_process
    for batch in tqdm(loader, desc=desc, disable=quiet or len(loader) <= 1, leave=False):
        batch = bad_log.take(batch)
        if batch is None:
            continue
        with _autocast(accelerator):
            embs.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        idx.append(torch.as_tensor(batch["index"]).long())
    local_e = torch.cat(embs) if embs else torch.empty(0, _embed_dim(model))
    local_i = torch.cat(idx) if idx else torch.empty(0, dtype=torch.long)
    return gather_rows(accelerator, local_e), gather_rows(accelerator, local_i[:, None])[:, 0]


def _embed_dim(model: torch.nn.Module) -> int:
    """The joint embedding size (needed to shape an empty shard)."""
    for tower in (getattr(model, "visual", None), getattr(model, "text", None)):
        if getattr(tower, "output_dim", None):
            return int(tower.output_dim)
    return int(model.text_projection.shape[-1])
