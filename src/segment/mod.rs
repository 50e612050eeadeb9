//! Segment-spec identify/track messages → Batch profile operations, as the product page in
//! `shared/seed/` describes, without the defects of Segment's own Batch destination (listed in
//! `shared/docs/batch-api.md`; each has a test below or in the submodules).

pub mod mapping;
pub mod natives;
pub mod values;

pub use mapping::{
    map_message, FieldMapping, FieldRejection, Mapped, MappingRules, MessageError, MessageType,
    OperationView, Path,
};

/// What `engage-sync preview` prints for one message: the operation(s) on stdout, each rejection
/// on stderr, and whether the message could be mapped at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub stdout: String,
    pub stderr: String,
    pub mapped: bool,
}

/// Maps one message given as JSON text, for `preview` ("Send test record"): nothing is sent.
pub fn preview(input: &str, rules: &MappingRules, now: chrono::DateTime<chrono::Utc>) -> Preview {
    let refused = |reason: String| Preview {
        stdout: String::new(),
        stderr: format!("rejected: {reason}\n"),
        mapped: false,
    };
    let message: serde_json::Value = match serde_json::from_str(input) {
        Ok(message) => message,
        Err(error) => return refused(format!("the input is not one JSON message: {error}")),
    };
    let mapped = match map_message(&message, rules, now) {
        Ok(mapped) => mapped,
        Err(error) => return refused(error.to_string()),
    };
    let mut stderr = String::new();
    for rejection in &mapped.rejections {
        let target = rejection
            .attribute
            .as_deref()
            .map(|attribute| format!(" (→ {attribute})"))
            .unwrap_or_default();
        stderr.push_str(&format!(
            "rejected {}{target}: {}\n",
            rejection.field, rejection.reason
        ));
    }
    let operations = mapped.operations();
    let stdout = match operations.as_slice() {
        [] => {
            stderr.push_str("nothing to send: the message maps to no attribute and no event\n");
            String::new()
        }
        [operation] => serde_json::to_string_pretty(operation).expect("serializable") + "\n",
        several => serde_json::to_string_pretty(several).expect("serializable") + "\n",
    };
    Preview {
        stdout,
        stderr,
        mapped: true,
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration, Utc};
    use serde_json::{json, Value};

    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-12-03T12:00:00Z".parse().unwrap()
    }

    fn map(message: Value) -> Mapped {
        map_message(&message, &MappingRules::default(), now()).expect("maps")
    }

    fn operation(mapped: &Mapped) -> Value {
        let operations = mapped.operations();
        assert_eq!(operations.len(), 1, "one operation");
        serde_json::to_value(operations[0]).unwrap()
    }

    /// The seed's `analytics.identify(…)` example, as the JSON Segment sends.
    fn seed_identify() -> Value {
        serde_json::from_str(include_str!("../../tests/fixtures/seed-identify.json")).unwrap()
    }

    #[test]
    fn the_seed_identify_becomes_the_seed_payload_in_its_order() {
        let mapped = map(seed_identify());
        assert!(mapped.rejections.is_empty(), "{:?}", mapped.rejections);
        let text = serde_json::to_string(&mapped.operations()[0]).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"identifiers":{"custom_id":"97980cfea0067"},"attributes":{"#,
                r#""$email_address":"peter@example.com","$phone_number":"+33600000000","#,
                r#""$email_marketing":"subscribed","$sms_marketing":"unsubscribed","#,
                r#""$language":"fr","$region":"FR","$timezone":"Europe/Paris","#,
                r#""name":"Peter Gibbons","plan":"premium","logins":5}}"#
            )
        );
    }

    #[test]
    fn the_seed_track_becomes_a_user_registered_event_at_its_time() {
        let mapped = map(json!({
            "type": "track",
            "userId": "97980cfea0067",
            "event": "User Registered",
            "properties": {"plan": "Pro Annual", "accountType": "Facebook"},
            "timestamp": "2026-12-03T11:59:00+01:00"
        }));
        assert_eq!(
            operation(&mapped),
            json!({
                "identifiers": {"custom_id": "97980cfea0067"},
                "events": [{
                    "name": "user_registered",
                    "time": "2026-12-03T10:59:00.000Z",
                    "attributes": {"plan": "Pro Annual", "account_type": "Facebook"}
                }]
            })
        );
    }

    // Defect 1: the 50-attribute cut counts only attributes actually present.
    #[test]
    fn fifty_custom_traits_all_survive_without_natives() {
        let traits: serde_json::Map<String, Value> =
            (0..50).map(|i| (format!("trait_{i}"), json!(i))).collect();
        let mapped = map(json!({"type": "identify", "userId": "u1", "traits": traits}));
        assert_eq!(mapped.attributes.len(), 50);
        assert_eq!(mapped.operations().len(), 1);
        // Beyond 50, the rest follows in a second operation instead of being cut.
        let traits: serde_json::Map<String, Value> =
            (0..60).map(|i| (format!("trait_{i}"), json!(i))).collect();
        let mapped = map(json!({"type": "identify", "userId": "u1", "traits": traits}));
        let operations = mapped.operations();
        assert_eq!(operations.len(), 2);
        assert_eq!(
            operations[0].attributes.len() + operations[1].attributes.len(),
            60
        );
    }

    // Defect 2: an empty attributes object is left out.
    #[test]
    fn an_identify_without_traits_sends_no_empty_attributes() {
        let mapped = map(json!({"type": "identify", "userId": "u1", "traits": {}}));
        assert!(mapped.operations().is_empty());
        let mapped = map(json!({"type": "track", "userId": "u1", "event": "Opened"}));
        let json = operation(&mapped);
        assert!(json.get("attributes").is_none(), "{json}");
        assert!(json["events"][0].get("attributes").is_none(), "{json}");
    }

    // Defect 3: every key is cleaned and cut to 30; colliding keys are reported, not merged.
    #[test]
    fn keys_are_cleaned_cut_and_collisions_reported() {
        let mapped = map(json!({
            "type": "identify",
            "userId": "u1",
            "traits": {
                "Favourite Colour": "blue",
                "favouriteColour": "red",
                "loginCount": 3,
                "a trait name that is far too long for batch": true
            }
        }));
        let names: Vec<&str> = mapped.attributes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "favourite_colour",
                "login_count",
                "a_trait_name_that_is_far_too_l"
            ]
        );
        assert_eq!(mapped.rejections.len(), 1);
        let rejection = &mapped.rejections[0];
        assert_eq!(rejection.field, "traits.favouriteColour");
        assert!(
            rejection.reason.contains("traits.Favourite Colour"),
            "{}",
            rejection.reason
        );
    }

    // Defect 4: arrays of strings reach profile attributes.
    #[test]
    fn string_arrays_are_profile_attributes() {
        let mapped = map(
            json!({"type": "identify", "userId": "u1", "traits": {"interests": ["golf", "jazz"]}}),
        );
        assert_eq!(
            operation(&mapped)["attributes"],
            json!({"interests": ["golf", "jazz"]})
        );
    }

    // Defect 5: `$label` (and `$tags`) keep their `$`.
    #[test]
    fn label_and_tags_keep_their_dollar() {
        let mapped = map(json!({
            "type": "track", "userId": "u1", "event": "Promo Viewed",
            "properties": {"$label": "spring", "$tags": ["sale"]}
        }));
        assert_eq!(
            operation(&mapped)["events"][0]["attributes"],
            json!({"$label": "spring", "$tags": ["sale"]})
        );
    }

    // Defect 6: dates with an offset or without `Z` become dates; arrays of numbers stay.
    #[test]
    fn offset_dates_become_utc_dates_and_number_arrays_stay() {
        let mapped = map(json!({
            "type": "identify", "userId": "u1",
            "traits": {"signedUpAt": "2024-05-01T12:00:00+02:00", "birthday": "1989-07-20T00:00:00"}
        }));
        assert_eq!(
            operation(&mapped)["attributes"],
            json!({"date(signed_up_at)": "2024-05-01T10:00:00Z", "date(birthday)": "1989-07-20T00:00:00Z"})
        );
        let mapped = map(json!({
            "type": "track", "userId": "u1", "event": "Quiz Done",
            "properties": {"scores": [3, 4.5], "at": "2026-12-03T12:30:00+02:00"}
        }));
        assert_eq!(
            operation(&mapped)["events"][0]["attributes"],
            json!({"scores": [3, 4.5], "date(at)": "2026-12-03T10:30:00Z"})
        );
    }

    // Defect 7: locales are split with the right case; time zones are checked.
    #[test]
    fn locales_and_time_zones_are_normalised_and_checked() {
        let attributes = |locale: &str, zone: &str| {
            let mapped = map(json!({
                "type": "identify", "userId": "u1",
                "context": {"locale": locale, "timezone": zone}
            }));
            (
                mapped
                    .attributes
                    .iter()
                    .map(|a| (a.name.clone(), a.value.clone()))
                    .collect::<Vec<_>>(),
                mapped.rejections,
            )
        };
        let (fr, rejected) = attributes("fr", "Europe/Paris");
        assert_eq!(
            fr,
            [
                ("$language".to_owned(), json!("fr")),
                ("$timezone".to_owned(), json!("Europe/Paris"))
            ]
        );
        assert!(rejected.is_empty());
        let (en_us, _) = attributes("en_US", "America/New_York");
        assert_eq!(en_us[1], ("$region".to_owned(), json!("US")));
        let (zh, _) = attributes("zh-Hant-TW", "Asia/Taipei");
        assert_eq!(zh[0], ("$language".to_owned(), json!("zh")));
        assert_eq!(zh[1], ("$region".to_owned(), json!("TW")));
        let (_, rejected) = attributes("FR-fr", "Paris");
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].field, "context.timezone");
    }

    // Defect 8: events carry their time; one older than Batch's window is refused with a reason.
    #[test]
    fn events_carry_their_time_and_stale_ones_are_refused() {
        let stale = (now() - Duration::hours(25)).to_rfc3339();
        let mapped =
            map(json!({"type": "track", "userId": "u1", "event": "Old", "timestamp": stale}));
        assert!(mapped.event.is_none());
        assert!(mapped.rejections[0].reason.contains("24 hours"));
        let mapped = map(json!({"type": "track", "userId": "u1", "event": "New"}));
        assert_eq!(
            mapped.event.unwrap()["time"],
            json!("2026-12-03T12:00:00.000Z")
        );
    }

    // Defect 11: only custom_id is sent, whatever other identifiers the message holds.
    #[test]
    fn only_custom_id_is_sent_as_identifier() {
        let mapped = map(json!({
            "type": "identify", "userId": "u1", "anonymousId": "anon-1",
            "identifiers": {"installation": "i-1", "email": "x@example.com"},
            "traits": {"plan": "pro"}
        }));
        assert_eq!(
            operation(&mapped)["identifiers"],
            json!({"custom_id": "u1"})
        );
    }

    // Defect 12: no userId is a clear rejection, unless a fallback is configured.
    #[test]
    fn a_message_without_user_id_is_refused_or_uses_the_fallback() {
        let message = json!({"type": "track", "anonymousId": "anon-1", "event": "Opened"});
        let error = map_message(&message, &MappingRules::default(), now()).unwrap_err();
        assert!(error.to_string().contains("no userId"), "{error}");
        let rules = MappingRules {
            identifier_fallback: Some(Path::parse("anonymousId").unwrap()),
            ..MappingRules::default()
        };
        let mapped = map_message(&message, &rules, now()).unwrap();
        assert_eq!(mapped.custom_id, "anon-1");
    }

    #[test]
    fn custom_mappings_rename_and_can_replace_the_default_traits() {
        let rules = MappingRules {
            fields: vec![FieldMapping::parse("traits.plan", "attributes.plan_tier").unwrap()],
            custom_traits: false,
            identifier_fallback: None,
        };
        let mapped = map_message(&seed_identify(), &rules, now()).unwrap();
        let names: Vec<&str> = mapped.attributes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "$email_address",
                "$phone_number",
                "$email_marketing",
                "$sms_marketing",
                "$language",
                "$region",
                "$timezone",
                "plan_tier"
            ]
        );
        let with_defaults = MappingRules {
            custom_traits: true,
            ..rules
        };
        let mapped = map_message(&seed_identify(), &with_defaults, now()).unwrap();
        let names: Vec<&str> = mapped.attributes.iter().map(|a| a.name.as_str()).collect();
        assert!(names.contains(&"plan_tier") && !names.contains(&"plan"));
        assert!(names.contains(&"name") && names.contains(&"logins"));
        assert!(FieldMapping::parse("traits.plan", "plan").is_err());
        assert!(FieldMapping::parse("traits..plan", "attributes.plan").is_err());
        assert!(FieldMapping::parse("traits.plan", "attributes.$plan").is_err());
        assert!(FieldMapping::parse("traits.signup", "attributes.date(signup)").is_ok());
    }

    #[test]
    fn bad_native_values_are_rejected_with_reasons_and_the_rest_goes() {
        let mapped = map(json!({
            "type": "identify", "userId": "u1",
            "traits": {"phone": "06 00 00 00 00", "email_marketing": "reset", "address": {"city": "Paris"}, "plan": "pro"}
        }));
        assert_eq!(
            operation(&mapped)["attributes"],
            json!({"$email_marketing": null, "plan": "pro"})
        );
        let fields: Vec<&str> = mapped.rejections.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(fields, ["traits.phone", "traits.address"]);
    }

    #[test]
    fn context_traits_count_and_traits_win() {
        let mapped = map(json!({
            "type": "identify", "userId": "u1",
            "traits": {"plan": "pro"},
            "context": {"traits": {"plan": "free", "email": "a@example.com", "seats": 4}}
        }));
        assert_eq!(
            operation(&mapped)["attributes"],
            json!({"$email_address": "a@example.com", "plan": "pro", "seats": 4})
        );
    }

    #[test]
    fn preview_prints_the_operation_and_reasons_apart() {
        let preview = preview(
            r#"{"type":"identify","userId":"u1","traits":{"plan":"pro","phone":"0600"}}"#,
            &MappingRules::default(),
            now(),
        );
        assert!(preview.mapped);
        let printed: Value = serde_json::from_str(&preview.stdout).unwrap();
        assert_eq!(
            printed,
            json!({"identifiers": {"custom_id": "u1"}, "attributes": {"plan": "pro"}})
        );
        assert!(preview
            .stderr
            .starts_with("rejected traits.phone (→ $phone_number): "));
        let broken = super::preview("{", &MappingRules::default(), now());
        assert!(!broken.mapped && broken.stderr.contains("not one JSON message"));
    }

    /// Audience and trait changes are built in SQL for speed; they must read exactly as the same
    /// change sent as an identify or a track through this mapping would.
    #[test]
    fn definition_changes_match_their_identify_and_track_forms() {
        let identify = map(json!({
            "type": "identify", "userId": "u1",
            "traits": {"order_completed_last_30_days": true, "last_order_at": "2026-09-23T05:09:54Z"}
        }));
        assert_eq!(
            operation(&identify)["attributes"],
            json!({"order_completed_last_30_days": true, "date(last_order_at)": "2026-09-23T05:09:54Z"})
        );
        let track = map(json!({
            "type": "track", "userId": "u1", "event": "Audience Entered",
            "properties": {"audience_key": "vip", "vip": true}
        }));
        let event = track.event.unwrap();
        assert_eq!(event["name"], "audience_entered");
        assert_eq!(
            event["attributes"],
            json!({"audience_key": "vip", "vip": true})
        );
    }

    #[test]
    fn unsupported_types_and_bad_events_are_refused() {
        let rules = MappingRules::default();
        for (message, expected) in [
            (json!({"type": "page", "userId": "u1"}), "not forwarded"),
            (json!({"userId": "u1"}), "no type"),
            (json!({"type": "track", "userId": "u1"}), "event is missing"),
            (
                json!({"type": "track", "userId": "u1", "event": "¿¡"}),
                "usable",
            ),
            (json!([1]), "JSON object"),
            (
                json!({"type": "identify", "userId": {"id": 1}}),
                "userId must be a string",
            ),
        ] {
            let error = map_message(&message, &rules, now())
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{message}: {error}");
        }
    }
}
