#!/usr/bin/env python3
"""Make dequant_vectors.json: raw ggml blocks and their float32 values as computed
by llama.cpp's own Python package (`pip install gguf`), an implementation
independent of ours. Run from this folder; the output is committed."""
import json

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

rng = np.random.default_rng(7)
out = {}
for t in [T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K]:
    block, size = GGML_QUANT_SIZES[t]
    raw = bytearray(rng.integers(0, 256, size * 3, dtype=np.uint8).tobytes())
    for b in range(3):
        base = b * size
        # Scales are f16: give them finite, moderate values.
        def f16(off, v):
            raw[base + off: base + off + 2] = np.float16(v).tobytes()
        if t in (T.Q4_0, T.Q5_0, T.Q8_0):
            f16(0, rng.uniform(-0.1, 0.1))
        elif t == T.Q4_1:
            f16(0, rng.uniform(0.001, 0.1)); f16(2, rng.uniform(-1, 1))
        elif t == T.Q4_K:
            f16(0, rng.uniform(0.001, 0.05)); f16(2, rng.uniform(0.001, 0.05))
        elif t == T.Q6_K:
            f16(208, rng.uniform(-0.01, 0.01))
    values = quants.dequantize(np.frombuffer(bytes(raw), dtype=np.uint8), t).astype(np.float32).ravel()
    assert np.all(np.isfinite(values))
    out[t.name] = {"block": block, "bytes_hex": bytes(raw).hex(), "values": [float(v) for v in values]}

with open("dequant_vectors.json", "w") as f:
    json.dump(out, f)
