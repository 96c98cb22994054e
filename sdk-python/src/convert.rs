//! Python arguments to SDK values: sizes, devices, wait limits.
//!
//! Validation happens here, before anything is sent, so a bad argument is a
//! `ValueError` or `TypeError` at the call site and never reaches the daemon.

use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyString};
use vramd_client::{DeviceSelector, Request};

/// Bytes from an `int` or a size string such as `"8GiB"`, `"512MiB"`, `"8GB"`.
pub(crate) fn size_bytes(size: &Bound<'_, PyAny>) -> PyResult<u64> {
    if size.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(
            "size must be an int of bytes or a string such as \"8GiB\", not a bool",
        ));
    }
    if size.is_instance_of::<PyInt>() {
        let n: i128 = size
            .extract()
            .map_err(|_| PyValueError::new_err("size is too large"))?;
        return u64::try_from(n)
            .map_err(|_| PyValueError::new_err(format!("size must be at least 0 bytes, got {n}")));
    }
    if let Ok(s) = size.cast::<PyString>() {
        let text = s.to_cow()?;
        return vramd_client::parse_size(&text).map_err(|e| PyValueError::new_err(e.to_string()));
    }
    Err(PyTypeError::new_err(format!(
        "size must be an int of bytes or a string such as \"8GiB\", \"512MiB\" or \"8GB\", not {}",
        size.get_type().name()?
    )))
}

/// A device selector from `None`, `"any"`, an index or a UUID string.
pub(crate) fn device(device: Option<&Bound<'_, PyAny>>) -> PyResult<DeviceSelector> {
    let Some(device) = device.filter(|d| !d.is_none()) else {
        return Ok(DeviceSelector::Any);
    };
    if device.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(
            "device must be None, \"any\", an index or a UUID string, not a bool",
        ));
    }
    if device.is_instance_of::<PyInt>() {
        let i: i128 = device
            .extract()
            .map_err(|_| PyValueError::new_err("device index is too large"))?;
        return u32::try_from(i)
            .map(DeviceSelector::Index)
            .map_err(|_| PyValueError::new_err(format!("invalid device index {i}")));
    }
    if let Ok(s) = device.cast::<PyString>() {
        return s.to_cow()?.parse().map_err(PyValueError::new_err);
    }
    Err(PyTypeError::new_err(format!(
        "device must be None, \"any\", an int index or a UUID string, not {}",
        device.get_type().name()?
    )))
}

/// A duration from seconds; `None` (and infinity) mean no limit.
pub(crate) fn seconds(name: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(s) if s.is_infinite() && s > 0.0 => Ok(None),
        Some(s) => Duration::try_from_secs_f64(s).map(Some).map_err(|_| {
            PyValueError::new_err(format!(
                "{name} must be a number of seconds, at least 0, or None; got {s}"
            ))
        }),
    }
}

/// What a reserve call asks for, validated, plus what the Python objects
/// remember of it.
#[derive(Debug, Clone)]
pub(crate) struct RequestSpec {
    /// The SDK request.
    pub(crate) request: Request,
    /// Bytes requested.
    pub(crate) bytes: u64,
    /// The label, kept for the reservation's `label` attribute.
    pub(crate) label: Option<String>,
    /// The priority, kept for the reservation's `priority` attribute.
    pub(crate) priority: i32,
}

impl RequestSpec {
    /// Validates the arguments of `reserve` / `submit`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        size: &Bound<'_, PyAny>,
        device_arg: Option<&Bound<'_, PyAny>>,
        priority: i32,
        label: Option<String>,
        timeout: Option<f64>,
        evictable: bool,
        for_pids: Option<Vec<u32>>,
    ) -> PyResult<Self> {
        let bytes = size_bytes(size)?;
        let mut request = Request::new(bytes)
            .device(device(device_arg)?)
            .priority(priority)
            .evictable(evictable);
        if let Some(pids) = for_pids {
            request = request.for_pids(pids);
        }
        if let Some(l) = &label {
            request = request.label(l.clone());
        }
        if let Some(t) = seconds("timeout", timeout)? {
            request = request.timeout(t);
        }
        Ok(Self {
            request,
            bytes,
            label,
            priority,
        })
    }
}
