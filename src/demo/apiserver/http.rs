//! HTTP.

use super::*;

pub(super) fn run(
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

pub(super) async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
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
pub(super) fn hang_up() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "dropped by the API server",
    )
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, io::Error> {
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
pub(super) fn injected(code: u16) -> Response<Body> {
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

pub(super) fn header(req: &Request<Incoming>, name: hyper::header::HeaderName) -> &str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
}

/// A boolean query parameter, spelt `true` or `1` as the real server accepts.
pub(super) fn flag(query: &Params, name: &str) -> bool {
    query.get(name).is_some_and(|v| v == "true" || v == "1")
}

pub(super) type Params = HashMap<String, String>;

/// A request's target, read from the path shape `/api/v1[/namespaces/{ns}]/{plural}[/{name}
/// [/status]]` or the same under `/apis/{group}/{version}`. Without a namespace, a namespaced
/// kind serves only its collections (list, watch); a cluster-scoped kind is never in one.
pub(super) struct Route {
    pub(super) kind: &'static Kind,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) sub: Sub,
    pub(super) verb: &'static str,
    pub(super) query: Params,
}

impl Route {
    pub(super) fn parse(req: &Request<Incoming>) -> Result<Route, ApiError> {
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

    pub(super) fn key(&self) -> Key {
        let (ns, name) = (self.namespace.as_deref(), self.name.as_deref());
        Key::new(self.kind, ns.unwrap_or(""), name.unwrap_or(""))
    }

    /// A query parameter, absent when empty.
    pub(super) fn param<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.query.get(name).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(value) => value
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid value for {name}: {value:?}"))),
        }
    }

    /// The resource as counted: `pods`, or `pods/status`.
    pub(super) fn resource(&self) -> String {
        match self.sub {
            Sub::Main => self.kind.plural.to_string(),
            Sub::Status => format!("{}/status", self.kind.plural),
        }
    }
}

pub(super) async fn serve(
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
pub(super) fn list(store: &Store, route: &Route) -> Result<Response<Body>, ApiError> {
    let list = json!({
        "kind": format!("{}List", route.kind.kind),
        "apiVersion": route.kind.api_version,
        "metadata": { "resourceVersion": store.rv.to_string() },
        "items": store.list(&Filter::new(route)?),
    });
    Ok(object_response(200, &list))
}
