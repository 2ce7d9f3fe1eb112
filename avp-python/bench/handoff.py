"""avp_rs handoff benchmarks (run by scripts/bench-python; prints JSON lines).

  handoff.py latency N          Python sender -> Python receiver over shm, 4 KiB KV:
                                sender's send() to the receiver holding a NumPy view
  handoff.py big MIB N          a MIB MiB KV cache (SmolLM2's shape, f16) between two
                                Python processes over shm: send_kv (one copy) and a
                                loan filled in place (send() checksums and publishes)
  handoff.py sender ...         (the other process of each)
"""
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import avp_rs

HEADS, HEAD_DIM, LAYERS = 3, 64, 30
GAP_US = 500


def stamp(loan_or_array) -> None:
    """Write perf_counter_ns (CLOCK_MONOTONIC: the same in both processes) into
    the first 8 bytes."""
    a = loan_or_array
    a.reshape(-1).view(np.int64)[0] = time.perf_counter_ns()


def stamp_of(a) -> int:
    return int(np.asarray(a).reshape(-1).view(np.int64)[0])


def sender(addr: str, mode: str, mib: int, n: int) -> None:
    # Slots that hold the whole cache: pre-faulted once, reused every handoff.
    slot = max(16, mib + 1) << 20
    tx = avp_rs.connect(addr, agent_id="bench", shm_slots=2, shm_slot_size=slot)
    if mode == "latency":
        seq = 4096 // (2 * HEADS * HEAD_DIM * 2)  # 1 layer K+V = 4 KiB (f16)
        for _ in range(n + 1):
            ln = tx.loan_kv(1, HEADS, HEAD_DIM, seq, "float16")
            ln.v(0).numpy()[...] = 0
            k = ln.k(0).numpy()
            k[...] = 0
            stamp(k)
            del k
            ln.send()
            time.sleep(GAP_US / 1e6)  # the receiver waits idle (`avp bench transport --gap-us`)
        return
    seq = mib * 2**20 // (2 * LAYERS * HEADS * HEAD_DIM * 2)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, HEADS, seq, HEAD_DIM)).astype(np.float16)
    kv = [(base.copy(), base.copy()) for _ in range(LAYERS)]
    for i in range(n + 1):
        if mode == "send_kv":
            stamp(kv[0][0])
            tx.send_kv(kv)
        else:
            ln = tx.loan_kv(LAYERS, HEADS, HEAD_DIM, seq, "float16")
            for layer, (k, v) in enumerate(kv):  # the producer writes its cache here
                ln.k(layer).numpy()[...] = k[0]
                ln.v(layer).numpy()[...] = v[0]
            k0 = ln.k(0).numpy()
            stamp(k0)
            del k0
            ln.send()
        time.sleep(0.05)


def receive(mode: str, mib: int, n: int) -> list:
    name = f"shm://bench-py-{os.getpid()}"
    listener = avp_rs.listen(name)
    p = subprocess.Popen([sys.executable, __file__, "sender", name, mode, str(mib), str(n)])
    rx = listener.accept(timeout=30)
    out = []
    for i in range(n + 1):
        with rx.recv(timeout=60) as msg:
            views = [msg.kv.k(l).numpy() for l in range(msg.kv.num_layers)]
            views += [msg.kv.v(l).numpy() for l in range(msg.kv.num_layers)]
            t = time.perf_counter_ns()
            if i:  # the first warms up
                out.append((t - stamp_of(views[0])) / 1e3)
            del views
    p.wait(timeout=60)
    return out


def main() -> None:
    what = sys.argv[1]
    if what == "sender":
        sender(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    if what == "latency":
        us = receive("latency", 0, int(sys.argv[2]))
        print(json.dumps({"bench": "python_latency", "transport": "shm", "size_bytes": 4096,
                          "p50_us": round(statistics.median(us), 2),
                          "p99_us": round(sorted(us)[int(0.99 * (len(us) - 1))], 2),
                          "reps": len(us)}))
    elif what == "big":
        mib, n = int(sys.argv[2]), int(sys.argv[3])
        for mode in ("send_kv", "loan"):
            us = receive(mode, mib, n)
            print(json.dumps({"bench": "python_handoff", "mode": mode, "transport": "shm",
                              "size_bytes": mib << 20, "p50_ms": round(statistics.median(us) / 1e3, 3),
                              "reps": len(us)}))


if __name__ == "__main__":
    main()
