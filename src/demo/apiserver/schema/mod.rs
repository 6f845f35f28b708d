//! CustomResourceDefinitions and custom resources as apiextensions-apiserver handles them.
//!
//! A CRD must pass [`definition::check`] (names, versions, scope, columns, subresources) and,
//! for each schema, the structural-schema checks ([`structural`]) and the OpenAPI checks
//! ([`openapi`], which also validates the defaults). A custom resource then goes through, on
//! every write and in the real server's order: [`prune`] (unknown fields dropped),
//! [`defaulting`] (nulls pruned, defaults filled in) and [`validate`] (the schema's constraints,
//! worded as kube-openapi words them; then [`lists`]). Pruning, defaulting and the list checks
//! walk a resource alike: see [`walk`].
//!
//! Errors are apimachinery's `field.Error`s, printed as Go prints them, so that a refusal here
//! reads like the real one: see [`FieldError`] and [`invalid`].

pub(crate) mod defaulting;
pub(crate) mod definition;
pub(crate) mod lists;
mod openapi;
pub(crate) mod prune;
mod structural;
pub(crate) mod validate;
mod walk;

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::{json, Value};

/// apimachinery's `field.ErrorType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorType {
    Required,
    Forbidden,
    Invalid,
    NotSupported,
    Duplicate,
    TooLong,
    TooMany,
    TypeInvalid,
}

impl ErrorType {
    /// The `StatusCause` type (`reason` in the JSON).
    pub(crate) fn reason(self) -> &'static str {
        match self {
            ErrorType::Required => "FieldValueRequired",
            ErrorType::Forbidden => "FieldValueForbidden",
            ErrorType::Invalid => "FieldValueInvalid",
            ErrorType::NotSupported => "FieldValueNotSupported",
            ErrorType::Duplicate => "FieldValueDuplicate",
            ErrorType::TooLong => "FieldValueTooLong",
            ErrorType::TooMany => "FieldValueTooMany",
            ErrorType::TypeInvalid => "FieldValueTypeInvalid",
        }
    }

    fn text(self) -> &'static str {
        match self {
            ErrorType::Required => "Required value",
            ErrorType::Forbidden => "Forbidden",
            ErrorType::Invalid | ErrorType::TypeInvalid => "Invalid value",
            ErrorType::NotSupported => "Unsupported value",
            ErrorType::Duplicate => "Duplicate value",
            ErrorType::TooLong => "Too long",
            ErrorType::TooMany => "Too many",
        }
    }
}

/// One `field.Error`: `spec.instances: Invalid value: 0: spec.instances in body should be ...`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FieldError {
    pub(crate) kind: ErrorType,
    pub(crate) field: String,
    /// The bad value shown after the type; None where Go omits it.
    pub(crate) value: Option<Value>,
    pub(crate) detail: String,
}

impl FieldError {
    fn new(kind: ErrorType, field: &str, value: Option<Value>, detail: &str) -> FieldError {
        let (field, detail) = (field.to_string(), detail.to_string());
        FieldError {
            kind,
            field,
            value,
            detail,
        }
    }

