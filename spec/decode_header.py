#!/usr/bin/env python3
"""Read (and write) the header of an avp v2 message from spec/wire.md alone.

Written from the sections "Preamble", "Header", "The header byte by byte" and
"Sections" of spec/wire.md, with no rkyv: a check that the spec says enough for a
second implementation. Standard library only.

    python3 spec/decode_header.py FILE.avp   # print preamble, header, sections as JSON
    python3 spec/decode_header.py --check    # check every spec/vectors/*.avp

`--check` decodes each committed vector, compares it with the values
avp-wire/tests/vectors.rs builds it from, re-encodes the whole message with the
canonical writer below and compares bytes, and checks that the reader refuses a
set of broken headers (and accepts a non-canonical but valid one). It exits
non-zero on any mismatch.
"""

import glob
import json
import os
import struct
import sys
import zlib

PREAMBLE_LEN = 32
MAX_HEADER_LEN = 1 << 20
FLAG_DEVICE_SECTIONS = 0x01

STRING_SIZE = 8
VEC_SIZE = 8
PAYLOAD_SIZE = 31
ROOT_SIZE = 107
EXTRA_SIZE = 16
SECTION_SIZE = 25
INLINE_MAX = 8

DTYPE_NAMES = {0: "f32", 1: "f16", 2: "bf16", 3: "i8"}
DTYPE_SIZE = {0: 4, 1: 2, 2: 2, 3: 1}
LAYOUT_NAMES = {0: "HND", 1: "NHD"}
TEXT_FORMATS = {0: "json", 1: "plain"}
ROLE = {"K": 0, "V": 1, "K_scale": 2, "V_scale": 3, "hidden": 4, "hidden_scale": 5, "text": 6}
ENVELOPE_FIELDS = [
    "model_id",
    "model_hash",
    "model_family",
    "tokenizer_hash",
    "session_id",
    "source_agent_id",
    "target_agent_id",
]
KV, HIDDEN, TEXT = 0, 1, 2
U64_MAX = (1 << 64) - 1


class WireError(Exception):
    pass


def crc32(b):
    return zlib.crc32(b) & 0xFFFFFFFF


# ---------------------------------------------------------------- preamble


def read_preamble(msg):
    if len(msg) < 3 or msg[:2] != b"AV":
        raise WireError("bad magic")
    if msg[2] != 2:
        raise WireError("version %d is not v2" % msg[2])
    if len(msg) < PREAMBLE_LEN:
        raise WireError("truncated preamble")
    header_len, total_len, header_crc, preamble_crc, reserved = struct.unpack_from(
        "<IQIIQ", msg, 4
    )
    if crc32(msg[:20]) != preamble_crc:
        raise WireError("preamble CRC mismatch")
    flags = msg[3]
    if flags & ~FLAG_DEVICE_SECTIONS:
        raise WireError("unknown flag bits 0x%02x" % (flags & ~FLAG_DEVICE_SECTIONS))
    if reserved != 0:
        raise WireError("reserved preamble bytes are not zero")
    if header_len > MAX_HEADER_LEN:
        raise WireError("header_len %d over 1 MiB" % header_len)
    if total_len < PREAMBLE_LEN + header_len:
        raise WireError("total_len shorter than preamble plus header")
    return {
        "flags": flags,
        "header_len": header_len,
        "total_len": total_len,
        "header_crc": header_crc,
    }


# ---------------------------------------------------------------- header reader


