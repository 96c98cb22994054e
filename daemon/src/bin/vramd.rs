//! `vramd`: the GPU memory arbiter daemon. Parses its arguments, sets up
//! logging and runs [`vramd::start::run`].
//!
//! Logs go to stderr: text (`--log-format text`, the default) or one JSON
//! object per line (`--log-format json`), never with colours. When stderr is
//! the journal (`JOURNAL_STREAM` names it, as systemd sets it for a service),
//! text lines carry no timestamp: journald stamps every line itself.

use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use vramd::start::{Args, LogFormat, parse_log_filter, run};

fn main() -> ExitCode {
    let args = Args::parse_with_defaults();
    if args.man {
        use std::io::Write;
        return match Args::man_page().and_then(|page| std::io::stdout().write_all(&page)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vramd: cannot write the man page: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // RUST_LOG overrides --log-level, and is checked the same way.
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => {
            parse_log_filter(&env).map_err(|e| format!("RUST_LOG: {e}"))
        }
        _ => Ok(args.log_level.clone()),
    };
    let filter = match filter.and_then(|f| EnvFilter::try_new(&f).map_err(|e| e.to_string())) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vramd: {e}");
            return ExitCode::from(2);
        }
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => subscriber.json().flatten_event(true).init(),
        LogFormat::Text if stderr_is_the_journal() => subscriber.without_time().init(),
        LogFormat::Text => subscriber.init(),
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vramd: {e}");
            ExitCode::from(2)
        }
    }
}

/// Whether stderr is the journal: `JOURNAL_STREAM` (`DEVICE:INODE`) names
/// the file stderr is (a child started from a service inherits the variable
/// but may have its stderr elsewhere).
fn stderr_is_the_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}
