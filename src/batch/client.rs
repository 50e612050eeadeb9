//! The HTTP client for Batch's Profile API: one `reqwest::Client`, both auth headers, and a
//! classification of every answer into what the delivery loop must do next.

use std::time::Duration;

use serde::Deserialize;

use super::operation::Operation;
use super::retry::{is_retryable_status, parse_retry_after};
use crate::config::BatchSettings;

/// Which endpoint a call goes to; the first three are delivery lanes with their own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/profiles/update`: small calls, near-real-time traffic.
    Update,
    /// `/profiles/mass-update`: large calls for initial syncs and backfills.
    MassUpdate,
    /// `/audiences/update`: add and remove ids of a custom audience.
    AudiencesUpdate,
    /// `/audiences/create`: once per custom audience.
    AudiencesCreate,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Update => "profiles/update",
            Endpoint::MassUpdate => "profiles/mass-update",
            Endpoint::AudiencesUpdate => "audiences/update",
            Endpoint::AudiencesCreate => "audiences/create",
        }
    }
}

/// One id's change in a custom audience (`/audiences/update`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AudienceIdChange {
    pub action: AudienceAction,
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AudienceAction {
    Add,
    Remove,
}

/// One part of an accepted call that Batch dropped (`SUCCESS_WITH_PARTIAL_ERRORS`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PartialError {
    #[serde(default)]
    pub category: String,
    pub bulk_index: usize,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub attribute: Option<String>,
}

/// What Batch's answer means for the caller.
#[derive(Debug)]
pub enum Outcome {
    /// 202: applied, except for the listed parts.
    Accepted { partial_errors: Vec<PartialError> },
    /// 400/413/422: something in the body is refused; splitting the call isolates it.
    Refused { status: u16, reason: String },
    /// 401/403: the keys are wrong; nothing will succeed until an operator fixes them.
    Unauthorized { status: u16, reason: String },
    /// Worth retrying after a wait (429, 408, 5xx but 501, timeouts, connection errors).
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
        rate_limited: bool,
    },
    /// Any other status (404 for a wrong URL or version, 501…): retrying will not help.
    Failed { status: u16, reason: String },
}

#[derive(Debug, Deserialize)]
struct AcceptedBody {
    #[serde(default)]
    errors: Vec<PartialError>,
}

pub struct BatchClient {
    http: reqwest::Client,
    base: String,
    project_key: String,
    bearer: String,
}

impl BatchClient {
    pub fn new(settings: &BatchSettings) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("engage-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: format!(
                "{}/{}",
                settings.api_url.trim_end_matches('/'),
                settings.api_version
            ),
            project_key: settings.project_key.clone(),
            bearer: format!("Bearer {}", settings.rest_api_key.expose()),
        })
    }

    pub fn url(&self, endpoint: Endpoint) -> String {
        format!("{}/{}", self.base, endpoint.path())
    }

    /// Sends one profile call and classifies the answer.
    pub async fn send(&self, endpoint: Endpoint, operations: &[Operation]) -> Outcome {
        self.post(endpoint, operations).await
    }

    /// Adds and removes ids of the custom audience `name` in one call.
    pub async fn update_audience(&self, name: &str, ids: &[AudienceIdChange]) -> Outcome {
        self.post(
            Endpoint::AudiencesUpdate,
            &serde_json::json!({"name": name, "ids": ids}),
        )
        .await
    }

    /// Creates the custom audience `name` (a list of custom ids). One that exists already (409)
    /// counts as created. Rate limits and server errors are retried a few times.
    pub async fn create_audience(&self, name: &str, display_name: &str) -> Result<(), String> {
        let body =
            serde_json::json!({"name": name, "display_name": display_name, "type": "custom_ids"});
        let mut attempt = 0;
        loop {
            match self.post(Endpoint::AudiencesCreate, &body).await {
                Outcome::Accepted { .. } | Outcome::Failed { status: 409, .. } => return Ok(()),
                Outcome::Retryable {
                    retry_after,
                    reason,
                    ..
                } => {
                    attempt += 1;
                    if attempt >= 5 {
                        return Err(format!(
                            "creating the custom audience {name:?} failed: {reason}"
                        ));
                    }
                    let wait = retry_after.unwrap_or(Duration::from_millis(1100));
                    tokio::time::sleep(wait.min(Duration::from_secs(30))).await;
                }
                Outcome::Refused { reason, .. }
                | Outcome::Unauthorized { reason, .. }
                | Outcome::Failed { reason, .. } => {
                    return Err(format!(
                        "creating the custom audience {name:?} failed: {reason}"
                    ))
                }
            }
        }
    }

    /// Sends one call and classifies the answer. Never returns the REST API key in any text.
    async fn post(&self, endpoint: Endpoint, body: &(impl serde::Serialize + ?Sized)) -> Outcome {
        let response = self
            .http
            .post(self.url(endpoint))
            .header(reqwest::header::AUTHORIZATION, &self.bearer)
            .header("X-Batch-Project", &self.project_key)
            .json(body)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                // reqwest's error text names the URL, never headers, so it is safe to keep.
                return Outcome::Retryable {
                    reason: describe_transport_error(error),
                    retry_after: None,
                    rate_limited: false,
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, chrono::Utc::now()));
        let body = response.text().await.unwrap_or_default();
        classify(status, &body, retry_after)
    }
}

