"""Questions and answers: which text reaches the model, and how honest it is.

Four question sources (recorded in the cache, the checkpoint and metrics.json):

* ``templates`` (default) — a fixed bank per kind (verb, noun, scene, next_verb, next_noun). Paraphrases are sampled
  in training, paraphrase 0 is asked at evaluation. No text derived from the evaluated segment reaches the model,
  so results are honest and the EK-100 test split (no narrations) works.
* ``annotation`` — the paper's protocol: questions written from each segment's narration, the verb question with
  the noun masked and the noun question with the verb masked. Each question therefore still contains its own
  answer word; `leak_rate` measures that, and ``mambavl audit-questions`` measures what it is worth in accuracy.
* ``predicted`` — self-questioning: the template question followed by the answer-text embeddings of the top-k verb
  (noun) candidates that a video-only first pass proposes. Built in stage 2 from the cache's templates and answers/
  tables, so nothing per segment is stored here; label-free by construction and usable on the test split.
* ``file`` — user-supplied questions (e.g. LLM-written), keyed by narration_id, by action class "verb,noun", or
  global (key ``*``: asked of every segment without its own entry). A class key is the segment's label: such rows are
  flagged (`label_keyed`) and refused at evaluation, where they would hand the model the answer; they stay usable
  for training rows.

`label_keyed` marks, per source and row, a question derived from the segment's labels (the narration, or a class
key). The audit's label-permutation check moves those rows together with the labels.

Answers: natural phrases of the class keys ("put-down" -> "put down", "tap:water" -> "water tap"), embedded by the
text tower; the QA head scores them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import numpy as np

from mambavl.errors import InputError

MASK = "[MASK]"
# Particles of multi-word instances ('get-in', 'put-down', 'take-out'): not answer words on their own.
PARTICLES = frozenset(
    "in on up down off out into onto from to with of at away back over under around aside inside outside "
    "through about for by together apart the a an and or it its that this".split()
)


class QuestionSource(str, Enum):
    TEMPLATES = "templates"
    ANNOTATION = "annotation"
    FILE = "file"
    PREDICTED = "predicted"


# Sources whose questions are stored per segment in the cache (questions/per_segment/<source>).
PER_SEGMENT_SOURCES = (QuestionSource.ANNOTATION.value, QuestionSource.FILE.value)
# The key of a question-file entry asked of every segment that has no entry of its own.
GLOBAL_KEY = "*"


# kind -> paraphrases; index 0 is the evaluation phrasing. None names an action or object of a segment.
TEMPLATES: dict[str, tuple[str, ...]] = {
    # Chosen so that no word is a class key or instance of the EK-100 vocabularies (tested): e.g. "using" and
    # "hands" are instances of EK-100 nouns ('spoon:using', 'hand'), so they stay out.
    "verb": (
        "What is the person doing?",
        "What action is being performed?",
        "What activity is shown?",
        "Which action does the person perform?",
        "What is happening?",
    ),
    "noun": (
        "Which object is involved?",
        "What is the object of the action?",
        "Which object does the action concern?",
    ),
    "scene": (
        "Which objects are in the scene?",
        "What objects are present?",
        "Which things are present in the scene?",
    ),
    "next_verb": (
        "What will the person do next?",
        "Which action comes next?",
        "What is the person about to do?",
        "What happens next?",
    ),
    "next_noun": (
        "Which object will the person need next?",
        "Which object comes next?",
        "Which object is involved next?",
    ),
    "action": (
        "Which action is performed on which object?",
        "What is done, and to which object?",
        "Which action and object are shown?",
    ),
}


def phrase(key: str) -> str:
    """A class key as words: "put-down" -> "put down"; EK-100 noun keys "tap:water" -> "water tap"."""
    parts = key.split(":")
    words = " ".join(reversed(parts)) if len(parts) > 1 else key
    return words.replace("-", " ").replace("_", " ").strip()


def _lemma_words(forms: Sequence[str]) -> set[str]:
    """Word forms of class instances: 'put-down' -> {put, down}; 'tap:water' -> {tap, water}."""
    words = set()
    for form in forms:
        for w in re.split(r"[-:_\s]+", form.lower()):
            if len(w) >= 2 and w not in PARTICLES:
                words.add(w)
    return words


def _matches(word: str, lemmas: set[str]) -> bool:
    """Does a narration word inflect one of the lemmas (open -> opens/opened/opening; take -> taking; cut -> cutting)?"""
    w = word.lower().strip(".,;:!?'\"()")
    if not w:
        return False
    for lemma in lemmas:
        if w == lemma:
            return True
        stem = lemma[:-1] if lemma.endswith("e") and len(lemma) > 3 else lemma
        if len(stem) >= 3 and w.startswith(stem) and len(w) - len(stem) <= 4 and re.fullmatch(
                r"(e|es|s|ed|d|ing|\w?ing|\w?ed|ies|ied)?", w[len(stem):]):
            return True
    return False


def mask_words(text: str, forms: Sequence[str]) -> str:
    """Replace the words of `text` that inflect any of `forms` by the mask token (consecutive masks merge)."""
    lemmas = _lemma_words(forms)
    out: list[str] = []
    for word in text.split():
        token = MASK if _matches(word, lemmas) else word
        if token == MASK and out and out[-1] == MASK:
            continue
        out.append(token)
    return " ".join(out)


def contains_answer(text: str, forms: Sequence[str]) -> bool:
    """Does `text` contain an inflection of any answer form (class key or instance)?"""
    lemmas = _lemma_words(forms)
    return any(_matches(w, lemmas) for w in text.split())


def _forms(key: str, instances: Sequence[str], written: str) -> list[str]:
    return [key, *instances, *([written] if written else [])]


def annotation_questions(segment, verbs, nouns) -> tuple[str, str]:
    """The paper's protocol: (verb question, noun question) from the narration; the verb question masks the noun,
    the noun question masks the verb. Refused for a segment without a narration."""
    if not segment.narration:
        raise InputError(f"row {segment.row} ({segment.narration_id}): no narration, so no annotation questions "
                         "(the test split has none: use --questions templates)")
    noun_forms = (_forms(nouns.keys[segment.noun_class], nouns.instances[segment.noun_class], segment.noun)
                  if 0 <= segment.noun_class < len(nouns) else [segment.noun] if segment.noun else [])
    verb_forms = (_forms(verbs.keys[segment.verb_class], verbs.instances[segment.verb_class], segment.verb)
                  if 0 <= segment.verb_class < len(verbs) else [segment.verb] if segment.verb else [])
    without_noun = mask_words(segment.narration, noun_forms) if noun_forms else segment.narration
    without_verb = mask_words(segment.narration, verb_forms) if verb_forms else segment.narration
    return (f"What is the person doing in '{without_noun}'?", f"Which object is used in '{without_verb}'?")


# Limits of a questions file (docs/extract.md). EK-100's 90k segments with two 200-character questions each take
# ~40 MB; a question may be of any length (the text tower reads its first tokens).
MAX_QUESTION_FILE_BYTES = 512 * 1024 * 1024
# JSON nesting deeper than this is refused before parsing (a questions file is 3 levels deep at most).
MAX_JSON_DEPTH = 64
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 LE"), (b"\x00\x00\xfe\xff", "UTF-32 BE"), (b"\xff\xfe", "UTF-16 LE"),
         (b"\xfe\xff", "UTF-16 BE"))


def read_question_text(path: Path) -> str:
    """The text of a questions file: UTF-8 (a UTF-8 byte-order mark is allowed), at most MAX_QUESTION_FILE_BYTES.
    InputError naming the file and the problem: too large, UTF-16/32 (by byte-order mark or by its NUL bytes),
    or a byte that is not UTF-8 (with its offset, line and column)."""
    size = path.stat().st_size
    if size > MAX_QUESTION_FILE_BYTES:
        raise InputError(f"{path}: questions file of {size / 2**20:.0f} MiB, more than the "
                         f"{MAX_QUESTION_FILE_BYTES // 2**20} MiB allowed")
    data = path.read_bytes()
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise InputError(f"{path}: not UTF-8 (looks {name}: it starts with that byte-order mark, as Windows "
                             f"editors and PowerShell write 'Unicode'); save it as UTF-8")
    head = data[:4096]
    if head and head.count(0) >= len(head) // 4:
        raise InputError(f"{path}: not UTF-8 (looks UTF-16 or UTF-32: {head.count(0)} of its first {len(head)} "
                         "bytes are NUL); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(f"{path}: not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}, "
                         f"column {column}) is not valid UTF-8 ({exc.reason}); save the file as UTF-8") from None


def _json_depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings (a linear scan over the brackets, quotes and backslashes only)."""
    depth = deepest = 0
    in_string = False
    skip_at = -1  # the character after a backslash inside a string is escaped
    for match in re.finditer(r'[\[\]{}"\\]', text):
        if match.start() == skip_at:
            continue
        ch = match.group()
        if in_string:
            if ch == "\\":
                skip_at = match.end()
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def check_question_text(path: Path, text: str, where: str) -> None:
    """InputError naming the file, entry/field and position of a character a question cannot hold: NUL (HDF5
    strings end at it) and lone surrogates (U+D800-U+DFFF: half of a UTF-16 pair, e.g. an emoji cut in half,
    which no UTF-8 text can hold)."""
    bad = _UNSTORABLE.search(text)
    if bad is not None:
        i, code = bad.start(), ord(bad.group())
        if code == 0:
            raise InputError(f"{path}: {where}: NUL character (U+0000) at position {i + 1}; questions are stored "
                             "as text, which cannot hold it")
        if 0xD800 <= code <= 0xDFFF:
            raise InputError(f"{path}: {where}: invalid character U+{code:04X} at position {i + 1} (a lone "
                             "surrogate: half of a UTF-16 pair, e.g. an emoji cut in half)")


