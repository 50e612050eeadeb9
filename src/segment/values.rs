//! Custom attributes: Segment keys become Batch names (`[a-z0-9_]`, at most 30 characters) and
//! Segment values become the values Batch takes, for profiles and for event attributes.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use heck::ToSnakeCase;
use serde_json::{Map, Value};

use crate::batch::limits::{MAX_ARRAY_ITEMS, MAX_ATTRIBUTE_NAME_CHARS, MAX_STRING_VALUE_CHARS};

/// A Segment key as a Batch attribute or event name: snake_case (`accountType` → `account_type`),
/// then only `[a-z0-9_]` kept, cut to 30 characters. `None` when nothing usable is left.
pub fn batch_name(key: &str) -> Option<String> {
    let snake: String = key
        .to_snake_case()
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .take(MAX_ATTRIBUTE_NAME_CHARS)
        .collect();
    let trimmed = snake.trim_matches('_');
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// An ISO-8601 date or date-time in any offset, as Batch's UTC form. A date-time without an offset
/// is taken as UTC; a bare date as midnight UTC.
pub fn iso_date(text: &str) -> Option<String> {
    let text = text.trim();
    // Cheap guard: only strings shaped like YYYY-MM-DD… are tried.
    let bytes = text.as_bytes();
    if bytes.len() < 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let utc = if let Ok(moment) = DateTime::parse_from_rfc3339(text) {
        moment.with_timezone(&Utc)
    } else if let Ok(naive) = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f") {
        naive.and_utc()
    } else if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        day.and_hms_opt(0, 0, 0)?.and_utc()
    } else {
        return None;
    };
    Some(utc.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// A profile attribute ready to send: its final name (`date(key)` for dates) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: Value,
}

/// A custom profile attribute from a Segment value, named `name` (already a Batch name).
/// Strings, numbers, booleans, null (deletes) and arrays of up to 25 strings pass; ISO dates
/// become `date(name)`; objects and other arrays are refused with a reason.
pub fn profile_attribute(name: &str, value: &Value) -> Result<Attribute, String> {
    let plain = |value: Value| Attribute {
        name: name.to_owned(),
        value,
    };
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(plain(value.clone())),
        Value::String(text) => {
            if let Some(date) = iso_date(text) {
                return Ok(Attribute {
                    name: format!("date({name})"),
                    value: Value::String(date),
                });
            }
            check_text(text)?;
            Ok(plain(value.clone()))
        }
        Value::Array(items) => {
            if items.len() > MAX_ARRAY_ITEMS {
                return Err(format!(
                    "an array holds at most {MAX_ARRAY_ITEMS} items, this one {}",
                    items.len()
                ));
            }
            for item in items {
                match item {
                    Value::String(text) => check_text(text)?,
                    other => {
                        return Err(format!(
                            "profile arrays hold only strings, this one holds {other}"
                        ))
                    }
                }
            }
            Ok(plain(value.clone()))
        }
        Value::Object(_) => Err("nested objects are not profile attribute values".to_owned()),
    }
}

/// Event attributes: keys normalised at every depth (`$label` and `$tags` kept as they are),
/// objects and arrays of any JSON kept, ISO dates as `date(key)`. Returns the attributes and the
/// reasons for what had to be left out, each naming its path under `prefix`.
pub fn event_attributes(
    properties: &Map<String, Value>,
    prefix: &str,
) -> (Map<String, Value>, Vec<(String, String)>) {
    let mut rejected = Vec::new();
    let attributes = event_object(properties, prefix, true, &mut rejected);
    (attributes, rejected)
}

fn event_object(
    object: &Map<String, Value>,
    prefix: &str,
    top_level: bool,
    rejected: &mut Vec<(String, String)>,
) -> Map<String, Value> {
    let mut out = Map::new();
    let mut sources: Map<String, Value> = Map::new();
    for (key, value) in object {
        let path = format!("{prefix}.{key}");
        if top_level && (key == "$label" || key == "$tags") {
            match check_reserved(key, value) {
                Ok(()) => {
                    out.insert(key.clone(), value.clone());
                }
                Err(reason) => rejected.push((path, reason)),
            }
            continue;
        }
        let Some(name) = batch_name(key) else {
            rejected.push((
                path,
                format!("{key:?} has no character usable in a Batch name"),
            ));
            continue;
        };
        let (name, value) = match value {
            Value::Null => {
                rejected.push((path, "null is not an event attribute value".to_owned()));
                continue;
            }
            Value::String(text) => match iso_date(text) {
                Some(date) => (format!("date({name})"), Value::String(date)),
                None => match check_text(text) {
                    Ok(()) => (name, value.clone()),
                    Err(reason) => {
                        rejected.push((path, reason));
                        continue;
                    }
                },
            },
            Value::Object(inner) => (
                name,
                Value::Object(event_object(inner, &path, false, rejected)),
            ),
            Value::Array(items) => (
                name,
                Value::Array(
                    items
                        .iter()
                        .map(|item| match item {
                            Value::Object(inner) => {
                                Value::Object(event_object(inner, &path, false, rejected))
                            }
                            other => other.clone(),
                        })
                        .collect(),
                ),
            ),
            _ => (name, value.clone()),
        };
        if let Some(first) = sources.get(&name) {
            rejected.push((
                path,
                format!("becomes {name}, like {first}; kept the first, left this one out"),
            ));
            continue;
        }
        sources.insert(name.clone(), Value::String(format!("{prefix}.{key}")));
        out.insert(name, value);
    }
    out
}

