//! The `bgw` command: the daemon, the client and the component registry on the command line.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
