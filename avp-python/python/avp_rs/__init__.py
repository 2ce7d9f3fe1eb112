"""avp for Python: hand KV caches between agents with no extra copies.

    import avp_rs
    listener = avp_rs.listen("shm://demo")               # agent B
    tx = avp_rs.connect("shm://demo")                     # agent A, another process
    tx.send_kv(past_key_values)                           # [(K, V) per layer]
    rx = listener.accept(timeout=10)
    with rx.recv(timeout=10) as msg:                      # points into the sender's slot
        k0 = msg.kv.k(0).numpy()                          # read-only, no copy
        t = torch.from_dlpack(msg.kv.k(0))                # no copy either
"""
from ._avp_rs import (  # noqa: F401
    AuthError,
    AvpError,
    Context,
    KvView,
    Listener,
    Loan,
    LoanSection,
    Message,
    MessageReleased,
    Model,
    PeerGone,
    Receiver,
    Refused,
    Section,
    Sender,
    SessionError,
    Timeout,
    TooLarge,
    TransportError,
    ViewsAlive,
    WireError,
    __version__,
    connect,
    decode,
    encode_kv,
    generate,
    inspect,
    listen,
)
