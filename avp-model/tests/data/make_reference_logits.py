#!/usr/bin/env python3
"""Make reference_logits.json: first-forward logits of SmolLM2-135M-Instruct computed by
an independent implementation — the plain-numpy decoder `npgen.py` from the project's
shared reference tools, over the GGUF converted to safetensors by `gguf2hf.py` (both use
llama.cpp's `gguf` package to dequantize).

  python gguf2hf.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smolhf f32
  python make_reference_logits.py /tmp/smolhf path/to/npgen.py
"""
import json
import sys

import numpy as np

hf_dir, npgen = sys.argv[1], sys.argv[2]
PROMPT = "The capital of France is"
sys.argv = [npgen, hf_dir, PROMPT, "0", "raw"]
ns = {"__name__": "npgen"}
exec(open(npgen).read(), ns)  # computes `ids` and the first-forward `logits`, generates 0 tokens
logits = np.asarray(ns["logits"], dtype=np.float64)
top = np.argsort(-logits)[:16]
json.dump(
    {
        "prompt": PROMPT,
        "ids": [int(i) for i in ns["ids"]],
        "first": [float(x) for x in logits[:256]],
        "top_ids": [int(i) for i in top],
        "top_values": [float(logits[i]) for i in top],
        "mean": float(logits.mean()),
        "std": float(logits.std()),
    },
    open("reference_logits.json", "w"),
)
