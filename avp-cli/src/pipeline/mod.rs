//! The two-agent pipeline the demo and the evals run: a researcher (agent A) reads
//! the task and either thinks in latent space or writes an analysis; a solver
//! (agent B) answers, continuing from A's KV cache or re-reading A's text.
//!
//! Prompts follow the reference's `gsm8k_2agent` shape: in latent mode the solver's
//! prompt holds only its role and the question; in text mode A's analysis is pasted
//! into it.

pub mod agent;
pub mod handoff;

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

/// The JSON fallback message (the reference's `JSONMessage`): what a researcher
/// sends when the handshake found no latent path.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JsonMessage {
    /// The protocol version the reference writes ("0.6.2").
    pub avp_version: String,
    /// Session id.
    pub session_id: String,
    /// Sender.
    pub source_agent_id: String,
    /// Receiver.
    pub target_agent_id: String,
    /// The text.
    pub content: String,
    /// Free fields (omitted when empty, as the reference does).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for JsonMessage {
    fn default() -> Self {
        JsonMessage {
            avp_version: "0.6.2".into(),
            session_id: String::new(),
            source_agent_id: String::new(),
            target_agent_id: String::new(),
            content: String::new(),
            extra: serde_json::Map::new(),
        }
    }
}

impl JsonMessage {
    /// `content` addressed as `envelope` says.
    pub fn new(envelope: &avp_wire::Envelope, content: &str) -> JsonMessage {
        JsonMessage {
            session_id: envelope.session_id.clone(),
            source_agent_id: envelope.source_agent_id.clone(),
            target_agent_id: envelope.target_agent_id.clone(),
            content: content.into(),
            ..JsonMessage::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_message_has_the_reference_shape() {
        let m = JsonMessage {
            content: "x".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["avp_version"], "0.6.2");
        assert!(v.get("extra").is_none(), "extra only when non-empty");
        let back: JsonMessage = serde_json::from_str(r#"{"content":"hi"}"#).unwrap();
        assert_eq!(
            (back.content.as_str(), back.avp_version.as_str()),
            ("hi", "0.6.2")
        );
    }
}
