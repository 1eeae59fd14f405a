"""Which H.264 pictures each picture of a window reads from, from the slice headers, and stand-ins that keep the
decoder's reference state without decoding a picture.

`mambavl.extract.packet_plan` leaves out what no sampled frame needs. Non-reference pictures are safe to leave out by
definition. A *reference* picture nothing kept reads from (x264's B-pyramid: the middle B of each group is a reference
only its group's non-reference B reads) cannot simply be left out: the gap in ``frame_num`` it leaves is filled by
ffmpeg with a copy of the latest reference whose POC is that reference's + 2 — the POC of the next group's B
reference, whose list then starts with the copy (other POC distances, other implicit weights, other pixels). So it is
replaced by `skip_slice`: a P slice of skipped macroblocks with the picture's ``frame_num``, POC and reference marking,
which leaves the reference buffer and the POC state exactly as the picture would, at the cost of a copy.

`simulate` follows the stream from an IDR as the decoder builds its reference lists (H.264 8.2.1 POC, 8.2.4 lists:
P by ``PicNum``, B by POC as ffmpeg's ``add_sorted`` orders ties, list modifications, 8.2.5 sliding window and
"unmark short-term" commands) and gives each picture the pictures in the active part of its slices' lists; the
pictures kept are the needed ones and, transitively, what they read (`stand_in_plan`). Anything outside what is
modelled (fields, long-term references, other memory management commands, POC type 1, slice groups, SP/SI slices,
redundant pictures, an open-GOP start) raises `Unsupported`, and the caller keeps every reference picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Unsupported(ValueError):
    """The stream uses something the simulation does not model: no reference picture is left out."""


class Bits:
    """Big-endian bit reader over an RBSP (emulation prevention bytes removed)."""

    def __init__(self, data: bytes):
        self.value, self.size, self.pos = int.from_bytes(data, "big"), 8 * len(data), 0

    def u(self, n: int) -> int:
        if self.pos + n > self.size:
            raise IndexError("read past the end of the NAL unit")
        self.pos += n
        return (self.value >> (self.size - self.pos)) & ((1 << n) - 1)

    def ue(self) -> int:
        rest = self.size - self.pos
        window = (self.value >> max(0, rest - 32)) & ((1 << min(32, rest)) - 1)  # the next <= 32 bits
        if not window:
            raise ValueError("exp-Golomb code too long")
        zeros = min(32, rest) - window.bit_length()
        self.pos += zeros + 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def rbsp(nal: bytes) -> bytes:
    """The NAL unit's payload (header byte included) without emulation prevention bytes."""
    out, i = bytearray(), 0
    while True:
        j = nal.find(b"\x00\x00\x03", i)
        if j < 0:
            return bytes(out + nal[i:])
        out += nal[i:j + 2]
        i = j + 3


@dataclass(frozen=True)
class Sps:
    sps_id: int
    chroma_array_type: int
    separate_colour_plane: bool
    log2_max_frame_num: int
    poc_type: int
    log2_max_poc_lsb: int
    max_num_ref_frames: int
    gaps_allowed: bool
    frame_mbs_only: bool
    bitstream_restriction: bool
    mbs: int = 0  # macroblocks per frame


@dataclass(frozen=True)
class Pps:
    pps_id: int
    sps_id: int
    bottom_field_pic_order: bool
    num_ref_default: tuple[int, int]
    weighted_pred: bool
    weighted_bipred_idc: int
    redundant_pic_cnt_present: bool
    slice_groups: int


def _skip_hrd(b: Bits) -> None:
    count = b.ue() + 1
    b.u(4), b.u(4)
    for _ in range(count):
        b.ue(), b.ue(), b.u(1)
    b.u(5), b.u(5), b.u(5), b.u(5)


def _skip_scaling_lists(b: Bits, count: int) -> None:
    for i in range(count):
        if b.u(1):
            last = nxt = 8
            for _ in range(16 if i < 6 else 64):
                if nxt:
                    nxt = (last + b.se() + 256) % 256
                last = nxt or last


