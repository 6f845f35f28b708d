//! The embedded API server is as strict as a real kube-apiserver about CustomResourceDefinitions
//! and the custom resources they serve: structural schemas only, the real `Status` of a
//! refusal, unknown fields pruned, defaults filled in, values validated, and no custom resource
//! without its CRD.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt};
use serde_json::{json, Value};
use support::apiserver::{crd, ApiServer};

const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const CLUSTERS: &str = "/apis/pgwarden.dev/v1/namespaces/default/postgresclusters";

/// One HTTP/1.1 request with a JSON body: the status code and the JSON answer.
fn request(server: &ApiServer, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let addr = server.url().trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let content_type = match method {
        "PATCH" => "application/merge-patch+json",
        _ => "application/json",
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn cluster(spec: Value) -> Value {
    json!({
        "apiVersion": "pgwarden.dev/v1", "kind": "PostgresCluster",
        "metadata": {"name": "pg"}, "spec": spec,
    })
}

fn secrets() -> Value {
    json!({"superuser": {"name": "su"}, "replication": {"name": "repl"}})
}

/// The CRD as the generator wrote it before it stopped closing objects: a schema with
/// `additionalProperties: false` beside `properties`, which a real API server refuses.
fn closed_crd() -> Value {
    let mut crd = crd();
    let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    spec["additionalProperties"] = json!(false);
    crd
}

#[tokio::test]
async fn config_crd_installs_through_the_kube_client_and_is_established() {
    let server = ApiServer::bare();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig(dir.path(), "admin")).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(Client::try_from(config).unwrap());
    let wanted: CustomResourceDefinition = serde_json::from_value(crd()).unwrap();
    let created = crds.create(&PostParams::default(), &wanted).await.unwrap();
    let status = created.status.unwrap();
    assert_eq!(status.stored_versions.unwrap(), ["v1"]);
    let established = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Established");
    assert_eq!(established.unwrap().status, "True");
    let got = crds.get("postgresclusters.pgwarden.dev").await.unwrap();
    assert_eq!(
        got.spec.names.list_kind.as_deref(),
        Some("PostgresClusterList")
    );
    assert_eq!(crds.list(&Default::default()).await.unwrap().items.len(), 1);
    // A cluster-scoped object has no namespaced path.
    let namespaced = format!(
        "/apis/apiextensions.k8s.io/v1/namespaces/default/customresourcedefinitions/{}",
        "postgresclusters.pgwarden.dev"
    );
    assert_eq!(request(&server, "GET", &namespaced, None).0, 404);

    // What `pgwarden crd` generates installs too.
    let generated = serde_json::to_value(pgwarden::k8s::crd::PostgresCluster::crd()).unwrap();
    let (code, answer) = request(&ApiServer::bare(), "POST", CRDS, Some(&generated));
    assert_eq!(code, 201, "{answer:#}");
}

#[test]
fn the_old_closed_schema_is_refused_with_the_real_status() {
    let server = ApiServer::bare();
    let (code, status) = request(&server, "POST", CRDS, Some(&closed_crd()));
    assert_eq!(code, 422, "{status:#}");
    let field = "spec.validation.openAPIV3Schema.properties[spec].additionalProperties";
    assert_eq!(
        status,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "code": 422, "reason": "Invalid",
            "message": format!("CustomResourceDefinition.apiextensions.k8s.io \"postgresclusters.pgwarden.dev\" is invalid: {field}: Forbidden: additionalProperties and properties are mutual exclusive"),
            "details": {
                "name": "postgresclusters.pgwarden.dev", "group": "apiextensions.k8s.io",
                "kind": "CustomResourceDefinition",
                "causes": [{
                    "reason": "FieldValueForbidden",
                    "message": "Forbidden: additionalProperties and properties are mutual exclusive",
                    "field": field,
                }],
            },
        })
    );
    assert_eq!(request(&server, "GET", CRDS, None).1["items"], json!([]));
}

