//! The `mmdit` command: parse arguments and dispatch; the work happens in the library.

mod cli;
mod server;

use clap::Parser;

fn main() {
    // A closed pipe (`mmdit inspect ... | head`) ends the process quietly, as it does other
    // command-line tools, instead of making `println!` panic. Rust sets SIGPIPE to be ignored.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