def _vui_bitstream_restriction(b: Bits) -> bool:
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
    nal_hrd = b.u(1)
    if nal_hrd:
        _skip_hrd(b)
    vcl_hrd = b.u(1)
    if vcl_hrd:
        _skip_hrd(b)
    if nal_hrd or vcl_hrd:
        b.u(1)  # low_delay_hrd_flag
    b.u(1)  # pic_struct_present_flag
    return bool(b.u(1))


def parse_sps(nal: bytes) -> Sps:
    """An SPS NAL unit (header byte included), H.264 7.3.2.1.1 and E.1.1. IndexError / ValueError when broken."""
    b = Bits(rbsp(nal)[1:])
    profile = b.u(8)
    b.u(8), b.u(8)  # constraint flags, level
    sps_id, chroma, separate = b.ue(), 1, False
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        chroma = b.ue()
        if chroma == 3:
            separate = bool(b.u(1))
        b.ue(), b.ue(), b.u(1)  # bit depths, qpprime_y_zero_transform_bypass
        if b.u(1):  # seq_scaling_matrix_present_flag
            _skip_scaling_lists(b, 8 if chroma != 3 else 12)
    log2_max_frame_num = b.ue() + 4
    poc_type, log2_max_poc_lsb = b.ue(), 0
    if poc_type == 0:
        log2_max_poc_lsb = b.ue() + 4
    elif poc_type == 1:
        b.u(1), b.se(), b.se()
        for _ in range(b.ue()):
            b.se()
    max_num_ref_frames, gaps_allowed = b.ue(), bool(b.u(1))
    width_mbs, height_units = b.ue() + 1, b.ue() + 1
    frame_mbs_only = bool(b.u(1))
    if not frame_mbs_only:
        b.u(1)
    b.u(1)  # direct_8x8_inference
    if b.u(1):  # frame_cropping
        b.ue(), b.ue(), b.ue(), b.ue()
    restriction = _vui_bitstream_restriction(b) if b.u(1) else False
    return Sps(sps_id, 0 if separate else chroma, separate, log2_max_frame_num, poc_type, log2_max_poc_lsb,
               max_num_ref_frames, gaps_allowed, frame_mbs_only, restriction,
               width_mbs * height_units * (1 if frame_mbs_only else 2))


def parse_pps(nal: bytes) -> Pps:
    """The start of a PPS NAL unit (7.3.2.2), as far as slice headers need it."""
    b = Bits(rbsp(nal)[1:])
    pps_id, sps_id = b.ue(), b.ue()
    b.u(1)  # entropy_coding_mode_flag
    bottom_field_pic_order = bool(b.u(1))
    slice_groups = b.ue() + 1
    if slice_groups > 1:
        return Pps(pps_id, sps_id, bottom_field_pic_order, (0, 0), False, 0, False, slice_groups)
    num_ref_default = (b.ue() + 1, b.ue() + 1)
    weighted_pred, weighted_bipred_idc = bool(b.u(1)), b.u(2)
    b.se(), b.se(), b.se()  # pic_init_qp, pic_init_qs, chroma_qp_index_offset
    b.u(1), b.u(1)  # deblocking_filter_control_present, constrained_intra_pred
    return Pps(pps_id, sps_id, bottom_field_pic_order, num_ref_default, weighted_pred, weighted_bipred_idc,
               bool(b.u(1)), slice_groups)


@dataclass(frozen=True)
class Slice:
    kind: str                         # "P", "B" or "I"
    num_ref: tuple[int, int]          # active entries of list 0 / list 1
    mods: tuple[tuple, tuple]         # per list: ((modification_of_pic_nums_idc, abs_diff_pic_num_minus1), ...)


@dataclass(frozen=True)
class Picture:
    """One access unit's picture, from its slice headers."""

    idr: bool
    ref: bool                          # nal_ref_idc > 0
    frame_num: int
    poc_lsb: int
    delta_poc_bottom: int
    sps: Sps
    slices: tuple[Slice, ...]
    mmco: tuple[tuple[int, int], ...] | None  # adaptive marking: ((op, difference_of_pic_nums_minus1), ...)


