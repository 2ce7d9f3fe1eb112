"""torch.from_dlpack over received and loaned sections, without a copy (runs
where torch is installed; CI's environment has no torch, see scripts/test)."""
import os
import threading

import numpy as np
import pytest

import avp_rs

torch = pytest.importorskip("torch")


def pair():
    listener = avp_rs.listen(f"shm://pytest-torch-{os.getpid()}")
    box = []
    t = threading.Thread(target=lambda: box.append(avp_rs.connect(listener.address)))
    t.start()
    rx = listener.accept(timeout=10)
    t.join()
    return box[0], rx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_tensors_view_received_and_loaned_memory(dtype):
    tx, rx = pair()
    k = torch.randn(1, 2, 5, 8).to(dtype)
    v = torch.randn(1, 2, 5, 8).to(dtype)
    # Fill a loan in place from torch: the tensor is the loaned memory.
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    ln = tx.loan_kv(1, 2, 8, 5, name)
    kt = torch.from_dlpack(ln.k(0))
    kt.copy_(k[0])
    torch.from_dlpack(ln.v(0)).copy_(v[0])
    del kt
    ln.send()
    with rx.recv(timeout=10) as msg:
        lo, hi = rx.pool_range
        got = torch.from_dlpack(msg.kv.k(0))
        assert got.dtype == dtype and got.shape == (2, 5, 8)
        assert lo <= got.data_ptr() < hi, "a view of the slot, not a copy"
        assert torch.equal(got, k[0])
        assert torch.equal(torch.from_dlpack(msg.kv.v(0)), v[0])
        with pytest.raises(avp_rs.ViewsAlive):
            msg.release()
        del got
        import gc
        gc.collect()