#[test]
fn a_crd_is_refused_for_a_missing_type_and_names_that_disagree() {
    let server = ApiServer::bare();
    let mut untyped = crd();
    let spec =
        &mut untyped["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    spec["properties"]["extra"] = json!({"description": "no type"});
    let (code, status) = request(&server, "POST", CRDS, Some(&untyped));
    assert_eq!(code, 422, "{status:#}");
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "FieldValueRequired"
    );
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "spec.validation.openAPIV3Schema.properties[spec].properties[extra].type"
    );
    assert_eq!(
        status["details"]["causes"][0]["message"],
        "Required value: must not be empty for specified object fields"
    );

    let mut misnamed = crd();
    misnamed["metadata"]["name"] = json!("clusters.pgwarden.dev");
    misnamed["spec"]["versions"][0]["storage"] = json!(false);
    let (code, status) = request(&server, "POST", CRDS, Some(&misnamed));
    assert_eq!(code, 422);
    let message = status["message"].as_str().unwrap();
    assert!(message.starts_with("CustomResourceDefinition.apiextensions.k8s.io \"clusters.pgwarden.dev\" is invalid: [metadata.name: Invalid value: \"clusters.pgwarden.dev\": must be spec.names.plural+\".\"+spec.group, "), "{message}");
    assert!(
        message.contains("must have exactly one version marked as storage version"),
        "{message}"
    );

    // Once installed, the group and plural cannot change.
    let path = format!("{CRDS}/postgresclusters.pgwarden.dev");
    assert_eq!(request(&server, "POST", CRDS, Some(&crd())).0, 201);
    let patch = json!({"spec": {"group": "other.dev"}});
    let (code, status) = request(&server, "PATCH", &path, Some(&patch));
    assert_eq!(code, 422);
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("spec.group: Invalid value: \"other.dev\": field is immutable"),
        "{status:#}"
    );
}

#[test]
fn custom_resources_exist_only_with_their_crd() {
    let server = ApiServer::bare();
    let obj = cluster(json!({"instances": 1, "secrets": secrets()}));
    assert_eq!(request(&server, "POST", CLUSTERS, Some(&obj)).0, 404);
    assert_eq!(request(&server, "GET", CLUSTERS, None).0, 404);
    let direct = pgwarden::demo::apiserver::ApiServer::create(&server, obj.clone());
    assert_eq!(direct.unwrap_err().code(), 404);

    assert_eq!(request(&server, "POST", CRDS, Some(&crd())).0, 201);
    assert_eq!(request(&server, "POST", CLUSTERS, Some(&obj)).0, 201);
    assert_eq!(
        request(&server, "GET", &format!("{CLUSTERS}/pg"), None).0,
        200
    );

    // Deleting the CRD deletes its objects.
    let path = format!("{CRDS}/postgresclusters.pgwarden.dev");
    assert_eq!(request(&server, "DELETE", &path, None).0, 200);
    assert_eq!(
        request(&server, "GET", &format!("{CLUSTERS}/pg"), None).0,
        404
    );
    assert_eq!(request(&server, "POST", CRDS, Some(&crd())).0, 201);
    assert_eq!(
        request(&server, "GET", CLUSTERS, None).1["items"],
        json!([])
    );
}

#[test]
fn unknown_fields_are_pruned_and_defaults_filled_in() {
    let server = ApiServer::start();
    let mut spec = json!({"instances": 2, "secrets": secrets(), "bogus": 1});
    spec["postgresql"] =
        json!({"parameters": {"work_mem": "4MB", "max_connections": 50}, "typo": true});
    spec["failover"] = json!({"leaseDurationSeconds": 20});
    let (code, stored) = request(&server, "POST", CLUSTERS, Some(&cluster(spec)));
    assert_eq!(code, 201, "{stored:#}");
    let spec = &stored["spec"];
    assert_eq!(spec.get("bogus"), None);
    assert_eq!(
        spec["postgresql"],
        json!({"parameters": {"work_mem": "4MB", "max_connections": 50}, "pgHba": [], "tls": {"mode": "off", "replicationAuth": "password"}})
    );
    // A given object gets the defaults of its missing fields, a missing one its own default.
    assert_eq!(
        spec["failover"],
        json!({"leaseDurationSeconds": 20, "renewDeadlineSeconds": 6, "retryPeriodSeconds": 2, "recloneOnRewindFailure": true})
    );
    assert_eq!(
        spec["synchronous"],
        json!({"allowDegraded": false, "mode": "off", "number": 0})
    );
    assert_eq!(
        spec["secrets"]["superuser"],
        json!({"name": "su", "key": "password"})
    );
    assert_eq!(spec["updateStrategy"], "restart");
    assert_eq!(
        server
            .get("pgwarden.dev/v1", "postgresclusters", "default", "pg")
            .unwrap()["spec"],
        *spec
    );

    // A status write is pruned the same way.
    let status = json!({"status": {"phase": "Running", "made": "up"}});
    let (code, patched) = request(
        &server,
        "PATCH",
        &format!("{CLUSTERS}/pg/status"),
        Some(&status),
    );
    assert_eq!(code, 200, "{patched:#}");
    assert_eq!(patched["status"], json!({"phase": "Running"}));
}

