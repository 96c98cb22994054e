//! An app's last failure and when it happened, shown in `/status` and kept
//! until a later success of the same call (so a failure never vanishes
//! behind an unrelated success).

use std::fmt::Display;

/// The last failure of an app's calls: `"<call>: <why>"` and its time.
#[derive(Debug, Default, Clone)]
pub(crate) struct LastError(Option<(String, u64)>);

impl LastError {
    /// Records that `call` failed with `e`, now.
    pub(crate) fn fail(&mut self, call: &str, e: impl Display) {
        self.0 = Some((format!("{call}: {e}"), now_ms()));
    }

    /// Clears the last failure if it was one of `call`.
    pub(crate) fn succeed(&mut self, call: &str) {
        if self
            .0
            .as_ref()
            .is_some_and(|(m, _)| m.starts_with(&format!("{call}:")))
        {
            self.0 = None;
        }
    }

    /// The message, if any.
    pub(crate) fn message(&self) -> Option<&str> {
        self.0.as_ref().map(|(m, _)| m.as_str())
    }

    /// When it happened, in Unix milliseconds.
    pub(crate) fn at_ms(&self) -> Option<u64> {
        self.0.as_ref().map(|(_, t)| *t)
    }
}

impl LastError {
    /// The same failure with `what` (e.g. a model's name) before its message.
    pub(crate) fn about(&self, what: &str) -> LastError {
        LastError(self.0.as_ref().map(|(m, t)| (format!("{what}: {m}"), *t)))
    }

    /// For `/status`: `{message, at_ms, ago_ms}`, or `null` when none.
    pub(crate) fn json(&self) -> serde_json::Value {
        match &self.0 {
            None => serde_json::Value::Null,
            Some((m, at)) => serde_json::json!({
                "message": m,
                "at_ms": at,
                "ago_ms": now_ms().saturating_sub(*at),
            }),
        }
    }
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_stays_until_the_same_call_succeeds() {
        let mut e = LastError::default();
        e.fail("unload", "exit status 1");
        assert_eq!(e.message(), Some("unload: exit status 1"));
        assert!(e.at_ms().is_some_and(|t| t > 0));
        assert_eq!(
            e.about("llama").message(),
            Some("llama: unload: exit status 1")
        );
        assert_eq!(e.about("llama").at_ms(), e.at_ms());
        e.succeed("health");
        assert_eq!(e.message(), Some("unload: exit status 1"));
        e.succeed("unload");
        assert_eq!(e.message(), None);
        assert_eq!(e.at_ms(), None);
    }
}
