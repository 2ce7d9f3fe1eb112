//! The handshake MACs cover the whole transcript: a man in the middle that
//! changes any field of any handshake frame (an identity, a limit, the mode,
//! the session) makes the session fail with a typed error on one side and a
//! refusal on the other, never a session with the changed value.

use std::net::TcpListener;
use std::time::Duration;

use avp_transport::{AuthFailure, Endpoint, Options, TcpOptions, TransportError};
use avp_wire::ModelIdentity;
use serde_json::{Value, json};

mod support;
use support::raw_peer::RawPeer;

const T: Duration = Duration::from_secs(10);

fn opts() -> Options {
    Options::default()
        .token("s3cret")
        .tcp(TcpOptions::default().shm_upgrade(false))
}

/// The handshake's frames in order: the client's Hello, the listener's
/// Hello, the client's Auth, the listener's Accept (or Refuse).
const CLIENT_HELLO: usize = 0;
const LISTENER_HELLO: usize = 1;
const AUTH: usize = 2;
const ACCEPT: usize = 3;
const NONE: usize = usize::MAX;

/// Relay the four handshake frames between a client and the listener at
/// `upstream`, applying `tamper` to frame number `which`.
fn man_in_the_middle(
    proxy: TcpListener,
    upstream: String,
    which: usize,
    tamper: fn(&mut Value),
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (client, _) = proxy.accept().unwrap();
        let mut client = RawPeer { stream: client };
        let mut server = RawPeer::connect(&upstream);
        let mut n = 0;
        let mut relay = |from: &mut RawPeer, to: &mut RawPeer| -> bool {
            let Ok(mut f) = from.recv(T) else {
                return false;
            };
            if n == which {
                let before = f.clone();
                tamper(&mut f);
                assert_ne!(f, before, "the tamper changes frame {which}");
            }
            n += 1;
            to.send(&f).is_ok()
        };
        let _ = relay(&mut client, &mut server) // Hello
            && relay(&mut server, &mut client) // Hello
            && relay(&mut client, &mut server) // Auth
            && relay(&mut server, &mut client); // Accept or Refuse
    })
}

/// Run one session through a tampering proxy; the listener's and the
/// client's results.
fn through_proxy(which: usize, tamper: fn(&mut Value)) -> (TransportError, TransportError) {
    let listener = Endpoint::bind("tcp://127.0.0.1:0", &ModelIdentity::default(), opts()).unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let via = format!("tcp://{}", proxy.local_addr().unwrap());
    let mitm = man_in_the_middle(proxy, listener.local_addr(), which, tamper);
    let client = std::thread::spawn(move || {
        Endpoint::connect(&via, &ModelIdentity::default(), opts()).expect_err("tampered")
    });
    let at_listener = listener.accept(T).expect_err("tampered");
    let at_client = client.join().unwrap();
    mitm.join().unwrap();
    (at_listener, at_client)
}

fn bad_proof(e: &TransportError, who: &str) -> bool {
    matches!(e, TransportError::Auth(AuthFailure::BadProof { peer }) if *peer == who)
}

fn refused(e: &TransportError) -> bool {
    matches!(e, TransportError::Auth(AuthFailure::Refused { .. }))
}

#[test]
fn a_changed_client_hello_is_refused_by_the_listener() {
    // The client's limit, lowered.
    let (l, c) = through_proxy(CLIENT_HELLO, |f| f["max_message"] = json!(12345));
    assert!(bad_proof(&l, "the connecting peer"), "{l}");
    assert!(refused(&c), "{c}");
}

#[test]
fn a_changed_listener_hello_is_refused_by_the_listener() {
    let (l, c) = through_proxy(LISTENER_HELLO, |f| f["agent_id"] = json!("someone else"));
    assert!(bad_proof(&l, "the connecting peer"), "{l}");
    assert!(refused(&c), "{c}");
}

#[test]
fn a_changed_auth_reason_is_refused_by_the_listener() {
    let (l, c) = through_proxy(AUTH, |f| f["reason"] = json!("rewritten"));
    assert!(bad_proof(&l, "the connecting peer"), "{l}");
    assert!(refused(&c), "{c}");
}

#[test]
fn a_changed_accept_is_refused_by_the_client() {
    for tamper in [
        (|f: &mut Value| f["max_message"] = json!(12345)) as fn(&mut Value),
        |f| f["reason"] = json!("rewritten"),
        |f| f["session_id"] = json!("0".repeat(32)),
        |f| f["ttl_ms"] = json!(1),
    ] {
        let listener =
            Endpoint::bind("tcp://127.0.0.1:0", &ModelIdentity::default(), opts()).unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let via = format!("tcp://{}", proxy.local_addr().unwrap());
        let mitm = man_in_the_middle(proxy, listener.local_addr(), ACCEPT, tamper);
        let client = std::thread::spawn(move || {
            Endpoint::connect(&via, &ModelIdentity::default(), opts()).expect_err("tampered")
        });
        // The listener sees a valid handshake; the client refuses its Accept.
        let _rx = listener.accept(T).unwrap();
        let c = client.join().unwrap();
        assert!(bad_proof(&c, "the listener"), "{c}");
        mitm.join().unwrap();
    }
}

#[test]
fn an_untouched_relay_authenticates() {
    let (listener, proxy) = (
        Endpoint::bind("tcp://127.0.0.1:0", &ModelIdentity::default(), opts()).unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let via = format!("tcp://{}", proxy.local_addr().unwrap());
    let mitm = man_in_the_middle(proxy, listener.local_addr(), NONE, |_| {});
    let client = std::thread::spawn(move || {
        Endpoint::connect(&via, &ModelIdentity::default(), opts()).map(|s| s.session().id.clone())
    });
    let rx = listener.accept(T).unwrap();
    assert_eq!(client.join().unwrap().unwrap(), rx.session().id);
    mitm.join().unwrap();
}

/// The RDMA setup rides in the MAC'd frames: a queue pair or a key changed on
/// the way fails the session instead of pointing writes somewhere else.
#[cfg(target_os = "linux")]
#[test]
fn a_changed_rdma_offer_or_grant_is_refused() {
    use avp_transport::{RdmaDevice, RdmaOptions};
    let rdma = || opts().rdma(RdmaOptions::default().device(RdmaDevice::Emulated));
    for (which, tamper) in [
        (
            AUTH,
            (|f: &mut Value| f["rdma"]["qps"][0]["qpn"] = json!(7)) as fn(&mut Value),
        ),
        (ACCEPT, |f| f["rdma"]["pool"]["rkey"] = json!(1234)),
        (ACCEPT, |f| f["rdma"]["slot_size"] = json!(1 << 30)),
    ] {
        let listener =
            Endpoint::bind("rdma://127.0.0.1:0", &ModelIdentity::default(), rdma()).unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let via = format!("rdma://{}", proxy.local_addr().unwrap());
        let upstream = listener.local_addr().replace("rdma://", "tcp://");
        let mitm = man_in_the_middle(proxy, upstream, which, tamper);
        let client = std::thread::spawn(move || {
            Endpoint::connect(&via, &ModelIdentity::default(), rdma()).expect_err("tampered")
        });
        let at_listener = listener.accept(T);
        let c = client.join().unwrap();
        if which == AUTH {
            let l = at_listener.expect_err("tampered");
            assert!(bad_proof(&l, "the connecting peer"), "{l}");
            assert!(refused(&c), "{c}");
        } else {
            assert!(at_listener.is_ok());
            assert!(bad_proof(&c, "the listener"), "{c}");
        }
        mitm.join().unwrap();
    }
}
