//! Command-line entry point: parse arguments, load and validate the config
//! before binding anything, then hand over to the command.

use std::process::ExitCode;

use clap::Parser;

use mde_forwarder::cli::{self, Cli};

/// mimalloc instead of glibc malloc: encoding allocates many small strings
/// per detection, and glibc's arenas dominated the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::main(cli)
}
