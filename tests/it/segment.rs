//! Segment forwarding end to end: `preview`, the ingestion endpoint in `run`, and `replay`,
//! against real PostgreSQL and the Batch-compatible emulator.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{RunningDaemon, TestEnv};

const BINARY: &str = env!("CARGO_BIN_EXE_engage-sync");
const WRITE_KEY: &str = "wk_test_1234";

fn ingest_block() -> String {
    format!("[ingest]\nlisten = \"127.0.0.1:0\"\nwrite_key = \"{WRITE_KEY}\"\n")
}

/// Runs `engage-sync preview` (no config file: the seed's table) on `message`.
fn preview(message: &Value) -> (String, String, bool) {
    let mut child = Command::new(BINARY)
        .args(["--config", "/nonexistent/config.toml", "preview"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        message.to_string().as_bytes(),
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
        output.status.success(),
    )
}

#[test]
fn preview_of_the_seed_identify_prints_exactly_the_seed_payload() {
    let seed: Value = serde_json::from_str(include_str!("../fixtures/seed-identify.json")).unwrap();
    let (stdout, stderr, success) = preview(&seed);
    assert!(success, "{stderr}");
    assert_eq!(stderr, "");
    // The seed's payload, key for key and in its order.
    let seed = r#"{
  "identifiers": {
    "custom_id": "97980cfea0067"
  },
  "attributes": {
    "$email_address": "peter@example.com",
    "$phone_number": "+33600000000",
    "$email_marketing": "subscribed",
    "$sms_marketing": "unsubscribed",
    "$language": "fr",
    "$region": "FR",
    "$timezone": "Europe/Paris",
    "name": "Peter Gibbons",
    "plan": "premium",
    "logins": 5
  }
}
"#;
    assert_eq!(stdout, seed);
}

#[test]
fn preview_of_the_seed_track_prints_the_user_registered_event() {
    let seed: Value = serde_json::from_str(include_str!("../fixtures/seed-track.json")).unwrap();
    let (stdout, stderr, success) = preview(&seed);
    assert!(success, "{stderr}");
    let mut printed: Value = serde_json::from_str(&stdout).unwrap();
    let time = printed["events"][0]
        .as_object_mut()
        .unwrap()
        .remove("time")
        .expect("the event carries its time");
    assert!(chrono::DateTime::parse_from_rfc3339(time.as_str().unwrap()).is_ok());
    assert_eq!(
        printed,
        json!({
            "identifiers": {"custom_id": "97980cfea0067"},
            "events": [{
                "name": "user_registered",
                "attributes": {"plan": "Pro Annual", "account_type": "Facebook"}
            }]
        })
    );
    let (_, stderr, success) = preview(&json!({"type": "track", "event": "Opened"}));
    assert!(!success);
    assert!(stderr.contains("no userId"), "{stderr}");
}

fn post(
    http: &reqwest::Client,
    address: std::net::SocketAddr,
    path: &str,
) -> reqwest::RequestBuilder {
    http.post(format!("http://{address}{path}"))
        .basic_auth(WRITE_KEY, Some(""))
}

