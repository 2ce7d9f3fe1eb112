//! The `avp` command's library half: the two-agent pipeline that `avp demo`,
//! `avp agent` and the evals run, the eval harness, and model fetching with a
//! progress bar. The protocol itself is the `avp` crate (and `avp-wire`,
//! `avp-transport`, `avp-model`); this crate is the application around it.
//!
//! ```
//! use avp_cli::pipeline::{Mode, researcher_prompt};
//!
//! let prompt = researcher_prompt("Tom has 3 apples and buys 5 more.", Mode::Latent);
//! assert!(prompt.contains("Tom has 3 apples"));
//! ```

pub mod eval;
pub mod pipeline;
pub mod progress;
