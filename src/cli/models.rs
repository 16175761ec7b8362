//! `sd-rbee models`: the built-in short names, their Hub repos and generation defaults.

use crate::hub;

pub fn run() -> anyhow::Result<()> {
    println!("{:<14} {:<52} {:>9} {:>5} {:>8}  SCHEDULER", "NAME", "REPO", "SIZE", "STEPS", "GUIDANCE");
    for e in hub::registry() {
        println!(
            "{:<14} {:<52} {:>9} {:>5} {:>8}  {}{}",
            e.name,
            e.repo,
            format!("{}x{}", e.width, e.height),
            e.steps,
            e.guidance,
            e.scheduler,
            e.timestep_spacing.map(|s| format!(" ({s})")).unwrap_or_default()
        );
    }
    Ok(())
}
