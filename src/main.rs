//! Command-line entry point: parse arguments, load and validate the config
//! before binding anything, then hand over to the command.

use std::process::ExitCode;

use clap::Parser;

use mde_forwarder::cli::{self, Cli};

fn main() -> ExitCode {
    // Before any thread starts, so every thread shares the two arenas.
    mde_forwarder::pipeline::limit_malloc_arenas();
    let cli = Cli::parse();
    cli::main(cli)
}

