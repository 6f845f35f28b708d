//! What the demo prepares before it starts anything: the directory, the ports, the OS user
//! the instances run as, the passwords, each instance's configuration, and the objects the
//! instances find in the API server.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use serde_json::{json, Value};

use super::apiserver::ApiServer;

pub const CLUSTER: &str = "pg";
pub const NAMESPACE: &str = "default";
pub const INSTANCES: usize = 3;
/// The PostgresCluster's failover timings: a lost primary is replaced within about
/// `LEASE_SECONDS` (the timings the HA tests run with).
pub const LEASE_SECONDS: u64 = 6;
const SUPERUSER_SECRET: &str = "pg-superuser";
const REPLICATION_SECRET: &str = "pg-replication";

/// One instance's ports.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub postgres: u16,
    pub status: u16,
    pub metrics: u16,
}

/// Instance `i` listens on `base + i` (Postgres), `base + 10 + i` (status) and `base + 20 + i`
/// (metrics). Base 0 picks free ports instead.
pub fn ports(base: u16) -> anyhow::Result<Vec<Ports>> {
    if base == 0 {
        // Bound all at once, so that no two are the same; released before the instances bind.
        let listeners = (0..3 * INSTANCES)
            .map(|_| TcpListener::bind(("127.0.0.1", 0)))
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot find free ports on 127.0.0.1")?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        return Ok(ports
            .chunks_exact(3)
            .map(|p| Ports {
                postgres: p[0],
                status: p[1],
                metrics: p[2],
            })
            .collect());
    }
    let last = u32::from(base) + 20 + INSTANCES as u32 - 1;
    let Ok(last) = u16::try_from(last) else {
        bail!("--base-port {base} is too high: the demo uses ports {base} to {last}");
    };
    let ports: Vec<Ports> = (0..INSTANCES as u16)
        .map(|i| Ports {
            postgres: base + i,
            status: base + 10 + i,
            metrics: base + 20 + i,
        })
        .collect();
    for p in ports.iter().flat_map(|p| [p.postgres, p.status, p.metrics]) {
        TcpListener::bind(("127.0.0.1", p)).with_context(|| {
            format!(
                "port {p} on 127.0.0.1 is taken (the demo uses ports {base} to {last}): \
                 choose another --base-port, or 0 for any free ports"
            )
        })?;
    }
    Ok(ports)
}

/// The OS user the instances run as: as root, `postgres` (initdb refuses root); else the
/// demo's own user.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
    pub name: String,
    pub home: PathBuf,
}

pub fn run_as() -> anyhow::Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(u)) => Ok(Some(RunAs {
            uid: u.uid,
            gid: u.gid,
            name: u.name,
            home: u.dir,
        })),
        Ok(None) => bail!(
            "as root, the demo runs PostgreSQL as the `postgres` user (initdb refuses root), \
             and there is no such user: create it (`useradd --system postgres`, or install \
             PostgreSQL's packages) or run the demo as an ordinary user"
        ),
        Err(e) => Err(e).context("cannot look up the `postgres` user"),
    }
}

/// Gives `path` to the user the instances run as (nothing to do when that is us).
pub fn give(path: &Path, run_as: Option<&RunAs>) -> anyhow::Result<()> {
    if let Some(u) = run_as {
        nix::unistd::chown(path, Some(u.uid), Some(u.gid))
            .with_context(|| format!("cannot give {} to {}", path.display(), u.name))?;
    }
    Ok(())
}

/// The demo's directory.
#[derive(Debug)]
pub struct Workdir {
    pub path: PathBuf,
    /// A temporary directory the demo made itself, removed at the end.
    pub temporary: bool,
}

/// `--dir` (created when missing, refused unless empty), or a new temporary directory.
pub fn workdir(dir: Option<&Path>, run_as: Option<&RunAs>) -> anyhow::Result<Workdir> {
    let made = |path: &Path| -> anyhow::Result<()> {
        // The instances' user must be able to reach its own directories below.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        give(path, run_as)
    };
    let workdir = match dir {
        Some(dir) => {
            let path = std::path::absolute(dir)
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            match std::fs::read_dir(&path) {
                Ok(mut entries) => {
                    if entries.next().is_some() {
                        bail!(
                            "{} is not empty: the demo starts a new cluster in a new or empty \
                             directory",
                            path.display()
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    made(&path)?;
                }
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            }
            Workdir {
                path,
                temporary: false,
            }
        }
        None => {
            let base = std::env::temp_dir();
            let mut attempt = 0;
            loop {
                let path = base.join(format!("pgwarden-demo-{}", random_hex(8)?));
                match std::fs::create_dir(&path) {
                    Ok(()) => {
                        made(&path)?;
                        break Workdir {
                            path,
                            temporary: true,
                        };
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 10 => {
                        attempt += 1;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot create a directory in {}", base.display())
                        })
                    }
                }
            }
        }
    };
    if workdir.path.to_str().is_none() {
        bail!(
            "{} is not valid UTF-8, which the configuration files need: choose another --dir",
            workdir.path.display()
        );
    }
    Ok(workdir)
}

/// `len` random lowercase hexadecimal digits from the kernel.
pub fn random_hex(len: usize) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; len.div_ceil(2)];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    let mut hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.truncate(len);
    Ok(hex)
}

/// Writes `text` to `path`, mode `mode`, owned by the instances' user.
pub fn write_file(
    path: &Path,
    text: &str,
    mode: u32,
    run_as: Option<&RunAs>,
) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    give(path, run_as)
}

/// Where one instance keeps its files: `<dir>/<name>/`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("pgwarden.toml")
    }
}

