//! One reservation per resident model of an app, and its lifecycle.
//!
//! A model's slot goes `Reserving` (one request waits in vramd's queue for
//! the model's size; others for the same model wait for it) → `Held` (the
//! reservation is granted; requests run, each counted in `in_flight`, and
//! the reservation is marked busy while any runs, idle otherwise) →
//! released, when Ollama unloaded the model by itself (the poller no longer
//! sees it in `/api/ps`), when the daemon evicted it (`Evicting`: no new
//! request is forwarded, those in flight finish up to the deadline, Ollama
//! is asked to unload the model, the gateway waits until `/api/ps` no longer
//! lists it, then releases), or when the connection to vramd broke.
//!
//! Each slot has an epoch; a request's [`ModelUse`] guard touches only the
//! slot it was counted in, never a later one for the same model.
//!
//! A watched app (no `listen`) gets its slots from `/api/ps` instead of
//! from requests: see [`watch`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use vramd_client::{Error as SdkError, Request};

use crate::Error;
use crate::config::{App, Kind};
use crate::daemon::Daemon;
use crate::metrics::Metrics;
use crate::ollama::{ModelCall, Running, Upstream, estimate_bytes};
use crate::sizes::SizeStore;

pub mod drain;
pub mod watch;

/// How often an eviction re-reads `/api/ps` while it waits for the unload.
const UNLOAD_POLL: Duration = Duration::from_millis(100);
/// How long past the eviction deadline a failed eviction keeps its
/// reservation, so that vramd has passed the deadline first: it then counts
/// the eviction failed and asks its next victim (a release before the
/// deadline would count as completed).
const PAST_DEADLINE: Duration = Duration::from_millis(250);
/// Longest the gateway waits for the daemon's first answer to a request
/// (a grant or a queue position; it comes in microseconds).
const FIRST_ANSWER: Duration = Duration::from_secs(2);

/// Where a model's reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A request waits in vramd's queue for it.
    Reserving,
    /// Granted; requests are forwarded.
    Held,
    /// The daemon asked for it back; requests wait.
    Evicting,
}

#[derive(Debug)]
struct Slot {
    epoch: u64,
    phase: Phase,
    reservation: Option<Arc<vramd_client::Reservation>>,
    generation: u64,
    bytes: u64,
    device: Option<u32>,
    in_flight: u32,
    last_busy: Instant,
    pinned: bool,
    loaded: bool,
    idle_sent: Arc<tokio::sync::Mutex<Option<bool>>>,
    /// A waiter outranked it past the drain limit: new requests wait.
    draining: bool,
}

/// How an eviction's unload went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unloaded {
    /// The app freed the memory (or, with nothing to watch, accepted the
    /// unload).
    Freed,
    /// It had nothing loaded: nothing was asked (not a completed unload).
    Already,
    /// The unload failed (refused, an error, no answer by the deadline, or
    /// the memory still in use at the deadline): the memory stays.
    Failed(String),
}

/// One model in `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelStatus {
    /// Normalized name.
    pub model: String,
    /// Where its reservation stands.
    pub phase: Phase,
    /// Bytes reserved (or being waited for).
    pub reserved_bytes: u64,
    /// Device granted.
    pub device: Option<u32>,
    /// vramd's id of the reservation.
    pub reservation_id: Option<u64>,
    /// Requests being forwarded now.
    pub in_flight: u32,
    /// Whether vramd may evict it now (idle and not pinned).
    pub idle: bool,
    /// Pinned by a negative `keep_alive`.
    pub pinned: bool,
    /// Seen in `/api/ps` since the grant.
    pub loaded: bool,
    /// New requests wait: a waiter has outranked it past the drain limit.
    pub draining: bool,
}

/// One app: its upstream, its models' reservations, its poller.
#[derive(Debug)]
pub struct AppState {
    /// Its configuration.
    pub cfg: App,
    /// The gateway's own calls to it.
    pub upstream: Upstream,
    /// The connection to vramd.
    pub daemon: Arc<Daemon>,
    /// Observed sizes.
    pub sizes: Arc<SizeStore>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    slots: Mutex<HashMap<String, Slot>>,
    changed: Notify,
    next_epoch: std::sync::atomic::AtomicU64,
    last_ps: Mutex<Option<Vec<Running>>>,
    runtime: tokio::runtime::Handle,
    watch: Mutex<watch::Watch>,
    /// Which runner process holds each model (see `attribution`).
    pub attribution: crate::attribution::Attribution,
    /// `comfyui`: its queue.
    pub(crate) comfy: crate::comfyui::Comfy,
    /// `comfyui`, `http`: the app's process, attributed to its reservation.
    pub(crate) attributed: crate::pids::Attributed,
    /// `http`: health, loads, peers.
    pub(crate) http_app: crate::http_app::HttpApp,
    /// `command`: loads, unloads, last error.
    pub(crate) command: crate::command_app::CommandApp,
    /// Failed unloads and loads, and when each is tried again.
    pub retry: crate::retry::Retry,
    /// `managed`: its models' servers.
    pub(crate) managed: crate::managed::Managed,
}

