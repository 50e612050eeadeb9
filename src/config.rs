//! config.toml plus environment overrides → validated, typed settings. Every problem found is
//! reported at once, each naming the section or definition it is about.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::batch::limits::{
    MASS_UPDATE_RATE_PER_SECOND, UPDATE_BURST, UPDATE_MAX_OPERATIONS, UPDATE_RATE_PER_SECOND,
};
use crate::domain::{AttributeKey, DefinitionKind};
use crate::segment::{FieldMapping, MappingRules, Path as MessagePath};

/// A value that must never reach a log line or an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseSettings,
    /// Where definition queries run; `None` means the state database itself.
    pub source: Option<DatabaseSettings>,
    pub batch: BatchSettings,
    pub delivery: DeliverySettings,
    pub daemon: DaemonSettings,
    pub definitions: Vec<Definition>,
    /// How Segment identify/track messages become Batch operations.
    pub mapping: MappingRules,
    /// The Segment-style HTTP ingestion endpoint `run` serves; `None` when not configured.
    pub ingest: Option<IngestSettings>,
}

/// `[ingest]`: where `run` accepts Segment's HTTP tracking API, and the write key it expects.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub listen: std::net::SocketAddr,
    pub write_key: Secret,
}

/// How `engage-sync run` behaves.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// A random delay up to this long is added to each scheduled tick, so many definitions on the
    /// same cron do not all query the database at the same second.
    pub jitter: Duration,
    /// After SIGINT/SIGTERM, in-flight requests get this long to finish before claims are given back.
    pub shutdown_grace: Duration,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; `None` turns the admin server off.
    pub admin_listen: Option<std::net::SocketAddr>,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            jitter: Duration::ZERO,
            shutdown_grace: Duration::from_secs(30),
            admin_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

#[derive(Clone)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
}

impl fmt::Debug for DatabaseSettings {
    // The URL may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &"[redacted]")
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub api_url: String,
    pub api_version: String,
    pub project_key: String,
    pub rest_api_key: Secret,
    pub request_timeout: Duration,
}

/// How the delivery lanes behave; defaults are Batch's documented ceilings.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// `/profiles/update` budget, in profiles per second, and its burst.
    pub rate_per_second: u32,
    pub burst: u32,
    /// `/profiles/mass-update` budget, in profiles per second.
    pub bulk_rate_per_second: u32,
    /// A diff with more changes than this goes through the bulk lane even after the first sync.
    pub bulk_threshold: u64,
    /// A run gives up retrying after this long and leaves the rest in the outbox for the next run.
    pub deadline: Duration,
    /// A claim not settled within this time is taken over by another worker (its owner died).
    pub claim_lease: Duration,
    /// Concurrent requests per lane.
    pub workers: usize,
    pub retry_base: Duration,
    pub retry_cap: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            rate_per_second: UPDATE_RATE_PER_SECOND,
            burst: UPDATE_BURST,
            // 95% of the ceiling: mass-update allows no burst, so calls paced at exactly 10,000/s
            // meet 429s from any jitter, and each 429 costs more than the 5% kept in hand
            // (measured: 98% of the ceiling with no 429 at 9,500/s, 88% with 11 429s at 9,800/s).
            bulk_rate_per_second: MASS_UPDATE_RATE_PER_SECOND / 20 * 19,
            bulk_threshold: 50_000,
            deadline: Duration::from_secs(3600),
            claim_lease: Duration::from_secs(60),
            workers: 2,
            retry_base: Duration::from_millis(250),
            retry_cap: Duration::from_secs(30),
        }
    }
}

/// One audience or computed trait: a name, the query that lists its users (and values), and when
/// and how it is sent.
#[derive(Debug, Clone)]
pub struct Definition {
    pub kind: DefinitionKind,
    pub name: String,
    pub key: AttributeKey,
    pub query: String,
    pub schedule: cron::Schedule,
    pub schedule_expression: String,
    /// The time zone the schedule is read in (UTC unless set).
    pub timezone: chrono_tz::Tz,
    /// The profile attribute form (`{key: value}`).
    pub send_identify: bool,
    /// The event form (`audience_entered` / `audience_exited` / `trait_computed`).
    pub send_track: bool,
    /// Event names when `send_track` is on.
    pub track_events: TrackEvents,
    /// How a computed trait's text values are typed on Batch.
    pub value_type: ValueType,
    /// The Batch custom audience kept in step with an audience (`mode = "custom_audience"`).
    pub custom_audience: Option<String>,
}

