//! The walk over a custom resource that pruning, defaulting and the list checks share: each
//! child of an object or an array, with the part of the schema it follows.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrBool,
};
use serde_json::Value;

use super::{items, property};

/// Where a child of an object or an array stands: a field's name or an item's index.
pub(crate) enum Step {
    Field(String),
    Item(usize),
}

impl Step {
    pub(crate) fn of<'v>(&self, x: &'v Value) -> Option<&'v Value> {
        match self {
            Step::Field(name) => x.get(name),
            Step::Item(i) => x.get(i),
        }
    }

    pub(crate) fn of_mut<'v>(&self, x: &'v mut Value) -> Option<&'v mut Value> {
        match self {
            Step::Field(name) => x.get_mut(name),
            Step::Item(i) => x.get_mut(i),
        }
    }

    /// Takes a field out of its object (items stay: taking one out would move the others).
    pub(crate) fn remove(&self, x: &mut Value) {
        if let (Step::Field(name), Value::Object(map)) = (self, x) {
            map.remove(name);
        }
    }
}

/// The part of its parent's schema a child follows.
#[derive(Clone, Copy)]
pub(crate) enum Sub<'a> {
    /// A field named in `properties`.
    Property(&'a JSONSchemaProps),
    /// Any other field, under `additionalProperties`: its schema, None for `true` or `false`.
    Additional(Option<&'a JSONSchemaProps>),
    /// A field the schema does not specify, and every field where there is no schema.
    Unspecified,
    /// An item of an array: the schema of `items`, if there is one.
    Item(Option<&'a JSONSchemaProps>),
}

impl<'a> Sub<'a> {
    /// The schema the child follows, if any.
    pub(crate) fn schema(self) -> Option<&'a JSONSchemaProps> {
        match self {
            Sub::Property(s) => Some(s),
            Sub::Additional(s) | Sub::Item(s) => s,
            Sub::Unspecified => None,
        }
    }
}

/// The children of an object (each field: its property, else `additionalProperties`) or of an
/// array (each item: `items`), in order, with the part of `s` each follows; a scalar has none.
/// The steps are owned, so that a walk may change the value as it goes.
pub(crate) fn children<'a>(x: &Value, s: Option<&'a JSONSchemaProps>) -> Vec<(Step, Sub<'a>)> {
    let field = |name: &str| match s {
        None => Sub::Unspecified,
        Some(s) => match (property(s, name), &s.additional_properties) {
            (Some(prop), _) => Sub::Property(prop),
            (None, Some(JSONSchemaPropsOrBool::Schema(extra))) => Sub::Additional(Some(extra)),
            (None, Some(JSONSchemaPropsOrBool::Bool(_))) => Sub::Additional(None),
            (None, None) => Sub::Unspecified,
        },
    };
    match x {
        Value::Object(map) => map
            .keys()
            .map(|k| (Step::Field(k.clone()), field(k)))
            .collect(),
        Value::Array(list) => {
            let item = Sub::Item(s.and_then(items));
            (0..list.len()).map(|i| (Step::Item(i), item)).collect()
        }
        _ => Vec::new(),
    }
}
