use super::*;

fn entry(seg: Seg, urgent: bool) -> Entry {
    Entry {
        path: PathBuf::new(),
        seg,
        urgent,
    }
}

#[test]
fn urgent_first_then_history_then_wal_order_and_due_retries() {
    let now = Instant::now();
    let later = now + Duration::from_secs(60);
    let failed = |retry_at| Seg::Failed {
        attempts: 1,
        retry_at,
        error: "x".into(),
        conflict: false,
    };
    let mut m = BTreeMap::new();
    m.insert(key("000000010000000000000002"), entry(Seg::Queued, false));
    m.insert(key("000000010000000000000001"), entry(failed(later), false));
    m.insert(key("00000002.history"), entry(Seg::Queued, false));
    m.insert(key("000000010000000000000009"), entry(Seg::Queued, true));
    assert_eq!(pick(&m, now).unwrap().1, "000000010000000000000009");
    m.get_mut(&key("000000010000000000000009")).unwrap().seg = Seg::Uploading;
    assert_eq!(pick(&m, now).unwrap().1, "00000002.history");
    m.get_mut(&key("00000002.history")).unwrap().seg = Seg::Archived;
    // The failed one waits for its retry time.
    assert_eq!(pick(&m, now).unwrap().1, "000000010000000000000002");
    assert_eq!(pick(&m, later).unwrap().1, "000000010000000000000001");
    // Unless Postgres asks for it.
    m.get_mut(&key("000000010000000000000001")).unwrap().urgent = true;
    assert_eq!(pick(&m, now).unwrap().1, "000000010000000000000001");
    m.clear();
    m.insert(key("000000010000000000000003"), entry(Seg::Archived, false));
    assert_eq!(pick(&m, now), None);
}

#[test]
fn backoff_doubles_up_to_the_bound() {
    let (i, m) = (Duration::from_secs(1), Duration::from_secs(30));
    assert_eq!(backoff(1, i, m), Duration::from_secs(1));
    assert_eq!(backoff(2, i, m), Duration::from_secs(2));
    assert_eq!(backoff(5, i, m), Duration::from_secs(16));
    assert_eq!(backoff(6, i, m), Duration::from_secs(30));
    assert_eq!(backoff(100, i, m), Duration::from_secs(30));
}

#[test]
fn only_wal_names_are_listed() {
    let d = tempfile::tempdir().unwrap();
    for f in [
        "000000010000000000000001.ready",
        "00000002.history.ready",
        "000000010000000000000002.done",
        "junk.ready",
    ] {
        std::fs::write(d.path().join(f), "").unwrap();
    }
    let r = ready_files(d.path());
    assert_eq!(r.len(), 2);
    assert!(r.contains("00000002.history"));
}
