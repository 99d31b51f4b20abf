//! The `mmdit` command: parse arguments and dispatch; the work happens in the library.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    let code = match cli::run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&e));
            cli::exit_code(&e)
        }
    };
    std::process::exit(code);
}
