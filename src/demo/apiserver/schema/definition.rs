//! A CustomResourceDefinition's own checks (`ValidateCustomResourceDefinition` and its
//! `...Update`), on the v1 object: its name, group, scope, names, versions (exactly one the
//! storage version, each with a schema), printer columns, subresources and conversion, then
//! each schema through [`openapi::check`].
//!
//! The real server validates its internal form, in which what every version has alike (the
//! schema, the subresources, the printer columns) is moved to the top (`spec.validation`,
//! `spec.subresources`, `spec.additionalPrinterColumns`): errors are named after that form, as
//! the real ones are (`spec.validation.openAPIV3Schema.properties[spec]...`).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceConversion, CustomResourceDefinition,
    CustomResourceDefinitionVersion, CustomResourceSubresources, JSONSchemaProps,
};
use serde_json::Value;

use super::{
    child, dns1035_label, dns1123_subdomain, forbidden, index, invalid, key, not_supported,
    openapi, required, FieldError,
};

/// The real server's defaults for what a client may leave out.
pub(crate) fn set_defaults(crd: &mut CustomResourceDefinition) {
    let names = &mut crd.spec.names;
    if names.singular.as_deref().unwrap_or("").is_empty() {
        names.singular = Some(names.kind.to_lowercase());
    }
    if names.list_kind.as_deref().unwrap_or("").is_empty() && !names.kind.is_empty() {
        names.list_kind = Some(format!("{}List", names.kind));
    }
    if crd.spec.conversion.is_none() {
        crd.spec.conversion = Some(CustomResourceConversion {
            strategy: "None".to_string(),
            webhook: None,
        });
    }
}

fn schema(v: &CustomResourceDefinitionVersion) -> Option<&JSONSchemaProps> {
    v.schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
}

/// Whether every version has this, the same: then the internal form has it at the top.
fn shared<T: PartialEq>(
    versions: &[CustomResourceDefinitionVersion],
    get: impl Fn(&CustomResourceDefinitionVersion) -> Option<&T>,
) -> bool {
    let first = versions.first().and_then(&get);
    first.is_some() && versions.iter().all(|v| get(v) == first)
}

fn columns(v: &CustomResourceDefinitionVersion) -> Option<&Vec<CustomResourceColumnDefinition>> {
    v.additional_printer_columns
        .as_ref()
        .filter(|c| !c.is_empty())
}

fn has_status(s: Option<&CustomResourceSubresources>) -> bool {
    s.is_some_and(|s| s.status.is_some())
}

