"""Decode only what the sampled frames need, exactly: which H.264 packets of a window the decoder may skip.

A segment decode samples a few frames (16) from a window of hundreds. The decoder must still decode every picture the
sampled ones are predicted from, transitively; the rest feeds nothing that is kept:

* **non-reference pictures** (H.264 ``nal_ref_idc == 0``: B-frames no other picture predicts from) that are not
  sampled themselves. By definition no later picture reads them, so leaving them out changes no decoded pixel;
  ffmpeg's ``-skip_frame noref`` does this for *every* such picture, which is inexact whenever a sampled frame is
  one of them — here they are skipped per picture, only when not sampled.
* **everything before an IDR picture** that lies between two needed pictures (in decoding order): an IDR empties
  the decoder's reference buffer, so the pictures after it decode the same whether or not the ones before were
  decoded. That is a seek per sample where a keyframe lies between samples, at no more cost than reading the
  packets: skipping them costs less than decoding them for any GOP, so no cost model is needed.
* **reference pictures nothing kept reads** (x264's B-pyramid: the middle B of each group is a reference only its
  group's non-reference B reads; the pictures after the last sample). They cannot simply be left out: the decoder's
  reference buffer and POC state must go on as in the stream (`mambavl.extract.h264_refs` explains why ffmpeg's
  filling of the gap would change other pictures). They are *decoded as stand-ins*: an all-skip P slice with the
  picture's ``frame_num``, POC and reference marking, a copy at a fraction of the cost. Which pictures a kept one
  reads is read from the slice headers (`h264_refs.simulate`: reference lists as the decoder builds them).

Without stand-ins the plan is handed to the ffmpeg command as the ``noise`` bitstream filter's ``drop`` expression on
the input (packets named by their byte position in the file). With stand-ins the packets are read here and sent to
ffmpeg through a pipe (NUT, `stand_in_stream`), the left-out ones missing and the stand-ins in place, with the
timestamps ffmpeg's ``-ss`` would give them; the rest of the decode — ``fps`` filter, scaling, cropping — is unchanged
and the frames stay bit-identical (tests/test_decode_plan.py compares them with the plain decode on streams with
B-frames, B-pyramids, several reference frames, open GOPs, all-P and variable-frame-rate streams). Stand-in frames are
output by the decoder with their own timestamps and never picked: the frame displayed at a sampled time is needed.

The piped stream carries no display matrix (and is used only where the container's stream parameters survive the trip,
`_survives_pipe`): rotated or flipped MP4s, and other containers, keep the file path. Where exactness cannot be shown
cheaply the decode is today's: codecs other than H.264, H.264 without ``avcC``
framing (raw Annex B), SVC/MVC extensions, packets without timestamps or out of file order, and streams with
reordered pictures whose SPS carries no ``bitstream_restriction`` (ffmpeg's decoder then guesses its output delay
from the pictures it sees, which would differ when pictures are left out) decode whole; slice headers outside what
`h264_refs` models (fields, long-term references, ...) or an open-GOP start keep every reference picture. Packets
carrying parameter sets are always kept. A frame within `_TICK_EPS` of a requested time is kept together with its
neighbour, so the choice of the frame displayed at that time is left to ffmpeg's own arithmetic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import threading
from dataclasses import dataclass, field

import av
import numpy as np

from mambavl.extract import h264_refs

_TICK_EPS = 1e-4           # seconds: frames this close to a requested time keep both candidates
_SLICE_TYPES = (1, 5)      # coded slice of a non-IDR / IDR picture
_PARAM_TYPES = (7, 8, 13, 15)  # SPS, PPS, SPS extension, subset SPS: never dropped
_UNSUPPORTED_TYPES = (14, 20, 21)  # SVC / MVC / 3D slice extensions: no plan


@dataclass(frozen=True)
class _Packet:
    pos: int        # byte position in the file (names the packet in the drop expression)
    time: float     # presentation time, seconds on the container timeline (0 = container start)
    ref: bool       # some slice has nal_ref_idc > 0 (or no slice at all: kept)
    idr: bool       # contains an IDR slice
    params: bool    # contains a parameter set


def sps_has_bitstream_restriction(sps_nal: bytes) -> bool:
    """Whether an H.264 SPS NAL unit (header byte included) carries VUI ``bitstream_restriction_flag`` (then the
    decoder's reordering delay is fixed by the stream: ``max_num_reorder_frames``). H.264 7.3.2.1.1 and E.1.1."""
    return h264_refs.parse_sps(sps_nal).bitstream_restriction


@dataclass(frozen=True)
class _AvcConfig:
    length_size: int            # bytes of each NAL unit's length prefix
    bitstream_restriction: bool  # every SPS of the avcC record has it
    sps: tuple = ()             # the record's parameter sets, parsed (empty when one does not parse)
    pps: tuple = ()
    pipe: bool = True           # the packets may be piped (`stand_in_stream`): no display matrix to lose


def _avc_config(extradata: bytes | None) -> _AvcConfig | None:
    """Parse an ``avcC`` record (ISO/IEC 14496-15 5.2.4.1); None when the stream is not framed that way."""
    if not extradata or len(extradata) < 7 or extradata[0] != 1:
        return None
    length_size = (extradata[4] & 3) + 1
    i, restricted, sps, pps = 6, [], [], []
    for kind in ("sps", "pps"):
        count = extradata[i - 1] & (0x1F if kind == "sps" else 0xFF)
        for _ in range(count):
            n = int.from_bytes(extradata[i:i + 2], "big")
            nal = extradata[i + 2:i + 2 + n]
            i += 2 + n
            try:
                if kind == "sps":
                    sps.append(h264_refs.parse_sps(nal))
                else:
                    pps.append(h264_refs.parse_pps(nal))
            except (IndexError, ValueError):
                sps, pps = [None], [None]
        i += 1  # the next count byte
        if kind == "sps":
            restricted = [x is not None and x.bitstream_restriction for x in sps]
    ok = None not in sps and None not in pps
    return _AvcConfig(length_size, bool(restricted) and all(restricted), tuple(sps) if ok else (),
                      tuple(pps) if ok else ())


def _nal_units(data: bytes, length_size: int) -> list[bytes] | None:
    """The NAL units of one access unit (slices cut to their first 512 bytes: the header is all that is read); None
    when its framing is broken or it uses an extension."""
    i, nals = 0, []
    while i + length_size < len(data):
        n = int.from_bytes(data[i:i + length_size], "big")
        i += length_size
        if n <= 0 or i + n > len(data) or data[i] & 0x1F in _UNSUPPORTED_TYPES:
            return None
        nals.append(data[i:i + (min(n, 512) if data[i] & 0x1F in _SLICE_TYPES else n)])
        i += n
    return nals if i == len(data) else None


def _nal_flags(nals: list[bytes]) -> tuple[bool, bool, bool]:
    """(ref, idr, params) of one access unit's NAL units."""
    slices = [nal[0] for nal in nals if nal[0] & 0x1F in _SLICE_TYPES]
    ref = any((h >> 5) & 3 for h in slices)
    idr = any(h & 0x1F == 5 for h in slices)
    return (ref or not slices), idr, any(nal[0] & 0x1F in _PARAM_TYPES for nal in nals)


@functools.lru_cache(maxsize=64)
def _stream_config(path: str, mtime_ns: int, size: int) -> _AvcConfig | None:
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.codec_context.name != "h264":
            return None
        config = _avc_config(bytes(stream.codec_context.extradata or b""))
        if config is not None and not ("mp4" in container.format.name and _identity_display(path)
                                       and _survives_pipe(container, stream)):
            config = dataclasses.replace(config, pipe=False)
        return config


_STREAM_FIELDS = ("width", "height", "sample_aspect_ratio", "color_range", "colorspace", "color_primaries",
                  "color_trc", "extradata")


def _survives_pipe(container, stream) -> bool:
    """Whether the stream's parameters come back unchanged from the NUT stream `stand_in_stream` writes (pixel
    aspect and colour signalling the container holds, not the bitstream, would otherwise be lost)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="nut") as out:
        ost = out.add_stream_from_template(stream)
        ost.time_base = stream.time_base
        for pkt in container.demux(stream):
            if pkt.size:
                pkt.stream = ost
                out.mux(pkt)
                break
    buf.seek(0)
    with av.open(buf, format="nut") as back:
        a, b = stream.codec_context, back.streams.video[0].codec_context
        return all(getattr(a, f) == getattr(b, f) for f in _STREAM_FIELDS)


_IDENTITY = (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)  # an MP4 transformation matrix that changes nothing


def _identity_display(path: str) -> bool:
    """Whether every movie and track header of an MP4 file has the identity matrix: no rotation or flip for ffmpeg to
    apply from the display matrix (the piped stream of `stand_in_stream` does not carry it). False when unsure."""
    with open(path, "rb") as f:
        moov = _box_payload(f, os.fstat(f.fileno()).st_size, b"moov")
        if moov is None:
            return False
    matrices, i = [], 0
    while True:
        i = moov.find(b"hd", i + 1)
        if i < 0:
            break
        kind, version = moov[i - 2:i + 2], moov[i + 2] if i + 2 < len(moov) else 0
        if kind == b"mvhd":  # the matrix after version/flags, times, timescale, duration, rate, volume, reserved
            at = i + 2 + (36 if version == 0 else 48)
        elif kind == b"tkhd":  # after version/flags, times, track id, duration, reserved, layer, group, volume
            at = i + 2 + (40 if version == 0 else 52)
        else:
            continue
        matrices.append(tuple(int.from_bytes(moov[at + 4 * k:at + 4 * k + 4], "big") for k in range(9)))
    return bool(matrices) and all(m == _IDENTITY for m in matrices)


def _box_payload(f, end: int, name: bytes) -> bytes | None:
    """The payload of the top-level MP4 box `name` (None when absent or unreadable)."""
    at = 0
    while at + 8 <= end:
        f.seek(at)
        head = f.read(16)
        size, kind = int.from_bytes(head[:4], "big"), head[4:8]
        start = 8
        if size == 1:
            size, start = int.from_bytes(head[8:16], "big"), 16
        elif size == 0:
            size = end - at
        if size < start:
            return None
        if kind == name:
            f.seek(at + start)
            return f.read(size - start)
        at += size
    return None


_OPEN = threading.local()  # per thread: the file last scanned, kept open (opening reads and decodes its start)


@contextlib.contextmanager
def _opened(path: str):
    """The file opened for demuxing, reused by the next scan of the same file version in this thread."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    held = getattr(_OPEN, "held", None)
    if held is None or held[0] != key:
        if held is not None:
            held[1].close()
        _OPEN.held = None
        held = (key, av.open(path))
    try:
        yield held[1]
    except BaseException:
        held[1].close()
        raise
    _OPEN.held = held


@dataclass
class _Scan:
    packets: list[_Packet]
    reordered: bool                     # pictures are presented in another order than decoded
    pictures: list | None               # per packet, its slice headers (h264_refs.Picture; None: no slice);
    #                                     None when some packet's headers are not modelled
    pps_ids: tuple = ()                 # the picture parameter set ids seen
    length_size: int = 4                # bytes of each NAL unit's length prefix


def _scan(path: str, seek: float, until: float, config: _AvcConfig, extra: int = 16) -> _Scan | None:
    """The video packets from the keyframe at or before `seek` to the last one presented at or before `until`
    (seconds, container timeline) and `extra` more (a decoder with reordering outputs a picture only after more
    have come; 16 is the most H.264 allows), in decoding order, with their slice headers. None: no plan."""
    packets: list[_Packet] = []
    past = 0
    reordered, latest = False, -np.inf
    sps_table = {x.sps_id: x for x in config.sps}
    pps_table = {x.pps_id: x for x in config.pps}
    pictures: list | None = [] if config.sps and config.pps else None
    with _opened(path) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        origin = (container.start_time or 0) / av.time_base
        container.seek(max(0, int((seek + origin) / tb)), stream=stream, backward=True, any_frame=False)
        for pkt in container.demux(stream):
            if pkt.size == 0:
                continue
            if pkt.pts is None or pkt.dts is None or pkt.pos is None or pkt.pos < 0:
                return None
            if pkt.dts * tb - origin > until + _TICK_EPS:  # decoding time only grows: nothing later shows by then
                past += 1
                if past > extra:
                    break
            nals = _nal_units(bytes(pkt), config.length_size)
            if nals is None:
                return None
            if pictures is not None:
                try:
                    pictures.append(h264_refs.parse_picture(nals, pps_table, sps_table))
                except (h264_refs.Unsupported, IndexError, ValueError, KeyError):
                    pictures = None
            t = pkt.pts * tb - origin
            reordered |= t < latest
            latest = max(latest, t)
            packets.append(_Packet(int(pkt.pos), t, *_nal_flags(nals)))
    if any(b.pos <= a.pos for a, b in zip(packets, packets[1:])):
        return None  # packets not in file order: byte ranges would not name runs
    return _Scan(packets, reordered, pictures, tuple(pps_table), config.length_size)


@dataclass(frozen=True)
class Plan:
    """Which packets of a window a decode leaves out (`plan`)."""

    expression: str    # the ``noise`` bitstream filter's ``drop`` expression naming them by byte position
    packets: int       # packets from the keyframe before the seek point to the last sample
    dropped: int       # of those, left out or decoded as stand-ins
    stand_ins: dict = field(default_factory=dict)  # byte position -> the packet decoded in its place (`stand_ins`)
    left_out: frozenset = frozenset()              # byte positions not sent at all (with stand-ins)
    last_pos: int = -1                             # byte position of the last packet scanned


def plan(path: str | os.PathLike, seek: float, times: np.ndarray, stand_ins: bool = False) -> Plan | None:
    """The packets of a window no frame displayed at `times` needs (see the module docstring); None when no packet
    can be left out exactly.

    `seek`: the decode's seek point (seconds; the scan starts at the keyframe before it, as ffmpeg's ``-ss`` does —
    a different landing point only costs efficiency, never exactness, since every rule holds from any start);
    `times`: (U,) requested times in seconds on the container timeline, increasing. `stand_ins`: where the slice
    headers are modelled (`h264_refs`), the reference pictures nothing kept reads are decoded as stand-ins
    (`h264_refs.skip_slice`) and the pictures nothing decoded later needs are left out, so the plan is decoded from
    `stand_in_stream`; without, or where not modelled, or where no reference picture is spared, the plan is a
    ``drop`` expression for the file itself (non-reference pictures and the runs before an IDR between samples).
    """
    path = os.fspath(path)
    st = os.stat(path)
    try:
        config = _stream_config(os.path.realpath(path), st.st_mtime_ns, st.st_size)
        if config is None:
            return None
        scanned = _scan(path, seek, float(times[-1]), config)
    except (av.FFmpegError, IndexError, ValueError):
        return None  # the decode itself reports what is wrong with the file
    if scanned is None or not scanned.packets or (scanned.reordered and not config.bitstream_restriction):
        return None
    packets = scanned.packets
    need = _needed(packets, times)
    if not need.any():
        return None
    last = int(np.flatnonzero(need)[-1])
    if stand_ins and config.pipe and scanned.pictures is not None:
        what = h264_refs.stand_in_plan(scanned.pictures, [bool(n or p.params) for n, p in zip(need, packets)],
                                       last + 1)
        planned = _stand_in_plan(scanned, what) if what is not None and "stand-in" in what else None
        if planned is not None:
            return planned
    keep = _keep_without_references(packets, need, last)
    if keep.all():
        return None
    runs, i = [], 0
    while i < len(packets):
        if keep[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(packets) and not keep[j + 1]:
            j += 1
        runs.append((packets[i].pos, packets[j].pos))
        i = j + 1
    expression = "+".join(f"eq(pos,{a})" if a == b else f"between(pos,{a},{b})" for a, b in runs)
    return Plan(expression, len(packets), int((~keep).sum()))


def _stand_in_plan(scanned: _Scan, what: list[str]) -> Plan | None:
    """The plan for `h264_refs.stand_in_plan`'s per-packet decisions `what`; None when no PPS id is free."""
    packets = scanned.packets
    pps_ids = set(scanned.pps_ids)
    pps_id = next((i for i in range(256) if i not in pps_ids), None)
    if pps_id is None:
        return None
    subs = {}
    for p, pic, kind in zip(packets, scanned.pictures, what):
        if kind == "stand-in":
            nals = (h264_refs.skip_pps(pic.sps, pps_id), h264_refs.skip_slice(pic, 2, pps_id))
            subs[p.pos] = b"".join(len(n).to_bytes(scanned.length_size, "big") + n for n in nals)
    left_out = frozenset(p.pos for p, kind in zip(packets, what) if kind == "drop")
    return Plan("", len(packets), len(left_out) + len(subs), subs, left_out, packets[-1].pos)


def stand_in_stream(path: str | os.PathLike, planned: Plan, seek: float) -> tuple[bytes, int]:
    """The packets `planned` sends, from the keyframe before `seek` to the last one `plan` scanned, muxed as NUT
    with the timestamps ffmpeg gives the file's packets after ``-ss seek`` plus a whole number of seconds that keeps
    them non-negative; returns (bytes, that number: ffmpeg's ``-itsoffset`` minus it, with ``-copyts``, gives the
    decoder the frames and timestamps of the file path). After the last packet the stream ends."""
    path = os.fspath(path)
    buf = io.BytesIO()
    with _opened(path) as container:
        stream = container.streams.video[0]
        tb = stream.time_base
        start_us = container.start_time or 0
        container.seek(max(0, int((seek + start_us / av.time_base) / float(tb))), stream=stream, backward=True,
                       any_frame=False)
        shift_us = int(round(seek * 1e6)) + start_us  # what ffmpeg subtracts after -ss (microseconds)
        num, den = tb.numerator, tb.denominator
        shift = _rescale_near_inf(shift_us * den, 10**6 * num)
        whole = num * (int(seek + start_us / av.time_base) // num + 2)  # seconds, a multiple of the time base's num
        offset = whole * den // num - shift  # ticks added to every packet
        with av.open(buf, "w", format="nut") as out:
            ost = out.add_stream_from_template(stream)
            ost.time_base = tb
            for pkt in container.demux(stream):
                if pkt.size == 0 or pkt.dts is None:
                    continue
                pos = int(pkt.pos)
                if pos > planned.last_pos:
                    break
                if pos in planned.left_out:
                    continue
                if pos in planned.stand_ins:
                    sub = av.Packet(planned.stand_ins[pos])
                    sub.pts, sub.dts, sub.time_base = pkt.pts, pkt.dts, pkt.time_base
                    pkt = sub
                pkt.pts, pkt.dts = pkt.pts + offset, pkt.dts + offset
                pkt.stream = ost
                out.mux(pkt)
    return buf.getvalue(), whole


def _rescale_near_inf(a: int, b: int) -> int:
    """a / b rounded half away from zero (av_rescale's AV_ROUND_NEAR_INF), b > 0."""
    q = (2 * abs(a) + b) // (2 * b)
    return q if a >= 0 else -q


def drop_expression(path: str | os.PathLike, seek: float, times: np.ndarray) -> str | None:
    """`plan`'s ``drop`` expression for the ``noise`` bitstream filter; None when nothing is left out."""
    planned = plan(path, seek, times)
    return planned.expression if planned else None


def _keep_without_references(packets: list[_Packet], need: np.ndarray, last: int) -> np.ndarray:
    """(P,) bool: the packets to decode when every reference picture is kept, except those before an IDR that lies
    between two needed pictures: the non-reference pictures not needed are left out, and those runs."""
    keep = np.ones(len(packets), dtype=bool)
    idr_ahead = False  # an IDR lies after this packet and at or before the next needed one (decoding order)
    for i in range(last - 1, -1, -1):
        if need[i + 1]:
            idr_ahead = False
        idr_ahead |= packets[i + 1].idr
        p = packets[i]
        if need[i] or p.params:
            continue
        keep[i] = p.ref and not idr_ahead
    return keep


def _needed(packets: list[_Packet], times: np.ndarray) -> np.ndarray:
    """(P,) bool: the packets whose frame is displayed at one of `times` (the latest frame presented at or before
    each time; both candidates when a frame lies within _TICK_EPS of the time)."""
    t = np.array([p.time for p in packets])  # (P,)
    order = np.argsort(t, kind="stable")
    ts = t[order]
    need = np.zeros(len(packets), dtype=bool)
    for edge in (times - _TICK_EPS, times + _TICK_EPS):
        k = np.searchsorted(ts, edge, side="right") - 1  # (U,) index of the latest frame at or before the edge
        need[order[k[k >= 0]]] = True
    return need
