//! One Segment identify or track message → the Batch profile operation it becomes, as the seed's
//! mapping table describes, plus custom mappings. Pure: no I/O, the clock passed in.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

use super::natives;
use super::values::{self, Attribute};
use crate::batch::limits::{
    MAX_ATTRIBUTES_PER_OPERATION, MAX_CUSTOM_ID_CHARS, MAX_EVENT_AGE, NATIVE_ATTRIBUTES,
};

/// How far in the future an event's time may be (clock skew) before Batch would refuse it.
const MAX_EVENT_SKEW: chrono::Duration = chrono::Duration::seconds(60);

/// Turns a Segment value into a native attribute's value, or says why it cannot.
type NativeRule = fn(&Value) -> Result<Value, String>;

/// Traits the seed's table maps to native attributes; they never become custom attributes.
const NATIVE_TRAITS: [&str; 4] = ["email", "phone", "email_marketing", "sms_marketing"];

/// `[[mapping]]` and `[mapping_defaults]` from config.toml, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingRules {
    pub fields: Vec<FieldMapping>,
    /// Whether traits not named by the seed's table or a `[[mapping]]` become custom attributes.
    pub custom_traits: bool,
    /// Where a message without `userId` takes its custom_id from (a path such as `anonymousId`).
    pub identifier_fallback: Option<Path>,
}

impl Default for MappingRules {
    fn default() -> Self {
        Self {
            fields: Vec::new(),
            custom_traits: true,
            identifier_fallback: None,
        }
    }
}

/// `from = "traits.plan"`, `to = "attributes.plan_tier"`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMapping {
    pub from: Path,
    /// The Batch attribute name after `attributes.`: custom, native (`$…`) or typed (`date(…)`).
    pub to: String,
}

/// A dotted path into a Segment message (`context.traits.plan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(Vec<String>);

impl Path {
    pub fn parse(text: &str) -> Result<Self, String> {
        let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
        if text.is_empty() || segments.iter().any(String::is_empty) {
            return Err(format!(
                "{text:?} is not a path into a message (for example traits.plan)"
            ));
        }
        Ok(Self(segments))
    }

    pub fn lookup<'m>(&self, message: &'m Value) -> Option<&'m Value> {
        self.0
            .iter()
            .try_fold(message, |value, segment| value.get(segment))
    }

    /// `traits.plan` and `context.traits.plan` name the trait `plan`.
    fn trait_name(&self) -> Option<&str> {
        match self.0.as_slice() {
            [root, name] if root == "traits" => Some(name),
            [context, root, name] if context == "context" && root == "traits" => Some(name),
            _ => None,
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

impl FieldMapping {
    /// Checks one `[[mapping]]` entry; the error names the offending side.
    pub fn parse(from: &str, to: &str) -> Result<Self, String> {
        let from = Path::parse(from).map_err(|reason| format!("from: {reason}"))?;
        let name = to.strip_prefix("attributes.").ok_or_else(|| {
            format!("to: {to:?} must name a profile attribute, as attributes.<name>")
        })?;
        let valid = if name.starts_with('$') {
            NATIVE_ATTRIBUTES.contains(&name)
        } else {
            let inner = name
                .strip_suffix(')')
                .and_then(|rest| {
                    rest.strip_prefix("date(")
                        .or_else(|| rest.strip_prefix("url("))
                })
                .unwrap_or(name);
            crate::domain::AttributeKey::parse(inner).is_ok()
        };
        if !valid {
            return Err(format!(
                "to: {name:?} is not a Batch attribute name ([a-z0-9_]{{1,30}}, date(…), url(…) or one of {})",
                NATIVE_ATTRIBUTES.join(", ")
            ));
        }
        Ok(Self {
            from,
            to: name.to_owned(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageType {
    Identify,
    Track,
}

/// Why a whole message cannot become an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("a message must be a JSON object")]
    NotAnObject,
    #[error("type {0:?} is not forwarded to Batch (identify and track are)")]
    UnsupportedType(String),
    #[error("the message has no type (identify or track)")]
    MissingType,
    #[error("the message has no userId, which Batch needs as custom_id{0}")]
    NoUserId(String),
    #[error("{field} {reason}")]
    BadIdentifier { field: String, reason: String },
    #[error("a track message needs an event name: {0}")]
    BadEventName(String),
}

/// One field left out of an operation, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldRejection {
    /// Where it came from in the message (`traits.phone`).
    pub field: String,
    /// The Batch attribute it was meant for, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    pub reason: String,
}

/// A message mapped: what goes to Batch, and what was left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub message_type: MessageType,
    pub custom_id: String,
    /// Profile attributes in the seed's order: natives, then mappings, then custom traits.
    pub attributes: Vec<Attribute>,
    /// The Track event (`name`, `time`, `attributes`), if any survived.
    pub event: Option<Value>,
    pub rejections: Vec<FieldRejection>,
}

impl Mapped {
    /// The operations Batch receives: one, unless there are more than 50 attributes (then the
    /// rest follow in further operations for the same profile). An empty `attributes` is left out.
    pub fn operations(&self) -> Vec<OperationView<'_>> {
        let mut operations: Vec<OperationView<'_>> = self
            .attributes
            .chunks(MAX_ATTRIBUTES_PER_OPERATION)
            .map(|attributes| OperationView {
                custom_id: &self.custom_id,
                attributes,
                event: None,
            })
            .collect();
        match operations.first_mut() {
            Some(first) => first.event = self.event.as_ref(),
            None if self.event.is_some() => operations.push(OperationView {
                custom_id: &self.custom_id,
                attributes: &[],
                event: self.event.as_ref(),
            }),
            None => {}
        }
        operations
    }
}

/// One operation as Batch's JSON, attributes in mapping order.
#[derive(Debug, Clone, Copy)]
pub struct OperationView<'m> {
    pub custom_id: &'m str,
    pub attributes: &'m [Attribute],
    pub event: Option<&'m Value>,
}

impl Serialize for OperationView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Ordered<'a>(&'a [Attribute]);
        impl Serialize for Ordered<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for attribute in self.0 {
                    map.serialize_entry(&attribute.name, &attribute.value)?;
                }
                map.end()
            }
        }
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry(
            "identifiers",
            &serde_json::json!({"custom_id": self.custom_id}),
        )?;
        if !self.attributes.is_empty() {
            map.serialize_entry("attributes", &Ordered(self.attributes))?;
        }
        if let Some(event) = self.event {
            map.serialize_entry("events", &[event])?;
        }
        map.end()
    }
}

