//! Calls that must never wait for one another: releasing a message while
//! another thread waits in a receive, freeing a listener while another thread
//! accepts on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, Payload};

use crate::endpoint::{
    avp_listener, avp_listener_accept, avp_listener_bind, avp_listener_free, avp_receiver,
    avp_receiver_free, avp_receiver_recv, avp_sender, avp_sender_connect, avp_sender_free,
    avp_sender_send_bytes,
};
use crate::message::{avp_message, avp_message_release};
use crate::status::avp_status;

fn message() -> Vec<u8> {
    let desc = KvCacheDesc::new(1, 1, 4, 2, DType::F16, KvLayout::Hnd);
    let l = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
    l.encode_to_vec(&[&[1u8; 16][..], &[2u8; 16][..]]).unwrap()
}

fn c(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap()
}

/// A listener, a receiver and a sender on shared memory named `name`.
fn session(name: &str) -> (avp_listener, avp_receiver, avp_sender) {
    let addr = c(&format!("shm://{name}-{}", std::process::id()));
    let mut l = avp_listener { id: 0 };
    // SAFETY: valid C string, NULL identity/options (defaults), writable out.
    let st =
        unsafe { avp_listener_bind(addr.as_ptr(), std::ptr::null(), std::ptr::null(), &mut l) };
    assert_eq!(st, avp_status::AVP_OK);
    let addr2 = addr.clone();
    let connect = std::thread::spawn(move || {
        let mut s = avp_sender { id: 0 };
        // SAFETY: as above.
        let st = unsafe {
            avp_sender_connect(addr2.as_ptr(), std::ptr::null(), std::ptr::null(), &mut s)
        };
        assert_eq!(st, avp_status::AVP_OK);
        s
    });
    let mut r = avp_receiver { id: 0 };
    // SAFETY: writable out.
    assert_eq!(
        unsafe { avp_listener_accept(l, 10_000, &mut r) },
        avp_status::AVP_OK
    );
    (l, r, connect.join().unwrap())
}

fn send(s: avp_sender) {
    let m = message();
    // SAFETY: `m` is live for the call.
    assert_eq!(
        unsafe { avp_sender_send_bytes(s, m.as_ptr(), m.len()) },
        avp_status::AVP_OK
    );
}

#[test]
fn a_release_never_waits_for_a_receive_in_progress() {
    let (l, r, s) = session("ffi-release");
    send(s);
    let mut first = avp_message { id: 0 };
    // SAFETY: writable out.
    assert_eq!(
        unsafe { avp_receiver_recv(r, 10_000, &mut first) },
        avp_status::AVP_OK
    );
    // Another thread waits for a message that is not sent until the release returned.
    let received = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&received);
    let waiter = std::thread::spawn(move || {
        let mut m = avp_message { id: 0 };
        // SAFETY: writable out.
        let st = unsafe { avp_receiver_recv(r, 30_000, &mut m) };
        flag.store(true, Ordering::SeqCst);
        assert_eq!(st, avp_status::AVP_OK);
        m
    });
    std::thread::sleep(Duration::from_millis(200)); // let it block in recv
    assert_eq!(avp_message_release(first), avp_status::AVP_OK);
    assert!(
        !received.load(Ordering::SeqCst),
        "the release returned while the receive still waited"
    );
    send(s);
    let second = waiter.join().unwrap();
    assert_eq!(avp_message_release(second), avp_status::AVP_OK);
    assert_eq!(avp_sender_free(s), avp_status::AVP_OK);
    assert_eq!(avp_receiver_free(r), avp_status::AVP_OK);
    assert_eq!(avp_listener_free(l), avp_status::AVP_OK);
}

#[test]
fn freeing_a_listener_never_waits_for_an_accept_in_progress() {
    let addr = c(&format!("shm://ffi-free-{}", std::process::id()));
    let mut l = avp_listener { id: 0 };
    // SAFETY: valid C string, NULL identity/options (defaults), writable out.
    let st =
        unsafe { avp_listener_bind(addr.as_ptr(), std::ptr::null(), std::ptr::null(), &mut l) };
    assert_eq!(st, avp_status::AVP_OK);
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let accepting = std::thread::spawn(move || {
        let mut r = avp_receiver { id: 0 };
        // SAFETY: writable out.
        let st = unsafe { avp_listener_accept(l, 2_000, &mut r) };
        flag.store(true, Ordering::SeqCst);
        st
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(avp_listener_free(l), avp_status::AVP_OK);
    assert!(
        !done.load(Ordering::SeqCst),
        "freed while the accept still waited"
    );
    assert_eq!(accepting.join().unwrap(), avp_status::AVP_ERR_TIMEOUT);
}
