//! The seed's fixed table of native Batch attributes: e-mail, phone, marketing consents, time zone,
//! language and region. Each function takes the Segment value and returns the Batch value, or a
//! reason the value cannot be sent (the attribute is then rejected, never guessed at).

use serde_json::Value;

use crate::batch::limits::MAX_STRING_VALUE_CHARS;

/// `traits.email` → `$email_address`: trimmed, must look like an address.
pub fn email_address(value: &Value) -> Result<Value, String> {
    let text = text_of(value, "an e-mail address")?;
    let text = text.trim();
    let well_formed = text
        .split_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && !text.chars().any(char::is_whitespace)
        && text.chars().count() <= MAX_STRING_VALUE_CHARS;
    if well_formed {
        Ok(Value::String(text.to_owned()))
    } else {
        Err(format!("{text:?} is not an e-mail address"))
    }
}

/// `traits.phone` → `$phone_number` in E.164. Separators (spaces, dots, dashes, parentheses) are
/// dropped and a leading `00` becomes `+`. A number without a country code is ambiguous (`06…`
/// could be French or Dutch), so it is rejected rather than given a guessed prefix.
pub fn phone_number(value: &Value) -> Result<Value, String> {
    let original = match value {
        Value::String(text) => text.trim().to_owned(),
        Value::Number(number) => number.to_string(),
        _ => return Err("a phone number must be a string".to_owned()),
    };
    let compact: String = original
        .chars()
        .filter(|c| !matches!(c, ' ' | '.' | '-' | '(' | ')' | '/' | '\u{a0}'))
        .collect();
    let digits = if let Some(rest) = compact.strip_prefix('+') {
        rest
    } else if let Some(rest) = compact.strip_prefix("00") {
        rest
    } else {
        return Err(format!(
            "{original:?} has no country code (+33…, 0033…), so its E.164 form is ambiguous"
        ));
    };
    if digits.starts_with('0')
        || !(8..=15).contains(&digits.len())
        || !digits.chars().all(|c| c.is_ascii_digit())
    {
        return Err(format!(
            "{original:?} is not a phone number (E.164: + then 8 to 15 digits)"
        ));
    }
    Ok(Value::String(format!("+{digits}")))
}

/// `traits.email_marketing` / `traits.sms_marketing`: `subscribed`, `unsubscribed`, or `reset`
/// (null: Batch forgets the consent).
pub fn marketing_consent(value: &Value) -> Result<Value, String> {
    if value.is_null() {
        return Ok(Value::Null);
    }
    let text = text_of(value, "subscribed, unsubscribed or reset")?;
    match text.trim().to_ascii_lowercase().as_str() {
        "subscribed" => Ok(Value::from("subscribed")),
        "unsubscribed" => Ok(Value::from("unsubscribed")),
        "reset" => Ok(Value::Null),
        _ => Err(format!(
            "{text:?} is not a consent: use subscribed, unsubscribed or reset"
        )),
    }
}

/// `context.timezone` → `$timezone`, checked against the IANA database.
pub fn timezone(value: &Value) -> Result<Value, String> {
    let text = text_of(value, "an IANA time zone name")?;
    match text.trim().parse::<chrono_tz::Tz>() {
        Ok(zone) => Ok(Value::String(zone.name().to_owned())),
        Err(_) => Err(format!(
            "{text:?} is not an IANA time zone name (for example Europe/Paris)"
        )),
    }
}

/// A locale split into Batch's `$language` (ISO-639, lowercase) and, when it names one,
/// `$region` (ISO-3166, uppercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locale {
    pub language: String,
    pub region: Option<String>,
}

/// `context.locale`: `fr-FR`, `fr_FR`, `FR-fr`, `zh-Hant-TW` (the script is skipped) and `fr` (no
/// region) are all understood. Subtags are separated by `-` or `_`; an encoding suffix
/// (`en_US.UTF-8`) is ignored.
pub fn locale(value: &Value) -> Result<Locale, String> {
    let text = text_of(value, "a locale such as fr-FR")?;
    let trimmed = text.trim();
    let without_encoding = trimmed.split(['.', '@']).next().unwrap_or_default();
    let mut subtags = without_encoding.split(['-', '_']);
    let language = subtags.next().unwrap_or_default();
    if language.len() != 2 || !language.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(format!(
            "{text:?} does not start with a two-letter language code (ISO-639-1)"
        ));
    }
    let mut region = None;
    for subtag in subtags {
        let letters = subtag.chars().all(|c| c.is_ascii_alphabetic());
        match subtag.len() {
            // A script (Hant, Latn): not something Batch stores.
            4 if letters => continue,
            2 if letters => {
                region = Some(subtag.to_ascii_uppercase());
                break;
            }
            // UN M.49 areas (419) and variants have no ISO-3166 two-letter equivalent.
            _ => break,
        }
    }
    Ok(Locale {
        language: language.to_ascii_lowercase(),
        region,
    })
}

fn text_of<'v>(value: &'v Value, expected: &str) -> Result<&'v str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("expected {expected}, got {value}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn locale_of(text: &str) -> (String, Option<String>) {
        let locale = locale(&json!(text)).unwrap();
        (locale.language, locale.region)
    }

    #[test]
    fn locales_give_language_and_region_only_when_named() {
        let fr_fr = ("fr".to_owned(), Some("FR".to_owned()));
        assert_eq!(locale_of("fr-FR"), fr_fr);
        assert_eq!(locale_of("fr_FR"), fr_fr);
        assert_eq!(locale_of("FR-fr"), fr_fr);
        assert_eq!(locale_of("en_US.UTF-8"), ("en".into(), Some("US".into())));
        assert_eq!(locale_of("zh-Hant-TW"), ("zh".into(), Some("TW".into())));
        assert_eq!(locale_of("fr"), ("fr".into(), None));
        assert_eq!(locale_of("es-419"), ("es".into(), None));
        assert!(locale(&json!("french")).is_err());
        assert!(locale(&json!(42)).is_err());
    }

    #[test]
    fn phone_numbers_become_e164_or_are_rejected() {
        assert_eq!(
            phone_number(&json!("+33600000000")),
            Ok(json!("+33600000000"))
        );
        assert_eq!(
            phone_number(&json!("+33 6 00 00 00 00")),
            Ok(json!("+33600000000"))
        );
        assert_eq!(
            phone_number(&json!("0033 (6) 00-00-00-00")),
            Ok(json!("+33600000000"))
        );
        let national = phone_number(&json!("06 00 00 00 00")).unwrap_err();
        assert!(national.contains("country code"), "{national}");
        assert!(phone_number(&json!("+33abc")).is_err());
        assert!(phone_number(&json!("+0123456789")).is_err());
        assert!(phone_number(&json!("+1234")).is_err());
    }

    #[test]
    fn consents_timezones_and_emails_are_checked() {
        assert_eq!(
            marketing_consent(&json!("Subscribed")),
            Ok(json!("subscribed"))
        );
        assert_eq!(marketing_consent(&json!("reset")), Ok(Value::Null));
        assert!(marketing_consent(&json!("yes")).is_err());
        assert_eq!(timezone(&json!("Europe/Paris")), Ok(json!("Europe/Paris")));
        assert!(timezone(&json!("Europe/Atlantis")).is_err());
        assert!(timezone(&json!("+02:00")).is_err());
        assert_eq!(
            email_address(&json!(" peter@example.com ")),
            Ok(json!("peter@example.com"))
        );
        assert!(email_address(&json!("peter")).is_err());
    }
}