class HeaderReader:
    """The reader of "The header byte by byte": positions are header positions."""

    def __init__(self, h):
        self.h = h
        if len(h) < ROOT_SIZE:
            raise WireError("header shorter than the 107-byte root")
        self.root = len(h) - ROOT_SIZE
        self.cursor = 0  # end of the last block claimed
        self.blocks = []  # (what, start, end), in block order

    def u8(self, p):
        return self.h[p]

    def u32(self, p):
        return struct.unpack_from("<I", self.h, p)[0]

    def u64(self, p):
        return struct.unpack_from("<Q", self.h, p)[0]

    def i32(self, p):
        return struct.unpack_from("<i", self.h, p)[0]

    def claim(self, what, start, size):
        """Rule 4: a block starts at or after the previous one's end and ends by R."""
        end = start + size
        if start < self.cursor or end > self.root:
            raise WireError(
                "%s: block %d..%d is not inside %d..%d (after the previous block, "
                "before the root)" % (what, start, end, self.cursor, self.root)
            )
        self.cursor = end
        self.blocks.append((what, start, end))

    def string(self, what, q):
        obj = self.h[q : q + STRING_SIZE]
        if obj[0] & 0xC0 != 0x80:  # inline
            n = obj.find(b"\xff")
            data = obj if n < 0 else obj[:n]
        else:  # out of line
            L = self.u32(q)
            n = (L & 0x3F) | ((L >> 8) << 6)
            if n <= INLINE_MAX:
                raise WireError("%s: out-of-line string of length %d <= 8" % (what, n))
            start = q + self.i32(q + 4)  # relative to the string object, not to `off`
            self.claim(what, start, n)
            data = self.h[start : start + n]
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WireError("%s: invalid UTF-8: %s" % (what, e))

    def vector(self, what, q, size, element):
        start = q + self.i32(q)
        n = self.u32(q + 4)
        end = start + n * size
        # The element array must be readable before its elements are (their blocks
        # come first in block order); the array's own place is checked by claim().
        if start < 0 or end > self.root:
            raise WireError("%s: array %d..%d outside 0..%d" % (what, start, end, self.root))
        items = [element("%s[%d]" % (what, i), start + i * size) for i in range(n)]
        self.claim(what, start, n * size)
        return items

    def extra(self, what, q):
        return [self.string(what + ".key", q), self.string(what + ".value", q + 8)]

    def section(self, what, q):
        return {
            "role": self.u8(q),
            "layer": self.u32(q + 1),
            "offset": self.u64(q + 5),
            "len": self.u64(q + 13),
            "crc32": self.u32(q + 21),
        }

    def payload(self, q):
        tag = self.u8(q)
        if tag == KV:
            return {
                "kind": "KvCache",
                "num_layers": self.u32(q + 1),
                "num_kv_heads": self.u32(q + 5),
                "head_dim": self.u32(q + 9),
                "seq_len": self.u64(q + 13),
                "dtype": self.u8(q + 21),
                "layout": self.u8(q + 22),
                "layer_start": self.u32(q + 23),
                "layer_end": self.u32(q + 27),
            }
        if tag == HIDDEN:
            return {
                "kind": "HiddenState",
                "rows": self.u64(q + 1),
                "dim": self.u64(q + 9),
                "dtype": self.u8(q + 17),
                "map_id": self.string("map_id", q + 18),
            }
        if tag == TEXT:
            return {"kind": "Text", "format": self.u8(q + 1), "len": self.u64(q + 2)}
        raise WireError("payload tag %d is not 0, 1 or 2" % tag)

    def read(self):
        R = self.root
        env = {}
        for i, name in enumerate(ENVELOPE_FIELDS):
            env[name] = self.string(name, R + 8 * i)
        env["extra"] = self.vector("extra", R + 56, EXTRA_SIZE, self.extra)
        keys = [k.encode("utf-8") for k, _ in env["extra"]]
        if any(a >= b for a, b in zip(keys, keys[1:])):
            raise WireError("extra keys are not in strictly increasing order")
        payload = self.payload(R + 64)
        alignment = self.u32(R + 95)
        sections = self.vector("sections", R + 99, SECTION_SIZE, self.section)
        return {
            "root": R,
            "envelope": env,
            "payload": payload,
            "alignment": alignment,
            "sections": sections,
            "blocks": [dict(what=w, start=a, end=b) for w, a, b in self.blocks],
        }


# ---------------------------------------------------------------- codes, shape, sections