fn describe_transport_error(error: reqwest::Error) -> String {
    if error.is_timeout() {
        "request timed out".to_owned()
    } else if error.is_connect() {
        format!("cannot connect to Batch: {}", error.without_url())
    } else {
        format!("request failed: {}", error.without_url())
    }
}

/// Maps a status and body to an [`Outcome`]; kept apart from the network so it can be tested alone.
pub fn classify(status: u16, body: &str, retry_after: Option<Duration>) -> Outcome {
    let reason = || summarize_body(status, body);
    match status {
        200..=299 => {
            let partial_errors = serde_json::from_str::<AcceptedBody>(body)
                .map(|parsed| parsed.errors)
                .unwrap_or_default();
            Outcome::Accepted { partial_errors }
        }
        400 | 413 | 422 => Outcome::Refused {
            status,
            reason: reason(),
        },
        401 | 403 => Outcome::Unauthorized {
            status,
            reason: reason(),
        },
        status if is_retryable_status(status) => Outcome::Retryable {
            reason: reason(),
            retry_after,
            rate_limited: status == 429,
        },
        status => Outcome::Failed {
            status,
            reason: reason(),
        },
    }
}

/// Batch's error bodies look like `{"error_code", "error_message"}`; fall back to the raw text.
fn summarize_body(status: u16, body: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error_code: Option<String>,
        error_message: Option<String>,
    }
    let detail = match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody {
            error_code: Some(code),
            error_message: Some(message),
        }) => format!("{code}: {message}"),
        Ok(ErrorBody {
            error_message: Some(message),
            ..
        }) => message,
        _ => body.chars().take(300).collect(),
    };
    if detail.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_errors_are_read_from_accepted_answers() {
        let body = r#"{"code":"SUCCESS_WITH_PARTIAL_ERRORS","errors":[{"category":"attribute","bulk_index":3,"reason":"too long","attribute":"plan"}]}"#;
        match classify(202, body, None) {
            Outcome::Accepted { partial_errors } => {
                assert_eq!(partial_errors.len(), 1);
                assert_eq!(partial_errors[0].bulk_index, 3);
                assert_eq!(partial_errors[0].attribute.as_deref(), Some("plan"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn statuses_map_to_what_the_caller_must_do() {
        assert!(matches!(
            classify(400, r#"{"error_code":"BAD_REQUEST","error_message":"bulk_index 4: custom_id missing"}"#, None),
            Outcome::Refused { reason, .. } if reason == "HTTP 400: BAD_REQUEST: bulk_index 4: custom_id missing"
        ));
        assert!(matches!(
            classify(401, "", None),
            Outcome::Unauthorized { .. }
        ));
        assert!(matches!(
            classify(429, "", Some(Duration::from_secs(3))),
            Outcome::Retryable { rate_limited: true, retry_after: Some(d), .. } if d == Duration::from_secs(3)
        ));
        assert!(matches!(
            classify(503, "maintenance", None),
            Outcome::Retryable {
                rate_limited: false,
                ..
            }
        ));
        assert!(matches!(
            classify(404, "", None),
            Outcome::Failed { status: 404, .. }
        ));
    }
}