/// Every error of `crd`, a create when `old` is None, else an update of `old`.
pub(crate) fn check(
    crd: &CustomResourceDefinition,
    old: Option<&CustomResourceDefinition>,
) -> Vec<FieldError> {
    let mut out = Vec::new();
    let spec = &crd.spec;
    let versions = &spec.versions;
    let name = crd.metadata.name.as_deref().unwrap_or("");
    let wanted = format!("{}.{}", spec.names.plural, spec.group);
    for message in dns1123_subdomain(name) {
        out.push(invalid("metadata.name", name, &message));
    }
    if name != wanted {
        out.push(invalid(
            "metadata.name",
            name,
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }

    if spec.group.is_empty() {
        out.push(required("spec.group", ""));
    } else if let errors @ [_, ..] = dns1123_subdomain(&spec.group).as_slice() {
        out.push(invalid(
            "spec.group",
            spec.group.as_str(),
            &errors.join(","),
        ));
    } else if !spec.group.contains('.') {
        let detail = "should be a domain with at least one dot";
        out.push(invalid("spec.group", spec.group.as_str(), detail));
    }
    match spec.scope.as_str() {
        "" => out.push(required("spec.scope", "")),
        "Cluster" | "Namespaced" => {}
        other => out.push(not_supported(
            "spec.scope",
            other,
            &["Cluster", "Namespaced"],
        )),
    }
    for (i, v) in versions.iter().enumerate() {
        if schema(v).is_none() {
            let at = child(&index("spec.versions", i), "schema.openAPIV3Schema");
            out.push(required(&at, "schemas are required"));
        }
    }
    let (top_schema, top_subresources, top_columns) = (
        shared(versions, schema),
        shared(versions, |v| v.subresources.as_ref()),
        shared(versions, columns),
    );
    let any_status = versions.iter().any(|v| has_status(v.subresources.as_ref()));
    let mut seen = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let at = index("spec.versions", i);
        for message in dns1035_label(&v.name) {
            out.push(invalid(&child(&at, "name"), v.name.as_str(), &message));
        }
        deprecation(v, &at, &mut out);
        if let Some(s) = schema(v).filter(|_| !top_schema) {
            let status = has_status(v.subresources.as_ref());
            out.extend(openapi::check(s, &child(&at, "schema"), status));
        }
        if !top_subresources {
            subresources(
                v.subresources.as_ref(),
                &child(&at, "subresources"),
                &mut out,
            );
        }
        if !top_columns {
            for (j, c) in v.additional_printer_columns.iter().flatten().enumerate() {
                column(
                    c,
                    &index(&child(&at, "additionalPrinterColumns"), j),
                    &mut out,
                );
            }
        }
        seen.push(v.name.as_str());
    }
    let versions_value = serde_json::to_value(versions).unwrap_or(Value::Null);
    if seen.iter().enumerate().any(|(i, n)| seen[..i].contains(n)) {
        let detail = "must contain unique version names";
        out.push(invalid("spec.versions", versions_value.clone(), detail));
    }
    if versions.iter().filter(|v| v.storage).count() != 1 {
        let detail = "must have exactly one version marked as storage version";
        out.push(invalid("spec.versions", versions_value, detail));
    }
    if let Some(first) = versions.first() {
        // The internal form's `spec.version`, the first version's name, is checked again.
        let errors = dns1035_label(&first.name);
        if !errors.is_empty() {
            out.push(invalid(
                "spec.version",
                first.name.as_str(),
                &errors.join(","),
            ));
        }
    }
    names(crd, &mut out);
    if let (true, Some(s)) = (top_schema, versions.first().and_then(schema)) {
        out.extend(openapi::check(s, "spec.validation", any_status));
    }
    if top_subresources {
        let first = versions.first().and_then(|v| v.subresources.as_ref());
        subresources(first, "spec.subresources", &mut out);
    }
    if top_columns {
        let first = versions.first().and_then(columns);
        for (j, c) in first.into_iter().flatten().enumerate() {
            column(c, &index("spec.additionalPrinterColumns", j), &mut out);
        }
    }
    conversion(crd, &mut out);
    stored_versions(crd, &mut out);
    approval(crd, &mut out);
    if spec.preserve_unknown_fields == Some(true) {
        let detail = "cannot set to true, set x-kubernetes-preserve-unknown-fields to true in \
                      spec.versions[*].schema instead";
        out.push(invalid("spec.preserveUnknownFields", true, detail));
    }
    if let Some(old) = old {
        let immutable = [
            ("spec.group", &spec.group, &old.spec.group),
            (
                "spec.names.plural",
                &spec.names.plural,
                &old.spec.names.plural,
            ),
            // A CRD here is established at once, so these are fixed from its creation on.
            ("spec.scope", &spec.scope, &old.spec.scope),
            ("spec.names.kind", &spec.names.kind, &old.spec.names.kind),
        ];
        for (at, new, old) in immutable {
            if new != old {
                out.push(invalid(at, new.as_str(), "field is immutable"));
            }
        }
    }
    out
}

fn deprecation(v: &CustomResourceDefinitionVersion, at: &str, out: &mut Vec<FieldError>) {
    let Some(warning) = v.deprecation_warning.as_deref() else {
        return;
    };
    let at = child(at, "deprecationWarning");
    if v.deprecated != Some(true) {
        out.push(invalid(
            &at,
            warning,
            "can only be set for deprecated versions",
        ));
        return;
    }
    if warning.len() > 256 {
        out.push(invalid(&at, warning, "must be <= 256 characters long"));
    }
    if warning.is_empty() {
        out.push(invalid(&at, warning, "must not be an empty string"));
    }
    if let Some((i, _)) = warning.char_indices().find(|(_, c)| c.is_control()) {
        let detail = format!(
            "must only contain printable UTF-8 characters; non-printable character found at index {i}"
        );
        out.push(invalid(&at, warning, &detail));
    }
}

fn names(crd: &CustomResourceDefinition, out: &mut Vec<FieldError>) {
    let n = &crd.spec.names;
    let (singular, list_kind) = (
        n.singular.clone().unwrap_or_default(),
        n.list_kind.clone().unwrap_or_default(),
    );
    for (at, value) in [
        ("spec.names.plural", &n.plural),
        ("spec.names.singular", &singular),
        ("spec.names.kind", &n.kind),
        ("spec.names.listKind", &list_kind),
    ] {
        if value.is_empty() {
            out.push(required(at, ""));
        }
    }
    let label = |at: &str, value: &str, mixed_case: bool, out: &mut Vec<FieldError>| {
        let checked = if mixed_case {
            value.to_lowercase()
        } else {
            value.to_string()
        };
        let errors = dns1035_label(&checked);
        if !value.is_empty() && !errors.is_empty() {
            let prefix = if mixed_case {
                "may have mixed case, but should otherwise match: "
            } else {
                ""
            };
            out.push(invalid(at, value, &format!("{prefix}{}", errors.join(","))));
        }
    };
    label("spec.names.plural", &n.plural, false, out);
    label("spec.names.singular", &singular, false, out);
    label("spec.names.kind", &n.kind, true, out);
    label("spec.names.listKind", &list_kind, true, out);
    // Every item of a list, an empty one too (`label` passes over empty names).
    let labels = |at: &str, values: &Option<Vec<String>>, out: &mut Vec<FieldError>| {
        for (i, value) in values.iter().flatten().enumerate() {
            let errors = dns1035_label(value);
            if !errors.is_empty() {
                out.push(invalid(&index(at, i), value.as_str(), &errors.join(",")));
            }
        }
    };
    labels("spec.names.shortNames", &n.short_names, out);
    if !n.kind.is_empty() && n.kind == list_kind {
        out.push(invalid(
            "spec.names.listKind",
            list_kind.as_str(),
            "kind and listKind may not be the same",
        ));
    }
    labels("spec.names.categories", &n.categories, out);
}

fn simple_json_path(at: &str, path: &str, out: &mut Vec<FieldError>) -> bool {
    let problem = match path {
        "" => "must not be empty",
        p if !p.starts_with('.') => "must be a simple json path starting with .",
        _ => return true,
    };
    out.push(invalid(at, path, problem));
    false
}

fn subresources(s: Option<&CustomResourceSubresources>, at: &str, out: &mut Vec<FieldError>) {
    let Some(scale) = s.and_then(|s| s.scale.as_ref()) else {
        return;
    };
    let paths = [
        (
            "scale.specReplicasPath",
            scale.spec_replicas_path.as_str(),
            ".spec.",
            "should be a json path under .spec",
        ),
        (
            "scale.statusReplicasPath",
            scale.status_replicas_path.as_str(),
            ".status.",
            "should be a json path under .status",
        ),
    ];
    for (name, path, prefix, detail) in paths {
        let at = child(at, name);
        if path.is_empty() {
            out.push(required(&at, ""));
        } else if simple_json_path(&at, path, out) && !path.starts_with(prefix) {
            out.push(invalid(&at, path, detail));
        }
    }
    if let Some(selector) = scale
        .label_selector_path
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        let at = child(at, "scale.labelSelectorPath");
        if simple_json_path(&at, selector, out)
            && !selector.starts_with(".spec.")
            && !selector.starts_with(".status.")
        {
            out.push(invalid(
                &at,
                selector,
                "should be a json path under either .spec or .status",
            ));
        }
    }
}

