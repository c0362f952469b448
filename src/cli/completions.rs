//! `keyfence completions bash|zsh|fish`: prints a shell completion script generated from the
//! same command definitions the parser uses, so it never falls behind a new flag.

use clap::CommandFactory;

use super::{Cli, CliError, output};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Install, for example:\n  \
    keyfence completions bash > ~/.local/share/bash-completion/completions/keyfence\n  \
    keyfence completions zsh > \"${fpath[1]}/_keyfence\"\n  \
    keyfence completions fish > ~/.config/fish/completions/keyfence.fish")]
pub struct CompletionsArgs {
    /// The shell to print the completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

pub fn run(args: CompletionsArgs) -> Result<(), CliError> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut command = Cli::command();
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    output::print_text(&String::from_utf8_lossy(&script))
}
