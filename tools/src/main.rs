//! `vote-tools`: parses the command line and runs the command (see [`vote_tools::cli`]).

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    vote_tools::cli::main(vote_tools::cli::Cli::parse())
}
