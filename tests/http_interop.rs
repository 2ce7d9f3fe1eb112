//! `http://` against the real Python reference (`avp` 0.6.2 with httpx, h2,
//! FastAPI and uvicorn, installed by `scripts/test` into `.venv`): its
//! `AVPClient` talks to an avp listener, and an avp sender talks to its
//! `create_app` server. Every decoded field and byte is compared.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::python;

use avp_transport::{Endpoint, Options, TransportError, TransportKind};
use avp_wire::v1::{self, KvHeader};
use avp_wire::{
    DType, Envelope, HiddenStateDesc, KvCacheDesc, KvLayout, Message, MessageLayout, Mode,
    ModelIdentity, Payload, TextDesc, TextFormat,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/http_ref.py")
}

fn ours() -> ModelIdentity {
    ModelIdentity {
        model_family: "llama".into(),
        model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        model_hash: "ab".repeat(32),
        hidden_dim: 576,
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        ..Default::default()
    }
}

/// Run the reference's client against `url`; its steps' JSON lines by name.
fn reference_client(url: &str, out: &Path, args: &[&str]) -> Child {
    Command::new(python())
        .arg(script())
        .args(["client", url, out.to_str().unwrap()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python")
}

fn steps(child: Child) -> std::collections::HashMap<String, Value> {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "http_ref.py client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            (v["step"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

#[test]
fn the_reference_client_hands_an_avp_listener_a_kv_cache_a_hidden_state_and_text() {
    let opts = Options::default().agent_id("avp-rs").token("tok");
    let listener = Endpoint::bind("http://127.0.0.1:0", &ours(), opts).unwrap();
    let url = listener.local_addr();
    let dir = tempfile::tempdir().unwrap();
    let identity = serde_json::to_string(&ours()).unwrap();
    let child = reference_client(
        &url,
        dir.path(),
        &["--token", "tok", "--identity", &identity],
    );
    let rx = listener.accept(T).unwrap();
    assert_eq!(rx.session().transport, TransportKind::Http);
    assert_eq!(rx.session().peer_agent, "py-agent");
    assert!(
        rx.session()
            .explain()
            .contains("a client of the reference's binding (avp_version 0.6.2), handshake"),
        "{}",
        rx.session().explain()
    );
    let got: Vec<Vec<u8>> = (0..3)
        .map(|_| rx.recv(T).unwrap().message().as_bytes().to_vec())
        .collect();
    let steps = steps(child);
    // The handshake: our identity came back (not the client's own echoed), so
    // the client resolved on evidence; the session id is ours.
    let hs = &steps["handshake"];
    assert_eq!(hs["ok"], true, "{hs}");
    assert_eq!(hs["answer"]["mode"], "latent");
    assert_eq!(hs["answer"]["resolution_path"], "hash_match");
    assert_eq!(hs["answer"]["session_id"], rx.session().id.as_str());
    assert_eq!(
        hs["answer"]["remote"],
        serde_json::to_value(ours()).unwrap()
    );
    for s in ["kv", "hidden", "text"] {
        assert_eq!(steps[s]["ok"], true, "{s}: {}", steps[s]);
        assert_eq!(steps[s]["answer"]["success"], true, "{s}");
        assert_eq!(steps[s]["answer"]["session_id"], rx.session().id.as_str());
    }

    // The KV cache: what the reference encoded, field by field and byte by byte
    // (with AVPContext.to_bytes() where the Python has torch).
    eprintln!(
        "the KV cache was built with {}",
        steps["kv"]["answer"]["built_with"]
    );
    let sent = std::fs::read(dir.path().join("kv.avp")).unwrap();
    let d = v1::decode(&sent).unwrap();
    let theirs = d.kv().unwrap();
    let m = Message::parse(&got[0]).unwrap();
    m.verify().unwrap();
    let Payload::KvCache(desc) = m.payload() else {
        panic!("expected a KV cache, got {:?}", m.payload())
    };
    assert_eq!(
        (
            desc.num_layers,
            desc.num_kv_heads,
            desc.head_dim,
            desc.seq_len,
            desc.dtype
        ),
        (3, 2, 8, 5, DType::F16)
    );
    let kv = m.kv().unwrap();
    for l in 0..3 {
        assert_eq!(kv.k(l).unwrap(), theirs.k(l).unwrap(), "K of layer {l}");
        assert_eq!(kv.v(l).unwrap(), theirs.v(l).unwrap(), "V of layer {l}");
    }
    let env = m.envelope();
    assert_eq!(env.session_id(), rx.session().id);
    assert_eq!(env.source_agent_id(), "py-agent");
    assert_eq!(env.target_agent_id(), "avp-rs");
    assert_eq!(env.model_id(), "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(env.model_hash(), "ab".repeat(32));
    assert_eq!(env.model_family(), "llama");
    assert_eq!(env.extra().collect::<Vec<_>>(), vec![("num_steps", "4")]);

    // The hidden state.
    let sent = std::fs::read(dir.path().join("hidden.avp")).unwrap();
    let d = v1::decode(&sent).unwrap();
    let m = Message::parse(&got[1]).unwrap();
    m.verify().unwrap();
    let h = m.hidden().unwrap();
    assert_eq!(h.data(), &d.payload[..]);
    assert!(matches!(
        m.payload(),
        Payload::HiddenState(HiddenStateDesc {
            rows: 2,
            dim: 576,
            dtype: DType::F32,
            ..
        })
    ));

    // The text message, as the reference wrote it.
    let sent: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("text.json")).unwrap())
            .unwrap();
    let m = Message::parse(&got[2]).unwrap();
    let doc: Value = serde_json::from_str(m.text().unwrap().as_str().unwrap()).unwrap();
    assert_eq!(doc, sent);
    assert_eq!(doc["content"], "Paris is the capital of France.");

    // The client closed: the session ended.
    assert!(matches!(rx.recv(T), Err(TransportError::PeerGone(_))));
}

#[test]
fn the_reference_client_resolves_json_with_an_unrelated_model() {
    let listener = Endpoint::bind("http://127.0.0.1:0", &ours(), Options::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other = json!({"model_family": "qwen2", "model_id": "Qwen/Qwen2.5-7B-Instruct",
        "model_hash": "cd".repeat(32), "hidden_dim": 3584, "num_layers": 28,
        "num_kv_heads": 4, "head_dim": 128});
    let child = reference_client(
        &listener.local_addr(),
        dir.path(),
        &["--identity", &other.to_string(), "--handshake-only"],
    );
    let steps = steps(child);
    let hs = &steps["handshake"]["answer"];
    assert_eq!(
        (&hs["mode"], &hs["resolution_path"]),
        (&json!("json"), &json!("json_fallback"))
    );
    let rx = listener.accept(T).unwrap();
    assert_eq!(rx.session().mode, Mode::Json);
}

#[test]
fn the_reference_client_with_a_wrong_token_delivers_nothing() {
    let opts = Options::default().token("right");
    let listener = Endpoint::bind("http://127.0.0.1:0", &ours(), opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let identity = serde_json::to_string(&ours()).unwrap();
    let child = reference_client(
        &listener.local_addr(),
        dir.path(),
        &["--token", "wrong", "--identity", &identity, "--keep-going"],
    );
    let steps = steps(child);
    let hs = &steps["handshake"];
    assert_eq!(hs["ok"], false);
    assert!(hs["error"].as_str().unwrap().contains("401"), "{hs}");
    for s in ["kv", "hidden", "text"] {
        assert_eq!(steps[s]["ok"], false, "{s}");
        assert_eq!(steps[s]["status"], 401, "{s}: {}", steps[s]);
    }
    assert!(matches!(
        listener.accept(Duration::from_millis(300)),
        Err(TransportError::Timeout(..))
    ));
}

#[test]
fn the_reference_client_is_refused_an_oversized_kv_cache() {
    let opts = Options::default().max_message(64 << 10);
    let listener = Endpoint::bind("http://127.0.0.1:0", &ours(), opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let identity = serde_json::to_string(&ours()).unwrap();
    // 3 layers x K,V x 2 heads x 4000 positions x 8 x f16: 768 KB.
    let child = reference_client(
        &listener.local_addr(),
        dir.path(),
        &["--identity", &identity, "--kv-seq", "4000"],
    );
    let rx = listener.accept(T).unwrap();
    let steps = steps(child);
    assert_eq!(steps["kv"]["status"], 413, "{}", steps["kv"]);
    assert!(
        steps["kv"]["error"]
            .as_str()
            .unwrap()
            .contains("exceeds this listener's limit of 65536"),
        "{}",
        steps["kv"]
    );
    assert_eq!(steps["hidden"]["ok"], true);
    // Only what fit was delivered, in the same session: the server closed the
    // refused request's connection (its body unread), the client did not leave.
    let g = rx.recv(T).unwrap();
    assert!(matches!(g.message().payload(), Payload::HiddenState(_)));
}

/// The reference's `create_app` server on uvicorn, killed on drop.
struct ReferenceServer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl ReferenceServer {
    fn start() -> ReferenceServer {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(python())
            .arg(script())
            .args(["server", dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .expect("run python");
        let start = Instant::now();
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(dir.path().join("port")) {
                break p.trim().parse().unwrap();
            }
            assert!(start.elapsed() < T, "the reference server did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        // uvicorn listens shortly after the port is written.
        let up = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(up.elapsed() < T, "the reference server does not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        ReferenceServer { child, dir, port }
    }

    fn received(&self, n: usize) -> (Value, Vec<u8>) {
        let doc = std::fs::read_to_string(self.dir.path().join(format!("{n}.json"))).unwrap();
        let payload = std::fs::read(self.dir.path().join(format!("{n}.payload"))).unwrap();
        (serde_json::from_str(&doc).unwrap(), payload)
    }
}

impl Drop for ReferenceServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(
    tx: &mut avp_transport::Sender,
    envelope: &Envelope,
    payload: &Payload,
    sections: &[&[u8]],
) {
    let layout = MessageLayout::new(envelope, payload).unwrap();
    let mut loan = tx.loan(&layout).unwrap();
    loan.writer().write_sections(sections).unwrap();
    loan.finish().unwrap().send().unwrap();
}

#[test]
fn an_avp_sender_delivers_to_the_reference_server_in_v1() {
    let server = ReferenceServer::start();
    let url = format!("http://127.0.0.1:{}", server.port);
    let mut tx = Endpoint::connect(&url, &ours(), Options::default().agent_id("avp-rs")).unwrap();
    let s = tx.session().clone();
    assert_eq!(s.transport, TransportKind::Http);
    assert!(s.explain().contains("does not read v2"), "{}", s.explain());
    assert!(
        s.mode_reason.contains("echoed this agent's own identity"),
        "{}",
        s.mode_reason
    );

    let envelope = Envelope {
        model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        model_hash: "ab".repeat(32),
        model_family: "llama".into(),
        session_id: s.id.clone(),
        source_agent_id: "avp-rs".into(),
        target_agent_id: "py-agent".into(),
        extra: [("num_steps".to_owned(), "4".to_owned())].into(),
        ..Default::default()
    };
    let desc = KvCacheDesc::new(3, 2, 8, 5, DType::F16, KvLayout::Hnd);
    let tensors: Vec<Vec<u8>> = (0..6)
        .map(|t| (0..160).map(|i| (t * 40 + i) as u8).collect())
        .collect();
    let refs: Vec<&[u8]> = tensors.iter().map(|t| &t[..]).collect();
    send(&mut tx, &envelope, &Payload::KvCache(desc), &refs);
    let hidden: Vec<u8> = (0..2 * 576 * 4).map(|i| (i % 251) as u8).collect();
    let hdesc = HiddenStateDesc {
        rows: 2,
        dim: 576,
        dtype: DType::F32,
        map_id: String::new(),
    };
    send(&mut tx, &envelope, &Payload::HiddenState(hdesc), &[&hidden]);
    let text = b"The capital of France is Paris.";
    let tdesc = TextDesc {
        format: TextFormat::Plain,
        len: text.len() as u64,
    };
    send(&mut tx, &envelope, &Payload::Text(tdesc), &[text]);
    assert_eq!(tx.stats().format_conversions, 3);

    // The KV cache: the reference's 17-byte header and K, V per layer.
    let (doc, payload) = server.received(1);
    let meta = &doc["metadata"];
    assert_eq!(meta["payload_type"], 1, "KV_CACHE: {doc}");
    assert_eq!(meta["session_id"], s.id.as_str());
    assert_eq!(meta["source_agent_id"], "avp-rs");
    assert_eq!(meta["target_agent_id"], "py-agent");
    assert_eq!(meta["model_id"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(meta["num_layers"], 3);
    assert_eq!(meta["extra"]["model_hash"], "ab".repeat(32));
    assert_eq!(meta["extra"]["model_family"], "llama");
    assert_eq!(meta["extra"]["num_steps"], "4");
    let mut want = KvHeader::from_desc(&desc).unwrap().to_bytes().to_vec();
    tensors.iter().for_each(|t| want.extend_from_slice(t));
    assert_eq!(payload, want);

    let (doc, payload) = server.received(2);
    assert_eq!(doc["metadata"]["payload_type"], 0, "HIDDEN_STATE: {doc}");
    assert_eq!(doc["metadata"]["dtype"], 0, "FLOAT32: {doc}");
    assert_eq!(doc["metadata"]["tensor_shape"], json!([2, 576]));
    assert_eq!(payload, hidden);

    let (doc, _) = server.received(3);
    assert_eq!(doc["kind"], "text");
    assert_eq!(doc["message"]["content"], "The capital of France is Paris.");
    assert_eq!(doc["message"]["session_id"], s.id.as_str());
    assert_eq!(doc["message"]["target_agent_id"], "py-agent");
}
