use super::*;

#[test]
fn commands_quote_for_shell_and_postgres() {
    let c = commands(
        Path::new("/usr/local/bin/pgwarden"),
        Path::new("/run/it's 100%/wal/settings.json"),
    );
    assert_eq!(
        c.archive_command,
        "'/usr/local/bin/pgwarden' wal-archive --settings '/run/it'\\''s 100%%/wal/settings.json' %p"
    );
    assert!(c.restore_command.ends_with(" %f %p"));
}

#[test]
fn settings_resolve_and_validate() {
    let mut wal = WalConfig::default();
    let pg = PostgresConfig::default();
    assert!(Settings::resolve(&wal, &pg).is_none());
    wal.destination = Some("s3://bucket/x".into());
    let s = Settings::resolve(&wal, &pg).unwrap();
    assert_eq!(s.parallelism(), 4);
    assert_eq!(
        s.spool_dir,
        PathBuf::from("/var/lib/postgresql/data/pgwarden-wal-spool")
    );
    assert_eq!(s.socket, PathBuf::from("/run/pgwarden/wal/archiver.sock"));
    assert!(wal.validate().is_ok());
    wal.parallelism = 0;
    assert_eq!(wal.validate().unwrap_err().0, "parallelism");
    wal.parallelism = 4;
    wal.destination = Some("ftp://x".into());
    assert_eq!(wal.validate().unwrap_err().0, "destination");
}

#[test]
fn a_restored_data_directory_never_archives_into_its_source() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(check_restored_from(d.path(), "s3://bkt/pg"), Ok(()));
    std::fs::write(d.path().join(RESTORED_FROM), "s3://bkt/pg/\nbackup x\n").unwrap();
    let err = check_restored_from(d.path(), "s3://bkt/pg").unwrap_err();
    assert!(err.contains("was restored from s3://bkt/pg"), "{err}");
    assert_eq!(
        check_restored_from(d.path(), "s3://bkt/pg-restored"),
        Ok(())
    );
    assert_eq!(check_restored_from(d.path(), "file:///archive"), Ok(()));
}

#[test]
fn the_spool_directory_stays_out_of_the_data_directory() {
    let root = tempfile::tempdir().unwrap();
    let volume = root.path().join("volume");
    let data = volume.join("pgdata");
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    let refused = |spool: &Path, what: &str| {
        let err = check_spool_dir(spool, &data).unwrap_err();
        assert!(
            err.contains(what) && err.contains(&*data.to_string_lossy()),
            "{}: {err}",
            spool.display()
        );
    };
    refused(&data, "is the data directory");
    refused(&volume.join("x/../pgdata/."), "is the data directory");
    refused(&data.join("pg_wal"), "inside the data directory");
    refused(&data.join("not-yet/spool"), "inside the data directory");
    refused(&volume, "contains the data directory");
    refused(root.path(), "contains the data directory");
    // Through a symbolic link to the volume.
    let link = root.path().join("link");
    std::os::unix::fs::symlink(&volume, &link).unwrap();
    refused(&link.join("pgdata"), "is the data directory");
    refused(&link, "contains the data directory");

    // Beside it, existing or not, is fine; so is a name that merely starts the same.
    for ok in [
        volume.join("pgwarden-wal-spool"),
        volume.join("pgdata-spool"),
        root.path().join("elsewhere/spool"),
    ] {
        assert_eq!(check_spool_dir(&ok, &data), Ok(()), "{}", ok.display());
    }
    std::fs::create_dir(volume.join("pgwarden-wal-spool")).unwrap();
    assert_eq!(
        check_spool_dir(&volume.join("pgwarden-wal-spool"), &data),
        Ok(())
    );
}
