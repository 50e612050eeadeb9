//! Definition lifecycle: backfill after data loss, orphaned keys, retire.

use serde_json::json;

use crate::harness::{audience, ids, sync, values_by_user, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_resends_current_members_through_the_bulk_lane_only() {
    let env = TestEnv::new().await;
    env.set_members("m", &ids("u", 0..100)).await;
    let app = env.app(&audience("Members", "m")).await;
    assert!(sync(&app).await.is_success());
    env.set_members("m", &ids("u", 10..100)).await;
    assert!(sync(&app).await.is_success());
    env.take_recorded();

    env.emulator.clear_profiles();
    let report = engage_sync::sync::backfill(&app, "members").await.unwrap();
    assert!(report.is_success(), "{:?}", report.failure_reason());
    assert_eq!(report.definitions[0].added, 90);
    let recorded = env.take_recorded();
    assert!(recorded
        .iter()
        .all(|op| op.endpoint == "profiles/mass-update"));
    let sent = values_by_user(&recorded, "members");
    assert_eq!(sent.keys().cloned().collect::<Vec<_>>(), ids("u", 10..100));
    assert!(
        sent.values().all(|values| values == &vec![json!(true)]),
        "no false for non-members"
    );
    assert_eq!(
        env.emulator.custom_ids_with("members", &json!(true)),
        ids("u", 10..100)
    );

    let error = engage_sync::sync::backfill(&app, "nope")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("\"nope\""), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_definition_is_orphaned_until_retired() {
    let env = TestEnv::new().await;
    env.set_members("a", &ids("u", 0..30)).await;
    env.set_members("b", &ids("u", 0..5)).await;
    let both = format!("{}{}", audience("Old Audience", "a"), audience("Kept", "b"));
    let app = env.app(&both).await;
    assert!(sync(&app).await.is_success());
    env.set_members("a", &ids("u", 0..20)).await; // ten get `false`
    assert!(sync(&app).await.is_success());
    assert_eq!(
        env.emulator
            .custom_ids_with("old_audience", &json!(false))
            .len(),
        10
    );

    let kept_only = env.app(&audience("Kept", "b")).await;
    let refused = engage_sync::sync::retire(&app, "old_audience")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("still in the configuration"), "{refused}");

    let rows = engage_sync::status::load(&kept_only.pool, &kept_only.config.keys())
        .await
        .unwrap();
    let old = rows.iter().find(|row| row.key == "old_audience").unwrap();
    assert!(old.orphaned);
    assert_eq!(old.members, 20);
    assert!(engage_sync::status::render(&rows).contains("engage-sync retire old_audience"));

    let report = engage_sync::sync::retire(&kept_only, "old_audience")
        .await
        .unwrap();
    assert_eq!(report.end, engage_sync::deliver::DrainEnd::Complete);
    assert_eq!(
        report.profiles, 30,
        "members and ex-members both hold the attribute"
    );
    for id in ids("u", 0..30) {
        let profile = env.emulator.profile(&id).unwrap();
        assert!(
            !profile.attributes.contains_key("old_audience"),
            "{id} still has it"
        );
    }
    assert_eq!(
        env.emulator.custom_ids_with("kept", &json!(true)),
        ids("u", 0..5)
    );
    let rows = engage_sync::status::load(&kept_only.pool, &kept_only.config.keys())
        .await
        .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        vec!["kept"]
    );

    let again = engage_sync::sync::retire(&kept_only, "old_audience")
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("has ever been synced"), "{again}");
}