_KINDS = {0: "P", 1: "B", 2: "I", 5: "P", 6: "B", 7: "I"}


def _skip_weights(b: Bits, sps: Sps, kind: str, num_ref: tuple[int, int]) -> None:
    b.ue()  # luma_log2_weight_denom
    if sps.chroma_array_type:
        b.ue()
    for lst in range(2 if kind == "B" else 1):
        for _ in range(num_ref[lst]):
            if b.u(1):
                b.se(), b.se()
            if sps.chroma_array_type and b.u(1):
                b.se(), b.se(), b.se(), b.se()


def _modifications(b: Bits) -> tuple:
    if not b.u(1):
        return ()
    ops = []
    while True:
        idc = b.ue()
        if idc == 3:
            return tuple(ops)
        if idc not in (0, 1):
            raise Unsupported("long-term reference list modification")
        ops.append((idc, b.ue()))


def _marking(b: Bits, idr: bool) -> tuple[tuple[int, int], ...] | None:
    if idr:
        b.u(1)  # no_output_of_prior_pics
        if b.u(1):
            raise Unsupported("long-term IDR")
        return None
    if not b.u(1):
        return None
    ops = []
    while True:
        op = b.ue()
        if op == 0:
            return tuple(ops)
        if op != 1:
            raise Unsupported(f"memory management operation {op}")
        ops.append((op, b.ue()))


def parse_slice(nal: bytes, pps_table: dict[int, Pps], sps_table: dict[int, Sps]) -> tuple[Slice, Picture]:
    """A coded slice NAL unit (type 1 or 5, header byte included): the slice and its picture's fields (7.3.3)."""
    header = nal[0]
    idr, ref = (header & 0x1F) == 5, (header >> 5) & 3 > 0
    data = rbsp(nal[:512])  # the header fits (a slice header of a frame with 32 weighted references: ~300 bytes)
    b = Bits(data[1:])
    b.ue()  # first_mb_in_slice
    kind = _KINDS.get(b.ue())
    if kind is None:
        raise Unsupported("SP/SI slice")
    pps = pps_table[b.ue()]
    sps = sps_table[pps.sps_id]
    if pps.slice_groups > 1 or pps.redundant_pic_cnt_present or not sps.frame_mbs_only or sps.poc_type == 1:
        raise Unsupported("slice groups, redundant pictures, fields or POC type 1")
    if sps.separate_colour_plane:
        b.u(2)
    frame_num = b.u(sps.log2_max_frame_num)
    if idr:
        b.ue()  # idr_pic_id
    poc_lsb = delta_bottom = 0
    if sps.poc_type == 0:
        poc_lsb = b.u(sps.log2_max_poc_lsb)
        if pps.bottom_field_pic_order:
            delta_bottom = b.se()
    if kind == "B":
        b.u(1)  # direct_spatial_mv_pred_flag
    num_ref = pps.num_ref_default if kind != "I" else (0, 0)
    if kind != "I" and b.u(1):  # num_ref_idx_active_override_flag
        num_ref = (b.ue() + 1, b.ue() + 1 if kind == "B" else num_ref[1])
    if kind == "P":
        num_ref = (num_ref[0], 0)
    mods = (_modifications(b) if kind != "I" else (), _modifications(b) if kind == "B" else ())
    if (pps.weighted_pred and kind == "P") or (pps.weighted_bipred_idc == 1 and kind == "B"):
        _skip_weights(b, sps, kind, num_ref)
    mmco = _marking(b, idr) if ref else None
    return Slice(kind, num_ref, mods), Picture(idr, ref, frame_num, poc_lsb, delta_bottom, sps, (), mmco)


# ------------------------------------------------------------------------------------------------ the simulation
@dataclass
class _Entry:
    pic: int          # index of the picture
    frame_num: int
    poc: int


@dataclass
class _State:
    short: list[_Entry] = field(default_factory=list)  # newest first, as ffmpeg's short_ref
    prev_msb: int = 0
    prev_lsb: int = 0
    prev_frame_num: int = 0
    prev_offset: int = 0


