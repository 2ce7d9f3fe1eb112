//! `KvAssembly`: a KV cache received as one message per layer (or group of
//! layers), with per-layer readiness, and the parts it refuses.

use std::time::Duration;

use avp_transport::{Endpoint, KvAssembly, Options, Receiver, Sender, TransportError};
use avp_wire::{
    DType, Envelope, KvCacheDesc, KvLayout, LayerRange, MessageLayout, ModelIdentity, Payload,
};

const T: Duration = Duration::from_secs(10);

fn desc() -> KvCacheDesc {
    KvCacheDesc::new(6, 2, 16, 5, DType::F32, KvLayout::Hnd)
}

/// Send layers `a..b` of `d`, section bytes = layer number.
fn send(tx: &mut Sender, d: KvCacheDesc, a: u32, b: u32) {
    let p = Payload::KvCache(d.with_layers(LayerRange::new(a, b)));
    let layout = MessageLayout::new(&Envelope::default(), &p).unwrap();
    let mut loan = tx.loan(&layout).unwrap();
    for (i, s) in loan.writer().sections_mut().into_iter().enumerate() {
        s.fill(a as u8 + (i / 2) as u8);
    }
    loan.finish().unwrap().send().unwrap();
}

fn session(parts: Vec<(KvCacheDesc, u32, u32)>) -> (Receiver, std::thread::JoinHandle<()>) {
    let id = ModelIdentity::default();
    let listener = Endpoint::bind("tcp://127.0.0.1:0", &id, Options::default()).unwrap();
    let addr = listener.local_addr();
    let o = Options::default().tcp(avp_transport::TcpOptions::default().shm_upgrade(false));
    let t = std::thread::spawn(move || {
        let mut tx = Endpoint::connect(&addr, &ModelIdentity::default(), o).unwrap();
        for (d, a, b) in parts {
            send(&mut tx, d, a, b);
        }
    });
    (listener.accept(T).unwrap(), t)
}

#[test]
fn layers_out_of_order_and_in_groups_assemble() {
    let d = desc();
    let (rx, t) = session(vec![(d, 2, 4), (d, 0, 1), (d, 5, 6), (d, 1, 2), (d, 4, 5)]);
    let mut cache = KvAssembly::new(&rx);
    let l3 = cache.wait_layer(3, T).unwrap();
    assert!(l3.k.iter().all(|&b| b == 3) && l3.v.iter().all(|&b| b == 3));
    assert!(cache.is_ready(2) && !cache.is_ready(0));
    assert_eq!(cache.desc().unwrap().layers, LayerRange::new(0, 6));
    for l in 0..6 {
        let layer = cache.wait_layer(l, T).unwrap();
        assert!(layer.k.iter().all(|&b| b == l as u8), "layer {l}");
    }
    assert!(cache.is_complete());
    assert_eq!(cache.into_parts().len(), 5);
    t.join().unwrap();
}

#[test]
fn parts_of_another_cache_are_refused() {
    let d = desc();
    let other = KvCacheDesc::new(6, 2, 16, 9, DType::F32, KvLayout::Hnd);
    for (second, words) in [
        ((d, 0, 2), "layer 0 arrived twice"),
        ((other, 2, 3), "for a cache of shape"),
    ] {
        let (rx, t) = session(vec![(d, 0, 1), second]);
        let mut cache = KvAssembly::new(&rx);
        cache.wait_layer(0, T).unwrap();
        let e = cache.wait_layer(5, T).err().unwrap();
        assert!(matches!(e, TransportError::Protocol(_)), "{e}");
        assert!(e.to_string().contains(words), "{e}");
        t.join().unwrap();
    }
    let (rx, t) = session(vec![(d, 0, 1)]);
    let mut cache = KvAssembly::new(&rx);
    cache.wait_layer(0, T).unwrap();
    let e = cache.wait_layer(6, T).err().unwrap().to_string();
    assert!(e.contains("layer 6 asked of a cache of 6 layers"), "{e}");
    t.join().unwrap();
}