def section_plan(p):
    """The (role, layer, len) list the "Sections" rules derive from the payload;
    also checks the codes and shape sanity."""
    if p["kind"] in ("KvCache", "HiddenState") and p["dtype"] not in DTYPE_SIZE:
        raise WireError("dtype code %d" % p["dtype"])
    if p["kind"] == "KvCache":
        if p["layout"] not in LAYOUT_NAMES:
            raise WireError("layout code %d" % p["layout"])
        if min(p["num_layers"], p["num_kv_heads"], p["head_dim"]) == 0:
            raise WireError("zero KV dimension")
        a, b = p["layer_start"], p["layer_end"]
        if not a < b <= p["num_layers"]:
            raise WireError("layer range %d..%d not inside 0..%d" % (a, b, p["num_layers"]))
        data = p["num_kv_heads"] * p["seq_len"] * p["head_dim"] * DTYPE_SIZE[p["dtype"]]
        if data > U64_MAX:
            raise WireError("KV size overflows u64")
        plan = []
        for layer in range(a, b):
            plan += [(ROLE["K"], layer, data), (ROLE["V"], layer, data)]
        if p["dtype"] == 3:
            scale = p["num_kv_heads"] * p["head_dim"] * 4
            for layer in range(a, b):
                plan += [(ROLE["K_scale"], layer, scale), (ROLE["V_scale"], layer, scale)]
        return plan
    if p["kind"] == "HiddenState":
        if p["dim"] == 0:
            raise WireError("hidden dim 0")
        data = p["rows"] * p["dim"] * DTYPE_SIZE[p["dtype"]]
        if data > U64_MAX or p["dim"] * 4 > U64_MAX:
            raise WireError("hidden-state size overflows u64")
        plan = [(ROLE["hidden"], 0, data)]
        if p["dtype"] == 3:
            plan.append((ROLE["hidden_scale"], 0, p["dim"] * 4))
        return plan
    if p["format"] not in TEXT_FORMATS:
        raise WireError("text format code %d" % p["format"])
    return [(ROLE["text"], 0, p["len"])]


def align_up(x, a):
    return (x + a - 1) & ~(a - 1)


def check_sections(header, header_len, total_len):
    a = header["alignment"]
    if a & (a - 1) or not 8 <= a <= 65536:
        raise WireError("alignment %d" % a)
    plan = section_plan(header["payload"])
    secs = header["sections"]
    if len(secs) != len(plan):
        raise WireError("%d sections, payload implies %d" % (len(secs), len(plan)))
    cursor = PREAMBLE_LEN + header_len
    for i, (s, (role, layer, n)) in enumerate(zip(secs, plan)):
        want = align_up(cursor, a)
        if (s["role"], s["layer"], s["len"], s["offset"]) != (role, layer, n, want):
            raise WireError(
                "section %d is %r, expected role %d layer %d len %d offset %d"
                % (i, s, role, layer, n, want)
            )
        cursor = s["offset"] + s["len"]
        if cursor > total_len:
            raise WireError("section %d ends past total_len" % i)
    if cursor != total_len:
        raise WireError("sections end at %d, total_len is %d" % (cursor, total_len))


def decode(msg):
    """Parse a whole message (Message::parse order) and return what it says."""
    pre = read_preamble(msg)
    if pre["total_len"] > len(msg):
        raise WireError("truncated message")
    if pre["total_len"] < len(msg):
        raise WireError("trailing bytes")
    h = msg[PREAMBLE_LEN : PREAMBLE_LEN + pre["header_len"]]
    if crc32(h) != pre["header_crc"]:
        raise WireError("header CRC mismatch")
    header = HeaderReader(h).read()
    check_sections(header, pre["header_len"], pre["total_len"])
    return {"preamble": pre, "header": header}


def verify(msg, decoded):
    """Section CRCs (not for device sections) and zero padding."""
    if decoded["preamble"]["flags"] & FLAG_DEVICE_SECTIONS:
        return
    cursor = PREAMBLE_LEN + decoded["preamble"]["header_len"]
    for i, s in enumerate(decoded["header"]["sections"]):
        if any(msg[cursor : s["offset"]]):
            raise WireError("padding before section %d is not zero" % i)
        body = msg[s["offset"] : s["offset"] + s["len"]]
        if crc32(body) != s["crc32"]:
            raise WireError("section %d CRC mismatch" % i)
        cursor = s["offset"] + s["len"]


# ---------------------------------------------------------------- canonical writer