fn check_reserved(key: &str, value: &Value) -> Result<(), String> {
    match (key, value) {
        ("$label", Value::String(text)) => check_text(text),
        ("$tags", Value::Array(items)) if items.len() <= MAX_ARRAY_ITEMS => {
            items.iter().try_for_each(|item| match item {
                Value::String(text) => check_text(text),
                _ => Err("$tags holds only strings".to_owned()),
            })
        }
        ("$tags", Value::Array(items)) => Err(format!(
            "$tags holds at most {MAX_ARRAY_ITEMS} items, this one {}",
            items.len()
        )),
        _ => Err(format!(
            "{key} takes a string{}",
            if key == "$tags" { " array" } else { "" }
        )),
    }
}

fn check_text(text: &str) -> Result<(), String> {
    let length = text.chars().count();
    if length == 0 {
        Err("an empty string is not a Batch value".to_owned())
    } else if length > MAX_STRING_VALUE_CHARS {
        Err(format!(
            "a string holds at most {MAX_STRING_VALUE_CHARS} characters, this one {length} (not truncated)"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_are_snake_case_restricted_and_cut() {
        assert_eq!(batch_name("accountType").as_deref(), Some("account_type"));
        assert_eq!(batch_name("Plan Tier!").as_deref(), Some("plan_tier"));
        assert_eq!(batch_name("logins").as_deref(), Some("logins"));
        assert_eq!(batch_name("café au lait").as_deref(), Some("caf_au_lait"));
        assert_eq!(
            batch_name("a very long trait name that goes on and on")
                .unwrap()
                .len(),
            30
        );
        assert_eq!(batch_name("¿¡"), None);
    }

    #[test]
    fn dates_with_any_offset_become_utc() {
        assert_eq!(
            iso_date("2024-05-01T12:00:00+02:00").as_deref(),
            Some("2024-05-01T10:00:00Z")
        );
        assert_eq!(
            iso_date("2024-05-01T12:00:00").as_deref(),
            Some("2024-05-01T12:00:00Z")
        );
        assert_eq!(
            iso_date("1989-07-20").as_deref(),
            Some("1989-07-20T00:00:00Z")
        );
        assert_eq!(
            iso_date("2024-05-01T12:00:00.250Z").as_deref(),
            Some("2024-05-01T12:00:00.250Z")
        );
        assert_eq!(iso_date("premium"), None);
        assert_eq!(iso_date("2024-13-45"), None);
    }

    #[test]
    fn profile_values_follow_batch_types() {
        let date = profile_attribute("signup", &json!("2024-05-01T12:00:00+02:00")).unwrap();
        assert_eq!(date.name, "date(signup)");
        assert_eq!(date.value, json!("2024-05-01T10:00:00Z"));
        assert!(profile_attribute("tags", &json!(["a", "b"])).is_ok());
        assert!(profile_attribute("nums", &json!([1, 2])).is_err());
        assert!(profile_attribute("address", &json!({"city": "Paris"})).is_err());
        assert!(profile_attribute("bio", &json!("x".repeat(301))).is_err());
        assert!(profile_attribute("gone", &Value::Null).is_ok());
    }

    #[test]
    fn event_attributes_keep_objects_numbers_and_reserved_keys() {
        let properties = json!({
            "$label": "spring",
            "$tags": ["a"],
            "accountType": "Facebook",
            "items": [{"unitPrice": 3}],
            "scores": [1, 2.5],
            "shippedAt": "2024-05-01T12:00:00+02:00",
            "empty": null
        });
        let (attributes, rejected) =
            event_attributes(properties.as_object().unwrap(), "properties");
        assert_eq!(
            Value::Object(attributes),
            json!({
                "$label": "spring",
                "$tags": ["a"],
                "account_type": "Facebook",
                "items": [{"unit_price": 3}],
                "scores": [1, 2.5],
                "date(shipped_at)": "2024-05-01T10:00:00Z"
            })
        );
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].0, "properties.empty");
    }
}