def _poc(state: _State, p: Picture) -> tuple[int, int, int]:
    """(POC, msb or frame-num offset, ...) of picture `p` (8.2.1.1 / 8.2.1.3), as ffmpeg's ff_h264_init_poc."""
    sps = p.sps
    if sps.poc_type == 0:
        max_lsb = 1 << sps.log2_max_poc_lsb
        if p.poc_lsb < state.prev_lsb and state.prev_lsb - p.poc_lsb >= max_lsb // 2:
            msb = state.prev_msb + max_lsb
        elif p.poc_lsb > state.prev_lsb and p.poc_lsb - state.prev_lsb > max_lsb // 2:
            msb = state.prev_msb - max_lsb
        else:
            msb = state.prev_msb
        top = msb + p.poc_lsb
        return min(top, top + p.delta_poc_bottom), msb, 0
    offset = state.prev_offset + ((1 << sps.log2_max_frame_num) if state.prev_frame_num > p.frame_num else 0)
    return 2 * (offset + p.frame_num) - (0 if p.ref else 1), 0, offset


def _pic_num(e: _Entry, frame_num: int, max_frame_num: int) -> int:
    return e.frame_num - max_frame_num if e.frame_num > frame_num else e.frame_num


def _add_sorted(short: list[_Entry], limit: int, down: int) -> list[_Entry]:
    """ffmpeg's add_sorted (h264_refs.c): the entries with POC <= limit by decreasing POC (`down`), or > limit by
    increasing POC; of equal POCs only one is taken (the last in buffer order going down, the first going up)."""
    out: list[_Entry] = []
    while True:
        best = None
        for e in short:
            if ((e.poc > limit) ^ bool(down)) and (best is None or ((e.poc < best.poc) ^ bool(down))
                                                   or (down and e.poc == best.poc)):
                best = e
        if best is None:
            return out
        out.append(best)
        limit = best.poc - down


def _lists(state: _State, p: Picture, s: Slice, poc: int) -> list[list[_Entry]]:
    """The active part of each reference list of slice `s` of picture `p` (8.2.4.2 initialisation, 8.2.4.3
    modification), entries of the simulated buffer."""
    max_fn = 1 << p.sps.log2_max_frame_num
    if s.kind == "P":
        init = [sorted(state.short, key=lambda e: -_pic_num(e, p.frame_num, max_fn))]
    else:
        init = [_add_sorted(state.short, poc, 1) + _add_sorted(state.short, poc, 0),
                _add_sorted(state.short, poc, 0) + _add_sorted(state.short, poc, 1)]
        if len(init[1]) > 1 and [e.pic for e in init[0]] == [e.pic for e in init[1]]:
            init[1][0], init[1][1] = init[1][1], init[1][0]
    out = []
    for lst, entries in enumerate(init):
        n = s.num_ref[lst]
        entries = entries[:n]
        pred = p.frame_num
        for idx, (idc, diff) in enumerate(s.mods[lst]):
            no_wrap = pred - (diff + 1) if idc == 0 else pred + (diff + 1)
            no_wrap = no_wrap + max_fn if no_wrap < 0 else no_wrap - max_fn if no_wrap >= max_fn else no_wrap
            pred = no_wrap
            num = no_wrap - max_fn if no_wrap > p.frame_num else no_wrap
            found = [e for e in state.short if _pic_num(e, p.frame_num, max_fn) == num]
            if not found:
                raise LookupError("reference picture missing during reordering")
            rest = [e for e in entries[idx:] if e is not found[0]]
            entries = entries[:idx] + [found[0]] + rest
        if len(entries) < n:
            raise LookupError("missing reference picture")
        out.append(entries[:n])
    return out


def _mark(state: _State, entry: _Entry, mmco, max_fn: int, max_refs: int, frame_num: int) -> None:
    """Reference marking after a reference picture (8.2.5), as ff_h264_execute_ref_pic_marking."""
    if mmco is None:  # sliding window
        if state.short and len(state.short) >= max_refs:
            state.short.pop()
    else:
        for _, diff in mmco:
            num = frame_num - (diff + 1)
            found = [e for e in state.short if _pic_num(e, frame_num, max_fn) == num]
            if not found:
                raise LookupError("mmco: unref short failure")
            state.short.remove(found[0])
    state.short.insert(0, entry)
    if len(state.short) > max(max_refs, 1):
        raise LookupError("number of reference frames exceeds max")


