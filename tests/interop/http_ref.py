#!/usr/bin/env python3
"""Drive the Python reference `avp` (0.6.2) over its HTTP binding, for the Rust tests.

  http_ref.py client URL OUTDIR [--token T] [--agent A] [--identity JSON] [--kv-seq N]
      AVPClient: handshake, then transmit a KV cache (AVPContext.to_bytes() where
      torch is installed, else the functions it calls; see kv_cache), a hidden state
      and a JSON text message. The bytes sent go to OUTDIR; one JSON line per step
      (handshake result, each answer, or the error and its status) goes to stdout.
  http_ref.py server OUTDIR
      The reference's create_app, served by uvicorn on 127.0.0.1 (port chosen by the
      system, written to OUTDIR/port). Each message its handlers receive is written
      to OUTDIR (n.json with the decoded metadata, n.payload with the payload bytes).
  http_ref.py server OUTDIR --discard
      The same server with handlers that keep nothing (for benchmarks).
  http_ref.py make-kv FILE MIB
      Write a v1 KV-cache message of about MIB MiB (f16, the reference's encoder).
  http_ref.py transmit-file URL FILE COUNT
      Time COUNT transmits of FILE's message with the reference's AVPClient (each
      encodes and POSTs, as a user's call does); prints one JSON line with the
      seconds of each (for scripts/bench-http).
"""
import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
from avp import codec
from avp.errors import AVPError
from avp.fallback import JSONMessage
from avp.kv_cache import KVCacheHeader
from avp.transport import AVPClient, create_app
from avp.types import AVPMetadata, CommunicationMode, DataType, ModelIdentity, PayloadType


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


def say(**kv) -> None:
    print(json.dumps(kv), flush=True)


def step(name, fn):
    """Run one client step; report its answer or its error (with the HTTP status)."""
    try:
        r = fn()
        body = r.json() if hasattr(r, "json") else r
        say(step=name, ok=True, answer=body)
        return True
    except AVPError as e:
        say(step=name, ok=False, error=str(e), status=getattr(e, "status_code", None),
            kind=type(e).__name__)
        return False


def kv_cache(rng, session, agent, layers, heads, head_dim, seq):
    """A KV cache message: AVPContext.to_bytes() of a torch cache where torch is
    installed; else the same bytes from the functions to_bytes calls
    (codec.encode_kv_cache of the KVCacheHeader + K/V per layer), since its
    serialize_kv_cache needs torch."""
    try:
        import torch
    except ImportError:
        torch = None
    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if torch is not None:
        from avp.context import AVPContext
        g = torch.Generator().manual_seed(7)
        pkv = tuple(
            (torch.randn(1, heads, seq, head_dim, generator=g).to(torch.float16),
             torch.randn(1, heads, seq, head_dim, generator=g).to(torch.float16))
            for _ in range(layers))
        ctx = AVPContext(past_key_values=pkv, model_hash="ab" * 32, num_steps=4, seq_len=seq,
                         model_family="llama", hidden_dim=576, num_layers=layers)
        data = ctx.to_bytes(session_id=session, source_agent_id=agent, target_agent_id="avp-rs",
                            model_id=model_id)
        return data, "AVPContext.to_bytes"
    hdr = KVCacheHeader(num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                        seq_len=seq, dtype="float16")
    parts = [hdr.to_bytes()]
    for _ in range(2 * layers):
        parts.append(rng.standard_normal(heads * seq * head_dim).astype("<f2").tobytes())
    meta = AVPMetadata(
        session_id=session, source_agent_id=agent, target_agent_id="avp-rs",
        model_id=model_id, hidden_dim=576, num_layers=layers,
        dtype=DataType.FLOAT16, mode=CommunicationMode.LATENT,
        extra={"model_hash": "ab" * 32, "model_family": "llama", "num_steps": "4"})
    return codec.encode_kv_cache(b"".join(parts), meta), "codec.encode_kv_cache"


