//! Backups to S3: one interrupted, retention, and a point-in-time restore.

use super::*;

#[tokio::test]
async fn s3_backups_an_interrupted_one_retention_and_a_point_in_time_restore() {
    let Some(bin) = support::wal::s3s_fs() else {
        eprintln!("skipped: s3s-fs not found (.ci/run installs it)");
        return;
    };
    let probe = Sandbox::new();
    let s3 = S3Server::start(&bin, &probe.dir.path().join("s3"), BUCKET);
    let credentials = support::wal::credentials_dir(&probe);
    let s3_settings = format!(
        "[wal.s3]\nendpoint = \"{}\"\nallow_http = true\ncredentials_dir = \"{}\"\n",
        s3.endpoint(),
        credentials.display()
    );
    let a = source(&format!("s3://{BUCKET}/cluster-a"), &s3_settings);
    let warden = a.start();
    let c = a.wait_client(LONG).await;
    let config = a.config().display().to_string();
    let with_config = ["--config", config.as_str()];
    exec(&c, "CREATE TABLE t (i int)").await;
    rows(&c, 1, 10).await;
    let backup = || pgwarden_json(&a, &["backup", "--json", "--config", &config]);
    let first = backup();
    let first_id = first["id"].as_str().unwrap().to_string();

    // Interrupted mid-way (kill -9), slowed down so that it is: never listed as complete.
    support::wal::pgbench(a.port, &["-i", "-q", "-s", "2"]);
    let mut cmd = std::process::Command::new(support::binary());
    cmd.args([
        "backup",
        "--config",
        &config,
        "--part-mib",
        "1",
        "--max-rate",
        "4M",
    ]);
    let mut killed = a.spawn(cmd);
    let objects = s3.root.join(BUCKET).join("cluster-a/base");
    let deadline = Instant::now() + LONG;
    let interrupted = loop {
        let part = std::fs::read_dir(&objects).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.join("base.tar.00000").is_file() && !p.ends_with(&first_id))
        });
        if let Some(p) = part {
            break p.file_name().unwrap().to_string_lossy().into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no part uploaded: {}",
            killed.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    killed.signal(Signal::SIGKILL);
    killed.wait_exit(LONG);
    let list = pgwarden_json(&a, &["backup", "list", "--json", "--config", &config]);
    let status = |list: &Value, id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .map(|e| e["status"].as_str().unwrap().to_string())
    };
    assert_eq!(
        status(&list, &interrupted).as_deref(),
        Some("incomplete"),
        "{list}"
    );
    assert_eq!(
        status(&list, first["id"].as_str().unwrap()).as_deref(),
        Some("complete")
    );

    // The next ones work; a time between two of them for the restore.
    let second = backup();
    rows(&c, 11, 20).await;
    let t = now(&c).await;
    rows(&c, 21, 30).await;
    archive_all(&c).await;
    // Room between the two backups' ends for the retention window to start in.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third = backup();

    // Retention: a window that starts between the second's end and the third's: the second
    // stays (it is where the window's first moments are recovered from), the first and the
    // interrupted one go, and the WAL before the second's start.
    let end =
        |b: &Value| pgwarden::backup::info::parse_time(b["end_time"].as_str().unwrap()).unwrap();
    // The window starts just after the second's end now, and a little later at each command.
    let start = end(&second) + Duration::from_millis(50);
    assert!(end(&third) > start + Duration::from_secs(1));
    let window = std::time::SystemTime::now().duration_since(start).unwrap();
    let retention = format!("{}ms", window.as_millis());
    let mut wal_before: Vec<String> = std::fs::read_dir(s3.root.join(BUCKET).join("cluster-a/wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() < second["first_wal"].as_str().unwrap())
        .map(|n| format!("wal/{n}"))
        .collect();
    wal_before.sort();
    assert!(!wal_before.is_empty());
    let mut prune = vec!["backup", "prune", "--json", "--retention", &retention];
    prune.extend_from_slice(&with_config);
    let dry = pgwarden_json(&a, &[prune.clone(), vec!["--dry-run"]].concat());
    let ids = |v: &Value| -> Vec<String> {
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let mut gone = vec![
        first["id"].as_str().unwrap().to_string(),
        interrupted.clone(),
    ];
    gone.sort();
    assert_eq!(ids(&dry["delete_backups"]), gone, "{dry}");
    assert_eq!(
        ids(&dry["keep"]),
        [
            second["id"].as_str().unwrap(),
            third["id"].as_str().unwrap()
        ],
        "{dry}"
    );
    let mut planned = ids(&dry["delete_wal"]);
    planned.retain(|k| k.len() == "wal/".len() + 24);
    assert_eq!(planned, wal_before, "{dry}");
    // The dry run deleted nothing; the real one deletes exactly that.
    assert_eq!(
        pgwarden_json(&a, &["backup", "list", "--json", "--config", &config])
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let done = pgwarden_json(&a, &prune);
    assert_eq!(done, dry);
    let list = pgwarden_json(&a, &["backup", "list", "--json", "--config", &config]);
    let left: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        left,
        [
            second["id"].as_str().unwrap(),
            third["id"].as_str().unwrap()
        ]
    );
    for key in &wal_before {
        assert!(
            !s3.root.join(BUCKET).join("cluster-a").join(key).exists(),
            "{key} kept"
        );
    }

    // A point-in-time restore from S3 after the pruning: exactly the rows before T.
    let (_sb, w, rc) = restored(&with_config, &["--target-time", &t], "").await;
    assert_eq!(table_t(&rc).await, Some((20, 20)));
    drop(rc);
    stop(w);
    drop(c);
    stop(warden);
}
