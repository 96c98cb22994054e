//! Prometheus metrics: per model requests, waits, evictions, drains and sizes; per
//! device the daemon's total, used, reserved and available memory.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use vramd_client::StatusReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    app: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StopLabels {
    app: String,
    model: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
    uuid: String,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<ModelLabels, Counter>,
    waits: Family<ModelLabels, Counter>,
    wait_seconds: Family<ModelLabels, Counter<f64, AtomicU64>>,
    evictions: Family<ModelLabels, Counter>,
    drains: Family<ModelLabels, Counter>,
    size: Family<ModelLabels, Gauge>,
    server_starts: Family<ModelLabels, Counter>,
    server_stops: Family<StopLabels, Counter>,
    device_total: Family<DeviceLabels, Gauge>,
    device_used: Family<DeviceLabels, Gauge>,
    device_reserved: Family<DeviceLabels, Gauge>,
    device_available: Family<DeviceLabels, Gauge>,
    daemon_up: Gauge,
    /// When vramd last evicted one of each app's models (for the report of
    /// the apps to vramd: `report`).
    last_eviction: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vramd_gateway");
        let m = Metrics {
            requests: Family::default(),
            waits: Family::default(),
            wait_seconds: Family::default(),
            evictions: Family::default(),
            drains: Family::default(),
            size: Family::default(),
            server_starts: Family::default(),
            server_stops: Family::default(),
            device_total: Family::default(),
            device_used: Family::default(),
            device_reserved: Family::default(),
            device_available: Family::default(),
            daemon_up: Gauge::default(),
            last_eviction: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "model_requests",
            "Requests naming the model",
            m.requests.clone(),
        );
        registry.register(
            "model_waits",
            "Requests that waited for the model's reservation",
            m.waits.clone(),
        );
        registry.register(
            "model_wait_seconds",
            "Time requests spent waiting for the model's reservation",
            m.wait_seconds.clone(),
        );
        registry.register(
            "model_evictions",
            "Times vramd asked for the model's reservation back",
            m.evictions.clone(),
        );
        registry.register(
            "model_drains",
            "Times new requests for the model were held back because a waiter outranked it past the drain limit",
            m.drains.clone(),
        );
        registry.register(
            "model_size_bytes",
            "GPU memory the model took when last seen loaded",
            m.size.clone(),
        );
        registry.register(
            "managed_starts",
            "Times a managed model's server was started",
            m.server_starts.clone(),
        );
        registry.register(
            "managed_stops",
            "Times a managed model's server stopped, by reason (evicted, ttl, swap, exited, failed_start, stale, shutdown)",
            m.server_stops.clone(),
        );
        registry.register(
            "device_total_bytes",
            "Device memory (from vramd)",
            m.device_total.clone(),
        );
        registry.register(
            "device_used_bytes",
            "Device memory in use (from vramd)",
            m.device_used.clone(),
        );
        registry.register(
            "device_reserved_bytes",
            "Device memory reserved through vramd",
            m.device_reserved.clone(),
        );
        registry.register(
            "device_available_bytes",
            "Device memory a new request may still get (from vramd)",
            m.device_available.clone(),
        );
        registry.register(
            "daemon_up",
            "1 while connected to vramd",
            m.daemon_up.clone(),
        );
        Metrics { registry, ..m }
    }

    fn labels(app: &str, model: &str) -> ModelLabels {
        ModelLabels {
            app: app.into(),
            model: model.into(),
        }
    }

    /// A request named the model.
    pub fn request(&self, app: &str, model: &str) {
        self.requests.get_or_create(&Self::labels(app, model)).inc();
    }

    /// A request waited for the model's reservation.
    pub fn wait(&self, app: &str, model: &str) {
        self.waits.get_or_create(&Self::labels(app, model)).inc();
    }

    /// A request waited `waited` for the model's reservation (granted or not).
    pub fn waited(&self, app: &str, model: &str, waited: std::time::Duration) {
        self.wait_seconds
            .get_or_create(&Self::labels(app, model))
            .inc_by(waited.as_secs_f64());
    }

    /// vramd evicted the model.
    pub fn eviction(&self, app: &str, model: &str) {
        self.evictions
            .get_or_create(&Self::labels(app, model))
            .inc();
        self.last_eviction
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app.to_string(), std::time::Instant::now());
    }

    /// When vramd last evicted one of `app`'s models, if ever.
    pub fn last_eviction(&self, app: &str) -> Option<std::time::Instant> {
        self.last_eviction
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(app)
            .copied()
    }

    /// The model started draining (see the drain limit).
    pub fn drain(&self, app: &str, model: &str) {
        self.drains.get_or_create(&Self::labels(app, model)).inc();
    }

    /// The model's observed size.
    pub fn size(&self, app: &str, model: &str, size_bytes: u64) {
        self.size
            .get_or_create(&Self::labels(app, model))
            .set(i64::try_from(size_bytes).unwrap_or(i64::MAX));
    }

    /// A managed model's server was started.
    pub fn server_start(&self, app: &str, model: &str) {
        self.server_starts
            .get_or_create(&Self::labels(app, model))
            .inc();
    }

    /// A managed model's server stopped for `reason`.
    pub fn server_stop(&self, app: &str, model: &str, reason: &str) {
        self.server_stops
            .get_or_create(&StopLabels {
                app: app.into(),
                model: model.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Encodes everything, with the devices of `status` (`None`: vramd is
    /// not reachable).
    pub fn encode(&self, status: Option<&StatusReport>) -> String {
        self.daemon_up.set(i64::from(status.is_some()));
        for f in [
            &self.device_total,
            &self.device_used,
            &self.device_reserved,
            &self.device_available,
        ] {
            f.clear();
        }
        for d in status.map(|s| s.devices.as_slice()).unwrap_or_default() {
            let l = DeviceLabels {
                device: d.index.to_string(),
                uuid: d.uuid.clone(),
            };
            let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.device_total.get_or_create(&l).set(g(d.total_bytes));
            self.device_used.get_or_create(&l).set(g(d.used_bytes));
            self.device_reserved
                .get_or_create(&l)
                .set(g(d.reserved_bytes));
            self.device_available
                .get_or_create(&l)
                .set(g(d.available_bytes));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
