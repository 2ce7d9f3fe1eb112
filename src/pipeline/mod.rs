//! The two-agent pipeline the demo and the evals run: a researcher (agent A) reads
//! the task and either thinks in latent space or writes an analysis; a solver
//! (agent B) answers, continuing from A's KV cache or re-reading A's text.
//!
//! Prompts follow the reference's `gsm8k_2agent` shape: in latent mode the solver's
//! prompt holds only its role and the question; in text mode A's analysis is pasted
//! into it.

pub mod agent;

/// How the solver learns what the researcher found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A's KV cache (prompt + latent steps) moves to B.
    Latent,
    /// A writes an analysis; B re-reads it.
    Text,
    /// One agent answers alone.
    Direct,
}

impl Mode {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Latent => "latent",
            Mode::Text => "text",
            Mode::Direct => "direct",
        }
    }
}

/// The researcher's prompt.
pub fn researcher_prompt(task: &str, mode: Mode) -> String {
    let ask = match mode {
        Mode::Text => "Write a short analysis: the key facts and the steps to the answer.",
        _ => "Work out the key facts and the steps to the answer.",
    };
    format!("You are a researcher. Read the problem carefully. {ask}\n\nProblem: {task}")
}

/// How the demo's solver is told to answer.
pub const FINAL_ANSWER: &str = "Solve the problem and give the final answer.";

/// The solver's prompt (`analysis` is A's text in text mode); `finish` says how to
/// answer (e.g. [`FINAL_ANSWER`]).
pub fn solver_prompt(task: &str, analysis: Option<&str>, finish: &str) -> String {
    match analysis {
        Some(a) => format!(
            "You are a solver. A researcher analysed the problem:\n{a}\n\nUsing the analysis: {finish}\n\nProblem: {task}"
        ),
        None => format!(
            "You are a solver. Using the researcher's analysis: {finish}\n\nProblem: {task}"
        ),
    }
}

/// The single agent's prompt.
pub fn direct_prompt(task: &str, finish: &str) -> String {
    format!("{finish}\n\nProblem: {task}")
}
