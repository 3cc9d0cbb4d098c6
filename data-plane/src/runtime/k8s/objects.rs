//! The Kubernetes objects the `k8s` backend creates: one hardened pod per
//! session (or per warm slot) and the runtime NetworkPolicy.
//!
//! Every field comes from the data plane's configuration, the runtime
//! registry (operator-owned), validated ids (session, tenant) and numeric
//! limits already checked against the runtime's maximums. Nothing a tenant
//! sends as free text (code, `env`, file names, package names) reaches a pod
//! object: the session's `env` goes to the agent in the create call and from
//! there only to the interpreter. No annotation is ever set (`dev.gvisor.*`
//! annotations change sandbox settings), and the security fields are
//! constants. `tests` below send crafted requests and check the objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, Pod,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};
use shared::agent::EffectiveLimits;

/// The port the in-pod session agent listens on.
pub const AGENT_PORT: u16 = 9000;
/// The uid and gid the pod runs as (`nobody`).
pub const POD_UID: i64 = 65534;
/// Backstop lifetime of a pod: the agent's maximum session TTL plus slack,
/// so a pod outlives no data plane that forgot it by more than a day.
pub const POD_DEADLINE_SECONDS: i64 = 86_400 + 300;
/// Size of the pod's `/tmp` (agent state: small).
pub const TMP_SIZE: &str = "64Mi";

/// `app.kubernetes.io/managed-by` value on every pod the backend creates.
pub const MANAGED_BY: &str = "agent-sandbox-data-plane";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_ROLE: &str = "agentsandbox.dev/role";
pub const LABEL_OWNER: &str = "agentsandbox.dev/owner";
pub const LABEL_RUNTIME: &str = "agentsandbox.dev/runtime";
pub const LABEL_STATE: &str = "agentsandbox.dev/state";
pub const LABEL_SESSION: &str = "agentsandbox.dev/session";
pub const LABEL_TENANT: &str = "agentsandbox.dev/tenant";
/// On the data plane's own pods: the runtime NetworkPolicy lets only them in.
pub const LABEL_DATA_PLANE: &str = "agentsandbox.dev/data-plane";
pub const ROLE_RUNTIME: &str = "runtime";
pub const STATE_WARM: &str = "warm";
pub const STATE_BOUND: &str = "bound";

/// What a runtime pod is made from.
#[derive(Debug, Clone)]
pub struct PodParams<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// `RUNTIME_OWNER`.
    pub owner: &'a str,
    pub runtime: &'a str,
    pub image: &'a str,
    /// The interpreter's path in the image.
    pub interpreter: &'a str,
    pub runtime_class: &'a str,
    /// The data plane's `ENV` (the agent refuses development flags in production).
    pub environment: &'a str,
    /// SHA-256 (hex) of the pod's token: the only form of it the pod holds.
    pub token_sha256: &'a str,
    pub limits: EffectiveLimits,
    /// The session and tenant a cold pod is created for (warm pods: none).
    pub binding: Option<(&'a str, &'a str)>,
}

/// The labels that select this data plane's runtime pods.
pub fn owner_selector(owner: &str) -> String {
    format!("{LABEL_ROLE}={ROLE_RUNTIME},{LABEL_OWNER}={owner}")
}

/// The label value that names a session: its id when that is a valid label
/// value, otherwise a digest of it (ids may be 128 characters; labels 63).
pub fn session_label(session_id: &str) -> String {
    if session_id.len() <= 63 && is_label_value(session_id) {
        session_id.to_owned()
    } else {
        let digest = hex::encode(Sha256::digest(session_id.as_bytes()));
        format!("h-{}", &digest[..40])
    }
}

