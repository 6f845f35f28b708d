//! The StatefulSet agrees with what pgwarden serves, with the image and with the other manifests.

use super::*;

fn unquote(s: &str) -> &str {
    s.trim_matches('"')
}

fn seconds(s: &str) -> u64 {
    s.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{s} is not whole seconds"))
}

/// The image's environment defaults (`ENV` in docker/Dockerfile) and user.
fn dockerfile() -> (BTreeMap<String, String>, String) {
    let text = read(&root().join("docker/Dockerfile"));
    // The ENV instructions, with their continuation lines.
    let mut env = BTreeMap::new();
    let mut in_env = false;
    for line in text.lines() {
        if line.starts_with("ENV ") {
            in_env = true;
        }
        if in_env {
            for word in line.split_whitespace() {
                if let Some((k, v)) = word.split_once('=') {
                    if k.starts_with("PGWARDEN_") {
                        env.insert(k.to_string(), v.to_string());
                    }
                }
            }
            in_env = line.trim_end().ends_with('\\');
        }
    }
    let users: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .map(|u| u.trim().to_string())
        .collect();
    assert_eq!(users.len(), 1, "one USER in the Dockerfile: {users:?}");
    (env, users.into_iter().next().unwrap())
}

/// Is `path` inside `dir` (or `dir` itself)?
fn under(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(dir)
}

