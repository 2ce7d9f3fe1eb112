"""avp_rs.encode_kv / decode / inspect, and the Python reference's bytes both ways
(needs the reference `avp` 0.6.2 in the same interpreter, as scripts/test sets up)."""
import numpy as np
import pytest

import avp_rs

avp = pytest.importorskip("avp", reason="the reference avp==0.6.2 is installed by scripts/test")
from avp import codec  # noqa: E402
from avp.kv_cache import KVCacheHeader  # noqa: E402
from avp.types import AVPMetadata, CommunicationMode, DataType  # noqa: E402


def cache(layers=3, heads=2, seq=5, head_dim=8, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(rng.standard_normal((1, heads, seq, head_dim)).astype(dtype) for _ in range(2))
            for _ in range(layers)]


def test_encode_decode_round_trip_and_inspect():
    kv = cache()
    data = avp_rs.encode_kv(kv, model_id="m", session_id="s" * 32, extra={"turn": "1"})
    info = avp_rs.inspect(data)
    assert info["version"] == 2 and info["kind"] == "kv_cache" and info["checksums_ok"]
    assert info["envelope"]["extra"] == {"turn": "1"}
    m = avp_rs.decode(data)
    assert m.version == 2 and m.to_bytes() == data
    for layer, (k, v) in enumerate(kv):
        assert np.array_equal(m.kv.k(layer).numpy(), k[0])
        assert np.array_equal(m.kv.v(layer).numpy(), v[0])
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    info = avp_rs.inspect(bytes(bad))
    assert not info["checksums_ok"] and "checksum" in info["problem"].lower()
    with pytest.raises(avp_rs.WireError):
        avp_rs.decode(b"garbage!")
    assert "problem" in avp_rs.inspect(b"xx")


def test_the_reference_reads_what_avp_rs_writes():
    kv = cache(dtype=np.float32)
    data = avp_rs.encode_kv(kv, version=1, model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                            model_hash="ab" * 32, model_family="llama", session_id="sess",
                            source_agent_id="a", target_agent_id="b")
    msg = codec.decode(data)
    assert msg.metadata.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert msg.metadata.session_id == "sess" and msg.metadata.num_layers == 3
    assert dict(msg.metadata.extra) == {"model_hash": "ab" * 32, "model_family": "llama"}
    hdr = KVCacheHeader.from_bytes(msg.payload[:17])
    assert (hdr.num_layers, hdr.num_kv_heads, hdr.seq_len, hdr.head_dim, hdr.dtype) == (
        3, 2, 5, 8, "float32")
    want = b"".join(t[0].tobytes() for pair in kv for t in pair)
    assert msg.payload[17:] == want


def test_avp_rs_reads_what_the_reference_writes():
    # What AVPContext.to_bytes() writes: codec.encode_kv_cache of the 17-byte
    # KVCacheHeader and K, V per layer (its serialize_kv_cache needs torch).
    kv = cache(dtype=np.float16, seed=3)
    hdr = KVCacheHeader(num_layers=3, num_kv_heads=2, head_dim=8, seq_len=5, dtype="float16")
    payload = hdr.to_bytes() + b"".join(t[0].tobytes() for pair in kv for t in pair)
    meta = AVPMetadata(session_id="s1", source_agent_id="py", model_id="m", hidden_dim=576,
                       num_layers=3, dtype=DataType.FLOAT16, mode=CommunicationMode.LATENT,
                       extra={"model_hash": "cd" * 32, "model_family": "llama", "num_steps": "4"})
    m = avp_rs.decode(codec.encode_kv_cache(payload, meta))
    assert m.version == 1 and m.kind == "kv_cache"
    assert m.envelope["model_hash"] == "cd" * 32 and m.envelope["extra"] == {"num_steps": "4"}
    for layer, (k, v) in enumerate(kv):
        assert np.array_equal(m.kv.k(layer).numpy(), k[0])
        assert np.array_equal(m.kv.v(layer).numpy(), v[0])
    # And back: the reference decodes our v1 of it to the same payload.
    assert codec.decode(m.to_v1()).payload == payload
