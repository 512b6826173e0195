//! MQTT topic names: builders for every topic of the protocol, wildcard filters, and a parser.
//!
//! Layout (`<p>` = `zk0/v1/<federation>`):
//!
//! ```text
//! <p>/server/status                          retained, aggregator (and its last will)
//! <p>/round                                  retained
//! <p>/model/<id>/manifest                    retained
//! <p>/model/<id>/chunk/<i>                   retained
//! <p>/client/<cid>/status                    retained, agent (and its last will)
//! <p>/client/<cid>/update/<round>/chunk/<i>
//! <p>/client/<cid>/update/<round>/manifest
//! <p>/client/<cid>/ack/<round>
//! ```
//!
//! Federation and client ids are restricted to `[A-Za-z0-9_.-]`, 1–64 chars, not starting with
//! `.`: stricter than MQTT needs, because the aggregator also uses client ids as spool
//! directory names and Prometheus label values.

use crate::ProtoError;

/// Topic root shared by every federation of this protocol version.
pub const ROOT: &str = "zk0/v1";

const MAX_ID_LEN: usize = 64;

fn validate_id(what: &'static str, id: &str) -> Result<(), ProtoError> {
    let why = if id.is_empty() {
        "must not be empty"
    } else if id.len() > MAX_ID_LEN {
        "must be at most 64 characters"
    } else if id.starts_with('.') {
        "must not start with '.'"
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        "may only contain letters, digits, '_', '.' and '-' (no '/', '+', '#')"
    } else {
        return Ok(());
    };
    Err(ProtoError::InvalidName {
        what,
        value: id.chars().take(80).collect(),
        why,
    })
}

/// Checks a client id is usable in topics (and as a file name).
pub fn validate_client_id(id: &str) -> Result<(), ProtoError> {
    validate_id("client id", id)
}

/// Model ids are 64-digit lowercase hex SHA-256s.
pub fn validate_model_id(id: &str) -> Result<(), ProtoError> {
    if id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(ProtoError::InvalidName {
            what: "model id",
            value: id.chars().take(80).collect(),
            why: "must be 64 lowercase hex digits",
        })
    }
}

/// What a topic is about, with the ids it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    ServerStatus,
    Round,
    ModelManifest {
        model_id: String,
    },
    ModelChunk {
        model_id: String,
        index: u32,
    },
    ClientStatus {
        client_id: String,
    },
    UpdateChunk {
        client_id: String,
        round: u64,
        index: u32,
    },
    UpdateManifest {
        client_id: String,
        round: u64,
    },
    Ack {
        client_id: String,
        round: u64,
    },
}

/// Topic builder and parser for one federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    federation: String,
    prefix: String,
}

impl Topics {
    pub fn new(federation: &str) -> Result<Self, ProtoError> {
        validate_id("federation", federation)?;
        Ok(Self {
            federation: federation.to_owned(),
            prefix: format!("{ROOT}/{federation}"),
        })
    }

    pub fn federation(&self) -> &str {
        &self.federation
    }

    /// `zk0/v1/<fed>`
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn server_status(&self) -> String {
        format!("{}/server/status", self.prefix)
    }

    pub fn round(&self) -> String {
        format!("{}/round", self.prefix)
    }

    pub fn model_manifest(&self, model_id: &str) -> String {
        format!("{}/model/{model_id}/manifest", self.prefix)
    }

    pub fn model_chunk(&self, model_id: &str, index: u32) -> String {
        format!("{}/model/{model_id}/chunk/{index}", self.prefix)
    }

    /// `<p>/model/<id>/`: every retained topic of a model starts with this; clearing a superseded
    /// model means publishing empty retained payloads to its manifest and each chunk topic.
    pub fn model_prefix(&self, model_id: &str) -> String {
        format!("{}/model/{model_id}/", self.prefix)
    }

    /// `<p>/model/<id>/#`: subscribe to fetch one model (manifest + chunks).
    pub fn model_filter(&self, model_id: &str) -> String {
        format!("{}/model/{model_id}/#", self.prefix)
    }

    /// `<p>/model/#`: every model's manifest and chunks.
    pub fn all_models(&self) -> String {
        format!("{}/model/#", self.prefix)
    }

