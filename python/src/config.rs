//! `KvRouterConfig`, `RouterConfig` and `RouterMode`: the core's configuration types with
//! Dynamo 1.6.1's Python names and defaults (spec §11).
//!
//! The field list is the core's: `KvRouterConfig`'s serde field names (which are Dynamo's) are
//! read from a serialized default, so a field added to the core is accepted here without a
//! change. Fields of Dynamo's API that kvrouter does not implement are listed in
//! [`UNSUPPORTED`] with the value that means "off": that value is accepted (it is what kvrouter
//! does), any other raises `UnsupportedOption` naming the field. Any other unknown name raises.

use std::sync::OnceLock;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};
use serde_json::{json, Map, Value};

use kvrouter_core::config::{
    KvRouterConfig as CoreKv, LoadThresholds, RouterConfig as CoreRouter, RouterMode as CoreMode,
};

use crate::errors::{new_err, Kind};
use crate::json::{to_json, to_py};

/// A Dynamo `KvRouterConfig` field kvrouter does not implement: its name, the value that means
/// "off" (what kvrouter does), and why.
type Unsupported = (&'static str, fn() -> Value, &'static str);

const UNSUPPORTED: &[Unsupported] = &[
    ("router_replica_sync", || json!(false), "replica sync between router replicas is not implemented"),
    ("router_track_output_blocks", || json!(false), "output blocks are not tracked as active blocks"),
    ("router_approximate_cache_policy", || json!("ttl"), "the approximate index expires blocks by TTL only (no LRU policy)"),
    ("router_event_threads", || json!(4), "KV events are applied by one writer with concurrent lock-light readers; there is no thread count to set"),
    ("use_remote_indexer", || json!(false), "there is no remote indexer"),
    ("serve_indexer", || json!(false), "the index is not served to other routers"),
    ("enable_session_prefix_index", || json!(false), "there is no session prefix index"),
    ("shared_cache_multiplier", || Value::Null, "shared (cluster-wide) caches are not indexed"),
    ("shared_cache_type", || json!("none"), "shared (cluster-wide) caches are not indexed"),
    ("conditional_disagg_enabled", || json!(false), "conditional disaggregation is not implemented"),
    ("conditional_disagg_policy", || json!("isl_bounding"), "conditional disaggregation is not implemented"),
    ("conditional_disagg_eff_isl_threshold", || json!(2048), "conditional disaggregation is not implemented"),
    ("conditional_disagg_eff_isl_ratio_threshold", || json!(0.7), "conditional disaggregation is not implemented"),
    ("conditional_disagg_prefill_busy_threshold", || Value::Null, "conditional disaggregation is not implemented"),
    ("conditional_disagg_decode_busy_threshold", || Value::Null, "conditional disaggregation is not implemented"),
    ("router_policy_config", || Value::Null, "selection is configured by router_selection_policy instead"),
    ("router_prefill_policy", || Value::Null, "selection is configured by router_selection_policy instead"),
    ("router_decode_policy", || Value::Null, "selection is configured by router_selection_policy instead"),
    ("router_tracking_hash", || json!("public-xxh3-v1"), "active blocks are tracked by the public XXH3 hashes only"),
    ("router_tracking_key_file", || Value::Null, "keyed tracking hashes are not implemented"),
    ("router_tracking_key_id", || Value::Null, "keyed tracking hashes are not implemented"),
];

/// The core's default `KvRouterConfig` as a JSON object (its field names and defaults).
fn core_defaults() -> &'static Map<String, Value> {
    static DEFAULTS: OnceLock<Map<String, Value>> = OnceLock::new();
    DEFAULTS.get_or_init(|| match serde_json::to_value(CoreKv::default()) {
        Ok(Value::Object(m)) => m,
        _ => unreachable!("KvRouterConfig serializes to an object"),
    })
}

/// JSON equality with numbers compared by value (`2048 == 2048.0`).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A JSON value as Python would print it (`None`, `True`, `'ttl'`), for messages.
fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => format!("'{s}'"),
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, x)| format!("'{k}': {}", py_repr(x)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Number(n) => n.to_string(),
    }
}

/// Where the fields come from, for messages.
#[derive(Clone, Copy)]
enum Source {
    Kwargs,
    Json,
}

