//! The product's claim end to end: agent A runs the model on a prompt, hands its KV
//! cache to agent B in another process over shared memory (zero copy on B's side),
//! and B continues from it exactly as A would have.
//!
//! The child (agent A) is this test binary re-executed with `AVP_HANDOFF_ROLE`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use avp_model::fetch::{self, SMOLLM2};
use avp_model::{Decoder, GgufFile, KvCache};
use avp_transport::{Endpoint, Options};
use avp_wire::{Envelope, MessageLayout, Payload};

const PROMPT_A: &str = "The quick brown fox";
const PROMPT_B: &str = " jumps over the";
const T: Duration = Duration::from_secs(60);

fn load() -> (GgufFile, tokenizers::Tokenizer, Decoder) {
    let g = GgufFile::open(fetch::fetch(&SMOLLM2, false).unwrap()).unwrap();
    let tok = avp_model::tokenizer::from_gguf(&g).unwrap();
    let m = Decoder::load(&g).unwrap();
    (g, tok, m)
}

fn ids(tok: &tokenizers::Tokenizer, s: &str) -> Vec<u32> {
    tok.encode(s, false).unwrap().get_ids().to_vec()
}

/// Agent A: prefill PROMPT_A and send the cache, written straight into a shared slot.
#[test]
fn agent_a_role() {
    let Ok(addr) = std::env::var("AVP_HANDOFF_ROLE") else {
        return;
    };
    let (_, tok, m) = load();
    let mut cache = KvCache::default();
    m.forward(&ids(&tok, PROMPT_A), &mut cache).unwrap();
    let id = m.config().identity("smollm2", &tok);
    let mut tx = Endpoint::connect(&addr, &id, Options::default()).unwrap();
    let env = Envelope {
        session_id: tx.session().id.clone(),
        model_hash: id.model_hash.clone(),
        ..Default::default()
    };
    let layout = MessageLayout::new(&env, &Payload::KvCache(cache.desc().unwrap())).unwrap();
    let mut loan = tx.loan(&layout).unwrap();
    cache.write_into(loan.writer()).unwrap();
    loan.finish().unwrap().send().unwrap();
    // The published message stays readable after A exits: B has the pool mapped.
    println!("SENT {}", tx.session().explain());
}

#[test]
fn agent_b_continues_from_agent_a_cache_across_processes() {
    let (_, tok, m) = load();
    let id = m.config().identity("smollm2", &tok);
    let addr = format!("shm://handoff-{}", std::process::id());
    let listener = Endpoint::bind(&addr, &id, Options::default()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["agent_a_role", "--exact", "--nocapture", "--test-threads=1"])
        .env("AVP_HANDOFF_ROLE", &addr)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = listener.accept(T).unwrap();
    assert_eq!(
        rx.session().mode,
        avp_wire::Mode::Latent,
        "{}",
        rx.session().explain()
    );
    let guard = rx.recv(T).unwrap();
    let msg = guard.message();
    msg.verify().unwrap();
    let pool = rx.pool_range().expect("shared memory");
    assert!(
        pool.contains(&(msg.as_bytes().as_ptr() as usize)),
        "B reads A's slot in place"
    );
    assert_eq!(msg.envelope().model_hash(), id.model_hash);
    let mut received = KvCache::from_message(msg, &m).unwrap();
    drop(guard);
    let from_a = m.greedy(&ids(&tok, PROMPT_B), &mut received, 8, 2).unwrap();

    let mut own = KvCache::default();
    m.forward(&ids(&tok, PROMPT_A), &mut own).unwrap();
    let in_process = m.greedy(&ids(&tok, PROMPT_B), &mut own, 8, 2).unwrap();
    assert_eq!(from_a, in_process, "B continues exactly as A would have");
    assert_eq!(from_a.len(), 8);

    drop(rx);
    let out: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| l.unwrap())
        .collect();
    assert!(child.wait().unwrap().success(), "{out:?}");
    let sent = out
        .iter()
        .find(|l| l.contains("SENT session"))
        .unwrap_or_else(|| panic!("A did not send: {out:?}"));
    assert!(sent.contains("transport shm"), "{sent}");
}
