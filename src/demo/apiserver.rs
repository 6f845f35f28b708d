//! The embedded Kubernetes API server: what `pgwarden demo` runs its cluster against, and what
//! the integration tests run pgwarden against.
//!
//! It runs in-process and speaks the real REST protocol over plain HTTP on 127.0.0.1, so an
//! unmodified `kube::Client` (and the pgwarden binary) can use it, and it follows the API
//! conventions for what it implements: `Status` errors, one global resourceVersion, optimistic
//! concurrency, status subresources, label and field selectors, merge and JSON patches, and
//! watches that resume from a resourceVersion and answer 410 Expired once the history is gone.
//! It keeps everything in memory and checks no credentials: each client is told apart by its
//! bearer token only. It also misbehaves on request as real networks and servers do, per
//! client and per kind of request: see [`Fault`] and [`ApiServer::set_fault_on`].
//!
//! Objects are JSON in one generic store; all per-kind knowledge is in [`KINDS`], except that
//! custom resources follow the schema of their CustomResourceDefinition (see `crds`).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Query;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::chrono::{SecondsFormat, Utc};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, watch};

/// Watch events kept for resuming watches, like the watch cache's window.
const HISTORY_LIMIT: usize = 10_000;
/// The longest a black-holed request or watch is held before its connection is dropped.
const HOLD_LIMIT: Duration = Duration::from_secs(600);
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// A watch without `timeoutSeconds` still ends, as on a real server (min-request-timeout).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
const MAX_BODY: usize = 16 << 20;
/// The verbs requests are counted and faults scoped by.
const VERBS: &[&str] = &[
    "get", "list", "watch", "create", "update", "patch", "delete",
];
/// What APF answers a request it sheds with (`Retry-After`, in seconds).
const RETRY_AFTER: &str = "1";

/// Misbehaviour injected for a client's requests, identified by its bearer token: all of them
/// ([`ApiServer::set_fault`]) or one kind ([`ApiServer::set_fault_on`]).
///
/// A fault applies to the requests that arrive while it is set and, where a network would do
/// the same, to the watches already open: see each kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Fault {
    #[default]
    None,
    /// Every answer waits this long: a request before it is handled, a watch before its first
    /// bytes and each later batch of events (open watches included).
    Latency(Duration),
    /// New requests are answered with this HTTP code as the real server answers it: 429 as API
    /// Priority and Fairness sheds load (plain text, `Retry-After`), 500, 503 and 504 with the
    /// `Status` of the real errors. Open watches go on delivering, as a real API server whose
    /// etcd is down serves established watches from its watch cache.
    ServerError(u16),
    /// The connection is closed without an answer; open watches are cut.
    Refuse,
    /// A partition: requests are neither applied nor answered, and open watches deliver nothing
    /// more (packets are dropped: no connection is closed, no watch times out). Once the fault
    /// is lifted or replaced (or after 10 minutes), the connections it held are dropped.
    Blackhole,
    /// Requests are applied, then their answer is held like [`Fault::Blackhole`]; open
    /// watches are held the same way.
    ResponseLost,
}

impl Fault {
    /// Whether requests under it are held unanswered, to be released when it ends.
    fn holds(&self) -> bool {
        matches!(self, Fault::Blackhole | Fault::ResponseLost)
    }
}

mod clients;
mod crds;
mod error;
mod http;
mod patch;
mod schema;
mod selector;
mod store;
mod watches;

use clients::*;
pub use error::ApiError;
use error::*;
use http::*;
use patch::*;
use selector::*;
use store::*;
use watches::*;

/// A resource type: all the server knows of it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Kind {
    api_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    /// With a status subresource, `.status` is written only through `/status` (for a custom
    /// kind, the CRD decides: see [`Store::has_status`]).
    status: bool,
    namespaced: bool,
    /// Served only while a CustomResourceDefinition serves it (see `crds`).
    custom: bool,
}

const fn kind(api_version: &'static str, plural: &'static str, kind: &'static str) -> Kind {
    Kind {
        api_version,
        plural,
        kind,
        status: false,
        namespaced: true,
        custom: false,
    }
}

const fn with_status(kind: Kind) -> Kind {
    Kind {
        status: true,
        ..kind
    }
}

const fn cluster_scoped(kind: Kind) -> Kind {
    Kind {
        namespaced: false,
        ..kind
    }
}

const fn custom(kind: Kind) -> Kind {
    Kind {
        custom: true,
        ..kind
    }
}

