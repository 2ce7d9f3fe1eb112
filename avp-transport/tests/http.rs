//! `http://`: avp agents over the reference's HTTP binding, and the binding's
//! rules seen from a plain HTTP client (HTTP/1.1 by hand, HTTP/2 with prior
//! knowledge through hyper). Interop with the real Python package is in the
//! workspace's `tests/http_interop.rs`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use avp_transport::{AuthFailure, Endpoint, HttpOptions, Options, TransportError, TransportKind};
use avp_wire::v1::{self, Compression, KvHeader, Metadata};
use avp_wire::{
    DType, Envelope, KvCacheDesc, KvLayout, Message, MessageLayout, Mode, ModelIdentity, Payload,
};

const T: Duration = Duration::from_secs(10);

fn identity() -> ModelIdentity {
    ModelIdentity {
        model_family: "llama".into(),
        model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        model_hash: "ab".repeat(32),
        hidden_dim: 576,
        num_layers: 4,
        num_kv_heads: 2,
        head_dim: 64,
        ..Default::default()
    }
}

fn layout(seq: u64) -> MessageLayout {
    MessageLayout::new(
        &Envelope::default(),
        &Payload::KvCache(KvCacheDesc::new(4, 2, 64, seq, DType::F16, KvLayout::Hnd)),
    )
    .unwrap()
}

fn fill(i: usize, j: usize, n: u32) -> u8 {
    (i as u32 * 31 + j as u32 * 7 + n) as u8
}

fn send_filled(
    tx: &mut avp_transport::Sender,
    l: &MessageLayout,
    n: u32,
) -> avp_transport::Result<()> {
    let mut loan = tx.loan(l)?;
    for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
        s.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = fill(i, j, n));
    }
    loan.finish()?.send()
}

fn check_filled(m: &Message<'_>, n: u32) {
    m.verify().unwrap();
    for (i, s) in m.sections().enumerate() {
        assert!(
            s.bytes.iter().enumerate().all(|(j, &b)| b == fill(i, j, n)),
            "message {n} section {i}"
        );
    }
}