def simulate(pictures: list[Picture]) -> list[tuple[int, tuple[int, ...]]]:
    """Decode `pictures` (decoding order, the first an IDR) as the decoder builds its reference lists: per picture,
    (POC, sorted indices of the pictures in the active reference lists of its slices). LookupError: a picture
    misses a reference or a marking command its target (the stream is not as modelled)."""
    state, out = _State(), []
    for i, p in enumerate(pictures):
        if p.idr:
            state = _State()
        elif p.frame_num not in (state.prev_frame_num, (state.prev_frame_num + 1) % (1 << p.sps.log2_max_frame_num)):
            raise LookupError("frame_num gap")
        poc, msb, offset = _poc(state, p)
        refs: set[int] = set()
        for s in p.slices:
            for entries in _lists(state, p, s, poc):
                refs.update(e.pic for e in entries)
        out.append((poc, tuple(sorted(refs))))
        if p.ref:
            _mark(state, _Entry(i, p.frame_num, poc), p.mmco, 1 << p.sps.log2_max_frame_num,
                  p.sps.max_num_ref_frames, p.frame_num)
            state.prev_msb, state.prev_lsb = msb, p.poc_lsb
        state.prev_frame_num, state.prev_offset = p.frame_num, offset
    return out


def parse_picture(nals: list[bytes], pps_table: dict[int, Pps], sps_table: dict[int, Sps]) -> Picture | None:
    """The picture of one access unit (its NAL units, header bytes included); parameter sets in it update the
    tables. None when it holds no slice. Unsupported / IndexError / ValueError / KeyError: not modelled."""
    first, slices = None, []
    for nal in nals:
        kind = nal[0] & 0x1F
        if kind == 7:
            sps = parse_sps(nal)
            sps_table[sps.sps_id] = sps
        elif kind == 8:
            pps = parse_pps(nal)
            pps_table[pps.pps_id] = pps
        elif kind in (1, 5):
            s, pic = parse_slice(nal, pps_table, sps_table)
            if first is not None and (pic.frame_num, pic.idr, pic.ref, pic.poc_lsb) != \
                    (first.frame_num, first.idr, first.ref, first.poc_lsb):
                raise Unsupported("two pictures in one packet")
            first = first or pic
            slices.append(s)
    if first is None:
        return None
    return Picture(first.idr, first.ref, first.frame_num, first.poc_lsb, first.delta_poc_bottom, first.sps,
                   tuple(slices), first.mmco)


def _close(pics: list[Picture], full: list, keep: list[bool]) -> None:
    """Add to `keep`, transitively, every picture in the reference lists of a kept one (in place)."""
    for k in range(len(pics) - 1, -1, -1):
        if keep[k]:
            for j in full[k][1]:
                keep[j] = True