/// How long a model stays busy in vramd after its last request ended, so
/// that back-to-back requests do not each mark it busy and idle again.
pub const IDLE_LINGER: std::time::Duration = std::time::Duration::from_millis(250);

/// A request's hold on a model: the reservation is busy while any exists
/// (and for [`IDLE_LINGER`] after the last one ends).
#[derive(Debug)]
pub struct ModelUse {
    app: Arc<AppState>,
    model: String,
    epoch: u64,
}

impl Drop for ModelUse {
    fn drop(&mut self) {
        let mut slots = self.app.lock();
        let Some(s) = slots.get_mut(&self.model).filter(|s| s.epoch == self.epoch) else {
            return;
        };
        s.in_flight = s.in_flight.saturating_sub(1);
        s.last_busy = Instant::now();
        let now_idle = s.in_flight == 0;
        drop(slots);
        self.app.changed.notify_waiters();
        if now_idle {
            // Marked idle only if no request came back within IDLE_LINGER:
            // a model used request after request stays busy in vramd, so
            // each request costs no round trip to the daemon (busy was
            // never withdrawn, and `sync_idle` sends only changes).
            let app = self.app.clone();
            let model = self.model.clone();
            self.app.runtime.spawn(async move {
                tokio::time::sleep(IDLE_LINGER).await;
                // A request that came and went meanwhile spawned its own
                // check, IDLE_LINGER after it: this one is stale.
                let recent = app
                    .lock()
                    .get(&model)
                    .is_some_and(|s| s.last_busy.elapsed() < IDLE_LINGER);
                if !recent {
                    app.sync_idle(&model).await
                }
            });
        }
    }
}

impl ModelUse {
    /// The epoch of the slot it counts in: a new reservation of the same
    /// model has a new epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Removes a `Reserving` slot when the reserving request gives up (its
/// client disconnected, the wait limit passed, vramd is down).
struct ReservingGuard<'a> {
    app: &'a AppState,
    model: &'a str,
    epoch: u64,
    armed: bool,
}

impl Drop for ReservingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut slots = self.app.lock();
            if slots.get(self.model).is_some_and(|s| s.epoch == self.epoch) {
                slots.remove(self.model);
            }
            drop(slots);
            self.app.changed.notify_waiters();
        }
    }
}

impl AppState {
    /// An app with no model held.
    pub fn new(
        cfg: App,
        http: reqwest::Client,
        daemon: Arc<Daemon>,
        sizes: Arc<SizeStore>,
        metrics: Arc<Metrics>,
    ) -> AppState {
        AppState {
            upstream: Upstream::new(cfg.upstream.clone(), http),
            retry: crate::retry::Retry::new(cfg.retry_backoff),
            cfg,
            daemon,
            sizes,
            metrics,
            slots: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            next_epoch: std::sync::atomic::AtomicU64::new(1),
            last_ps: Mutex::new(None),
            runtime: tokio::runtime::Handle::current(),
            watch: Mutex::new(watch::Watch::default()),
            attribution: crate::attribution::Attribution::default(),
            comfy: crate::comfyui::Comfy::default(),
            attributed: crate::pids::Attributed::default(),
            http_app: crate::http_app::HttpApp::default(),
            command: crate::command_app::CommandApp::default(),
            managed: crate::managed::Managed::default(),
        }
    }