/// Polls the emulator until `check` holds (10 s at most).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = tokio::time::Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what} never happened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingested_messages_reach_batch_and_feed_audience_queries() {
    let env = TestEnv::new().await;
    let definitions = format!(
        "{}[[audience]]\nname = \"Order Completed Last 30 Days\"\nquery = \"SELECT user_id FROM events WHERE event = 'Order Completed' AND timestamp > now() - interval '30 days'\"\n",
        ingest_block()
    );
    let daemon = RunningDaemon::start(env.app(&definitions).await).await;
    let address = daemon.ingest.expect("ingestion is on");
    let http = reqwest::Client::new();

    let answer = post(&http, address, "/v1/track")
        .json(&json!({
            "userId": "u1", "messageId": "m-1", "event": "Order Completed",
            "properties": {"revenue": 42.5, "currency": "EUR"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        json!({"success": true})
    );
    let stored: (String, Option<String>, Value) = sqlx::query_as(
        "SELECT type, event, properties FROM events WHERE message_id = 'm-1' AND user_id = 'u1'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        (
            "track".to_owned(),
            Some("Order Completed".to_owned()),
            json!({"revenue": 42.5, "currency": "EUR"})
        )
    );
    eventually("the track reaching Batch", || {
        env.emulator.profile("u1").is_some_and(|profile| {
            profile.events.iter().any(|event| {
                event["name"] == "order_completed"
                    && event["attributes"] == json!({"revenue": 42.5, "currency": "EUR"})
            })
        })
    })
    .await;

    let answer = post(&http, address, "/v1/identify")
        .json(&json!({
            "userId": "u2", "traits": {"plan": "pro", "email": "u2@example.com"},
            "context": {"locale": "en_GB"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    eventually("the identify reaching Batch", || {
        env.emulator.profile("u2").is_some_and(|profile| {
            profile.attributes.get("plan") == Some(&json!("pro"))
                && profile.attributes.get("$email_address") == Some(&json!("u2@example.com"))
                && profile.attributes.get("$region") == Some(&json!("GB"))
        })
    })
    .await;

    // The next sync of the audience sees the ingested track.
    let app = env.app(&definitions).await;
    let report = crate::harness::sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    assert_eq!(
        env.emulator
            .custom_ids_with("order_completed_last_30_days", &json!(true)),
        ["u1"]
    );
    daemon.stop().await.unwrap();
    // What Batch acknowledged for the identify is remembered per attribute.
    let remembered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM snapshot WHERE custom_id = 'u2' AND definition_key LIKE 'identify:%'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(remembered, 4, "plan, e-mail, language and region");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_lose_nothing_already_accepted() {
    let env = TestEnv::new().await;
    let daemon = RunningDaemon::start(env.app(&ingest_block()).await).await;
    let address = daemon.ingest.unwrap();
    let http = reqwest::Client::new();
    let good = post(&http, address, "/v1/batch")
        .json(&json!({"batch": [
            {"type": "identify", "userId": "kept", "traits": {"plan": "pro"}},
            {"type": "track", "userId": "kept", "event": "Signed Up"}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);

    let big = "x".repeat(40 * 1024);
    let huge: Vec<Value> = (0..20)
        .map(|i| json!({"type": "identify", "userId": format!("h{i}"), "traits": {"bio": "x".repeat(30 * 1024)}}))
        .collect();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            http.post(format!("http://{address}/v1/identify"))
                .basic_auth("wrong", Some(""))
                .json(&json!({"userId": "x"})),
            401,
            "write key",
        ),
        (
            http.post(format!("http://{address}/v1/identify"))
                .json(&json!({"userId": "x"})),
            401,
            "write key",
        ),
        (
            post(&http, address, "/v1/identify")
                .header("content-type", "application/json")
                .body("{\"userId\": "),
            400,
            "malformed JSON",
        ),
        (
            post(&http, address, "/v1/track")
                .json(&json!({"userId": "x", "event": "Big", "properties": {"blob": big}})),
            413,
            "32 KB",
        ),
        (
            post(&http, address, "/v1/batch").json(&json!({"batch": huge})),
            413,
            "500 KB",
        ),
        (
            post(&http, address, "/v1/batch").json(&json!({"batch": [
                {"type": "identify", "userId": "y"},
                {"type": "page", "userId": "y", "name": "Home"}
            ]})),
            400,
            "message #2 of the batch: type \"page\"",
        ),
        (
            post(&http, address, "/v1/batch").json(&json!({"messages": []})),
            400,
            "\"batch\" array",
        ),
        (
            post(&http, address, "/v1/identify").json(&json!({"traits": {"plan": "pro"}})),
            400,
            "userId or an anonymousId",
        ),
    ];
    for (request, status, expected) in cases {
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), status);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["success"], json!(false));
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(expected), "{status}: {error}");
        assert!(!error.contains(WRITE_KEY));
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        stored, 2,
        "refused requests store nothing; the good batch stays"
    );
    eventually("the accepted batch reaching Batch", || {
        env.emulator.profile("kept").is_some_and(|profile| {
            profile.attributes.get("plan") == Some(&json!("pro"))
                && profile
                    .events
                    .iter()
                    .any(|event| event["name"] == "signed_up")
        })
    })
    .await;
    daemon.stop().await.unwrap();
}

fn ndjson(lines: &[String]) -> std::io::Cursor<Vec<u8>> {
    std::io::Cursor::new(lines.join("\n").into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_identifies_in_bulk_and_nothing_new_the_second_time() {
    let env = TestEnv::new().await;
    let app = env.app("").await;
    let recent = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let stale = (chrono::Utc::now() - chrono::Duration::days(3)).to_rfc3339();
    let lines = vec![
        json!({"type": "identify", "userId": "r1", "messageId": "i-1", "traits": {"plan": "free"}}).to_string(),
        json!({"type": "identify", "userId": "r1", "messageId": "i-2", "traits": {"plan": "pro", "email": "r1@example.com"}}).to_string(),
        json!({"type": "identify", "userId": "r2", "traits": {"seats": 3}}).to_string(),
        "{not json".to_owned(),
        json!({"type": "track", "userId": "r1", "messageId": "t-1", "event": "Order Completed", "timestamp": recent}).to_string(),
        json!({"type": "track", "userId": "r2", "messageId": "t-2", "event": "Order Completed", "timestamp": stale}).to_string(),
        json!({"type": "identify", "anonymousId": "a-1", "messageId": "i-3", "traits": {"plan": "pro"}}).to_string(),
    ];
    let report = engage_sync::replay::replay(&app, ndjson(&lines))
        .await
        .unwrap();
    assert_eq!(report.lines, 7);
    assert_eq!(report.bad_lines, 1);
    assert_eq!(
        report.bad_examples[0].0, 4,
        "the bad line is named by number"
    );
    assert_eq!(report.accepted.stored, 6);
    assert_eq!(report.accepted.refused_messages, 1, "no userId");
    assert_eq!(report.accepted.refused_fields, 1, "the stale event");
    assert!(matches!(
        report.end,
        engage_sync::deliver::DrainEnd::Complete
    ));

    let recorded = env.take_recorded();
    let identifies: Vec<_> = recorded
        .iter()
        .filter(|operation| !operation.attributes.is_empty())
        .collect();
    assert!(identifies
        .iter()
        .all(|operation| operation.endpoint == "profiles/mass-update"));
    // The later identify wins; the earlier value is never sent.
    assert_eq!(
        env.emulator.profile("r1").unwrap().attributes,
        json!({"plan": "pro", "$email_address": "r1@example.com"})
            .as_object()
            .unwrap()
            .clone()
    );
    let events: Vec<_> = recorded
        .iter()
        .flat_map(|operation| operation.events.iter().map(move |e| (operation, e)))
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0.endpoint, "profiles/update");
    assert_eq!(events[0].1["name"], "order_completed");
    let stale_reason: String = sqlx::query_scalar(
        "SELECT reason FROM rejections WHERE definition_key LIKE 'message:t-2/%'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(stale_reason.contains("24 hours"), "{stale_reason}");
    let forwarding = engage_sync::status::load_forwarding(&env.pool)
        .await
        .unwrap()
        .expect("messages were stored");
    assert_eq!(
        (forwarding.messages, forwarding.pending, forwarding.rejected),
        (6, 0, 2),
        "the message without userId and the stale event are on record"
    );
    assert!(forwarding
        .render()
        .starts_with("Segment forwarding: 6 message(s) stored"));

    // Twice: every message is already stored, nothing is sent.
    let again = engage_sync::replay::replay(&app, ndjson(&lines))
        .await
        .unwrap();
    assert_eq!(again.accepted.stored, 0);
    assert_eq!(again.accepted.duplicates, 6);
    assert_eq!(again.accepted.queued, 0);
    assert!(env.take_recorded().is_empty());
    // A new message repeating acknowledged values sends nothing either.
    let repeat = vec![
        json!({"type": "identify", "userId": "r1", "messageId": "i-9", "traits": {"plan": "pro"}})
            .to_string(),
    ];
    let report = engage_sync::replay::replay(&app, ndjson(&repeat))
        .await
        .unwrap();
    assert_eq!((report.accepted.stored, report.accepted.queued), (1, 0));
    assert!(env.take_recorded().is_empty());
}

// Defects 9 and 10: Batch's partial errors on single events are recorded, each with its own
// reason, and the event Batch applied beside them in the same operation is not marked refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_errors_on_events_are_each_recorded_with_their_reason() {
    let env = TestEnv::new().await;
    let app = env.app("").await;
    // Events over Batch's 25 KB pass the mapping (the size is Batch's rule) and are refused there.
    let blob = "y".repeat(250);
    let properties: serde_json::Map<String, Value> =
        (0..110).map(|i| (format!("p{i}"), json!(blob))).collect();
    let lines = vec![
        json!({"type": "identify", "userId": "e1", "messageId": "i-1", "traits": {"plan": "pro"}}).to_string(),
        json!({"type": "track", "userId": "e1", "messageId": "t-1", "event": "Big One", "properties": properties}).to_string(),
        json!({"type": "track", "userId": "e1", "messageId": "t-2", "event": "Big Two", "properties": properties}).to_string(),
        json!({"type": "track", "userId": "e1", "messageId": "t-3", "event": "Small"}).to_string(),
    ];
    let report = engage_sync::replay::replay(&app, ndjson(&lines))
        .await
        .unwrap();
    assert!(matches!(
        report.end,
        engage_sync::deliver::DrainEnd::Complete
    ));
    assert_eq!(report.delivery.rejected, 2);
    let rejected: Vec<(String, String)> =
        sqlx::query_as("SELECT definition_key, reason FROM rejections ORDER BY definition_key")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        rejected
            .iter()
            .map(|(key, _)| key.as_str())
            .collect::<Vec<_>>(),
        ["track:t-1", "track:t-2"]
    );
    assert!(rejected.iter().all(|(_, reason)| reason.contains("bytes")));
    let profile = env.emulator.profile("e1").unwrap();
    assert_eq!(profile.attributes.get("plan"), Some(&json!("pro")));
    assert_eq!(profile.events.len(), 1);
    let acknowledged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM snapshot WHERE definition_key = 'identify:plan'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(acknowledged, 1);
}
