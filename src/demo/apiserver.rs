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

mod crds;
mod schema;

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

// ---------------------------------------------------------------------------------------------
// Shared state: the store and what is known of the clients.

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    clients: Mutex<Clients>,
}

/// Which of a client's requests a rule covers; `None` matches any verb or resource.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
struct Scope {
    verb: Option<String>,
    resource: Option<String>,
}

#[derive(Default)]
struct Clients {
    /// Each client's fault rules.
    rules: HashMap<String, HashMap<Scope, Fault>>,
    /// The fault of everyone's requests during an outage, over the clients' own rules.
    outage: Option<Fault>,
    /// Every request being handled, open watches and held requests included, so that a change
    /// of faults reaches them.
    inflight: HashMap<u64, Inflight>,
    next_id: u64,
    requests: HashMap<String, u64>,
    counts: HashMap<(String, String, String), u64>,
}

/// A request being handled, and the fault that applied to it when last looked at.
struct Inflight {
    token: String,
    verb: &'static str,
    resource: String,
    fault: Fault,
    fate: watch::Sender<Fate>,
}

/// What a request in progress is to do, as told by [`Clients::refresh`].
#[derive(Clone, Debug, PartialEq)]
enum Fate {
    /// Go on under this fault.
    Fault(Fault),
    /// Drop the connection; final.
    Cut,
}

impl Clients {
    /// The fault for one request (`verb` and `resource` are empty for a path the server does
    /// not serve: only the client-wide rule covers it).
    fn fault(&self, token: &str, verb: &str, resource: &str) -> Fault {
        if let Some(fault) = &self.outage {
            return fault.clone();
        }
        let Some(rules) = self.rules.get(token) else {
            return Fault::None;
        };
        let (verb, resource) = (Some(verb.to_string()), Some(resource.to_string()));
        // From the most specific scope to the client-wide one.
        let scopes = [
            (verb.clone(), resource.clone()),
            (None, resource),
            (verb, None),
            (None, None),
        ];
        scopes
            .into_iter()
            .find_map(|(verb, resource)| rules.get(&Scope { verb, resource }))
            .cloned()
            .unwrap_or_default()
    }

    /// Registers a request with the fault that applies to it now.
    fn enter(
        &mut self,
        token: &str,
        verb: &'static str,
        resource: String,
    ) -> (u64, Fault, watch::Receiver<Fate>) {
        let fault = self.fault(token, verb, &resource);
        let (fate, rx) = watch::channel(Fate::Fault(fault.clone()));
        let id = self.next_id;
        self.next_id += 1;
        let token = token.to_string();
        let entry = Inflight {
            token,
            verb,
            resource,
            fault: fault.clone(),
            fate,
        };
        self.inflight.insert(id, entry);
        (id, fault, rx)
    }

    /// Tells every request in progress what the faults now mean for it. Decided here, under
    /// the lock and at once, so that a fault set and lifted straight away still cuts what it
    /// should: a request held by a fault that no longer applies is cut (its connection
    /// dropped, as when a partition heals after the client gave up), and so is everything a
    /// refusal now covers; the others go on under their new fault.
    fn refresh(&mut self) {
        let faults: Vec<(u64, Fault)> = self
            .inflight
            .iter()
            .map(|(&id, r)| (id, self.fault(&r.token, r.verb, &r.resource)))
            .collect();
        for (id, fault) in faults {
            let Some(request) = self.inflight.get_mut(&id) else {
                continue;
            };
            if request.fault == fault {
                continue;
            }
            if request.fault.holds() || fault == Fault::Refuse {
                request.fate.send_replace(Fate::Cut);
                self.inflight.remove(&id);
            } else {
                request.fault = fault.clone();
                request.fate.send_replace(Fate::Fault(fault));
            }
        }
    }
}

/// A request's registration in [`Clients::inflight`]: how it learns of fault changes that
/// concern it. The registration ends with the last clone.
#[derive(Clone)]
struct Cut {
    /// Held for its `Drop`, which ends the registration.
    _entry: Arc<Entry>,
    rx: watch::Receiver<Fate>,
}

struct Entry {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        lock(&self.shared.clients).inflight.remove(&self.id);
    }
}

impl Cut {
    fn fate(&self) -> Fate {
        self.rx.borrow().clone()
    }

