//! The JSON shape of one profile operation, as `/profiles/update` and `/profiles/mass-update` take it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One profile's identifiers, attributes and events. Empty parts are left out of the JSON, since
/// Batch treats an empty `attributes` object as noise (Segment's destination sends it; we do not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub identifiers: Identifiers,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attributes: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

/// Batch takes exactly one identifier; engage-sync always uses `custom_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identifiers {
    pub custom_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub name: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attributes: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

impl Operation {
    pub fn for_custom_id(custom_id: impl Into<String>) -> Self {
        Self {
            identifiers: Identifiers {
                custom_id: custom_id.into(),
            },
            attributes: Map::new(),
            events: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_parts_are_left_out() {
        let op = Operation::for_custom_id("u1");
        assert_eq!(
            serde_json::to_value(&op).unwrap(),
            serde_json::json!({"identifiers": {"custom_id": "u1"}})
        );
    }
}
