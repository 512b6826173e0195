//! `topic::Topics::parse` on arbitrary strings: never panics, and every parsed topic is
//! rebuilt exactly by the matching builder (one topic per meaning).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::topic::{TopicKind, Topics};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let t = Topics::new("fed").expect("valid federation");
    for topic in [s.to_string(), format!("zk0/v1/fed/{s}")] {
        let Some(kind) = t.parse(&topic) else { continue };
        let rebuilt = match &kind {
            TopicKind::ServerStatus => t.server_status(),
            TopicKind::Round => t.round(),
            TopicKind::ModelManifest { model_id } => t.model_manifest(model_id),
            TopicKind::ModelChunk { model_id, index } => t.model_chunk(model_id, *index),
            TopicKind::ClientStatus { client_id } => t.client_status(client_id),
            TopicKind::UpdateChunk { client_id, round, index } => t.update_chunk(client_id, *round, *index),
            TopicKind::UpdateManifest { client_id, round } => t.update_manifest(client_id, *round),
            TopicKind::Ack { client_id, round } => t.ack(client_id, *round),
        };
        assert_eq!(rebuilt, topic);
    }
});