/// `base` with `fields` applied, checked field by field (errors name the field).
fn apply_fields(
    py: Python<'_>,
    base: &CoreKv,
    fields: Vec<(String, Value)>,
    source: Source,
) -> PyResult<CoreKv> {
    let defaults = core_defaults();
    let mut merged = match serde_json::to_value(base) {
        Ok(Value::Object(m)) => m,
        _ => unreachable!("KvRouterConfig serializes to an object"),
    };
    let mut unknown = Vec::new();
    for (name, value) in fields {
        if defaults.contains_key(&name) {
            let mut trial = merged.clone();
            trial.insert(name.clone(), value.clone());
            if let Err(e) = serde_json::from_value::<CoreKv>(Value::Object(trial)) {
                let msg = format!("KvRouterConfig.{name}={}: {e}", py_repr(&value));
                return Err(if e.to_string().starts_with("invalid type") {
                    PyTypeError::new_err(msg)
                } else {
                    PyValueError::new_err(msg)
                });
            }
            merged.insert(name, value);
        } else if let Some((_, off, why)) = UNSUPPORTED.iter().find(|(n, _, _)| *n == name) {
            if !same_value(&value, &off()) {
                return Err(new_err(
                    py,
                    Kind::UnsupportedOption,
                    format!(
                        "KvRouterConfig.{name}={} is not supported by kvrouter: {why} (only {} is accepted)",
                        py_repr(&value),
                        py_repr(&off())
                    ),
                ));
            }
        } else {
            unknown.push(name);
        }
    }
    if !unknown.is_empty() {
        let msg = format!("unknown KvRouterConfig field(s): {}", unknown.join(", "));
        return Err(match source {
            Source::Kwargs => PyTypeError::new_err(msg),
            Source::Json => PyValueError::new_err(msg),
        });
    }
    let cfg: CoreKv = serde_json::from_value(Value::Object(merged))
        .map_err(|e| PyTypeError::new_err(format!("KvRouterConfig: {e}")))?;
    cfg.validate()
        .map_err(|e| PyValueError::new_err(format!("KvRouterConfig.{e}")))?;
    Ok(cfg)
}

fn kwargs_fields(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<(String, Value)>> {
    let Some(kwargs) = kwargs else {
        return Ok(Vec::new());
    };
    kwargs
        .iter()
        .map(|(k, v)| {
            let name: String = k.extract()?;
            let value = to_json(&v, &format!("KvRouterConfig.{name}"))?;
            Ok((name, value))
        })
        .collect()
}

/// KV routing parameters (Dynamo's `KvRouterConfig`): every field of Dynamo 1.6.1 that kvrouter
/// implements, with the same defaults, plus kvrouter's own. Immutable: `with_overrides` returns
/// a changed copy.
#[pyclass(module = "kvrouter._core", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct KvRouterConfig {
    pub inner: CoreKv,
}

impl KvRouterConfig {
    /// One field of the core config, by serde name.
    fn field<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match serde_json::to_value(&self.inner) {
            Ok(Value::Object(m)) => to_py(py, m.get(name).unwrap_or(&Value::Null)),
            _ => Ok(py.None().into_bound(py)),
        }
    }
}

/// The "off" value of an unsupported Dynamo field.
fn off_value<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let value = UNSUPPORTED
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or(Value::Null, |(_, off, _)| off());
    to_py(py, &value)
}