/// One HTTP/1.1 request by hand (`Connection: close`); the status and body.
fn raw(addr: &str, request_head: &str, body: &[u8]) -> (u16, String) {
    let hp = addr.trim_start_matches("http://");
    let mut s = TcpStream::connect(hp).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(request_head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn post(addr: &str, path: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    );
    raw(addr, &head, body)
}

#[test]
fn avp_agents_hand_over_kv_caches_as_v2_from_the_loaned_buffer() {
    let listener = Endpoint::bind("http://127.0.0.1:0", &identity(), Options::default()).unwrap();
    let addr = listener.local_addr();
    assert!(addr.starts_with("http://127.0.0.1:"), "{addr}");
    let to = addr.clone();
    let sender = std::thread::spawn(move || {
        let opts = Options::default().agent_id("researcher");
        let mut tx = Endpoint::connect(&to, &identity(), opts).unwrap();
        for n in 0..3 {
            send_filled(&mut tx, &layout(40 + n as u64), n).unwrap();
        }
        (tx.session().clone(), tx.stats())
    });
    let rx = listener.accept(T).unwrap();
    for n in 0..3 {
        let g = rx.recv(T).unwrap();
        check_filled(g.message(), n);
    }
    let (s, stats) = sender.join().unwrap();
    assert_eq!(s.transport, TransportKind::Http);
    assert_eq!(s.id, rx.session().id);
    assert_eq!(s.mode, Mode::Latent);
    assert_eq!(rx.session().peer_agent, "researcher");
    assert_eq!(stats.messages, 3);
    assert_eq!(stats.format_conversions, 0, "v2 between avp agents");
    assert!(s.explain().contains("an avp server"), "{}", s.explain());
    assert!(
        rx.session().explain().contains("an avp agent, handshake"),
        "{}",
        rx.session().explain()
    );
    // The sender is gone (its connection closed): the receiver hears it.
    match rx.recv(T) {
        Err(TransportError::PeerGone(why)) => assert!(why.contains("closed"), "{why}"),
        other => panic!("expected PeerGone, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_plain_client_posts_v1_and_json_messages_and_they_arrive_as_v2() {
    let listener = Endpoint::bind("http://127.0.0.1:0", &identity(), Options::default()).unwrap();
    let addr = listener.local_addr();
    let (status, body) = raw(
        &addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    let desc = KvCacheDesc::new(2, 1, 4, 3, DType::F32, KvLayout::Hnd);
    let tensors: Vec<Vec<u8>> = (0..4).map(|t| vec![t as u8 + 1; 48]).collect();
    let refs: Vec<&[u8]> = tensors.iter().map(|t| &t[..]).collect();
    let meta = Metadata {
        source_agent_id: "py-agent".into(),
        model_id: "m".into(),
        num_layers: 2,
        ..Default::default()
    };
    let v1_bytes = v1::encode_kv(
        &KvHeader::from_desc(&desc).unwrap(),
        &refs,
        &meta,
        Compression::None,
    )
    .unwrap();
    let (status, body) = post(
        &addr,
        "/avp/v2/transmit",
        "Content-Type: application/avp+binary\r\nAVP-Version: 0.4\r\nAVP-Agent-ID: py-agent\r\n",
        &v1_bytes,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""success":true"#), "{body}");
    let rx = listener.accept(T).unwrap();
    assert!(
        rx.session().explain().contains("no handshake"),
        "{}",
        rx.session().explain()
    );
    {
        let g = rx.recv(T).unwrap();
        let m = g.message();
        m.verify().unwrap();
        let kv = m.kv().unwrap();
        for l in 0..2 {
            assert_eq!(kv.k(l).unwrap(), &tensors[2 * l as usize][..]);
            assert_eq!(kv.v(l).unwrap(), &tensors[2 * l as usize + 1][..]);
        }
        assert_eq!(m.envelope().source_agent_id(), "py-agent");
    }
    let (status, body) = post(
        &addr,
        "/avp/v2/text",
        "Content-Type: application/json\r\nAVP-Agent-ID: py-agent\r\n",
        br#"{"avp_version":"0.6.2","source_agent_id":"py-agent","content":"the answer is 42","extra":{"k":1}}"#,
    );
    assert_eq!(status, 200, "{body}");
    // That connection closed after its one request: the session ended with it
    // (after its message), and the next request opened another.
    assert!(matches!(rx.recv(T), Err(TransportError::PeerGone(_))));
    let rx = listener.accept(T).unwrap();
    let g = rx.recv(T).unwrap();
    let text = g.message().text().unwrap();
    let doc: serde_json::Value = serde_json::from_str(text.as_str().unwrap()).unwrap();
    assert_eq!(doc["content"], "the answer is 42");
    assert_eq!(doc["extra"]["k"], 1);

    // Bad bodies: typed JSON errors in the reference's shape, nothing delivered.
    for (path, body, want) in [
        ("/avp/v2/transmit", &b"garbage!"[..], "not an avp message"),
        (
            "/avp/v2/transmit",
            &v1_bytes[..v1_bytes.len() - 3],
            "v1 message",
        ),
        ("/avp/v2/handshake", &b"{"[..], "Invalid handshake"),
        ("/avp/v2/text", &b"[1]"[..], "Invalid message"),
    ] {
        let (status, answer) = post(&addr, path, "AVP-Agent-ID: py-agent\r\n", body);
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(
            answer.contains(r#""success":false"#) && answer.contains(want),
            "{answer}"
        );
    }
    let (status, _) = post(&addr, "/nope", "", b"");
    assert_eq!(status, 404);
    drop(g);
    assert!(matches!(rx.recv(T), Err(TransportError::PeerGone(_))));
    assert!(
        matches!(
            listener.accept(Duration::from_millis(200)),
            Err(TransportError::Timeout(..))
        ),
        "refused requests opened no session"
    );
}

#[test]
fn a_wrong_token_is_refused_and_nothing_is_delivered() {
    let opts = Options::default().token("s3cret");
    let listener = Endpoint::bind("http://127.0.0.1:0", &identity(), opts).unwrap();
    let addr = listener.local_addr();
    let e = Endpoint::connect(&addr, &identity(), Options::default().token("wrong")).unwrap_err();
    assert!(
        matches!(e, TransportError::Auth(AuthFailure::Refused { .. })),
        "{e}"
    );
    let l = layout(4);
    let zeros: Vec<Vec<u8>> = (0..8).map(|i| vec![0u8; l_section(&l, i)]).collect();
    let msg = l
        .encode_to_vec(&zeros.iter().map(|z| &z[..]).collect::<Vec<_>>())
        .unwrap();
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let (status, body) = post(&addr, "/avp/v2/transmit", auth, &msg);
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("nothing was delivered"), "{body}");
    }
    assert!(
        matches!(
            listener.accept(Duration::from_millis(200)),
            Err(TransportError::Timeout(..))
        ),
        "no session was opened"
    );
    // The right token works.
    let mut tx = Endpoint::connect(&addr, &identity(), Options::default().token("s3cret")).unwrap();
    send_filled(&mut tx, &l, 1).unwrap();
    let rx = listener.accept(T).unwrap();
    check_filled(rx.recv(T).unwrap().message(), 1);
}

#[test]
fn an_oversized_body_is_refused_before_it_is_read() {
    let opts = Options::default().max_message(1 << 20);
    let listener = Endpoint::bind("http://127.0.0.1:0", &identity(), opts).unwrap();
    let addr = listener.local_addr();
    // Headers only: the body (8 GiB, declared) never comes, the answer does.
    let head = "POST /avp/v2/transmit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Type: application/avp+binary\r\nContent-Length: 8589934592\r\n\r\n";
    let t = std::time::Instant::now();
    let (status, body) = raw(&addr, head, b"");
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("exceeds this listener's limit of 1048576"),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // An avp sender learns the limit in the handshake and refuses before writing.
    let mut tx = Endpoint::connect(&addr, &identity(), Options::default()).unwrap();
    assert_eq!(tx.session().max_message, 1 << 20);
    let e = send_filled(&mut tx, &layout(4096), 0).unwrap_err();
    assert!(
        matches!(e, TransportError::TooLarge { limit: 1048576, .. }),
        "{e}"
    );
    send_filled(&mut tx, &layout(16), 1).unwrap();
    let rx = listener.accept(T).unwrap();
    check_filled(rx.recv(T).unwrap().message(), 1);
}

#[test]
fn a_full_queue_pushes_back_and_a_foreign_session_id_is_refused() {
    let opts = Options::default().http(
        HttpOptions::default()
            .queue(1)
            .delivery_timeout(Duration::from_millis(300)),
    );
    let listener = Endpoint::bind("http://127.0.0.1:0", &identity(), opts).unwrap();
    let mut tx =
        Endpoint::connect(&listener.local_addr(), &identity(), Options::default()).unwrap();
    let rx = listener.accept(T).unwrap();
    let l = layout(8);
    send_filled(&mut tx, &l, 0).unwrap();
    let e = send_filled(&mut tx, &l, 1).unwrap_err();
    assert!(
        matches!(e, TransportError::Refused { status: 503, .. }),
        "{e}"
    );
    check_filled(rx.recv(T).unwrap().message(), 0);
    send_filled(&mut tx, &l, 2).unwrap();
    check_filled(rx.recv(T).unwrap().message(), 2);

    let foreign = MessageLayout::new(
        &Envelope {
            session_id: "f".repeat(32),
            ..Default::default()
        },
        &Payload::KvCache(KvCacheDesc::new(4, 2, 64, 8, DType::F16, KvLayout::Hnd)),
    )
    .unwrap();
    let e = send_filled(&mut tx, &foreign, 3).unwrap_err();
    assert!(
        matches!(e, TransportError::Refused { status: 409, .. }),
        "{e}"
    );
    assert!(matches!(rx.try_recv(), Ok(None)));
}

#[test]
fn http2_with_prior_knowledge_is_served_on_the_same_port() {
    use http_body_util::{BodyExt, Full};
    let listener = Endpoint::bind("http://127.0.0.1:0", &identity(), Options::default()).unwrap();
    let hp = listener
        .local_addr()
        .trim_start_matches("http://")
        .to_owned();
    let l = layout(16);
    let sections: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8; l_section(&l, i)]).collect();
    let refs: Vec<&[u8]> = sections.iter().map(|s| &s[..]).collect();
    let msg = l.encode_to_vec(&refs).unwrap();
    let sent = msg.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, version) = rt.block_on(async move {
        let stream = tokio::net::TcpStream::connect(&hp).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post(format!("http://{hp}/avp/v2/transmit"))
            .header("AVP-Agent-ID", "h2-agent")
            .header("Content-Type", "application/avp+binary")
            .body(Full::new(bytes::Bytes::from(sent)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let (status, version) = (resp.status().as_u16(), resp.version());
        let _ = resp.into_body().collect().await.unwrap();
        (status, version)
    });
    assert_eq!((status, version), (200, hyper::Version::HTTP_2));
    let rx = listener.accept(T).unwrap();
    assert!(
        rx.session().explain().contains("HTTP/2"),
        "{}",
        rx.session().explain()
    );
    let g = rx.recv(T).unwrap();
    assert_eq!(g.message().as_bytes(), &msg[..]);
}

fn l_section(l: &MessageLayout, i: usize) -> usize {
    l.section(i).len as usize
}

#[test]
fn stalled_headers_and_bodies_are_cut_off() {
    let opts =
        Options::default().http(HttpOptions::default().body_timeout(Duration::from_millis(300)));
    let listener = Endpoint::bind("http://127.0.0.1:0", &identity(), opts).unwrap();
    let hp = listener
        .local_addr()
        .trim_start_matches("http://")
        .to_owned();
    // Headers that never end: the connection is closed.
    let mut s = TcpStream::connect(&hp).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let t = std::time::Instant::now();
    s.write_all(b"POST /avp/v2/transmit HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A body that stops: 408, nothing delivered.
    let head = "POST /avp/v2/transmit HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
    let (status, body) = raw(&listener.local_addr(), head, &[0u8; 10]);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("stalled"), "{body}");
    assert!(matches!(
        listener.accept(Duration::from_millis(200)),
        Err(TransportError::Timeout(..))
    ));
}
