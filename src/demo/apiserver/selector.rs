//! Selectors.

use super::*;

/// What a list or a watch selects: a resource type, maybe a namespace, and selectors.
pub(super) struct Filter {
    pub(super) kind: &'static Kind,
    pub(super) namespace: Option<String>,
    pub(super) labels: Vec<Requirement>,
    pub(super) fields: Vec<Requirement>,
}

/// One requirement of a selector; for a field selector, the key is a metadata field.
pub(super) enum Requirement {
    Equals(String, String),
    /// As in Kubernetes, `!=` also selects objects without the key.
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Filter {
    pub(super) fn everything(kind: &'static Kind, namespace: Option<String>) -> Filter {
        Filter {
            kind,
            namespace,
            labels: Vec::new(),
            fields: Vec::new(),
        }
    }

    pub(super) fn new(route: &Route) -> Result<Filter, ApiError> {
        let mut filter = Filter::everything(route.kind, route.namespace.clone());
        if let Some(selector) = route.query.get("labelSelector") {
            filter.labels = parse_selector(selector, parse_label_requirement)?;
        }
        if let Some(selector) = route.query.get("fieldSelector") {
            filter.fields = parse_selector(selector, parse_field_requirement)?;
        }
        Ok(filter)
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
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
    pub(super) fn event(&self, event: &Event) -> Option<Value> {
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
    pub(super) fn matches(&self, map: &Value) -> bool {
        let get = |key: &str| map.get(key).and_then(Value::as_str);
        match self {
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::Absent(k) => get(k).is_none(),
        }
    }
}

pub(super) fn parse_selector(
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
pub(super) fn parse_label_requirement(term: &str) -> Option<Requirement> {
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
pub(super) fn parse_field_requirement(term: &str) -> Option<Requirement> {
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
