"""Merging shard caches: the caches that `mambavl extract --shard i/N` writes, joined into one cache in annotation
row order (`merge_caches`, `mambavl cache merge`), after `check_shards` refuses a set that would not make one whole
cache.

Reads and writes HDF5 only: no decoder, encoder or torch is imported, so a merge runs wherever h5py does.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from mambavl.cache import schema
from mambavl.cache.reader import open_cache, releases_caches
from mambavl.cache.writer import CacheWriter, RowMeta
from mambavl.errors import InputError, check_writable
from mambavl.extract.questions import QuestionSource


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """--shard "i/N" (also the `shard` attribute of a cache written with it) -> (i, N) with 0 <= i < N; None for
    None or "". InputError for anything else."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


# Attributes that may differ between the shards of one extraction (everything else must agree).
_SHARD_FREE_ATTRS = {"created", "shard", "source", "limit", "complete"}
_MERGE_BLOCK_ROWS = 2048  # rows copied per HDF5 read/write in a merge


def _parse_shard_attr(value, path) -> tuple[int, int] | None:
    text = schema.normalise_attr(value) or ""
    if not text:
        return None
    try:
        return parse_shard(text)
    except InputError:
        raise InputError(f"shard {path}: attribute 'shard' is {text!r}, expected i/N") from None


def check_shards(caches, expected_rows: np.ndarray | None = None) -> np.ndarray:
    """Refuse a set of shard caches that would not merge into one whole cache; return their source rows, concatenated
    in the order given.

    Checked, each failure naming the shard file: every shard is complete (each row valid or a recorded failure);
    the attributes agree (except creation time, shard, source, limit); shards written with ``--shard i/N`` are all
    of one N and each i appears once; no annotation row or narration_id is in two shards; the rows add up to the
    annotation file's rows (without ``--limit``) or to `expected_rows` when given.
    """
    first = caches[0]
    for c in caches:
        with schema.open_h5(c.path, "r", "shard") as f:
            if not bool(f.attrs.get("complete", False)):
                windows = [schema.RECOGNITION] + ([schema.ANTICIPATION] if c.attrs.get("anticipation") else [])
                counts = ", ".join(f"{w}: {int(f[schema.window_prefix(w) + 'valid'][()].sum())}/{c.n} valid"
                                   for w in windows)
                raise InputError(f"shard {c.path} is incomplete ({counts}, {len(c.failures())} recorded failures): "
                                 "re-run its extraction (it resumes) before merging")
    for c in caches[1:]:
        for key in sorted(set(first.attrs) | set(c.attrs)):
            if key in _SHARD_FREE_ATTRS:
                continue
            if schema.normalise_attr(first.attrs.get(key)) != schema.normalise_attr(c.attrs.get(key)):
                raise InputError(f"shard {c.path} differs from {first.path} in attribute {key!r}: "
                                 f"{c.attrs.get(key)!r} vs {first.attrs.get(key)!r}")
    plan = [_parse_shard_attr(c.attrs.get("shard"), c.path) for c in caches]
    if any(plan):
        if not all(plan):
            unsharded = next(c.path for c, s in zip(caches, plan) if s is None)
            raise InputError(f"{unsharded} was not written with --shard i/N, the other caches were")
        sizes = {s[1] for s in plan}
        if len(sizes) > 1:
            raise InputError(f"shards of different plans: --shard .../N with N in {sorted(sizes)}")
        n = sizes.pop()
        seen: dict[int, object] = {}
        for c, (i, _) in zip(caches, plan):
            if i in seen:
                raise InputError(f"shard {i}/{n} given twice: {seen[i]} and {c.path}")
            seen[i] = c.path
        missing = [f"{i}/{n}" for i in range(n) if i not in seen]
        if missing:
            raise InputError(f"shard(s) {', '.join(missing)} missing from the merge (got {len(seen)} of {n})")
    rows = []
    for c in caches:
        with schema.open_h5(c.path, "r", "shard") as f:
            rows.append(f["source_row"][()].astype(np.int64) if "source_row" in f else np.arange(c.n))
    allrows = np.concatenate(rows)
    uniq, counts = np.unique(allrows, return_counts=True)
    if (counts > 1).any():
        row = int(uniq[counts > 1][0])
        holders = [str(c.path) for c, r in zip(caches, rows) if row in set(r.tolist())]
        raise InputError(f"shards overlap: annotation row {row} is in {', '.join(holders)}")
    ids = np.concatenate([np.asarray(_closed_after(c, c.labels)["narration_id"]) for c in caches])
    ids_u, ids_c = np.unique(ids, return_counts=True)
    if (ids_c > 1).any():
        raise InputError(f"shards overlap: narration_id {ids_u[ids_c > 1][0]!r} is in more than one shard")
    if expected_rows is not None:
        expected = np.sort(np.asarray(expected_rows, dtype=np.int64))
        if not np.array_equal(np.sort(allrows), expected):
            lost = np.setdiff1d(expected, allrows)
            raise InputError(f"shards hold {len(allrows)} rows, {len(expected)} were planned"
                             + (f" (row {int(lost[0])} is in none)" if len(lost) else ""))
    total = schema.normalise_attr(first.attrs.get("annotation_rows", -1))
    if any(plan) and int(schema.normalise_attr(first.attrs.get("limit", -1))) < 0 and total >= 0 \
            and len(allrows) != total:
        lost = np.setdiff1d(np.arange(total), allrows)
        raise InputError(f"shards hold {len(allrows)} rows but the annotation file has {total}"
                         + (f" (row {int(lost[0])} is in none)" if len(lost) else ""))
    return allrows


