//! One CRD schema's checks, as `validateCustomResourceDefinitionValidation` runs them: the
//! root's shape when a status subresource is enabled, the structural checks, the defaults
//! (valid and pruned, `ValidateDefaults`), then `ValidateCustomResourceDefinitionOpenAPISchema`
//! (unsupported keywords, `additionalProperties` beside `properties`, `x-kubernetes-*` rules).
//! CEL rules are checked for their static shape only, never compiled.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

use super::{
    child, flag, forbidden, index, invalid, items, key, not_supported, properties, prune, required,
    structural, type_of, validate, FieldError,
};

const META_FIELDS: [&str; 3] = ["metadata", "kind", "apiVersion"];

/// All errors of the schema at `<parent>.openAPIV3Schema`.
pub(crate) fn check(s: &JSONSchemaProps, parent: &str, status_enabled: bool) -> Vec<FieldError> {
    let path = child(parent, "openAPIV3Schema");
    let mut out = Vec::new();
    if status_enabled {
        status_root(s, parent, &path, &mut out);
    }
    if flag(s.nullable) {
        let at = child(parent, "openAPIV3Schema.nullable");
        out.push(forbidden(&at, "nullable cannot be true at the root"));
    }
    // Conversion errors overlap with the OpenAPI ones: shown only when nothing else is wrong.
    let mut conversion = Vec::new();
    match structural::convertible(s) {
        Err(e) => conversion.push(invalid(&path, "", &e)),
        Ok(()) => match structural::check(s, &path) {
            errors if !errors.is_empty() => out.extend(errors),
            _ => defaults(s, &path, true, false, &mut out),
        },
    }
    let root = Context {
        allow_defaults: true,
        reason: String::new(),
        inside_meta: false,
    };
    walk(s, &path, &root, true, &mut out);
    if out.is_empty() {
        out.extend(conversion);
    }
    out
}

/// With a status subresource, `.status` is validated on its own: the root may only hold
/// what still applies when it is taken apart.
fn status_root(s: &JSONSchemaProps, parent: &str, path: &str, out: &mut Vec<FieldError>) {
    const ALLOWED: &str = "[Description Type Format Title Maximum ExclusiveMaximum Minimum \
        ExclusiveMinimum MaxLength MinLength Pattern MaxItems MinItems UniqueItems MultipleOf \
        Required Items Properties ExternalDocs Example XPreserveUnknownFields XValidations]";
    // In the order of Go's JSONSchemaProps fields: the first one set that is not allowed is
    // reported (a type other than object is reported on its own).
    let set = [
        ("ID", s.id.is_some()),
        ("Schema", s.schema.is_some()),
        ("Ref", s.ref_path.is_some()),
        ("Type", s.type_.is_some()),
        ("Nullable", flag(s.nullable)),
        ("Default", s.default.is_some()),
        ("Enum", s.enum_.is_some()),
        ("MaxProperties", s.max_properties.is_some()),
        ("MinProperties", s.min_properties.is_some()),
        ("AllOf", s.all_of.is_some()),
        ("OneOf", s.one_of.is_some()),
        ("AnyOf", s.any_of.is_some()),
        ("Not", s.not.is_some()),
        ("AdditionalProperties", s.additional_properties.is_some()),
        ("PatternProperties", s.pattern_properties.is_some()),
        ("Dependencies", s.dependencies.is_some()),
        ("AdditionalItems", s.additional_items.is_some()),
        ("Definitions", s.definitions.is_some()),
        ("XEmbeddedResource", flag(s.x_kubernetes_embedded_resource)),
        ("XIntOrString", flag(s.x_kubernetes_int_or_string)),
        ("XListMapKeys", s.x_kubernetes_list_map_keys.is_some()),
        ("XListType", s.x_kubernetes_list_type.is_some()),
        ("XMapType", s.x_kubernetes_map_type.is_some()),
    ];
    for (name, is_set) in set {
        match (name, is_set) {
            (_, false) => {}
            ("Type", true) if type_of(s) == "object" => {}
            ("Type", true) => {
                let detail = "only \"object\" is allowed as the type at the root of the schema \
                              if the status subresource is enabled";
                out.push(invalid(
                    &child(parent, "openAPIV3Schema.type"),
                    type_of(s),
                    detail,
                ));
                return;
            }
            _ => {
                let detail = format!(
                    "only {ALLOWED} fields are allowed at the root of the schema if the status \
                     subresource is enabled"
                );
                let value = serde_json::to_value(s).unwrap_or(Value::Null);
                out.push(invalid(path, value, &detail));
                return;
            }
        }
    }
}

