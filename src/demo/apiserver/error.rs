//! Errors.

use super::*;

/// A failed request, answered with a `Status` object; also the error of the direct accessors.
#[derive(Debug)]
pub struct ApiError {
    pub(super) code: u16,
    pub(super) reason: &'static str,
    pub(super) message: String,
    pub(super) details: Option<Value>,
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

    pub(super) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub(super) fn not_found_path() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// An error about one object, worded and detailed as the real server does.
    pub(super) fn about(key: &Key, code: u16, reason: &'static str, what: &str) -> ApiError {
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

    pub(super) fn not_found(key: &Key) -> ApiError {
        ApiError::about(key, 404, "NotFound", "not found")
    }

    pub(super) fn conflict(key: &Key, why: &str) -> ApiError {
        let mut error = ApiError::about(key, 409, "Conflict", "");
        let (resource, name) = (key.kind.resource(), &key.name);
        error.message = format!("Operation cannot be fulfilled on {resource} {name:?}: {why}");
        error
    }

    /// An injected [`Fault::ServerError`] other than 429, with the `Status` the real server
    /// answers that code with when its etcd fails: apierrors' NewInternalError,
    /// NewServiceUnavailable and NewTimeoutError (the timeout filter's), the generic error
    /// otherwise.
    pub(super) fn injected(code: u16) -> ApiError {
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

    pub(super) fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    pub(super) fn into_response(self) -> Response<Body> {
        json_response(self.code, Body::from(self.status().to_string()))
    }
}

pub(super) fn json_response(code: u16, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(super) fn object_response(code: u16, obj: &Value) -> Response<Body> {
    json_response(code, Body::from(obj.to_string()))
}
