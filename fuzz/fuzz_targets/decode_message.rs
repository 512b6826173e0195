//! Every CBOR message type through `message::decode`: errors are fine, panics are bugs, and
//! whatever decodes must re-encode to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::message::{
    decode, encode, Ack, ClientStatus, ModelManifest, RoundAnnouncement, ServerStatus, UpdateManifest,
};

fn check<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = decode::<T>(data, 1 << 20) {
        let again: T = decode(&encode(&msg), 1 << 20).expect("re-encoded message must decode");
        // NaN floats are the one legitimate inequality.
        if format!("{msg:?}").contains("NaN") {
            return;
        }
        assert_eq!(again, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<ServerStatus>(data);
    check::<RoundAnnouncement>(data);
    check::<ModelManifest>(data);
    check::<ClientStatus>(data);
    check::<UpdateManifest>(data);
    check::<Ack>(data);
});
