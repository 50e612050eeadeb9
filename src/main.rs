//! The `engage-sync` binary: parse the command line, set up logging, hand over to `cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = engage_sync::cli::Cli::parse();
    engage_sync::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(engage_sync::cli::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", one_line(&format!("{error:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Keeps multi-line causes on one line, so scripts get a one-line reason.
fn one_line(text: &str) -> String {
    text.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}