fn column(c: &CustomResourceColumnDefinition, at: &str, out: &mut Vec<FieldError>) {
    const TYPES: [&str; 5] = ["boolean", "date", "integer", "number", "string"];
    const FORMATS: [&str; 8] = [
        "byte",
        "date",
        "date-time",
        "double",
        "float",
        "int32",
        "int64",
        "password",
    ];
    if c.name.is_empty() {
        out.push(required(&child(at, "name"), ""));
    }
    let types = format!("must be one of {}", TYPES.join(","));
    match c.type_.as_str() {
        "" => out.push(required(&child(at, "type"), &types)),
        t if !TYPES.contains(&t) => out.push(invalid(&child(at, "type"), t, &types)),
        _ => {}
    }
    if let Some(f) = c
        .format
        .as_deref()
        .filter(|f| !f.is_empty() && !FORMATS.contains(f))
    {
        out.push(invalid(
            &child(at, "format"),
            f,
            &format!("must be one of {}", FORMATS.join(",")),
        ));
    }
    // Go's field name in the internal type.
    let json_path = child(at, "JSONPath");
    if c.json_path.is_empty() {
        out.push(required(&json_path, ""));
    } else {
        simple_json_path(&json_path, &c.json_path, out);
    }
}

fn conversion(crd: &CustomResourceDefinition, out: &mut Vec<FieldError>) {
    let Some(conversion) = &crd.spec.conversion else {
        return;
    };
    let at = |name: &str| child("spec.conversion", name);
    let strategy = conversion.strategy.as_str();
    if strategy != "None" && crd.spec.preserve_unknown_fields == Some(true) {
        out.push(invalid(
            &at("strategy"),
            strategy,
            "must be None if spec.preserveUnknownFields is true",
        ));
    }
    match strategy {
        "" => out.push(required(&at("strategy"), "")),
        "None" | "Webhook" => {}
        other => out.push(not_supported(&at("strategy"), other, &["None", "Webhook"])),
    }
    let webhook = conversion.webhook.as_ref();
    let client = webhook.and_then(|w| w.client_config.as_ref());
    let reviews = webhook
        .map(|w| w.conversion_review_versions.clone())
        .unwrap_or_default();
    if strategy == "Webhook" {
        match client {
            None => out.push(required(
                &at("webhookClientConfig"),
                "required when strategy is set to Webhook",
            )),
            Some(c) if c.url.is_some() == c.service.is_some() => {
                out.push(required(
                    &at("webhookClientConfig"),
                    "exactly one of url or service is required",
                ));
            }
            Some(_) => {}
        }
        let reviews_at = at("conversionReviewVersions");
        if reviews.is_empty() {
            out.push(required(&reviews_at, ""));
        } else if !reviews.iter().any(|v| v == "v1" || v == "v1beta1") {
            let value = serde_json::to_value(&reviews).unwrap_or(Value::Null);
            out.push(invalid(
                &reviews_at,
                value,
                "must include at least one of v1, v1beta1",
            ));
        }
    } else {
        let detail = "should not be set when strategy is not set to Webhook";
        if client.is_some() {
            out.push(forbidden(&at("webhookClientConfig"), detail));
        }
        if !reviews.is_empty() {
            out.push(forbidden(&at("conversionReviewVersions"), detail));
        }
    }
}