/// The names of a definition's Track events: for an audience, entering and leaving; for a computed
/// trait both are the one `trait_computed` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackEvents {
    pub entered: AttributeKey,
    pub exited: AttributeKey,
}

/// `type = "url"` on a computed trait sends its text values as `url(key)`; otherwise the type
/// follows the query's value column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ValueType {
    #[default]
    FromColumn,
    Url,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path} has {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

pub const DEFAULT_SCHEDULE: &str = "0 */2 * * *";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Option<RawDatabase>,
    source: Option<RawDatabase>,
    batch: Option<RawBatch>,
    delivery: Option<RawDelivery>,
    daemon: Option<RawDaemon>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    audience: Vec<RawDefinition>,
    #[serde(default)]
    computed_trait: Vec<RawDefinition>,
    #[serde(default)]
    mapping: Vec<RawMapping>,
    mapping_defaults: Option<RawMappingDefaults>,
    ingest: Option<RawIngest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    from: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMappingDefaults {
    custom_traits: Option<bool>,
    identifier_fallback: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    listen: Option<String>,
    write_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    jitter_seconds: Option<u64>,
    shutdown_grace_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// `host:port`, or `"off"`.
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    max_connections: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    api_url: Option<String>,
    api_version: Option<toml::Value>,
    project_key: Option<String>,
    rest_api_key: Option<String>,
    request_timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    rate_per_second: Option<u32>,
    burst: Option<u32>,
    bulk_rate_per_second: Option<u32>,
    bulk_threshold: Option<u64>,
    deadline_seconds: Option<u64>,
    claim_lease_seconds: Option<u64>,
    workers: Option<usize>,
    retry_base_ms: Option<u64>,
    retry_cap_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: String,
    key: Option<String>,
    query: String,
    schedule: Option<String>,
    timezone: Option<String>,
    send_identify: Option<bool>,
    send_track: Option<bool>,
    /// Event name for the Track form.
    track_event: Option<String>,
    /// Audiences: `"attribute"` (default) or `"custom_audience"`.
    mode: Option<String>,
    /// Computed traits: `"url"`.
    #[serde(rename = "type")]
    value_type: Option<String>,
}

impl Config {
    /// Reads `path` and applies the process environment on top.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, |name| std::env::var(name).ok())
    }

    /// Parses TOML text; `env` supplies the overriding environment variables.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            path: path.to_owned(),
            message: error.to_string().trim_end().to_owned(),
        })?;
        let mut problems = Vec::new();
        let env_nonempty = |name: &str| env(name).filter(|value| !value.trim().is_empty());

        let database_url = env_nonempty("DATABASE_URL")
            .or_else(|| raw.database.as_ref().and_then(|db| db.url.clone()));
        let database = match database_url {
            Some(url) => DatabaseSettings {
                url,
                max_connections: raw
                    .database
                    .as_ref()
                    .and_then(|db| db.max_connections)
                    .unwrap_or(10),
            },
            None => {
                problems.push("[database] url is missing (or set DATABASE_URL)".to_owned());
                DatabaseSettings {
                    url: String::new(),
                    max_connections: 10,
                }
            }
        };
        let source = raw
            .source
            .as_ref()
            .and_then(|source| {
                env_nonempty("SOURCE_DATABASE_URL")
                    .or_else(|| source.url.clone())
                    .map(|url| (url, source.max_connections))
            })
            .or_else(|| env_nonempty("SOURCE_DATABASE_URL").map(|url| (url, None)))
            .filter(|(url, _)| *url != database.url)
            .map(|(url, max_connections)| DatabaseSettings {
                url,
                max_connections: max_connections.unwrap_or(4),
            });

        let batch = parse_batch(raw.batch, &env_nonempty, &mut problems);
        let delivery = parse_delivery(raw.delivery, &mut problems);
        let daemon = parse_daemon(raw.daemon, raw.admin, &mut problems);
        let definitions = parse_definitions(raw.audience, raw.computed_trait, &mut problems);
        let mapping = parse_mapping(raw.mapping, raw.mapping_defaults, &mut problems);
        let ingest = parse_ingest(raw.ingest, &env_nonempty, &mut problems);

        if problems.is_empty() {
            Ok(Config {
                database,
                source,
                batch,
                delivery,
                daemon,
                definitions,
                mapping,
                ingest,
            })
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// The keys of every configured definition.
    pub fn keys(&self) -> Vec<String> {
        self.definitions
            .iter()
            .map(|d| d.key.as_str().to_owned())
            .collect()
    }

    pub fn definition(&self, key: &str) -> Option<&Definition> {
        self.definitions.iter().find(|d| d.key.as_str() == key)
    }
}