#[test]
fn the_statefulset_agrees_with_pgwarden_the_image_and_the_other_manifests() {
    let all = manifests();
    let sts: StatefulSet = typed(&find(&all, "StatefulSet", "pg"));
    let cluster = find(&all, "PostgresCluster", "");
    let spec = sts.spec.as_ref().unwrap();
    let sts_name = sts.metadata.name.clone().unwrap();
    let replicas = spec.replicas.unwrap();
    assert_eq!(
        i64::from(replicas),
        cluster.value["spec"]["instances"].as_i64().unwrap(),
        "StatefulSet replicas and PostgresCluster instances"
    );
    let template = spec.template.metadata.as_ref().unwrap();
    let pod_labels = template.labels.clone().unwrap();
    let selector = spec.selector.match_labels.clone().unwrap();
    assert!(labels_match(&selector, &pod_labels), "selector vs template");
    assert!(
        !pod_labels.contains_key("pgwarden.dev/role")
            && !selector.contains_key("pgwarden.dev/role"),
        "pgwarden owns the role label"
    );
    assert_eq!(
        pod_labels.get("pgwarden.dev/cluster").map(String::as_str),
        Some(cluster.name())
    );

    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert!(
        c.command.is_none() && c.args.is_none(),
        "the image's entrypoint (pgwarden run) must run as it is"
    );
    let script = read(&root().join("docker/build-offline.sh"));
    let default_image = script
        .lines()
        .find_map(|l| l.strip_prefix("image="))
        .expect("the offline script's default image tag");
    assert_eq!(c.image.as_deref(), Some(default_image));
    assert_eq!(pod.enable_service_links, Some(false));

    // The environment: downward API, the cluster, and keys pgwarden accepts.
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        match (&e.value, &e.value_from) {
            (Some(v), None) => {
                env.insert(e.name.clone(), v.clone());
            }
            (None, Some(from)) => {
                let field = &from.field_ref.as_ref().expect("a fieldRef").field_path;
                let expected = match e.name.as_str() {
                    "POD_NAME" => "metadata.name",
                    "POD_NAMESPACE" => "metadata.namespace",
                    "POD_IP" => "status.podIP",
                    other => panic!("unexpected variable from the downward API: {other}"),
                };
                assert_eq!(field, expected, "{}", e.name);
                let example = match e.name.as_str() {
                    "POD_NAME" => "pg-0",
                    "POD_NAMESPACE" => "default",
                    _ => "10.0.0.7",
                };
                env.insert(e.name.clone(), example.to_string());
            }
            _ => panic!("{}: a value or a fieldRef", e.name),
        }
    }
    for var in ["POD_NAME", "POD_NAMESPACE", "POD_IP"] {
        assert!(env.contains_key(var), "{var} missing");
    }
    assert_eq!(
        env.get("PGWARDEN_KUBERNETES__CLUSTER").map(String::as_str),
        Some(cluster.name())
    );
    let (image_env, image_user) = dockerfile();
    let mut effective = image_env.clone();
    effective.extend(env.clone());
    // The pod's host name is its name, which pgwarden takes as instance_name.
    effective.insert("PGWARDEN_INSTANCE_NAME".into(), format!("{sts_name}-0"));
    let conf = check_config(&effective);
    let status_port = port_of(setting(&conf, "status_listen"));
    let metrics_port = port_of(setting(&conf, "metrics_listen"));
    let pg_port: i32 = setting(&conf, "port").parse().unwrap();
    let data_dir = unquote(setting(&conf, "data_dir")).to_string();
    let run_dir = unquote(setting(&conf, "run_dir")).to_string();
    let password_file = unquote(setting(&conf, "superuser_password_file")).to_string();
    let shutdown: u64 = ["smart_timeout", "fast_timeout", "immediate_timeout"]
        .iter()
        .map(|k| seconds(setting(&conf, k)))
        .sum();

    // Ports and probes.
    let named = |name: &str| container_port(c, &IntOrString::String(name.into()));
    assert_eq!(named("postgres"), pg_port);
    assert_eq!(named("status"), status_port);
    assert_eq!(named("metrics"), metrics_port);
    for (probe, path) in [
        (&c.startup_probe, "/startupz"),
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let probe = probe
            .as_ref()
            .unwrap_or_else(|| panic!("no probe for {path}"));
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(container_port(c, &get.port), status_port, "{path}");
        let period = probe.period_seconds.unwrap();
        let timeout = probe.timeout_seconds.unwrap();
        assert!(
            (1..=period.max(3)).contains(&timeout),
            "{path}: timeout {timeout}"
        );
        assert!((1..=10).contains(&period), "{path}: period {period}");
    }
    let startup = c.startup_probe.as_ref().unwrap();
    assert!(
        startup.period_seconds.unwrap() * startup.failure_threshold.unwrap() >= 120,
        "the startup probe must leave a first start time"
    );
    let grace = pod.termination_grace_period_seconds.unwrap() as u64;
    assert!(
        (shutdown + 2..=shutdown + 30).contains(&grace),
        "terminationGracePeriodSeconds {grace} vs pgwarden's {shutdown} s of shutdown"
    );

    // Security context: the image's user.
    let psc = pod.security_context.as_ref().unwrap();
    let (uid, gid) = image_user.split_once(':').expect("a numeric USER uid:gid");
    assert_eq!(psc.run_as_user.map(|u| u.to_string()).as_deref(), Some(uid));
    assert_eq!(
        psc.run_as_group.map(|g| g.to_string()).as_deref(),
        Some(gid)
    );
    assert_eq!(psc.fs_group.map(|g| g.to_string()).as_deref(), Some(gid));
    assert_eq!(psc.run_as_non_root, Some(true));

    // Volumes: the data directory is a subdirectory of the claim's mount, and with a read-only
    // root file system everything pgwarden and Postgres write is on a writable volume; the run
    // directory below a mount (pgwarden sets its mode, which it cannot on a mount's root).
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|m| under(path, &m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{path} is on no volume"))
            .clone()
    };
    let data = mount_of(&data_dir);
    assert_ne!(
        data.mount_path, data_dir,
        "data_dir must be below the volume's root"
    );
    let claims = spec.volume_claim_templates.clone().unwrap_or_default();
    assert!(claims
        .iter()
        .any(|t| t.metadata.name.as_deref() == Some(data.name.as_str())));
    let csc = c.security_context.as_ref().unwrap();
    if csc.read_only_root_filesystem == Some(true) {
        for dir in [&data_dir, &run_dir, "/tmp"] {
            assert_ne!(
                mount_of(dir).read_only,
                Some(true),
                "{dir} must be writable"
            );
        }
        assert_ne!(mount_of(&run_dir).mount_path, run_dir);
    }
    let volumes = pod.volumes.clone().unwrap_or_default();

    // The superuser password: the Secret the cluster names, mounted where pgwarden reads it.
    let su = &cluster.value["spec"]["secrets"]["superuser"];
    let su_name = su["name"].as_str().unwrap();
    let su_key = su["key"].as_str().unwrap_or("password");
    let pw_mount = mount_of(&password_file);
    let pw_volume = volumes.iter().find(|v| v.name == pw_mount.name).unwrap();
    let secret = pw_volume.secret.as_ref().expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some(su_name));
    let item = secret
        .items
        .iter()
        .flatten()
        .find(|i| i.key == su_key)
        .expect("the key is mounted");
    assert_eq!(
        Path::new(&pw_mount.mount_path).join(&item.path),
        Path::new(&password_file)
    );

    // The Secrets and the ConfigMap the cluster names exist, with their keys.
    for which in ["superuser", "replication"] {
        let s = &cluster.value["spec"]["secrets"][which];
        let secret: Secret = typed(&find(&all, "Secret", s["name"].as_str().unwrap()));
        let key = s["key"].as_str().unwrap_or("password");
        assert!(
            secret.string_data.iter().flatten().any(|(k, _)| k == key)
                || secret.data.iter().flatten().any(|(k, _)| k == key),
            "Secret {} has no key {key}",
            s["name"]
        );
    }
    let cq = &cluster.value["spec"]["monitoring"]["customQueries"];
    let cm: ConfigMap = typed(&find(&all, "ConfigMap", cq["name"].as_str().unwrap()));
    assert!(cm.data.unwrap().contains_key(cq["key"].as_str().unwrap()));

    // RBAC: the Pod's service account, and the names config/rbac.yaml pins.
    let sa: ServiceAccount = typed(&find(&all, "ServiceAccount", ""));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let binding: RoleBinding = typed(&find(&all, "RoleBinding", ""));
    let role: Role = typed(&find(&all, "Role", ""));
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    assert!(binding
        .subjects
        .iter()
        .flatten()
        .any(|s| s.kind == "ServiceAccount" && Some(&s.name) == sa.metadata.name.as_ref()));
    let names_for = |resource: &str| -> BTreeSet<String> {
        role.rules
            .iter()
            .flatten()
            .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
            .flat_map(|r| r.resource_names.clone().unwrap_or_default())
            .collect()
    };
    let pods: BTreeSet<String> = (0..replicas).map(|i| format!("{sts_name}-{i}")).collect();
    assert_eq!(names_for("pods"), pods, "the Role's Pod names");
    let secrets = names_for("secrets");
    for which in ["superuser", "replication"] {
        let name = cluster.value["spec"]["secrets"][which]["name"]
            .as_str()
            .unwrap();
        assert!(secrets.contains(name), "the Role cannot read Secret {name}");
    }
    // TLS: the cluster CA is read by name and created (create-only) by the first instance;
    // no rule updates or deletes a Secret.
    assert!(secrets.contains(&format!("{}-ca", cluster.name())));
    let secret_verbs: BTreeSet<String> = role
        .rules
        .iter()
        .flatten()
        .filter(|r| r.resources.iter().flatten().any(|x| x == "secrets"))
        .flat_map(|r| r.verbs.clone())
        .collect();
    let expected: BTreeSet<String> = ["create", "get", "list", "watch"].map(String::from).into();
    assert_eq!(secret_verbs, expected);
    assert!(names_for("configmaps").contains(cq["name"].as_str().unwrap()));
    assert!(names_for("leases").contains(&format!("{}-leader", cluster.name())));

    // Anti-affinity over nodes, for these pods.
    let anti = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .expect("pod anti-affinity");
    let terms: Vec<_> = anti
        .preferred_during_scheduling_ignored_during_execution
        .iter()
        .flatten()
        .map(|w| w.pod_affinity_term.clone())
        .chain(
            anti.required_during_scheduling_ignored_during_execution
                .iter()
                .flatten()
                .cloned(),
        )
        .collect();
    assert!(terms.iter().any(|t| {
        t.topology_key == "kubernetes.io/hostname"
            && t.label_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|s| labels_match(s, &pod_labels))
    }));

    // The disruption budget covers these pods.
    let pdb: PodDisruptionBudget = typed(&find(&all, "PodDisruptionBudget", ""));
    let pdb_spec = pdb.spec.unwrap();
    assert!(labels_match(
        &pdb_spec.selector.unwrap().match_labels.unwrap(),
        &pod_labels
    ));
    assert_eq!(pdb_spec.max_unavailable, Some(IntOrString::Int(1)));

    // Services: rw and ro by the role label pgwarden sets, the headless one for the pod names.
    let service = |name: &str| -> Service { typed(&find(&all, "Service", name)) };
    let role_labelled = |role: &str| {
        let mut l = pod_labels.clone();
        l.insert("pgwarden.dev/role".into(), role.into());
        l
    };
    for (name, role) in [
        (format!("{}-rw", cluster.name()), "primary"),
        (format!("{}-ro", cluster.name()), "replica"),
    ] {
        let s = service(&name).spec.unwrap();
        let sel = s.selector.unwrap();
        assert_eq!(sel.get("pgwarden.dev/role").map(String::as_str), Some(role));
        assert!(
            labels_match(&sel, &role_labelled(role)),
            "{name} selects the pods"
        );
        for other in ["primary", "replica"].iter().filter(|r| **r != role) {
            assert!(!labels_match(&sel, &role_labelled(other)));
        }
        for p in s.ports.unwrap() {
            assert_eq!(container_port(c, p.target_port.as_ref().unwrap()), pg_port);
        }
    }
    let headless = service(&spec.service_name.clone().unwrap()).spec.unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    assert!(labels_match(&headless.selector.unwrap(), &pod_labels));
}