def _closed_after(cache, read):
    """`read()` (a method of `cache` that opens its file), then close the file: a merge of many shards keeps at most
    one shard open for its tables (the open-files limit, `ulimit -n`, is often 1024 or less)."""
    try:
        return read()
    finally:
        cache.close()


class _ShardFiles:
    """The shards' HDF5 files, opened on demand and kept open while the open-files limit (`ulimit -n`) allows.

    At most `max_open` at once (from the limit, less the descriptors already in use and a reserve); when opening one
    fails with "too many open files" anyway, the least recently used is closed and the open retried. Only when not
    even one shard can be opened is it an error, naming the limit."""

    RESERVE = 16  # descriptors left for the output file, HDF5, Python's own imports and the progress display

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.open: OrderedDict[int, h5py.File] = OrderedDict()
        limit = schema.open_files_limit()
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 32
        self.max_open = max(1, limit - in_use - self.RESERVE) if limit > 0 else len(self.paths)

    def get(self, s: int) -> h5py.File:
        if s in self.open:
            self.open.move_to_end(s)
            return self.open[s]
        while len(self.open) >= self.max_open:
            self.open.popitem(last=False)[1].close()
        while True:
            try:
                f = h5py.File(self.paths[s], "r")  # validated by open_cache (check_contained) before the merge
                break
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self.open:
                    self.open.popitem(last=False)[1].close()
                    self.max_open = max(1, len(self.open))
                    continue
                raise InputError(schema.os_error_message(exc, self.paths[s], "shard", need=len(self.paths) + 20)
                                 or schema.damaged_message(self.paths[s], exc, "shard")) from exc
        self.open[s] = f
        return f

    def close(self) -> None:
        while self.open:
            self.open.popitem(last=False)[1].close()