fn parse_batch(
    raw: Option<RawBatch>,
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> BatchSettings {
    let raw = raw.unwrap_or(RawBatch {
        api_url: None,
        api_version: None,
        project_key: None,
        rest_api_key: None,
        request_timeout_seconds: None,
    });
    let api_url = env("BATCH_API_URL")
        .or(raw.api_url)
        .unwrap_or_else(|| "https://api.batch.com".to_owned());
    if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
        problems.push(format!(
            "[batch] api_url {api_url:?} must start with http:// or https://"
        ));
    }
    let api_version = match raw.api_version {
        None => "2.11".to_owned(),
        Some(toml::Value::String(version)) => {
            let well_formed = version
                .split_once('.')
                .is_some_and(|(major, minor)| is_digits(major) && is_digits(minor));
            if !well_formed {
                problems.push(format!(
                    "[batch] api_version {version:?} is not of the form \"2.11\""
                ));
            }
            version
        }
        Some(other) => {
            problems.push(format!(
                "[batch] api_version must be a quoted string such as \"2.10\", not {other}: \
                 as a number, 2.10 would become 2.1"
            ));
            String::new()
        }
    };
    let project_key = env("BATCH_PROJECT_KEY").or(raw.project_key);
    let rest_api_key = env("BATCH_REST_API_KEY").or(raw.rest_api_key);
    if project_key.is_none() {
        problems.push("[batch] project_key is missing (or set BATCH_PROJECT_KEY)".to_owned());
    }
    if rest_api_key.is_none() {
        problems.push("[batch] rest_api_key is missing (or set BATCH_REST_API_KEY)".to_owned());
    }
    BatchSettings {
        api_url,
        api_version,
        project_key: project_key.unwrap_or_default(),
        rest_api_key: Secret::new(rest_api_key.unwrap_or_default()),
        request_timeout: Duration::from_secs(raw.request_timeout_seconds.unwrap_or(30).max(1)),
    }
}

fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_digit())
}

fn parse_delivery(raw: Option<RawDelivery>, problems: &mut Vec<String>) -> DeliverySettings {
    let defaults = DeliverySettings::default();
    let Some(raw) = raw else {
        return defaults;
    };
    let settings = DeliverySettings {
        rate_per_second: raw.rate_per_second.unwrap_or(defaults.rate_per_second),
        burst: raw.burst.unwrap_or(defaults.burst),
        bulk_rate_per_second: raw
            .bulk_rate_per_second
            .unwrap_or(defaults.bulk_rate_per_second),
        bulk_threshold: raw.bulk_threshold.unwrap_or(defaults.bulk_threshold),
        deadline: raw
            .deadline_seconds
            .map(Duration::from_secs)
            .unwrap_or(defaults.deadline),
        claim_lease: raw
            .claim_lease_seconds
            .map(Duration::from_secs)
            .unwrap_or(defaults.claim_lease),
        workers: raw.workers.unwrap_or(defaults.workers),
        retry_base: raw
            .retry_base_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.retry_base),
        retry_cap: raw
            .retry_cap_seconds
            .map(Duration::from_secs)
            .unwrap_or(defaults.retry_cap),
    };
    if settings.rate_per_second == 0 || settings.bulk_rate_per_second == 0 {
        problems.push("[delivery] rates must be at least 1 profile per second".to_owned());
    }
    if (settings.burst as usize) < UPDATE_MAX_OPERATIONS {
        problems.push(format!(
            "[delivery] burst must be at least {UPDATE_MAX_OPERATIONS}, one full call"
        ));
    }
    if settings.workers == 0 {
        problems.push("[delivery] workers must be at least 1".to_owned());
    }
    if settings.claim_lease < Duration::from_secs(1) {
        problems.push("[delivery] claim_lease_seconds must be at least 1".to_owned());
    }
    settings
}

