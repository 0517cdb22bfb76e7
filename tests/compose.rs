//! docker-compose.yml cannot run here (no Docker engine), so its structure is
//! checked instead: every service of the stack is there, with an image and a
//! healthcheck, and every dependency names a service that exists.

use serde_yaml_ng::Value;

#[test]
fn docker_compose_describes_the_whole_stack_with_healthchecks() {
    let text = std::fs::read_to_string("docker-compose.yml").expect("docker-compose.yml exists");
    let doc: Value = serde_yaml_ng::from_str(&text).expect("docker-compose.yml is valid YAML");
    let services = doc["services"].as_mapping().expect("a services mapping");
    for name in ["kafka", "schema-registry", "postgres", "rabbitmq", "asr"] {
        let svc = &services[name];
        assert!(svc.is_mapping(), "service {name} is missing");
        assert!(
            svc["image"].as_str().is_some_and(|s| !s.is_empty()),
            "{name} has no image"
        );
        let test = &svc["healthcheck"]["test"];
        assert!(
            test.as_sequence().is_some_and(|s| !s.is_empty()) || test.as_str().is_some(),
            "{name} has no healthcheck test"
        );
    }
    for (name, svc) in services {
        let name = name.as_str().expect("service names are strings");
        if let Some(deps) = svc["depends_on"].as_mapping() {
            for (dep, cond) in deps {
                let dep = dep.as_str().expect("dependency names are strings");
                assert!(
                    services.contains_key(dep),
                    "{name} depends on unknown {dep}"
                );
                assert!(
                    cond["condition"].as_str().is_some(),
                    "{name} -> {dep} has no condition"
                );
            }
        }
        if let Some(ports) = svc["ports"].as_sequence() {
            for p in ports {
                let p = p.as_str().expect("ports are quoted strings");
                assert!(
                    p.rsplit(':')
                        .next()
                        .is_some_and(|n| n.parse::<u16>().is_ok()),
                    "{name} has a bad port mapping {p}"
                );
            }
        }
    }
}