    /// `<p>/model/+/manifest`: every retained model manifest (e.g. to find stale ones).
    pub fn all_model_manifests(&self) -> String {
        format!("{}/model/+/manifest", self.prefix)
    }

    pub fn client_status(&self, client_id: &str) -> String {
        format!("{}/client/{client_id}/status", self.prefix)
    }

    pub fn update_chunk(&self, client_id: &str, round: u64, index: u32) -> String {
        format!(
            "{}/client/{client_id}/update/{round}/chunk/{index}",
            self.prefix
        )
    }

    pub fn update_manifest(&self, client_id: &str, round: u64) -> String {
        format!("{}/client/{client_id}/update/{round}/manifest", self.prefix)
    }

    pub fn ack(&self, client_id: &str, round: u64) -> String {
        format!("{}/client/{client_id}/ack/{round}", self.prefix)
    }

    /// `<p>/client/<cid>/ack/+`: an agent's acks for every round.
    pub fn acks_for(&self, client_id: &str) -> String {
        format!("{}/client/{client_id}/ack/+", self.prefix)
    }

    /// `<p>/client/<cid>/#`: everything a client may publish (for broker ACLs).
    pub fn client_namespace(&self, client_id: &str) -> String {
        format!("{}/client/{client_id}/#", self.prefix)
    }

    /// `<p>/client/+/status`
    pub fn all_client_status(&self) -> String {
        format!("{}/client/+/status", self.prefix)
    }

    /// `<p>/client/+/update/#`: every update chunk and manifest.
    pub fn all_updates(&self) -> String {
        format!("{}/client/+/update/#", self.prefix)
    }

    /// Classifies a topic of this federation; `None` for anything else, including ids that
    /// fail validation and non-canonical numbers (`01`, `+1`), so one chunk has one topic.
    pub fn parse(&self, topic: &str) -> Option<TopicKind> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let kind = match parts.as_slice() {
            ["server", "status"] => TopicKind::ServerStatus,
            ["round"] => TopicKind::Round,
            ["model", id, "manifest"] => TopicKind::ModelManifest {
                model_id: model(id)?,
            },
            ["model", id, "chunk", i] => TopicKind::ModelChunk {
                model_id: model(id)?,
                index: number(i)?,
            },
            ["client", cid, "status"] => TopicKind::ClientStatus {
                client_id: client(cid)?,
            },
            ["client", cid, "update", r, "chunk", i] => TopicKind::UpdateChunk {
                client_id: client(cid)?,
                round: number(r)?,
                index: number(i)?,
            },
            ["client", cid, "update", r, "manifest"] => TopicKind::UpdateManifest {
                client_id: client(cid)?,
                round: number(r)?,
            },
            ["client", cid, "ack", r] => TopicKind::Ack {
                client_id: client(cid)?,
                round: number(r)?,
            },
            _ => return None,
        };
        Some(kind)
    }
}

fn model(id: &str) -> Option<String> {
    validate_model_id(id).ok().map(|()| id.to_owned())
}

fn client(id: &str) -> Option<String> {
    validate_client_id(id).ok().map(|()| id.to_owned())
}

