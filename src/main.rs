//! The `sd-rbee` binary: parses the command line and dispatches to [`sd_rbee::cli`].

fn main() -> std::process::ExitCode {
    sd_rbee::cli::main()
}
