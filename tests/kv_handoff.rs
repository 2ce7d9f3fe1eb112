//! The product's claim end to end: agent A thinks (prompt plus latent steps), hands
//! its KV cache to agent B in another process over shared memory (zero copy on B's
//! side), and B generates exactly what it would from the same context in-process.
//!
//! The child (agent A) is this test binary re-executed with `AVP_HANDOFF_ROLE`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use avp_model::{Context, GenerateOptions, Model};
use avp_transport::{Endpoint, Options};
use avp_wire::Envelope;

const TASK: &str = "Tom has 3 apples. He buys 5 more apples.";
const QUESTION: &str = "How many apples does Tom have now?";
const STEPS: u32 = 6;
const T: Duration = Duration::from_secs(60);

fn load() -> Model {
    Model::load("smollm2").unwrap()
}

fn greedy() -> GenerateOptions {
    GenerateOptions {
        max_tokens: 12,
        ..Default::default()
    }
}

/// Agent A: read the task, think latent steps, and send the context, written
/// straight into a shared slot.
#[test]
fn agent_a_role() {
    let Ok(addr) = std::env::var("AVP_HANDOFF_ROLE") else {
        return;
    };
    let m = load();
    let ctx = m.think(TASK, STEPS, None).unwrap();
    let mut tx = Endpoint::connect(&addr, m.identity(), Options::default()).unwrap();
    let env = Envelope {
        session_id: tx.session().id.clone(),
        ..Default::default()
    };
    let layout = ctx.layout(env).unwrap();
    let mut loan = tx.loan(&layout).unwrap();
    ctx.write_into(loan.writer()).unwrap();
    loan.finish().unwrap().send().unwrap();
    // The published message stays readable after A exits: B has the pool mapped.
    println!("SENT {}", tx.session().explain());
}

#[test]
fn agent_b_continues_from_agent_a_latent_context_across_processes() {
    let m = load();
    let id = m.identity();
    let addr = format!("shm://handoff-{}", std::process::id());
    let listener = Endpoint::bind(&addr, id, Options::default()).unwrap();
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
    let received = Context::from_message(msg, &m).unwrap();
    drop(guard);
    assert_eq!(received.num_steps, STEPS);
    let from_a = m
        .generate(QUESTION, Some(&received), &greedy(), |_| {})
        .unwrap();

    let own = m.think(TASK, STEPS, None).unwrap();
    assert_eq!(received.seq_len(), own.seq_len());
    let in_process = m.generate(QUESTION, Some(&own), &greedy(), |_| {}).unwrap();
    assert_eq!(
        from_a.tokens, in_process.tokens,
        "B continues exactly as in one process"
    );
    assert!(!from_a.tokens.is_empty());
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