#[pymethods]
impl KvRouterConfig {
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let inner = apply_fields(
            py,
            &CoreKv::default(),
            kwargs_fields(kwargs)?,
            Source::Kwargs,
        )?;
        Ok(Self { inner })
    }

    /// A config from a JSON object of fields (missing ones take their defaults).
    #[classmethod]
    fn from_json(_cls: &Bound<'_, PyType>, py: Python<'_>, json: &str) -> PyResult<Self> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| PyValueError::new_err(format!("KvRouterConfig JSON: {e}")))?;
        let Value::Object(m) = value else {
            return Err(PyValueError::new_err(
                "KvRouterConfig JSON must be an object of fields",
            ));
        };
        let inner = apply_fields(
            py,
            &CoreKv::default(),
            m.into_iter().collect(),
            Source::Json,
        )?;
        Ok(Self { inner })
    }

    /// Every field as JSON (kvrouter's fields; unsupported Dynamo fields are omitted).
    fn to_json(&self) -> String {
        serde_json::to_string(&self.inner).expect("KvRouterConfig serializes")
    }

    /// Every field as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &serde_json::to_value(&self.inner).expect("serializes"))
    }

    /// An equal, independent config.
    fn copy(&self) -> Self {
        self.clone()
    }

    fn __copy__(&self) -> Self {
        self.clone()
    }

    fn __deepcopy__(&self, _memo: &Bound<'_, PyAny>) -> Self {
        self.clone()
    }

    /// A copy with the given fields changed.
    #[pyo3(signature = (**kwargs))]
    fn with_overrides(&self, py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let inner = apply_fields(py, &self.inner, kwargs_fields(kwargs)?, Source::Kwargs)?;
        Ok(Self { inner })
    }

    // Field values (read-only), through the core's serde names.
    #[getter]
    fn overlap_score_weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "overlap_score_weight")
    }

    #[getter]
    fn overlap_score_credit<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "overlap_score_credit")
    }

    #[getter]
    fn overlap_score_credit_decay<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "overlap_score_credit_decay")
    }

    #[getter]
    fn prefill_load_scale<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "prefill_load_scale")
    }

    #[getter]
    fn decode_active_request_weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "decode_active_request_weight")
    }

    #[getter]
    fn host_cache_hit_weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "host_cache_hit_weight")
    }

    #[getter]
    fn disk_cache_hit_weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "disk_cache_hit_weight")
    }

    #[getter]
    fn router_temperature<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_temperature")
    }

    #[getter]
    fn use_kv_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "use_kv_events")
    }

    #[getter]
    fn router_track_active_blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_track_active_blocks")
    }

    #[getter]
    fn router_assume_kv_reuse<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_assume_kv_reuse")
    }

    #[getter]
    fn router_track_prefill_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_track_prefill_tokens")
    }

    #[getter]
    fn router_ttl_secs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_ttl_secs")
    }

    #[getter]
    fn router_max_tree_size<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_max_tree_size")
    }

    #[getter]
    fn router_prune_target_ratio<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_prune_target_ratio")
    }

    #[getter]
    fn router_predicted_ttl_secs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_predicted_ttl_secs")
    }

    #[getter]
    fn router_active_request_expiry_secs<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_active_request_expiry_secs")
    }

    #[getter]
    fn router_selection_policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_selection_policy")
    }

    #[getter]
    fn router_affinity_load_factor<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_affinity_load_factor")
    }

    #[getter]
    fn router_prefill_load_model<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_prefill_load_model")
    }

    #[getter]
    fn router_prefill_time_coefficients<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_prefill_time_coefficients")
    }

    #[getter]
    fn router_queue_threshold<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_queue_threshold")
    }

    #[getter]
    fn router_queue_policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_queue_policy")
    }

    #[getter]
    fn router_queue_limit<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_queue_limit")
    }

    #[getter]
    fn router_overlap_refresh_after_secs<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.field(py, "router_overlap_refresh_after_secs")
    }

    // Dynamo fields kvrouter does not implement: their "off" value, which is in effect.
    #[getter]
    fn router_replica_sync<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_replica_sync")
    }

    #[getter]
    fn router_track_output_blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_track_output_blocks")
    }

    #[getter]
    fn router_approximate_cache_policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_approximate_cache_policy")
    }

    #[getter]
    fn router_event_threads<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_event_threads")
    }

    #[getter]
    fn use_remote_indexer<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "use_remote_indexer")
    }

    #[getter]
    fn serve_indexer<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "serve_indexer")
    }

    #[getter]
    fn enable_session_prefix_index<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "enable_session_prefix_index")
    }

    #[getter]
    fn shared_cache_multiplier<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "shared_cache_multiplier")
    }

    #[getter]
    fn shared_cache_type<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "shared_cache_type")
    }

    #[getter]
    fn conditional_disagg_enabled<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "conditional_disagg_enabled")
    }

    #[getter]
    fn conditional_disagg_policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "conditional_disagg_policy")
    }

    #[getter]
    fn conditional_disagg_eff_isl_threshold<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "conditional_disagg_eff_isl_threshold")
    }

    #[getter]
    fn conditional_disagg_eff_isl_ratio_threshold<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "conditional_disagg_eff_isl_ratio_threshold")
    }

    #[getter]
    fn conditional_disagg_prefill_busy_threshold<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "conditional_disagg_prefill_busy_threshold")
    }

    #[getter]
    fn conditional_disagg_decode_busy_threshold<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "conditional_disagg_decode_busy_threshold")
    }

    #[getter]
    fn router_policy_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_policy_config")
    }

    #[getter]
    fn router_prefill_policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_prefill_policy")
    }

    #[getter]
    fn router_decode_policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_decode_policy")
    }

    #[getter]
    fn router_tracking_hash<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_tracking_hash")
    }

    #[getter]
    fn router_tracking_key_file<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_tracking_key_file")
    }

    #[getter]
    fn router_tracking_key_id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        off_value(py, "router_tracking_key_id")
    }

    fn __repr__(&self) -> String {
        let defaults = core_defaults();
        let changed: Vec<String> = match serde_json::to_value(&self.inner) {
            Ok(Value::Object(m)) => m
                .iter()
                .filter(|(k, v)| defaults.get(*k).is_none_or(|d| !same_value(d, v)))
                .map(|(k, v)| format!("{k}={}", py_repr(v)))
                .collect(),
            _ => Vec::new(),
        };
        format!("KvRouterConfig({})", changed.join(", "))
    }
}

