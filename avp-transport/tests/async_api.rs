//! The tokio entry points: sender and receiver as tasks on a multi-threaded runtime.

use std::sync::Arc;
use std::time::Duration;

use avp_transport::{Endpoint, Options, ShmOptions, TcpOptions, TransportKind};
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};

const T: Duration = Duration::from_secs(10);

async fn exchange(addr: String, opts: Options, count: u8) -> TransportKind {
    let listener =
        Arc::new(Endpoint::bind(&addr, &ModelIdentity::default(), opts.clone()).unwrap());
    let connect_to = listener.local_addr();
    let sender = tokio::spawn(async move {
        let mut tx = Endpoint::connect_async(&connect_to, &ModelIdentity::default(), opts)
            .await
            .unwrap();
        let layout = MessageLayout::new(
            &Envelope::default(),
            &Payload::KvCache(KvCacheDesc::new(3, 2, 32, 16, DType::Bf16, KvLayout::Hnd)),
        )
        .unwrap();
        for n in 0..count {
            let mut loan = tx.loan_async(&layout).await.unwrap();
            for s in loan.writer().sections_mut() {
                s.fill(n);
            }
            loan.finish().unwrap().send_async().await.unwrap();
        }
        let bytes = layout
            .encode_to_vec(&[&[9u8; 2 * 16 * 32 * 2][..]; 6])
            .unwrap();
        tx.send_bytes_async(&bytes).await.unwrap();
        // Keep the session open until the receiver has read everything.
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let rx = Arc::new(listener.accept_async(T).await.unwrap());
    // The receiving loop runs as a task of its own: `recv_async` is `Send`.
    let rx2 = Arc::clone(&rx);
    tokio::spawn(async move {
        for n in 0..count {
            let g = rx2.recv_async(T).await.unwrap();
            g.message().verify().unwrap();
            assert_eq!(g.message().kv().unwrap().v(2).unwrap()[0], n);
            // Guards are `Send`: this one is dropped on another task.
            tokio::spawn(async move { drop(g) }).await.unwrap();
        }
        let g = rx2.recv_async(T).await.unwrap();
        assert_eq!(g.message().kv().unwrap().k(0).unwrap()[0], 9);
    })
    .await
    .unwrap();
    let kind = rx.session().transport;
    sender.await.unwrap();
    let e = rx
        .recv_async(Duration::from_secs(5))
        .await
        .expect_err("sender gone");
    assert!(e.to_string().contains("peer disconnected"), "{e}");
    kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_shm() {
    let opts = Options::default().shm(ShmOptions::default().slots(2));
    let kind = exchange(format!("shm://async-{}", std::process::id()), opts, 20).await;
    assert_eq!(kind, TransportKind::Shm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_tcp() {
    let opts = Options::default().tcp(TcpOptions::default().shm_upgrade(false));
    let kind = exchange("tcp://127.0.0.1:0".into(), opts, 20).await;
    assert_eq!(kind, TransportKind::Tcp);
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_rdma_on_the_emulated_device() {
    use avp_transport::{RdmaDevice, RdmaOptions};
    let opts =
        Options::default().rdma(RdmaOptions::default().device(RdmaDevice::Emulated).slots(2));
    let kind = exchange("rdma://127.0.0.1:0".into(), opts, 20).await;
    assert_eq!(kind, TransportKind::Rdma);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_http() {
    // The sender's own runtime is dropped inside this one's task: it must not
    // wait there (that would panic).
    let kind = exchange("http://127.0.0.1:0".into(), Options::default(), 20).await;
    assert_eq!(kind, TransportKind::Http);
}
