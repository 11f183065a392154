"""The policy M: any Hugging Face image-text-to-text model + its processor, optionally with a LoRA.

One small interface serves the pair builder (batched greedy generation), SFT and DPO (training
batches with prompt tokens masked out, per-sequence answer log-probabilities). Everything model
specific -- image preprocessing, the number of image tokens, the chat layout -- is left to the
checkpoint's own processor, so a LLaVA-Med v1.5 folder in HF format and the toy policy go
through the same code.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, LogitsProcessorList
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function

from common.config import doc
from common.io import InputError
from policy.prompts import Message, PromptTemplates, load_prompt_templates, plain_text, prompts_for

IGNORE = -100  # label value the loss skips (prompt and padding)
# batch keys sequence_logps reads to score answers and does not pass to the model (Policy.encode_for_training)
SCORING_KEYS = ("labels", "answer_index", "predicted_from")
LOGITS_CHUNK_MB = 64  # float32 logits per chunk of answer positions (policy.sequence_logps); above glibc's
# largest mmap threshold (32 MB), so on CPU each chunk goes back to the system when freed (smaller ones fragment the heap)
# text-config fields of models whose logits are a transform of the LM head's output
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")
# Prefix LMs whose token_type_ids mark the answer (1) against the prompt (0, attended both ways):
# training batches here are one causal sequence, so they are refused rather than trained wrong.
PREFIX_LM_PROCESSORS = ("PaliGemmaProcessor",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Prompt = list[Message] | str
Batch = dict[str, torch.Tensor]


@dataclass
class PolicySpec:
    """The ``policy:`` section of every stage config: which policy, loaded how, prompted in what wording.

    One section, so the pair builder, DPO, SFT, evaluation and inference name the same policy
    the same way (``--policy.path X``); how a stage runs it (device, answer lengths, token
    budget) stays in that stage's config.
    """

    path: str = doc("outputs/toy/policy", "policy checkpoint folder (Hugging Face model + processor)")
    init_adapter: str = doc("", "PEFT adapter merged into the checkpoint first (e.g. an SFT one); the policy is "
                                "then the two together")
    dtype: str = doc("float32", "weights dtype: float32 | bfloat16 | float16")
    trust_remote_code: bool = doc(False, "let transformers run model and processor code shipped in the checkpoint "
                                         "folder (only for checkpoints you trust)")
    prompts: str = doc("", "prompt templates YAML (policy.prompts); empty: the policy folder's prompts.yaml if it "
                           "has one (the wording it was tuned with), else configs/prompts/default.yaml")

    def prompts_file(self) -> Path:
        """The templates file this policy is prompted with (policy.prompts.prompts_for)."""
        return prompts_for(self.path, self.prompts)

    def templates(self) -> PromptTemplates:
        return load_prompt_templates(self.prompts_file())


@dataclass
class Policy:
    """A loaded model + processor; ``model`` may be a PeftModel.

    ``Policy(model=None, processor=p)`` only encodes (CPU float32 tensors), e.g. in DataLoader
    workers; the training loop moves batches to the device.
    """

    model: Any
    processor: Any
    path: str = ""

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.model is None else next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.model is None else next(self.model.parameters()).dtype

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or "<image>"

    def render(self, prompt: Prompt) -> str:
        """Prompt text ending where the answer starts.

        Messages go through the processor's chat template (``plain_text`` if it has none). A
        string is taken as already rendered; an image token is put in front if it has none.
        A leading BOS written by the template is dropped because the tokenizer adds its own.
        """
        if isinstance(prompt, str):
            text = prompt if self.image_token in prompt else f"{self.image_token}\n{prompt}"
        else:
            prompt = [self._without_image_token(m) for m in prompt]
            if getattr(self.processor, "chat_template", None):
                text = self.processor.apply_chat_template(
                    prompt, add_generation_prompt=True, tokenize=False
                )
            else:
                text = plain_text(prompt, self.image_token)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos) and self._tokenizer_adds_bos:
            text = text[len(bos):]
        return text

    def _without_image_token(self, message: Message) -> Message:
        """A copy whose texts hold no literal image token (a stray one in a retrieved report
        would ask the model for an image feature that does not exist)."""
        content = message["content"]
        if isinstance(content, str):
            return {**message, "content": content.replace(self.image_token, " ")}
        token = self.image_token
        clean = [
            {**c, "text": c["text"].replace(token, " ")} if c.get("type") == "text" else c
            for c in content
        ]
        return {**message, "content": clean}

    @cached_property
    def _tokenizer_adds_bos(self) -> bool:
        ids = self.tokenizer("a").input_ids
        return bool(ids) and ids[0] == self.tokenizer.bos_token_id

    def prompt_length(self, prompt: Prompt, image: Image.Image) -> int:
        """Tokens of ``prompt`` with ``image`` as the model sees them: the text's tokens plus the
        tokens the processor expands the image into (LLaVA's patches, Qwen2-VL's merged grid)."""
        return len(self.tokenizer(self.render(prompt)).input_ids) + self._image_tokens(image)

    def _image_tokens(self, image: Image.Image) -> int:
        """Tokens the processor adds for one image beyond its placeholder, by image size (the only
        thing the count depends on), measured once per size with the processor itself."""
        cache = self._image_tokens_by_size
        if image.size not in cache:
            enc = self.processor(images=[image.convert("RGB")], text=[self.image_token], return_tensors="pt")
            cache[image.size] = enc["input_ids"].shape[1] - len(self.tokenizer(self.image_token).input_ids)
        return cache[image.size]

    @cached_property
    def _image_tokens_by_size(self) -> dict[tuple[int, int], int]:
        return {}

    def answer_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """Each answer's token ids + EOS, as a training row holds them (a stray image token becomes a space)."""
        tok = self.tokenizer
        ids = tok([a.replace(self.image_token, " ").strip() for a in answers], add_special_tokens=False)["input_ids"]
        return [list(x) + [tok.eos_token_id] for x in ids]

    def process(self, images: Sequence[Image.Image], texts: list[str], padding_side: str) -> Any:
        """Processor call: pixel values + prompt ids with the image tokens expanded."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} prompts")
        rgb = [im.convert("RGB") for im in images]
        enc = self.processor(
            images=rgb, text=texts, return_tensors="pt", padding=True, padding_side=padding_side
        )
        return enc.to(self.device).to(self.dtype)

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[Prompt],
        max_new_tokens: int = 64,
        batch_size: int = 8,
        progress: bool = False,
        logits_processor: Callable[[list[int]], LogitsProcessorList] | None = None,
        num_beams: int = 1,
        temperature: float = 0.0,
        return_tokens: bool = False,
    ) -> list[str] | tuple[list[str], list[list[int]]]:
        """Greedy (or, with ``num_beams`` > 1, beam-search) answers, one per (image, prompt), in input order.
        With ``temperature`` > 0 each answer is sampled at that temperature from the whole vocabulary
        but the image token (no top-k or top-p cut, as TRL's GRPOTrainer samples), from torch's
        seeded generator. ``return_tokens``: also each answer's generated token ids, through its
        first EOS, so that a trainer scores what was sampled (decoding and tokenizing again need
        not give the same tokens).

        ``logits_processor(indices)``: extra logits processors for the batch of those inputs
        (e.g. VCD's distorted-image branch, policy.decoding).

        Batches are formed from prompts of similar length (less padding) and left-padded, so
        every row's answer starts at the same column; the attention mask hides the padding and
        ``generate`` derives position ids from it, so a batched answer equals the one-at-a-time
        answer (tests/test_policy.py checks this).
        """
        texts = [self.render(p) for p in prompts]
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} prompts")
        tok = self.tokenizer
        sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0,  # an image token in an answer could not be scored
                    "suppress_tokens": [tok.convert_tokens_to_ids(self.image_token)]} if temperature > 0 else {}
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            num_beams=num_beams,
            **sampling,
            use_cache=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        answers: list[str] = [""] * len(texts)
        tokens: list[list[int]] = [[] for _ in texts]
        was_training = self.model.training
        self.model.eval()
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts, desc="generate", disable=not progress or len(starts) < 2):
            idx = order[s : s + batch_size]
            enc = self.process([images[i] for i in idx], [texts[i] for i in idx], "left")
            extra = {"logits_processor": logits_processor(idx)} if logits_processor else {}
            out = self.model.generate(**enc, generation_config=config, **extra)
            new = out[:, enc["input_ids"].shape[1] :]
            for i, row, text in zip(idx, new.tolist(), tok.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
                tokens[i] = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        self.model.train(was_training)
        return (answers, tokens) if return_tokens else answers

    def encode_for_training(
        self,
        prompts: Sequence[Prompt],
        answers: Sequence[str | tuple[str, ...]],
        images: Sequence[Image.Image],
        slots: Sequence[Sequence[int]] | None = None,
        answer_tokens: Sequence[Sequence[int]] | None = None,
    ) -> Batch:
        """Right-padded batch: input_ids, attention_mask, labels, and the processor's image keys.

        ``labels`` are the answer tokens + EOS; prompt and padding are IGNORE (-100). Prompt and
        answer are tokenized apart and joined, exactly the split generation sees. Nothing is cut:
        prompts are fitted to the token budget before (policy.budget). ``answer_tokens``: every
        answer's token ids in the order the answers come (a row's several in turn), taken as
        they are instead of tokenizing the texts (``generate(return_tokens=True)`` gives them).

        A row may hold several answers to its one prompt (a tuple): ``[prompt, a1, a2]``, each
        answer seeing the prompt and itself only, its positions starting where the prompt ends,
        so each scores as in a row of its own while the prompt is computed once. Such a batch
        (or one given ``slots``) also carries ``position_ids`` and, for ``sequence_logps``,
        ``answer_index`` (the output slot of each answer token; ``slots[i]`` gives row i's answers',
        default row-major order) and ``predicted_from`` (the position whose hidden state predicts it).
        """
        if not (len(prompts) == len(answers) == len(images)):
            raise ValueError(
                f"{len(prompts)} prompts, {len(answers)} answers, {len(images)} images"
            )
        name = type(self.processor).__name__
        if name in PREFIX_LM_PROCESSORS:
            raise InputError(f"{self.path or name}: {name} is a prefix LM (token_type_ids mark the answer); "
                             "SFT and DPO encode prompt + answer as one causal sequence and do not support it")
        tok = self.tokenizer
        groups = [(a,) if isinstance(a, str) else tuple(a) for a in answers]
        indexed = slots is not None or any(len(g) > 1 for g in groups)
        if slots is None:
            count = itertools.count()
            slots = [[next(count) for _ in g] for g in groups]
        flat = [a for g in groups for a in g]
        if answer_tokens is not None and len(answer_tokens) != len(flat):
            raise ValueError(f"{len(answer_tokens)} answer token lists for {len(flat)} answers")
        answer_ids = iter([list(t) for t in answer_tokens] if answer_tokens is not None else self.answer_ids(flat))
        enc = self.process(images, [self.render(p) for p in prompts], "right")
        # Other per-token outputs (Qwen2-VL's mm_token_type_ids, Gemma 3's token_type_ids) are
        # laid out like input_ids; answer and padding positions get 0, the text-token type.
        text = ("input_ids", "attention_mask", "labels")  # rebuilt below (a processor's own labels too)
        types: dict[str, list[list[int]]] = {k: [] for k in _per_token_keys(enc) if k not in text}
        ids, labels, index, source, positions = [], [], [], [], []
        for i, (row, mask, group) in enumerate(zip(enc["input_ids"], enc["attention_mask"], groups)):
            keep = mask.bool()
            prompt = row[keep].tolist()
            n = len(prompt)
            ids.append(list(prompt))
            labels.append([IGNORE] * n)
            index.append([-1] * n)
            source.append([-1] * n)
            positions.append(list(range(n)))
            for slot, ans in zip(slots[i], (next(answer_ids) for _ in group)):
                ids[-1] += ans
                labels[-1] += ans
                index[-1] += [slot] * len(ans)
                source[-1] += [n - 1] + list(range(len(ids[-1]) - len(ans), len(ids[-1]) - 1))
                positions[-1] += list(range(n, n + len(ans)))
            for k, rows in types.items():
                rows.append(enc[k][i][keep].tolist() + [0] * (len(ids[-1]) - n))
        width = max(len(x) for x in ids)
        batch = {k: v for k, v in enc.items() if k not in text and k not in types}
        batch["input_ids"] = _pad(ids, width, tok.pad_token_id)
        batch["attention_mask"] = _pad([[1] * len(x) for x in ids], width, 0)
        batch["labels"] = _pad(labels, width, IGNORE)
        batch.update({k: _pad(rows, width, 0) for k, rows in types.items()})
        if indexed:
            batch["position_ids"] = _pad(positions, width, 0)
            batch["answer_index"] = _pad(index, width, -1)
            batch["predicted_from"] = _pad(source, width, -1)
        return {k: v.to(self.device) for k, v in batch.items()}

    def encode_preference(
        self,
        prompts: Sequence[Prompt],
        chosen: Sequence[str],
        rejected: Sequence[str],
        images: Sequence[Image.Image],
        rejected_images: Sequence[Image.Image] | None = None,
        share_prompt: bool = False,
        corrupted_images: Sequence[Image.Image] | None = None,
    ) -> Batch:
        """One batch for a single DPO forward, scored (``sequence_logps``) as 2B answers: [0, B)
        chosen, [B, 2B) rejected; with ``corrupted_images`` (mDPO) 3B, [2B, 3B) the chosen answer
        again under that image, each in a row of its own (its image differs, so no prompt to share).

        Each side has its own image (``rejected_images`` default to ``images``), e.g. the noised
        image on the rejected side of a cross-modality pair: such a pair takes two rows. With
        ``share_prompt`` a pair whose sides see the same image (the same object) takes one row
        [prompt, chosen, rejected] (``encode_for_training``), which scores the same.
        """
        rejected_images = images if rejected_images is None else rejected_images
        b = len(prompts)
        corrupted = list(corrupted_images or ())
        third = list(range(len(corrupted)))
        shared = [share_prompt and rejected_images[i] is images[i] for i in range(b)]
        if not any(shared):
            return self.encode_for_training(
                list(prompts) * 2 + [prompts[i] for i in third],
                list(chosen) + list(rejected) + [chosen[i] for i in third],
                list(images) + list(rejected_images) + corrupted,
            )
        one = [i for i in range(b) if shared[i]]
        two = [i for i in range(b) if not shared[i]]
        return self.encode_for_training(
            [prompts[i] for i in one + two + two + third],
            [(chosen[i], rejected[i]) for i in one] + [chosen[i] for i in two] + [rejected[i] for i in two]
            + [chosen[i] for i in third],
            [images[i] for i in one + two] + [rejected_images[i] for i in two] + corrupted,
            slots=[(i, b + i) for i in one] + [(i,) for i in two] + [(b + i,) for i in two]
            + [(2 * b + i,) for i in third],
        )


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _per_token_keys(batch: Any) -> list[str]:
    """Keys of a processor or training batch that hold one value per token (shaped as input_ids)."""
    shape = batch["input_ids"].shape
    return [k for k, v in batch.items() if torch.is_tensor(v) and v.shape == shape]


def sequence_logps(model: Any, batch: Batch, average: bool = False, chunk_mb: int = LOGITS_CHUNK_MB) -> torch.Tensor:
    """Sum (or mean, ``average``) of log p(token) over each answer's tokens (labels != -100):
    Tensor[answers], one answer per row, or per ``answer_index`` slot when rows hold several
    (``Policy.encode_for_training``; the attention mask then hides each answer from the others).

    The one answer scorer of SFT, DPO, GRPO and their evaluations (``token_logps`` per token).
    """
    logps, slot = token_logps(model, batch, chunk_mb)
    counts = answer_token_counts(batch)
    total = logps.new_zeros(len(counts)).index_add(0, slot, logps)
    return total / counts.clamp(min=1).to(total) if average else total


def token_logps(model: Any, batch: Batch, chunk_mb: int = LOGITS_CHUNK_MB) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every answer token (labels != -100), row by row; the answer slot each belongs to):
    two Tensor[answer tokens]. GRPO's loss is per token; ``sequence_logps`` sums them per answer.

    The model runs to its last hidden states only; the LM head and log-softmax then run on the
    answer positions alone, ``chunk_mb`` of float32 logits at a time, each chunk's logits
    recomputed in the backward instead of kept. The [B, T, vocab] logits never exist: at a real
    vocabulary (Qwen2-VL: 151,936) they, not the weights, decide whether a training step fits.
    """
    lm = causal_lm(model)
    inputs = {k: v for k, v in batch.items() if k not in SCORING_KEYS}
    if "answer_index" in batch:
        inputs["attention_mask"] = answers_apart_mask(lm, batch)
    with last_hidden_state(lm.base_model) as kept:
        model(**inputs, use_cache=False, logits_to_keep=1)  # one position's logits: the head runs below
    rows, cols = (batch["labels"] != IGNORE).nonzero(as_tuple=True)
    source = batch["predicted_from"][rows, cols] if "predicted_from" in batch else cols - 1
    vocab = lm.config.get_text_config().vocab_size
    logps = answer_token_logps(lm.get_output_embeddings(), kept[0][rows, source], batch["labels"][rows, cols],
                               max(1, chunk_mb * 2**20 // (4 * vocab)))
    slot = batch["answer_index"][rows, cols] if "answer_index" in batch else rows
    return logps, slot


def answer_token_counts(batch: Batch) -> torch.Tensor:
    """Tokens of each answer ``sequence_logps`` scores (its labels that are not IGNORE): Tensor[answers]."""
    answer = batch["labels"] != IGNORE
    if "answer_index" not in batch:
        return answer.sum(-1)
    slots = batch["answer_index"][answer]
    return torch.zeros(int(batch["answer_index"].max()) + 1, dtype=torch.long, device=slots.device).index_add(
        0, slots, torch.ones_like(slots))


def answers_apart_mask(lm: Any, batch: Batch) -> Any:
    """The 4D attention mask of a batch whose rows hold several answers to one prompt: causal,
    padding hidden, and a key inside an answer seen only by that answer's own tokens. Built by
    the mask function transformers has for the text config's attention, so it has the form that
    implementation takes (boolean for sdpa, additive float for eager); models call it on a 4D
    mask no further (``prompt_sharing_blocker`` names those whose layers need more). Broadcast,
    not vmapped: ``create_causal_mask`` vmaps any custom mask function (16 rows of 100 tokens:
    25 ms a mask against 1 ms)."""
    index = batch["answer_index"]

    def own_answer(b: Any, _h: Any, q: Any, kv: Any) -> Any:
        return (index[b, kv] < 0) | (index[b, kv] == index[b, q])

    rows, length = index.shape
    make = ALL_MASK_ATTENTION_FUNCTIONS[lm.config.get_text_config()._attn_implementation]
    return make(batch_size=rows, q_length=length, kv_length=length, mask_function=and_masks(causal_mask_function, own_answer),
                attention_mask=batch["attention_mask"].bool(), allow_is_causal_skip=False, use_vmap=False,
                dtype=lm.dtype, device=index.device)


def prompt_sharing_blocker(model: Any) -> str | None:
    """Why rows holding several answers to one prompt (``answers_apart_mask``, shifted positions)
    would not score as separate rows on this model, or None when they do: the 4D mask reaches
    eager and sdpa attention only, in layers that all attend causally over the whole row, with
    positions that are one integer per token."""
    lm = causal_lm(model)
    text = lm.config.get_text_config()
    impl = text._attn_implementation
    if impl not in ("eager", "sdpa"):
        return f"attention {impl!r} takes no custom 4D mask here"
    if hasattr(lm.base_model, "get_rope_index"):
        return "its multimodal rotary positions are not one position per token"
    layers = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layers != {"full_attention"} or getattr(text, "sliding_window", None) is not None:
        return f"its layers are not all full attention ({sorted(layers)}, sliding_window {getattr(text, 'sliding_window', None)})"
    return None


def causal_lm(model: Any) -> Any:
    """The transformers model inside DDP / DeepSpeed and PEFT wrappers (its head and backbone are
    read from it; the forward still goes through the wrappers), checked to have a plain head."""
    from peft import PeftModel

    lm = unwrap_parallel(model)
    lm = lm.get_base_model() if isinstance(lm, PeftModel) else lm
    text = lm.config.get_text_config()
    scaled = [k for k in LOGIT_TRANSFORMS if getattr(text, k, None) not in (None, 1.0)]
    if scaled:
        raise ValueError(f"{type(lm).__name__}: its logits are not the LM head's output ({', '.join(scaled)}); "
                         "answer log-probs (policy.sequence_logps) support plain heads only")
    return lm


def unwrap_parallel(model: Any) -> Any:
    """The module inside a DDP or DeepSpeed wrapper (the model itself when it has none).

    What accelerate's ``extract_model_from_parallel`` (and ``Accelerator.unwrap_model``) does,
    without its search of every submodule for compiled regions on each call: 5 ms a call on the
    benchmark's tiny LLaVA, several calls a DPO step. A DeepSpeed engine exists only once
    deepspeed is imported, so it is looked up only then.
    """
    engine = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)
    wrappers = (torch.nn.parallel.DistributedDataParallel, *([engine] if engine else []))
    while isinstance(model, wrappers):
        model = model.module
    return model


@contextlib.contextmanager
def last_hidden_state(backbone: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list that receives the backbone's last hidden state (what the LM head reads) during the
    block: a forward hook, so the model's own forward, and its wrappers', run unchanged."""
    kept: list[torch.Tensor] = []
    handle = backbone.register_forward_hook(lambda _m, _i, out: kept.append(out[0]))
    try:
        yield kept
    finally:
        handle.remove()


def answer_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` [N, H] under ``head``, ``chunk`` rows at a time: Tensor[N].

    Written here because no library does it on every device: Liger-Kernel's fused linear
    cross-entropy is Triton (GPU) only, and TRL's ChunkedLogProbFunction reads the head's weight
    directly (ZeRO-3 then needs gathers by hand, a LoRA on the head would not train) and would
    make TRL a runtime dependency. Calling the head module under torch.utils.checkpoint keeps its
    hooks (ZeRO-3, PEFT) and lets the backward rebuild one chunk's logits at a time.
    """
    if len(hidden) <= chunk:  # one chunk within the budget: kept for the backward, not recomputed
        return _chunk_logps(head, hidden, targets)
    grad = torch.is_grad_enabled()
    # no determinism check: ZeRO-3 has released the head's weight by the time a recomputation
    # ends (its shape then differs from the one saved in the forward) and gathers it again for the backward
    parts = [
        checkpoint(_chunk_logps, head, h, t, use_reentrant=False, determinism_check="none") if grad
        else _chunk_logps(head, h, t)
        for h, t in zip(hidden.split(chunk), targets.split(chunk))
    ]
    return torch.cat(parts)


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return head(hidden).float().log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def load_policy(
    path: str | Path,
    adapter: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
) -> Policy:
    """Load a checkpoint folder (model + processor) and an optional PEFT adapter, in eval mode.

    ``merge_adapter`` folds the LoRA into the weights (faster inference, no PEFT wrapper).
    """
    for p, what in ((path, "policy checkpoint"), (adapter, "adapter")):
        if p is not None and not Path(p).is_dir():
            raise InputError(f"{p}: {what} folder does not exist")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token is None:  # Llama-family tokenizers ship without one
        tok.pad_token = tok.unk_token or tok.eos_token
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if merge_adapter:
            model = model.merge_and_unload()
    model.to(device).eval()
    return Policy(model=model, processor=processor, path=str(path))