/// How a worker is chosen (Dynamo's `RouterMode`).
#[pyclass(module = "kvrouter._core", frozen, eq, eq_int, hash, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouterMode {
    RoundRobin,
    Random,
    PowerOfTwoChoices,
    #[pyo3(name = "KV")]
    Kv,
    Direct,
    LeastLoaded,
    DeviceAwareWeighted,
}

impl RouterMode {
    pub fn to_core(self) -> CoreMode {
        match self {
            RouterMode::RoundRobin => CoreMode::RoundRobin,
            RouterMode::Random => CoreMode::Random,
            RouterMode::PowerOfTwoChoices => CoreMode::PowerOfTwo,
            RouterMode::Kv => CoreMode::Kv,
            RouterMode::Direct => CoreMode::Direct,
            RouterMode::LeastLoaded => CoreMode::LeastLoaded,
            RouterMode::DeviceAwareWeighted => CoreMode::DeviceAwareWeighted,
        }
    }

    /// The Python name (`KV`, `RoundRobin`, ...).
    fn py_name(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "RoundRobin",
            RouterMode::Random => "Random",
            RouterMode::PowerOfTwoChoices => "PowerOfTwoChoices",
            RouterMode::Kv => "KV",
            RouterMode::Direct => "Direct",
            RouterMode::LeastLoaded => "LeastLoaded",
            RouterMode::DeviceAwareWeighted => "DeviceAwareWeighted",
        }
    }

    fn from_core(m: CoreMode) -> Self {
        match m {
            CoreMode::RoundRobin => RouterMode::RoundRobin,
            CoreMode::Random => RouterMode::Random,
            CoreMode::PowerOfTwo => RouterMode::PowerOfTwoChoices,
            CoreMode::Kv => RouterMode::Kv,
            CoreMode::Direct => RouterMode::Direct,
            CoreMode::LeastLoaded => RouterMode::LeastLoaded,
            CoreMode::DeviceAwareWeighted => RouterMode::DeviceAwareWeighted,
        }
    }
}

#[pymethods]
impl RouterMode {
    /// The mode from its CLI name (`"kv"`, `"round-robin"`, `"power-of-two"`, ...; as
    /// `--router-mode` and `DYN_ROUTER_MODE` accept).
    #[staticmethod]
    fn from_str(name: &str) -> PyResult<Self> {
        name.parse::<CoreMode>()
            .map(Self::from_core)
            .map_err(PyValueError::new_err)
    }

    /// The CLI name (`"kv"`, `"round-robin"`, ...).
    fn __str__(&self) -> &'static str {
        self.to_core().as_str()
    }
}

/// Everything the selector needs (Dynamo's `RouterConfig`): the mode, the KV parameters and the
/// busy thresholds.
#[pyclass(module = "kvrouter._core", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct RouterConfig {
    pub inner: CoreRouter,
}