/// Maps one message. `now` bounds the event's time (Batch takes the last 24 hours only).
pub fn map_message(
    message: &Value,
    rules: &MappingRules,
    now: DateTime<Utc>,
) -> Result<Mapped, MessageError> {
    if !message.is_object() {
        return Err(MessageError::NotAnObject);
    }
    let message_type = match message.get("type").and_then(Value::as_str) {
        Some("identify") => MessageType::Identify,
        Some("track") => MessageType::Track,
        Some(other) => return Err(MessageError::UnsupportedType(other.to_owned())),
        None => return Err(MessageError::MissingType),
    };
    let custom_id = custom_id(message, rules)?;
    let mut builder = Builder::default();
    let mut event = None;
    match message_type {
        MessageType::Identify => {
            builder.natives(message);
            builder.mapped_fields(message, rules);
            if rules.custom_traits {
                builder.custom_traits(message, rules);
            }
        }
        MessageType::Track => {
            let name = match message.get("event") {
                Some(Value::String(text)) => values::batch_name(text).ok_or_else(|| {
                    MessageError::BadEventName(format!(
                        "{text:?} has no character usable in a Batch name"
                    ))
                })?,
                Some(other) => {
                    return Err(MessageError::BadEventName(format!(
                        "{other} is not a string"
                    )))
                }
                None => return Err(MessageError::BadEventName("event is missing".to_owned())),
            };
            event = builder.event(message, name, now);
            builder.mapped_fields(message, rules);
        }
    }
    Ok(Mapped {
        message_type,
        custom_id,
        attributes: builder.attributes,
        event,
        rejections: builder.rejections,
    })
}

fn custom_id(message: &Value, rules: &MappingRules) -> Result<String, MessageError> {
    let (field, value) = match message.get("userId").filter(|v| !is_blank(v)) {
        Some(value) => ("userId".to_owned(), value),
        None => match &rules.identifier_fallback {
            Some(path) => match path.lookup(message).filter(|v| !is_blank(v)) {
                Some(value) => (path.to_string(), value),
                None => {
                    return Err(MessageError::NoUserId(format!(
                        ", and the fallback {path} is empty too"
                    )))
                }
            },
            None => {
                return Err(MessageError::NoUserId(
                    " (set [mapping_defaults] identifier_fallback to use another field)".to_owned(),
                ))
            }
        },
    };
    let text = match value {
        Value::String(text) => text.trim().to_owned(),
        Value::Number(number) => number.to_string(),
        other => {
            return Err(MessageError::BadIdentifier {
                field,
                reason: format!("must be a string, not {other}"),
            })
        }
    };
    if text.chars().count() > MAX_CUSTOM_ID_CHARS {
        return Err(MessageError::BadIdentifier {
            field,
            reason: format!("is longer than Batch's {MAX_CUSTOM_ID_CHARS} characters"),
        });
    }
    Ok(text)
}

