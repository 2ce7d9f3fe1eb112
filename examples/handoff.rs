//! The README's Rust quick start: agent A thinks and hands its KV cache to agent
//! B over shared memory; B continues from it. (The two agents are two threads
//! here for brevity; `avp demo` runs them as two processes.)
//!
//! ```sh
//! cargo run --release --example handoff
//! ```

use std::time::Duration;

use avp::model::{Context, GenerateOptions, Model};
use avp::transport::{Endpoint, Options};
use avp::wire::Envelope;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Result<()> {
    let t = Duration::from_secs(30);
    let model = Model::load("smollm2")?;
    let addr = format!("shm://avp-example-{}", std::process::id());
    // Agent B listens.
    let listener = Endpoint::bind(&addr, model.identity(), Options::default())?;
    std::thread::scope(|s| -> Result<()> {
        // Agent A thinks and sends its context, written straight into a shared slot.
        let agent_a = s.spawn(|| -> Result<()> {
            let mut tx = Endpoint::connect(&addr, model.identity(), Options::default())?;
            let ctx = model.think("Tom has 3 apples. He buys 5 more apples.", 6, None)?;
            let layout = ctx.layout(Envelope::default())?;
            let mut loan = tx.loan(&layout)?;
            ctx.write_into(loan.writer())?;
            loan.finish()?.send()?;
            Ok(())
        });
        let rx = listener.accept(t)?;
        println!("{}", rx.session().explain());
        // Agent B continues from A's KV cache, read in place.
        let guard = rx.recv(t)?;
        let received = Context::from_message(guard.message(), &model)?;
        drop(guard); // the slot goes back to A
        agent_a.join().expect("agent A")?;
        let options = GenerateOptions {
            max_tokens: 32,
            ..Default::default()
        };
        let question = "How many apples does Tom have now?";
        let answer = model.generate(question, Some(&received), &options, |_| {})?;
        if answer.reused == 0 {
            return Err("B reused none of A's context".into());
        }
        println!(
            "B reused {} positions of A's context and answered: {}",
            answer.reused, answer.text
        );
        Ok(())
    })
}
