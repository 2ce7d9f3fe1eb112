//! Fetching and loading models with a progress bar on stderr (the library
//! itself prints nothing: `avp_model::fetch::fetch_with` reports steps).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use avp_model::fetch::{self, ModelSpec, Step};
use avp_model::{Device, Model};

/// `spec`'s file, fetched on first use, with a bar on stderr when `show`.
pub fn fetch(spec: &ModelSpec, show: bool) -> anyhow::Result<PathBuf> {
    if !show {
        return Ok(fetch::fetch(spec)?);
    }
    let bar = indicatif::ProgressBar::new(spec.parts.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{pos}/{len}] {elapsed}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let path = fetch::fetch_with(spec, &mut |step: Step<'_>| {
        bar.set_length(step.total as u64);
        bar.set_position(step.done as u64);
        bar.set_message(step.message.to_owned());
    });
    bar.finish_and_clear();
    Ok(path?)
}

/// The model `name_or_path` on `device`; a known model not yet cached is
/// fetched first, with a bar on stderr when `show`.
pub fn load(name_or_path: &str, device: Device, show: bool) -> anyhow::Result<Model> {
    if let Ok(spec) = fetch::spec(name_or_path) {
        fetch(spec, show)?;
    }
    Model::load_on(name_or_path, device).with_context(|| format!("load {name_or_path}"))
}