    /// `ErrorBody()`: the message without the field, which is what a `StatusCause` carries.
    pub(crate) fn body(&self) -> String {
        let text = self.kind.text();
        let mut body = match (self.kind, &self.value) {
            (ErrorType::Required | ErrorType::Forbidden | ErrorType::TooLong, _) | (_, None) => {
                text.to_string()
            }
            (_, Some(value)) => format!("{text}: {}", go_value(value)),
        };
        if !self.detail.is_empty() {
            body = format!("{body}: {}", self.detail);
        }
        body
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

pub(crate) fn required(field: &str, detail: &str) -> FieldError {
    FieldError::new(ErrorType::Required, field, None, detail)
}

pub(crate) fn forbidden(field: &str, detail: &str) -> FieldError {
    FieldError::new(ErrorType::Forbidden, field, None, detail)
}

pub(crate) fn invalid(field: &str, value: impl Into<Value>, detail: &str) -> FieldError {
    FieldError::new(ErrorType::Invalid, field, Some(value.into()), detail)
}

pub(crate) fn type_invalid(field: &str, value: impl Into<Value>, detail: &str) -> FieldError {
    FieldError::new(ErrorType::TypeInvalid, field, Some(value.into()), detail)
}

pub(crate) fn duplicate(field: &str, value: Value) -> FieldError {
    FieldError::new(ErrorType::Duplicate, field, Some(value), "")
}

pub(crate) fn not_supported(field: &str, value: impl Into<Value>, valid: &[&str]) -> FieldError {
    let quoted: Vec<String> = valid.iter().map(|v| go_quote(v)).collect();
    let detail = match quoted.is_empty() {
        true => String::new(),
        false => format!("supported values: {}", quoted.join(", ")),
    };
    FieldError::new(ErrorType::NotSupported, field, Some(value.into()), &detail)
}

/// `field.TooLong` as of Kubernetes 1.32.
pub(crate) fn too_long(field: &str, value: Value, max: i64) -> FieldError {
    let unit = if max == 1 { "byte" } else { "bytes" };
    let detail = format!("may not be more than {max} {unit}");
    FieldError::new(ErrorType::TooLong, field, Some(value), &detail)
}

/// `field.TooMany`; a negative `actual` or `max` is unknown, as in Go.
pub(crate) fn too_many(field: &str, actual: i64, max: i64) -> FieldError {
    let detail = match max {
        0.. => format!("must have at most {max} items"),
        _ => "has too many items".to_string(),
    };
    let value = (actual >= 0).then(|| json!(actual));
    FieldError::new(ErrorType::TooMany, field, value, &detail)
}

// ---------------------------------------------------------------------------------------------
// field.Path: `spec.versions[0].schema`, `properties[spec]`.

pub(crate) fn child(path: &str, name: &str) -> String {
    match path {
        "" => name.to_string(),
        _ => format!("{path}.{name}"),
    }
}

pub(crate) fn key(path: &str, key: &str) -> String {
    format!("{path}[{key}]")
}

pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

// ---------------------------------------------------------------------------------------------
// The 422 answer.

/// What `apierrors.NewInvalid` makes of errors about one object: the `Status` message (the
/// errors deduplicated, bracketed when more than one) and its `details`.
pub(crate) fn invalid_status(
    group: &str,
    kind: &str,
    name: &str,
    errors: &[FieldError],
) -> (String, Value) {
    let qualified = match group {
        "" => kind.to_string(),
        _ => format!("{kind}.{group}"),
    };
    let mut seen = BTreeSet::new();
    let messages: Vec<String> = errors
        .iter()
        .map(ToString::to_string)
        .filter(|m| seen.insert(m.clone()))
        .collect();
    let aggregate = match messages.len() {
        1 => messages[0].clone(),
        _ => format!("[{}]", messages.join(", ")),
    };
    let message = format!("{qualified} {} is invalid: {aggregate}", go_quote(name));
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| json!({ "reason": e.kind.reason(), "message": e.body(), "field": e.field }))
        .collect();
    let details = json!({ "name": name, "group": group, "kind": kind, "causes": causes });
    (message, details)
}

// ---------------------------------------------------------------------------------------------
// Go's printing, for messages that match the real server's.

/// A bad value as `field.Error` prints it: strings `%q` (null too, as `"null"`), numbers and
/// booleans `%v`, anything else as JSON.
pub(crate) fn go_value(value: &Value) -> String {
    match value {
        Value::Null => go_quote("null"),
        Value::String(s) => go_quote(s),
        Value::Number(n) => go_number(n),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

pub(crate) fn go_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if !n.is_i64() && !n.is_u64() => go_float(f),
        _ => n.to_string(),
    }
}

/// `%v` of a float64: the shortest representation, in exponent form below 1e-4 and from 1e6.
pub(crate) fn go_float(f: f64) -> String {
    if f == 0.0 || !f.is_finite() {
        return match f {
            f if f.is_nan() => "NaN".into(),
            f if f == f64::INFINITY => "+Inf".into(),
            f if f == f64::NEG_INFINITY => "-Inf".into(),
            _ => "0".into(),
        };
    }
    let sign = if f < 0.0 { "-" } else { "" };
    let scientific = format!("{:e}", f.abs());
    let (mantissa, exp) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits = mantissa.replace('.', "");
    if !(-4..6).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{fraction}e{exp_sign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    let n = digits.len() as i32;
    let fixed = if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point >= n {
        format!("{digits}{}", "0".repeat((point - n) as usize))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{fixed}")
}

/// Go's `%q` (strconv.Quote) for the strings error messages hold.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Names.

const DNS1123_LABEL: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";

fn is_dns_label(s: &str, first: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let middle = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let last = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty() && first(b[0]) && b.iter().all(middle) && b.last().is_some_and(last)
}

/// `validation.IsDNS1123Subdomain`: its messages, none when valid.
pub(crate) fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if s.len() > 253 {
        errors.push("must be no more than 253 characters".to_string());
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !s.split('.').all(|label| is_dns_label(label, alnum)) {
        errors.push(format!(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character (e.g. \
             'example.com', regex used for validation is '{DNS1123_LABEL}(\\.{DNS1123_LABEL})*')"
        ));
    }
    errors
}

/// `validation.IsDNS1035Label`: its messages, none when valid.
pub(crate) fn dns1035_label(s: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if s.len() > 63 {
        errors.push("must be no more than 63 characters".to_string());
    }
    if !is_dns_label(s, |c| c.is_ascii_lowercase()) {
        // The double space is the real message's.
        errors.push(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start \
             with an alphabetic character, and end with an alphanumeric character (e.g. \
             'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
                .to_string(),
        );
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// Schemas as Go holds them.

/// Clears what Go's types cannot tell from absent (`nullable: false`, `description: ""`, empty
/// lists), so that schemas compare, and are stored, as the real server compares and stores
/// them.
pub(crate) fn normalize(s: &mut JSONSchemaProps) {
    for flag in [
        &mut s.nullable,
        &mut s.unique_items,
        &mut s.exclusive_maximum,
        &mut s.exclusive_minimum,
        &mut s.x_kubernetes_embedded_resource,
        &mut s.x_kubernetes_int_or_string,
    ] {
        if *flag == Some(false) {
            *flag = None;
        }
    }
    for text in [
        &mut s.type_,
        &mut s.format,
        &mut s.description,
        &mut s.title,
        &mut s.pattern,
        &mut s.id,
        &mut s.schema,
        &mut s.ref_path,
    ] {
        if text.as_deref() == Some("") {
            *text = None;
        }
    }
    if s.required.as_ref().is_some_and(Vec::is_empty) {
        s.required = None;
    }
    if s.enum_.as_ref().is_some_and(Vec::is_empty) {
        s.enum_ = None;
    }
    if s.x_kubernetes_list_map_keys
        .as_ref()
        .is_some_and(Vec::is_empty)
    {
        s.x_kubernetes_list_map_keys = None;
    }
    if s.x_kubernetes_validations
        .as_ref()
        .is_some_and(Vec::is_empty)
    {
        s.x_kubernetes_validations = None;
    }
    for list in [&mut s.all_of, &mut s.any_of, &mut s.one_of] {
        if list.as_ref().is_some_and(Vec::is_empty) {
            *list = None;
        }
        list.iter_mut().flatten().for_each(normalize);
    }
    for map in [
        &mut s.properties,
        &mut s.pattern_properties,
        &mut s.definitions,
    ] {
        if map.as_ref().is_some_and(|m| m.is_empty()) {
            *map = None;
        }
        map.iter_mut()
            .flat_map(|m| m.values_mut())
            .for_each(normalize);
    }
    for either in [&mut s.additional_properties, &mut s.additional_items] {
        if let Some(JSONSchemaPropsOrBool::Schema(schema)) = either {
            normalize(schema);
        }
    }
    match &mut s.items {
        Some(JSONSchemaPropsOrArray::Schema(schema)) => normalize(schema),
        Some(JSONSchemaPropsOrArray::Schemas(schemas)) => schemas.iter_mut().for_each(normalize),
        None => {}
    }
    if let Some(not) = &mut s.not {
        normalize(not);
    }
}

/// The schema's `properties`, in order (Go's map order is random; sorted is stable).
pub(crate) fn properties(s: &JSONSchemaProps) -> impl Iterator<Item = (&String, &JSONSchemaProps)> {
    s.properties.iter().flatten()
}

pub(crate) fn property<'a>(s: &'a JSONSchemaProps, name: &str) -> Option<&'a JSONSchemaProps> {
    s.properties.as_ref().and_then(|p| p.get(name))
}

/// The schema of `additionalProperties`, if it is one (`true`/`false` are not).
pub(crate) fn additional(s: &JSONSchemaProps) -> Option<&JSONSchemaProps> {
    match &s.additional_properties {
        Some(JSONSchemaPropsOrBool::Schema(schema)) => Some(schema),
        _ => None,
    }
}

/// The schema of `items`, if it is one (an array of schemas is refused in CRDs).
pub(crate) fn items(s: &JSONSchemaProps) -> Option<&JSONSchemaProps> {
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(schema)) => Some(schema),
        _ => None,
    }
}

pub(crate) fn type_of(s: &JSONSchemaProps) -> &str {
    s.type_.as_deref().unwrap_or("")
}

pub(crate) fn flag(value: Option<bool>) -> bool {
    value.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schema from its JSON (the submodules' tests use it too).
    pub(super) fn schema(v: Value) -> JSONSchemaProps {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn floats_print_as_go_prints_them() {
        let cases = [
            (1.0, "1"),
            (300.0, "300"),
            (1.5, "1.5"),
            (123456.0, "123456"),
            (1e6, "1e+06"),
            (1234567.0, "1.234567e+06"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5, "-2.5"),
        ];
        for (f, go) in cases {
            assert_eq!(go_float(f), go, "{f}");
        }
    }

    #[test]
    fn errors_print_as_apimachinery_prints_them() {
        let e = invalid("spec.instances", 0, "spec.instances in body should be ...");
        assert_eq!(
            e.to_string(),
            "spec.instances: Invalid value: 0: spec.instances in body should be ..."
        );
        let e = forbidden("spec.x", "no");
        assert_eq!(e.to_string(), "spec.x: Forbidden: no");
        let e = not_supported("spec.mode", "on", &["off", "quorum"]);
        assert_eq!(
            e.body(),
            "Unsupported value: \"on\": supported values: \"off\", \"quorum\""
        );
        let e = required("spec", "");
        assert_eq!(e.to_string(), "spec: Required value");
    }

    #[test]
    fn one_error_is_not_bracketed_and_repeats_are_dropped() {
        let one = [required("spec", "")];
        let (message, details) = invalid_status("pgwarden.dev", "PostgresCluster", "pg", &one);
        assert_eq!(
            message,
            "PostgresCluster.pgwarden.dev \"pg\" is invalid: spec: Required value"
        );
        assert_eq!(details["causes"][0]["reason"], "FieldValueRequired");
        let two = [required("a", ""), required("a", ""), required("b", "")];
        let (message, details) = invalid_status("", "Thing", "t", &two);
        assert_eq!(
            message,
            "Thing \"t\" is invalid: [a: Required value, b: Required value]"
        );
        assert_eq!(details["causes"].as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn dns_names() {
        assert!(dns1123_subdomain("postgresclusters.pgwarden.dev").is_empty());
        assert_eq!(dns1123_subdomain("Bad_Name").len(), 1);
        assert!(dns1123_subdomain("a..b").len() == 1);
        assert!(dns1035_label("postgresclusters").is_empty());
        assert_eq!(dns1035_label("1abc").len(), 1);
        assert_eq!(dns1035_label(&"a".repeat(64)).len(), 1);
    }
}