def encode_header(envelope, payload, alignment, sections):
    """The canonical form: blocks in block order from position 0, then the root."""
    buf = bytearray()

    def block(data):
        pos = len(buf)
        buf.extend(data)
        return pos

    def string_block(s):
        b = s.encode("utf-8")
        return block(b) if len(b) > INLINE_MAX else None

    def string_obj(s, q, target):
        b = s.encode("utf-8")
        if len(b) <= INLINE_MAX:
            return b + b"\xff" * (INLINE_MAX - len(b))
        n = len(b)
        return struct.pack("<Ii", 0x80 | (n & 0x3F) | ((n >> 6) << 8), target - q)

    env_pos = [string_block(envelope[f]) for f in ENVELOPE_FIELDS]
    extra = sorted(envelope["extra"], key=lambda kv: kv[0].encode("utf-8"))
    extra_pos = [(string_block(k), string_block(v)) for k, v in extra]
    extra_at = len(buf)
    for i, ((k, v), (kp, vp)) in enumerate(zip(extra, extra_pos)):
        q = extra_at + EXTRA_SIZE * i
        buf.extend(string_obj(k, q, kp) + string_obj(v, q + 8, vp))
    map_pos = string_block(payload["map_id"]) if payload["kind"] == "HiddenState" else None
    sections_at = len(buf)
    for s in sections:
        buf.extend(struct.pack("<BIQQI", s["role"], s["layer"], s["offset"], s["len"], s["crc32"]))
    R = len(buf)
    for i, f in enumerate(ENVELOPE_FIELDS):
        buf.extend(string_obj(envelope[f], R + 8 * i, env_pos[i]))
    buf.extend(struct.pack("<iI", extra_at - (R + 56), len(extra)))
    if payload["kind"] == "KvCache":
        p = payload
        pl = struct.pack(
            "<BIIIQBBII", KV, p["num_layers"], p["num_kv_heads"], p["head_dim"],
            p["seq_len"], p["dtype"], p["layout"], p["layer_start"], p["layer_end"],
        )
    elif payload["kind"] == "HiddenState":
        p = payload
        pl = struct.pack("<BQQB", HIDDEN, p["rows"], p["dim"], p["dtype"])
        pl += string_obj(p["map_id"], R + 64 + 18, map_pos)
    else:
        pl = struct.pack("<BBQ", TEXT, payload["format"], payload["len"])
    buf.extend(pl + bytes(PAYLOAD_SIZE - len(pl)))
    buf.extend(struct.pack("<I", alignment))
    buf.extend(struct.pack("<iI", sections_at - (R + 99), len(sections)))
    assert len(buf) == R + ROOT_SIZE
    return bytes(buf)


def encode_message(envelope, payload, alignment, contents, flags=0):
    """A whole message: header planned once (its length does not depend on offsets
    or CRCs), canonical section offsets, zero padding, CRCs."""
    plan = section_plan(payload)
    assert len(plan) == len(contents)
    placeholder = [dict(role=r, layer=l, offset=0, len=n, crc32=0) for r, l, n in plan]
    header_len = len(encode_header(envelope, payload, alignment, placeholder))
    cursor, sections = PREAMBLE_LEN + header_len, []
    for (r, l, n), body in zip(plan, contents):
        assert len(body) == n
        off = align_up(cursor, alignment)
        crc = 0 if flags & FLAG_DEVICE_SECTIONS else crc32(body)
        sections.append(dict(role=r, layer=l, offset=off, len=n, crc32=crc))
        cursor = off + n
    header = encode_header(envelope, payload, alignment, sections)
    assert len(header) == header_len
    msg = bytearray(cursor)
    msg[PREAMBLE_LEN : PREAMBLE_LEN + header_len] = header
    for s, body in zip(sections, contents):
        msg[s["offset"] : s["offset"] + s["len"]] = body
    write_preamble(msg, flags, header_len, cursor, crc32(header))
    return bytes(msg)


def write_preamble(msg, flags, header_len, total_len, header_crc):
    msg[0:20] = b"AV" + bytes([2, flags]) + struct.pack("<IQI", header_len, total_len, header_crc)
    msg[20:32] = struct.pack("<IQ", crc32(bytes(msg[0:20])), 0)


# ---------------------------------------------------------------- the committed vectors

ENV = {
    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "model_hash": "a" * 64,
    "model_family": "llama",
    "tokenizer_hash": "b" * 64,
    "session_id": "0123456789abcdef0123456789abcdef",
    "source_agent_id": "researcher",
    "target_agent_id": "solver",
    "extra": [["num_steps", "4"]],
}
EMPTY_ENV = dict({f: "" for f in ENVELOPE_FIELDS}, extra=[])
TEXT_BODY = b'{"role":"researcher","content":"x = 6 * 7"}'