/// A TOML string (quoted and escaped).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The `[postgres]` and `[http]` sections of a demo instance: its directories, loopback
/// ports, and the superuser password from a file.
pub fn local_sections(layout: &Layout, ports: Ports, password_file: &Path) -> String {
    let path = |p: PathBuf| toml_str(&p.to_string_lossy());
    format!(
        "[postgres]\n\
         data_dir = {data}\n\
         run_dir = {run}\n\
         port = {port}\n\
         listen_addresses = \"127.0.0.1\"\n\
         superuser_password_file = {password}\n\
         \n\
         [http]\n\
         status_listen = \"127.0.0.1:{status}\"\n\
         metrics_listen = \"127.0.0.1:{metrics}\"\n",
        data = path(layout.data_dir()),
        run = path(layout.run_dir()),
        port = ports.postgres,
        password = path(password_file.to_path_buf()),
        status = ports.status,
        metrics = ports.metrics,
    )
}

/// The configuration file of instance `name`: loopback only, the password from a file, and
/// the Kubernetes side pointed at the embedded API server's cluster.
pub fn config_text(name: &str, layout: &Layout, ports: Ports, password_file: &Path) -> String {
    format!(
        "# Written by `pgwarden demo` for the instance {name}.\n\
         instance_name = {name_q}\n\
         \n\
         {local}\
         \n\
         [monitor]\n\
         interval = \"500ms\"\n\
         query_timeout = \"1s\"\n\
         \n\
         [kubernetes]\n\
         cluster = {cluster}\n\
         namespace = {namespace}\n\
         pod_name = {name_q}\n\
         pod_ip = \"127.0.0.1\"\n\
         status_interval = \"1s\"\n\
         api_timeout = \"2s\"\n",
        name_q = toml_str(name),
        local = local_sections(layout, ports, password_file),
        cluster = toml_str(CLUSTER),
        namespace = toml_str(NAMESPACE),
    )
}

fn secret(name: &str, password: &str) -> anyhow::Result<Value> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(NAMESPACE.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "password".to_string(),
            ByteString(password.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    Ok(serde_json::to_value(secret)?)
}

/// The PostgresCluster: `INSTANCES` instances, quorum commit with one synchronous standby
/// (no acknowledged commit is lost in a failover), quick failover timings, and WAL archived
/// to `archive` (for the demo's `backup` and `restore`).
pub fn cluster_object(archive: &str) -> Value {
    json!({
        "apiVersion": "pgwarden.dev/v1",
        "kind": "PostgresCluster",
        "metadata": {"name": CLUSTER, "namespace": NAMESPACE},
        "spec": {
            "instances": INSTANCES,
            "secrets": {
                "superuser": {"name": SUPERUSER_SECRET},
                "replication": {"name": REPLICATION_SECRET}
            },
            "failover": {
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewDeadlineSeconds": 3,
                "retryPeriodSeconds": 1
            },
            "synchronous": {"mode": "quorum", "number": 1, "allowDegraded": false},
            "walArchive": {"destination": archive}
        }
    })
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": CLUSTER}},
        "spec": {"containers": [{"name": "postgres", "image": "pgwarden"}]}
    })
}

/// Creates what a `kubectl apply -k config/` would: the CustomResourceDefinition (first: the
/// API server serves no PostgresCluster without it), the password Secrets, the Pods (which a
/// StatefulSet would create) and the PostgresCluster.
pub fn seed(
    server: &ApiServer,
    names: &[String],
    superuser_password: &str,
    replication_password: &str,
    archive: &str,
) -> anyhow::Result<()> {
    server.create(serde_json::to_value(crate::k8s::crd::crd())?)?;
    server.create(secret(SUPERUSER_SECRET, superuser_password)?)?;
    server.create(secret(REPLICATION_SECRET, replication_password)?)?;
    for name in names {
        server.create(pod(name))?;
    }
    server.create(cluster_object(archive))?;
    Ok(())
}

/// The name of the Lease the primary holds.
pub fn lease_name() -> String {
    format!("{CLUSTER}-leader")
}

/// Loads a configuration text the demo writes, as `pgwarden run` would (for the tests).
#[cfg(test)]
pub fn load_config_text(text: &str) -> crate::config::Config {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    crate::config::Config::load(Some(file.path()), std::iter::empty()).unwrap()
}

/// The ports of a demo instance, in the tests.
#[cfg(test)]
pub fn test_ports(postgres: u16) -> Ports {
    Ports {
        postgres,
        status: postgres + 10,
        metrics: postgres + 20,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_valid() {
        let layout = Layout {
            dir: PathBuf::from("/tmp/demo \"quoted\"/pg-1"),
        };
        let text = config_text(
            "pg-1",
            &layout,
            test_ports(15433),
            Path::new("/tmp/demo/pw"),
        );
        let config = load_config_text(&text);
        assert_eq!(config.instance_name, "pg-1");
        assert_eq!(config.postgres.port, 15433);
        assert_eq!(config.postgres.data_dir, layout.data_dir());
        assert_eq!(config.kubernetes.cluster.as_deref(), Some(CLUSTER));
    }

    #[test]
    fn fixed_ports_follow_the_base() {
        // Whether these are free depends on the machine; only the arithmetic is checked.
        match ports(40000) {
            Ok(p) => {
                assert_eq!(p.len(), INSTANCES);
                assert_eq!(
                    (p[2].postgres, p[2].status, p[2].metrics),
                    (40002, 40012, 40022)
                );
            }
            Err(e) => assert!(e.to_string().contains("is taken"), "{e}"),
        }
        assert!(ports(65530).is_err());
        let free = ports(0).unwrap();
        assert_eq!(free.len(), INSTANCES);
    }

    #[test]
    fn random_hex_has_the_length_asked() {
        let a = random_hex(7).unwrap();
        assert_eq!(a.len(), 7);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(random_hex(16).unwrap(), random_hex(16).unwrap());
    }
}