/// `ValidateDefaults`: each default must be pruned already and valid against its schema.
/// Defaults of object meta are forbidden elsewhere and not looked at here.
fn defaults(
    s: &JSONSchemaProps,
    path: &str,
    resource: bool,
    meta: bool,
    out: &mut Vec<FieldError>,
) {
    let embedded = resource || flag(s.x_kubernetes_embedded_resource);
    let meta = meta && !flag(s.x_kubernetes_embedded_resource);
    if let Some(default) = s.default.as_ref().map(|d| &d.0).filter(|_| !meta) {
        let at = child(path, "default");
        let mut pruned = default.clone();
        prune::prune(&mut pruned, s, flag(s.x_kubernetes_embedded_resource));
        if &pruned != default {
            out.push(invalid(
                &at,
                default.clone(),
                "must not have unknown fields",
            ));
        }
        out.extend(validate::validate(Some(&at), default, s));
    }
    // Not into additionalProperties: defaults are forbidden there.
    if let Some(item) = items(s) {
        defaults(item, &child(path, "items"), false, meta, out);
    }
    for (k, p) in properties(s) {
        let meta = meta || (embedded && META_FIELDS.contains(&k.as_str()));
        defaults(p, &key(&child(path, "properties"), k), false, meta, out);
    }
}

/// What `specStandardValidatorV3` carries down the schema.
#[derive(Clone)]
struct Context {
    allow_defaults: bool,
    reason: String,
    inside_meta: bool,
}

impl Context {
    fn without_defaults(&self, reason: &str) -> Context {
        Context {
            allow_defaults: false,
            reason: reason.to_string(),
            ..self.clone()
        }
    }
}

const TYPES: [&str; 6] = ["array", "boolean", "integer", "number", "object", "string"];

/// `specStandardValidatorV3.validate`: keywords CRDs do not support.
fn keywords(s: &JSONSchemaProps, path: &str, cx: &Context, out: &mut Vec<FieldError>) {
    let at = |name: &str| child(path, name);
    let ty = type_of(s);
    if !ty.is_empty() && !TYPES.contains(&ty) {
        out.push(not_supported(&at("type"), ty, &TYPES));
    }
    if s.default.is_some() && !cx.allow_defaults {
        let detail = match cx.reason.as_str() {
            "" => "must not be set".to_string(),
            reason => format!("must not be set {reason}"),
        };
        out.push(forbidden(&at("default"), &detail));
    }
    let unsupported = [
        ("id", s.id.is_some(), "id is not supported"),
        (
            "additionalItems",
            s.additional_items.is_some(),
            "additionalItems is not supported",
        ),
        (
            "patternProperties",
            s.pattern_properties.is_some(),
            "patternProperties is not supported",
        ),
        (
            "definitions",
            s.definitions.is_some(),
            "definitions is not supported",
        ),
        (
            "dependencies",
            s.dependencies.is_some(),
            "dependencies is not supported",
        ),
        ("$ref", s.ref_path.is_some(), "$ref is not supported"),
        (
            "type",
            ty == "null",
            "type cannot be set to null, use nullable as an alternative",
        ),
        (
            "items",
            matches!(&s.items, Some(JSONSchemaPropsOrArray::Schemas(l)) if !l.is_empty()),
            "items must be a schema object and not an array",
        ),
        (
            "x-kubernetes-embedded-resource",
            cx.inside_meta && flag(s.x_kubernetes_embedded_resource),
            "must not be used inside of resource meta",
        ),
    ];
    for (name, set, detail) in unsupported {
        if set {
            out.push(forbidden(&at(name), detail));
        }
    }
}