    /// The HTTP client for the upstream.
    pub fn http(&self) -> &reqwest::Client {
        self.upstream.http()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn label(&self, model: &str) -> String {
        format!("{}/{model}", self.cfg.name)
    }

    /// Waits until `call.model` holds a reservation that takes requests,
    /// reserving it through vramd's queue when it has none, and counts this
    /// request in it. `Ok(None)`: the model is unknown to the app (Ollama
    /// answers that itself), so nothing is reserved.
    pub async fn acquire(
        self: &Arc<Self>,
        call: &ModelCall,
        priority: i32,
    ) -> Result<Option<ModelUse>, Error> {
        let model = call.model.as_str();
        let started = Instant::now();
        let deadline = self.cfg.wait_limit.map(|w| started + w);
        let mut counted_wait = false;
        enum Next {
            Use(u64),
            Reserve(u64),
            Wait,
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let mut slots = self.lock();
                match slots.get_mut(model) {
                    Some(s) if s.phase == Phase::Held && !s.draining => {
                        s.in_flight += 1;
                        s.last_busy = Instant::now();
                        if let Some(k) = call.keep_alive_secs {
                            s.pinned = k < 0.0;
                        }
                        Next::Use(s.epoch)
                    }
                    Some(_) => Next::Wait,
                    None => {
                        let epoch = self
                            .next_epoch
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        slots.insert(
                            model.to_string(),
                            Slot {
                                epoch,
                                phase: Phase::Reserving,
                                reservation: None,
                                generation: 0,
                                bytes: 0,
                                device: None,
                                in_flight: 0,
                                last_busy: Instant::now(),
                                pinned: false,
                                loaded: false,
                                idle_sent: Arc::new(tokio::sync::Mutex::new(None)),
                                draining: false,
                            },
                        );
                        Next::Reserve(epoch)
                    }
                }
            };
            match next {
                Next::Use(epoch) => {
                    let u = ModelUse {
                        app: self.clone(),
                        model: model.to_string(),
                        epoch,
                    };
                    self.sync_idle(model).await;
                    if counted_wait {
                        self.metrics
                            .waited(&self.cfg.name, model, started.elapsed());
                    }
                    return Ok(Some(u));
                }
                Next::Reserve(epoch) => {
                    let r = self.reserve(call, priority, epoch, deadline).await;
                    if counted_wait || r.as_ref().is_ok_and(|(_, queued)| *queued) {
                        if !counted_wait {
                            self.metrics.wait(&self.cfg.name, model);
                        }
                        self.metrics
                            .waited(&self.cfg.name, model, started.elapsed());
                    }
                    return r.map(|(u, _)| u);
                }
                Next::Wait => {
                    if !counted_wait {
                        counted_wait = true;
                        self.metrics.wait(&self.cfg.name, model);
                    }
                }
            }
            // Waiting behind another request's reservation or an eviction
            // counts against this request's own wait limit.
            match deadline {
                None => notified.await,
                Some(d) => {
                    if tokio::time::timeout_at(d.into(), notified).await.is_err() {
                        self.metrics
                            .waited(&self.cfg.name, model, started.elapsed());
                        return Err(Error::WaitTimeout {
                            model: model.to_string(),
                            message: format!(
                                "the model's reservation was not ready within the wait limit ({} ms)",
                                started.elapsed().as_millis()
                            ),
                        });
                    }
                }
            }
        }
    }

    async fn reserve(
        self: &Arc<Self>,
        call: &ModelCall,
        priority: i32,
        epoch: u64,
        deadline: Option<Instant>,
    ) -> Result<(Option<ModelUse>, bool), Error> {
        let model = call.model.as_str();
        let mut guard = ReservingGuard {
            app: self,
            model,
            epoch,
            armed: true,
        };
        let Some(bytes) = self.size_for(call).await? else {
            tracing::debug!(app = %self.cfg.name, model, "model not pulled: forwarded without a reservation");
            return Ok((None, false));
        };
        if let Some(s) = self.lock().get_mut(model) {
            s.bytes = bytes;
        }
        let (generation, client) = self.daemon.client().await?;
        // The reservation speaks for the model's runner (adopting what it
        // already holds), never for the gateway's own process.
        let mut req = Request::new(bytes)
            .for_pids(self.attribution.runners_of(model))
            .label(self.label(model))
            .priority(priority)
            .evictable(false);
        if self.cfg.kind == Kind::Managed
            && let Some(d) = self.cfg.device
        {
            req = req.device(vramd_client::DeviceSelector::Index(d));
        }
        if let Some(d) = deadline {
            req = req.timeout(d.saturating_duration_since(Instant::now()));
        }
        tracing::info!(app = %self.cfg.name, model, bytes, priority, "reserving");
        let started = Instant::now();
        let pending = match client.blocking().submit(req) {
            Ok(p) => p,
            Err(e) => return Err(self.reserve_error(model, bytes, generation, e).await),
        };
        // Whether it had to queue: the daemon answers at once with a grant
        // or a queue position. (Read off the executor; if this request goes
        // away meanwhile, dropping the pending request there cancels it.)
        let (pending, first) = tokio::task::spawn_blocking(move || {
            let mut pending = pending;
            let first = pending.next(Some(FIRST_ANSWER));
            (pending, first)
        })
        .await
        .map_err(|e| self.daemon.down(e))?;
        let queued = match first {
            Ok(Some(vramd_client::Progress::Queued { .. })) => true,
            Ok(Some(vramd_client::Progress::Granted(r))) => {
                drop(pending);
                return self.granted(
                    call, epoch, generation, bytes, r, started, &mut guard, false,
                );
            }
            Ok(None) => true,
            Err(e) => return Err(self.reserve_error(model, bytes, generation, e).await),
        };
        let r = match pending.granted().await {
            Ok(r) => r,
            Err(e) => return Err(self.reserve_error(model, bytes, generation, e).await),
        };
        self.granted(
            call, epoch, generation, bytes, r, started, &mut guard, queued,
        )
    }