    /// Until the request's connection is to be dropped.
    async fn wait(&self) {
        let mut rx = self.rx.clone();
        // A closed channel means the registration is gone: cut, or the server stopping.
        while *rx.borrow_and_update() != Fate::Cut {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Holds a request unanswered, as a black-holed network would.
    async fn hold(&self) {
        tokio::select! {
            _ = self.wait() => {}
            _ = tokio::time::sleep(HOLD_LIMIT) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The store.

/// Where an object lives. Ordered as etcd keys are, which is the order lists come out in.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    kind: &'static Kind,
    ns: String,
    name: String,
}

impl Key {
    /// A cluster-scoped object is in no namespace, whatever `ns` says.
    fn new(kind: &'static Kind, ns: &str, name: &str) -> Key {
        let ns = if kind.namespaced { ns } else { "" };
        Key {
            kind,
            ns: ns.to_string(),
            name: name.to_string(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

struct Event {
    rv: u64,
    kind: &'static Kind,
    change: Change,
    object: Value,
    /// The object before the change, to tell a selective watch whether it matched before.
    prev: Option<Value>,
}

/// The part of an object a write goes to.
#[derive(Clone, Copy, PartialEq)]
enum Sub {
    Main,
    Status,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    /// The last resourceVersion handed out.
    rv: u64,
    history: VecDeque<Event>,
    /// A watch cannot start or resume from a resourceVersion older than this.
    horizon: u64,
    /// Changes up to this resourceVersion are forgotten: an open watch behind it missed some.
    forgotten: u64,
    /// Carries the latest resourceVersion to open watches.
    changed: watch::Sender<u64>,
}

impl Store {
    fn get(&self, key: &Key) -> Result<Value, ApiError> {
        self.served(key.kind, Sub::Main)?;
        let found = self.objects.get(key).cloned();
        found.ok_or_else(|| ApiError::not_found(key))
    }

    fn list(&self, filter: &Filter) -> Vec<Value> {
        let found = self
            .objects
            .iter()
            .filter(|(key, _)| key.kind == filter.kind);
        let found = found.filter(|(_, obj)| filter.matches(obj));
        found.map(|(_, obj)| obj.clone()).collect()
    }

    /// Creates an object, keeping any `.status` (the HTTP path drops it first).
    fn create(&mut self, kind: &'static Kind, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        self.served(kind, Sub::Main)?;
        check_type(kind, &mut obj)?;
        if !kind.namespaced {
            set_or_remove(&mut obj["metadata"], "namespace", None);
        }
        check_namespace(&obj, ns)?;
        self.prepare(kind, &mut obj)?;
        if !meta_str(&obj, "resourceVersion").is_empty() {
            // What the real server answers, from its storage layer.
            let message = "resourceVersion should not be set on objects to be created";
            return Err(ApiError::new(500, "InternalError", message));
        }
        let key = Key::new(kind, ns, meta_str(&obj, "name"));
        if key.name.is_empty() {
            let message = "metadata.name: Required value: name is required";
            return Err(ApiError::new(422, "Invalid", message));
        }
        self.admit(&key, None, &mut obj)?;
        if self.objects.contains_key(&key) {
            return Err(ApiError::about(
                &key,
                409,
                "AlreadyExists",
                "already exists",
            ));
        }
        let meta = &mut obj["metadata"];
        if kind.namespaced {
            meta["namespace"] = json!(ns);
        }
        meta["uid"] = json!(uuid());
        meta["creationTimestamp"] = json!(Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true));
        meta["generation"] = json!(1);
        Ok(self.commit(key, obj, Change::Added))
    }

    /// The one path for every change to an existing object: PUT, PATCH, their `/status` forms
    /// and the direct accessors. `change` computes the object the client wants.
    fn update(
        &mut self,
        key: Key,
        sub: Sub,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        self.served(key.kind, sub)?;
        let current = self
            .objects
            .get(&key)
            .ok_or_else(|| ApiError::not_found(&key))?;
        let mut wanted = change(current)?;
        check_type(key.kind, &mut wanted)?;
        if !key.kind.namespaced {
            set_or_remove(&mut wanted["metadata"], "namespace", None);
        }
        check_namespace(&wanted, &key.ns)?;
        let wanted_name = meta_str(&wanted, "name");
        if wanted_name != key.name {
            let url_name = &key.name;
            return Err(ApiError::bad_request(format!(
                "the name of the object ({wanted_name}) does not match the name on the URL ({url_name})"
            )));
        }
        // A resourceVersion in the body (or left there by a patch) is a precondition; none
        // means an unconditional write.
        let precondition = meta_str(&wanted, "resourceVersion");
        if !precondition.is_empty() && precondition != meta_str(current, "resourceVersion") {
            let why = "the object has been modified; please apply your changes to the latest \
                       version and try again";
            return Err(ApiError::conflict(&key, why));
        }
        // Decoding (pruning, defaults) comes first, so that the generation is judged on what
        // would be stored; validation last, on exactly that.
        self.prepare(key.kind, &mut wanted)?;
        let mut next = next_version(self.has_status(key.kind), sub, current, wanted);
        self.admit(&key, Some(current), &mut next)?;
        if next == *current {
            // As with etcd3's GuaranteedUpdate: a write that changes nothing is no new version.
            return Ok(next);
        }
        Ok(self.commit(key, next, Change::Modified))
    }

    /// `options` is the request's DeleteOptions, whose preconditions are honoured.
    fn delete(&mut self, key: Key, options: &Value) -> Result<Value, ApiError> {
        self.served(key.kind, Sub::Main)?;
        let current = self
            .objects
            .get(&key)
            .ok_or_else(|| ApiError::not_found(&key))?;
        for field in ["uid", "resourceVersion"] {
            let (have, wanted) = (meta_str(current, field), &options["preconditions"][field]);
            if wanted.as_str().is_some_and(|wanted| wanted != have) {
                let why = format!(
                    "Precondition failed: {field} in precondition: {wanted}, {field} in object meta: {have}"
                );
                return Err(ApiError::conflict(&key, &why));
            }
        }
        let last = current.clone();
        self.cascade(&key);
        Ok(self.commit(key, last, Change::Deleted))
    }

    /// Stores a change under a new resourceVersion and records it for watches. A deleted object
    /// carries the resourceVersion of its deletion, as on a real server.
    fn commit(&mut self, key: Key, mut object: Value, change: Change) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let kind = key.kind;
        let prev = match change {
            Change::Deleted => self.objects.remove(&key),
            Change::Added | Change::Modified => self.objects.insert(key, object.clone()),
        };
        let event = Event {
            rv: self.rv,
            kind,
            change,
            object: object.clone(),
            prev,
        };
        self.history.push_back(event);
        if self.history.len() > HISTORY_LIMIT {
            if let Some(oldest) = self.history.pop_front() {
                self.forgotten = oldest.rv;
                self.horizon = self.horizon.max(oldest.rv);
            }
        }
        self.changed.send_replace(self.rv);
        object
    }

    /// Takes a new resourceVersion, as the real compactor's write does, so that a client that
    /// lists afterwards can watch from what it got.
    fn compact(&mut self) {
        self.history.clear();
        self.forgotten = self.rv;
        self.rv += 1;
        self.horizon = self.rv;
    }

    /// The watch events after `rv` that `filter` lets through, and the resourceVersion they
    /// bring the watch up to. `open` tells a watch that has started from one starting.
    fn events_since(&self, rv: u64, open: bool, filter: &Filter) -> Result<Caught, ApiError> {
        let oldest = if open { self.forgotten } else { self.horizon };
        if rv < oldest {
            let message = format!("too old resource version: {rv} ({oldest})");
            return Err(ApiError::new(410, "Expired", message));
        }
        let start = self.history.partition_point(|event| event.rv <= rv);
        let events = self
            .history
            .range(start..)
            .filter_map(|event| filter.event(event));
        // Up to the last change rather than `self.rv`: a bookmark must not carry the
        // resourceVersion a compaction took, which would make it look resumable.
        let upto = self.history.back().map_or(self.forgotten, |event| event.rv);
        Ok((events.collect(), upto.max(rv)))
    }
}

/// Watch events to send, and the resourceVersion they bring the watch up to.
type Caught = (Vec<Value>, u64);

/// What a write stores: the wanted object less what may not change through this endpoint,
/// with the server-owned metadata, and the generation bumped on a change of the desired state.
/// `has_status`: the kind has a status subresource now.
fn next_version(has_status: bool, sub: Sub, current: &Value, wanted: Value) -> Value {
    let (mut next, status) = match sub {
        Sub::Status => (current.clone(), wanted.get("status").cloned()),
        Sub::Main if has_status => (wanted, current.get("status").cloned()),
        Sub::Main => {
            let status = wanted.get("status").cloned();
            (wanted, status)
        }
    };
    set_or_remove(&mut next, "status", status);
    for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
        let value = current["metadata"].get(field).cloned();
        set_or_remove(&mut next["metadata"], field, value);
    }
    if desired_state(has_status, current) != desired_state(has_status, &next) {
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(0);
        next["metadata"]["generation"] = json!(generation + 1);
    }
    next
}

/// The part of an object whose changes bump `metadata.generation`: all but metadata, and but
/// status where status has its own subresource.
fn desired_state(has_status: bool, obj: &Value) -> Map<String, Value> {
    let fields = obj.as_object().into_iter().flatten();
    let desired = fields.filter(|(k, _)| *k != "metadata" && !(has_status && *k == "status"));
    desired.map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Refuses bodies that are not objects of this kind and fills in an omitted kind/apiVersion,
/// as the real decoder does; afterwards `obj["metadata"]` is an object.
fn check_type(kind: &Kind, obj: &mut Value) -> Result<(), ApiError> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    for (field, expected) in [("kind", kind.kind), ("apiVersion", kind.api_version)] {
        match map.get(field) {
            None | Some(Value::Null) => drop(map.insert(field.to_string(), json!(expected))),
            Some(Value::String(found)) if found == expected => {}
            Some(found) => {
                return Err(ApiError::bad_request(format!(
                    "the {field} in the data ({found}) does not match the expected {expected}"
                )))
            }
        }
    }
    match map.entry("metadata").or_insert_with(|| json!({})) {
        Value::Object(_) => Ok(()),
        _ => Err(ApiError::bad_request("metadata must be an object")),
    }
}

fn check_namespace(obj: &Value, ns: &str) -> Result<(), ApiError> {
    match meta_str(obj, "namespace") {
        "" => Ok(()),
        found if found == ns => Ok(()),
        _ => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

fn set_or_remove(obj: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = obj.as_object_mut() {
        match value {
            Some(value) => map.insert(field.to_string(), value),
            None => map.remove(field),
        };
    }
}

/// A random version-4 UUID, from the standard library's randomly seeded hasher.
fn uuid() -> String {
    let random = || RandomState::new().build_hasher().finish();
    let hex = format!("{:016x}{:016x}", random(), random());
    let part = |range: std::ops::Range<usize>| &hex[range];
    format!(
        "{}-{}-4{}-8{}-{}",
        part(0..8),
        part(8..12),
        part(13..16),
        part(17..20),
        part(20..32)
    )
}

// ---------------------------------------------------------------------------------------------
// Selectors.

/// What a list or a watch selects: a resource type, maybe a namespace, and selectors.
struct Filter {
    kind: &'static Kind,
    namespace: Option<String>,
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

/// One requirement of a selector; for a field selector, the key is a metadata field.
enum Requirement {
    Equals(String, String),
    /// As in Kubernetes, `!=` also selects objects without the key.
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Filter {
    fn everything(kind: &'static Kind, namespace: Option<String>) -> Filter {
        Filter {
            kind,
            namespace,
            labels: Vec::new(),
            fields: Vec::new(),
        }
    }

    fn new(route: &Route) -> Result<Filter, ApiError> {
        let mut filter = Filter::everything(route.kind, route.namespace.clone());
        if let Some(selector) = route.query.get("labelSelector") {
            filter.labels = parse_selector(selector, parse_label_requirement)?;
        }
        if let Some(selector) = route.query.get("fieldSelector") {
            filter.fields = parse_selector(selector, parse_field_requirement)?;
        }
        Ok(filter)
    }

    fn matches(&self, obj: &Value) -> bool {
        let in_namespace = self
            .namespace
            .as_deref()
            .is_none_or(|ns| meta_str(obj, "namespace") == ns);
        in_namespace
            && self
                .labels
                .iter()
                .all(|req| req.matches(&obj["metadata"]["labels"]))
            && self.fields.iter().all(|req| req.matches(&obj["metadata"]))
    }

    /// The event a change shows this watch. As with the real watch cache, an object that
    /// starts matching the selectors is ADDED and one that stops matching is DELETED.
    fn event(&self, event: &Event) -> Option<Value> {
        if event.kind != self.kind {
            return None;
        }
        let now = self.matches(&event.object);
        let before = event.prev.as_ref().is_some_and(|prev| self.matches(prev));
        let kind = match (event.change, before, now) {
            (Change::Deleted, _, true) => "DELETED",
            (Change::Added, _, true) | (Change::Modified, false, true) => "ADDED",
            (Change::Modified, true, true) => "MODIFIED",
            (Change::Modified, true, false) => "DELETED",
            _ => return None,
        };
        Some(json!({ "type": kind, "object": event.object }))
    }
}

impl Requirement {
    fn matches(&self, map: &Value) -> bool {
        let get = |key: &str| map.get(key).and_then(Value::as_str);
        match self {
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::Absent(k) => get(k).is_none(),
        }
    }
}

fn parse_selector(
    selector: &str,
    parse: fn(&str) -> Option<Requirement>,
) -> Result<Vec<Requirement>, ApiError> {
    let terms = selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty());
    let parse_term = |term| {
        parse(term).ok_or_else(|| ApiError::bad_request(format!("unable to parse requirement: {term:?} (set-based requirements are not implemented)")))
    };
    terms.map(parse_term).collect()
}

/// `k=v`, `k==v`, `k!=v`, `k`, `!k`.
fn parse_label_requirement(term: &str) -> Option<Requirement> {
    let key = |k: &str| {
        Some(k.trim().to_string())
            .filter(|k| !k.is_empty() && !k.contains([' ', '(', ')', '!', '=']))
    };
    if let Some(k) = term.strip_prefix('!') {
        return Some(Requirement::Absent(key(k)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Some(Requirement::NotEquals(key(k)?, v.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Some(Requirement::Equals(key(k)?, v.trim().to_string()));
    }
    Some(Requirement::Exists(key(term)?))
}

/// `metadata.name` and `metadata.namespace`, with `=`, `==` or `!=`: the field labels every
/// resource supports on a real server (which answers 400 for an unsupported one, as here).
fn parse_field_requirement(term: &str) -> Option<Requirement> {
    let field = |f: &str| match f.trim() {
        "metadata.name" => Some("name".to_string()),
        "metadata.namespace" => Some("namespace".to_string()),
        _ => None,
    };
    if let Some((f, v)) = term.split_once("!=") {
        return Some(Requirement::NotEquals(field(f)?, v.trim().to_string()));
    }
    let (f, v) = term.split_once("==").or_else(|| term.split_once('='))?;
    Some(Requirement::Equals(field(f)?, v.trim().to_string()))
}

// ---------------------------------------------------------------------------------------------
// Patches.

/// Applies a PATCH body by its content type. A strategic merge patch is taken as a merge
/// patch: lists are replaced rather than merged by key.
fn apply_patch(current: &Value, content_type: &str, patch: &Value) -> Result<Value, ApiError> {
    let mut doc = current.clone();
    match content_type {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            merge_patch(&mut doc, patch)
        }
        "application/json-patch+json" => {
            let ops = patch
                .as_array()
                .ok_or_else(|| ApiError::bad_request("a JSON patch must be an array"))?;
            for op in ops {
                // The real server answers 422 when a JSON patch does not apply.
                json_patch_op(&mut doc, op).map_err(|e| ApiError::new(422, "Invalid", e))?;
            }
        }
        other => {
            let message = format!("the media type {other:?} is not implemented by this API server (no server-side apply)");
            return Err(ApiError::new(415, "UnsupportedMediaType", message));
        }
    }
    Ok(doc)
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// One RFC 6902 operation: add, remove, replace or test.
fn json_patch_op(doc: &mut Value, op: &Value) -> Result<(), String> {
    let path = op["path"]
        .as_str()
        .ok_or("a JSON patch operation needs a \"path\"")?;
    let value = op
        .get("value")
        .cloned()
        .ok_or_else(|| format!("the operation on {path} needs a \"value\""));
    let missing = || format!("doc is missing path: {path:?}");
    match op["op"].as_str() {
        Some("add") => pointer_add(doc, path, value?).ok_or_else(missing),
        Some("remove") => pointer_remove(doc, path).map(drop).ok_or_else(missing),
        Some("replace") => {
            let value = value?;
            *doc.pointer_mut(path).ok_or_else(missing)? = value;
            Ok(())
        }
        Some("test") if doc.pointer(path) == Some(&value?) => Ok(()),
        Some("test") => Err(format!("testing value {path} failed")),
        other => Err(format!("JSON patch operation {other:?} is not implemented")),
    }
}

/// Splits a JSON pointer into its parent pointer and its last, unescaped, token.
fn split_pointer(path: &str) -> Option<(&str, String)> {
    let (parent, last) = path.rsplit_once('/')?;
    Some((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Option<()> {
    if path.is_empty() {
        *doc = value;
        return Some(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent)? {
        Value::Object(map) => drop(map.insert(last, value)),
        Value::Array(items) if last == "-" => items.push(value),
        Value::Array(items) => {
            let at = last.parse().ok().filter(|&i| i <= items.len())?;
            items.insert(at, value)
        }
        _ => return None,
    }
    Some(())
}

fn pointer_remove(doc: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent)? {
        Value::Object(map) => map.remove(&last),
        Value::Array(items) => {
            let at = last.parse().ok().filter(|&i| i < items.len())?;
            Some(items.remove(at))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// A failed request, answered with a `Status` object; also the error of the direct accessors.
#[derive(Debug)]
pub struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl std::error::Error for ApiError {}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl ApiError {
    /// The HTTP status code (404, 409, ...).
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The `Status` reason (`NotFound`, `AlreadyExists`, `Conflict`, ...).
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    fn not_found_path() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// An error about one object, worded and detailed as the real server does.
    fn about(key: &Key, code: u16, reason: &'static str, what: &str) -> ApiError {
        let (kind, name) = (key.kind, &key.name);
        let message = format!("{} {name:?} {what}", kind.resource());
        let details = json!({ "name": name, "group": kind.group(), "kind": kind.plural });
        ApiError {
            code,
            reason,
            message,
            details: Some(details),
        }
    }

    fn not_found(key: &Key) -> ApiError {
        ApiError::about(key, 404, "NotFound", "not found")
    }

    fn conflict(key: &Key, why: &str) -> ApiError {
        let mut error = ApiError::about(key, 409, "Conflict", "");
        let (resource, name) = (key.kind.resource(), &key.name);
        error.message = format!("Operation cannot be fulfilled on {resource} {name:?}: {why}");
        error
    }

    /// An injected [`Fault::ServerError`] other than 429, with the `Status` the real server
    /// answers that code with when its etcd fails: apierrors' NewInternalError,
    /// NewServiceUnavailable and NewTimeoutError (the timeout filter's), the generic error
    /// otherwise.
    fn injected(code: u16) -> ApiError {
        const ETCD: &str = "etcdserver: request timed out";
        const TIMEOUT: &str = "request did not complete within requested timeout";
        const PREVENTED: &str = "has prevented the request from succeeding";
        let (reason, message, details) = match code {
            500 => (
                "InternalError",
                format!("Internal error occurred: {ETCD}"),
                Some(json!({ "causes": [{ "message": ETCD }] })),
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request".to_string(),
                None,
            ),
            // An empty `details`: NewTimeoutError sets it, with no retryAfterSeconds.
            504 => (
                "Timeout",
                format!("Timeout: {TIMEOUT} - context deadline exceeded"),
                Some(json!({})),
            ),
            // As client-go words what it does not recognise (NewGenericServerResponse).
            _ if code >= 500 => (
                "InternalError",
                format!("an error on the server (\"injected fault: HTTP {code}\") {PREVENTED}"),
                None,
            ),
            _ => ("", format!("injected fault: HTTP {code}"), None),
        };
        let mut error = ApiError::new(code, reason, message);
        error.details = details;
        error
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn into_response(self) -> Response<Body> {
        json_response(self.code, Body::from(self.status().to_string()))
    }
}

fn json_response(code: u16, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn object_response(code: u16, obj: &Value) -> Response<Body> {
    json_response(code, Body::from(obj.to_string()))
}

// ---------------------------------------------------------------------------------------------
// HTTP.

fn run(
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: oneshot::Receiver<()>,
) {
    runtime.block_on(async move {
        tokio::select! {
            _ = accept_loop(listener, shared) => {}
            _ = stop => {}
        }
    });
    // Cancels every connection task: open watches and held requests end with the server.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if lock(&shared.clients).outage == Some(Fault::Refuse) {
            continue; // dropping the stream closes it unanswered
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&shared), req));
            let connection = hyper::server::conn::http1::Builder::new();
            // An error is a connection dropped on purpose, or a client that went away.
            let _ = connection
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The error that makes hyper close a connection without writing a response.
fn hang_up() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "dropped by the API server",
    )
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let token = header(&req, AUTHORIZATION)
        .strip_prefix("Bearer ")
        .unwrap_or("")
        .to_string();
    let route = Route::parse(&req);
    let (verb, resource) = match &route {
        Ok(route) => (route.verb, route.resource()),
        Err(_) => ("", String::new()),
    };
    // Counted and registered under one lock with reading the fault, so that the request is
    // counted whatever the fault does to it, and no change of faults slips in between.
    let (id, fault, rx) = {
        let mut clients = lock(&shared.clients);
        *clients.requests.entry(token.clone()).or_default() += 1;
        if !verb.is_empty() {
            let key = (token.clone(), verb.to_string(), resource.clone());
            *clients.counts.entry(key).or_default() += 1;
        }
        clients.enter(&token, verb, resource)
    };
    let entry = Arc::new(Entry {
        shared: Arc::clone(&shared),
        id,
    });
    let cut = Cut { _entry: entry, rx };
    match fault {
        Fault::None => {}
        Fault::Latency(delay) => tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cut.wait() => return Err(hang_up()),
        },
        Fault::ServerError(code) => return Ok(injected(code)),
        Fault::Refuse => return Err(hang_up()),
        Fault::Blackhole => {
            cut.hold().await;
            return Err(hang_up());
        }
        Fault::ResponseLost => {
            drop(serve(&shared, route, req, cut.clone()).await);
            cut.hold().await;
            return Err(hang_up());
        }
    }
    let response = serve(&shared, route, req, cut).await;
    Ok(response.unwrap_or_else(ApiError::into_response))
}

/// The answer to an injected [`Fault::ServerError`], as the real server gives it.
fn injected(code: u16) -> Response<Body> {
    if code != 429 {
        return ApiError::injected(code).into_response();
    }
    // API Priority and Fairness sheds a request with http.Error: plain text, not a Status.
    let mut response = Response::new(Body::from("Too many requests, please try again later.\n"));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    let text = HeaderValue::from_static("text/plain; charset=utf-8");
    headers.insert(CONTENT_TYPE, text);
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        hyper::header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER),
    );
    response
}

fn header(req: &Request<Incoming>, name: hyper::header::HeaderName) -> &str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
}

/// A boolean query parameter, spelt `true` or `1` as the real server accepts.
fn flag(query: &Params, name: &str) -> bool {
    query.get(name).is_some_and(|v| v == "true" || v == "1")
}

type Params = HashMap<String, String>;

/// A request's target, read from the path shape `/api/v1[/namespaces/{ns}]/{plural}[/{name}
/// [/status]]` or the same under `/apis/{group}/{version}`. Without a namespace, a namespaced
/// kind serves only its collections (list, watch); a cluster-scoped kind is never in one.
struct Route {
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
    sub: Sub,
    verb: &'static str,
    query: Params,
}

impl Route {
    fn parse(req: &Request<Incoming>) -> Result<Route, ApiError> {
        let segments: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
        let (api_version, rest) = match segments[..] {
            ["api", "v1", ref rest @ ..] => ("v1".to_string(), rest),
            ["apis", group, version, ref rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return Err(ApiError::not_found_path()),
        };
        let (namespace, plural, name, sub) = match *rest {
            ["namespaces", ns, plural] => (Some(ns), plural, None, Sub::Main),
            ["namespaces", ns, plural, name] => (Some(ns), plural, Some(name), Sub::Main),
            ["namespaces", ns, plural, name, "status"] => {
                (Some(ns), plural, Some(name), Sub::Status)
            }
            [plural] => (None, plural, None, Sub::Main),
            [plural, name] => (None, plural, Some(name), Sub::Main),
            [plural, name, "status"] => (None, plural, Some(name), Sub::Status),
            _ => return Err(ApiError::not_found_path()),
        };
        let kind = find_kind(&api_version, plural).ok_or_else(ApiError::not_found_path)?;
        // Objects of a namespaced kind are named within a namespace, cluster-scoped ones in none.
        let misplaced = match kind.namespaced {
            true => namespace.is_none() && name.is_some(),
            false => namespace.is_some(),
        };
        if misplaced || (sub == Sub::Status && !kind.status) {
            return Err(ApiError::not_found_path());
        }
        let scoped = namespace.is_some() || !kind.namespaced;
        let query = Query::<Params>::try_from_uri(req.uri());
        let query = query.map_err(|e| ApiError::bad_request(e.body_text()))?.0;
        let watch = flag(&query, "watch");
        let verb = match (req.method(), name.is_some(), scoped, sub) {
            (&Method::GET, false, ..) if watch => "watch",
            (&Method::GET, false, ..) => "list",
            (&Method::GET, true, ..) => "get",
            (&Method::POST, false, true, Sub::Main) => "create",
            (&Method::PUT, true, ..) => "update",
            (&Method::PATCH, true, ..) => "patch",
            (&Method::DELETE, true, _, Sub::Main) => "delete",
            (method, ..) => {
                let message = format!(
                    "the server does not allow this method on the requested resource: {method}"
                );
                return Err(ApiError::new(405, "MethodNotAllowed", message));
            }
        };
        let (namespace, name) = (namespace.map(str::to_string), name.map(str::to_string));
        Ok(Route {
            kind,
            namespace,
            name,
            sub,
            verb,
            query,
        })
    }

    fn key(&self) -> Key {
        let (ns, name) = (self.namespace.as_deref(), self.name.as_deref());
        Key::new(self.kind, ns.unwrap_or(""), name.unwrap_or(""))
    }

    /// A query parameter, absent when empty.
    fn param<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.query.get(name).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(value) => value
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid value for {name}: {value:?}"))),
        }
    }

    /// The resource as counted: `pods`, or `pods/status`.
    fn resource(&self) -> String {
        match self.sub {
            Sub::Main => self.kind.plural.to_string(),
            Sub::Status => format!("{}/status", self.kind.plural),
        }
    }
}

async fn serve(
    shared: &Arc<Shared>,
    route: Result<Route, ApiError>,
    req: Request<Incoming>,
    cut: Cut,
) -> Result<Response<Body>, ApiError> {
    let route = route?;
    lock(&shared.store).served(route.kind, route.sub)?;
    if route.query.contains_key("dryRun") {
        return Err(ApiError::bad_request(
            "dryRun is not implemented by this API server",
        ));
    }
    let media_type = header(&req, CONTENT_TYPE)
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    let body = axum::body::to_bytes(Body::new(req.into_body()), MAX_BODY).await;
    let body = body.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
    let json = || {
        let parsed = serde_json::from_slice::<Value>(&body);
        parsed.map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
    };
    let (key, store) = (route.key(), || lock(&shared.store));
    let (code, object) = match route.verb {
        "get" => (200, store().get(&key)?),
        "list" => return list(&store(), &route),
        "watch" => return watch(shared, &route, cut),
        "create" => {
            let mut obj = json()?;
            if store().has_status(route.kind) {
                set_or_remove(&mut obj, "status", None); // as the real server does
            }
            (201, store().create(route.kind, &key.ns, obj)?)
        }
        "update" => {
            let wanted = json()?;
            (200, store().update(key, route.sub, |_| Ok(wanted))?)
        }
        "patch" => {
            let patch = json()?;
            let change = |current: &Value| apply_patch(current, &media_type, &patch);
            (200, store().update(key, route.sub, change)?)
        }
        _ => {
            let options = if body.is_empty() {
                Value::Null
            } else {
                json()?
            };
            (200, store().delete(key, &options)?)
        }
    };
    Ok(object_response(code, &object))
}

/// Lists ignore `limit` and `resourceVersion`: they answer the latest state in one page, which
/// is valid for every resourceVersionMatch but Exact.
fn list(store: &Store, route: &Route) -> Result<Response<Body>, ApiError> {
    let list = json!({
        "kind": format!("{}List", route.kind.kind),
        "apiVersion": route.kind.api_version,
        "metadata": { "resourceVersion": store.rv.to_string() },
        "items": store.list(&Filter::new(route)?),
    });
    Ok(object_response(200, &list))
}

// ---------------------------------------------------------------------------------------------
// Watches.

/// An open watch, streamed by its own task as newline-delimited JSON events.
struct WatchStream {
    shared: Arc<Shared>,
    filter: Filter,
    /// The resourceVersion this watch is up to.
    last: u64,
    /// Whether it has started: from then on, only a gap in the history expires it.
    open: bool,
    bookmarks: bool,
    timeout: Duration,
    changed: watch::Receiver<u64>,
    cut: Cut,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
}

fn watch(shared: &Arc<Shared>, route: &Route, cut: Cut) -> Result<Response<Body>, ApiError> {
    let filter = Filter::new(route)?;
    // "0" (like none) means: the current objects as ADDED events, then the changes.
    let from = route.param::<u64>("resourceVersion")?.filter(|&rv| rv != 0);
    let timeout = route.param("timeoutSeconds")?.map(Duration::from_secs);
    let (timeout, bookmarks) = (
        timeout.unwrap_or(DEFAULT_WATCH_TIMEOUT),
        flag(&route.query, "allowWatchBookmarks"),
    );
    // The snapshot, and the point the stream goes on from, are read under one lock so that no
    // change falls between them; whether the watch may start at all is decided there too.
    let store = lock(&shared.store);
    let changed = store.changed.subscribe();
    let (initial, last) = match from {
        Some(rv) => (Vec::new(), rv),
        None => {
            let added = store
                .list(&filter)
                .into_iter()
                .map(|obj| json!({ "type": "ADDED", "object": obj }));
            (added.collect(), store.rv)
        }
    };
    let open = from.is_none_or(|rv| rv >= store.horizon);
    drop(store);
    let (tx, rx) = mpsc::channel(64);
    let shared = Arc::clone(shared);
    let stream = WatchStream {
        shared,
        filter,
        last,
        open,
        bookmarks,
        timeout,
        changed,
        cut,
        tx,
    };
    tokio::spawn(stream.run(initial));
    let chunks = futures::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok(json_response(200, Body::from_stream(chunks)))
}

impl WatchStream {
    async fn run(mut self, initial: Vec<Value>) {
        // The first bytes waited out the request's fault already.
        for event in &initial {
            if !self.send(event).await {
                return;
            }
        }
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let first_bookmark = tokio::time::Instant::now() + BOOKMARK_INTERVAL;
        let mut bookmarks = tokio::time::interval_at(first_bookmark, BOOKMARK_INTERVAL);
        while self.catch_up().await {
            tokio::select! {
                changed = self.changed.changed() => if changed.is_err() { return },
                _ = bookmarks.tick(), if self.bookmarks => {
                    if !self.through().await || !self.send(&self.bookmark()).await {
                        return;
                    }
                }
                // A timed-out watch ends cleanly (unless a black hole swallows the end too);
                // the client is expected to resume it.
                _ = &mut deadline => {
                    self.through().await;
                    return;
                }
                // A new fault: a cut ends the watch here, the others act on the next send.
                _ = self.cut.rx.changed() => {
                    if self.cut.fate() == Fate::Cut {
                        self.hang_up().await;
                        return;
                    }
                }
                _ = self.tx.closed() => return,
            }
        }
    }

    /// Waits until the fault lets events through: at once, after the latency, or — held by a
    /// black hole — once the fault is replaced by one that does. False when the watch is over:
    /// the client went away, or the connection was dropped (which this does).
    async fn through(&mut self) -> bool {
        let limit = tokio::time::sleep(HOLD_LIMIT);
        tokio::pin!(limit);
        let mut delayed = false;
        loop {
            match self.cut.fate() {
                Fate::Cut => break,
                Fate::Fault(fault) if fault.holds() => tokio::select! {
                    _ = self.cut.rx.changed() => {}
                    _ = self.tx.closed() => return false,
                    _ = &mut limit => break,
                },
                Fate::Fault(Fault::Latency(delay)) if !delayed => {
                    // Looked at again after the wait: the fault may have changed meanwhile.
                    delayed = true;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.tx.closed() => return false,
                    }
                }
                Fate::Fault(_) => return true,
            }
        }
        self.hang_up().await;
        false
    }

    /// Drops the connection: an error in the body makes hyper abort it.
    async fn hang_up(&self) {
        let _ = self.tx.send(Err(hang_up())).await;
    }

    /// Sends the events after `last`; false when the watch is over: the client went away, the
    /// connection was dropped, or its resourceVersion expired, which is told with an ERROR
    /// event as the real server does.
    async fn catch_up(&mut self) -> bool {
        let caught_up = lock(&self.shared.store).events_since(self.last, self.open, &self.filter);
        match caught_up {
            Ok((events, upto)) => {
                if events.is_empty() {
                    (self.last, self.open) = (upto, true);
                    return true;
                }
                if !self.through().await {
                    return false;
                }
                for event in &events {
                    if !self.send(event).await {
                        return false;
                    }
                }
                (self.last, self.open) = (upto, true);
                true
            }
            Err(expired) => {
                if self.through().await {
                    self.send(&json!({ "type": "ERROR", "object": expired.status() }))
                        .await;
                }
                false
            }
        }
    }

    /// A BOOKMARK: only the kind and the resourceVersion the watch is up to.
    fn bookmark(&self) -> Value {
        let (kind, rv) = (self.filter.kind, self.last.to_string());
        let metadata = json!({ "resourceVersion": rv });
        let object =
            json!({ "kind": kind.kind, "apiVersion": kind.api_version, "metadata": metadata });
        json!({ "type": "BOOKMARK", "object": object })
    }

    async fn send(&self, event: &Value) -> bool {
        let line = format!("{event}\n");
        self.tx.send(Ok(Bytes::from(line))).await.is_ok()
    }
}
