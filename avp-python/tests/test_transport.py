"""avp_rs between two Python processes: KV caches handed over shared memory and
TCP, every byte compared; views share the transport's memory and are read-only;
release rules; DLPack; errors; threads."""
import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import avp_rs

sys.path.insert(0, str(Path(__file__).parent))
from kv_sender import HEAD_DIM, HEADS, cache  # noqa: E402

SENDER = str(Path(__file__).parent / "kv_sender.py")


def address(kind: str) -> str:
    if kind == "shm":
        return f"shm://pytest-{os.getpid()}-{threading.get_ident() % 100000}"
    return f"{kind}://127.0.0.1:0"


def start_sender(addr: str, dtype: str, count: int, *extra: str, loan=False) -> subprocess.Popen:
    env = dict(os.environ, AVP_TEST_LOAN="1" if loan else "0")
    return subprocess.Popen([sys.executable, SENDER, addr, dtype, str(count), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return out


@pytest.mark.parametrize("loan", [False, True], ids=["send_kv", "loan"])
@pytest.mark.parametrize("kind", ["shm", "tcp", "http"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_kv_caches_cross_processes_byte_for_byte(kind, dtype, loan):
    listener = avp_rs.listen(address(kind), token="t0k", agent_id="solver",
                             shm_upgrade=False)
    p = start_sender(listener.address, dtype, 3, loan=loan)
    rx = listener.accept(timeout=30)
    assert rx.session["transport"] == kind
    assert rx.session["peer_agent"] == "researcher"
    for n in range(3):
        want = cache(dtype, n)
        with rx.recv(timeout=30) as msg:
            assert msg.kind == "kv_cache"
            assert msg.envelope["extra"] == {"n": str(n)}
            assert msg.envelope["session_id"] == rx.session["id"]
            kv = msg.kv
            assert (kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.seq_len, kv.dtype) == (
                4, HEADS, HEAD_DIM, 37, dtype)
            msg.verify()
            for layer, (k, v) in enumerate(want):
                got_k, got_v = kv.k(layer).numpy(), kv.v(layer).numpy()
                assert got_k.shape == (HEADS, 37, HEAD_DIM)
                assert got_k.dtype == k.dtype
                assert got_k.tobytes() == k[0].tobytes()
                assert got_v.tobytes() == v[0].tobytes()
                del got_k, got_v
    out = finish(p)
    assert f"transport {kind}" in out
    with pytest.raises(avp_rs.PeerGone):
        rx.recv(timeout=30)


def test_views_point_into_shared_memory_and_are_read_only():
    listener = avp_rs.listen(address("shm"), token="t0k")
    p = start_sender(listener.address, "float16", 1)
    rx = listener.accept(timeout=30)
    lo, hi = rx.pool_range
    msg = rx.recv(timeout=30)
    k = msg.kv.k(2).numpy()
    assert lo <= k.ctypes.data < hi, "the array is a view of the slot, not a copy"
    assert not k.flags.writeable
    with pytest.raises(ValueError):
        k[0, 0, 0] = 1
    assert msg.exports == 1
    # DLPack: NumPy takes the same memory, read-only.
    d = np.from_dlpack(msg.kv.v(0))
    assert lo <= d.ctypes.data < hi and not d.flags.writeable
    assert d.tobytes() == cache("float16", 0)[0][1][0].tobytes()
    assert msg.exports == 2
    # Release refuses while views live; nothing breaks.
    with pytest.raises(avp_rs.ViewsAlive, match="2 arrays or tensors"):
        msg.release()
    del k, d
    gc.collect()
    assert msg.exports == 0
    sec = msg.kv.k(0)
    msg.release()
    assert msg.released
    # After release: clear errors, never a crash.
    with pytest.raises(avp_rs.MessageReleased):
        sec.numpy()
    with pytest.raises(avp_rs.MessageReleased):
        np.from_dlpack(sec)
    with pytest.raises(avp_rs.MessageReleased):
        msg.verify()
    finish(p)


def test_a_dropped_message_keeps_its_memory_until_the_last_view_goes():
    listener = avp_rs.listen(address("tcp"), token="t0k")
    p = start_sender(listener.address, "float32", 1)
    rx = listener.accept(timeout=30)
    msg = rx.recv(timeout=30)
    k = msg.kv.k(1).numpy()
    want = cache("float32", 0)[1][0][0].tobytes()
    del msg
    gc.collect()
    assert k.tobytes() == want
    finish(p)


def test_dlpack_copy_is_private_and_writable():
    listener = avp_rs.listen(address("shm"), token="t0k")
    p = start_sender(listener.address, "float32", 1)
    rx = listener.accept(timeout=30)
    with rx.recv(timeout=30) as msg:
        s = msg.kv.k(0)
        cap = s.__dlpack__(max_version=(1, 0), copy=True)
        assert type(cap).__name__ == "PyCapsule"
        del cap
        assert msg.exports == 0
        a = np.array(s)  # __array__: a view; np.array copies it
        assert a.flags.writeable and a.tobytes() == cache("float32", 0)[0][0][0].tobytes()
    finish(p)


def test_two_threads_share_one_receiver():
    listener = avp_rs.listen(address("shm"), token="t0k")
    p = start_sender(listener.address, "float16", 8)
    rx = listener.accept(timeout=30)
    seen, errors = [], []

    def take():
        try:
            for _ in range(4):
                with rx.recv(timeout=30) as m:
                    seen.append(int(m.envelope["extra"]["n"]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(seen) == list(range(8))
    finish(p)


def test_bad_arguments_raise_python_exceptions():
    with pytest.raises(ValueError, match="unknown scheme"):
        avp_rs.listen("udp://x:1")
    with pytest.raises(ValueError, match="unknown identity field"):
        avp_rs.listen(address("tcp"), identity={"colour": "blue"})
    listener = avp_rs.listen(address("tcp"))
    with pytest.raises(avp_rs.Timeout):
        listener.accept(timeout=0.2)
    with pytest.raises(ValueError, match="timeout"):
        listener.accept(timeout=-1)
    connected = []
    t = threading.Thread(target=lambda: connected.append(avp_rs.connect(listener.address)))
    t.start()
    rx = listener.accept(timeout=10)
    t.join()
    tx = connected[0]
    with pytest.raises(ValueError, match="empty"):
        tx.send_kv([])
    with pytest.raises(TypeError, match=r"\(K, V\) pair"):
        tx.send_kv([np.zeros((1, 2, 3, 4), np.float32)])
    k = np.zeros((1, 2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="differs"):
        tx.send_kv([(k, np.zeros((1, 2, 5, 4), np.float32))])
    with pytest.raises(TypeError, match="int64"):
        tx.send_kv([(k.astype(np.int64), k.astype(np.int64))])
    with pytest.raises(avp_rs.WireError):
        tx.send_bytes(b"not a message")
    with pytest.raises(avp_rs.Timeout):
        rx.recv(timeout=0.1)
    assert rx.try_recv() is None
    tx.send_kv([(k, k)])
    with rx.recv(timeout=10) as m:
        with pytest.raises(ValueError, match="not a hidden state"):
            m.hidden
        with pytest.raises(ValueError, match="layer 3 is not in this message"):
            m.kv.k(3)
    assert issubclass(avp_rs.Timeout, avp_rs.AvpError)


def test_loan_rules():
    listener = avp_rs.listen(address("shm"))
    connected = []
    t = threading.Thread(target=lambda: connected.append(avp_rs.connect(listener.address)))
    t.start()
    rx = listener.accept(timeout=10)
    t.join()
    tx = connected[0]
    loan = tx.loan_kv(2, 1, 4, 3, "float32")
    k = loan.k(0).numpy()
    assert k.shape == (1, 3, 4) and k.flags.writeable
    with pytest.raises(avp_rs.AvpError, match="loan is outstanding"):
        tx.send_kv([(k, k)])
    for layer in range(2):
        loan.k(layer).numpy()[...] = layer + 1
        loan.v(layer).numpy()[...] = -(layer + 1)
    with pytest.raises(avp_rs.ViewsAlive, match="1 arrays"):
        loan.send()
    stale = loan.k(1)
    del k
    gc.collect()
    loan.send()
    with pytest.raises(avp_rs.MessageReleased):
        stale.numpy()
    with rx.recv(timeout=10) as m:
        assert m.kv.k(1).numpy().tolist() == [[[2.0] * 4] * 3]
        assert m.kv.v(0).numpy().tolist() == [[[-1.0] * 4] * 3]
    # Abandoned: nothing is sent, and the sender is free again.
    with tx.loan_kv(1, 1, 4, 3, "float16") as other:
        other.k(0).numpy()[...] = 7
    assert rx.try_recv() is None
    with pytest.raises(avp_rs.MessageReleased):
        other.k(0).numpy()
    # A writable DLPack export of a loan section.
    ln = tx.loan_kv(1, 1, 4, 3, "float32")
    arr = np.from_dlpack(ln.k(0))
    assert arr.flags.writeable
    arr[...] = 5
    ln.v(0).numpy()[...] = 6
    del arr
    gc.collect()
    ln.send()
    with rx.recv(timeout=10) as m:
        assert float(m.kv.k(0).numpy()[0, 0, 0]) == 5.0
