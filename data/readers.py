"""Read every MMed-RAG annotation format into typed records (docs/DESIGN.md, file contracts 1-3).

A file is either a JSON list (``[{...}, ...]``) or JSONL (one object per line); which one is told
by its first character, not its name. Its kind (report, VQA, preference) is told by the keys of
its first record unless ``kind=`` is given. Retrieval JSONL (contract 2) reads as its base kind,
its additions (``reference_reports``, ``retrieve_k``, ``domain``...) landing in ``meta``.

A file that cannot be read at all (missing, broken JSON, not a list) raises ``InputError`` naming
``FILE:LINE:COL`` or ``FILE``. A record that parses but cannot be used (not an object, no question
text, no image, no report text, wrong types) is a bad record, named ``FILE:LINE`` (JSONL) or
``FILE:[index]`` (JSON list): by default it is skipped, logged and handed to the caller's
``skipped`` list for its run summary, so that one bad line does not cost a whole release file;
``bad_record="error"`` raises at the first one. Answers are not judged here (see data.validate).

A preference record without an ``id`` gets one from its content (``content_id``), so the pairs of
one question share it wherever the file lies.

Memory matters (real VQA sets hold 600k+ questions, ~0.75 KB each here): ``raw`` is the parsed
dict itself, JSONL is parsed in chunks so that key strings are shared, and repeated values
(image paths, reports, answers, image roots, the one-view ``images`` list of the several
questions on an image) are stored once per file. Treat records as read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Literal

from common.io import InputError, read_path
from data.images import Roots, image_roots, pick_root
from data.records import Kind, PreferenceRecord, Record, ReportRecord, VqaRecord

log = logging.getLogger(__name__)

BadRecordPolicy = Literal["skip", "error"]
MAX_LOGGED = 20  # bad records logged per file; the rest are still counted and collected
IMAGE_MARK = "<image>"
REPORT_TEXT_KEYS = ("report", "caption", "gpt4_summary")
REPORT_IMAGE_KEYS = ("image_path", "image")
VQA_IMAGE_KEYS = ("image", "image_path")
_CHUNK_BYTES = 1 << 20  # JSONL lines parsed per json.loads call (as one array)

_REPORT_KNOWN = {"id", "image_root", *REPORT_TEXT_KEYS, *REPORT_IMAGE_KEYS}
_VQA_KNOWN = {"question_id", "question", "answer", "report", "image_root", *VQA_IMAGE_KEYS}
_PREF_KNOWN = {
    "id", "image", "image_root", "conversations", "rejected_conversations", "rejected_noised",
    "chosen_noised", "rejected_image", "pair_type", "domain", "task",
}


def detect_kind(path_or_obj: str | Path | dict | list) -> Kind:
    """The kind of a record (dict), of a list of records (its first one) or of a file."""
    if isinstance(path_or_obj, (str, Path)):
        first = _first_record(Path(path_or_obj))
        if first is None:
            raise InputError(f"{path_or_obj}:1: no records; cannot tell the kind (pass kind=)")
        return detect_kind(first)
    if isinstance(path_or_obj, list):
        if not path_or_obj:
            raise InputError("no records; cannot tell the kind (pass kind=)")
        return detect_kind(path_or_obj[0])
    if not isinstance(path_or_obj, dict):
        raise InputError(f"a record must be a JSON object, got {type(path_or_obj).__name__}")
    keys = path_or_obj.keys()
    if "conversations" in keys:
        return "preference"
    if "question" in keys:
        return "vqa"
    if any(k in keys for k in (*REPORT_TEXT_KEYS, "image_path", "filename")):
        return "report"
    raise InputError(
        f"cannot tell the kind from keys {sorted(keys)}: expected `conversations` (preference), "
        "`question` (VQA) or `report`/`caption`/`image_path` (report); pass kind="
    )


def read_records(
    path: str | Path,
    kind: Kind | None = None,
    default_image_root: Roots = None,
    bad_record: BadRecordPolicy = "skip",
    skipped: list[str] | None = None,
) -> list[Record]:
    """All usable records of an annotation file, as ReportRecord, VqaRecord or PreferenceRecord.

    ``default_image_root`` becomes the ``image_root`` of records that carry none of their own (a
    record's own root that does not exist here still falls back to it: data.images.resolve_image).
    Given several folders (one per image set), each record gets its own root if it exists here,
    else the first folder holding its first image, else the first folder.

    A bad record (see module doc) is skipped and its ``FILE:LINE: why`` appended to ``skipped``
    when ``bad_record`` is ``skip``; with ``error`` it raises InputError.

    A record's own relative ``image_root`` is taken relative to the file's folder, as index.json
    paths are (pairs.build_pairs writes them so, and a moved folder of outputs still reads); an absolute
    one is kept as written.
    """
    path = Path(path)
    if kind is not None and kind not in _PARSERS:
        raise InputError(f"{path}: unknown kind {kind!r}; expected one of {sorted(_PARSERS)}")
    if bad_record not in ("skip", "error"):
        raise ValueError(f"bad_record must be 'skip' or 'error', got {bad_record!r}")
    roots = image_roots(default_image_root)
    default_root = roots[0] if len(roots) == 1 else None
    shared: dict[Any, Any] = {}  # one stored copy of each repeated value (see _text, _images)
    beside_file: dict[str, str] = {}  # a record's relative image_root -> that root under the file's folder
    parse = _PARSERS[kind] if kind else None
    records: list[Record] = []
    n_bad = 0
    for where, raw in _iter_raw(path):
        try:
            if not isinstance(raw, dict):
                raise InputError(f"{where}: expected a JSON object (a record), got {type(raw).__name__}")
            record_parse = parse or _PARSERS[_kind_at(raw, where)]
            rec = record_parse(raw, where, shared)
        except InputError as e:
            if bad_record == "error":
                raise
            n_bad += 1
            skip_record(str(e), n_bad, path, skipped)
            continue
        parse = record_parse
        if rec.image_root is not None and not os.path.isabs(rec.image_root):
            root = rec.image_root
            if root not in beside_file:
                beside_file[root] = read_path(root, path.parent)
            rec.image_root = beside_file[root]
        if len(roots) > 1:
            rec.image_root = pick_root(rec.image_root, roots, _first_ref(rec))
        elif rec.image_root is None:
            rec.image_root = default_root
        records.append(rec)
    return records


def _kind_at(raw: dict, where: str) -> Kind:
    try:
        return detect_kind(raw)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def skip_record(message: str, n_bad: int, path: Path, skipped: list[str] | None) -> None:
    """Log (the first MAX_LOGGED of a file) and collect one skipped bad record; every reader of
    annotation files skips this way."""
    if n_bad <= MAX_LOGGED:
        log.warning("%s (record skipped)", message)
    elif n_bad == MAX_LOGGED + 1:
        log.warning("%s: more bad records; counted, not logged", path)
    if skipped is not None:
        skipped.append(message)


def _first_ref(rec: Record) -> str | None:
    """The image a record's root is chosen by: its (first) image, else its .npz."""
    if isinstance(rec, PreferenceRecord):
        return rec.image
    return rec.images[0] if rec.images else getattr(rec, "npz", None)


def bad_records_summary(skipped: Sequence[str]) -> dict[str, Any]:
    """The ``bad_records`` entry of a run summary: how many records were skipped, and which."""
    return {"count": len(skipped), "records": list(skipped)}


# ---------------------------------------------------------------- file formats


def _skip_space(data: bytes) -> bytes:
    return data.removeprefix(b"\xef\xbb\xbf").lstrip()


def _iter_raw(path: Path):
    """Yield ``(where, parsed object)`` for every record of a JSON-list or JSONL file."""
    if not path.is_file():
        raise InputError(f"{path}: annotation file does not exist")
    with open(path, "rb") as f:
        head = _skip_space(f.read(4096))
        while not head and f.peek(1):  # only blank space so far
            head = _skip_space(f.read(4096))
    if not head:
        raise InputError(f"{path}:1: empty file; expected a JSON list or JSONL records")
    if head[:1] == b"[":
        yield from _iter_json_list(path)
    elif head[:1] == b"{":
        yield from _iter_jsonl(path)
    else:
        _not_a_list(path, _load_json(path))  # _load_json raises with line/col if broken


def _not_a_list(path: Path, data: Any) -> None:
    raise InputError(f"{path}: top level is a {type(data).__name__}; expected a list of records")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def read_index(path: str | Path, roles: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """The entries of a retrieval ``index.json`` whose ``role`` is in ``roles``, with ``path``,
    ``source`` and ``image_root`` joined to the index's folder (absolute ones stay as they are).

    The index (``{"files": [...]}`` or a bare list) is written by ``retriever.retrieve`` and
    ``toy.oracle_retrieval``; SFT, pair building and evaluation find their retrieval JSONL through it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: retrieval index does not exist (run scripts/retrieve.sh or "
                         "python -m toy.oracle_retrieval)")
    data = _load_json(path)
    entries = data.get("files") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of file entries (or {{'files': [...]}})")
    found = []
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise InputError(f"{path}: entry [{n}] needs a `path` (the retrieval JSONL)")
        if e.get("role") in roles:
            found.append({**e, "path": path.parent / e["path"], "source": read_path(e.get("source"), path.parent),
                          "image_root": read_path(e.get("image_root"), path.parent)})
    if not found:
        raise InputError(f"{path}: no entry with role in {list(roles)}")
    return found


def _iter_json_list(path: Path):
    data = _load_json(path)
    if not isinstance(data, list):
        _not_a_list(path, data)
    prefix = f"{path}:["
    for i, raw in enumerate(data):
        yield f"{prefix}{i}]", raw


def _iter_jsonl(path: Path):
    """Parse JSONL a chunk of lines at a time (one json.loads of ``[l1,l2,...]``: fast, and key
    strings shared within the chunk); a chunk that fails is parsed line by line for the error."""
    lineno, first_line, prefix = 0, None, f"{path}:"
    with open(path, "rb") as f:
        while lines := f.readlines(_CHUNK_BYTES):
            if lineno == 0:
                lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")
            numbered = [(lineno + k, ln) for k, ln in enumerate(lines, 1) if not ln.isspace()]
            lineno += len(lines)
            if first_line is None and numbered:
                first_line = numbered[0][0]
            try:
                objs = json.loads(b"[" + b",".join([ln for _, ln in numbered]) + b"]")
            except (json.JSONDecodeError, UnicodeDecodeError):
                objs = None
            if objs is None or len(objs) != len(numbered):
                objs = [_parse_line(path, n, ln, n == first_line) for n, ln in numbered]
            for (n, _), obj in zip(numbered, objs):
                yield f"{prefix}{n}", obj


def _parse_line(path: Path, n: int, line: bytes, first: bool) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        if first and _whole_file_is_object(path):  # a pretty-printed object, not JSONL
            _not_a_list(path, {})
        raise InputError(f"{path}:{n}: not valid JSON (column {e.colno}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{n}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def _whole_file_is_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_bytes()), dict)
    except ValueError:
        return False


def _first_record(path: Path) -> Any:
    """The first record of a file without parsing all of it (for detect_kind on a path)."""
    if not path.is_file():
        raise InputError(f"{path}: annotation file does not exist")
    with open(path, "rb") as f:
        head = _skip_space(f.read(1 << 20))
    if head[:1] == b"[":
        try:
            text = head[1:].decode("utf-8", "replace").lstrip()
            return json.JSONDecoder().raw_decode(text)[0]
        except json.JSONDecodeError:  # first record longer than the head, an empty list, or broken
            pass
    return next((raw for _, raw in _iter_raw(path)), None)


# ---------------------------------------------------------------- record parsers


def _text(raw: dict, key: str, where: str, shared: dict) -> str:
    """``raw[key]`` as stripped text, stored once per file (``raw`` then holds that copy too)."""
    value = raw.get(key)
    if value.__class__ is str:
        text = value.strip()
        text = shared.setdefault(text, text)
        if text == value:
            raw[key] = text
        return text
    if value is None:
        return ""
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise InputError(f"{where}: `{key}` is a {type(value).__name__}; expected text")


def _id(raw: dict, keys: tuple[str, ...], where: str) -> str:
    """The record id from the first present key; a record without one is named by its place."""
    for key in keys:
        value = raw.get(key)
        if value is not None and value != "":
            return str(value)
    return where


def content_id(image: str, prompt: str) -> str:
    """The id of a preference record that has none: a hash of its image (as written) and prompt.

    Independent of the file's path and the record's place, and shared by the pairs of one
    question, so those land on one side of the held-out split (dpo.pair_data.is_heldout).
    """
    return "pair-" + hashlib.sha256(f"{image}\0{prompt}".encode()).hexdigest()[:16]


def _images(raw: dict, keys: tuple[str, ...], where: str, shared: dict) -> list[str]:
    """Image paths from the first non-empty key: a string or a list of views.

    Records of one single-view image (the several questions on it) share one list.
    """
    for key in keys:
        value = raw.get(key)
        if not value:
            continue
        if value.__class__ is str:
            views = shared.get((value,))
            if views is None:
                views = shared[(value,)] = [shared.setdefault(value, value)]
            raw[key] = views[0]
            return views
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            views = [shared.setdefault(v, v) for v in value if v]
            if views:
                raw[key] = views  # the record shares the list with `raw`
                return views
            continue
        raise InputError(f"{where}: `{key}` must be a path or a list of paths, got {value!r:.80}")
    return []


def _root(raw: dict, shared: dict) -> str | None:
    root = raw.get("image_root")
    return shared.setdefault(root, root) if isinstance(root, str) and root else None


def _flag(raw: dict, key: str, where: str) -> bool:
    value = raw.get(key, 0)
    if value in (0, 1, None, "0", "1", "") or isinstance(value, bool):
        return value in (1, "1", True)
    raise InputError(f"{where}: `{key}` must be 0 or 1, got {value!r}")


def _meta(raw: dict, known: set[str]) -> dict[str, Any]:
    if raw.keys() <= known:
        return {}
    return {k: v for k, v in raw.items() if k not in known}


def _parse_report(raw: dict, where: str, shared: dict) -> ReportRecord:
    text = ""
    for key in REPORT_TEXT_KEYS:
        if text := _text(raw, key, where, shared):
            break
    if not text:
        raise InputError(f"{where}: no text: `report`, `caption` and `gpt4_summary` are all empty")
    images = _images(raw, REPORT_IMAGE_KEYS, where, shared)
    npz = raw.get("filename")
    npz = npz if isinstance(npz, str) and npz.lower().endswith(".npz") else None
    if not images and not npz:
        raise InputError(f"{where}: no image: `image_path`, `image` and .npz `filename` are empty")
    return ReportRecord(
        id=_id(raw, ("id",), where),
        text=text,
        images=images,
        image_root=_root(raw, shared),
        npz=npz,
        meta=_meta(raw, _REPORT_KNOWN),
        raw=raw,
        source=where,
    )


def strip_image_mark(text: str) -> str:
    """A prompt without LLaVA's ``<image>`` marker line ("<image>\\n..." or "...\\n<image>")."""
    text = text.strip()
    if IMAGE_MARK not in text:
        return text
    if text.endswith(IMAGE_MARK):
        text = text[: -len(IMAGE_MARK)]
    if text.startswith(IMAGE_MARK):
        text = text[len(IMAGE_MARK):]
    return text.strip()


def _parse_vqa(raw: dict, where: str, shared: dict) -> VqaRecord:
    question = strip_image_mark(_text(raw, "question", where, shared))
    if not question:
        raise InputError(f"{where}: no text: `question` is missing or empty")
    images = _images(raw, VQA_IMAGE_KEYS, where, shared)
    if not images:
        raise InputError(f"{where}: no image: `image` is missing or empty")
    return VqaRecord(
        id=_id(raw, ("question_id", "id"), where),
        question=shared.setdefault(question, question),
        answer=_text(raw, "answer", where, shared),
        images=images,
        report=_text(raw, "report", where, shared),
        image_root=_root(raw, shared),
        meta=_meta(raw, _VQA_KNOWN),
        raw=raw,
        source=where,
    )


def _turns(raw: dict, key: str, where: str) -> tuple[str, str]:
    """(first human turn, first gpt turn after it) of a LLaVA conversation."""
    conv = raw.get(key)
    if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
        raise InputError(f"{where}: `{key}` must be a list of {{from, value}} turns")
    human = next((i for i, t in enumerate(conv) if t.get("from") == "human"), None)
    gpt = next((t for t in conv[(human or 0) + 1:] if t.get("from") == "gpt"), None)
    if human is None or gpt is None:
        raise InputError(f"{where}: `{key}` needs a human turn followed by a gpt turn")
    prompt, reply = conv[human].get("value"), gpt.get("value")
    if not isinstance(prompt, str) or not isinstance(reply, str) or not reply.strip():
        raise InputError(f"{where}: no text: `{key}` turns must have non-empty string values")
    return strip_image_mark(prompt), reply.strip()


def _optional_str(raw: dict, key: str, shared: dict) -> str | None:
    value = raw.get(key)
    return shared.setdefault(value, value) if isinstance(value, str) and value else None


def _parse_preference(raw: dict, where: str, shared: dict) -> PreferenceRecord:
    images = _images(raw, ("image",), where, shared)
    if not images:
        raise InputError(f"{where}: no image: `image` is missing or empty")
    prompt, chosen = _turns(raw, "conversations", where)
    _, rejected = _turns(raw, "rejected_conversations", where)
    return PreferenceRecord(
        id=_id(raw, ("id",), "") or content_id(images[0], prompt),
        image=images[0],
        prompt=shared.setdefault(prompt, prompt),
        chosen=chosen,
        rejected=rejected,
        rejected_noised=_flag(raw, "rejected_noised", where),
        chosen_noised=_flag(raw, "chosen_noised", where),
        rejected_image=_optional_str(raw, "rejected_image", shared),
        image_root=_root(raw, shared),
        pair_type=_optional_str(raw, "pair_type", shared),
        domain=_optional_str(raw, "domain", shared),
        task=_optional_str(raw, "task", shared),
        meta=_meta(raw, _PREF_KNOWN),
        raw=raw,
        source=where,
    )


_PARSERS: dict[str, Callable[[dict, str, dict], Record]] = {
    "report": _parse_report,
    "vqa": _parse_vqa,
    "preference": _parse_preference,
}