def client(a) -> None:
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    ident = ModelIdentity.from_dict(json.loads(a.identity)) if a.identity else None
    rng = np.random.default_rng(7)
    with AVPClient(a.url, agent_id=a.agent, model_identity=ident, token=a.token) as c:
        session = ""

        def handshake():
            nonlocal session
            s = c.handshake()
            session = s.session_id
            return {"mode": s.mode.name.lower(), "resolution_path": s.resolution_path,
                    "session_id": s.session_id, "remote": s.remote_identity.to_dict()}

        if not step("handshake", handshake) and not a.keep_going or a.handshake_only:
            return
        layers, heads, head_dim, seq = 3, 2, 8, a.kv_seq
        kv_bytes, built = kv_cache(rng, session, a.agent, layers, heads, head_dim, seq)
        (out / "kv.avp").write_bytes(kv_bytes)
        sent = codec.decode(kv_bytes)
        step("kv", lambda: {**c.transmit(sent.payload, sent.metadata).json(), "built_with": built})
        hidden = rng.standard_normal(2 * 576).astype("<f4").tobytes()
        h_meta = AVPMetadata(
            session_id=session, source_agent_id=a.agent, model_id="m", hidden_dim=576,
            payload_type=PayloadType.HIDDEN_STATE, dtype=DataType.FLOAT32, tensor_shape=(2, 576))
        (out / "hidden.avp").write_bytes(codec.encode(hidden, h_meta))
        step("hidden", lambda: c.transmit(hidden, h_meta))
        text = JSONMessage(session_id=session, source_agent_id=a.agent, target_agent_id="avp-rs",
                           content="Paris is the capital of France.", extra={"turn": 2})
        (out / "text.json").write_text(json.dumps(text.to_dict()))
        step("text", lambda: c.send_text(text))


def server(a) -> None:
    import uvicorn

    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0

    def record(doc: dict, payload: bytes = b"") -> dict:
        nonlocal n
        n += 1
        (out / f"{n}.payload").write_bytes(payload)
        (out / f"{n}.json").write_text(json.dumps(doc))
        return {"received": n}

    async def on_message(msg) -> dict:
        if a.discard:
            return {"bytes": len(msg.payload)}
        return record({"kind": "message", "metadata": meta_json(msg.metadata),
                       "flags": int(msg.header.flags)}, msg.payload)

    async def on_text(msg) -> dict:
        return record({"kind": "text", "message": msg.to_dict()})

    app = create_app(on_message, text_handler=on_text)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    (out / "port.tmp").write_text(str(sock.getsockname()[1]))
    (out / "port.tmp").rename(out / "port")
    config = uvicorn.Config(app, log_level="warning")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def make_kv(a) -> None:
    # SmolLM2-135M's shape: 30 layers x 3 KV heads x 64; positions to fill MIB.
    layers, heads, head_dim = 30, 3, 64
    seq = a.mib * 2**20 // (2 * layers * heads * head_dim * 2)
    hdr = KVCacheHeader(num_layers=layers, num_kv_heads=heads, head_dim=head_dim, seq_len=seq,
                        dtype="float16")
    rng = np.random.default_rng(1)
    block = rng.standard_normal(heads * seq * head_dim).astype("<f2").tobytes()
    payload = hdr.to_bytes() + block * (2 * layers)
    meta = AVPMetadata(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", hidden_dim=576,
                       num_layers=layers, dtype=DataType.FLOAT16, mode=CommunicationMode.LATENT)
    Path(a.file).write_bytes(codec.encode_kv_cache(payload, meta))


def transmit_file(a) -> None:
    data = Path(a.file).read_bytes()
    msg = codec.decode(data)
    times, encode = [], []
    with AVPClient(a.url, agent_id="bench") as c:
        for _ in range(a.count):
            t = time.perf_counter()
            c.transmit(msg.payload, msg.metadata)
            times.append(time.perf_counter() - t)
            # The client's own share of a transmit: encoding the message.
            t = time.perf_counter()
            codec.encode(msg.payload, msg.metadata)
            encode.append(time.perf_counter() - t)
    say(bytes=len(data), seconds=times, encode_seconds=encode)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client")
    c.add_argument("url")
    c.add_argument("outdir")
    c.add_argument("--token")
    c.add_argument("--agent", default="py-agent")
    c.add_argument("--identity")
    c.add_argument("--kv-seq", type=int, default=5)
    c.add_argument("--keep-going", action="store_true")
    c.add_argument("--handshake-only", action="store_true")
    s = sub.add_parser("server")
    s.add_argument("outdir")
    s.add_argument("--discard", action="store_true")
    k = sub.add_parser("make-kv")
    k.add_argument("file")
    k.add_argument("mib", type=int)
    t = sub.add_parser("transmit-file")
    t.add_argument("url")
    t.add_argument("file")
    t.add_argument("count", type=int)
    a = p.parse_args()
    {"client": client, "server": server, "transmit-file": transmit_file, "make-kv": make_kv}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