/// `status.storedVersions` is the server's: it must hold the storage version, and versions
/// once stored may not leave `spec.versions`.
fn stored_versions(crd: &CustomResourceDefinition, out: &mut Vec<FieldError>) {
    let stored = crd
        .status
        .as_ref()
        .and_then(|s| s.stored_versions.clone())
        .unwrap_or_default();
    let value = serde_json::to_value(&stored).unwrap_or(Value::Null);
    if stored.is_empty() {
        out.push(invalid(
            "status.storedVersions",
            value,
            "must have at least one stored version",
        ));
        return;
    }
    for v in &crd.spec.versions {
        if v.storage && !stored.contains(&v.name) {
            let detail = format!("must have the storage version {}", v.name);
            out.push(invalid("status.storedVersions", value.clone(), &detail));
        }
    }
    for (i, s) in stored.iter().enumerate() {
        if !crd.spec.versions.iter().any(|v| &v.name == s) {
            let detail = format!(
                "missing from spec.versions; {s} was previously a storage version, and must \
                 remain in spec.versions until a storage migration ensures no data remains \
                 persisted in {s} and removes {s} from status.storedVersions"
            );
            out.push(invalid(
                &index("status.storedVersions", i),
                s.as_str(),
                &detail,
            ));
        }
    }
}

