//! Who gets a connection: the handshake pool and the session caps.
//!
//! - **Handshake pool**: connections that have not completed `hello` yet
//!   are bounded on their own (`--max-handshakes`). When a new one arrives
//!   and the pool is full, the one that has waited longest is closed (with
//!   a `limit_exceeded` error): silent connections only shorten each
//!   other's time, and a client that says hello at once always gets in.
//! - **Sessions**: once past `hello`, a connection counts towards
//!   `--max-connections` and towards its user's `--max-connections-per-uid`
//!   (admins are exempt from the latter). Over either, the client gets a
//!   `limit_exceeded` error in its own encoding instead of `welcome`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use vramd_ledger::ConnId;

#[derive(Debug, Default)]
struct Inner {
    sessions: usize,
    per_uid: HashMap<u32, usize>,
    /// Connections in their handshake, oldest (lowest id) first; each with
    /// the signal that closes it.
    handshaking: BTreeMap<ConnId, Arc<Notify>>,
}

/// The daemon's connection accounting (shared by every connection task).
#[derive(Debug)]
pub(crate) struct Admission {
    inner: Mutex<Inner>,
    max_sessions: usize,
    max_per_uid: usize,
    max_handshakes: usize,
}

impl Admission {
    /// Accounting with these caps.
    pub fn new(max_sessions: usize, max_per_uid: usize, max_handshakes: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            max_sessions,
            max_per_uid,
            max_handshakes,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters `conn` into the handshake pool, closing the oldest member if
    /// the pool is full.
    pub fn start_handshake(self: &Arc<Self>, conn: ConnId) -> HandshakeTicket {
        let notify = Arc::new(Notify::new());
        let mut inner = self.lock();
        while inner.handshaking.len() >= self.max_handshakes {
            match inner.handshaking.pop_first() {
                // A stored permit: the evicted task sees it even if it is
                // not waiting yet.
                Some((_, oldest)) => oldest.notify_one(),
                None => break,
            }
        }
        inner.handshaking.insert(conn, notify.clone());
        HandshakeTicket {
            admission: self.clone(),
            conn,
            notify,
        }
    }

    /// Counts a session for `uid`, or says why it is refused.
    pub fn admit(self: &Arc<Self>, uid: u32, admin: bool) -> Result<SessionTicket, String> {
        let mut inner = self.lock();
        if inner.sessions >= self.max_sessions {
            return Err(format!(
                "the daemon serves too many connections ({}, --max-connections); try again later",
                inner.sessions
            ));
        }
        let mine = inner.per_uid.get(&uid).copied().unwrap_or(0);
        if !admin && mine >= self.max_per_uid {
            return Err(format!(
                "user {uid} already has {mine} connections open (limit {}, --max-connections-per-uid); close some",
                self.max_per_uid
            ));
        }
        inner.sessions += 1;
        *inner.per_uid.entry(uid).or_default() += 1;
        Ok(SessionTicket {
            admission: self.clone(),
            uid,
        })
    }

    /// Connections in their handshake now.
    #[cfg(test)]
    fn handshaking(&self) -> usize {
        self.lock().handshaking.len()
    }
}

/// A connection's place in the handshake pool; leaves it when dropped.
#[derive(Debug)]
pub(crate) struct HandshakeTicket {
    admission: Arc<Admission>,
    conn: ConnId,
    notify: Arc<Notify>,
}

impl HandshakeTicket {
    /// Completes when a newer connection pushed this one out of the pool.
    pub async fn evicted(&self) {
        self.notify.notified().await;
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.admission.lock().handshaking.remove(&self.conn);
    }
}

/// A counted session; uncounted when dropped.
#[derive(Debug)]
pub(crate) struct SessionTicket {
    admission: Arc<Admission>,
    uid: u32,
}

impl Drop for SessionTicket {
    fn drop(&mut self) {
        let mut inner = self.admission.lock();
        inner.sessions -= 1;
        if let Some(n) = inner.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                inner.per_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_handshake_pool_closes_its_oldest_member() {
        let a = Admission::new(10, 10, 2);
        let first = a.start_handshake(ConnId(1));
        let second = a.start_handshake(ConnId(2));
        let third = a.start_handshake(ConnId(3));
        assert_eq!(a.handshaking(), 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), first.evicted())
                .await
                .expect("the oldest is told to close");
            let quiet =
                tokio::time::timeout(std::time::Duration::from_millis(20), second.evicted()).await;
            assert!(quiet.is_err(), "the others stay");
        });
        drop((first, second, third));
        assert_eq!(a.handshaking(), 0);
    }

    #[test]
    fn sessions_are_capped_per_user_and_in_all_with_admins_exempt_per_user() {
        let a = Admission::new(4, 2, 8);
        let t1 = a.admit(1000, false).unwrap();
        let _t2 = a.admit(1000, false).unwrap();
        let why = a.admit(1000, false).unwrap_err();
        assert!(why.contains("user 1000 already has 2"), "{why}");
        let _admin = a.admit(1000, true).unwrap();
        let _other = a.admit(2000, false).unwrap();
        assert!(
            a.admit(3000, true)
                .unwrap_err()
                .contains("too many connections")
        );
        drop(t1);
        // Room in all again; user 1000 still has two (one as an admin).
        assert!(a.admit(1000, false).is_err());
        assert!(a.admit(2000, false).is_ok());
    }
}