    async fn reserve_error(&self, model: &str, bytes: u64, generation: u64, e: SdkError) -> Error {
        match e {
            SdkError::WaitTimeout(m) => Error::WaitTimeout {
                model: model.to_string(),
                message: m,
            },
            SdkError::Refused(m) => Error::Refused {
                model: model.to_string(),
                bytes_needed: bytes,
                message: m,
            },
            e => {
                if matches!(e, SdkError::Disconnected | SdkError::Io(_)) {
                    self.daemon.lost(generation).await;
                }
                self.daemon.down(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn granted(
        self: &Arc<Self>,
        call: &ModelCall,
        epoch: u64,
        generation: u64,
        bytes: u64,
        r: vramd_client::Reservation,
        started: Instant,
        guard: &mut ReservingGuard<'_>,
        queued: bool,
    ) -> Result<(Option<ModelUse>, bool), Error> {
        let model = call.model.as_str();
        tracing::info!(
            app = %self.cfg.name, model, bytes, device = r.device_index(), id = r.id().0,
            waited_ms = started.elapsed().as_millis() as u64, "granted"
        );
        let app = self.clone();
        let evicted_model = model.to_string();
        let runtime = self.runtime.clone();
        r.on_evict(move |ev| {
            runtime.block_on(app.evict(&evicted_model, epoch, ev.deadline, &ev.reason));
        });
        let device = r.device_index();
        {
            let mut slots = self.lock();
            let Some(s) = slots.get_mut(model).filter(|s| s.epoch == epoch) else {
                // Cannot happen while the guard is armed; release to be safe.
                return Err(self.daemon.down("the reservation's slot vanished"));
            };
            s.phase = Phase::Held;
            s.reservation = Some(Arc::new(r));
            s.generation = generation;
            s.device = Some(device);
            s.in_flight = 1;
            s.last_busy = Instant::now();
            s.pinned = call.keep_alive_secs.is_some_and(|k| k < 0.0);
            s.idle_sent = Arc::new(tokio::sync::Mutex::new(Some(false)));
        }
        guard.armed = false;
        self.retry.remirrored(model);
        self.changed.notify_waiters();
        Ok((
            Some(ModelUse {
                app: self.clone(),
                model: model.to_string(),
                epoch,
            }),
            queued,
        ))
    }

    /// The bytes to reserve for a model: its last observed size, else the
    /// config's override, else the estimate; `None` if the app does not have
    /// the model.
    async fn size_for(&self, call: &ModelCall) -> Result<Option<u64>, Error> {
        if let Some(b) = self.sizes.get(&self.label(&call.model)) {
            return Ok(Some(b));
        }
        if self.cfg.kind == Kind::OpenAi {
            return Ok(self.cfg.model(&call.model).and_then(|m| m.size_bytes));
        }
        if self.cfg.kind == Kind::Managed {
            return Ok(self
                .cfg
                .managed_model(&call.model)
                .and_then(|m| m.size_bytes));
        }
        if matches!(self.cfg.kind, Kind::ComfyUi | Kind::Http | Kind::Command) {
            return Ok(self.cfg.size_bytes);
        }
        if let Some(b) = self.cfg.size_overrides.get(&call.model) {
            return Ok(Some(*b));
        }
        let Some(file_bytes) = self.upstream.file_size(&call.model).await? else {
            return Ok(None);
        };
        let info = self.upstream.model_info(&call.model).await?;
        let ctx = call.num_ctx.unwrap_or(self.cfg.context_length);
        Ok(Some(estimate_bytes(file_bytes, info.as_ref(), ctx)))
    }

    /// Tells vramd whether the model's reservation is idle, if that changed.
    /// Calls are serialized per slot, and each sends the state current when
    /// it runs, so the daemon ends up with the latest.
    pub(crate) async fn sync_idle(&self, model: &str) {
        let Some((res, lock)) = self
            .lock()
            .get(model)
            .and_then(|s| s.reservation.clone().map(|r| (r, s.idle_sent.clone())))
        else {
            return;
        };
        let mut sent = lock.lock().await;
        let Some(want) = self.lock().get(model).map(|s| self.wants_idle(model, s)) else {
            return;
        };
        if *sent == Some(want) {
            return;
        }
        match tokio::task::spawn_blocking(move || res.set_idle(want)).await {
            Ok(Ok(())) => *sent = Some(want),
            Ok(Err(e)) => {
                tracing::warn!(app = %self.cfg.name, model, idle = want, error = %e, "cannot mark the reservation");
            }
            Err(e) => tracing::warn!(error = %e, "set_idle task failed"),
        }
    }

    fn wants_idle(&self, model: &str, s: &Slot) -> bool {
        s.phase == Phase::Held
            && s.in_flight == 0
            && (!s.pinned || self.cfg.evict_pinned)
            && self.can_unload(model)
            && !(self.cfg.kind == Kind::ComfyUi && self.comfy.busy())
            && (self.cfg.kind != Kind::Http || crate::http_app::may_be_idle(self))
    }

    /// Releases `model`'s reservation of `epoch` if it is held and idle (no
    /// request in flight, none within [`IDLE_LINGER`]); whether it did.
    pub(crate) fn release_idle(&self, model: &str, epoch: u64, why: &str) -> bool {
        let mut slots = self.lock();
        let idle = slots.get(model).is_some_and(|s| {
            s.epoch == epoch
                && s.phase == Phase::Held
                && s.in_flight == 0
                && s.last_busy.elapsed() >= IDLE_LINGER
        });
        if idle {
            slots.remove(model);
        }
        drop(slots);
        if idle {
            tracing::info!(app = %self.cfg.name, model, why, "released");
            self.changed.notify_waiters();
        }
        idle
    }

    /// `model`'s reservation while held: its epoch, the reservation, its
    /// device.
    pub(crate) fn reservation(
        &self,
        model: &str,
    ) -> Option<(u64, Arc<vramd_client::Reservation>, u32)> {
        let slots = self.lock();
        let s = slots.get(model).filter(|s| s.phase == Phase::Held)?;
        Some((s.epoch, s.reservation.clone()?, s.device?))
    }

    /// Whether the gateway has a way to unload `model` (an `openai` model
    /// without an `unload` request has none, so it is never idle in vramd).
    fn can_unload(&self, model: &str) -> bool {
        match self.cfg.kind {
            Kind::Ollama | Kind::ComfyUi => true,
            Kind::OpenAi => self.cfg.model(model).is_some_and(|m| m.unload.is_some()),
            Kind::Http => self.cfg.unload.is_some() && !self.cfg.always_on,
            Kind::Command | Kind::Managed => true,
        }
    }

    /// The daemon asked for `model`'s reservation back (runs on an SDK
    /// thread through `block_on`); the SDK releases it when this returns.
    async fn evict(&self, model: &str, epoch: u64, deadline: Duration, reason: &str) {
        let until = Instant::now() + deadline;
        let device = {
            let mut slots = self.lock();
            let Some(s) = slots.get_mut(model).filter(|s| s.epoch == epoch) else {
                return;
            };
            s.phase = Phase::Evicting;
            s.device
        };
        self.metrics.eviction(&self.cfg.name, model);
        tracing::info!(app = %self.cfg.name, model, reason, deadline_ms = deadline.as_millis() as u64, "evicting");
        // Let requests in flight finish, up to the deadline.
        self.wait_in_flight(model, epoch, until).await;
        let outcome = match self.cfg.kind {
            // Nothing to watch: the unload request answering is all the
            // gateway can know; vramd grants only on its readings.
            Kind::OpenAi => crate::openai::unload(self, model, until).await,
            Kind::Ollama => self.unload_ollama(model, until).await,
            Kind::ComfyUi => crate::comfyui::unload(self, device, until).await,
            Kind::Http => crate::http_app::unload(self, device, until).await,
            Kind::Command => crate::command_app::unload(self, device, until).await,
            Kind::Managed => {
                crate::managed::stop_server(self, model, until, "evicted").await;
                Unloaded::Freed
            }
        };
        match &outcome {
            Unloaded::Failed(why) => {
                let wait = self.retry.failed(model, true);
                tracing::warn!(
                    app = %self.cfg.name, model, why, retry_in_ms = wait.as_millis() as u64,
                    "the unload failed: the reservation is kept until the eviction deadline (vramd then tries its next victim), released, and taken again after the backoff to retry"
                );
                // Released only once vramd passed the deadline: it then
                // counts the eviction failed and asks another victim.
                tokio::time::sleep_until((until + PAST_DEADLINE).into()).await;
                // The backoff counts from the release.
                self.retry.restart_wait(model);
            }
            Unloaded::Freed | Unloaded::Already => self.retry.succeeded(model),
        }
        {
            let mut slots = self.lock();
            if slots.get(model).is_some_and(|s| s.epoch == epoch) {
                slots.remove(model);
            }
        }
        tracing::info!(app = %self.cfg.name, model, "evicted: releasing");
        self.changed.notify_waiters();
    }

    /// Waits until `model`'s slot of `epoch` has no request in flight (or
    /// is gone), at most until `until`.
    async fn wait_in_flight(&self, model: &str, epoch: u64, until: Instant) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let busy = self
                .lock()
                .get(model)
                .filter(|s| s.epoch == epoch)
                .map_or(0, |s| s.in_flight);
            if busy == 0 || Instant::now() >= until {
                break;
            }
            let _ = tokio::time::timeout_at(until.into(), notified).await;
        }
    }

    /// Stops `model`'s reservation of `epoch` from the gateway's side (a
    /// `managed` model idle past its TTL, or one that shares no group with
    /// a model being started): as an eviction, new requests wait, those in
    /// flight may finish until `in_flight_until`, the server is stopped
    /// (bounded by `until`), then the reservation is released. With
    /// `idle_only`, nothing happens unless the model is held with no request
    /// in flight; returns whether it was stopped.
    pub(crate) async fn stop_model(
        &self,
        model: &str,
        epoch: u64,
        in_flight_until: Instant,
        until: Instant,
        idle_only: bool,
        why: &str,
    ) -> bool {
        {
            let mut slots = self.lock();
            let Some(s) = slots.get_mut(model).filter(|s| {
                s.epoch == epoch
                    && s.phase == Phase::Held
                    && (!idle_only || (s.in_flight == 0 && s.last_busy.elapsed() >= IDLE_LINGER))
            }) else {
                return false;
            };
            s.phase = Phase::Evicting;
        }
        tracing::info!(app = %self.cfg.name, model, why, "stopping");
        self.changed.notify_waiters();
        self.wait_in_flight(model, epoch, in_flight_until).await;
        crate::managed::stop_server(self, model, until, why).await;
        self.forget(model, epoch, why);
        true
    }

    /// Removes `model`'s slot of `epoch` whatever its phase (its server
    /// failed or exited): the reservation is released; requests counted in
    /// it finish on their own, touching no later slot.
    pub(crate) fn forget(&self, model: &str, epoch: u64, why: &str) {
        let removed = {
            let mut slots = self.lock();
            if slots.get(model).is_some_and(|s| s.epoch == epoch) {
                slots.remove(model)
            } else {
                None
            }
        };
        if removed.is_some() {
            tracing::info!(app = %self.cfg.name, model, why, "released");
            self.changed.notify_waiters();
        }
        drop(removed);
    }

    /// `model`'s held reservation's epoch and how long it has had no request
    /// in flight (`None`: not held, or a request is in flight).
    pub(crate) fn idle_for(&self, model: &str) -> Option<(u64, Duration)> {
        let slots = self.lock();
        let s = slots
            .get(model)
            .filter(|s| s.phase == Phase::Held && s.in_flight == 0)?;
        Some((s.epoch, s.last_busy.elapsed()))
    }

    /// The epoch of `model`'s slot in any phase.
    pub(crate) fn slot_epoch(&self, model: &str) -> Option<u64> {
        self.lock().get(model).map(|s| s.epoch)
    }

    /// Asks Ollama to unload `model` and waits (until `until`) until
    /// `/api/ps` no longer lists it. A model `/api/ps` no longer lists is
    /// not asked.
    async fn unload_ollama(&self, model: &str, until: Instant) -> Unloaded {
        let listed = |ps: &[Running]| {
            ps.iter()
                .any(|r| crate::ollama::normalize_model(&r.name) == model)
        };
        if let Ok(ps) = self.upstream.ps().await
            && !listed(&ps)
        {
            tracing::info!(app = %self.cfg.name, model, "not loaded any more: nothing to unload");
            return Unloaded::Already;
        }
        let call = &format!("unload {model}");
        match tokio::time::timeout_at(until.into(), self.upstream.unload(model)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(app = %self.cfg.name, model, error = %e, "unload request failed");
                self.retry.fail(call, &e);
                return Unloaded::Failed(e.to_string());
            }
            Err(_) => {
                let why = "no answer by the eviction deadline".to_string();
                self.retry.fail(call, &why);
                return Unloaded::Failed(why);
            }
        }
        loop {
            match self.upstream.ps().await {
                Ok(ps) if !listed(&ps) => {
                    self.retry.succeed(call);
                    return Unloaded::Freed;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "reading /api/ps during an eviction"),
            }
            if Instant::now() >= until {
                let why = "still listed in /api/ps at the eviction deadline".to_string();
                self.retry.fail(call, &why);
                return Unloaded::Failed(why);
            }
            tokio::time::sleep(UNLOAD_POLL).await;
        }
    }

    /// Takes `model`'s reservation again after a failed unload (its memory
    /// is still on the card): try-once, idle, speaking for `pids` (vramd
    /// adopts what they use), so that vramd may choose it as a victim again
    /// and the unload is retried. Tried again one backoff later when it
    /// does not fit now.
    pub(crate) async fn remirror(
        self: &Arc<Self>,
        model: &str,
        bytes: u64,
        pids: Vec<u32>,
        device: Option<u32>,
    ) {
        if self.has_slot(model) {
            // Still being evicted, or a request reserved it meanwhile (its
            // grant ends the pending re-mirror).
            return;
        }
        self.retry.remirrored(model);
        let (generation, client) = match self.daemon.client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(app = %self.cfg.name, model, error = %e, "cannot take the reservation again now");
                self.retry.not_now(model);
                return;
            }
        };
        let mut req = Request::new(bytes)
            .for_pids(pids.clone())
            .label(self.label(model))
            .priority(self.cfg.priority)
            .evictable(true)
            .timeout(Duration::ZERO);
        if let Some(d) = device {
            req = req.device(vramd_client::DeviceSelector::Index(d));
        }
        let r = match client.reserve(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(app = %self.cfg.name, model, bytes, error = %e, "the reservation of a model whose unload failed cannot be taken again now; trying later");
                self.retry.not_now(model);
                return;
            }
        };
        let id = r.id().0;
        if !self.adopt(model, r, generation, false) {
            return;
        }
        if !pids.is_empty()
            && let Some((epoch, _, _)) = self.reservation(model)
        {
            crate::pids::note(self, epoch, pids);
        }
        tracing::info!(app = %self.cfg.name, model, bytes, id, "took the reservation of a model whose unload failed again: vramd may evict it again, and the unload is retried");
    }

    /// One poll: reads `/api/ps`, records sizes, and releases reservations
    /// of models Ollama unloaded by itself or that a lost vramd connection
    /// took with it; for a watched app, mirrors the resident models.
    pub async fn poll(self: &Arc<Self>) {
        if self.cfg.kind == Kind::OpenAi {
            self.release_lost();
            for model in self.retry.remirrors_due() {
                let bytes = self
                    .sizes
                    .get(&self.label(&model))
                    .or(self.cfg.model(&model).and_then(|m| m.size_bytes));
                if let Some(bytes) = bytes {
                    // Nothing is attributed to such a server's models: the
                    // reservation counts on top of their usage.
                    self.remirror(&model, bytes, Vec::new(), None).await;
                }
            }
            return self.update_drain();
        }
        if self.cfg.kind == Kind::ComfyUi {
            self.release_lost();
            self.remirror_one(crate::comfyui::MODEL).await;
            crate::comfyui::poll(self).await;
            return self.update_drain();
        }
        if self.cfg.kind == Kind::Http {
            self.release_lost();
            self.remirror_one(crate::http_app::MODEL).await;
            crate::http_app::poll(self).await;
            return self.update_drain();
        }
        if self.cfg.kind == Kind::Command {
            self.release_lost();
            return crate::command_app::poll(self).await;
        }
        if self.cfg.kind == Kind::Managed {
            self.release_lost();
            crate::managed::poll(self).await;
            return self.update_drain();
        }
        let started = Instant::now();
        let ps = self.upstream.ps().await;
        let mut released = Vec::new();
        // Read after the call: a connection made meanwhile is current, and
        // slots are stamped with their connection's generation at the grant.
        let generation = self.daemon.generation();
        {
            let mut slots = self.lock();
            slots.retain(|model, s| {
                if s.phase == Phase::Held && s.generation != generation {
                    released.push((model.clone(), "the connection to vramd was lost"));
                    return false;
                }
                let Ok(ps) = &ps else { return true };
                let listed = ps
                    .iter()
                    .any(|r| crate::ollama::normalize_model(&r.name) == *model);
                if listed {
                    s.loaded = true;
                    return true;
                }
                if s.phase == Phase::Held && s.in_flight == 0 && s.last_busy < started {
                    released.push((model.clone(), "the app unloaded it"));
                    return false;
                }
                true
            });
        }
        for (model, why) in &released {
            tracing::info!(app = %self.cfg.name, model, why, "released");
        }
        if !released.is_empty() {
            self.changed.notify_waiters();
        }
        match ps {
            Ok(ps) => {
                for r in &ps {
                    let model = crate::ollama::normalize_model(&r.name);
                    if r.size_vram > 0 {
                        self.metrics.size(&self.cfg.name, &model, r.size_vram);
                        if let Err(e) = self.sizes.observe(&self.label(&model), r.size_vram) {
                            tracing::warn!(error = %e, "cannot save the model size");
                        }
                    }
                }
                *self.last_ps.lock().unwrap_or_else(|p| p.into_inner()) = Some(ps.clone());
                // Attribution first: a watched app's mirrors then speak for
                // the runners this pass found (see `watch`).
                crate::attribution::attribute(self, &ps).await;
                if self.cfg.listen.is_none() {
                    self.mirror_resident(&ps, None);
                } else {
                    // A fronted app's model whose unload failed is mirrored
                    // again once its backoff passed.
                    let due = self.retry.remirrors_due();
                    if !due.is_empty() {
                        self.mirror_resident(&ps, Some(&due));
                    }
                }
                // A model whose unload failed but that Ollama no longer
                // lists has nothing left to retry.
                for model in self.retry.remirrors_due() {
                    if !ps
                        .iter()
                        .any(|r| crate::ollama::normalize_model(&r.name) == model)
                    {
                        self.retry.remirrored(&model);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(app = %self.cfg.name, error = %e, "polling /api/ps");
                *self.last_ps.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
        self.update_drain();
    }

    /// A single-reservation app (`comfyui`, `http`) whose unload failed:
    /// its reservation taken again, for its attributed processes, once the
    /// backoff passed.
    async fn remirror_one(self: &Arc<Self>, model: &str) {
        if !self.retry.remirror_due(model) {
            return;
        }
        let Some(bytes) = self.sizes.get(&self.label(model)).or(self.cfg.size_bytes) else {
            return;
        };
        let (pids, _) = self.attributed.pids();
        self.remirror(model, bytes, pids, None).await;
    }

    /// Forgets the reservations a lost vramd connection took with it.
    fn release_lost(&self) {
        let generation = self.daemon.generation();
        let mut lost = Vec::new();
        self.lock().retain(|model, s| {
            let keep = !(s.phase == Phase::Held && s.generation != generation);
            if !keep {
                lost.push(model.clone());
            }
            keep
        });
        for model in &lost {
            tracing::info!(app = %self.cfg.name, model, why = "the connection to vramd was lost", "released");
        }
        if !lost.is_empty() {
            self.changed.notify_waiters();
        }
    }

    /// The reservations held now: (model, slot epoch, reservation).
    pub(crate) fn held(&self) -> Vec<(String, u64, Arc<vramd_client::Reservation>)> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.phase == Phase::Held)
            .filter_map(|(m, s)| s.reservation.clone().map(|r| (m.clone(), s.epoch, r)))
            .collect()
    }

    /// Whether the app has a slot for `model` in any phase.
    pub(crate) fn has_slot(&self, model: &str) -> bool {
        self.lock().contains_key(model)
    }

    /// Records that slot `epoch` of `model` now reserves `bytes` (grown).
    pub(crate) fn set_reserved(&self, model: &str, epoch: u64, bytes: u64) {
        if let Some(s) = self.lock().get_mut(model).filter(|s| s.epoch == epoch) {
            s.bytes = bytes;
        }
    }

    /// Takes a reservation made for a model already resident (adopted with
    /// its runner) as the model's slot: held, idle unless pinned. `false`:
    /// a slot appeared meanwhile (the reservation is dropped: released).
    pub(crate) fn adopt(
        self: &Arc<Self>,
        model: &str,
        r: vramd_client::Reservation,
        generation: u64,
        pinned: bool,
    ) -> bool {
        let epoch = self
            .next_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut slots = self.lock();
        if slots.contains_key(model) {
            return false;
        }
        let app = self.clone();
        let evicted_model = model.to_string();
        let runtime = self.runtime.clone();
        r.on_evict(move |ev| {
            runtime.block_on(app.evict(&evicted_model, epoch, ev.deadline, &ev.reason));
        });
        let idle = !pinned || self.cfg.evict_pinned;
        slots.insert(
            model.to_string(),
            Slot {
                epoch,
                phase: Phase::Held,
                bytes: r.bytes(),
                device: Some(r.device_index()),
                reservation: Some(Arc::new(r)),
                generation,
                in_flight: 0,
                last_busy: Instant::now(),
                pinned,
                loaded: true,
                draining: false,
                idle_sent: Arc::new(tokio::sync::Mutex::new(Some(idle))),
            },
        );
        drop(slots);
        self.retry.remirrored(model);
        self.changed.notify_waiters();
        true
    }

    /// The models held, for `/status`.
    pub fn models(&self) -> Vec<ModelStatus> {
        let slots = self.lock();
        let mut v: Vec<ModelStatus> = slots
            .iter()
            .map(|(m, s)| ModelStatus {
                model: m.clone(),
                phase: s.phase,
                reserved_bytes: s.bytes,
                device: s.device,
                reservation_id: s.reservation.as_ref().map(|r| r.id().0),
                in_flight: s.in_flight,
                idle: self.wants_idle(m, s),
                pinned: s.pinned,
                loaded: s.loaded,
                draining: s.draining,
            })
            .collect();
        v.sort_by(|a, b| a.model.cmp(&b.model));
        v
    }

    /// The app's last failure, whatever its kind: kept until a later
    /// success of the same call.
    pub(crate) fn last_error(&self) -> crate::last_error::LastError {
        match self.cfg.kind {
            Kind::Http => self.http_app.last_error(),
            Kind::Command => self.command.last_error(),
            Kind::ComfyUi => self.comfy.last_error(),
            Kind::Managed => self.managed.last_error(),
            Kind::Ollama | Kind::OpenAi => self.retry.last_error(),
        }
    }

    /// For `/status`: the app's `last_error` (`{message, at_ms, ago_ms}`
    /// or `null`), `failures`, `failed_unloads`, `next_retry_in_ms` and
    /// `retries` (see [`crate::retry::Retry::status_json`]).
    pub fn failures_json(&self) -> serde_json::Value {
        let mut v = self.retry.status_json();
        v["last_error"] = self.last_error().json();
        v
    }

    /// What `/api/ps` said last (`None`: the upstream did not answer).
    pub fn last_ps(&self) -> Option<Vec<Running>> {
        self.last_ps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
