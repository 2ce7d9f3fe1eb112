//! Mode negotiation in the handshake: the listener asks for the connecting peer's
//! vocabulary only when nothing but the overlap can decide, counts the shared
//! tokens, and answers cross-model or JSON with the reason; a cached map decides
//! without any vocabulary crossing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use avp_transport::{Endpoint, Options, Session, TcpOptions};
use avp_wire::{MapLookup, Mode, ModelIdentity, ResolutionPath, map_id};
use serde_json::{Value, json};

mod support;
use support::raw_peer::{RawPeer, auth, hello};

const T: Duration = Duration::from_secs(20);

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "shm://neg-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn model(family: &str, hash: char, hidden: u32) -> ModelIdentity {
    ModelIdentity {
        model_family: family.into(),
        model_id: format!("{family}-{hidden}"),
        model_hash: hash.to_string().repeat(64),
        hidden_dim: hidden,
        num_layers: 24,
        num_kv_heads: 2,
        head_dim: 64,
        tokenizer_hash: hash.to_string().repeat(64),
    }
}

/// `n` tokens named `prefix0..`, with a few odd ones (escapes, empty holes, long).
fn vocab(prefix: &str, n: usize) -> Arc<Vec<String>> {
    let mut v: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    if n > 10 {
        v[3] = String::new();
        v[5] = "\u{0}\n\"\\Ġtoken".into();
        v[7] = "x".repeat(5000);
    }
    Arc::new(v)
}

fn shared(a: &[String], b: &[String]) -> usize {
    avp_wire::Resolver::vocab_overlap(
        a.iter().map(String::as_str).filter(|t| !t.is_empty()),
        b.iter().map(String::as_str).filter(|t| !t.is_empty()),
    )
}

/// Connect a `src` agent to a `dst` listener over `addr`; both sessions.
fn negotiate(
    addr: &str,
    src: (ModelIdentity, Options),
    dst: (ModelIdentity, Options),
) -> (Session, Session) {
    let listener = Endpoint::bind(addr, &dst.0, dst.1).unwrap();
    let to = listener.local_addr();
    let client = std::thread::spawn(move || {
        Endpoint::connect(&to, &src.0, src.1)
            .unwrap()
            .session()
            .clone()
    });
    let rx = listener.accept(T).unwrap();
    (client.join().unwrap(), rx.session().clone())
}

fn with_vocab(v: &Arc<Vec<String>>) -> Options {
    Options::default().vocabulary(v.clone())
}

#[test]
fn overlapping_vocabularies_negotiate_cross_model_over_shm_and_tcp() {
    // 150,000 source tokens (about 40 frames), 20,000 of them shared.
    let a = vocab("tok", 150_000);
    let mut b: Vec<String> = (0..30_000).map(|i| format!("other{i}")).collect();
    b.extend((0..20_000).map(|i| format!("tok{}", i * 7)));
    let b = Arc::new(b);
    let n = shared(&a, &b);
    assert!(n > 19_000, "{n}");
    for (addr, upgrade) in [(unique(), true), ("tcp://127.0.0.1:0".to_owned(), false)] {
        let (src, dst) = (model("llama", '1', 576), model("qwen2", '2', 896));
        let opts =
            |v: &Arc<Vec<String>>| with_vocab(v).tcp(TcpOptions::default().shm_upgrade(upgrade));
        let (c, l) = negotiate(&addr, (src.clone(), opts(&a)), (dst.clone(), opts(&b)));
        assert_eq!(l.transport.name(), if upgrade { "shm" } else { "tcp" });
        assert_eq!(
            (c.mode, l.mode),
            (Mode::CrossModel, Mode::CrossModel),
            "{}",
            l.explain()
        );
        assert_eq!(l.path, ResolutionPath::VocabOverlap);
        assert_eq!(c.map_id, map_id(&src.model_hash, &dst.model_hash));
        assert_eq!(c.map_id, l.map_id);
        assert!(
            l.explain().contains(&format!("share {n} tokens")),
            "{}",
            l.explain()
        );
        let got = l
            .peer_vocabulary
            .expect("the listener holds the peer's vocabulary");
        assert_eq!(*got, *a, "every token, escapes and holes included");
        assert!(c.peer_vocabulary.is_none());
    }
}

#[test]
fn too_few_shared_tokens_fall_back_to_json_with_the_count() {
    let a = vocab("a", 5_000);
    let mut b: Vec<String> = (0..5_000).map(|i| format!("b{i}")).collect();
    b.extend((0..60).map(|i| format!("a{}", i + 100)));
    let b = Arc::new(b);
    let (c, l) = negotiate(
        &unique(),
        (model("llama", '3', 64), with_vocab(&a)),
        (model("qwen2", '4', 128), with_vocab(&b)),
    );
    assert_eq!((c.mode, l.mode), (Mode::Json, Mode::Json));
    assert_eq!(c.path, ResolutionPath::JsonFallback);
    assert!(
        c.mode_reason.contains("share only 60 tokens"),
        "{}",
        c.mode_reason
    );
}