/// The labels of a pod (warm, or bound to a session and tenant).
pub fn pod_labels(
    owner: &str,
    runtime: &str,
    binding: Option<(&str, &str)>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_ROLE.to_owned(), ROLE_RUNTIME.to_owned()),
        (LABEL_OWNER.to_owned(), owner.to_owned()),
        (LABEL_RUNTIME.to_owned(), runtime.to_owned()),
    ]);
    match binding {
        Some((session, tenant)) => {
            labels.insert(LABEL_STATE.into(), STATE_BOUND.into());
            labels.insert(LABEL_SESSION.into(), session_label(session));
            labels.insert(LABEL_TENANT.into(), tenant.to_owned());
        }
        None => {
            labels.insert(LABEL_STATE.into(), STATE_WARM.into());
        }
    }
    labels
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The interpreter variable of the agent for a runtime.
fn interpreter_var(runtime: &str) -> Option<&'static str> {
    match runtime {
        "python" => Some("SESSION_AGENT_PYTHON"),
        "node" => Some("SESSION_AGENT_NODE"),
        "bash" => Some("SESSION_AGENT_BASH"),
        _ => None,
    }
}

/// A runtime pod, hardened to Pod Security `restricted`.
pub fn runtime_pod(p: &PodParams<'_>) -> Pod {
    let l = &p.limits;
    let resources: BTreeMap<String, Quantity> = BTreeMap::from([
        ("cpu".into(), Quantity(format!("{}m", l.cpu_millicores))),
        ("memory".into(), Quantity(format!("{}Mi", l.memory_mb))),
        (
            "ephemeral-storage".into(),
            Quantity(format!("{}Mi", l.disk_mb)),
        ),
    ]);
    let mut env_vars = vec![
        env("ENV", p.environment),
        env("SESSION_AGENT_ADDR", &format!("0.0.0.0:{AGENT_PORT}")),
        env("SESSION_ISOLATION", "pod"),
        env("SESSION_AGENT_ADMIN_TOKEN_SHA256", p.token_sha256),
        env("SESSION_AGENT_MAX_SESSIONS", "1"),
        env("WORKSPACE_ROOT", "/workspace"),
        env("SESSION_AGENT_STATE_DIR", "/tmp/agent"),
    ];
    if let Some(var) = interpreter_var(p.runtime) {
        env_vars.push(env(var, p.interpreter));
    }
    // A warm pod pre-starts its one interpreter, so claiming it is a warm
    // start of the agent (milliseconds), not an interpreter start.
    if p.binding.is_none() {
        env_vars.push(env("SESSION_AGENT_WARM_POOL", &format!("{}=1", p.runtime)));
    }
    let container = Container {
        name: "agent".into(),
        image: Some(p.image.into()),
        image_pull_policy: Some("IfNotPresent".into()),
        ports: Some(vec![ContainerPort {
            name: Some("agent".into()),
            container_port: i32::from(AGENT_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: Some(env_vars),
        resources: Some(ResourceRequirements {
            limits: Some(resources.clone()),
            requests: Some(resources),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(POD_UID),
            run_as_group: Some(POD_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/v1/health".into()),
                port: IntOrString::Int(i32::from(AGENT_PORT)),
                ..Default::default()
            }),
            period_seconds: Some(2),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/v1/health".into()),
                port: IntOrString::Int(i32::from(AGENT_PORT)),
                ..Default::default()
            }),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "workspace".into(),
                mount_path: "/workspace".into(),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let memory_dir = |size: String| EmptyDirVolumeSource {
        medium: Some("Memory".into()),
        size_limit: Some(Quantity(size)),
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(p.name.into()),
            namespace: Some(p.namespace.into()),
            labels: Some(pod_labels(p.owner, p.runtime, p.binding)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            runtime_class_name: Some(p.runtime_class.into()),
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            host_network: Some(false),
            host_pid: Some(false),
            host_ipc: Some(false),
            host_users: None,
            termination_grace_period_seconds: Some(1),
            active_deadline_seconds: Some(POD_DEADLINE_SECONDS),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(POD_UID),
                run_as_group: Some(POD_UID),
                fs_group: Some(POD_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "workspace".into(),
                    empty_dir: Some(memory_dir(format!("{}Mi", l.disk_mb))),
                    ..Default::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(memory_dir(TMP_SIZE.into())),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The name of the runtime NetworkPolicy of a data plane install.
pub fn network_policy_name(owner: &str) -> String {
    format!("agent-sandbox-runtime-{owner}")
}

/// Default deny for this data plane's runtime pods: ingress only from the
/// data plane's pods on the agent port, no egress at all (no metadata
/// endpoint, no cluster DNS, no other pod).
pub fn runtime_network_policy(namespace: &str, owner: &str, dp_namespace: &str) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(network_policy_name(owner)),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
                (LABEL_OWNER.to_owned(), owner.to_owned()),
            ])),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (LABEL_ROLE.to_owned(), ROLE_RUNTIME.to_owned()),
                    (LABEL_OWNER.to_owned(), owner.to_owned()),
                ])),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            "kubernetes.io/metadata.name".to_owned(),
                            dp_namespace.to_owned(),
                        )])),
                        ..Default::default()
                    }),
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            LABEL_DATA_PLANE.to_owned(),
                            owner.to_owned(),
                        )])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(i32::from(AGENT_PORT))),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            }]),
            egress: Some(vec![]),
        }),
    }
}