# ------------------------------------------------------------------------------------------------ stand-in pictures
class BitWriter:
    """Big-endian bit writer for an RBSP."""

    def __init__(self):
        self.value, self.size = 0, 0

    def u(self, n: int, v: int) -> None:
        self.value, self.size = (self.value << n) | (v & ((1 << n) - 1)), self.size + n

    def ue(self, v: int) -> None:
        n = (v + 1).bit_length()
        self.u(2 * n - 1, v + 1)

    def se(self, v: int) -> None:
        self.ue(2 * v - 1 if v > 0 else -2 * v)

    def nal(self, header: int) -> bytes:
        """The NAL unit: `header`, then the bits with the RBSP stop bit and emulation prevention bytes."""
        self.u(1, 1)
        self.u(-self.size % 8, 0)
        data = self.value.to_bytes(self.size // 8, "big")
        out, zeros = bytearray([header]), 0
        for byte in data:
            if zeros >= 2 and byte <= 3:
                out.append(3)
                zeros = 0
            out.append(byte)
            zeros = zeros + 1 if byte == 0 else 0
        return bytes(out)


def skip_pps(sps: Sps, pps_id: int) -> bytes:
    """A PPS NAL unit for `skip_slice`: CAVLC, one reference, no weighting, deblocking control present."""
    b = BitWriter()
    b.ue(pps_id), b.ue(sps.sps_id)
    b.u(1, 0), b.u(1, 1)  # entropy_coding_mode_flag (CAVLC), bottom_field_pic_order_in_frame_present_flag
    b.ue(0), b.ue(0), b.ue(0)  # one slice group, one reference in list 0 / list 1 by default
    b.u(1, 0), b.u(2, 0)  # no weighted prediction
    b.se(0), b.se(0), b.se(0)  # pic_init_qp/qs, chroma_qp_index_offset
    b.u(1, 1), b.u(1, 0), b.u(1, 0)  # deblocking_filter_control_present, constrained_intra_pred, redundant_pic_cnt
    return b.nal(0x68)


def skip_slice(p: Picture, ref_idc: int, pps_id: int) -> bytes:
    """A stand-in for reference picture `p` that costs next to nothing to decode: one P slice whose macroblocks are
    all skipped, without deblocking, with `p`'s frame_num, POC and reference marking (so the decoder's reference
    buffer and POC state are exactly as after `p`; its pixels are not `p`'s, and nothing kept reads them)."""
    sps, b = p.sps, BitWriter()
    b.ue(0), b.ue(0), b.ue(pps_id)  # first_mb_in_slice, slice_type P, the `skip_pps`
    if sps.separate_colour_plane:
        raise Unsupported("separate colour planes")
    b.u(sps.log2_max_frame_num, p.frame_num)
    if sps.poc_type == 0:
        b.u(sps.log2_max_poc_lsb, p.poc_lsb)
        b.se(p.delta_poc_bottom)
    b.u(1, 0), b.u(1, 0)  # num_ref_idx_active_override_flag, ref_pic_list_modification_flag_l0
    b.u(1, p.mmco is not None)  # adaptive_ref_pic_marking_mode_flag
    for op, diff in p.mmco or ():
        b.ue(op), b.ue(diff)
    if p.mmco is not None:
        b.ue(0)
    b.se(0), b.ue(1)  # slice_qp_delta, disable_deblocking_filter_idc
    b.ue(sps.mbs)  # mb_skip_run: every macroblock
    return b.nal((ref_idc << 5) | 1)


def stand_in_plan(pictures: list[Picture | None], need: list[bool], tail: int) -> list[str] | None:
    """Per packet: "keep" (decode it), "stand-in" (decode `skip_slice` in its place: a reference picture nothing
    kept reads, followed by decoded ones, so the reference buffer must go on as in the stream) or "drop" (nothing
    decoded after it before the next decoded IDR needs it). Kept: the `need`ed pictures, every picture in the active
    reference lists of a kept one (transitively, `simulate`) and packets without a slice. The pictures from index
    `tail` on follow the last needed one and are only there to be output after it (the frame-rate filter emits a
    frame once it sees the next): their reference pictures are stand-ins, the others left out. None when the stream
    is not modelled or does not start with an IDR."""
    if not pictures or pictures[0] is None or not pictures[0].idr:
        return None
    index = [i for i, p in enumerate(pictures) if p is not None]
    pics = [pictures[i] for i in index]
    try:
        full = simulate(pics)
    except (LookupError, Unsupported):
        return None
    keep = [need[i] for i in index]
    _close(pics, full, keep)
    out = ["keep"] * len(pictures)
    decoded_after = False  # a picture after this one and before the next decoded IDR is decoded
    for k in range(len(pics) - 1, -1, -1):
        p = pics[k]
        if not keep[k] and p.ref and (decoded_after or index[k] >= tail):
            if p.idr or p.sps.separate_colour_plane or not p.sps.mbs:
                keep[k] = True
            else:
                out[index[k]] = "stand-in"
        elif not keep[k]:
            out[index[k]] = "drop"
        if out[index[k]] != "drop":
            decoded_after = not p.idr
    return out