def kv(num_layers, heads, head_dim, seq_len, dtype, layout, start, end):
    return dict(
        kind="KvCache", num_layers=num_layers, num_kv_heads=heads, head_dim=head_dim,
        seq_len=seq_len, dtype=dtype, layout=layout, layer_start=start, layer_end=end,
    )


# name -> (envelope, payload, alignment, section contents: "pattern" or bytes)
# (avp-wire/tests/vectors.rs: section i, byte j of the pattern is (16 i + j) mod 251)
EXPECTED = {
    "kv_f16_hnd.avp": (ENV, kv(2, 3, 4, 5, 1, 0, 0, 2), 64, "pattern"),
    "kv_i8_nhd_layers_1_3_page_aligned.avp": (EMPTY_ENV, kv(4, 1, 8, 2, 3, 1, 1, 3), 4096, "pattern"),
    "hidden_bf16_map.avp": (
        ENV,
        dict(kind="HiddenState", rows=1, dim=8, dtype=2, map_id="vocab:0123456789abcdef"),
        64,
        "pattern",
    ),
    "text_json.avp": (ENV, dict(kind="Text", format=0, len=len(TEXT_BODY)), 64, [TEXT_BODY]),
}


def contents_of(payload, spec):
    if spec != "pattern":
        return spec
    return [
        bytes((16 * i + j) % 251 for j in range(n))
        for i, (_, _, n) in enumerate(section_plan(payload))
    ]


def refusals(msg):
    """Broken variants of a valid message (CRCs recomputed) that must be refused,
    and one non-canonical variant that must be accepted."""
    pre = read_preamble(msg)
    H = pre["header_len"]
    h = bytes(msg[PREAMBLE_LEN : PREAMBLE_LEN + H])
    R = H - ROOT_SIZE

    def rebuild(header, header_len=None):
        header_len = len(header) if header_len is None else header_len
        m = bytearray(msg)
        m[PREAMBLE_LEN : PREAMBLE_LEN + H] = header
        write_preamble(m, pre["flags"], header_len, pre["total_len"], crc32(bytes(header[:header_len])))
        return bytes(m)

    def patch(pos, data):
        b = bytearray(h)
        b[pos : pos + len(data)] = data
        return rebuild(b)

    extra_off = struct.unpack_from("<i", h, R + 56)[0]
    sections_off = struct.unpack_from("<i", h, R + 99)[0]
    bad = [
        ("extra array 1 byte later (overlaps the next block)", patch(R + 56, struct.pack("<i", extra_off + 1))),
        ("sections array 1 byte earlier (overlaps the block before it)", patch(R + 99, struct.pack("<i", sections_off - 1))),
        ("out-of-line string of length 8", patch(R, struct.pack("<I", 0x88))),
        ("payload tag 3", patch(R + 64, b"\x03")),
        ("inline string with invalid UTF-8", patch(R + 16, b"\xc3\xff")),
        ("sections vector pointing into the root", patch(R + 99, struct.pack("<i", 0))),
        ("sections vector one element longer", patch(R + 103, struct.pack("<I", struct.unpack_from("<I", h, R + 103)[0] + 1))),
        ("alignment 48", patch(R + 95, struct.pack("<I", 48))),
        ("header shorter than the root", rebuild(h[: ROOT_SIZE - 1] + bytes(H - ROOT_SIZE + 1), ROOT_SIZE - 1)),
    ]
    if h[R] & 0xC0 == 0x80 and h[R + 8] & 0xC0 == 0x80:  # model_id, model_hash out of line
        off0 = struct.unpack_from("<i", h, R + 4)[0]
        bad += [
            ("model_id pointer 1 byte later (overlaps model_hash)", patch(R + 4, struct.pack("<i", off0 + 1))),
            ("model_hash pointing at model_id's bytes", patch(R + 12, struct.pack("<i", off0 - 8))),
            ("model_id pointing into the root", patch(R + 4, struct.pack("<i", 0))),
            ("model_id pointing before the header", patch(R + 4, struct.pack("<i", -R - 1))),
        ]
    for what, m in bad:
        try:
            decode(m)
        except WireError:
            continue
        yield "accepted a broken header: " + what
    # Non-canonical but valid: a gap of 4 bytes before the first block (relative
    # pointers are unchanged; header_len grows by 4, section offsets stay put
    # when 32 + H + 4 still rounds up to the same boundary).
    gapped = bytes(4) + h
    first = align_up(PREAMBLE_LEN + H, decode(msg)["header"]["alignment"])
    if PREAMBLE_LEN + H + 4 <= first:
        m = bytearray(msg)
        m[PREAMBLE_LEN : first] = gapped + bytes(first - PREAMBLE_LEN - len(gapped))
        write_preamble(m, pre["flags"], H + 4, pre["total_len"], crc32(gapped))
        try:
            d = decode(bytes(m))
            if d["header"]["envelope"] != decode(msg)["header"]["envelope"]:
                yield "a gap before the first block changed the decoded envelope"
        except WireError as e:
            yield "refused a valid non-canonical header (gap before the first block): %s" % e


