//! The consumers clients report (`ReportConsumers`): vramd-gateway declares
//! the apps it fronts so that status lists them. The ledger only keeps and
//! shows them — it never calls an app; apps are evicted through the
//! reservations the gateway holds for them, like any holder.
//!
//! Each connection's list replaces its previous one and goes when the
//! connection closes. Every list is bounded (entries, string lengths, and
//! [`MAX_REPORTED_CONSUMERS`] on the daemon in all); a report out of
//! bounds is refused with a clear error and changes nothing, so one client
//! can never disturb another's entries.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use vramd_protocol::{
    ConsumerError, ConsumerReport, ConsumerStatus, ErrorKind, MAX_REPORTED_CONSUMERS, ServerMessage,
};

use crate::{ConnId, Effect, LogEvent, error, millis};

/// One connection's report and when it arrived (its `last_eviction_ms`
/// ages from then).
#[derive(Debug, Clone)]
struct Report {
    at: Instant,
    consumers: Vec<ConsumerReport>,
}

/// Every connection's reported consumers, by connection (so status lists
/// them in the order the connections were made).
#[derive(Debug, Clone, Default)]
pub(crate) struct Reported {
    by_conn: BTreeMap<ConnId, Report>,
    /// Entries over all connections.
    total: usize,
}

impl Reported {
    /// Checks and stores `conn`'s report, and answers.
    pub(crate) fn report(
        &mut self,
        conn: ConnId,
        tag: u64,
        consumers: Vec<ConsumerReport>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        if let Err((kind, why)) = self.check(conn, &consumers) {
            fx.push(Effect::Reply {
                conn,
                msg: error(tag, kind, format!("report_consumers: {why}")),
            });
            return;
        }
        let count = consumers.len();
        self.forget(conn);
        if count > 0 {
            self.total += count;
            self.by_conn.insert(conn, Report { at: now, consumers });
        }
        fx.push(Effect::Reply {
            conn,
            msg: ServerMessage::ConsumersReported {
                tag,
                count: count as u32,
            },
        });
        fx.push(Effect::Log(LogEvent::ConsumersReported { conn, count }));
    }

    /// Why `conn` may not report `consumers`.
    fn check(&self, conn: ConnId, consumers: &[ConsumerReport]) -> Result<(), (ErrorKind, String)> {
        if consumers.len() > MAX_REPORTED_CONSUMERS {
            return Err((
                ErrorKind::BadRequest,
                format!(
                    "{} consumers, over the limit of {MAX_REPORTED_CONSUMERS} in one report",
                    consumers.len()
                ),
            ));
        }
        let mut names = HashSet::with_capacity(consumers.len());
        for c in consumers {
            c.check().map_err(|e| (ErrorKind::BadRequest, e))?;
            if !names.insert(c.name.as_str()) {
                return Err((
                    ErrorKind::BadRequest,
                    format!("consumer {:?} is listed twice", c.name),
                ));
            }
        }
        let others = self.total - self.by_conn.get(&conn).map_or(0, |r| r.consumers.len());
        if others + consumers.len() > MAX_REPORTED_CONSUMERS {
            return Err((
                ErrorKind::LimitExceeded,
                format!(
                    "{} consumers would make {} reported on this daemon, over the limit of {MAX_REPORTED_CONSUMERS} (other clients report {others})",
                    consumers.len(),
                    others + consumers.len()
                ),
            ));
        }
        Ok(())
    }

    /// Drops what `conn` reported (it closed).
    pub(crate) fn forget(&mut self, conn: ConnId) {
        if let Some(r) = self.by_conn.remove(&conn) {
            self.total -= r.consumers.len();
        }
    }

    fn all(&self) -> impl Iterator<Item = (&Report, &ConsumerReport)> {
        self.by_conn
            .values()
            .flat_map(|r| r.consumers.iter().map(move |c| (r, c)))
    }

    /// Every reported consumer as status shows it at `now`.
    pub(crate) fn status(&self, now: Instant) -> Vec<ConsumerStatus> {
        self.all()
            .map(|(r, c)| ConsumerStatus {
                name: c.name.clone(),
                kind: c.kind.clone(),
                device: c.device,
                priority: c.priority,
                reachable: c.reachable,
                resident_bytes: c.resident_bytes,
                models: c.models.clone(),
                last_eviction_ms: c
                    .last_eviction_ms
                    .map(|ms| ms.saturating_add(millis(now.saturating_duration_since(r.at)))),
                last_error: c.last_error.clone(),
            })
            .collect()
    }

    /// The last error of every reported consumer that has one.
    pub(crate) fn errors(&self) -> Vec<ConsumerError> {
        self.all()
            .filter_map(|(_, c)| {
                c.last_error.as_ref().map(|message| ConsumerError {
                    name: c.name.clone(),
                    message: message.clone(),
                    at_ms: c.last_error_at_ms,
                })
            })
            .collect()
    }
}
