fn main() -> std::process::ExitCode {
    unassign_worker::cli::main()
}