@releases_caches
def merge_caches(paths: list[str], out: str, expected_rows: np.ndarray | None = None) -> Path:
    """Join shard caches (from --shard i/N) into one cache `out` in annotation row order, after `check_shards`.

    The merged file is written under a temporary name and renamed when whole; `out` must not exist.
    """
    if not paths:
        raise InputError("cache merge needs at least one shard")
    out_path = Path(out)
    if out_path.exists():
        raise InputError(f"{out_path} exists; merge writes a new file")
    check_writable(out_path, "merged cache")
    caches = [open_cache(p) for p in paths]
    first = caches[0]
    allrows = check_shards(caches, expected_rows)
    order = np.argsort(allrows, kind="stable")
    windows = [schema.RECOGNITION] + ([schema.ANTICIPATION] if first.attrs.get("anticipation") else [])
    # row metadata in merged order
    labels = [c.labels() for c in caches]

    def cat(key):
        return np.concatenate([np.asarray(lab[key]) for lab in labels])[order]

    nouns_all = [a for lab in labels for a in lab[schema.ALL_NOUNS]]
    meta = RowMeta(
        narration_id=list(cat("narration_id")), video_id=list(cat("video_id")),
        participant_id=list(cat("participant_id")), narration=list(cat("narration")),
        verb_class=cat("verb_class").astype(np.int32), noun_class=cat("noun_class").astype(np.int32),
        all_noun_classes=[tuple(nouns_all[i]) for i in order], start_time=cat("start_time"),
        stop_time=cat("stop_time"),
    )
    attrs = {k: v for k, v in first.attrs.items() if k not in ("shard", "complete")}
    attrs["source"] = "merged: " + ", ".join(str(Path(p).name) for p in paths)
    tmp = out_path.with_name(out_path.name + ".partial")
    if tmp.exists():
        tmp.unlink()
    try:
        _write_merged(tmp, attrs, meta, caches, allrows, order, windows)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed merge (a full disk) leaves nothing behind; the shards are untouched
        raise
    for c in caches:
        c.close()
    tmp.replace(out_path)
    return out_path


def _merge_views(w: CacheWriter, files, which: np.ndarray, local: np.ndarray, lo: int) -> None:
    """Views 1..V-1 of merged rows lo.. (shard `which`, row `local` in it), written before the block's done-flags."""
    k = len(which)
    feats = np.zeros((k, w.extra_views, w.frames, w.dim), dtype=np.float16)
    times = np.full((k, w.extra_views, w.frames), np.nan, dtype=np.float32)
    for s in np.unique(which):
        sel = which == s
        rows = local[sel]
        src = slice(int(rows[0]), int(rows[-1]) + 1)
        feats[sel] = files.get(int(s))[schema.VIEW_FEATURES][src]
        times[sel] = files.get(int(s))[schema.VIEW_FRAME_TIMES][src]
    w.write_view_block(lo, feats, times)


def _write_merged(tmp: Path, attrs: dict, meta: RowMeta, caches, allrows: np.ndarray, order: np.ndarray,
                  windows: list[str]) -> None:
    """Write the merged cache `tmp`: rows block by block in merged order, failures, question and answer tables."""
    first = caches[0]
    with CacheWriter(tmp, attrs, meta, first.verb_keys, first.noun_keys) as w:
        w.f.create_dataset("source_row", data=allrows[order].astype(np.int64))
        # merged position -> (shard, row in the shard); a shard's rows keep their order, so the rows of one shard
        # that land in a block of merged positions are one slice of that shard
        which = np.concatenate([np.full(c.n, s, dtype=np.int64) for s, c in enumerate(caches)])[order]
        local = np.concatenate([np.arange(c.n) for c in caches])[order]
        files = _ShardFiles([c.path for c in caches])
        try:
            for window in windows:
                p = schema.window_prefix(window)
                for lo in range(0, len(order), _MERGE_BLOCK_ROWS):
                    hi = min(len(order), lo + _MERGE_BLOCK_ROWS)
                    feats = np.zeros((hi - lo, w.frames, w.dim), dtype=np.float16)
                    times = np.full((hi - lo, w.frames), np.nan, dtype=np.float32)
                    nf = np.zeros(hi - lo, dtype=np.int16)
                    valid = np.zeros(hi - lo, dtype=bool)
                    for s in range(len(caches)):
                        sel = which[lo:hi] == s
                        if not sel.any():
                            continue
                        f = files.get(s)
                        rows = local[lo:hi][sel]
                        src = slice(int(rows[0]), int(rows[-1]) + 1)  # contiguous: rows == arange(start, stop)
                        feats[sel] = f[p + "features"][src]
                        times[sel] = f[p + "frame_times"][src]
                        nf[sel] = f[p + "num_frames"][src]
                        valid[sel] = f[p + "valid"][src]
                    if w.extra_views and window == schema.RECOGNITION:
                        _merge_views(w, files, which[lo:hi], local[lo:hi], lo)
                    w.write_block(lo, feats, times, nf, valid, window)
        finally:
            files.close()
        position = np.empty(len(allrows), dtype=np.int64)
        position[order] = np.arange(len(allrows))
        offset = 0
        for c in caches:
            for fail in _closed_after(c, c.failures):
                w.record_failure(int(position[offset + fail["index"]]), fail["window"], fail["reason"])
            offset += c.n
        _copy_text_tables(caches, w, order, allrows)
        w.finalize()


