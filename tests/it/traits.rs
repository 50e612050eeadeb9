//! Computed traits, Track events and Batch custom audiences, end to end.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sqlx::Executor;

use crate::harness::{audience, ids, sync, values_by_user, TestEnv};

/// A `[[computed_trait]]` block reading `column` of the `traits_source` table.
fn computed_trait(name: &str, column: &str, extra: &str) -> String {
    format!(
        "[[computed_trait]]\nname = \"{name}\"\nquery = \"SELECT user_id, {column} FROM traits_source\"\n{extra}"
    )
}

/// custom_id → the events it received, in order.
fn events_by_user(
    recorded: &[engage_sync::batch::emulator::RecordedOperation],
) -> BTreeMap<String, Vec<Value>> {
    let mut by_user: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for operation in recorded {
        by_user
            .entry(operation.custom_id.clone())
            .or_default()
            .extend(operation.events.iter().cloned());
    }
    by_user.retain(|_, events| !events.is_empty());
    by_user
}

/// An event without its `time`, after checking that the time is the run's (recent, RFC 3339).
fn timeless(event: &Value) -> Value {
    let mut event = event.clone();
    let time = event
        .as_object_mut()
        .and_then(|object| object.remove("time"))
        .expect("every event carries the run's time");
    let time = chrono::DateTime::parse_from_rfc3339(time.as_str().unwrap()).expect("RFC 3339");
    let age = chrono::Utc::now().signed_duration_since(time);
    assert!(
        age >= chrono::Duration::zero() && age < chrono::Duration::minutes(2),
        "the event time is the run's: {time}"
    );
    event
}