#[test]
fn wrong_types_and_out_of_range_values_are_refused_naming_the_field() {
    let server = ApiServer::start();
    let bad = cluster(json!({"instances": "three", "secrets": secrets()}));
    let (code, status) = request(&server, "POST", CLUSTERS, Some(&bad));
    assert_eq!(code, 422);
    assert_eq!(
        status["message"],
        "PostgresCluster.pgwarden.dev \"pg\" is invalid: spec.instances: Invalid value: \"string\": spec.instances in body must be of type integer: \"string\""
    );
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "FieldValueTypeInvalid"
    );
    assert_eq!(status["details"]["kind"], "PostgresCluster");

    let bad = cluster(
        json!({"instances": 0, "synchronous": {"mode": "on"}, "secrets": {"superuser": {"name": ""}}}),
    );
    let (code, status) = request(&server, "POST", CLUSTERS, Some(&bad));
    assert_eq!(code, 422);
    assert_eq!(
        status["message"],
        "PostgresCluster.pgwarden.dev \"pg\" is invalid: [\
         spec.instances: Invalid value: 0: spec.instances in body should be greater than or equal to 1, \
         spec.secrets.superuser.name: Invalid value: \"\": spec.secrets.superuser.name in body should be at least 1 chars long, \
         spec.secrets.replication: Required value, \
         spec.synchronous.mode: Unsupported value: \"on\": supported values: \"off\", \"quorum\"]"
    );

    // Updates and status writes are validated too, and leave the object as it was.
    let good = cluster(json!({"instances": 1, "secrets": secrets()}));
    assert_eq!(request(&server, "POST", CLUSTERS, Some(&good)).0, 201);
    let path = format!("{CLUSTERS}/pg");
    let (code, status) = request(
        &server,
        "PATCH",
        &path,
        Some(&json!({"spec": {"instances": 17}})),
    );
    assert_eq!(code, 422);
    assert_eq!(status["details"]["causes"][0]["field"], "spec.instances");
    let status_patch = json!({"status": {"readyInstances": -1}});
    let (code, status) = request(
        &server,
        "PATCH",
        &format!("{path}/status"),
        Some(&status_patch),
    );
    assert_eq!(code, 422, "{status:#}");
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "status.readyInstances"
    );
    let stored = request(&server, "GET", &path, None).1;
    assert_eq!(
        (stored["spec"]["instances"].clone(), stored.get("status")),
        (json!(1), None)
    );
}

#[test]
fn the_crd_decides_whether_there_is_a_status_subresource() {
    let server = ApiServer::bare();
    let mut plain = crd();
    plain["spec"]["versions"][0]
        .as_object_mut()
        .unwrap()
        .remove("subresources");
    assert_eq!(request(&server, "POST", CRDS, Some(&plain)).0, 201);
    let mut obj = cluster(json!({"instances": 1, "secrets": secrets()}));
    obj["status"] = json!({"phase": "Kept"});
    let (code, created) = request(&server, "POST", CLUSTERS, Some(&obj));
    assert_eq!(
        (code, created["status"].clone()),
        (201, json!({"phase": "Kept"}))
    );
    let status = json!({"status": {"phase": "x"}});
    assert_eq!(
        request(
            &server,
            "PATCH",
            &format!("{CLUSTERS}/pg/status"),
            Some(&status)
        )
        .0,
        404
    );
}
