use std::process::ExitCode;

fn main() -> ExitCode {
    hail::main()
}