/// Groups of the Kubernetes project need an approval annotation.
fn approval(crd: &CustomResourceDefinition, out: &mut Vec<FieldError>) {
    const ANNOTATION: &str = "api-approved.kubernetes.io";
    let group = crd.spec.group.as_str();
    let protected = ["k8s.io", "kubernetes.io"]
        .iter()
        .any(|g| group == *g || group.ends_with(&format!(".{g}")));
    let annotated = crd
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION));
    if protected && !annotated {
        let detail =
            "protected groups must have approval annotation \"api-approved.kubernetes.io\", \
                      see https://github.com/kubernetes/enhancements/pull/1111";
        out.push(required(&key("metadata.annotations", ANNOTATION), detail));
    }
}

/// The schema a version's objects are held to.
pub(crate) fn version_schema<'a>(
    crd: &'a CustomResourceDefinition,
    version: &str,
) -> Option<&'a JSONSchemaProps> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == version)
        .and_then(schema)
}

/// Whether a version has the status subresource.
pub(crate) fn version_status(crd: &CustomResourceDefinition, version: &str) -> bool {
    let v = crd.spec.versions.iter().find(|v| v.name == version);
    has_status(v.and_then(|v| v.subresources.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd(v: Value) -> CustomResourceDefinition {
        let mut crd: CustomResourceDefinition = serde_json::from_value(v).unwrap();
        set_defaults(&mut crd);
        crd
    }

    fn fixture() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object"}}}]},
            "status": {"storedVersions": ["v1"]}
        })
    }

    #[test]
    fn a_minimal_crd_passes_and_names_must_agree() {
        assert_eq!(check(&crd(fixture()), None), []);
        let mut v = fixture();
        v["metadata"]["name"] = json!("gadgets.example.com");
        v["spec"]["group"] = json!("example");
        v["spec"]["versions"][0]["storage"] = json!(false);
        v["spec"]["versions"][0]["schema"] = json!(null);
        v["status"] = json!(null);
        let found: Vec<String> = check(&crd(v), None)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found.len(), 5, "{found:#?}");
        assert_eq!(found[0], "metadata.name: Invalid value: \"gadgets.example.com\": must be spec.names.plural+\".\"+spec.group");
        assert_eq!(
            found[1],
            "spec.group: Invalid value: \"example\": should be a domain with at least one dot"
        );
        assert_eq!(
            found[2],
            "spec.versions[0].schema.openAPIV3Schema: Required value: schemas are required"
        );
        assert!(found[3].ends_with("must have exactly one version marked as storage version"));
        assert_eq!(
            found[4],
            "status.storedVersions: Invalid value: []: must have at least one stored version"
        );
    }

    #[test]
    fn shared_schemas_are_named_at_the_top() {
        let mut v = fixture();
        v["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = json!({"type": "object",
            "properties": {"spec": {"type": "object", "additionalProperties": false,
                "properties": {"a": {"type": "string"}}}}});
        let found: Vec<String> = check(&crd(v), None)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found, ["spec.validation.openAPIV3Schema.properties[spec].additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"]);
    }
}
