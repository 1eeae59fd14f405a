"""Decode only what the sampled frames need, exactly: which H.264 packets of a window the decoder may skip.

A segment decode samples a few frames (16) from a window of hundreds. The decoder must still decode every frame the
sampled ones are predicted from, but two kinds of packets feed nothing that is kept:

* **non-reference pictures** (H.264 ``nal_ref_idc == 0``: B-frames no other picture predicts from) that are not
  sampled themselves. By definition no later picture reads them, so leaving them out changes no decoded pixel;
  ffmpeg's ``-skip_frame noref`` does this for *every* such picture, which is inexact whenever a sampled frame is
  one of them — here they are skipped per picture, only when not sampled.
* **everything before an IDR picture** that lies between two needed pictures (in decoding order): an IDR empties
  the decoder's reference buffer, so the pictures after it decode the same whether or not the ones before were
  decoded. That is a seek per sample where a keyframe lies between samples, at no more cost than reading the
  packets: skipping them costs less than decoding them for any GOP, so no cost model is needed — the plan is the
  smallest set of packets that provably decodes the sampled frames identically.

The plan is handed to the ffmpeg command as the ``noise`` bitstream filter's ``drop`` expression on the input
(packets named by their byte position in the file), so the rest of the decode — seek, ``fps`` filter, scaling,
cropping — is unchanged and the frames stay bit-identical (tests/test_decode_plan.py compares them with the plain
decode on streams with B-frames, B-pyramids, several reference frames, open GOPs and all-P streams).

Where exactness cannot be shown cheaply the plan is empty and the decode is today's: codecs other than H.264, H.264
without ``avcC`` framing (raw Annex B), SVC/MVC extensions, packets without timestamps or out of file order, and
streams with reordered pictures whose SPS carries no ``bitstream_restriction`` (ffmpeg's decoder then guesses its
output delay from the pictures it sees, which would differ when pictures are left out). Packets carrying parameter
sets are always kept. A frame within `_TICK_EPS` of a requested time is kept together with its neighbour, so the
choice of the frame displayed at that time is left to ffmpeg's own arithmetic.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import av
import numpy as np

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


class _Bits:
    """Big-endian bit reader over an RBSP (emulation prevention bytes removed)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u(self, n: int) -> int:
        v = 0
        for _ in range(n):
            byte = self.data[self.pos >> 3]  # IndexError at the end: caught by the caller
            v = (v << 1) | ((byte >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("exp-Golomb code too long")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def _rbsp(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def _skip_hrd(b: _Bits) -> None:
    count = b.ue() + 1
    b.u(4), b.u(4)
    for _ in range(count):
        b.ue(), b.ue(), b.u(1)
    b.u(5), b.u(5), b.u(5), b.u(5)


def sps_has_bitstream_restriction(sps_nal: bytes) -> bool:
    """Whether an H.264 SPS NAL unit (header byte included) carries VUI ``bitstream_restriction_flag`` (then the
    decoder's reordering delay is fixed by the stream: ``max_num_reorder_frames``). H.264 7.3.2.1.1 and E.1.1."""
    b = _Bits(_rbsp(sps_nal[1:]))
    profile = b.u(8)
    b.u(8), b.u(8), b.ue()  # constraint flags, level, sps id
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        chroma = b.ue()
        if chroma == 3:
            b.u(1)
        b.ue(), b.ue(), b.u(1)  # bit depths, qpprime_y_zero_transform_bypass
        if b.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if b.u(1):
                    last = nxt = 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + b.se() + 256) % 256
                        last = nxt or last
    b.ue()  # log2_max_frame_num_minus4
    poc_type = b.ue()
    if poc_type == 0:
        b.ue()
    elif poc_type == 1:
        b.u(1), b.se(), b.se()
        for _ in range(b.ue()):
            b.se()
    b.ue(), b.u(1)  # max_num_ref_frames, gaps_in_frame_num_allowed
    b.ue(), b.ue()  # size in macroblocks
    if not b.u(1):  # frame_mbs_only_flag
        b.u(1)
    b.u(1)  # direct_8x8_inference
    if b.u(1):  # frame_cropping
        b.ue(), b.ue(), b.ue(), b.ue()
    if not b.u(1):  # vui_parameters_present_flag
        return False
    if b.u(1):  # aspect_ratio_info_present
        if b.u(8) == 255:
            b.u(16), b.u(16)
    if b.u(1):  # overscan_info_present
        b.u(1)
    if b.u(1):  # video_signal_type_present
        b.u(3), b.u(1)
        if b.u(1):
            b.u(8), b.u(8), b.u(8)
    if b.u(1):  # chroma_loc_info_present
        b.ue(), b.ue()
    if b.u(1):  # timing_info_present
        b.u(32), b.u(32), b.u(1)
    nal_hrd, vcl_hrd = b.u(1), None
    if nal_hrd:
        _skip_hrd(b)
    vcl_hrd = b.u(1)
    if vcl_hrd:
        _skip_hrd(b)
    if nal_hrd or vcl_hrd:
        b.u(1)  # low_delay_hrd_flag
    b.u(1)  # pic_struct_present_flag
    return bool(b.u(1))


@dataclass(frozen=True)
class _AvcConfig:
    length_size: int            # bytes of each NAL unit's length prefix
    bitstream_restriction: bool  # every SPS of the avcC record has it


def _avc_config(extradata: bytes | None) -> _AvcConfig | None:
    """Parse an ``avcC`` record (ISO/IEC 14496-15 5.2.4.1); None when the stream is not framed that way."""
    if not extradata or len(extradata) < 7 or extradata[0] != 1:
        return None
    length_size = (extradata[4] & 3) + 1
    count, i, restricted = extradata[5] & 0x1F, 6, []
    for _ in range(count):
        n = int.from_bytes(extradata[i:i + 2], "big")
        nal = extradata[i + 2:i + 2 + n]
        i += 2 + n
        try:
            restricted.append(sps_has_bitstream_restriction(nal))
        except (IndexError, ValueError):
            restricted.append(False)
    return _AvcConfig(length_size, bool(restricted) and all(restricted))


def _nal_flags(data: bytes, length_size: int) -> tuple[bool, bool, bool] | None:
    """(ref, idr, params) of one access unit; None when its NAL framing is broken or it uses an extension."""
    i, slices, ref, idr, params = 0, 0, False, False, False
    while i + length_size < len(data):
        n = int.from_bytes(data[i:i + length_size], "big")
        i += length_size
        if n <= 0 or i + n > len(data):
            return None
        header = data[i]
        kind, ref_idc = header & 0x1F, (header >> 5) & 3
        if kind in _UNSUPPORTED_TYPES:
            return None
        if kind in _SLICE_TYPES:
            slices += 1
            ref |= ref_idc > 0
            idr |= kind == 5
        params |= kind in _PARAM_TYPES
        i += n
    if i != len(data):
        return None
    return (ref or slices == 0), idr, params


@functools.lru_cache(maxsize=64)
def _stream_config(path: str, mtime_ns: int, size: int) -> _AvcConfig | None:
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.codec_context.name != "h264":
            return None
        return _avc_config(bytes(stream.codec_context.extradata or b""))


def _scan(path: str, seek: float, until: float, length_size: int) -> tuple[list[_Packet], bool] | None:
    """The video packets from the keyframe at or before `seek` to the last one presented at or before `until`
    (seconds, container timeline), in decoding order; and whether pictures are reordered. None: no plan."""
    packets: list[_Packet] = []
    reordered, latest = False, -np.inf
    with av.open(path) as container:
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
                break
            flags = _nal_flags(bytes(pkt), length_size)
            if flags is None:
                return None
            t = pkt.pts * tb - origin
            reordered |= t < latest
            latest = max(latest, t)
            packets.append(_Packet(int(pkt.pos), t, *flags))
    if any(b.pos <= a.pos for a, b in zip(packets, packets[1:])):
        return None  # packets not in file order: byte ranges would not name runs
    return packets, reordered


def drop_expression(path: str | os.PathLike, seek: float, times: np.ndarray) -> str | None:
    """The ``noise`` bitstream filter's ``drop`` expression that leaves out the packets of a window no frame
    displayed at `times` needs (see the module docstring); None when no packet can be left out exactly.

    `seek`: the decode's seek point (seconds; the scan starts at the keyframe before it, as ffmpeg's ``-ss`` does —
    a different landing point only costs efficiency, never exactness, since every rule holds from any start);
    `times`: (U,) requested times in seconds on the container timeline, increasing.
    """
    path = os.fspath(path)
    st = os.stat(path)
    try:
        config = _stream_config(os.path.realpath(path), st.st_mtime_ns, st.st_size)
        if config is None:
            return None
        scanned = _scan(path, seek, float(times[-1]), config.length_size)
    except (av.FFmpegError, IndexError, ValueError):
        return None  # the decode itself reports what is wrong with the file
    if scanned is None:
        return None
    packets, reordered = scanned
    if not packets or (reordered and not config.bitstream_restriction):
        return None
    need = _needed(packets, times)
    if not need.any():
        return None
    last = int(np.flatnonzero(need)[-1])
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
    return "+".join(f"eq(pos,{a})" if a == b else f"between(pos,{a},{b})" for a, b in runs)


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
