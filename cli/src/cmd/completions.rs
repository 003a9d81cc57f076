//! `keysync completions SHELL` and `keysync man`: generated from the
//! command line's own definition (clap_complete, clap_mangen), so they
//! never drift from it.

use std::path::PathBuf;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell: bash, zsh, fish, elvish or powershell.
    ///
    /// bash: `keysync completions bash > ~/.local/share/bash-completion/completions/keysync`;
    /// zsh: into a directory of `$fpath` as `_keysync`;
    /// fish: `~/.config/fish/completions/keysync.fish`.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write one page per command (keysync.1, keysync-key.1,
    /// keysync-key-create.1, ...) into this directory instead of printing
    /// the top-level page. Read one with `man -l DIR/keysync.1`.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut cmd = super::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "keysync", &mut script);
    out!("{}", String::from_utf8_lossy(&script));
    Ok(())
}

pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let cmd = super::command();
    match &args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            eprintln!(
                "man pages written to {} (man -l {}/keysync.1)",
                dir.display(),
                dir.display()
            );
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            out!("{}", String::from_utf8_lossy(&page));
        }
    }
    Ok(())
}