def load_question_file(path: str | os.PathLike, segments) -> list[tuple[str, str]]:
    """Per-segment (verb question, noun question) from a CSV or JSON file (see `question_file_lookup`)."""
    return question_file_lookup(path, segments)[0]


def question_file_lookup(path: str | os.PathLike, segments) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Per-segment (verb question, noun question) from a CSV or JSON file, and which rows were found by class.

    CSV columns: ``narration_id`` (or ``verb_class,noun_class``), ``verb_question``, ``noun_question``; a
    narration_id of ``*`` is a global entry. JSON: {"narration_id": {"verb": q, "noun": q}, ...}, {"v,n": {...}},
    {"*": {...}} or a list of records with the CSV columns. Lookup order per segment: its narration_id, the global
    entry, its action class "verb_class,noun_class". Returns (questions (N pairs), label_keyed (N,) bool: True where
    the question was found by the segment's own class, i.e. by its label). A segment without questions -> InputError
    naming the file and row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: questions file not found")
    table: dict[str, tuple[str, str]] = {}
    class_table: dict[str, tuple[str, str]] = {}

    def add(key: str, vq, nq, where: str, by_class: bool = False) -> None:
        if not isinstance(vq, str) or not isinstance(nq, str) or not vq.strip() or not nq.strip():
            raise InputError(f"{path}: {where}: needs non-empty verb_question and noun_question")
        check_question_text(path, key, f"{where}, its key")
        check_question_text(path, vq, f"{where}, field verb")
        check_question_text(path, nq, f"{where}, field noun")
        (class_table if by_class else table)[key] = (vq.strip(), nq.strip())

    def record_key(rec: dict, where: str) -> tuple[str, bool]:
        if rec.get("narration_id"):
            return str(rec["narration_id"]).strip(), False
        if rec.get("verb_class") not in (None, "") and rec.get("noun_class") not in (None, ""):
            try:
                return f"{int(rec['verb_class'])},{int(rec['noun_class'])}", True
            except (TypeError, ValueError):
                raise InputError(f"{path}: {where}: verb_class/noun_class must be integers") from None
        raise InputError(f"{path}: {where}: field 'narration_id' (or 'verb_class' and 'noun_class') missing")

    text = read_question_text(path)
    if path.suffix.lower() == ".json":
        depth = _json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise InputError(f"{path}: JSON nested too deeply ({depth} levels; at most {MAX_JSON_DEPTH} are read, "
                             "a questions file needs 3)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise InputError(f"{path}: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
        if isinstance(data, dict):
            for key, value in data.items():
                if not isinstance(value, dict):
                    raise InputError(f"{path}: entry {key!r}: expected an object with 'verb' and 'noun'")
                compact = str(key).replace(" ", "")
                add(compact, value.get("verb"), value.get("noun"), f"entry {key!r}",
                    by_class=re.fullmatch(r"-?\d+,-?\d+", compact) is not None)
        elif isinstance(data, list):
            for i, rec in enumerate(data, start=1):
                if not isinstance(rec, dict):
                    raise InputError(f"{path}: record {i}: expected an object")
                key, by_class = record_key(rec, f"record {i}")
                add(key, rec.get("verb_question"), rec.get("noun_question"), f"record {i}", by_class)
        else:
            raise InputError(f"{path}: expected a JSON object or list")
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for col in ("verb_question", "noun_question"):
                if col not in (reader.fieldnames or []):
                    raise InputError(f"{path}: missing column {col!r}")
            for i, rec in enumerate(reader, start=1):
                key, by_class = record_key(rec, f"row {i}")
                add(key, rec.get("verb_question"), rec.get("noun_question"), f"row {i}", by_class)
        except csv.Error as exc:
            raise InputError(f"{path}: line {reader.line_num}: not a readable CSV row ({exc})") from None
    out = []
    label_keyed = np.zeros(len(segments), dtype=bool)
    for i, s in enumerate(segments):
        q = table.get(s.narration_id) or table.get(GLOBAL_KEY)
        if q is None:
            q = class_table.get(f"{s.verb_class},{s.noun_class}")
            label_keyed[i] = q is not None
        if q is None:
            raise InputError(f"{path}: no questions for segment {s.narration_id} (row {s.row}) by narration_id, "
                             f"global key {GLOBAL_KEY!r} or action class {s.verb_class},{s.noun_class}")
        out.append(q)
    return out, label_keyed


def refuse_label_keyed(source: str, label_keyed: np.ndarray | None, rows: np.ndarray, question_file: str,
                       narration_ids: Sequence[str] | None = None) -> None:
    """At evaluation: InputError when any evaluated row's `source` question was found by the row's own class
    (its label), naming the question file and the first such segments. label_keyed (N,) bool or None, rows (R,)."""
    if label_keyed is None or not len(rows):
        return
    hit = np.asarray(rows)[np.asarray(label_keyed, dtype=bool)[np.asarray(rows)]]
    if len(hit):
        names = [str(narration_ids[r]) if narration_ids is not None else f"row {r}" for r in hit[:3]]
        raise InputError(
            f"question file {question_file or '(unknown)'}: {len(hit)} evaluated segment(s) (e.g. {', '.join(names)}) "
            f"take their {source!r} questions by their own verb_class,noun_class, i.e. from the answer; class-keyed "
            f"questions are for training rows only. Key them by narration_id or give a global '{GLOBAL_KEY}' entry"
        )


def answer_texts(verbs, nouns, pairs: Sequence[tuple[int, int]]) -> tuple[list[str], list[str], list[str]]:
    """Answer phrases: verbs (V,), nouns (Nn,), actions for (verb, noun) pairs (A,)."""
    v = [phrase(k) for k in verbs.keys]
    n = [phrase(k) for k in nouns.keys]
    a = [f"{v[i]} {n[j]}" for i, j in pairs]
    return v, n, a


def leak_rate(questions: Sequence[str], answer_forms: Sequence[Sequence[str]]) -> float:
    """Fraction of questions that contain their own answer (any form of the class key/instances). NaN if empty."""
    if not questions:
        return float("nan")
    hits = sum(contains_answer(q, forms) for q, forms in zip(questions, answer_forms))
    return hits / len(questions)


def build_question_table(segments, verbs, nouns, sources: Sequence[str], question_file: str | None = None):
    """Deduplicated question texts and the indices each protocol uses.

    Returns (texts, templates: kind -> (P,) int32, per_segment: source -> (N, 2) int32 with -1 where absent,
    label_keyed: source -> (N,) bool, True where the row's question derives from its labels: every annotation
    question (made from the narration), and file questions found by action class). `predicted` needs no table here.
    Annotation questions are built only for segments with a narration; a split without any is refused."""
    sources = [QuestionSource(s).value for s in sources]
    texts: list[str] = []
    index: dict[str, int] = {}

    def idx(text: str) -> int:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    templates = {kind: np.asarray([idx(t) for t in phrases], dtype=np.int32) for kind, phrases in TEMPLATES.items()}
    per_segment: dict[str, np.ndarray] = {}
    label_keyed: dict[str, np.ndarray] = {}
    n = len(segments)
    if QuestionSource.ANNOTATION.value in sources:
        if not any(s.narration for s in segments):
            raise InputError("annotation questions need narrations, and these annotations have none "
                             "(the test split): use --questions templates")
        table = np.full((n, 2), -1, dtype=np.int32)
        for i, s in enumerate(segments):
            if s.narration:
                vq, nq = annotation_questions(s, verbs, nouns)
                table[i] = (idx(vq), idx(nq))
        per_segment[QuestionSource.ANNOTATION.value] = table
        label_keyed[QuestionSource.ANNOTATION.value] = table[:, 0] >= 0
    if QuestionSource.FILE.value in sources:
        if not question_file:
            raise InputError("--questions file needs --questions-file PATH")
        table = np.full((n, 2), -1, dtype=np.int32)
        questions, keyed = question_file_lookup(question_file, segments)
        for i, (vq, nq) in enumerate(questions):
            table[i] = (idx(vq), idx(nq))
        per_segment[QuestionSource.FILE.value] = table
        label_keyed[QuestionSource.FILE.value] = keyed
    return texts, templates, per_segment, label_keyed
