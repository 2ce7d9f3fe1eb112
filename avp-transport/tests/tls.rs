//! TCP sessions over TLS (feature `tls`): messages arrive intact, a plain peer or a
//! peer that does not trust the certificate is refused.
#![cfg(feature = "tls")]

use std::sync::Arc;
use std::time::Duration;

use avp_transport::{Endpoint, Options, TcpOptions, Tls, TransportError, TransportKind};
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const T: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificate() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    (ck.cert.der().clone(), key)
}

fn server_tls(cert: &CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Tls {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    Tls {
        client: None,
        server: Some(Arc::new(cfg)),
        server_name: None,
    }
}

fn client_tls(trusted: &CertificateDer<'static>) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        client: Some(Arc::new(cfg)),
        server: None,
        server_name: Some("localhost".into()),
    }
}

fn opts(tls: Option<Tls>) -> Options {
    {
        let mut o = Options::default()
            .token("t0k3n")
            .tcp(TcpOptions::default().shm_upgrade(false));
        o.tcp.tls = tls;
        o
    }
}

#[test]
fn messages_cross_tls_intact() {
    let (cert, key) = certificate();
    let listener = Endpoint::bind(
        "tcp://127.0.0.1:0",
        &ModelIdentity::default(),
        opts(Some(server_tls(&cert, key))),
    )
    .unwrap();
    let addr = listener.local_addr();
    let client = client_tls(&cert);
    let h = std::thread::spawn(move || {
        let mut tx =
            Endpoint::connect(&addr, &ModelIdentity::default(), opts(Some(client))).unwrap();
        let l = MessageLayout::new(
            &Envelope::default(),
            &Payload::KvCache(KvCacheDesc::new(4, 2, 64, 300, DType::F16, KvLayout::Hnd)),
        )
        .unwrap();
        for n in 0..5u8 {
            let mut loan = tx.loan(&l).unwrap();
            for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
                s.fill(n.wrapping_mul(13).wrapping_add(i as u8));
            }
            loan.finish().unwrap().send().unwrap();
        }
        let data: Vec<Vec<u8>> = l.sections().map(|s| vec![0xEE; s.len as usize]).collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        tx.send_sections(&l, &refs).unwrap();
    });
    let rx = listener.accept(T).unwrap();
    assert_eq!(rx.session().transport, TransportKind::Tcp);
    for n in 0..5u8 {
        let g = rx.recv(T).unwrap();
        g.message().verify().unwrap();
        assert_eq!(
            g.message().kv().unwrap().v(3).unwrap()[0],
            n.wrapping_mul(13).wrapping_add(7)
        );
    }
    let g = rx.recv(T).unwrap();
    g.message().verify().unwrap();
    assert_eq!(g.message().kv().unwrap().k(0).unwrap()[5], 0xEE);
    h.join().unwrap();
}

#[test]
fn plain_and_untrusting_peers_are_refused() {
    let (cert, key) = certificate();
    let listener = Endpoint::bind(
        "tcp://127.0.0.1:0",
        &ModelIdentity::default(),
        opts(Some(server_tls(&cert, key))),
    )
    .unwrap();
    let addr = listener.local_addr();
    let (other, _) = certificate();
    let h = std::thread::spawn(move || {
        let plain = Endpoint::connect(
            &addr,
            &ModelIdentity::default(),
            opts(None).connect_timeout(Duration::from_secs(2)),
        );
        let untrusting = Endpoint::connect(
            &addr,
            &ModelIdentity::default(),
            opts(Some(client_tls(&other))),
        );
        (
            plain.expect_err("plain refused"),
            untrusting.expect_err("untrusted cert refused"),
        )
    });
    for _ in 0..2 {
        assert!(listener.accept(T).is_err());
    }
    let (plain, untrusting) = h.join().unwrap();
    assert!(matches!(plain, TransportError::Protocol(_)), "{plain}");
    assert!(
        untrusting.to_string().contains("invalid peer certificate"),
        "{untrusting}"
    );
}
