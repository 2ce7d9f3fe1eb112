//! Chat templates (the Jinja templates models ship), rendered with minijinja.

use serde::Serialize;

use crate::error::{ModelError, Result};

/// One chat message.
#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// Render `template` for `messages`; `add_generation_prompt` opens the assistant's turn.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let bad = |e: minijinja::Error| ModelError::Gguf(format!("chat template: {e}"));
    env.add_template("chat", template).map_err(bad)?;
    env.get_template("chat")
        .map_err(bad)?
        .render(minijinja::context! { messages => messages, add_generation_prompt => add_generation_prompt })
        .map_err(bad)
}
