//! CustomResourceDefinitions in the embedded API server, and the custom resources they serve.
//!
//! A CRD (`apiextensions.k8s.io/v1`, cluster-scoped) is decoded as the real server decodes
//! it (unknown fields dropped, defaults set), checked as the real server checks it (see
//! [`schema`]) and given the status the real controllers would give it (names accepted,
//! established, stored versions). A custom kind of [`super::KINDS`] is served only while a CRD
//! serving it exists; each write of one is pruned, defaulted and validated against the CRD's
//! schema, and the CRD decides whether it has a status subresource. Deleting a CRD deletes
//! its objects.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionCondition, CustomResourceDefinitionStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::Utc;
use serde_json::{json, Value};

use super::schema::{self, defaulting, definition, lists, prune, validate, FieldError};
use super::{cluster_scoped, kind, meta_str, with_status, ApiError, Change, Key, Kind, Store, Sub};

/// The CustomResourceDefinition resource itself (also in `KINDS`).
pub(super) const CRD: Kind = cluster_scoped(with_status(kind(
    "apiextensions.k8s.io/v1",
    "customresourcedefinitions",
    "CustomResourceDefinition",
)));
static CRD_KIND: Kind = CRD;
const GROUP: &str = "apiextensions.k8s.io";

fn version(kind: &Kind) -> &str {
    kind.api_version.split_once('/').map_or("", |(_, v)| v)
}

/// A 422 `Invalid` about one object, as `apierrors.NewInvalid` words it.
fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> ApiError {
    let (message, details) = schema::invalid_status(group, kind, name, errors);
    ApiError {
        code: 422,
        reason: "Invalid",
        message,
        details: Some(details),
    }
}

/// Fills in the fields Go's types hold as plain strings, booleans and lists, so that a CRD
/// missing one is refused for it (422) as on the real server, rather than undecodable.
fn prefill(obj: &mut Value) {
    fn ensure(map: &mut Value, field: &str, zero: Value) {
        if let Some(map) = map.as_object_mut() {
            map.entry(field).or_insert(zero);
        }
    }
    ensure(obj, "spec", json!({}));
    let spec = &mut obj["spec"];
    for (field, zero) in [
        ("group", json!("")),
        ("scope", json!("")),
        ("names", json!({})),
    ] {
        ensure(spec, field, zero);
    }
    ensure(spec, "versions", json!([]));
    ensure(&mut spec["names"], "kind", json!(""));
    ensure(&mut spec["names"], "plural", json!(""));
    if spec["conversion"].is_object() {
        ensure(&mut spec["conversion"], "strategy", json!(""));
        if spec["conversion"]["webhook"].is_object() {
            ensure(
                &mut spec["conversion"]["webhook"],
                "conversionReviewVersions",
                json!([]),
            );
        }
    }
    for v in spec["versions"].as_array_mut().into_iter().flatten() {
        ensure(v, "name", json!(""));
        ensure(v, "served", json!(false));
        ensure(v, "storage", json!(false));
        for c in v["additionalPrinterColumns"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            for field in ["name", "type", "jsonPath"] {
                ensure(c, field, json!(""));
            }
        }
        if v["subresources"]["scale"].is_object() {
            let scale = &mut v["subresources"]["scale"];
            ensure(scale, "specReplicasPath", json!(""));
            ensure(scale, "statusReplicasPath", json!(""));
        }
    }
}

fn decode(obj: &Value) -> Result<CustomResourceDefinition, ApiError> {
    let mut obj = obj.clone();
    prefill(&mut obj);
    serde_path_to_error::deserialize(&obj).map_err(|e| {
        let (path, inner) = (e.path().to_string(), e.into_inner());
        ApiError::bad_request(format!(
            "CustomResourceDefinition in version \"v1\" cannot be handled as a \
             CustomResourceDefinition: {path}: {inner}"
        ))
    })
}

fn encode(crd: &CustomResourceDefinition) -> Result<Value, ApiError> {
    serde_json::to_value(crd).map_err(|e| ApiError::new(500, "InternalError", e.to_string()))
}

fn condition(
    kind: &str,
    reason: &str,
    message: &str,
    old: Option<&CustomResourceDefinition>,
) -> CustomResourceDefinitionCondition {
    let conditions = old
        .and_then(|o| o.status.as_ref())
        .and_then(|s| s.conditions.as_ref());
    let same = conditions
        .into_iter()
        .flatten()
        .find(|c| c.type_ == kind && c.status == "True");
    let since = same.and_then(|c| c.last_transition_time.clone());
    CustomResourceDefinitionCondition {
        type_: kind.to_string(),
        status: "True".to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_transition_time: since.or_else(|| Some(Time(Utc::now()))),
    }
}

impl Store {
    /// The CRD serving a custom kind, if there is one: its names, version and scope match.
    fn definition(&self, kind: &Kind) -> Option<CustomResourceDefinition> {
        let group = kind.group();
        let name = format!("{}.{group}", kind.plural);
        let obj = self.objects.get(&Key::new(&CRD_KIND, "", &name))?;
        let crd: CustomResourceDefinition = serde_json::from_value(obj.clone()).ok()?;
        let serves = crd.spec.names.kind == kind.kind
            && (crd.spec.scope == "Namespaced") == kind.namespaced
            && crd
                .spec
                .versions
                .iter()
                .any(|v| v.name == version(kind) && v.served);
        serves.then_some(crd)
    }

