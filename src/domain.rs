//! Parse-don't-validate types shared by the whole crate: attribute keys and definition kinds.

use std::fmt;

use crate::batch::limits::MAX_ATTRIBUTE_NAME_CHARS;

/// A custom attribute (and definition) key Batch accepts: `[a-z0-9_]`, 1 to 30 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttributeKey(String);

/// Why a string is not an [`AttributeKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is empty")]
    Empty,
    #[error("is {0} characters long; Batch allows at most {MAX_ATTRIBUTE_NAME_CHARS}")]
    TooLong(usize),
    #[error("contains {0:?}; Batch allows only lowercase a-z, digits 0-9 and _")]
    BadCharacter(char),
}

impl AttributeKey {
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
        {
            return Err(KeyError::BadCharacter(bad));
        }
        let len = raw.chars().count();
        if len > MAX_ATTRIBUTE_NAME_CHARS {
            return Err(KeyError::TooLong(len));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The key a definition gets from its display name when none is given: snake_case with heck.
    pub fn derive_from_name(name: &str) -> Result<Self, KeyError> {
        use heck::ToSnakeCase;
        Self::parse(&name.to_snake_case())
    }

    /// A key that would pass, offered in errors when a name does not snake_case into a valid key.
    pub fn suggest_for(name: &str) -> String {
        use heck::ToSnakeCase;
        let cleaned: String = name
            .to_snake_case()
            .chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let mut suggestion: String = cleaned.chars().take(MAX_ATTRIBUTE_NAME_CHARS).collect();
        while suggestion.ends_with('_') {
            suggestion.pop();
        }
        if suggestion.is_empty() {
            "my_audience".to_owned()
        } else {
            suggestion
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AttributeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a definition computes. Stored in the `definitions` table as text, and the name of its
/// config section (`[[audience]]`, `[[computed_trait]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefinitionKind {
    /// A set of users: `{key: true}` on entering, `{key: false}` on leaving.
    Audience,
    /// A value per user: `{key: value}` when it changes, deleted (null) when the user leaves.
    ComputedTrait,
}

impl DefinitionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DefinitionKind::Audience => "audience",
            DefinitionKind::ComputedTrait => "computed_trait",
        }
    }

    /// The value sent when a user leaves the definition's result: `false` for an audience, null
    /// (which deletes the attribute) for a computed trait.
    pub fn removal_value(self) -> serde_json::Value {
        match self {
            DefinitionKind::Audience => serde_json::Value::Bool(false),
            DefinitionKind::ComputedTrait => serde_json::Value::Null,
        }
    }

    /// The event attribute that names the definition in its Track events.
    pub fn event_key_attribute(self) -> &'static str {
        match self {
            DefinitionKind::Audience => "audience_key",
            DefinitionKind::ComputedTrait => "trait_key",
        }
    }

    /// Segment's event names, in Batch's spelling.
    pub fn default_track_events(self) -> crate::config::TrackEvents {
        let name = |text: &str| AttributeKey::parse(text).expect("valid event name");
        match self {
            DefinitionKind::Audience => crate::config::TrackEvents {
                entered: name("audience_entered"),
                exited: name("audience_exited"),
            },
            DefinitionKind::ComputedTrait => crate::config::TrackEvents {
                entered: name("trait_computed"),
                exited: name("trait_computed"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_names_snake_case_into_keys() {
        let key = AttributeKey::derive_from_name("Order Completed Last 30 Days").unwrap();
        assert_eq!(key.as_str(), "order_completed_last_30_days");
        assert_eq!(
            AttributeKey::derive_from_name("High-Value Customers")
                .unwrap()
                .as_str(),
            "high_value_customers"
        );
    }

    #[test]
    fn keys_outside_batch_rules_are_refused_with_the_reason() {
        assert_eq!(AttributeKey::parse(""), Err(KeyError::Empty));
        assert_eq!(
            AttributeKey::parse("Plan"),
            Err(KeyError::BadCharacter('P'))
        );
        assert_eq!(
            AttributeKey::parse("$email_address"),
            Err(KeyError::BadCharacter('$'))
        );
        assert_eq!(
            AttributeKey::parse(&"a".repeat(31)),
            Err(KeyError::TooLong(31))
        );
        assert!(AttributeKey::parse(&"a".repeat(30)).is_ok());
        assert_eq!(
            AttributeKey::derive_from_name("Café Lovers"),
            Err(KeyError::BadCharacter('é'))
        );
    }

    #[test]
    fn suggestions_are_valid_keys() {
        for name in [
            "Customers Who Ordered In The Last Thirty Days Twice",
            "Café Lovers",
            "日本",
        ] {
            let suggestion = AttributeKey::suggest_for(name);
            assert!(
                AttributeKey::parse(&suggestion).is_ok(),
                "{name} → {suggestion}"
            );
        }
    }
}