def check(directory):
    failures = []
    files = sorted(glob.glob(os.path.join(directory, "*.avp")))
    names = {os.path.basename(f) for f in files}
    for missing in sorted(set(EXPECTED) - names):
        failures.append("%s: missing" % missing)
    for path in files:
        name = os.path.basename(path)
        msg = open(path, "rb").read()
        problems = []
        try:
            d = decode(msg)
            verify(msg, d)
        except WireError as e:
            failures.append("%s: %s" % (name, e))
            print("FAIL %s: %s" % (name, e))
            continue
        hd = d["header"]
        if name in EXPECTED:
            env, payload, alignment, spec = EXPECTED[name]
            if hd["envelope"] != env:
                problems.append("envelope %r != %r" % (hd["envelope"], env))
            if hd["payload"] != payload:
                problems.append("payload %r != %r" % (hd["payload"], payload))
            if hd["alignment"] != alignment:
                problems.append("alignment %d != %d" % (hd["alignment"], alignment))
            contents = contents_of(payload, spec)
            for i, (s, body) in enumerate(zip(hd["sections"], contents)):
                if msg[s["offset"] : s["offset"] + s["len"]] != body:
                    problems.append("section %d bytes differ from the expected content" % i)
            again = encode_message(env, payload, alignment, contents, d["preamble"]["flags"])
            if again != msg:
                first = next((i for i, (a, b) in enumerate(zip(again, msg)) if a != b), min(len(again), len(msg)))
                problems.append("canonical re-encoding differs (first at byte %d)" % first)
        else:
            print("note: %s has no expected values here; structural checks only" % name)
        canon = encode_header(hd["envelope"], hd["payload"], hd["alignment"], hd["sections"])
        if canon != msg[PREAMBLE_LEN : PREAMBLE_LEN + d["preamble"]["header_len"]]:
            problems.append("header is not in canonical form")
        problems += list(refusals(msg))
        if problems:
            failures += ["%s: %s" % (name, p) for p in problems]
            print("FAIL %s" % name)
            for p in problems:
                print("  " + p)
        else:
            print(
                "ok   %s: header_len %d, root at %d, %d blocks, %d sections, payload %s, "
                "re-encoded byte for byte, broken headers refused"
                % (name, d["preamble"]["header_len"], hd["root"], len(hd["blocks"]),
                   len(hd["sections"]), hd["payload"]["kind"])
            )
    if failures:
        print("%d problem(s)" % len(failures))
        return 1
    print("all %d vectors ok" % len(files))
    return 0


def main(argv):
    if argv[1:2] == ["--check"]:
        here = os.path.dirname(os.path.abspath(__file__))
        return check(argv[2] if len(argv) > 2 else os.path.join(here, "vectors"))
    if len(argv) != 2 or argv[1].startswith("-"):
        print("usage: decode_header.py FILE.avp | --check [DIR]", file=sys.stderr)
        return 2
    msg = open(argv[1], "rb").read()
    try:
        d = decode(msg)
        verify(msg, d)
    except WireError as e:
        print("invalid: %s" % e, file=sys.stderr)
        return 1
    print(json.dumps(d, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