/// `ValidateCustomResourceDefinitionOpenAPISchema`, in its order.
fn walk(s: &JSONSchemaProps, path: &str, cx: &Context, root: bool, out: &mut Vec<FieldError>) {
    keywords(s, path, cx, out);
    let at = |name: &str| child(path, name);
    if flag(s.unique_items) {
        let detail = "uniqueItems cannot be set to true since the runtime complexity becomes \
                      quadratic";
        out.push(forbidden(&at("uniqueItems"), detail));
    }
    let has_properties = s.properties.as_ref().is_some_and(|p| !p.is_empty());
    if let Some(extra) = &s.additional_properties {
        // Properties are for structs, additionalProperties for maps: both would contradict the
        // convention that unknown fields are dropped.
        let closed_or_schema = matches!(extra, JSONSchemaPropsOrBool::Bool(false))
            || matches!(extra, JSONSchemaPropsOrBool::Schema(_));
        if has_properties && closed_or_schema {
            let detail = "additionalProperties and properties are mutual exclusive";
            out.push(forbidden(&at("additionalProperties"), detail));
        }
        if let JSONSchemaPropsOrBool::Schema(extra) = extra {
            let sub = match cx.inside_meta {
                true => {
                    cx.without_defaults("inside additionalProperties applying to object metadata")
                }
                false => cx.clone(),
            };
            walk(extra, &at("additionalProperties"), &sub, false, out);
        }
    }
    let embedded = flag(s.x_kubernetes_embedded_resource);
    for (k, p) in properties(s) {
        let mut sub = cx.clone();
        if (root || embedded) && META_FIELDS.contains(&k.as_str()) {
            sub.inside_meta = true;
            if root {
                sub = sub.without_defaults(&format!("in top-level {k}"));
            }
        }
        walk(p, &key(&at("properties"), k), &sub, false, out);
    }
    if let Some(not) = &s.not {
        walk(not, &at("not"), cx, false, out);
    }
    for (name, list) in [
        ("allOf", &s.all_of),
        ("oneOf", &s.one_of),
        ("anyOf", &s.any_of),
    ] {
        for (i, n) in list.iter().flatten().enumerate() {
            walk(n, &index(&at(name), i), cx, false, out);
        }
    }
    for (k, d) in s.definitions.iter().flatten() {
        walk(d, &key(&at("definitions"), k), cx, false, out);
    }
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(item)) => walk(item, &at("items"), cx, false, out),
        Some(JSONSchemaPropsOrArray::Schemas(list)) => {
            for (i, item) in list.iter().enumerate() {
                walk(item, &index(&at("items"), i), cx, false, out);
            }
        }
        None => {}
    }
    if s.x_kubernetes_preserve_unknown_fields == Some(false) {
        let at = at("x-kubernetes-preserve-unknown-fields");
        out.push(invalid(&at, false, "must be true or undefined"));
    }
    list_and_map_types(s, path, out);
    validation_rules(s, path, out);
}

fn type_must_be(
    s: &JSONSchemaProps,
    path: &str,
    ty: &str,
    because: &str,
    out: &mut Vec<FieldError>,
) {
    let detail = format!("must be {ty} if {because} is specified");
    match type_of(s) {
        t if t == ty => {}
        "" => out.push(required(&child(path, "type"), &detail)),
        t => out.push(invalid(&child(path, "type"), t, &detail)),
    }
}