def _copy_text_tables(caches, w: CacheWriter, order: np.ndarray, allrows: np.ndarray) -> None:
    """Questions: the union of the shards' tables; per-segment indices remapped. Answers: the union of pairs."""
    texts: list[str] = []
    index: dict[str, int] = {}
    tok_rows, mask_rows, pooled_rows = [], [], []
    per_segment_parts: dict[str, list[np.ndarray]] = {}
    keyed_parts: dict[str, list[np.ndarray]] = {}
    templates = None
    pairs: dict[tuple[int, int], np.ndarray] = {}
    for c in caches:
        bank = _closed_after(c, c.questions)
        remap = np.empty(len(bank.texts), dtype=np.int64)
        for j, t in enumerate(bank.texts):
            if t not in index:
                index[t] = len(texts)
                texts.append(t)
                tok_rows.append(bank.tokens[j])
                mask_rows.append(bank.mask[j])
                pooled_rows.append(bank.pooled[j])
            remap[j] = index[t]
        if templates is None:
            templates = {k: remap[v] for k, v in bank.templates.items()}
        for source, table in bank.per_segment.items():
            per_segment_parts.setdefault(source, []).append(np.where(table >= 0, remap[np.maximum(table, 0)], -1))
            keyed_parts.setdefault(source, []).append(
                bank.label_keyed.get(source, np.zeros(len(table), dtype=bool)))
        answers = _closed_after(c, c.answers)
        for (v, n), e in zip(answers.action_pairs, answers.action):
            pairs.setdefault((int(v), int(n)), e)
    per_segment = {s: np.concatenate(parts)[order] for s, parts in per_segment_parts.items()
                   if len(parts) == len(caches)}
    # Renumber the union in the order one unsharded run would have made it (`build_question_table`: the template
    # texts as the first shard lists them, then each per-segment source's questions in row order), so a merged cache
    # equals the single-process one table for table.
    first_bank = caches[0].questions()
    template_idx = sorted({int(i) for v in first_bank.templates.values() for i in v})
    visit = [index[first_bank.texts[i]] for i in template_idx]
    for source in [q.value for q in QuestionSource if q.value in per_segment]:
        visit.extend(int(i) for i in per_segment[source].ravel() if i >= 0)
    visit.extend(range(len(texts)))  # anything not reached above keeps its place at the end
    new_of = np.full(len(texts), -1, dtype=np.int64)
    order_q: list[int] = []
    for i in visit:
        if new_of[i] < 0:
            new_of[i] = len(order_q)
            order_q.append(i)
    texts = [texts[i] for i in order_q]
    tok_rows, mask_rows, pooled_rows = ([rows_[i] for i in order_q] for rows_ in (tok_rows, mask_rows, pooled_rows))
    templates = {k: new_of[v] for k, v in templates.items()}
    per_segment = {s: np.where(t >= 0, new_of[np.maximum(t, 0)], -1) for s, t in per_segment.items()}
    label_keyed = {s: np.concatenate(keyed_parts[s])[order] for s in per_segment}
    w.write_questions(texts, np.stack(tok_rows), np.stack(mask_rows), np.stack(pooled_rows), templates, per_segment,
                      label_keyed)
    keys = sorted(pairs)
    all_text = {}
    for c in caches:
        a = c.answers()
        all_text.update(dict(zip(map(tuple, a.action_pairs.tolist()), a.action_text)))
    dt = answers.verb.shape[1]
    w.write_answers(answers.verb, answers.noun, np.asarray(keys).reshape(-1, 2),
                    np.stack([pairs[k] for k in keys]) if keys else np.zeros((0, dt)), answers.verb_text,
                    answers.noun_text, [all_text[k] for k in keys])
