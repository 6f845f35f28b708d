//! Shared state: the store and what is known of the clients.

use super::*;

#[derive(Default)]
pub(super) struct Shared {
    pub(super) store: Mutex<Store>,
    pub(super) clients: Mutex<Clients>,
}

/// Which of a client's requests a rule covers; `None` matches any verb or resource.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub(super) struct Scope {
    pub(super) verb: Option<String>,
    pub(super) resource: Option<String>,
}

#[derive(Default)]
pub(super) struct Clients {
    /// Each client's fault rules.
    pub(super) rules: HashMap<String, HashMap<Scope, Fault>>,
    /// The fault of everyone's requests during an outage, over the clients' own rules.
    pub(super) outage: Option<Fault>,
    /// Every request being handled, open watches and held requests included, so that a change
    /// of faults reaches them.
    pub(super) inflight: HashMap<u64, Inflight>,
    pub(super) next_id: u64,
    pub(super) requests: HashMap<String, u64>,
    pub(super) counts: HashMap<(String, String, String), u64>,
}

/// A request being handled, and the fault that applied to it when last looked at.
pub(super) struct Inflight {
    pub(super) token: String,
    pub(super) verb: &'static str,
    pub(super) resource: String,
    pub(super) fault: Fault,
    pub(super) fate: watch::Sender<Fate>,
}

/// What a request in progress is to do, as told by [`Clients::refresh`].
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Fate {
    /// Go on under this fault.
    Fault(Fault),
    /// Drop the connection; final.
    Cut,
}

impl Clients {
    /// The fault for one request (`verb` and `resource` are empty for a path the server does
    /// not serve: only the client-wide rule covers it).
    pub(super) fn fault(&self, token: &str, verb: &str, resource: &str) -> Fault {
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
    pub(super) fn enter(
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
    pub(super) fn refresh(&mut self) {
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
pub(super) struct Cut {
    /// Held for its `Drop`, which ends the registration.
    pub(super) _entry: Arc<Entry>,
    pub(super) rx: watch::Receiver<Fate>,
}

pub(super) struct Entry {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        lock(&self.shared.clients).inflight.remove(&self.id);
    }
}

impl Cut {
    pub(super) fn fate(&self) -> Fate {
        self.rx.borrow().clone()
    }

    /// Until the request's connection is to be dropped.
    pub(super) async fn wait(&self) {
        let mut rx = self.rx.clone();
        // A closed channel means the registration is gone: cut, or the server stopping.
        while *rx.borrow_and_update() != Fate::Cut {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Holds a request unanswered, as a black-holed network would.
    pub(super) async fn hold(&self) {
        tokio::select! {
            _ = self.wait() => {}
            _ = tokio::time::sleep(HOLD_LIMIT) => {}
        }
    }
}