fn parse_mapping(
    mappings: Vec<RawMapping>,
    defaults: Option<RawMappingDefaults>,
    problems: &mut Vec<String>,
) -> MappingRules {
    let mut rules = MappingRules::default();
    for (index, raw) in mappings.into_iter().enumerate() {
        match FieldMapping::parse(&raw.from, &raw.to) {
            Ok(mapping) => {
                if rules.fields.iter().any(|other| other.to == mapping.to) {
                    problems.push(format!(
                        "[[mapping]] #{}: another mapping already writes attributes.{}",
                        index + 1,
                        mapping.to
                    ));
                }
                rules.fields.push(mapping);
            }
            Err(problem) => problems.push(format!("[[mapping]] #{}: {problem}", index + 1)),
        }
    }
    if let Some(defaults) = defaults {
        rules.custom_traits = defaults.custom_traits.unwrap_or(rules.custom_traits);
        if let Some(path) = defaults.identifier_fallback {
            match MessagePath::parse(&path) {
                Ok(path) => rules.identifier_fallback = Some(path),
                Err(problem) => {
                    problems.push(format!("[mapping_defaults] identifier_fallback: {problem}"))
                }
            }
        }
    }
    rules
}

fn parse_ingest(
    raw: Option<RawIngest>,
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Option<IngestSettings> {
    let raw = raw?;
    let listen = match raw.listen.as_deref().unwrap_or("127.0.0.1:8088").parse() {
        Ok(address) => Some(address),
        Err(_) => {
            problems.push(format!(
                "[ingest] listen {:?} is not host:port (for example \"127.0.0.1:8088\")",
                raw.listen.unwrap_or_default()
            ));
            None
        }
    };
    let write_key = env("ENGAGE_SYNC_WRITE_KEY").or(raw.write_key);
    if write_key.is_none() {
        problems.push(
            "[ingest] write_key is missing (or set ENGAGE_SYNC_WRITE_KEY): the endpoint never runs open"
                .to_owned(),
        );
    }
    Some(IngestSettings {
        listen: listen?,
        write_key: Secret::new(write_key?),
    })
}

fn parse_daemon(
    daemon: Option<RawDaemon>,
    admin: Option<RawAdmin>,
    problems: &mut Vec<String>,
) -> DaemonSettings {
    let defaults = DaemonSettings::default();
    let admin_listen = match admin.and_then(|admin| admin.listen) {
        None => defaults.admin_listen,
        Some(listen) if listen == "off" => None,
        Some(listen) => match listen.parse() {
            Ok(address) => Some(address),
            Err(_) => {
                problems.push(format!(
                    "[admin] listen {listen:?} is not host:port (for example \"127.0.0.1:9464\") or \"off\""
                ));
                None
            }
        },
    };
    let daemon = daemon.unwrap_or(RawDaemon {
        jitter_seconds: None,
        shutdown_grace_seconds: None,
    });
    DaemonSettings {
        jitter: daemon
            .jitter_seconds
            .map(Duration::from_secs)
            .unwrap_or(defaults.jitter),
        shutdown_grace: daemon
            .shutdown_grace_seconds
            .map(Duration::from_secs)
            .unwrap_or(defaults.shutdown_grace),
        admin_listen,
    }
}

fn parse_definitions(
    audiences: Vec<RawDefinition>,
    traits: Vec<RawDefinition>,
    problems: &mut Vec<String>,
) -> Vec<Definition> {
    let mut definitions = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    let labelled = audiences
        .into_iter()
        .enumerate()
        .map(|(index, raw)| (DefinitionKind::Audience, index, raw))
        .chain(
            traits
                .into_iter()
                .enumerate()
                .map(|(index, raw)| (DefinitionKind::ComputedTrait, index, raw)),
        );
    for (kind, index, raw) in labelled {
        let label = format!("[[{}]] #{} {:?}", kind.as_str(), index + 1, raw.name);
        match parse_definition(raw, kind, &label) {
            Ok(definition) => {
                if let Some(other) = seen.get(definition.key.as_str()) {
                    problems.push(format!(
                        "{label}: key {:?} is already used by {other}; set a distinct `key = \"…\"`",
                        definition.key.as_str()
                    ));
                } else {
                    seen.insert(definition.key.as_str().to_owned(), label);
                    definitions.push(definition);
                }
            }
            Err(problem) => problems.push(problem),
        }
    }
    definitions
}

fn parse_definition(
    raw: RawDefinition,
    kind: DefinitionKind,
    label: &str,
) -> Result<Definition, String> {
    if raw.name.trim().is_empty() {
        return Err(format!("{label}: name is empty"));
    }
    let key = match &raw.key {
        Some(explicit) => AttributeKey::parse(explicit)
            .map_err(|error| format!("{label}: key {explicit:?} {error}"))?,
        None => AttributeKey::derive_from_name(&raw.name).map_err(|error| {
            use heck::ToSnakeCase;
            format!(
                "{label}: the key derived from its name, {:?}, {error}; set an explicit key, \
                 for example `key = {:?}`",
                raw.name.to_snake_case(),
                AttributeKey::suggest_for(&raw.name)
            )
        })?,
    };
    let query = raw.query.trim().trim_end_matches(';').trim_end().to_owned();
    if query.is_empty() {
        return Err(format!("{label}: query is empty"));
    }
    let schedule_expression = raw.schedule.unwrap_or_else(|| DEFAULT_SCHEDULE.to_owned());
    let schedule = parse_schedule(&schedule_expression)
        .map_err(|error| format!("{label}: schedule {schedule_expression:?} {error}"))?;
    let timezone = match &raw.timezone {
        None => chrono_tz::UTC,
        Some(name) => name.parse::<chrono_tz::Tz>().map_err(|_| {
            format!(
                "{label}: timezone {name:?} is not an IANA time zone name such as \"Europe/Paris\""
            )
        })?,
    };

    let custom_audience = match (kind, raw.mode.as_deref()) {
        (_, None) => None,
        (DefinitionKind::Audience, Some("attribute")) => None,
        (DefinitionKind::Audience, Some("custom_audience")) => Some(key.as_str().to_owned()),
        (DefinitionKind::Audience, Some(other)) => {
            return Err(format!(
                "{label}: mode {other:?} is not one of \"attribute\", \"custom_audience\""
            ))
        }
        (DefinitionKind::ComputedTrait, Some(_)) => {
            return Err(format!(
                "{label}: mode applies to audiences only; a computed trait is a profile attribute"
            ))
        }
    };
    let value_type = match (kind, raw.value_type.as_deref()) {
        (_, None) => ValueType::FromColumn,
        (DefinitionKind::ComputedTrait, Some("url")) => ValueType::Url,
        (DefinitionKind::ComputedTrait, Some(other)) => {
            return Err(format!(
                "{label}: type {other:?} is not supported; \"url\" is the only type to set \
                 (other types follow the query's value column)"
            ))
        }
        (DefinitionKind::Audience, Some(_)) => {
            return Err(format!(
                "{label}: type applies to computed traits only; an audience is a boolean"
            ))
        }
    };
    // A custom audience replaces the boolean attribute unless send_identify asks for both.
    let send_identify = raw.send_identify.unwrap_or(custom_audience.is_none());
    let send_track = raw.send_track.unwrap_or(false);
    let track_events = match &raw.track_event {
        Some(name) => {
            let name = AttributeKey::parse(name).map_err(|error| {
                format!("{label}: track_event {name:?} {error} (Batch event names follow the attribute rules)")
            })?;
            TrackEvents {
                entered: name.clone(),
                exited: name,
            }
        }
        None => kind.default_track_events(),
    };
    if raw.track_event.is_some() && !send_track {
        return Err(format!(
            "{label}: track_event is set but send_track is off; set `send_track = true`"
        ));
    }
    if !send_identify && !send_track && custom_audience.is_none() {
        return Err(format!(
            "{label}: send_identify and send_track are both off, leaving nothing to send; \
             remove the definition instead"
        ));
    }
    Ok(Definition {
        kind,
        name: raw.name,
        key,
        query,
        schedule,
        schedule_expression,
        timezone,
        send_identify,
        send_track,
        track_events,
        value_type,
        custom_audience,
    })
}

/// Accepts standard 5-field cron (minute hour day-of-month month day-of-week, with 0 or 7 for
/// Sunday) and the 6-field form with seconds first. The `cron` crate wants seconds and numbers
/// Sunday 1, so numeric days of week are rewritten as names before parsing.
pub fn parse_schedule(expression: &str) -> Result<cron::Schedule, String> {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    let (seconds, rest) = match fields.len() {
        5 => ("0", &fields[..]),
        6 => (fields[0], &fields[1..]),
        n => {
            return Err(format!(
                "has {n} fields; use 5 (minute hour day month weekday) or 6 (with seconds first)"
            ))
        }
    };
    let weekday = name_weekdays(rest[4]);
    let normalized = format!(
        "{seconds} {} {} {} {} {weekday}",
        rest[0], rest[1], rest[2], rest[3]
    );
    cron::Schedule::from_str(&normalized).map_err(|error| format!("is not valid cron: {error}"))
}

fn name_weekdays(field: &str) -> String {
    const NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];
    let mut out = String::new();
    let mut digits = String::new();
    let mut after_slash = false;
    let flush = |digits: &mut String, out: &mut String, after_slash: bool| {
        if digits.is_empty() {
            return;
        }
        match digits.parse::<usize>() {
            // A step (`*/2`) is a count, not a day.
            Ok(day) if day < NAMES.len() && !after_slash => out.push_str(NAMES[day]),
            _ => out.push_str(digits),
        }
        digits.clear();
    };
    for c in field.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out, after_slash);
            after_slash = c == '/';
            out.push(c);
        }
    }
    flush(&mut digits, &mut out, after_slash);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[database]