async fn rejection(env: &TestEnv, key: &str, user: &str) -> Option<String> {
    sqlx::query_scalar("SELECT reason FROM rejections WHERE definition_key = $1 AND custom_id = $2")
        .bind(key)
        .bind(user)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trait_values_arrive_typed_as_the_mapping_says() {
    let env = TestEnv::new().await;
    env.pool
        .execute(
            "CREATE TABLE traits_source (user_id text, revenue numeric, logins int, ratio float8, \
                 plan text, vip bool, last_order timestamptz, signup timestamp, birthday date, \
                 tags text[], extra jsonb, site text);
             INSERT INTO traits_source VALUES
               ('u1', 1234.50, 59, 0.25, 'premium', true, '2026-11-30 10:15:00+02', \
                '2026-01-02 03:04:05', '1989-07-20', '{a,b}', '\"gold\"', 'https://x.test/u1'),
               ('u2', NULL, -3, 1.5e-3, repeat('x', 301), false, NULL, NULL, NULL, \
                (SELECT array_agg(i::text) FROM generate_series(1, 26) i), '{\"a\": 1}', 'ftp://x'),
               ('u3', 7, 0, 'NaN', '', NULL, NULL, NULL, NULL, '{}', '12', NULL);",
        )
        .await
        .unwrap();
    let definitions = [
        computed_trait("Total Revenue 180 Days", "revenue", ""),
        computed_trait("Logins", "logins", ""),
        computed_trait("Ratio", "ratio", ""),
        computed_trait("Plan", "plan", ""),
        computed_trait("Vip", "vip", ""),
        computed_trait("Last Order", "last_order", ""),
        computed_trait("Signup", "signup", ""),
        computed_trait("Birthday", "birthday", ""),
        computed_trait("Tags", "tags", ""),
        computed_trait("Extra", "extra", ""),
        computed_trait("Site", "site", "type = \"url\"\n"),
    ]
    .concat();
    let app = env.app(&definitions).await;
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());

    let attributes = |user: &str| env.emulator.profile(user).unwrap().attributes;
    assert_eq!(
        Value::Object(attributes("u1")),
        json!({
            "total_revenue_180_days": 1234.5,
            "logins": 59,
            "ratio": 0.25,
            "plan": "premium",
            "vip": true,
            "date(last_order)": "2026-11-30T08:15:00Z",
            "date(signup)": "2026-01-02T03:04:05Z",
            "date(birthday)": "1989-07-20T00:00:00Z",
            "tags": ["a", "b"],
            "extra": "gold",
            "url(site)": "https://x.test/u1",
        })
    );
    // NULLs send nothing on a first sync; refused values are recorded, never truncated or sent.
    assert_eq!(
        Value::Object(attributes("u2")),
        json!({"logins": -3, "ratio": 0.0015, "vip": false})
    );
    assert_eq!(
        Value::Object(attributes("u3")),
        json!({"total_revenue_180_days": 7, "logins": 0, "tags": [], "extra": 12})
    );
    let plan = rejection(&env, "plan", "u2")
        .await
        .expect("u2's plan refused");
    assert!(plan.contains("301 characters"), "{plan}");
    assert!(rejection(&env, "plan", "u3")
        .await
        .unwrap()
        .contains("empty string"));
    assert!(rejection(&env, "tags", "u2")
        .await
        .unwrap()
        .contains("26 items"));
    assert!(rejection(&env, "extra", "u2")
        .await
        .unwrap()
        .contains("JSON object"));
    assert!(rejection(&env, "site", "u2")
        .await
        .unwrap()
        .contains("http"));
    assert!(rejection(&env, "ratio", "u3")
        .await
        .unwrap()
        .contains("finite"));
    assert_eq!(env.outbox_len().await, 0);

    // NULL and leaving the result both delete the attribute.
    env.take_recorded();
    env.pool
        .execute("UPDATE traits_source SET revenue = NULL WHERE user_id = 'u1'; DELETE FROM traits_source WHERE user_id = 'u3'")
        .await
        .unwrap();
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    let u1 = attributes("u1");
    assert!(!u1.contains_key("total_revenue_180_days"), "NULL deletes");
    assert_eq!(u1["logins"], json!(59), "untouched");
    assert_eq!(
        attributes("u3"),
        serde_json::Map::new(),
        "u3 left every trait"
    );
    let recorded = env.take_recorded();
    let deleted = values_by_user(&recorded, "total_revenue_180_days");
    assert_eq!(
        deleted,
        BTreeMap::from([
            ("u1".to_owned(), vec![Value::Null]),
            ("u3".to_owned(), vec![Value::Null])
        ])
    );
    assert!(
        recorded.iter().all(|operation| operation.custom_id != "u2"),
        "u2 changed nothing"
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM snapshot WHERE custom_id = 'u3' OR \
             (custom_id = 'u1' AND definition_key = 'total_revenue_180_days')"
        )
        .fetch_one(&env.pool)
        .await
        .unwrap(),
        0,
        "deleted values leave the snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_two_percent_of_values_sends_exactly_those_users() {
    let env = TestEnv::new().await;
    env.pool
        .execute(
            "CREATE TABLE traits_source AS \
             SELECT format('u%s', lpad(i::text, 5, '0')) AS user_id, i * 10 AS orders \
             FROM generate_series(0, 4999) i",
        )
        .await
        .unwrap();
    let app = env.app(&computed_trait("Orders", "orders", "")).await;
    assert!(sync(&app).await.is_success());
    assert_eq!(env.take_recorded().len(), 5000);

    // 2%: 100 users change value, none other does; 0 → 0.0 is no change.
    env.pool
        .execute(
            "UPDATE traits_source SET orders = orders + 1 WHERE user_id < 'u00100'; \
             ALTER TABLE traits_source ALTER COLUMN orders TYPE numeric",
        )
        .await
        .unwrap();
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    assert_eq!(report.definitions[0].changed, 100);
    let sent = values_by_user(&env.take_recorded(), "orders");
    let expected: BTreeMap<String, Vec<Value>> = (0..100)
        .map(|i| (format!("u{i:05}"), vec![json!(i * 10 + 1)]))
        .collect();
    assert_eq!(sent, expected);
    assert_eq!(env.outbox_len().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entered_exited_and_computed_events_carry_exactly_their_attributes() {
    let env = TestEnv::new().await;
    env.pool
        .execute(
            "CREATE TABLE traits_source (user_id text, score int); \
             INSERT INTO traits_source VALUES ('u00000', 5), ('u00001', 6)",
        )
        .await
        .unwrap();
    env.set_members("vip", &ids("u", 0..3)).await;
    let definitions = format!(
        "{}send_track = true\n{}",
        audience("VIP", "vip"),
        computed_trait(
            "Score",
            "score",
            "send_track = true\nsend_identify = false\ntrack_event = \"score_updated\"\n"
        )
    );
    let app = env.app(&definitions).await;
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());

    let recorded = env.take_recorded();
    // The first sync's attributes go through mass-update, the events through update.
    for operation in &recorded {
        match operation.endpoint {
            "profiles/mass-update" => assert!(operation.events.is_empty()),
            "profiles/update" => assert!(!operation.events.is_empty()),
            other => panic!("unexpected endpoint {other}"),
        }
    }
    assert_eq!(values_by_user(&recorded, "vip").len(), 3);
    assert!(
        values_by_user(&recorded, "score").is_empty(),
        "identify is off"
    );
    let events = events_by_user(&recorded);
    let stripped = |user: &str| -> Vec<Value> {
        let mut events: Vec<Value> = events[user].iter().map(timeless).collect();
        events.sort_by_key(|event| event["name"].to_string());
        events
    };
    assert_eq!(
        stripped("u00000"),
        vec![
            json!({"name": "audience_entered", "attributes": {"audience_key": "vip", "vip": true}}),
            json!({"name": "score_updated", "attributes": {"trait_key": "score", "score": 5}}),
        ]
    );
    assert_eq!(
        stripped("u00002"),
        vec![
            json!({"name": "audience_entered", "attributes": {"audience_key": "vip", "vip": true}})
        ]
    );

    // Later: u00001 leaves VIP, u00003 enters, u00000's score changes. Identify and track of one
    // user's change share one operation.
    let mut members = ids("u", 0..4);
    members.remove(1);
    env.set_members("vip", &members).await;
    env.pool
        .execute("UPDATE traits_source SET score = 9 WHERE user_id = 'u00000'")
        .await
        .unwrap();
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    let recorded = env.take_recorded();
    let events = events_by_user(&recorded);
    let stripped = |user: &str| -> Vec<Value> { events[user].iter().map(timeless).collect() };
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(
        stripped("u00001"),
        vec![
            json!({"name": "audience_exited", "attributes": {"audience_key": "vip", "vip": false}})
        ]
    );
    assert_eq!(
        stripped("u00003"),
        vec![
            json!({"name": "audience_entered", "attributes": {"audience_key": "vip", "vip": true}})
        ]
    );
    assert_eq!(
        stripped("u00000"),
        vec![json!({"name": "score_updated", "attributes": {"trait_key": "score", "score": 9}})]
    );
    let exit = recorded
        .iter()
        .find(|operation| operation.custom_id == "u00001")
        .unwrap();
    assert_eq!(exit.endpoint, "profiles/update");
    assert_eq!(
        Value::Object(exit.attributes.clone()),
        json!({"vip": false})
    );
    assert_eq!(exit.events.len(), 1, "attribute and event in one operation");
    assert_eq!(env.outbox_len().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_audience_adds_and_removes_exactly_the_changed_ids() {
    let env = TestEnv::new().await;
    let members = ids("u", 0..40);
    env.set_members("list", &members).await;
    env.set_members("both", &ids("b", 0..3)).await;
    let definitions = format!(
        "{}mode = \"custom_audience\"\n{}mode = \"custom_audience\"\nsend_identify = true\n",
        audience("Newsletter List", "list"),
        audience("Both Forms", "both"),
    );
    let app = env.app(&definitions).await;
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    assert_eq!(
        env.emulator.audience_members("newsletter_list"),
        Some(members.clone())
    );
    assert_eq!(
        env.emulator.audience_members("both_forms"),
        Some(ids("b", 0..3))
    );
    let recorded = env.take_recorded();
    assert!(
        values_by_user(&recorded, "newsletter_list").is_empty(),
        "the list replaces the attribute"
    );
    assert_eq!(
        values_by_user(&recorded, "both_forms").len(),
        3,
        "send_identify keeps the attribute beside the list"
    );

    // 5 leave, 3 enter: exactly those ids move.
    let mut next: Vec<String> = members[5..].to_vec();
    next.extend(ids("n", 0..3));
    env.set_members("list", &next).await;
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    let mut changes: Vec<(String, String)> = env
        .emulator
        .recorded_list_changes()
        .into_iter()
        .map(|change| {
            assert_eq!(change.audience, "newsletter_list");
            (change.action, change.id)
        })
        .collect();
    changes.sort();
    let mut expected: Vec<(String, String)> = members[..5]
        .iter()
        .map(|id| ("remove".to_owned(), id.clone()))
        .chain(ids("n", 0..3).into_iter().map(|id| ("add".to_owned(), id)))
        .collect();
    expected.sort();
    assert_eq!(changes, expected);
    next.sort();
    assert_eq!(env.emulator.audience_members("newsletter_list"), Some(next));
    assert_eq!(env.outbox_len().await, 0);
    let created: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM definitions WHERE custom_audience_created_at IS NOT NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(created, 2, "each list is created once");
}

/// A first sync's attributes go through the bulk lane and its events through `/profiles/update`
/// afterwards: the incremental worker must wait for rows still in the bulk lane rather than
/// declare the pass done while their events have yet to move over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_with_events_delivers_them_all_in_the_same_pass() {
    let env = TestEnv::new().await;
    let members = ids("u", 0..1_500);
    env.set_members("big", &members).await;
    let app = env
        .app(&format!("{}send_track = true\n", audience("Big", "big")))
        .await;
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    assert_eq!(env.outbox_len().await, 0);
    let recorded = env.take_recorded();
    assert_eq!(values_by_user(&recorded, "big").len(), members.len());
    let events = events_by_user(&recorded);
    assert_eq!(events.len(), members.len());
    assert!(events.values().all(|events| events.len() == 1));
}
