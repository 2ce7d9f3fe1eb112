#!/usr/bin/env python3
"""Drive the Python reference `avp` (0.6.2) for the Rust interop tests.

  avp_ref.py encode-cases OUTDIR   write messages encoded by the reference, plus
                                   OUTDIR/manifest.json describing each one
  avp_ref.py decode FILE...        decode Rust-written messages with avp.codec.decode
                                   and print one JSON object per file
"""
import hashlib
import json
import sys
import zlib
from pathlib import Path

import numpy as np
from avp import codec
from avp.codec import avp_pb2
from avp.kv_cache import KVCacheHeader
from avp.types import AVPMetadata, CommunicationMode, CompressionLevel, DataType, PayloadType

LEVELS = {
    0: CompressionLevel.NONE,
    1: CompressionLevel.FAST,
    3: CompressionLevel.BALANCED,
    19: CompressionLevel.MAX,
}


def bf16_bytes(values: np.ndarray) -> bytes:
    """bf16 as its raw 16-bit pattern (round to nearest even), little-endian."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def tensor_bytes(rng, n: int, dtype: DataType) -> bytes:
    x = rng.standard_normal(n).astype("<f4")
    if dtype == DataType.FLOAT32:
        return x.tobytes()
    if dtype == DataType.FLOAT16:
        return x.astype("<f2").tobytes()
    if dtype == DataType.BFLOAT16:
        return bf16_bytes(x)
    return (np.clip(x * 40, -127, 127)).astype("i1").tobytes()


def meta_json(m: AVPMetadata) -> dict:
    return {
        "session_id": m.session_id,
        "source_agent_id": m.source_agent_id,
        "target_agent_id": m.target_agent_id,
        "model_id": m.model_id,
        "hidden_dim": m.hidden_dim,
        "num_layers": m.num_layers,
        "payload_type": int(m.payload_type),
        "dtype": int(m.dtype),
        "tensor_shape": list(m.tensor_shape),
        "mode": int(m.mode),
        "avp_map_id": m.avp_map_id,
        "extra": dict(m.extra),
    }


def encode_cases(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261124)
    cases = []

    def add(name, payload, meta, level, kv=None):
        if kv is None:
            data = codec.encode(payload, meta, LEVELS[level])
        else:
            data = codec.encode_kv_cache(payload, meta, LEVELS[level])
        (out / f"{name}.avp").write_bytes(data)
        (out / f"{name}.payload").write_bytes(payload)
        case = {"name": name, "level": level, "metadata": meta_json(meta),
                "crc32": zlib.crc32(payload) & 0xFFFFFFFF, "payload_len": len(payload)}
        if kv is not None:
            case["kv"] = kv
        cases.append(case)

    # Hidden states: every float dtype at every compression level, shapes 1-D and 2-D.
    for dt in (DataType.FLOAT32, DataType.FLOAT16, DataType.BFLOAT16):
        for level in LEVELS:
            rows, dim = (1, 64) if level else (3, 96)
            meta = AVPMetadata(
                session_id="sess-%d" % level, source_agent_id="agent-a", target_agent_id="agent-b",
                model_id="Qwen/Qwen2.5-0.5B", hidden_dim=dim, num_layers=24,
                payload_type=PayloadType.HIDDEN_STATE, dtype=dt, tensor_shape=(rows, dim),
                avp_map_id=("vocab:0123456789abcdef" if dt == DataType.BFLOAT16 else ""),
                # Level 0 keeps one extra key so the bytes are deterministic (protobuf
                # leaves the order of map entries undefined) and comparable exactly.
                extra=({"model_hash": "ab" * 32, "note": "héllo ✓"} if level else {"note": "héllo ✓"}),
            )
            add(f"hidden_{dt.name.lower()}_z{level}", tensor_bytes(rng, rows * dim, dt), meta, level)

    # KV caches from numpy bytes with the reference's 17-byte header.
    for dt, layers, heads, hd, seq in ((DataType.FLOAT16, 2, 2, 8, 5), (DataType.BFLOAT16, 3, 1, 16, 4),
                                       (DataType.FLOAT32, 1, 4, 4, 7)):
        dname = {DataType.FLOAT32: "float32", DataType.FLOAT16: "float16", DataType.BFLOAT16: "bfloat16"}[dt]
        hdr = KVCacheHeader(num_layers=layers, num_kv_heads=heads, head_dim=hd, seq_len=seq, dtype=dname)
        parts = [hdr.to_bytes()]
        for _ in range(layers):
            parts.append(tensor_bytes(rng, heads * seq * hd, dt))  # K
            parts.append(tensor_bytes(rng, heads * seq * hd, dt))  # V
        payload = b"".join(parts)
        for level in LEVELS:
            meta = AVPMetadata(
                session_id="kv", source_agent_id="researcher", target_agent_id="solver",
                model_id="HuggingFaceTB/SmolLM2-135M-Instruct", hidden_dim=576, num_layers=layers,
                dtype=dt, mode=CommunicationMode.LATENT,
                extra=({"model_hash": "cd" * 32, "model_family": "llama", "num_steps": "4"} if level
                       else {"model_hash": "cd" * 32}),
            )
            add(f"kv_{dname}_z{level}", payload, meta, level,
                kv={"num_layers": layers, "num_kv_heads": heads, "head_dim": hd, "seq_len": seq, "dtype": int(dt)})

    # JSON mode, empty payload, int8 dtype.
    add("json_empty", b"", AVPMetadata(mode=CommunicationMode.JSON, model_id="m"), 0)
    add("int8_hidden", tensor_bytes(rng, 32, DataType.INT8),
        AVPMetadata(dtype=DataType.INT8, hidden_dim=32, tensor_shape=(32,)), 3)
    (out / "manifest.json").write_text(json.dumps(cases, indent=1))


def decode(files) -> None:
    for f in files:
        data = Path(f).read_bytes()
        result = {"file": f}
        try:
            msg = codec.decode(data)
        except Exception as e:  # report, the Rust test asserts on it
            result["error"] = "%s: %s" % (type(e).__name__, e)
            print(json.dumps(result))
            continue
        meta_len = int.from_bytes(data[8:12], "little")
        pb = avp_pb2.Metadata()
        pb.ParseFromString(data[12:12 + meta_len])
        result.update({
            "metadata": meta_json(msg.metadata),
            "compression": msg.metadata.compression,
            "flags": msg.header.flags,
            "has_checksum": pb.HasField("payload_checksum"),
            "checksum": pb.payload_checksum if pb.HasField("payload_checksum") else None,
            "payload_len": len(msg.payload),
            "payload_sha256": hashlib.sha256(msg.payload).hexdigest(),
            "payload_crc32": zlib.crc32(msg.payload) & 0xFFFFFFFF,
        })
        if msg.metadata.payload_type == PayloadType.KV_CACHE:
            h = KVCacheHeader.from_bytes(msg.payload)
            result["kv"] = {"num_layers": h.num_layers, "num_kv_heads": h.num_kv_heads,
                            "head_dim": h.head_dim, "seq_len": h.seq_len, "dtype": h.dtype}
        print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "encode-cases":
        encode_cases(Path(sys.argv[2]))
    elif sys.argv[1] == "decode":
        decode(sys.argv[2:])
    else:
        sys.exit(__doc__)
