//! The Segment-style HTTP tracking API that `run` serves when `[ingest]` is configured:
//! `POST /v1/identify`, `/v1/track` and `/v1/batch`, the write key as the HTTP Basic user.
//! A request is answered `{"success": true}` only once all its messages are committed (see
//! [`crate::forward`]); a request refused for any reason stores none of its messages.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use sqlx::PgPool;
use tracing::{debug, warn};

use crate::config::Secret;
use crate::deliver::Deliverer;
use crate::forward::{self, Mode};
use crate::segment::MappingRules;

/// Segment's limits for its HTTP tracking API.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
pub const MAX_BATCH_BYTES: usize = 500 * 1024;

#[derive(Clone)]
struct IngestState {
    pool: PgPool,
    rules: Arc<MappingRules>,
    /// `Basic base64(write_key:)`, compared in constant time.
    expected_authorization: Arc<Secret>,
    deliverer: Arc<Deliverer>,
}

/// Binds `address` and serves the ingestion endpoints until the task is aborted.
pub async fn serve(
    address: SocketAddr,
    pool: PgPool,
    rules: MappingRules,
    write_key: &Secret,
    deliverer: Arc<Deliverer>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:", write_key.expose()));
    let state = IngestState {
        pool,
        rules: Arc::new(rules),
        expected_authorization: Arc::new(Secret::new(format!("Basic {encoded}"))),
        deliverer,
    };
    let router = Router::new()
        .route(
            "/v1/identify",
            post(|state, headers, body| single(state, headers, body, "identify")),
        )
        .route(
            "/v1/track",
            post(|state, headers, body| single(state, headers, body, "track")),
        )
        .route("/v1/batch", post(batch))
        // Sizes are checked by hand, so an oversize request gets a body that says which limit.
        .layer(DefaultBodyLimit::disable())
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((bound, task))
}

/// A refused request: its status and a sentence saying why.
struct Refusal {
    status: StatusCode,
    error: String,
}

fn refuse(status: StatusCode, error: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error: error.into(),
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        debug!(status = self.status.as_u16(), error = %self.error, "Refused an ingestion request.");
        (
            self.status,
            Json(json!({"success": false, "error": self.error})),
        )
            .into_response()
    }
}

/// Checks the write key and reads at most `limit` bytes of body.
async fn admit(
    state: &IngestState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, Refusal> {
    let given = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes())
        .unwrap_or_default();
    if !constant_time_eq(given, state.expected_authorization.expose().as_bytes()) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "missing or wrong write key (send it as the HTTP Basic user name)",
        ));
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request is larger than {} KB", limit / 1024),
        )
    })
}

fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

fn parse(body: &[u8]) -> Result<Value, Refusal> {
    serde_json::from_slice(body)
        .map_err(|error| refuse(StatusCode::BAD_REQUEST, format!("malformed JSON: {error}")))
}

/// Checks one message's shape; `label` names it in the error.
fn check_message(message: &Value, label: &str) -> Result<(), Refusal> {
    let Some(object) = message.as_object() else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("{label} is not a JSON object"),
        ));
    };
    match object.get("type").and_then(Value::as_str) {
        Some("identify" | "track") => {}
        Some(other) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("{label}: type {other:?} is not accepted (identify and track are)"),
            ))
        }
        None => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("{label} has no type (identify or track)"),
            ))
        }
    }
    let has_id = ["userId", "anonymousId"].iter().any(|field| {
        object.get(*field).is_some_and(|id| {
            id.as_str().is_some_and(|text| !text.trim().is_empty()) || id.is_number()
        })
    });
    if !has_id {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("{label} needs a userId or an anonymousId"),
        ));
    }
    if object.get("type").and_then(Value::as_str) == Some("track")
        && !object.get("event").is_some_and(Value::is_string)
    {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("{label}: a track needs an event name"),
        ));
    }
    let size = serde_json::to_vec(message).map_or(0, |bytes| bytes.len());
    if size > MAX_MESSAGE_BYTES {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{label} is {size} bytes; a message holds at most {} KB",
                MAX_MESSAGE_BYTES / 1024
            ),
        ));
    }
    Ok(())
}

async fn single(
    State(state): State<IngestState>,
    headers: HeaderMap,
    body: Body,
    message_type: &'static str,
) -> Response {
    let result = async {
        let body = admit(&state, &headers, body, MAX_MESSAGE_BYTES).await?;
        let mut message = parse(&body)?;
        if let Some(object) = message.as_object_mut() {
            // The endpoint names the type, as in Segment's API.
            object.insert("type".into(), Value::from(message_type));
        }
        check_message(&message, "the message")?;
        Ok::<_, Refusal>(vec![message])
    }
    .await;
    match result {
        Ok(messages) => store(&state, messages).await,
        Err(refused) => refused.into_response(),
    }
}

async fn batch(State(state): State<IngestState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = admit(&state, &headers, body, MAX_BATCH_BYTES).await?;
        let mut envelope = parse(&body)?;
        let shared_context = envelope.get("context").cloned();
        let Some(Value::Array(messages)) = envelope.get_mut("batch").map(Value::take) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "a batch is an object with a \"batch\" array of messages",
            ));
        };
        let mut messages = messages;
        for (index, message) in messages.iter_mut().enumerate() {
            if let (Some(object), Some(context)) = (message.as_object_mut(), &shared_context) {
                object.entry("context").or_insert_with(|| context.clone());
            }
            check_message(message, &format!("message #{} of the batch", index + 1))?;
        }
        Ok(messages)
    }
    .await;
    match result {
        Ok(messages) => store(&state, messages).await,
        Err(refused) => refused.into_response(),
    }
}

async fn store(state: &IngestState, messages: Vec<Value>) -> Response {
    match forward::accept(
        &state.pool,
        &messages,
        &state.rules,
        Mode::Live,
        chrono::Utc::now(),
    )
    .await
    {
        Ok(accepted) => {
            debug!(
                stored = accepted.stored,
                duplicates = accepted.duplicates,
                queued = accepted.queued,
                "Ingested messages."
            );
            if accepted.refused_messages + accepted.refused_fields > 0 {
                warn!(
                    messages = accepted.refused_messages,
                    fields = accepted.refused_fields,
                    "Some ingested messages or fields cannot go to Batch; see the rejections table."
                );
            }
            state.deliverer.wake();
            Json(json!({"success": true})).into_response()
        }
        Err(error) => {
            warn!(error = %crate::source::database_message(&error), "Could not store ingested messages.");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "could not store the messages; nothing was kept, retry later",
            )
            .into_response()
        }
    }
}
