//! The store.

use super::*;

/// Where an object lives. Ordered as etcd keys are, which is the order lists come out in.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    pub(super) kind: &'static Kind,
    pub(super) ns: String,
    pub(super) name: String,
}

impl Key {
    /// A cluster-scoped object is in no namespace, whatever `ns` says.
    pub(super) fn new(kind: &'static Kind, ns: &str, name: &str) -> Key {
        let ns = if kind.namespaced { ns } else { "" };
        Key {
            kind,
            ns: ns.to_string(),
            name: name.to_string(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Change {
    Added,
    Modified,
    Deleted,
}

pub(super) struct Event {
    pub(super) rv: u64,
    pub(super) kind: &'static Kind,
    pub(super) change: Change,
    pub(super) object: Value,
    /// The object before the change, to tell a selective watch whether it matched before.
    pub(super) prev: Option<Value>,
}

/// The part of an object a write goes to.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Sub {
    Main,
    Status,
}

#[derive(Default)]
pub(super) struct Store {
    pub(super) objects: BTreeMap<Key, Value>,
    /// The last resourceVersion handed out.
    pub(super) rv: u64,
    pub(super) history: VecDeque<Event>,
    /// A watch cannot start or resume from a resourceVersion older than this.
    pub(super) horizon: u64,
    /// Changes up to this resourceVersion are forgotten: an open watch behind it missed some.
    pub(super) forgotten: u64,
    /// Carries the latest resourceVersion to open watches.
    pub(super) changed: watch::Sender<u64>,
}

impl Store {
    pub(super) fn get(&self, key: &Key) -> Result<Value, ApiError> {
        self.served(key.kind, Sub::Main)?;
        let found = self.objects.get(key).cloned();
        found.ok_or_else(|| ApiError::not_found(key))
    }

    pub(super) fn list(&self, filter: &Filter) -> Vec<Value> {
        let found = self
            .objects
            .iter()
            .filter(|(key, _)| key.kind == filter.kind);
        let found = found.filter(|(_, obj)| filter.matches(obj));
        found.map(|(_, obj)| obj.clone()).collect()
    }

    /// Creates an object, keeping any `.status` (the HTTP path drops it first).
    pub(super) fn create(
        &mut self,
        kind: &'static Kind,
        ns: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
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
    pub(super) fn update(
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
    pub(super) fn delete(&mut self, key: Key, options: &Value) -> Result<Value, ApiError> {
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
    pub(super) fn commit(&mut self, key: Key, mut object: Value, change: Change) -> Value {
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
    pub(super) fn compact(&mut self) {
        self.history.clear();
        self.forgotten = self.rv;
        self.rv += 1;
        self.horizon = self.rv;
    }

    /// The watch events after `rv` that `filter` lets through, and the resourceVersion they
    /// bring the watch up to. `open` tells a watch that has started from one starting.
    pub(super) fn events_since(
        &self,
        rv: u64,
        open: bool,
        filter: &Filter,
    ) -> Result<Caught, ApiError> {
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
pub(super) type Caught = (Vec<Value>, u64);

/// What a write stores: the wanted object less what may not change through this endpoint,
/// with the server-owned metadata, and the generation bumped on a change of the desired state.
/// `has_status`: the kind has a status subresource now.
pub(super) fn next_version(has_status: bool, sub: Sub, current: &Value, wanted: Value) -> Value {
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
pub(super) fn desired_state(has_status: bool, obj: &Value) -> Map<String, Value> {
    let fields = obj.as_object().into_iter().flatten();
    let desired = fields.filter(|(k, _)| *k != "metadata" && !(has_status && *k == "status"));
    desired.map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Refuses bodies that are not objects of this kind and fills in an omitted kind/apiVersion,
/// as the real decoder does; afterwards `obj["metadata"]` is an object.
pub(super) fn check_type(kind: &Kind, obj: &mut Value) -> Result<(), ApiError> {
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

pub(super) fn check_namespace(obj: &Value, ns: &str) -> Result<(), ApiError> {
    match meta_str(obj, "namespace") {
        "" => Ok(()),
        found if found == ns => Ok(()),
        _ => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
    }
}

pub(super) fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

pub(super) fn set_or_remove(obj: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = obj.as_object_mut() {
        match value {
            Some(value) => map.insert(field.to_string(), value),
            None => map.remove(field),
        };
    }
}

/// A random version-4 UUID, from the standard library's randomly seeded hasher.
pub(super) fn uuid() -> String {
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
