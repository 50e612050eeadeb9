//! A local Batch-compatible server: serves `/{version}/profiles/update`,
//! `/{version}/profiles/mass-update` and the Audience API (`audiences/create`, `update`, `list`,
//! `view`), enforces the documented rules (auth, operation counts, names, value types, 50
//! attributes, rate limits in profiles per second, one Audience API request per second), keeps
//! profile and custom-audience state, answers partial errors as Batch does, and can be told to fail
//! a share of requests. Tests and the demo talk to it; `engage-sync emulator` serves it on its own.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use super::client::Endpoint;
use super::limits::*;

/// Who the emulator accepts and how strict it is about rates.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub project_key: String,
    pub rest_api_key: String,
    /// Answer 429 beyond Batch's rates (on by default; the real service does).
    pub enforce_rate_limits: bool,
    pub update_rate_per_second: u32,
    pub update_burst: u32,
    pub mass_update_rate_per_second: u32,
    /// Keep every accepted operation for inspection (tests); off for large benchmarks.
    pub record_operations: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            project_key: "demo-project".to_owned(),
            rest_api_key: "demo-rest-api-key".to_owned(),
            enforce_rate_limits: true,
            update_rate_per_second: UPDATE_RATE_PER_SECOND,
            update_burst: UPDATE_BURST,
            mass_update_rate_per_second: MASS_UPDATE_RATE_PER_SECOND,
            record_operations: true,
        }
    }
}

/// Failures to inject, for tests of retries and rejections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Share of requests answered 500 before anything is applied.
    pub fail_500: f64,
    /// Share of requests answered 429 before anything is applied.
    pub fail_429: f64,
    /// Share of requests applied and then answered 500 (a lost acknowledgement).
    pub fail_after_apply: f64,
    /// A request holding one of these custom_ids is refused with 400.
    pub refuse_custom_ids: HashSet<String>,
    /// Every attribute sent for these custom_ids is dropped with a partial error.
    pub drop_attributes_of: HashSet<String>,
    /// Seed for the failure rolls, so a test sees the same sequence of answers every run.
    pub seed: Option<u64>,
}

/// One profile as the emulator holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Profile {
    pub attributes: Map<String, Value>,
    pub events: Vec<Value>,
}

/// An accepted operation, as recorded when `record_operations` is on.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedOperation {
    pub endpoint: &'static str,
    pub custom_id: String,
    pub attributes: Map<String, Value>,
    pub events: Vec<Value>,
}

/// One id's change in a custom audience, as recorded when `record_operations` is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedListChange {
    pub audience: String,
    pub action: String,
    pub id: String,
}

/// A custom audience as the emulator holds it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CustomAudience {
    pub display_name: String,
    pub ids: BTreeSet<String>,
}

/// Counters by endpoint and answer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EmulatorStats {
    pub requests: BTreeMap<String, u64>,
    pub accepted_operations: BTreeMap<String, u64>,
    pub statuses: BTreeMap<u16, u64>,
    pub partial_errors: u64,
}

/// A brief account of the emulator's state, for the demo and `GET /_emulator/summary`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub profiles: usize,
    /// Per attribute name: how many profiles hold each value (for booleans) or any value.
    pub attributes: BTreeMap<String, BTreeMap<String, u64>>,
    pub stats: EmulatorStats,
}

struct Inner {
    profiles: HashMap<String, Profile>,
    audiences: BTreeMap<String, CustomAudience>,
    recorded: Vec<RecordedOperation>,
    recorded_list_changes: Vec<RecordedListChange>,
    stats: EmulatorStats,
    faults: Faults,
    rng: fastrand::Rng,
}

impl Inner {
    fn set_faults(&mut self, faults: Faults) {
        self.rng = faults
            .seed
            .map(fastrand::Rng::with_seed)
            .unwrap_or_default();
        self.faults = faults;
    }

    /// Three rolls per request, drawn together so each request's fate depends only on its rank.
    fn roll(&mut self) -> [f64; 3] {
        [self.rng.f64(), self.rng.f64(), self.rng.f64()]
    }
}

