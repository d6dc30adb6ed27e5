//! `tern server`: owned by the broker integrator. Placeholder until the broker lands.
use clap::Args;

/// Options of `tern server` (filled in by the broker work).
#[derive(Args, Debug)]
pub struct ServerArgs {}

pub fn run(_args: ServerArgs) -> anyhow::Result<()> {
    anyhow::bail!("tern server is not built yet")
}