url = "postgres://postgres@127.0.0.1:5432/engage_sync"
[batch]
project_key = "p"
rest_api_key = "very-secret"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("config.toml"), |_| None)
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_an_audience() {
        let config = parse(&format!(
            "{MINIMAL}\n[[audience]]\nname = \"Order Completed Last 30 Days\"\nquery = \"SELECT user_id FROM orders;\"\n"
        ))
        .unwrap();
        let audience = &config.definitions[0];
        assert_eq!(audience.key.as_str(), "order_completed_last_30_days");
        assert_eq!(audience.query, "SELECT user_id FROM orders");
        assert_eq!(audience.schedule_expression, DEFAULT_SCHEDULE);
        assert!(audience.send_identify && !audience.send_track);
        assert_eq!(config.batch.api_version, "2.11");
        assert_eq!(config.batch.api_url, "https://api.batch.com");
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = Config::parse(MINIMAL, Path::new("c.toml"), |name| match name {
            "DATABASE_URL" => Some("postgres://elsewhere/db".to_owned()),
            "BATCH_API_URL" => Some("http://127.0.0.1:9".to_owned()),
            "BATCH_REST_API_KEY" => Some("from-env".to_owned()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.database.url, "postgres://elsewhere/db");
        assert_eq!(config.batch.api_url, "http://127.0.0.1:9");
        assert_eq!(config.batch.rest_api_key.expose(), "from-env");
    }

    #[test]
    fn the_rest_api_key_never_shows_in_debug_output() {
        let config = parse(MINIMAL).unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(!printed.contains("127.0.0.1:5432"), "{printed}");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let error = parse(&format!("{MINIMAL}\n[[audience]]\nname = \"A\"\nquery = \"SELECT 1\"\nschedul = \"* * * * *\"\n")).unwrap_err();
        assert!(error.to_string().contains("schedul"), "{error}");
    }

    #[test]
    fn bad_definitions_are_all_reported_by_name() {
        let problems = problems(&format!(
            r#"{MINIMAL}
[[audience]]
name = "Customers Who Ordered In The Last Thirty Days Twice"
query = "SELECT 1"
[[audience]]
name = "Café Lovers"
query = "SELECT 1"
[[audience]]
name = "Buyers"
key = "Buyers!"
query = "SELECT 1"
[[audience]]
name = "Buyers"
query = "SELECT 1"
[[audience]]
name = "Other Buyers"
key = "buyers"
query = "SELECT 1"
[[audience]]
name = "Hourly"
query = "SELECT 1"
schedule = "every hour"
"#
        ));
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(
            problems[0].contains("Customers Who Ordered")
                && problems[0].contains("at most 30")
                && problems[0].contains("key = \"")
        );
        assert!(problems[1].contains("Café Lovers") && problems[1].contains("'é'"));
        assert!(problems[2].contains("\"Buyers!\""));
        assert!(problems[3].contains("Other Buyers") && problems[3].contains("already used"));
        assert!(problems[4].contains("Hourly") && problems[4].contains("fields"));
    }

    #[test]
    fn the_annotated_sample_config_is_valid() {
        let config = parse(include_str!("../config.toml")).expect("config.toml parses");
        assert!(config
            .definitions
            .iter()
            .any(|d| d.kind == DefinitionKind::ComputedTrait));
    }

    #[test]
    fn traits_events_and_custom_audiences_are_configured_and_checked() {
        let config = parse(&format!(
            r#"{MINIMAL}
[[audience]]
name = "VIP"
query = "SELECT user_id FROM vip"
send_track = true
mode = "custom_audience"
[[computed_trait]]
name = "Total Revenue 180 Days"
query = "SELECT user_id, revenue FROM totals"
send_track = true
track_event = "revenue_computed"
[[computed_trait]]
name = "Avatar"
query = "SELECT user_id, avatar FROM people"
type = "url"
"#
        ))
        .unwrap();
        let [vip, revenue, avatar] = &config.definitions[..] else {
            panic!("three definitions")
        };
        assert_eq!(vip.custom_audience.as_deref(), Some("vip"));
        assert!(
            !vip.send_identify,
            "the list replaces the attribute by default"
        );
        assert_eq!(vip.track_events.entered.as_str(), "audience_entered");
        assert_eq!(vip.track_events.exited.as_str(), "audience_exited");
        assert_eq!(revenue.kind, DefinitionKind::ComputedTrait);
        assert_eq!(revenue.key.as_str(), "total_revenue_180_days");
        assert_eq!(revenue.track_events.entered.as_str(), "revenue_computed");
        assert!(revenue.send_identify);
        assert_eq!(avatar.value_type, ValueType::Url);

        let problems = problems(&format!(
            r#"{MINIMAL}
[[audience]]
name = "A"
query = "SELECT 1"
mode = "list"
[[audience]]
name = "B"
query = "SELECT 1"
type = "url"
[[computed_trait]]
name = "C"
query = "SELECT 1, 2"
send_track = true
track_event = "Trait Computed"
[[computed_trait]]
name = "D"
query = "SELECT 1, 2"
track_event = "d_done"
[[computed_trait]]
name = "E"
query = "SELECT 1, 2"
send_identify = false
"#
        ));
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems[0].contains("[[audience]] #1") && problems[0].contains("\"list\""));
        assert!(problems[1].contains("\"B\"") && problems[1].contains("computed traits only"));
        assert!(
            problems[2].contains("[[computed_trait]] #1") && problems[2].contains("track_event")
        );
        assert!(problems[3].contains("send_track is off"));
        assert!(problems[4].contains("nothing to send"));
    }

    #[test]
    fn daemon_settings_and_time_zones_are_checked() {
        let config = parse(&format!(
            "{MINIMAL}\n[admin]\nlisten = \"off\"\n[daemon]\njitter_seconds = 5\n\
             [[audience]]\nname = \"A\"\nquery = \"SELECT 1\"\ntimezone = \"Europe/Paris\"\n"
        ))
        .unwrap();
        assert_eq!(config.daemon.admin_listen, None);
        assert_eq!(config.daemon.jitter, Duration::from_secs(5));
        assert_eq!(config.definitions[0].timezone, chrono_tz::Europe::Paris);
        let problems = problems(&format!(
            "{MINIMAL}\n[admin]\nlisten = \"nowhere\"\n\
             [[audience]]\nname = \"A\"\nquery = \"SELECT 1\"\ntimezone = \"Mars/Olympus\"\n"
        ));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("[admin] listen"));
        assert!(problems[1].contains("Mars/Olympus"));
    }

    // Defect 13 of Segment's destination: its API version is a number, so 2.10 would become 2.1.
    #[test]
    fn api_version_must_be_a_string() {
        let text = MINIMAL.replace("[batch]", "[batch]\napi_version = 2.10");
        let problems = problems(&text);
        assert!(problems[0].contains("2.1"), "{problems:?}");
        let text = MINIMAL.replace("[batch]", "[batch]\napi_version = \"2.10\"");
        assert_eq!(parse(&text).unwrap().batch.api_version, "2.10");
    }

    #[test]
    fn mappings_and_ingestion_are_configured_and_checked() {
        let text = format!(
            "{MINIMAL}\n[mapping_defaults]\ncustom_traits = false\nidentifier_fallback = \"anonymousId\"\n\
             [[mapping]]\nfrom = \"traits.plan\"\nto = \"attributes.plan_tier\"\n\
             [ingest]\nlisten = \"127.0.0.1:0\"\nwrite_key = \"wk\"\n"
        );
        let config = parse(&text).unwrap();
        assert!(!config.mapping.custom_traits);
        assert_eq!(config.mapping.fields[0].to, "plan_tier");
        assert_eq!(config.ingest.unwrap().write_key.expose(), "wk");

        let text = format!(
            "{MINIMAL}\n[[mapping]]\nfrom = \"traits.plan\"\nto = \"plan\"\n\
             [[mapping]]\nfrom = \"traits.a\"\nto = \"attributes.x\"\n\
             [[mapping]]\nfrom = \"traits.b\"\nto = \"attributes.x\"\n\
             [ingest]\nlisten = \"nowhere\"\n"
        );
        let problems = problems(&text);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("[[mapping]] #1") && problems[0].contains("attributes."));
        assert!(problems[1].contains("[[mapping]] #3") && problems[1].contains("already"));
        assert!(problems[2].contains("[ingest] listen"));
        assert!(problems[3].contains("write_key"));
    }

    #[test]
    fn schedules_use_standard_cron_weekdays() {
        use chrono::{Datelike, TimeZone, Utc};
        let monday_nine = parse_schedule("0 9 * * 1").unwrap();
        let from = Utc.with_ymd_and_hms(2026, 12, 3, 0, 0, 0).unwrap(); // a Thursday
        let next = monday_nine.after(&from).next().unwrap();
        assert_eq!(next.weekday(), chrono::Weekday::Mon);
        let sunday = parse_schedule("30 6 * * 0").unwrap();
        assert_eq!(
            sunday.after(&from).next().unwrap().weekday(),
            chrono::Weekday::Sun
        );
        assert!(parse_schedule("*/15 * * * * *").is_ok());
        assert!(parse_schedule("0 */2 * * *").is_ok());
        assert!(parse_schedule("0 0 * * 1-5").is_ok());
    }
}