    /// Whether requests for this kind (and subresource) are served now: a custom kind is
    /// unknown, as on a real server, while no CRD serves it.
    pub(super) fn served(&self, kind: &Kind, sub: Sub) -> Result<(), ApiError> {
        if !kind.custom {
            return Ok(());
        }
        let crd = self.definition(kind).ok_or_else(ApiError::not_found_path)?;
        if sub == Sub::Status && !definition::version_status(&crd, version(kind)) {
            return Err(ApiError::not_found_path());
        }
        Ok(())
    }

    /// Whether `.status` is written only through `/status`.
    pub(super) fn has_status(&self, kind: &Kind) -> bool {
        match kind.custom {
            false => kind.status,
            true => self
                .definition(kind)
                .is_some_and(|crd| definition::version_status(&crd, version(kind))),
        }
    }

    /// What the decoding of a request does, before the write is compared with what is stored:
    /// a CRD is decoded and defaulted, a custom resource pruned and defaulted.
    pub(super) fn prepare(&self, kind: &Kind, obj: &mut Value) -> Result<(), ApiError> {
        if *kind == CRD {
            let mut crd = decode(obj)?;
            for v in &mut crd.spec.versions {
                let schema = v
                    .schema
                    .as_mut()
                    .and_then(|s| s.open_api_v3_schema.as_mut());
                schema.into_iter().for_each(schema::normalize);
            }
            definition::set_defaults(&mut crd);
            *obj = encode(&crd)?;
        } else if kind.custom {
            let crd = self.definition(kind).ok_or_else(ApiError::not_found_path)?;
            if let Some(schema) = definition::version_schema(&crd, version(kind)) {
                prune::prune(obj, schema, true);
                defaulting::apply(obj, schema);
            }
        }
        Ok(())
    }

    /// The checks of a write about to be stored (`current`: the object it replaces). A CRD
    /// also gets its status here.
    pub(super) fn admit(
        &self,
        key: &Key,
        current: Option<&Value>,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").to_string();
        if *key.kind == CRD {
            let mut crd = decode(obj)?;
            let old = current.map(decode).transpose()?;
            let mut stored = crd
                .status
                .as_ref()
                .and_then(|s| s.stored_versions.clone())
                .unwrap_or_default();
            if let Some(v) = crd.spec.versions.iter().find(|v| v.storage) {
                if !stored.contains(&v.name) {
                    stored.push(v.name.clone());
                }
            }
            let conditions = vec![
                condition(
                    "NamesAccepted",
                    "NoConflicts",
                    "no conflicts found",
                    old.as_ref(),
                ),
                condition(
                    "Established",
                    "InitialNamesAccepted",
                    "the initial names have been accepted",
                    old.as_ref(),
                ),
            ];
            crd.status = Some(CustomResourceDefinitionStatus {
                accepted_names: Some(crd.spec.names.clone()),
                conditions: Some(conditions),
                stored_versions: Some(stored),
            });
            let errors = definition::check(&crd, old.as_ref());
            if !errors.is_empty() {
                return Err(invalid(GROUP, "CustomResourceDefinition", &name, &errors));
            }
            *obj = encode(&crd)?;
        } else if key.kind.custom {
            let crd = self
                .definition(key.kind)
                .ok_or_else(ApiError::not_found_path)?;
            let mut errors: Vec<FieldError> = schema::dns1123_subdomain(&name)
                .iter()
                .map(|m| schema::invalid("metadata.name", name.as_str(), m))
                .collect();
            if let Some(schema) = definition::version_schema(&crd, version(key.kind)) {
                errors.extend(validate::validate(None, obj, schema));
                errors.extend(lists::list_types(obj, schema));
            }
            if !errors.is_empty() {
                return Err(invalid(key.kind.group(), key.kind.kind, &name, &errors));
            }
        }
        Ok(())
    }

    /// Deleting a CRD deletes the objects of the kinds it served first, each with its event.
    pub(super) fn cascade(&mut self, key: &Key) {
        if *key.kind != CRD {
            return;
        }
        let Some(crd) = self.objects.get(key).and_then(|o| decode(o).ok()) else {
            return;
        };
        let served = |k: &Kind| {
            k.custom
                && k.plural == crd.spec.names.plural
                && k.group() == crd.spec.group
                && crd.spec.versions.iter().any(|v| v.name == version(k))
        };
        let doomed: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| served(k.kind))
            .cloned()
            .collect();
        for key in doomed {
            if let Some(last) = self.objects.get(&key).cloned() {
                self.commit(key, last, Change::Deleted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crd_missing_its_required_fields_is_invalid_not_undecodable() {
        let obj = json!({"metadata": {"name": "x"}, "spec": {"versions": [{}]}});
        let crd = decode(&obj).unwrap();
        assert_eq!(crd.spec.group, "");
        let found = definition::check(&crd, None);
        assert!(
            found
                .iter()
                .any(|e| e.to_string() == "spec.group: Required value"),
            "{found:?}"
        );
        let bad = json!({"spec": {"versions": [{"served": "yes"}]}});
        let e = decode(&bad).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(
            e.message.contains("spec.versions[0].served"),
            "{}",
            e.message
        );
    }
}
