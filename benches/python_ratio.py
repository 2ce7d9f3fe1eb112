#!/usr/bin/env python3
"""Time the Python reference's encode+decode of a 64 MiB KV payload and ours, in one run.

  python benches/python_ratio.py [--avp target/release/avp] [--size-mib 64] [--reps 5]

The payload is the same shape on both sides: an f16 KV cache of 32 layers, 8 KV
heads, head_dim 128 (128 KiB per position). The reference encodes it with
`avp.codec.encode_kv_cache` (17-byte KV header + tensors, CRC32, protobuf) and
decodes it with `avp.codec.decode`; ours is `avp bench wire` (encode = copy the
tensors into the message with their CRCs; decode = parse + verify every section).
Prints one JSON line with both times and the ratio.
"""
import argparse
import json
import subprocess
import time

import numpy as np
from avp import codec
from avp.kv_cache import KVCacheHeader
from avp.types import AVPMetadata, CompressionLevel, DataType, PayloadType

ap = argparse.ArgumentParser()
ap.add_argument("--avp", default="target/release/avp")
ap.add_argument("--size-mib", type=int, default=64)
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()

size = args.size_mib << 20
seq = size // (32 * 2 * 8 * 128 * 2)
hdr = KVCacheHeader(num_layers=32, num_kv_heads=8, head_dim=128, seq_len=seq, dtype="float16")
rng = np.random.default_rng(0)
layers = [rng.standard_normal(8 * seq * 128, dtype=np.float32).astype(np.float16) for _ in range(64)]
meta = AVPMetadata(model_id="meta-llama/Meta-Llama-3-8B", hidden_dim=4096, num_layers=32,
                   payload_type=PayloadType.KV_CACHE, dtype=DataType.FLOAT16)


def py_round():
    t0 = time.perf_counter()
    kv_bytes = hdr.to_bytes() + b"".join(t.tobytes() for t in layers)  # the reference's serializer layout
    data = codec.encode_kv_cache(kv_bytes, meta, CompressionLevel.NONE)
    t1 = time.perf_counter()
    msg = codec.decode(data)
    t2 = time.perf_counter()
    assert len(msg.payload) == len(kv_bytes)
    return t1 - t0, t2 - t1


py_round()  # warm-up
runs = sorted((py_round() for _ in range(args.reps)), key=sum)
py_enc, py_dec = runs[len(runs) // 2]

out = subprocess.run([args.avp, "bench", "wire", "--json", "--sizes", f"{args.size_mib}MiB"],
                     check=True, capture_output=True, text=True).stdout
ours = json.loads(out.strip().splitlines()[-1])
rs_enc = size / (ours["encode_gbps"] * 1e9)
rs_dec = ours["parse_ns"] * 1e-9 + size / (ours["verify_gbps"] * 1e9)
print(json.dumps({
    "bench": "python_ratio",
    "size_bytes": size,
    "python_encode_s": round(py_enc, 5),
    "python_decode_s": round(py_dec, 5),
    "avp_encode_s": round(rs_enc, 5),
    "avp_decode_s": round(rs_dec, 5),
    "ratio": round((py_enc + py_dec) / (rs_enc + rs_dec), 1),
}))