/// A DNS-1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| alnum(b) || b == b'-')
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum)
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label value: empty, or 1-63 of `[A-Za-z0-9._-]` alphanumeric at both ends.
pub fn is_label_value(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    s.len() <= 63
        && s.bytes()
            .all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum)
}

/// A fresh pod name: `sbx-` and 10 random `[a-z0-9]` (never from tenant input).
pub fn new_pod_name() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..10)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("sbx-{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params<'a>(binding: Option<(&'a str, &'a str)>) -> PodParams<'a> {
        PodParams {
            name: "sbx-abc",
            namespace: "agent-sandbox-runtime",
            owner: "dp",
            runtime: "python",
            image: "runtime-python:dev",
            interpreter: "/usr/bin/python3",
            runtime_class: "gvisor",
            environment: "production",
            token_sha256: "ab",
            limits: crate::runtime::DEFAULT_LIMITS,
            binding,
        }
    }

    #[test]
    fn long_or_odd_session_ids_get_a_digest_label() {
        assert_eq!(session_label("ses_abc123"), "ses_abc123");
        for odd in ["a".repeat(64), "ends-".into(), "_starts".into()] {
            let l = session_label(&odd);
            assert!(
                l.starts_with("h-") && l.len() == 42 && is_label_value(&l),
                "{l}"
            );
        }
        assert_ne!(
            session_label(&"a".repeat(64)),
            session_label(&"a".repeat(65))
        );
    }

    #[test]
    fn the_pod_is_restricted_and_carries_only_fixed_fields() {
        let pod = runtime_pod(&params(Some(("ses_1", "acme"))));
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert!(spec.service_account_name.is_none() && spec.node_name.is_none());
        assert!(pod.metadata.annotations.is_none(), "no annotation, ever");
        let c = &spec.containers[0];
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert!(
            !env.iter()
                .any(|n| n.contains("TOKEN") && !n.ends_with("SHA256"))
        );
        let labels = pod.metadata.labels.expect("labels");
        assert_eq!(labels[LABEL_TENANT], "acme");
        assert_eq!(labels[LABEL_STATE], STATE_BOUND);
    }

    #[test]
    fn validators() {
        assert!(is_dns_label("agent-sandbox-runtime"));
        assert!(!is_dns_label("-a") && !is_dns_label("A") && !is_dns_label(""));
        assert!(is_dns_subdomain("gvisor.example.com") && !is_dns_subdomain("a..b"));
        assert!(is_label_value("") && is_label_value("A_b.c-1") && !is_label_value("a b"));
        let n = new_pod_name();
        assert!(is_dns_label(&n) && n.len() == 14, "{n}");
    }
}
