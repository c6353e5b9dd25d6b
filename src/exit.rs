//! What a command's outcome means to whoever runs it unattended (cron,
//! Airflow, systemd, the person on call): one exit code per kind of
//! outcome, and one error line in one style.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | the job is done: every row decoded or validly rejected (failed rows within `max_failed_share`) |
//! | 1 | vinetl itself could not go on (a database lost mid-run, an interruption, a bug) |
//! | 2 | usage or configuration: a bad spec, a wrong URL, an unwritable output, a missing key; nothing was called |
//! | 3 | the job failed or was cancelled |
//! | 4 | the job is done, but more rows failed than `max_failed_share` allows |
//!
//! Errors print as `vinetl: error: WHAT (CONTEXT): WHAT TO DO`: each
//! module's error already says what and where, and where it knows, what to
//! do; [`render`] joins an error's causes without repeating one.

use std::process::ExitCode;

pub const OK: u8 = 0;
pub const ERROR: u8 = 1;
pub const USAGE: u8 = 2;
pub const JOB_FAILED: u8 = 3;
pub const ROWS_FAILED: u8 = 4;

/// An error that is the user's to fix before anything runs (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code for an error that ended a command.
pub fn code_for(e: &anyhow::Error) -> u8 {
    use crate::store::StoreError;
    if e.chain().any(|c| matches!(c.downcast_ref(), Some(crate::job::plan::PlanError::Failed { .. }))) {
        return JOB_FAILED;
    }
    let usage = e.chain().any(|c| {
        c.is::<Usage>()
            || c.is::<crate::spec::SpecError>()
            || c.is::<crate::job::preflight::PreflightError>()
            || c.is::<crate::prometheus::MetricsError>()
            || matches!(
                c.downcast_ref::<StoreError>(),
                Some(
                    StoreError::UnknownScheme(_)
                        | StoreError::BadSchema(_)
                        | StoreError::Connect { .. }
                        | StoreError::SqliteOpen { .. }
                        | StoreError::NoState(_)
                        | StoreError::NoJob(_)
                        | StoreError::Planning(_)
                )
            )
    });
    if usage { USAGE } else { ERROR }
}

/// One line: the error and each cause that adds something, joined by `: `.
/// Causes whose text the line already holds (a wrapper that prints its
/// source, then the source again) are left out.
pub fn render(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = clean(&cause.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Drops what helps nobody: sqlx's "error returned from database: " prefix
/// and the server's source line (" at line 948").
fn clean(text: &str) -> String {
    let text = text.strip_prefix("error returned from database: ").unwrap_or(text);
    let text = match text.rfind(" at line ") {
        Some(i) if text[i + 9..].chars().all(|c| c.is_ascii_digit()) && text.len() > i + 9 => &text[..i],
        _ => text,
    };
    text.trim().to_string()
}

/// Prints the error on stderr in the one style and returns its exit code.
pub fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("vinetl: error: {}", render(e));
    ExitCode::from(code_for(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_joined_once_and_cleaned() {
        let inner = anyhow::anyhow!("error returned from database: database \"x\" does not exist at line 948");
        let e = inner.context("cannot connect to Postgres at postgres://h/x: database \"x\" does not exist");
        assert_eq!(render(&e), "cannot connect to Postgres at postgres://h/x: database \"x\" does not exist");
        let e = anyhow::anyhow!("pool timed out").context("reading job 3");
        assert_eq!(render(&e), "reading job 3: pool timed out");
    }

    #[test]
    fn usage_errors_exit_2_and_others_1() {
        assert_eq!(code_for(&anyhow::Error::new(Usage("x".into()))), USAGE);
        assert_eq!(code_for(&anyhow::Error::new(Usage("x".into())).context("while submitting")), USAGE);
        assert_eq!(code_for(&anyhow::anyhow!("disk gone")), ERROR);
    }
}
