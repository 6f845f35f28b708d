//! The kustomizations list every manifest.

use super::*;

fn kustomization_resources(dir: &Path) -> (Vec<String>, Vec<String>) {
    let k = single(&dir.join("kustomization.yaml"));
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let resources = strings(&k["resources"]);
    let generated: Vec<String> = k["configMapGenerator"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| strings(&g["files"]))
        .collect();
    (resources, generated)
}

#[test]
fn the_kustomizations_list_every_manifest() {
    let config = config_dir();
    let dirs = [config.clone(), config.join("monitoring")];
    let mut listed = BTreeSet::new();
    for dir in &dirs {
        let (resources, generated) = kustomization_resources(dir);
        for file in resources.iter().chain(&generated) {
            let path = dir.join(file);
            assert!(path.is_file(), "{} lists a missing {file}", dir.display());
            assert!(listed.insert(path), "{file} listed twice");
        }
    }
    for file in yaml_files(&config) {
        let is_manifest = documents(&file).iter().any(|d| d.get("kind").is_some());
        let name = file.file_name().unwrap().to_str().unwrap();
        if name == "kustomization.yaml" {
            continue;
        }
        if is_manifest {
            assert!(
                listed.contains(&file),
                "{} is in no kustomization",
                file.display()
            );
        } else {
            // The plain rules file and its tests are no Kubernetes objects.
            assert!(
                ["alerts.yaml", "alerts_test.yaml"].contains(&name),
                "{} is neither a manifest nor known",
                file.display()
            );
        }
    }
    assert!(listed.contains(&config.join("monitoring/grafana-dashboard.json")));

    // kubectl's own kustomize, where kubectl is installed: it builds, and the objects are the
    // ones the files hold.
    let Ok(out) = Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
    else {
        eprintln!("kubectl is not installed: `kubectl kustomize` not tried");
        return;
    };
    assert!(out.status.success());
    let all = manifests();
    for (dir, extra) in [(&dirs[0], 0), (&dirs[1], 1)] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let built: BTreeSet<(String, String)> =
            serde_norway::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
                .map(|d| {
                    let v: Value = serde::Deserialize::deserialize(d).unwrap();
                    (
                        v["kind"].as_str().unwrap().to_string(),
                        v["metadata"]["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
        let expected: BTreeSet<(String, String)> = all
            .iter()
            .filter(|m| m.file.parent() == Some(dir.as_path()) && m.kind() != "Kustomization")
            .map(|m| (m.kind().to_string(), m.name().to_string()))
            .collect();
        assert!(expected.is_subset(&built), "{expected:?} vs {built:?}");
        assert_eq!(built.len(), expected.len() + extra, "{built:?}");
    }
}