#[pymethods]
impl RouterConfig {
    #[new]
    #[pyo3(signature = (
        mode=RouterMode::RoundRobin,
        config=None,
        active_decode_blocks_threshold=None,
        active_prefill_tokens_threshold=None,
        active_prefill_tokens_threshold_frac=None,
        enforce_disagg=false,
        session_affinity_ttl_secs=None,
        session_affinity_mode="hard",
        *,
        device_ratio=8.0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        mode: RouterMode,
        config: Option<PyRef<'_, KvRouterConfig>>,
        active_decode_blocks_threshold: Option<f64>,
        active_prefill_tokens_threshold: Option<u64>,
        active_prefill_tokens_threshold_frac: Option<f64>,
        enforce_disagg: bool,
        session_affinity_ttl_secs: Option<f64>,
        session_affinity_mode: &str,
        device_ratio: f64,
    ) -> PyResult<Self> {
        let unsupported = |name: &str, value: String, why: &str, off: &str| {
            new_err(
                py,
                Kind::UnsupportedOption,
                format!("RouterConfig.{name}={value} is not supported by kvrouter: {why} (only {off} is accepted)"),
            )
        };
        if enforce_disagg {
            return Err(unsupported(
                "enforce_disagg",
                "True".into(),
                "disaggregated serving is configured on the frontend",
                "False",
            ));
        }
        if let Some(v) = session_affinity_ttl_secs {
            return Err(unsupported(
                "session_affinity_ttl_secs",
                v.to_string(),
                "session affinity is not implemented",
                "None",
            ));
        }
        if session_affinity_mode != "hard" {
            return Err(unsupported(
                "session_affinity_mode",
                format!("{session_affinity_mode:?}"),
                "session affinity is not implemented",
                "\"hard\"",
            ));
        }
        let check = |name: &str, v: Option<f64>, max: f64| -> PyResult<()> {
            match v {
                Some(x) if !x.is_finite() || x < 0.0 || x > max => Err(PyValueError::new_err(
                    format!("RouterConfig.{name} must be in [0, {max}] (got {x})"),
                )),
                _ => Ok(()),
            }
        };
        check(
            "active_decode_blocks_threshold",
            active_decode_blocks_threshold,
            1.0,
        )?;
        check(
            "active_prefill_tokens_threshold_frac",
            active_prefill_tokens_threshold_frac,
            f64::MAX,
        )?;
        check("device_ratio", Some(device_ratio), f64::MAX)?;
        Ok(Self {
            inner: CoreRouter {
                mode: mode.to_core(),
                kv: config.map(|c| c.inner.clone()).unwrap_or_default(),
                thresholds: LoadThresholds {
                    active_decode_blocks_threshold,
                    active_prefill_tokens_threshold,
                    active_prefill_tokens_threshold_frac,
                },
                device_ratio,
            },
        })
    }

    #[getter]
    fn mode(&self) -> RouterMode {
        RouterMode::from_core(self.inner.mode)
    }

    /// The KV routing parameters (a copy).
    #[getter]
    fn config(&self) -> KvRouterConfig {
        KvRouterConfig {
            inner: self.inner.kv.clone(),
        }
    }

    #[getter]
    fn active_decode_blocks_threshold(&self) -> Option<f64> {
        self.inner.thresholds.active_decode_blocks_threshold
    }

    #[getter]
    fn active_prefill_tokens_threshold(&self) -> Option<u64> {
        self.inner.thresholds.active_prefill_tokens_threshold
    }

    #[getter]
    fn active_prefill_tokens_threshold_frac(&self) -> Option<f64> {
        self.inner.thresholds.active_prefill_tokens_threshold_frac
    }

    #[getter]
    fn enforce_disagg(&self) -> bool {
        false
    }

    #[getter]
    fn session_affinity_ttl_secs(&self) -> Option<f64> {
        None
    }

    #[getter]
    fn session_affinity_mode(&self) -> &'static str {
        "hard"
    }

    #[getter]
    fn device_ratio(&self) -> f64 {
        self.inner.device_ratio
    }

    fn copy(&self) -> Self {
        self.clone()
    }

    fn __repr__(&self) -> String {
        let t = &self.inner.thresholds;
        let kv = KvRouterConfig {
            inner: self.inner.kv.clone(),
        };
        format!(
            "RouterConfig(mode=RouterMode.{}, config={}, active_decode_blocks_threshold={}, active_prefill_tokens_threshold={}, active_prefill_tokens_threshold_frac={}, device_ratio={:?})",
            RouterMode::from_core(self.inner.mode).py_name(),
            kv.__repr__(),
            opt(t.active_decode_blocks_threshold),
            opt(t.active_prefill_tokens_threshold),
            opt(t.active_prefill_tokens_threshold_frac),
            self.inner.device_ratio
        )
    }
}

/// `None` or the value, as Python prints it.
fn opt<T: std::fmt::Debug>(v: Option<T>) -> String {
    v.map_or_else(|| "None".into(), |x| format!("{x:?}"))
}
