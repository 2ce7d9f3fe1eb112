"""A sending agent for the tests: `python kv_sender.py ADDR DTYPE COUNT [LAYERS SEQ]`.

Connects to ADDR and sends COUNT KV caches built by `cache(dtype, n)`.
"""
import os
import sys

import numpy as np

import avp_rs

HEADS, HEAD_DIM = 3, 64


def cache(dtype: str, n: int, layers: int = 4, seq: int = 37):
    """KV cache number `n`: [(K, V)] per layer, [1, heads, seq, head_dim]."""
    rng = np.random.default_rng(1000 + n)
    out = []
    for _ in range(layers):
        pair = []
        for _ in range(2):
            x = rng.standard_normal((1, HEADS, seq, HEAD_DIM)).astype(np.float32)
            if dtype == "bfloat16":
                import ml_dtypes
                x = x.astype(ml_dtypes.bfloat16)
            else:
                x = x.astype(dtype)
            pair.append(x)
        out.append(tuple(pair))
    return out


def main() -> None:
    addr, dtype, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layers = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    seq = int(sys.argv[5]) if len(sys.argv) > 5 else 37
    tx = avp_rs.connect(addr, agent_id="researcher", token="t0k")
    print(tx.explain(), flush=True)
    loan = os.environ.get("AVP_TEST_LOAN") == "1"
    for n in range(count):
        kv = cache(dtype, n, layers, seq)
        if not loan:
            tx.send_kv(kv, target_agent_id="solver", extra={"n": str(n)})
            continue
        # Filled in place: the arrays are the loaned memory itself.
        ln = tx.loan_kv(layers, HEADS, HEAD_DIM, seq, dtype, target_agent_id="solver",
                        extra={"n": str(n)})
        for layer, (k, v) in enumerate(kv):
            ln.k(layer).numpy()[...] = k[0]
            ln.v(layer).numpy()[...] = v[0]
        ln.send()


if __name__ == "__main__":
    main()