#[test]
fn no_vocabulary_is_asked_for_when_another_rule_decides() {
    let v = vocab("t", 1_000);
    // Same model: latent by hash.
    let (_, l) = negotiate(
        &unique(),
        (model("llama", '5', 64), with_vocab(&v)),
        (model("llama", '5', 64), with_vocab(&v)),
    );
    assert_eq!((l.mode, l.path), (Mode::Latent, ResolutionPath::HashMatch));
    assert!(l.peer_vocabulary.is_none());

    // A cached map: rule 4, nothing crosses.
    #[derive(Debug)]
    struct Cached;
    impl MapLookup for Cached {
        fn find_map(&self, s: &str, t: &str) -> Option<String> {
            Some(map_id(s, t))
        }
    }
    let listener_opts = with_vocab(&v).maps(Arc::new(Cached));
    let (c, l) = negotiate(
        "tcp://127.0.0.1:0",
        (model("llama", '6', 64), with_vocab(&v)),
        (model("qwen2", '7', 128), listener_opts),
    );
    assert_eq!(
        (c.mode, l.path),
        (Mode::CrossModel, ResolutionPath::AvpMapFile)
    );
    assert!(l.peer_vocabulary.is_none());

    // A peer without a vocabulary: JSON, and the reason says no overlap was known.
    let (c, _) = negotiate(
        &unique(),
        (model("llama", '8', 64), Options::default()),
        (model("qwen2", '9', 128), with_vocab(&v)),
    );
    assert_eq!(c.mode, Mode::Json);
    assert!(
        c.mode_reason.contains("no shared tokenizer"),
        "{}",
        c.mode_reason
    );
}

#[test]
fn a_vocabulary_with_a_wrong_token_never_gets_past_authentication() {
    let v = vocab("t", 1_000);
    let listener_opts = with_vocab(&v).token("right");
    let client_opts = with_vocab(&v).token("wrong");
    let listener = Endpoint::bind(&unique(), &model("qwen2", 'b', 128), listener_opts).unwrap();
    let to = listener.local_addr();
    let client = std::thread::spawn(move || {
        Endpoint::connect(&to, &model("llama", 'a', 64), client_opts).map(|_| ())
    });
    assert!(listener.accept(T).is_err());
    assert!(client.join().unwrap().is_err());
}

/// A raw TCP peer that announces `announced` tokens and then sends `parts`.
fn raw_vocabulary_peer(addr: &str, announced: u32, parts: Vec<Value>) {
    let mut io = RawPeer::connect(addr);
    io.send(&hello(&model("llama", 'c', 64), announced, 1 << 30))
        .unwrap();
    let theirs = io.recv(T).unwrap();
    assert_eq!(theirs["type"], "hello", "{theirs}");
    assert_eq!(
        theirs["want_vocabulary"], true,
        "only the overlap can decide"
    );
    io.send(&auth(None)).unwrap();
    for p in parts {
        if io.send(&p).is_err() {
            return;
        }
    }
    let _ = io.recv(Duration::from_secs(2));
}

#[test]
fn bad_vocabularies_are_refused_and_the_listener_keeps_serving() {
    let v = vocab("t", 500);
    let opts = with_vocab(&v).tcp(TcpOptions::default().shm_upgrade(false));
    let listener = Endpoint::bind("tcp://127.0.0.1:0", &model("qwen2", 'd', 128), opts).unwrap();
    let addr = listener.local_addr();
    let part = |first: u32, n: usize, last: bool| {
        let tokens: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        json!({"type": "vocabulary", "first": first, "tokens": tokens, "last": last})
    };
    let cases: Vec<(u32, Vec<Value>, &str)> = vec![
        (10, vec![part(4, 3, true)], "does not follow"),
        (
            10,
            vec![part(0, 8, false), part(8, 5, true)],
            "does not follow",
        ),
        (5_000_000, vec![], "at most"),
        (
            10,
            vec![json!({"type": "switch", "to": "shm"})],
            "expected the peer's vocabulary",
        ),
    ];
    for (announced, parts, want) in cases {
        let a = addr.clone();
        let peer = std::thread::spawn(move || raw_vocabulary_peer(&a, announced, parts));
        let err = listener.accept(T).expect_err("refused").to_string();
        assert!(err.contains(want), "{err} (wanted {want:?})");
        peer.join().unwrap();
    }
    // A well-behaved peer is still served.
    let to = addr.clone();
    let good = std::thread::spawn(move || {
        let o = with_vocab(&vocab("t", 300)).tcp(TcpOptions::default().shm_upgrade(false));
        Endpoint::connect(&to, &model("llama", 'e', 64), o)
            .unwrap()
            .session()
            .mode
    });
    let rx = listener.accept(T).unwrap();
    assert_eq!(rx.session().mode, Mode::CrossModel);
    assert_eq!(good.join().unwrap(), Mode::CrossModel);
}
