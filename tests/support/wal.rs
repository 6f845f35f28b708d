//! WAL archive test support: a real S3-protocol server (`s3s-fs`) on loopback, pgbench, and
//! reading the archive back.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{chown, free_port, pg_user, Sandbox, PASSWORD};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const S3_KEY: &str = "pgwarden-test-key";
pub const S3_SECRET: &str = "pgwarden-test-secret-0123456789";

/// `s3s-fs`: `$S3S_FS`, on the PATH, or where `.ci/run` installs it. `None` when absent
/// (the S3 tests then skip, except under CI where they must run).
pub fn s3s_fs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(c) = cache {
        candidates.push(c.join("pgwarden/tools/bin/s3s-fs"));
    }
    let found = candidates.into_iter().find(|p| p.is_file());
    if found.is_none() && std::env::var_os("CI").is_some() {
        panic!("s3s-fs is not installed (.ci/run installs it)");
    }
    found
}

/// A running `s3s-fs` serving `root` (each top-level directory is a bucket).
pub struct S3Server {
    pub root: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl S3Server {
    pub fn start(bin: &Path, root: &Path, bucket: &str) -> S3Server {
        std::fs::create_dir_all(root.join(bucket)).unwrap();
        let mut s = S3Server {
            root: root.to_path_buf(),
            port: free_port(),
            child: None,
        };
        s.resume(bin);
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (same root, same port).
    pub fn resume(&mut self, bin: &Path) {
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server: the destination is down.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes an S3 credentials directory as a mounted Secret would look.
pub fn credentials_dir(sb: &Sandbox) -> PathBuf {
    let dir = sb.dir.path().join("s3-credentials");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("AWS_ACCESS_KEY_ID"), S3_KEY).unwrap();
    std::fs::write(dir.join("AWS_SECRET_ACCESS_KEY"), format!("{S3_SECRET}\n")).unwrap();
    for p in [
        dir.clone(),
        dir.join("AWS_ACCESS_KEY_ID"),
        dir.join("AWS_SECRET_ACCESS_KEY"),
    ] {
        chown(&p);
    }
    dir
}

/// Runs pgbench against the sandbox with `args`; panics when it fails.
pub fn pgbench(port: u16, args: &[&str]) {
    let out = Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `pgwarden <args>` as the unprivileged user in `cwd`; returns (exit code, stderr).
pub fn pgwarden_cmd(cwd: &Path, args: &[&str]) -> (i32, String) {
    let (code, _, stderr) = pgwarden_output(cwd, args);
    (code, stderr)
}

/// Runs `pgwarden <args>` as the unprivileged user in `cwd`; returns (exit code, stdout,
/// stderr).
pub fn pgwarden_output(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(super::binary());
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .env("PGWARDEN_LOG_LEVEL", "warn");
    if let Some(u) = pg_user() {
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let out = cmd.output().expect("run pgwarden");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pg_basebackup` from the instance on `port` into `dir` with `args` (e.g. `-X none`), as
/// the superuser over TCP; panics when it fails.
pub fn pg_basebackup(port: u16, dir: &Path, args: &[&str]) {
    let out = Command::new(format!("{PG_BIN}/pg_basebackup"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .args(["-c", "fast", "-D"])
        .arg(dir)
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run pg_basebackup");
    assert!(
        out.status.success(),
        "pg_basebackup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the first series whose line starts with `series` in a metrics exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Reads and verifies an archived object: the WAL content it holds.
pub fn decode(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    pgwarden::wal::format::decode(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .1
}

/// Every segment from `first` through `last` (same timeline) is in `archive_wal_dir`, and
/// identical to the copy still in `pg_wal`. Returns how many were checked.
pub fn check_archive(archive_wal_dir: &Path, pg_wal: &Path, first: &str, last: &str) -> usize {
    let mut name = first.to_string();
    let mut n = 0;
    loop {
        let object = archive_wal_dir.join(&name);
        assert!(object.is_file(), "{name} is not in the archive");
        let original = std::fs::read(pg_wal.join(&name)).unwrap_or_else(|e| {
            panic!("{name} is not in pg_wal any more ({e}): raise wal_keep_size")
        });
        assert!(
            decode(&object) == original,
            "{name}: archived content differs"
        );
        n += 1;
        if name.as_str() >= last {
            return n;
        }
        name = pgwarden::wal::names::next_segment(&name, 16 << 20).unwrap();
    }
}

/// Makes a copy of a data directory owned by the unprivileged user.
pub fn chown_tree(path: &Path) {
    let Some(u) = pg_user() else { return };
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", u.uid, u.gid))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}