static KINDS: &[Kind] = &[
    crds::CRD,
    custom(with_status(kind(
        "pgwarden.dev/v1",
        "postgresclusters",
        "PostgresCluster",
    ))),
    with_status(kind("v1", "pods", "Pod")),
    kind("coordination.k8s.io/v1", "leases", "Lease"),
    kind("v1", "events", "Event"),
    kind("events.k8s.io/v1", "events", "Event"),
    kind("v1", "secrets", "Secret"),
    kind("v1", "configmaps", "ConfigMap"),
];

fn find_kind(api_version: &str, plural: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.plural == plural)
}

/// For the direct accessors: a kind the table lacks is answered as the server answers an
/// unknown resource.
fn known(api_version: &str, plural: &str) -> Result<&'static Kind, ApiError> {
    find_kind(api_version, plural).ok_or_else(ApiError::not_found_path)
}

impl Kind {
    fn group(&self) -> &'static str {
        self.api_version
            .split_once('/')
            .map_or("", |(group, _)| group)
    }

    /// The group-qualified resource, as error messages name it (`leases.coordination.k8s.io`).
    fn resource(&self) -> String {
        match self.group() {
            "" => self.plural.to_string(),
            group => format!("{}.{group}", self.plural),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The public handle.

/// A running API server; dropping it shuts it down and closes every connection.
///
/// Besides the HTTP API, it offers direct access to its store ([`ApiServer::create`],
/// [`ApiServer::get`], ...), which goes through the same code as the HTTP requests.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts a server on a random loopback port, with its own thread and runtime so that its
    /// users may block their own thread without stalling it.
    pub fn start() -> io::Result<ApiServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        // One thread does: every request is a short critical section on the store.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let shared = Arc::new(Shared::default());
        let (shutdown, stop) = oneshot::channel();
        let server = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || run(runtime, listener, server, stop))?;
        Ok(ApiServer {
            shared,
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether the server knows this resource type (`"v1"`, `"pods"`).
    pub fn serves(api_version: &str, plural: &str) -> bool {
        find_kind(api_version, plural).is_some()
    }

    /// Writes `<dir>/kubeconfig-<token>` for the client identified by `token`, in namespace
    /// "default", readable by everyone (pgwarden may run as another user, and the file holds
    /// no secret: this server checks no credentials).
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> io::Result<PathBuf> {
        let file: String = token
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("kubeconfig-{file}"));
        // JSON strings are YAML scalars: this quotes whatever the token holds.
        let (server, token) = (Value::from(self.url()), Value::from(token));
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: pgwarden\n\
             clusters: [{{name: pgwarden, cluster: {{server: {server}}}}}]\n\
             users: [{{name: pgwarden, user: {{token: {token}}}}}]\n\
             contexts: [{{name: pgwarden, context: {{cluster: pgwarden, user: pgwarden, namespace: default}}}}]\n"
        );
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(path)
    }

    /// Sets one fault for all of a client's requests, replacing the client's rules (see
    /// [`ApiServer::set_fault_on`]). `Fault::None` heals the client.
    pub fn set_fault(&self, token: &str, fault: Fault) {
        self.change_faults(|clients| {
            let rules = clients.rules.entry(token.to_string()).or_default();
            rules.clear();
            rules.insert(Scope::default(), fault);
        });
    }

    /// Sets the fault for one kind of a client's requests: a verb (`get`, `list`, `watch`,
    /// `create`, `update`, `patch`, `delete`) and a resource as [`ApiServer::count`] names it
    /// (`leases`, `postgresclusters/status`: a subresource is a resource of its own), `None`
    /// matching any. Of a client's rules, the most specific matching a request applies: verb
    /// and resource, then resource, then verb, then the client-wide one. `Fault::None` is a
    /// rule too: it exempts its kind from a wider fault. Hanging only the Lease renewals:
    /// `set_fault_on(token, Some("update"), Some("leases"), Fault::Blackhole)`.
    ///
    /// A change releases (drops the connection of) what a fault that no longer applies held,
    /// and nothing else: the client's other requests and watches go on.
    pub fn set_fault_on(
        &self,
        token: &str,
        verb: Option<&str>,
        resource: Option<&str>,
        fault: Fault,
    ) {
        // A misspelt kind would match nothing, and the test meant to exercise it would pass.
        if let Some(verb) = verb {
            assert!(VERBS.contains(&verb), "no verb {verb:?} (one of {VERBS:?})");
        }
        if let Some(resource) = resource {
            let (plural, sub) = match resource.split_once('/') {
                Some((plural, sub)) => (plural, Some(sub)),
                None => (resource, None),
            };
            let served = KINDS.iter().any(|k| {
                k.plural == plural && (sub.is_none() || (sub == Some("status") && k.status))
            });
            assert!(served, "no resource {resource:?} is served");
        }
        let scope = Scope {
            verb: verb.map(str::to_string),
            resource: resource.map(str::to_string),
        };
        self.change_faults(|clients| {
            let rules = clients.rules.entry(token.to_string()).or_default();
            rules.insert(scope, fault);
        });
    }

    /// Removes every rule of a client: its requests are served normally again.
    pub fn clear_faults(&self, token: &str) {
        self.change_faults(|clients| {
            clients.rules.remove(token);
        });
    }

    /// While on, the API server is cut off from every client as by a partition: connections
    /// are accepted and requests held unanswered, open watches deliver nothing more (and stay
    /// open), whatever the clients' own faults. Turning it off drops every connection it held.
    pub fn outage(&self, on: bool) {
        self.change_faults(|clients| clients.outage = on.then_some(Fault::Blackhole));
    }

    /// While on, the API server is down as when its process is gone: new connections are
    /// closed unanswered, open watches and requests in progress cut, whatever the clients' own
    /// faults. Turning it (or [`ApiServer::outage`]) off ends whichever outage is on.
    pub fn outage_refuse(&self, on: bool) {
        self.change_faults(|clients| clients.outage = on.then_some(Fault::Refuse));
    }

    fn change_faults(&self, f: impl FnOnce(&mut Clients)) {
        let mut clients = lock(&self.shared.clients);
        f(&mut clients);
        clients.refresh();
    }

    /// Forgets the watch history: a watch started or resumed from any resourceVersion handed
    /// out so far gets 410 Expired, while open watches go on (as the real watch cache's do).
    pub fn compact(&self) {
        self.store().compact();
    }

    /// Requests received from a client, whatever became of them (held ones included).
    pub fn requests(&self, token: &str) -> u64 {
        lock(&self.shared.clients)
            .requests
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received from a client for a verb (get, list, watch, create, update, patch,
    /// delete) on a resource (`pods`, or `pods/status` for the subresource), whatever became of
    /// them (held ones included).
    pub fn count(&self, token: &str, verb: &str, resource: &str) -> u64 {
        let key = (token.to_string(), verb.to_string(), resource.to_string());
        lock(&self.shared.clients)
            .counts
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Creates an object as a client would, except that a `.status` is kept (fixtures often
    /// need one). The namespace defaults to "default".
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let (api_version, kind) = (obj["apiVersion"].as_str(), obj["kind"].as_str());
        let found = KINDS
            .iter()
            .find(|k| Some(k.api_version) == api_version && Some(k.kind) == kind);
        let Some(kind) = found else {
            let (api_version, kind) = (api_version.unwrap_or(""), kind.unwrap_or(""));
            let message = format!("no kind {kind:?} is registered for version {api_version:?}");
            return Err(ApiError::bad_request(message));
        };
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        self.store().create(kind, &ns, obj)
    }

    pub fn get(
        &self,
        api_version: &str,
        plural: &str,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = Key::new(known(api_version, plural)?, ns, name);
        self.store().get(&key)
    }

    pub fn list(&self, api_version: &str, plural: &str, ns: &str) -> Result<Vec<Value>, ApiError> {
        let kind = known(api_version, plural)?;
        let ns = Some(ns.to_string()).filter(|_| kind.namespaced);
        let store = self.store();
        store.served(kind, Sub::Main)?;
        Ok(store.list(&Filter::everything(kind, ns)))
    }

    /// Changes an object through the same path as a PUT: `.status` changes are ignored for
    /// kinds with a status subresource (use [`ApiServer::patch_status`]).
    pub fn update_with(
        &self,
        api_version: &str,
        plural: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Result<Value, ApiError> {
        let key = Key::new(known(api_version, plural)?, ns, name);
        self.write(key, Sub::Main, f)
    }

    /// Merge-patches `.status` through the status subresource.
    pub fn patch_status(
        &self,
        api_version: &str,
        plural: &str,
        ns: &str,
        name: &str,
        status: Value,
    ) -> Result<Value, ApiError> {
        let patch = json!({ "status": status });
        let key = Key::new(known(api_version, plural)?, ns, name);
        self.write(key, Sub::Status, |obj| merge_patch(obj, &patch))
    }

    pub fn delete(
        &self,
        api_version: &str,
        plural: &str,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = Key::new(known(api_version, plural)?, ns, name);
        self.store().delete(key, &Value::Null)
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.shared.store)
    }

    fn write(&self, key: Key, sub: Sub, f: impl FnOnce(&mut Value)) -> Result<Value, ApiError> {
        let change = |current: &Value| {
            let mut next = current.clone();
            f(&mut next);
            Ok(next)
        };
        self.store().update(key, sub, change)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A poisoned lock only means that a thread panicked while holding it; the data is still
/// consistent (every change is made whole under the lock).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
