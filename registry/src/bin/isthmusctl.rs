//! `isthmusctl`: the operator CLI (see `ctl.rs`).

fn main() -> std::process::ExitCode {
    isthmus_registry::ctl::main()
}