fn is_blank(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(text) => text.trim().is_empty(),
        _ => false,
    }
}

/// `traits.X`, else `context.traits.X`, with the path it came from.
fn trait_of<'m>(message: &'m Value, name: &str) -> Option<(String, &'m Value)> {
    if let Some(value) = message.get("traits").and_then(|traits| traits.get(name)) {
        return Some((format!("traits.{name}"), value));
    }
    message
        .get("context")
        .and_then(|context| context.get("traits"))
        .and_then(|traits| traits.get(name))
        .map(|value| (format!("context.traits.{name}"), value))
}

/// Collects attributes, refusing a second attribute of the same Batch name.
#[derive(Default)]
struct Builder {
    attributes: Vec<Attribute>,
    /// Per Batch base name (`signup` for `date(signup)`): the field it came from.
    sources: Vec<(String, String)>,
    rejections: Vec<FieldRejection>,
}

impl Builder {
    fn reject(&mut self, field: impl Into<String>, attribute: Option<&str>, reason: String) {
        self.rejections.push(FieldRejection {
            field: field.into(),
            attribute: attribute.map(str::to_owned),
            reason,
        });
    }

    fn push(&mut self, field: String, attribute: Attribute) {
        let base = base_name(&attribute.name).to_owned();
        if let Some((_, first)) = self.sources.iter().find(|(name, _)| *name == base) {
            let reason = format!(
                "becomes the attribute {} like {first}: two fields never share one attribute, so this one was left out",
                attribute.name
            );
            self.reject(field, Some(&attribute.name), reason);
            return;
        }
        self.sources.push((base, field));
        self.attributes.push(attribute);
    }

    fn native(&mut self, field: String, name: &str, value: &Value, convert: NativeRule) {
        match convert(value) {
            Ok(value) => self.push(
                field,
                Attribute {
                    name: name.to_owned(),
                    value,
                },
            ),
            Err(reason) => self.reject(field, Some(name), reason),
        }
    }

    /// The seed's table, in its order.
    fn natives(&mut self, message: &Value) {
        let table: [(&str, &str, NativeRule); 4] = [
            ("email", "$email_address", natives::email_address),
            ("phone", "$phone_number", natives::phone_number),
            (
                "email_marketing",
                "$email_marketing",
                natives::marketing_consent,
            ),
            (
                "sms_marketing",
                "$sms_marketing",
                natives::marketing_consent,
            ),
        ];
        for (trait_name, attribute, convert) in table {
            if let Some((field, value)) = trait_of(message, trait_name) {
                self.native(field, attribute, value, convert);
            }
        }
        let context = message.get("context");
        if let Some(locale) = context.and_then(|c| c.get("locale")) {
            match natives::locale(locale) {
                Ok(locale) => {
                    self.push(
                        "context.locale".into(),
                        Attribute {
                            name: "$language".into(),
                            value: Value::String(locale.language),
                        },
                    );
                    if let Some(region) = locale.region {
                        self.push(
                            "context.locale".into(),
                            Attribute {
                                name: "$region".into(),
                                value: Value::String(region),
                            },
                        );
                    }
                }
                Err(reason) => self.reject("context.locale", Some("$language"), reason),
            }
        }
        if let Some(zone) = context.and_then(|c| c.get("timezone")) {
            self.native(
                "context.timezone".into(),
                "$timezone",
                zone,
                natives::timezone,
            );
        }
    }

    /// `[[mapping]]` entries whose source is present in the message.
    fn mapped_fields(&mut self, message: &Value, rules: &MappingRules) {
        for mapping in &rules.fields {
            let Some(value) = mapping.from.lookup(message) else {
                continue;
            };
            let field = mapping.from.to_string();
            match mapped_value(&mapping.to, value) {
                Ok(value) => self.push(
                    field,
                    Attribute {
                        name: mapping.to.clone(),
                        value,
                    },
                ),
                Err(reason) => self.reject(field, Some(&mapping.to), reason),
            }
        }
    }