/// The `x-kubernetes-map-type`, `-list-type` and `-list-map-keys` rules.
fn list_and_map_types(s: &JSONSchemaProps, path: &str, out: &mut Vec<FieldError>) {
    let at = |name: &str| child(path, name);
    if let Some(map_type) = &s.x_kubernetes_map_type {
        type_must_be(s, path, "object", "x-kubernetes-map-type", out);
        if map_type != "atomic" && map_type != "granular" {
            let at = at("x-kubernetes-map-type");
            out.push(not_supported(
                &at,
                map_type.as_str(),
                &["atomic", "granular"],
            ));
        }
    }
    let list_type = s.x_kubernetes_list_type.as_deref();
    if list_type.is_some() && type_of(s) != "array" {
        type_must_be(s, path, "array", "x-kubernetes-list-type", out);
    } else if let (Some("set"), Some(item)) = (list_type, items(s)) {
        let detail = "must be atomic as item of a list with x-kubernetes-list-type=set";
        match type_of(item) {
            "array"
                if item
                    .x_kubernetes_list_type
                    .as_deref()
                    .is_some_and(|t| t != "atomic") =>
            {
                let value = item.x_kubernetes_list_type.clone().unwrap_or_default();
                out.push(invalid(
                    &child(&at("items"), "x-kubernetes-list-type"),
                    value,
                    detail,
                ));
            }
            "object" if item.x_kubernetes_map_type.as_deref() != Some("atomic") => {
                // The real server shows the item's list type here, which is unset: null.
                let at = child(&at("items"), "x-kubernetes-map-type");
                out.push(invalid(&at, Value::Null, detail));
            }
            _ => {}
        }
    }
    if let Some(t) = list_type.filter(|t| !["atomic", "set", "map"].contains(t)) {
        out.push(not_supported(
            &at("x-kubernetes-list-type"),
            t,
            &["atomic", "set", "map"],
        ));
    }
    let keys = s.x_kubernetes_list_map_keys.clone().unwrap_or_default();
    if !keys.is_empty() {
        let detail = "must be map if x-kubernetes-list-map-keys is non-empty";
        match list_type {
            None => out.push(required(&at("x-kubernetes-list-type"), detail)),
            Some("map") => {}
            Some(t) => out.push(invalid(&at("x-kubernetes-list-type"), t, detail)),
        }
    }
    let keys_value = serde_json::to_value(&keys).unwrap_or(Value::Null);
    if list_type == Some("map") {
        if keys.is_empty() {
            let detail = "must not be empty if x-kubernetes-list-type is map";
            out.push(required(&at("x-kubernetes-list-map-keys"), detail));
        }
        match &s.items {
            None => out.push(required(
                &at("items"),
                "must have a schema if x-kubernetes-list-type is map",
            )),
            Some(JSONSchemaPropsOrArray::Schemas(list)) => {
                let value = serde_json::to_value(list).unwrap_or(Value::Null);
                let detail = "must only have a single schema if x-kubernetes-list-type is map";
                out.push(invalid(&at("items"), value, detail));
            }
            Some(JSONSchemaPropsOrArray::Schema(item)) if type_of(item) != "object" => {
                let detail = "must be object if parent array's x-kubernetes-list-type is map";
                out.push(invalid(&child(&at("items"), "type"), type_of(item), detail));
            }
            Some(JSONSchemaPropsOrArray::Schema(item)) => {
                for (i, k) in keys.iter().enumerate() {
                    match super::property(item, k) {
                        Some(p) if matches!(type_of(p), "array" | "object") => {
                            let at = child(&key(&child(&at("items"), "properties"), k), "type");
                            let detail = "must be a scalar type if parent array's \
                                          x-kubernetes-list-type is map";
                            out.push(invalid(&at, type_of(item), detail));
                        }
                        Some(_) => {}
                        None => {
                            let detail = "entries must all be names of item properties";
                            out.push(invalid(
                                &at("x-kubernetes-list-map-keys"),
                                keys_value.clone(),
                                detail,
                            ));
                        }
                    }
                    if keys[..i].contains(k) {
                        let detail = "must not contain duplicate entries";
                        out.push(invalid(
                            &at("x-kubernetes-list-map-keys"),
                            keys_value.clone(),
                            detail,
                        ));
                    }
                }
            }
        }
    }
    // Set and map lists: items not nullable, map keys required or defaulted and not nullable.
    let (Some(t @ ("set" | "map")), Some(item)) = (list_type, items(s)) else {
        return;
    };
    if flag(item.nullable) {
        let detail = format!("cannot be nullable when x-kubernetes-list-type is {t}");
        out.push(forbidden(&child(&at("items"), "nullable"), &detail));
    }
    if t == "map" {
        let required_keys = item.required.clone().unwrap_or_default();
        for k in &keys {
            let Some(p) = super::property(item, k) else {
                continue;
            };
            let at = key(&child(&at("items"), "properties"), k);
            if !required_keys.contains(k) && p.default.is_none() {
                let detail = "this property is in x-kubernetes-list-map-keys, so it must have a \
                              default or be a required property";
                out.push(required(&child(&at, "default"), detail));
            }
            if flag(p.nullable) {
                let detail = "this property is in x-kubernetes-list-map-keys, so it cannot be \
                              nullable";
                out.push(forbidden(&child(&at, "nullable"), detail));
            }
        }
    }
}

