//! Command-line entry point: parse arguments, load and validate the config
//! before binding anything, then hand over to the command.

use std::process::ExitCode;

use mde_forwarder::cli;

fn main() -> ExitCode {
    // Before any thread starts, so every thread shares the two arenas.
    mde_forwarder::pipeline::limit_malloc_arenas();
    match cli::parse_args() {
        Ok(cli) => cli::main(cli),
        Err(code) => code,
    }
}