struct Shared {
    config: EmulatorConfig,
    update_limiter: DefaultDirectRateLimiter,
    mass_update_limiter: DefaultDirectRateLimiter,
    audience_limiter: DefaultDirectRateLimiter,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running emulator; dropping it stops the server.
pub struct Emulator {
    address: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Emulator {
    /// Binds `address` (port 0 for any free port) and serves in the background.
    pub async fn start(config: EmulatorConfig, address: SocketAddr) -> std::io::Result<Self> {
        let limiter = |per_second: u32, burst: u32| {
            RateLimiter::direct(
                Quota::per_second(NonZeroU32::new(per_second.max(1)).expect("positive"))
                    .allow_burst(NonZeroU32::new(burst.max(1)).expect("positive")),
            )
        };
        let shared = Arc::new(Shared {
            update_limiter: limiter(config.update_rate_per_second, config.update_burst),
            mass_update_limiter: limiter(
                config.mass_update_rate_per_second,
                config.mass_update_rate_per_second,
            ),
            audience_limiter: limiter(AUDIENCE_REQUESTS_PER_SECOND, 1),
            config,
            inner: Mutex::new(Inner {
                profiles: HashMap::new(),
                audiences: BTreeMap::new(),
                recorded: Vec::new(),
                recorded_list_changes: Vec::new(),
                stats: EmulatorStats::default(),
                faults: Faults::default(),
                rng: fastrand::Rng::new(),
            }),
        });
        let router = Router::new()
            .route("/{version}/profiles/update", post(profiles_update))
            .route(
                "/{version}/profiles/mass-update",
                post(profiles_mass_update),
            )
            .route("/{version}/audiences/create", post(audiences_create))
            .route("/{version}/audiences/update", post(audiences_update))
            .route("/{version}/audiences/list", get(audiences_list))
            .route("/{version}/audiences/view", get(audiences_view))
            .route("/_emulator/summary", get(summary))
            .route("/_emulator/profiles/{custom_id}", get(profile))
            .route("/_emulator/faults", post(set_faults))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            address,
            shared,
            shutdown: Some(shutdown),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The base URL to put in `[batch] api_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn config(&self) -> &EmulatorConfig {
        &self.shared.config
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().set_faults(faults);
    }

    pub fn profile(&self, custom_id: &str) -> Option<Profile> {
        self.shared.lock().profiles.get(custom_id).cloned()
    }

    /// Custom ids whose profile holds `attribute` with exactly `value`, sorted.
    pub fn custom_ids_with(&self, attribute: &str, value: &Value) -> Vec<String> {
        let inner = self.shared.lock();
        let mut ids: Vec<String> = inner
            .profiles
            .iter()
            .filter(|(_, profile)| profile.attributes.get(attribute) == Some(value))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Operations accepted so far (when recording is on).
    pub fn recorded(&self) -> Vec<RecordedOperation> {
        self.shared.lock().recorded.clone()
    }

    /// Forgets every profile, as if Batch lost its data (for backfill tests and trials).
    pub fn clear_profiles(&self) {
        self.shared.lock().profiles.clear();
    }

    pub fn clear_recorded(&self) {
        let mut inner = self.shared.lock();
        inner.recorded.clear();
        inner.recorded_list_changes.clear();
    }

    /// The ids of a custom audience, sorted; `None` when it was never created.
    pub fn audience_members(&self, name: &str) -> Option<Vec<String>> {
        self.shared
            .lock()
            .audiences
            .get(name)
            .map(|audience| audience.ids.iter().cloned().collect())
    }

    /// Custom-audience changes accepted so far (when recording is on).
    pub fn recorded_list_changes(&self) -> Vec<RecordedListChange> {
        self.shared.lock().recorded_list_changes.clone()
    }

    pub fn stats(&self) -> EmulatorStats {
        self.shared.lock().stats.clone()
    }

    pub fn summary(&self) -> Summary {
        summarize(&self.shared.lock())
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn summarize(inner: &Inner) -> Summary {
    let mut attributes: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for profile in inner.profiles.values() {
        for (name, value) in &profile.attributes {
            let bucket = match value {
                Value::Bool(flag) => flag.to_string(),
                _ => "set".to_owned(),
            };
            *attributes
                .entry(name.clone())
                .or_default()
                .entry(bucket)
                .or_default() += 1;
        }
    }
    Summary {
        profiles: inner.profiles.len(),
        attributes,
        stats: inner.stats.clone(),
    }
}

async fn summary(State(shared): State<Arc<Shared>>) -> Json<Summary> {
    Json(summarize(&shared.lock()))
}

async fn profile(State(shared): State<Arc<Shared>>, Path(custom_id): Path<String>) -> Response {
    match shared.lock().profiles.get(&custom_id) {
        Some(profile) => Json(profile.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such profile"),
    }
}

async fn set_faults(State(shared): State<Arc<Shared>>, Json(faults): Json<Faults>) -> StatusCode {
    shared.lock().set_faults(faults);
    StatusCode::NO_CONTENT
}

async fn profiles_update(
    State(shared): State<Arc<Shared>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    handle(&shared, Endpoint::Update, &version, &headers, &body)
}

async fn profiles_mass_update(
    State(shared): State<Arc<Shared>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    handle(&shared, Endpoint::MassUpdate, &version, &headers, &body)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error_code": code, "error_message": message})),
    )
        .into_response()
}

fn handle(
    shared: &Shared,
    endpoint: Endpoint,
    version: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let response = answer(shared, endpoint, version, headers, body);
    let mut inner = shared.lock();
    *inner
        .stats
        .requests
        .entry(endpoint.path().to_owned())
        .or_default() += 1;
    *inner
        .stats
        .statuses
        .entry(response.status().as_u16())
        .or_default() += 1;
    response
}

/// The checks every endpoint makes first: a well-formed API version and both keys. Returns the
/// refusal, if any.
fn authenticate(shared: &Shared, version: &str, headers: &HeaderMap) -> Option<Response> {
    let well_formed_version = version.split_once('.').is_some_and(|(major, minor)| {
        !major.is_empty()
            && !minor.is_empty()
            && major.chars().all(|c| c.is_ascii_digit())
            && minor.chars().all(|c| c.is_ascii_digit())
    });
    if !well_formed_version {
        return Some(error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "unknown API version",
        ));
    }
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let expected_bearer = format!("Bearer {}", shared.config.rest_api_key);
    if header("authorization") != Some(expected_bearer.as_str())
        || header("x-batch-project") != Some(shared.config.project_key.as_str())
    {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "AUTHENTICATION_INVALID",
            "the REST API key or the project key is not valid",
        ));
    }
    None
}

fn answer(
    shared: &Shared,
    endpoint: Endpoint,
    version: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if let Some(refusal) = authenticate(shared, version, headers) {
        return refusal;
    }

    let (faults, [roll_500, roll_429, roll_after]) = {
        let mut inner = shared.lock();
        (inner.faults.clone(), inner.roll())
    };
    if roll_500 < faults.fail_500 {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "SERVER_ERROR",
            "unexpected error (injected)",
        );
    }
    if roll_429 < faults.fail_429 {
        return too_many_requests();
    }
    let response = match endpoint {
        Endpoint::Update | Endpoint::MassUpdate => answer_profiles(shared, endpoint, body, &faults),
        Endpoint::AudiencesCreate => answer_audiences_create(shared, body),
        Endpoint::AudiencesUpdate => answer_audiences_update(shared, body),
    };
    if response.status().is_success() && roll_after < faults.fail_after_apply {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "SERVER_ERROR",
            "unexpected error after applying (injected)",
        );
    }
    response
}

/// `/profiles/update` and `/profiles/mass-update`, past authentication and injected faults.
fn answer_profiles(shared: &Shared, endpoint: Endpoint, body: &[u8], faults: &Faults) -> Response {
    let operations = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(operations)) => operations,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "the body must be a JSON array of operations",
            )
        }
        Err(parse) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!("the body is not valid JSON: {parse}"),
            )
        }
    };
    let max = match endpoint {
        Endpoint::MassUpdate => MASS_UPDATE_MAX_OPERATIONS,
        _ => UPDATE_MAX_OPERATIONS,
    };
    if operations.is_empty() || operations.len() > max {
        return error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            &format!(
                "a call holds 1 to {max} operations, not {}",
                operations.len()
            ),
        );
    }

    let mut custom_ids = Vec::with_capacity(operations.len());
    for (index, operation) in operations.iter().enumerate() {
        match check_structure(endpoint, operation) {
            Ok(custom_id) => {
                if faults.refuse_custom_ids.contains(&custom_id) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BAD_REQUEST",
                        &format!("bulk_index {index}: this profile is refused (injected)"),
                    );
                }
                custom_ids.push(custom_id);
            }
            Err(reason) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    &format!("bulk_index {index}: {reason}"),
                );
            }
        }
    }

    if shared.config.enforce_rate_limits {
        let limiter = match endpoint {
            Endpoint::MassUpdate => &shared.mass_update_limiter,
            _ => &shared.update_limiter,
        };
        let count = NonZeroU32::new(operations.len() as u32).expect("not empty");
        if !matches!(limiter.check_n(count), Ok(Ok(()))) {
            return too_many_requests();
        }
    }

    let mut partial_errors = Vec::new();
    let mut inner = shared.lock();
    for (index, (operation, custom_id)) in operations.iter().zip(custom_ids).enumerate() {
        let mut accepted_attributes = Map::new();
        if let Some(attributes) = operation.get("attributes").and_then(Value::as_object) {
            for (name, value) in attributes {
                let verdict = if faults.drop_attributes_of.contains(&custom_id) {
                    Err("this attribute is refused (injected)".to_owned())
                } else {
                    check_attribute(name, value)
                };
                match verdict {
                    Ok(()) => {
                        accepted_attributes.insert(name.clone(), value.clone());
                    }
                    Err(reason) => partial_errors.push(json!({
                        "category": "attribute", "bulk_index": index,
                        "attribute": name, "reason": reason,
                    })),
                }
            }
        }
        let mut accepted_events = Vec::new();
        if let Some(events) = operation.get("events").and_then(Value::as_array) {
            for (event_index, event) in events.iter().enumerate() {
                match check_event(event, chrono::Utc::now()) {
                    Ok(()) => accepted_events.push(event.clone()),
                    Err(reason) => partial_errors.push(json!({
                        "category": "event", "bulk_index": index,
                        "reason": format!("event {event_index}: {reason}"),
                    })),
                }
            }
        }
        let profile = inner.profiles.entry(custom_id.clone()).or_default();
        for (name, value) in &accepted_attributes {
            apply_attribute(&mut profile.attributes, name, value);
        }
        profile.events.extend(accepted_events.iter().cloned());
        if shared.config.record_operations {
            inner.recorded.push(RecordedOperation {
                endpoint: endpoint.path(),
                custom_id,
                attributes: accepted_attributes,
                events: accepted_events,
            });
        }
    }
    *inner
        .stats
        .accepted_operations
        .entry(endpoint.path().to_owned())
        .or_default() += operations.len() as u64;
    inner.stats.partial_errors += partial_errors.len() as u64;
    drop(inner);

    let body = if partial_errors.is_empty() {
        json!({"code": "SUCCESS"})
    } else {
        json!({"code": "SUCCESS_WITH_PARTIAL_ERRORS", "errors": partial_errors})
    };
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

async fn audiences_create(
    State(shared): State<Arc<Shared>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    handle(
        &shared,
        Endpoint::AudiencesCreate,
        &version,
        &headers,
        &body,
    )
}

async fn audiences_update(
    State(shared): State<Arc<Shared>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    handle(
        &shared,
        Endpoint::AudiencesUpdate,
        &version,
        &headers,
        &body,
    )
}

/// Audience names: letters, digits, `_` and `-`, case-sensitive.
fn is_audience_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= MAX_AUDIENCE_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The Audience API shares one request budget across its endpoints.
fn audience_rate_limited(shared: &Shared) -> bool {
    shared.config.enforce_rate_limits && shared.audience_limiter.check().is_err()
}

fn answer_audiences_create(shared: &Shared, body: &[u8]) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Create {
        name: String,
        #[serde(default)]
        display_name: Option<String>,
        #[serde(rename = "type")]
        kind: String,
    }
    let create: Create = match serde_json::from_slice(body) {
        Ok(create) => create,
        Err(parse) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!("the body is not a valid audience: {parse}"),
            )
        }
    };
    if !is_audience_name(&create.name) {
        return error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "name must be 1 to 255 letters, digits, _ or -",
        );
    }
    if create.kind != "custom_ids" {
        return error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "type must be \"custom_ids\"",
        );
    }
    if audience_rate_limited(shared) {
        return too_many_requests();
    }
    let mut inner = shared.lock();
    if inner.audiences.contains_key(&create.name) {
        return error(
            StatusCode::CONFLICT,
            "AUDIENCE_ALREADY_EXISTS",
            "an audience with this name exists",
        );
    }
    inner.audiences.insert(
        create.name.clone(),
        CustomAudience {
            display_name: create.display_name.unwrap_or_else(|| create.name.clone()),
            ids: BTreeSet::new(),
        },
    );
    (StatusCode::OK, Json(json!({"name": create.name}))).into_response()
}

fn answer_audiences_update(shared: &Shared, body: &[u8]) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Update {
        name: String,
        ids: Vec<IdChange>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct IdChange {
        action: String,
        id: String,
        #[serde(default)]
        #[allow(dead_code)]
        attributes: Option<Map<String, Value>>,
    }
    let update: Update = match serde_json::from_slice(body) {
        Ok(update) => update,
        Err(parse) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!("the body is not a valid audience update: {parse}"),
            )
        }
    };
    if update.ids.is_empty() || update.ids.len() > AUDIENCE_UPDATE_MAX_IDS {
        return error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            &format!(
                "a call holds 1 to {AUDIENCE_UPDATE_MAX_IDS} ids, not {}",
                update.ids.len()
            ),
        );
    }
    for (index, change) in update.ids.iter().enumerate() {
        if !matches!(change.action.as_str(), "add" | "remove") {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!("ids[{index}]: action must be \"add\" or \"remove\""),
            );
        }
        if change.id.is_empty() || change.id.chars().count() > MAX_CUSTOM_ID_CHARS {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!("ids[{index}]: id must be 1 to {MAX_CUSTOM_ID_CHARS} characters"),
            );
        }
    }
    if audience_rate_limited(shared) {
        return too_many_requests();
    }
    let mut inner = shared.lock();
    let record = shared.config.record_operations;
    let Inner {
        audiences,
        recorded_list_changes,
        ..
    } = &mut *inner;
    let Some(audience) = audiences.get_mut(&update.name) else {
        return error(
            StatusCode::BAD_REQUEST,
            "AUDIENCE_NOT_FOUND",
            &format!("no audience named {:?}; create it first", update.name),
        );
    };
    // Applied in order, so the last action for an id in one call wins.
    for change in update.ids {
        if change.action == "add" {
            audience.ids.insert(change.id.clone());
        } else {
            audience.ids.remove(&change.id);
        }
        if record {
            recorded_list_changes.push(RecordedListChange {
                audience: update.name.clone(),
                action: change.action,
                id: change.id,
            });
        }
    }
    (StatusCode::ACCEPTED, Json(json!({"code": "SUCCESS"}))).into_response()
}

#[derive(Deserialize)]
struct ViewQuery {
    name: String,
}

async fn audiences_list(
    State(shared): State<Arc<Shared>>,
    Path(version): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = authenticate(&shared, &version, &headers) {
        return refusal;
    }
    let inner = shared.lock();
    let audiences: Vec<Value> = inner
        .audiences
        .iter()
        .map(|(name, audience)| {
            json!({"name": name, "display_name": audience.display_name, "size": audience.ids.len()})
        })
        .collect();
    Json(json!({"audiences": audiences})).into_response()
}

async fn audiences_view(
    State(shared): State<Arc<Shared>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(query): Query<ViewQuery>,
) -> Response {
    if let Some(refusal) = authenticate(&shared, &version, &headers) {
        return refusal;
    }
    match shared.lock().audiences.get(&query.name) {
        Some(audience) => Json(json!({
            "name": query.name,
            "display_name": audience.display_name,
            "size": audience.ids.len(),
            "indexing_state": "INDEXED",
        }))
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "AUDIENCE_NOT_FOUND",
            "no such audience",
        ),
    }
}

fn too_many_requests() -> Response {
    error(
        StatusCode::TOO_MANY_REQUESTS,
        "TOO_MANY_REQUESTS",
        "too many requests, wait a few seconds before retrying",
    )
}

/// Rules that make a whole call malformed (400): the identifiers, the attribute and event counts.
fn check_structure(endpoint: Endpoint, operation: &Value) -> Result<String, String> {
    let operation = operation
        .as_object()
        .ok_or("an operation must be an object")?;
    if let Some(unknown) = operation
        .keys()
        .find(|key| !matches!(key.as_str(), "identifiers" | "attributes" | "events"))
    {
        return Err(format!("unknown field {unknown:?}"));
    }
    let identifiers = operation
        .get("identifiers")
        .and_then(Value::as_object)
        .ok_or("identifiers is missing")?;
    if identifiers.len() != 1 {
        return Err("identifiers must hold exactly one of custom_id or installation".to_owned());
    }
    let custom_id = match (
        identifiers.get("custom_id"),
        identifiers.get("installation"),
    ) {
        (Some(Value::String(id)), None) => {
            if id.is_empty() || id.chars().count() > MAX_CUSTOM_ID_CHARS {
                return Err(format!(
                    "custom_id must be 1 to {MAX_CUSTOM_ID_CHARS} characters"
                ));
            }
            id.clone()
        }
        (None, Some(Value::String(installation))) if !installation.is_empty() => {
            format!("installation:{installation}")
        }
        _ => {
            return Err(
                "identifiers must hold exactly one of custom_id or installation, as a string"
                    .to_owned(),
            )
        }
    };
    match operation.get("attributes") {
        None => {}
        Some(Value::Object(attributes)) => {
            if attributes.is_empty() {
                return Err("attributes is empty; leave it out".to_owned());
            }
            if attributes.len() > MAX_ATTRIBUTES_PER_OPERATION {
                return Err(format!(
                    "{} attributes; at most {MAX_ATTRIBUTES_PER_OPERATION} per operation",
                    attributes.len()
                ));
            }
        }
        Some(_) => return Err("attributes must be an object".to_owned()),
    }
    match operation.get("events") {
        None => {}
        Some(Value::Array(events)) => {
            if endpoint == Endpoint::MassUpdate && !events.is_empty() {
                return Err("events go through /profiles/update, not mass-update".to_owned());
            }
            if events.len() > MAX_EVENTS_PER_OPERATION {
                return Err(format!(
                    "{} events; at most {MAX_EVENTS_PER_OPERATION} per operation",
                    events.len()
                ));
            }
        }
        Some(_) => return Err("events must be an array".to_owned()),
    }
    Ok(custom_id)
}

fn is_custom_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= MAX_ATTRIBUTE_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Rules for one profile attribute; a failure drops that attribute with a partial error.
pub fn check_attribute(name: &str, value: &Value) -> Result<(), String> {
    if let Some(native) = name.strip_prefix('$') {
        if !NATIVE_ATTRIBUTES.contains(&name) {
            return Err(format!("unknown native attribute ${native}"));
        }
        return check_native(name, value);
    }
    if let Some((kind, inner)) = name.strip_suffix(')').and_then(|rest| rest.split_once('(')) {
        if !is_custom_name(inner) {
            return Err(format!(
                "attribute name {inner:?} must match [a-z0-9_]{{1,30}}"
            ));
        }
        return match (kind, value) {
            (_, Value::Null) => Ok(()),
            ("date", Value::String(text)) => chrono::DateTime::parse_from_rfc3339(text)
                .map(|_| ())
                .map_err(|_| format!("{text:?} is not an ISO-8601 date")),
            ("url", Value::String(text)) => {
                if text.chars().count() > MAX_URL_CHARS {
                    Err(format!("a URL holds at most {MAX_URL_CHARS} characters"))
                } else if !(text.starts_with("http://") || text.starts_with("https://")) {
                    Err("a URL must start with http:// or https://".to_owned())
                } else {
                    Ok(())
                }
            }
            ("date" | "url", _) => Err(format!("{kind}() takes a string")),
            _ => Err(format!("unknown attribute type {kind}()")),
        };
    }
    if !is_custom_name(name) {
        return Err(format!(
            "attribute name {name:?} must match [a-z0-9_]{{1,30}}"
        ));
    }
    check_custom_value(value)
}

fn check_custom_value(value: &Value) -> Result<(), String> {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
        Value::String(text) => check_string(text),
        Value::Array(items) => check_string_array(items),
        Value::Object(edit) => {
            // Partial edit of a string array: {"$add": […], "$remove": […]}.
            if edit.is_empty() || edit.keys().any(|key| key != "$add" && key != "$remove") {
                return Err("nested objects are not attribute values".to_owned());
            }
            for items in edit.values() {
                match items {
                    Value::Array(items) => check_string_array(items)?,
                    _ => return Err("$add and $remove take arrays of strings".to_owned()),
                }
            }
            Ok(())
        }
    }
}

fn check_string(text: &str) -> Result<(), String> {
    let length = text.chars().count();
    if length == 0 {
        Err("a string value must not be empty".to_owned())
    } else if length > MAX_STRING_VALUE_CHARS {
        Err(format!(
            "a string value holds at most {MAX_STRING_VALUE_CHARS} characters, not {length}"
        ))
    } else {
        Ok(())
    }
}

fn check_string_array(items: &[Value]) -> Result<(), String> {
    if items.len() > MAX_ARRAY_ITEMS {
        return Err(format!(
            "an array holds at most {MAX_ARRAY_ITEMS} items, not {}",
            items.len()
        ));
    }
    for item in items {
        match item {
            Value::String(text) => check_string(text)?,
            _ => return Err("arrays hold only strings".to_owned()),
        }
    }
    Ok(())
}

fn check_native(name: &str, value: &Value) -> Result<(), String> {
    let Value::String(text) = value else {
        return if value.is_null() {
            Ok(())
        } else {
            Err(format!("{name} takes a string or null"))
        };
    };
    let ok = match name {
        "$email_address" => text.contains('@') && text.chars().count() <= MAX_STRING_VALUE_CHARS,
        "$email_marketing" | "$sms_marketing" => text == "subscribed" || text == "unsubscribed",
        "$phone_number" => {
            let digits = text.strip_prefix('+').unwrap_or("");
            (2..=15).contains(&digits.len())
                && digits.chars().all(|c| c.is_ascii_digit())
                && !digits.starts_with('0')
        }
        "$language" => text.len() == 2 && text.chars().all(|c| c.is_ascii_lowercase()),
        "$region" => text.len() == 2 && text.chars().all(|c| c.is_ascii_uppercase()),
        "$timezone" => text.parse::<chrono_tz::Tz>().is_ok(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{text:?} is not a valid {name}"))
    }
}

/// Rules for one event; a failure drops that event with a partial error.
pub fn check_event(event: &Value, now: chrono::DateTime<chrono::Utc>) -> Result<(), String> {
    let event = event.as_object().ok_or("an event must be an object")?;
    let name = event
        .get("name")
        .and_then(Value::as_str)
        .ok_or("an event needs a name")?;
    if !is_custom_name(name) {
        return Err(format!("event name {name:?} must match [a-z0-9_]{{1,30}}"));
    }
    let size = serde_json::to_vec(event)
        .map(|bytes| bytes.len())
        .unwrap_or(0);
    if size > MAX_EVENT_BYTES {
        return Err(format!(
            "an event holds at most {MAX_EVENT_BYTES} bytes, not {size}"
        ));
    }
    if let Some(time) = event.get("time") {
        let text = time.as_str().ok_or("time must be an RFC 3339 string")?;
        let when = chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|_| format!("time {text:?} is not RFC 3339"))?
            .with_timezone(&chrono::Utc);
        let age = now - when;
        if age > chrono::Duration::from_std(MAX_EVENT_AGE).expect("fits") {
            return Err("events older than 24 hours are refused".to_owned());
        }
        if age < -chrono::Duration::seconds(60) {
            return Err("events in the future are refused".to_owned());
        }
    }
    if let Some(attributes) = event.get("attributes") {
        let attributes = attributes
            .as_object()
            .ok_or("event attributes must be an object")?;
        for (key, value) in attributes {
            match key.as_str() {
                "$label" => {
                    if !value.is_string() {
                        return Err("$label takes a string".to_owned());
                    }
                }
                "$tags" => match value {
                    Value::Array(items) => check_string_array(items)?,
                    _ => return Err("$tags takes an array of strings".to_owned()),
                },
                typed if typed.ends_with(')') && typed.contains('(') => {
                    // date(…) and url(…) are typed event attributes, as on profiles.
                    check_attribute(typed, value)
                        .map_err(|reason| format!("event attribute {typed}: {reason}"))?;
                }
                other if !is_custom_name(other) => {
                    return Err(format!(
                        "event attribute name {other:?} must match [a-z0-9_]{{1,30}}"
                    ))
                }
                _ => {
                    if let Value::String(text) = value {
                        check_string(text)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn apply_attribute(attributes: &mut Map<String, Value>, name: &str, value: &Value) {
    match value {
        Value::Null => {
            attributes.remove(name);
        }
        Value::Object(edit) => {
            let mut items: Vec<Value> = attributes
                .get(name)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if let Some(Value::Array(added)) = edit.get("$add") {
                for item in added {
                    if !items.contains(item) {
                        items.push(item.clone());
                    }
                }
            }
            if let Some(Value::Array(removed)) = edit.get("$remove") {
                items.retain(|item| !removed.contains(item));
            }
            attributes.insert(name.to_owned(), Value::Array(items));
        }
        other => {
            attributes.insert(name.to_owned(), other.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_rules_follow_batch() {
        assert!(check_attribute("plan", &json!("premium")).is_ok());
        assert!(check_attribute("logins", &json!(59)).is_ok());
        assert!(check_attribute("tags", &json!(["a", "b"])).is_ok());
        assert!(check_attribute("gone", &Value::Null).is_ok());
        assert!(check_attribute("Plan", &json!("x")).is_err());
        assert!(check_attribute(&"a".repeat(31), &json!(true)).is_err());
        assert!(check_attribute("plan", &json!("")).is_err());
        assert!(check_attribute("plan", &json!("x".repeat(301))).is_err());
        assert!(check_attribute("tags", &json!(vec!["t"; 26])).is_err());
        assert!(check_attribute("tags", &json!([1, 2])).is_err());
        assert!(check_attribute("nested", &json!({"a": 1})).is_err());
        assert!(check_attribute("tags", &json!({"$add": ["x"]})).is_ok());
        assert!(check_attribute("date(birthdate)", &json!("1989-07-20T00:00:00Z")).is_ok());
        assert!(check_attribute("date(birthdate)", &json!("20 July 1989")).is_err());
        assert!(check_attribute("url(avatar)", &json!("https://x.test/a.png")).is_ok());
        assert!(check_attribute("url(avatar)", &json!("ftp://x")).is_err());
        assert!(check_attribute("$language", &json!("fr")).is_ok());
        assert!(check_attribute("$language", &json!("FR")).is_err());
        assert!(check_attribute("$region", &json!("FR")).is_ok());
        assert!(check_attribute("$phone_number", &json!("+33600000000")).is_ok());
        assert!(check_attribute("$phone_number", &json!("0600000000")).is_err());
        assert!(check_attribute("$email_marketing", &json!("subscribed")).is_ok());
        assert!(check_attribute("$email_marketing", &json!("yes")).is_err());
        assert!(check_attribute("$timezone", &json!("Europe/Paris")).is_ok());
        assert!(check_attribute("$favourite", &json!("x")).is_err());
    }

    #[test]
    fn event_rules_follow_batch() {
        let now = chrono::Utc::now();
        assert!(check_event(&json!({"name": "audience_entered", "attributes": {"audience_key": "k", "$label": "l"}}), now).is_ok());
        assert!(check_event(&json!({"name": "Audience Entered"}), now).is_err());
        let old = (now - chrono::Duration::hours(25)).to_rfc3339();
        assert!(check_event(&json!({"name": "e", "time": old}), now).is_err());
        let future = (now + chrono::Duration::hours(1)).to_rfc3339();
        assert!(check_event(&json!({"name": "e", "time": future}), now).is_err());
    }

    #[test]
    fn structure_rules_make_a_call_malformed() {
        assert!(check_structure(
            Endpoint::Update,
            &json!({"identifiers": {"custom_id": "u"}})
        )
        .is_ok());
        assert!(check_structure(Endpoint::Update, &json!({"identifiers": {}})).is_err());
        assert!(check_structure(
            Endpoint::Update,
            &json!({"identifiers": {"custom_id": "u", "installation": "i"}})
        )
        .is_err());
        assert!(
            check_structure(Endpoint::Update, &json!({"identifiers": {"custom_id": ""}})).is_err()
        );
        assert!(check_structure(
            Endpoint::Update,
            &json!({"identifiers": {"custom_id": "u"}, "attributes": {}})
        )
        .is_err());
        let many: Map<String, Value> = (0..51).map(|i| (format!("a{i}"), json!(true))).collect();
        assert!(check_structure(
            Endpoint::Update,
            &json!({"identifiers": {"custom_id": "u"}, "attributes": many})
        )
        .is_err());
        assert!(check_structure(
            Endpoint::MassUpdate,
            &json!({"identifiers": {"custom_id": "u"}, "events": [{"name": "e"}]})
        )
        .is_err());
    }

    #[test]
    fn null_deletes_and_partial_edits_apply() {
        let mut attributes = Map::new();
        apply_attribute(&mut attributes, "tags", &json!(["a"]));
        apply_attribute(
            &mut attributes,
            "tags",
            &json!({"$add": ["b"], "$remove": ["a"]}),
        );
        assert_eq!(attributes["tags"], json!(["b"]));
        apply_attribute(&mut attributes, "tags", &Value::Null);
        assert!(attributes.is_empty());
    }
}