/// The static checks of `x-kubernetes-validations` (the rules themselves are not compiled).
fn validation_rules(s: &JSONSchemaProps, path: &str, out: &mut Vec<FieldError>) {
    const REASONS: [&str; 4] = [
        "FieldValueDuplicate",
        "FieldValueForbidden",
        "FieldValueInvalid",
        "FieldValueRequired",
    ];
    let lines = |s: &str| s.contains(['\n', '\r']);
    for (i, rule) in s.x_kubernetes_validations.iter().flatten().enumerate() {
        let at = |name: &str| child(&index(&child(path, "x-kubernetes-validations"), i), name);
        let message = rule.message.clone().unwrap_or_default();
        let (trimmed_rule, trimmed_message) = (rule.rule.trim(), message.trim());
        if trimmed_rule.is_empty() {
            out.push(required(&at("rule"), "rule is not specified"));
        } else if !message.is_empty() && trimmed_message.is_empty() {
            out.push(invalid(
                &at("message"),
                message.as_str(),
                "message must be non-empty if specified",
            ));
        } else if lines(trimmed_message) {
            out.push(invalid(
                &at("message"),
                message.as_str(),
                "message must not contain line breaks",
            ));
        } else if lines(trimmed_rule) && trimmed_message.is_empty() {
            let detail = "message must be specified if rule contains line breaks";
            out.push(required(&at("message"), detail));
        }
        if let Some(expression) = rule.message_expression.as_deref() {
            if !expression.is_empty() && expression.trim().is_empty() {
                let detail = "messageExpression must be non-empty if specified";
                out.push(required(&at("messageExpression"), detail));
            }
        }
        if let Some(reason) = rule.reason.as_deref().filter(|r| !REASONS.contains(r)) {
            out.push(not_supported(&at("reason"), reason, &REASONS));
        }
        if let Some(field_path) = rule.field_path.as_deref() {
            if !field_path.is_empty() && field_path.trim().is_empty() {
                let detail = "fieldPath must be non-empty if specified";
                out.push(invalid(&at("fieldPath"), field_path, detail));
            }
            if lines(field_path) {
                let detail = "fieldPath must not contain line breaks";
                out.push(invalid(&at("fieldPath"), field_path, detail));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(v: Value, status: bool) -> Vec<String> {
        let mut s: JSONSchemaProps = serde_json::from_value(v).unwrap();
        super::super::normalize(&mut s);
        check(&s, "spec.validation", status)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn closed_objects_and_unsupported_keywords_are_refused() {
        let schema = json!({"type": "object", "properties": {"spec": {
            "type": "object", "additionalProperties": false,
            "properties": {"a": {"type": "string", "uniqueItems": true}}
        }}});
        assert_eq!(
            errors(schema, true),
            [
                "spec.validation.openAPIV3Schema.properties[spec].additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive",
                "spec.validation.openAPIV3Schema.properties[spec].properties[a].uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
            ]
        );
        let schema = json!({"type": "object", "properties": {
            "a": {"type": "null"}, "b": {"type": "string", "x-kubernetes-preserve-unknown-fields": false}
        }});
        assert_eq!(
            errors(schema, false),
            [
                "spec.validation.openAPIV3Schema.properties[a].type: Unsupported value: \"null\": supported values: \"array\", \"boolean\", \"integer\", \"number\", \"object\", \"string\"",
                "spec.validation.openAPIV3Schema.properties[a].type: Forbidden: type cannot be set to null, use nullable as an alternative",
                "spec.validation.openAPIV3Schema.properties[b].x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or undefined",
            ]
        );
    }

    #[test]
    fn defaults_must_validate_and_be_pruned() {
        let schema = json!({"type": "object", "properties": {
            "metadata": {"type": "object", "default": {}},
            "spec": {"type": "object", "properties": {
                "f": {"type": "object", "default": {"n": 1, "x": 2}, "properties": {
                    "n": {"type": "integer", "minimum": 2.0}
                }}
            }}
        }});
        assert_eq!(
            errors(schema, false),
            [
                "spec.validation.openAPIV3Schema.properties[spec].properties[f].default: Invalid value: {\"n\":1,\"x\":2}: must not have unknown fields",
                "spec.validation.openAPIV3Schema.properties[spec].properties[f].default.n: Invalid value: 1: n in body should be greater than or equal to 2",
                "spec.validation.openAPIV3Schema.properties[metadata].default: Forbidden: must not be set in top-level metadata",
            ]
        );
    }

    #[test]
    fn status_subresource_root_and_lists() {
        let schema = json!({"type": "object", "nullable": true, "properties": {
            "l": {"type": "array", "x-kubernetes-list-type": "map",
                  "items": {"type": "object", "properties": {"k": {"type": "string"}}},
                  "x-kubernetes-list-map-keys": ["k"]}
        }});
        let found = errors(schema, true);
        assert!(
            found[0].starts_with("spec.validation.openAPIV3Schema: Invalid value: "),
            "{found:?}"
        );
        assert!(found[0].ends_with(
            "fields are allowed at the root of the schema if the status subresource is enabled"
        ));
        assert_eq!(
            found[1..],
            [
                "spec.validation.openAPIV3Schema.nullable: Forbidden: nullable cannot be true at the root",
                "spec.validation.openAPIV3Schema.properties[l].items.properties[k].default: Required value: this property is in x-kubernetes-list-map-keys, so it must have a default or be a required property",
            ]
        );
    }
}