    /// Every other trait (`traits.*` wins over `context.traits.*`), as a custom attribute.
    fn custom_traits(&mut self, message: &Value, rules: &MappingRules) {
        let consumed = |name: &str| {
            NATIVE_TRAITS.contains(&name)
                || rules
                    .fields
                    .iter()
                    .any(|mapping| mapping.from.trait_name() == Some(name))
        };
        let empty = Map::new();
        let traits = message
            .get("traits")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let context_traits = message
            .get("context")
            .and_then(|context| context.get("traits"))
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let all = traits
            .iter()
            .map(|(key, value)| (format!("traits.{key}"), key, value))
            .chain(
                context_traits
                    .iter()
                    .filter(|(key, _)| !traits.contains_key(*key))
                    .map(|(key, value)| (format!("context.traits.{key}"), key, value)),
            );
        for (field, key, value) in all {
            if consumed(key) {
                continue;
            }
            let Some(name) = values::batch_name(key) else {
                self.reject(
                    field,
                    None,
                    format!("{key:?} has no character usable in a Batch name"),
                );
                continue;
            };
            match values::profile_attribute(&name, value) {
                Ok(attribute) => self.push(field, attribute),
                Err(reason) => self.reject(field, Some(&name), reason),
            }
        }
    }

    /// The Track event; `None` (with a rejection) when its time is outside Batch's window.
    fn event(&mut self, message: &Value, name: String, now: DateTime<Utc>) -> Option<Value> {
        let stamped = ["timestamp", "originalTimestamp"]
            .into_iter()
            .find_map(|field| message.get(field).map(|value| (field, value)));
        let time = match stamped {
            None => now,
            Some((field, value)) => {
                let parsed = value
                    .as_str()
                    .and_then(|text| DateTime::parse_from_rfc3339(text).ok());
                let Some(time) = parsed else {
                    self.reject(
                        field,
                        None,
                        format!("{value} is not an ISO-8601 time; the event was not sent"),
                    );
                    return None;
                };
                let time = time.with_timezone(&Utc);
                let max_age = chrono::Duration::from_std(MAX_EVENT_AGE).expect("fits");
                if now - time > max_age {
                    self.reject(
                        field,
                        None,
                        format!("the event happened at {time}, more than 24 hours ago: Batch refuses such events"),
                    );
                    return None;
                }
                if time - now > MAX_EVENT_SKEW {
                    self.reject(
                        field,
                        None,
                        format!("the event time {time} is in the future"),
                    );
                    return None;
                }
                time
            }
        };
        let mut event = Map::new();
        event.insert("name".into(), Value::String(name));
        event.insert(
            "time".into(),
            Value::String(time.to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        if let Some(properties) = message.get("properties") {
            match properties {
                Value::Object(properties) => {
                    let (attributes, rejected) = values::event_attributes(properties, "properties");
                    for (field, reason) in rejected {
                        self.reject(field, None, reason);
                    }
                    if !attributes.is_empty() {
                        event.insert("attributes".into(), Value::Object(attributes));
                    }
                }
                Value::Null => {}
                other => self.reject(
                    "properties",
                    None,
                    format!("must be an object, not {other}"),
                ),
            }
        }
        Some(Value::Object(event))
    }
}

/// `date(signup)` → `signup`.
fn base_name(name: &str) -> &str {
    name.strip_suffix(')')
        .and_then(|rest| rest.split_once('('))
        .map_or(name, |(_, inner)| inner)
}

/// A value for an explicitly mapped attribute: natives follow their own rules, typed names
/// their type; a plain custom name keeps the name the user chose (no `date()` added).
fn mapped_value(target: &str, value: &Value) -> Result<Value, String> {
    match target {
        "$email_address" => natives::email_address(value),
        "$phone_number" => natives::phone_number(value),
        "$email_marketing" | "$sms_marketing" => natives::marketing_consent(value),
        "$timezone" => natives::timezone(value),
        "$language" => natives::locale(value).map(|locale| Value::String(locale.language)),
        "$region" => match value.as_str() {
            Some(text) if text.len() == 2 && text.chars().all(|c| c.is_ascii_alphabetic()) => {
                Ok(Value::String(text.to_ascii_uppercase()))
            }
            _ => Err(format!("{value} is not a two-letter region (ISO-3166)")),
        },
        _ if target.starts_with("date(") => match value {
            Value::Null => Ok(Value::Null),
            Value::String(text) => values::iso_date(text)
                .map(Value::String)
                .ok_or_else(|| format!("{text:?} is not an ISO-8601 date")),
            other => Err(format!("{other} is not an ISO-8601 date")),
        },
        _ if target.starts_with("url(") => match value {
            Value::Null => Ok(Value::Null),
            Value::String(text) if text.starts_with("http://") || text.starts_with("https://") => {
                Ok(value.clone())
            }
            other => Err(format!("{other} is not an http(s) URL")),
        },
        _ => match value {
            Value::String(text) if values::iso_date(text).is_some() => Ok(value.clone()),
            _ => values::profile_attribute(target, value).map(|attribute| attribute.value),
        },
    }
}