/// Canonical decimal only: digits, no sign, no leading zeros.
fn number<T: std::str::FromStr>(s: &str) -> Option<T> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t() -> Topics {
        Topics::new("lab").unwrap()
    }

    #[test]
    fn builders_match_the_design() {
        let t = t();
        let id = "ab".repeat(32);
        assert_eq!(t.server_status(), "zk0/v1/lab/server/status");
        assert_eq!(t.round(), "zk0/v1/lab/round");
        assert_eq!(
            t.model_manifest(&id),
            format!("zk0/v1/lab/model/{id}/manifest")
        );
        assert_eq!(
            t.model_chunk(&id, 7),
            format!("zk0/v1/lab/model/{id}/chunk/7")
        );
        assert!(t.model_chunk(&id, 7).starts_with(&t.model_prefix(&id)));
        assert_eq!(t.model_filter(&id), format!("zk0/v1/lab/model/{id}/#"));
        assert_eq!(t.client_status("r1"), "zk0/v1/lab/client/r1/status");
        assert_eq!(
            t.update_chunk("r1", 3, 0),
            "zk0/v1/lab/client/r1/update/3/chunk/0"
        );
        assert_eq!(
            t.update_manifest("r1", 3),
            "zk0/v1/lab/client/r1/update/3/manifest"
        );
        assert_eq!(t.ack("r1", 3), "zk0/v1/lab/client/r1/ack/3");
        assert_eq!(t.all_client_status(), "zk0/v1/lab/client/+/status");
        assert_eq!(t.all_updates(), "zk0/v1/lab/client/+/update/#");
        assert_eq!(t.acks_for("r1"), "zk0/v1/lab/client/r1/ack/+");
        assert_eq!(t.client_namespace("r1"), "zk0/v1/lab/client/r1/#");
    }

    #[test]
    fn parse_inverts_builders() {
        let t = t();
        let id = "0f".repeat(32);
        let cases = [
            (t.server_status(), TopicKind::ServerStatus),
            (t.round(), TopicKind::Round),
            (
                t.model_manifest(&id),
                TopicKind::ModelManifest {
                    model_id: id.clone(),
                },
            ),
            (
                t.model_chunk(&id, 12),
                TopicKind::ModelChunk {
                    model_id: id.clone(),
                    index: 12,
                },
            ),
            (
                t.client_status("so100-a"),
                TopicKind::ClientStatus {
                    client_id: "so100-a".into(),
                },
            ),
            (
                t.update_chunk("c", u64::MAX, u32::MAX),
                TopicKind::UpdateChunk {
                    client_id: "c".into(),
                    round: u64::MAX,
                    index: u32::MAX,
                },
            ),
            (
                t.update_manifest("c", 0),
                TopicKind::UpdateManifest {
                    client_id: "c".into(),
                    round: 0,
                },
            ),
            (
                t.ack("c", 5),
                TopicKind::Ack {
                    client_id: "c".into(),
                    round: 5,
                },
            ),
        ];
        for (topic, kind) in cases {
            assert_eq!(t.parse(&topic), Some(kind), "{topic}");
        }
    }

    #[test]
    fn parse_rejects_foreign_and_malformed_topics() {
        let t = t();
        let id = "0f".repeat(32);
        for bad in [
            "zk0/v1/other/round".to_string(),
            "zk0/v1/lab".into(),
            "zk0/v1/lab/".into(),
            "zk0/v1/labx/round".into(),
            "zk0/v1/lab/round/".into(),
            "zk0/v2/lab/round".into(),
            "zk0/v1/lab/client/c/update/01/manifest".into(),
            "zk0/v1/lab/client/c/update/+1/manifest".into(),
            "zk0/v1/lab/client/c/update/1/chunk/4294967296".into(),
            "zk0/v1/lab/client/c/update/1/chunk/".into(),
            "zk0/v1/lab/client/../status".into(),
            "zk0/v1/lab/client/+/status".into(),
            "zk0/v1/lab/client//status".into(),
            "zk0/v1/lab/model/ABC/manifest".into(),
            format!("zk0/v1/lab/model/{}/manifest", id.to_uppercase()),
            format!("zk0/v1/lab/model/{id}/chunk/x"),
        ] {
            assert_eq!(t.parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn id_validation() {
        for ok in ["a", "robot-01", "so100_left.arm", &"x".repeat(64)] {
            assert!(validate_client_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a+b",
            "a#",
            ".hidden",
            "..",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(validate_client_id(bad).is_err(), "{bad:?}");
            assert!(Topics::new(bad).is_err(), "{bad:?}");
        }
        assert!(validate_model_id(&"a".repeat(64)).is_ok());
        assert!(validate_model_id(&"a".repeat(63)).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = t().parse(&s);
            let _ = t().parse(&format!("zk0/v1/lab/{s}"));
        }

        #[test]
        fn update_chunk_round_trips(cid in "[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,63}", round in any::<u64>(), i in any::<u32>()) {
            let t = t();
            prop_assert_eq!(
                t.parse(&t.update_chunk(&cid, round, i)),
                Some(TopicKind::UpdateChunk { client_id: cid.clone(), round, index: i })
            );
        }
    }
}
